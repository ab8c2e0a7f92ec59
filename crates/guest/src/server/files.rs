//! Files in and out of the guest: Kata's `CopyFile` (chunks into a temporary file renamed into
//! place at full size) and our `ReadFile`.
//!
//! Paths are walked one component at a time from the root with `O_NOFOLLOW`, so a symlink on
//! the way (one that could lead out of the directory asked for) is refused, not followed; `..`
//! and `.` are refused outright; the target must be a regular file; and the kernel's own file
//! systems (`/proc`, `/sys`, `/dev`) are out of reach. All blocking: called off the workers.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchown, Gid, Uid};

use vmfactory_agent::workload::MAX_CHUNK;
use vmfactory_agent::{CopyFileChunk, FileChunk};

use crate::error::{Error, Result};

/// Top-level directories no copy reaches: the kernel's pseudo file systems.
const PSEUDO: &[&str] = &["proc", "sys", "dev"];

fn refused(path: &str, reason: &'static str) -> Error {
    Error::Refused {
        path: path.to_owned(),
        reason,
    }
}

/// The components of an absolute `path`, refusing `.`, `..`, NUL and pseudo file systems.
fn components(path: &str) -> Result<Vec<&str>> {
    if !path.starts_with('/') {
        return Err(refused(path, "not an absolute path"));
    }
    if path.contains('\0') {
        return Err(refused(path, "contains NUL"));
    }
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.iter().any(|c| *c == "." || *c == "..") {
        return Err(refused(path, "contains . or .."));
    }
    match parts.first() {
        None => Err(refused(path, "names the root directory")),
        Some(top) if PSEUDO.contains(top) => Err(refused(path, "inside a kernel file system")),
        Some(_) => Ok(parts),
    }
}

fn open_dir_at(dir: &OwnedFd, name: &str) -> nix::Result<OwnedFd> {
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the parent directory of `parts` under `root`, creating missing ones with `dir_mode`
/// when given, never following a symlink.
fn open_parent(root: &Path, path: &str, parts: &[&str], dir_mode: Option<u32>) -> Result<OwnedFd> {
    let mut dir = File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| Error::io("open", root.display(), e))?;
    for name in &parts[..parts.len() - 1] {
        dir = match open_dir_at(&dir, name) {
            Ok(d) => d,
            Err(Errno::ENOENT) if dir_mode.is_some() => {
                let mode = Mode::from_bits_truncate(dir_mode.unwrap_or(0o755) & 0o7777);
                match mkdirat(Some(dir.as_raw_fd()), *name, mode) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(Error::sys("create directory", path, e)),
                }
                open_dir_at(&dir, name).map_err(|e| Error::sys("open directory", path, e))?
            }
            Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                return Err(refused(path, "a symlink or a non-directory on the way"))
            }
            Err(e) => return Err(Error::sys("open directory", path, e)),
        };
    }
    Ok(dir)
}

/// Fails unless `name` in `dir` is missing or a regular file.
fn check_target(dir: &OwnedFd, name: &str, path: &str) -> Result<()> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG => Ok(()),
        Ok(_) => Err(refused(path, "not a regular file")),
        Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::sys("stat", path, e)),
    }
}

/// Writes one chunk of a copy; at full size the file is given its owner and mode and renamed
/// into place.
pub fn copy_chunk(root: &Path, c: &CopyFileChunk) -> Result<()> {
    let parts = components(&c.path)?;
    let end = c.offset.checked_add(c.data.len() as u64);
    if end.map_or(true, |e| e > c.file_size) {
        return Err(Error::Invalid(format!(
            "chunk at {} of {} bytes passes the file size {}",
            c.offset,
            c.data.len(),
            c.file_size
        )));
    }
    let dir = open_parent(root, &c.path, &parts, Some(c.dir_mode))?;
    let name = parts[parts.len() - 1];
    check_target(&dir, name, &c.path)?;
    let tmp = format!(".{name}.vmfactory-copy");
    let mut flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if c.offset == 0 {
        flags |= OFlag::O_CREAT | OFlag::O_TRUNC;
    }
    let fd = match openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => {
            return Err(Error::Invalid(format!(
                "chunk at offset {} of {} before its first chunk",
                c.offset, c.path
            )))
        }
        Err(Errno::ELOOP) => return Err(refused(&c.path, "its temporary file is a symlink")),
        Err(e) => return Err(Error::sys("open", &c.path, e)),
    };
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all_at(&c.data, c.offset)
        .map_err(|e| Error::io("write", &c.path, e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("stat", &c.path, e))?
        .len();
    if size < c.file_size {
        return Ok(());
    }
    fchown(
        file.as_raw_fd(),
        Some(Uid::from_raw(c.uid)),
        Some(Gid::from_raw(c.gid)),
    )
    .map_err(|e| Error::sys("chown", &c.path, e))?;
    fchmod(
        file.as_raw_fd(),
        Mode::from_bits_truncate(c.file_mode & 0o7777),
    )
    .map_err(|e| Error::sys("chmod", &c.path, e))?;
    renameat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        name,
    )
    .map_err(|e| Error::sys("rename into place", &c.path, e))
}

/// Reads up to `len` bytes at `offset` of a regular file.
pub fn read_chunk(root: &Path, path: &str, offset: u64, len: u32) -> Result<FileChunk> {
    let parts = components(path)?;
    let dir = open_parent(root, path, &parts, None)?;
    let name = parts[parts.len() - 1];
    check_target(&dir, name, path)?;
    let fd = openat(
        Some(dir.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::ELOOP => refused(path, "a symlink"),
        e => Error::sys("open", path, e),
    })?;
    // SAFETY: `openat` just returned this fd and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let st = fstat(file.as_fd().as_raw_fd()).map_err(|e| Error::sys("stat", path, e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(refused(path, "not a regular file"));
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let want = u64::from(len.min(MAX_CHUNK)).min(size.saturating_sub(offset));
    let mut data = vec![0; usize::try_from(want).unwrap_or(0)];
    let mut got = 0;
    while got < data.len() {
        match file.read_at(&mut data[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    data.truncate(got);
    Ok(FileChunk {
        data,
        file_size: size,
        file_mode: st.st_mode & 0o7777,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(path: &str, size: u64, offset: u64, data: &[u8]) -> CopyFileChunk {
        CopyFileChunk {
            path: path.into(),
            file_size: size,
            file_mode: 0o640,
            dir_mode: 0o750,
            uid: Uid::effective().as_raw(),
            gid: Gid::effective().as_raw(),
            offset,
            data: data.to_vec(),
        }
    }

    #[test]
    fn copies_in_chunks_and_reads_back() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        copy_chunk(r, &chunk("/a/b/f", 6, 0, b"abc")).expect("first");
        assert!(!r.join("a/b/f").exists(), "renamed only at full size");
        copy_chunk(r, &chunk("/a/b/f", 6, 3, b"def")).expect("second");
        assert_eq!(std::fs::read(r.join("a/b/f")).expect("read"), b"abcdef");
        let got = read_chunk(r, "/a/b/f", 2, 3).expect("read chunk");
        assert_eq!(
            (got.data.as_slice(), got.file_size, got.file_mode),
            (&b"cde"[..], 6, 0o640)
        );
        assert!(read_chunk(r, "/a/b/f", 10, 3)
            .expect("past end")
            .data
            .is_empty());
        copy_chunk(r, &chunk("/empty", 0, 0, b"")).expect("empty file");
        assert_eq!(std::fs::read(r.join("empty")).expect("read"), b"");
    }

    #[test]
    fn hostile_paths_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        std::fs::create_dir(r.join("d")).expect("dir");
        std::os::unix::fs::symlink("/etc", r.join("link")).expect("symlink");
        std::os::unix::fs::symlink("/etc/passwd", r.join("d/f")).expect("symlink");
        for p in [
            "rel", "/a/../b", "/./x", "/", "/proc/x", "/dev/sda", "/link/x", "/d/f",
        ] {
            let e = copy_chunk(r, &chunk(p, 1, 0, b"x")).expect_err(p);
            assert!(matches!(e, Error::Refused { .. }), "{p}: {e}");
        }
        for p in ["/link/passwd", "/d/f", "/d"] {
            let e = read_chunk(r, p, 0, 10).expect_err(p);
            assert!(matches!(e, Error::Refused { .. }), "{p}: {e}");
        }
        let e = copy_chunk(r, &chunk("/x", 1, 0, b"xy")).expect_err("past size");
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let e = copy_chunk(r, &chunk("/y", 4, 2, b"xy")).expect_err("no first chunk");
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        assert!(!r.join("etc").exists());
    }
}
