//! Opening the files this crate reads or hands to QEMU (guest files, a clone's template
//! `state`, QEMU's stderr log) without waiting on a FIFO or device and, for files in a run or
//! template directory, without following a symlink.
//!
//! The rule is `vmfactory_persist::open_regular_blocking`'s (the one every other crate uses);
//! the hypervisor cannot call it, as the four leaf crates do not know each other
//! (docs/architecture.md). Keep the two in step: same flags, type checked on the descriptor.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

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
        assert_eq!(read_tail(&file, 4).expect("tail"), (true, b"6789".to_vec()));
        assert_eq!(
            read_tail(&file, 100).expect("tail"),
            (false, b"0123456789".to_vec())
        );
    }
}
