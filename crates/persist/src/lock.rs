//! VM ownership: an advisory `flock(2)` on `<root>/vm/<id>/lock`, taken without waiting,
//! released by the kernel when its holder dies, and tested without being taken through
//! `/proc/locks` (so a read-only look never gets in an owner's way).
//!
//! Everything here blocks; [`crate::Store`] calls it on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, Result};

/// Where the kernel lists the file locks held on this host.
const PROC_LOCKS: &str = "/proc/locks";

/// Exclusive ownership of one VM's storage, released on drop.
///
/// Backed by `flock(2)` on `<root>/vm/<id>/lock`: advisory (only holders of this lock are kept
/// out), per open file description, and released by the kernel if the process dies.
#[derive(Debug)]
pub struct VmLock {
    id: String,
    _flock: Flock<File>,
}

impl VmLock {
    /// The id of the locked VM.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// How [`lock_blocking`] opens the lock file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// Open it, creating it if missing (an existing VM directory).
    OrCreate,
    /// Create it; it must not exist (a directory being created).
    New,
}

/// Opens the lock file `path` of VM `id` with mode `mode` and locks it without waiting:
/// [`Error::Locked`] if another open lock exists, [`Error::VmNotFound`] if the directory is
/// missing.
pub(crate) fn lock_blocking(id: &str, path: &Path, open: Open, mode: u32) -> Result<VmLock> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(mode);
    match open {
        Open::OrCreate => options.create(true).truncate(false),
        Open::New => options.create_new(true),
    };
    let file = options.open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::VmNotFound { id: id.to_owned() },
        _ => Error::io("open", path, e),
    })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(VmLock {
            id: id.to_owned(),
            _flock: flock,
        }),
        Err((_, Errno::EWOULDBLOCK)) => Err(Error::Locked { id: id.to_owned() }),
        Err((_, errno)) => Err(Error::io("lock", path, errno.into())),
    }
}

/// Whether any process holds a `flock` on the file `path`, read from `/proc/locks` (the lock
/// is not taken). [`Error::NotFound`] if there is no such file.
pub(crate) fn is_locked_blocking(path: &Path) -> Result<bool> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::NotFound {
            path: path.to_owned(),
        },
        _ => Error::io("stat", path, e),
    })?;
    let locks = std::fs::read_to_string(PROC_LOCKS)
        .map_err(|e| Error::io("read", Path::new(PROC_LOCKS), e))?;
    let dev = meta.dev();
    let file = FileId {
        major: nix::sys::stat::major(dev),
        minor: nix::sys::stat::minor(dev),
        ino: meta.ino(),
    };
    Ok(flocked(&locks, file))
}

/// A file as `/proc/locks` names it: `MAJOR:MINOR:INODE` (hex, hex, decimal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    major: u64,
    minor: u64,
    ino: u64,
}

/// Whether `locks` (the text of `/proc/locks`) lists a granted `FLOCK` on `file`. Lines of
/// waiters (`N: -> FLOCK ...`) hold nothing and are skipped.
fn flocked(locks: &str, file: FileId) -> bool {
    locks.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        if fields.next() != Some("FLOCK") {
            return false;
        }
        // ADVISORY, WRITE/READ, pid, then the file.
        let Some(id) = fields.nth(3) else {
            return false;
        };
        let mut parts = id.split(':');
        let (Some(major), Some(minor), Some(ino), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        u64::from_str_radix(major, 16).ok() == Some(file.major)
            && u64::from_str_radix(minor, 16).ok() == Some(file.minor)
            && ino.parse::<u64>().ok() == Some(file.ino)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 611 00:19:1234 0 EOF
2: FLOCK  ADVISORY  WRITE 700 fd:01:98765 0 EOF
2: -> FLOCK  ADVISORY  WRITE 701 fd:01:55555 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:05:42 0 EOF
";

    #[test]
    fn finds_granted_flocks_only() {
        let id = |major, minor, ino| FileId { major, minor, ino };
        assert!(flocked(LOCKS, id(0xfd, 1, 98765)));
        // Another device, another inode, a POSIX lock, a waiter, an OFD lock: not ours.
        assert!(!flocked(LOCKS, id(0xfd, 2, 98765)));
        assert!(!flocked(LOCKS, id(0xfd, 1, 98766)));
        assert!(!flocked(LOCKS, id(0, 0x19, 1234)));
        assert!(!flocked(LOCKS, id(0xfd, 1, 55555)));
        assert!(!flocked(LOCKS, id(0, 5, 42)));
        assert!(!flocked("", id(0xfd, 1, 98765)));
        assert!(!flocked("garbage\n9: FLOCK x\n", id(0xfd, 1, 98765)));
    }

    #[test]
    fn sees_a_lock_of_this_process_without_taking_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let held = lock_blocking("vm", &path, Open::New, 0o600).expect("lock");
        assert!(is_locked_blocking(&path).expect("locked"));
        drop(held);
        assert!(!is_locked_blocking(&path).expect("free"));
        // Testing took nothing: the lock can be taken.
        drop(lock_blocking("vm", &path, Open::OrCreate, 0o600).expect("lock again"));
        assert!(matches!(
            lock_blocking("vm", &path, Open::New, 0o600),
            Err(Error::Io { .. })
        ));
        assert!(matches!(
            is_locked_blocking(&dir.path().join("none")),
            Err(Error::NotFound { .. })
        ));
    }
}
