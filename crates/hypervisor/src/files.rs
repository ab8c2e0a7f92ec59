//! Opening the files this crate reads or hands to QEMU (guest files, a clone's template
//! `state`, QEMU's stderr log) without waiting on a FIFO or device and, for files in a run or
//! template directory, without following a symlink.
//!
//! The rule is `vmfactory_persist::open_regular_blocking`'s (the one every other crate uses);
//! the hypervisor cannot call it, as the four leaf crates do not know each other
//! (docs/architecture.md). Keep the two in step: same flags, type checked on the descriptor.
//! For the same reason [`write_atomic`] repeats persist's `write_atomic_blocking` (temp file,
//! fsync, rename, fsync of the directory) for the accelerator cache, the one file this crate
//! writes.

use std::fs::{File, FileType, OpenOptions, Permissions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells apart the temporary files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether [`open_regular`] follows a symlink in the last component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Symlinks {
    /// Follow it (guest files named in the config, e.g. `/boot/vmlinuz`).
    Follow,
    /// Refuse it (files in a run or template directory: a link could point anywhere).
    Refuse,
}

/// Opens `path` read-only (close-on-exec, no controlling terminal, without blocking) and
/// checks on the descriptor that it is a regular file, or also a block device when
/// `block_device_ok`. Refusals are `InvalidInput` errors worded as the system's own.
pub(crate) fn open_regular(
    path: &Path,
    symlinks: Symlinks,
    block_device_ok: bool,
) -> io::Result<File> {
    let mut flags = libc::O_NONBLOCK | libc::O_NOCTTY;
    if symlinks == Symlinks::Refuse {
        flags |= libc::O_NOFOLLOW;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            // `O_NOFOLLOW` reports a symlink as `ELOOP`, as it does a loop further up.
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if e.raw_os_error() == Some(libc::ELOOP) && link {
                refused("Is a symbolic link (not followed)")
            } else {
                e
            }
        })?;
    let ty = file.metadata()?.file_type();
    if ty.is_file() || (block_device_ok && ty.is_block_device()) {
        Ok(file)
    } else {
        Err(refused(kind(ty)))
    }
}

/// The last `max` bytes of the regular file `path` (no symlink followed), read without
/// reading the rest, and whether anything before them was left out.
pub(crate) fn read_tail(path: &Path, max: u64) -> io::Result<(bool, Vec<u8>)> {
    let mut file = open_regular(path, Symlinks::Refuse, false)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok((start > 0, bytes))
}

/// All of the regular file `path` (no symlink followed), or an `InvalidData` error if it is
/// longer than `max` bytes, also if it grows while read. Blocking.
pub(crate) fn read_limited(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path, Symlinks::Refuse, false)?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("Longer than {max} bytes"),
        ));
    }
    Ok(bytes)
}

/// Replaces `path` with `bytes` (mode `mode`) atomically: a new hidden file beside it,
/// fsynced, renamed over `path`, then the directory fsynced. Readers see the old or the new
/// content, never a mix; of concurrent writers the last rename wins. Blocking.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(refused("Has no parent directory or file name"));
    };
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{n}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // Explicitly: open(2) filters the mode through the umask.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

fn refused(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// What a file that is not a regular file is.
fn kind(ty: FileType) -> &'static str {
    if ty.is_dir() {
        "Is a directory"
    } else if ty.is_fifo() {
        "Is a FIFO, not a regular file"
    } else if ty.is_char_device() {
        "Is a character device, not a regular file"
    } else if ty.is_block_device() {
        "Is a block device, not a regular file"
    } else if ty.is_socket() {
        "Is a socket, not a regular file"
    } else {
        "Is not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_links_fifos_devices_and_directories_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("state");
        std::fs::write(&file, b"0123456789").expect("write");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");

        open_regular(&file, Symlinks::Refuse, false).expect("regular");
        open_regular(&link, Symlinks::Follow, false).expect("followed when asked");
        let message = |p: &Path, s, b| match open_regular(p, s, b) {
            Ok(_) => panic!("{} opened", p.display()),
            Err(e) => e.to_string(),
        };
        assert_eq!(
            message(&link, Symlinks::Refuse, false),
            "Is a symbolic link (not followed)"
        );
        // Without O_NONBLOCK this would wait for a writer forever.
        assert!(message(&fifo, Symlinks::Follow, false).contains("FIFO"));
        assert!(message(Path::new("/dev/zero"), Symlinks::Follow, true).contains("character"));
        assert_eq!(
            message(dir.path(), Symlinks::Follow, true),
            "Is a directory"
        );
        assert!(read_tail(&fifo, 4).is_err());
        assert!(read_limited(&link, 100).is_err());
        assert!(read_limited(&fifo, 100).is_err());
        assert_eq!(read_limited(&file, 10).expect("read"), b"0123456789");
        let too_long = read_limited(&file, 9).expect_err("too long");
        assert_eq!(too_long.kind(), io::ErrorKind::InvalidData);
        assert_eq!(read_tail(&file, 4).expect("tail"), (true, b"6789".to_vec()));
        assert_eq!(
            read_tail(&file, 100).expect("tail"),
            (false, b"0123456789".to_vec())
        );
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temporary() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("accel.json");
        std::fs::write(&path, b"old").expect("write");
        let old_inode = std::fs::metadata(&path).expect("stat").ino();
        write_atomic(&path, b"new", 0o600).expect("write");
        let meta = std::fs::metadata(&path).expect("stat");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_ne!(meta.ino(), old_inode, "a new file renamed over the old one");
        assert_eq!(meta.mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["accel.json"]);
        // A directory that is not there: an error, and nothing left behind.
        let missing = dir.path().join("gone/accel.json");
        assert!(write_atomic(&missing, b"x", 0o600).is_err());
        assert!(!dir.path().join("gone").exists());
    }
}
