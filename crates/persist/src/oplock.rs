//! [`OpLock`]: one writer or many readers of a path across processes, for the length of an
//! operation (making a template, serving from it, removing it). `flock(2)` on a lock file
//! beside the path: the kernel releases it when the holder dies, so a crash never leaves a
//! stale lock. When the lock is busy, the holders are named from `/proc/locks`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::{major, minor};
use tokio::time::Instant;

/// Mode of the lock file.
const LOCK_FILE_MODE: u32 = 0o600;
/// First pause between two tries while a writer holds the lock; doubles up to [`MAX_PAUSE`].
/// `flock` has no timed wait, and a blocked `flock` in a thread cannot be cancelled.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_millis(200);
/// Longest command line shown for a holder.
const MAX_COMMAND: usize = 120;

/// How a lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once (using a template, creating VMs under a run root).
    Shared,
    /// One holder, alone (making or removing).
    Exclusive,
}

/// A process holding a busy lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: u32,
    /// How it holds the lock.
    pub mode: LockMode,
    /// Its command line (shortened), or empty if it could not be read.
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.command.is_empty() {
            write!(f, "pid {}", self.pid)
        } else {
            write!(f, "pid {} ({})", self.pid, self.command)
        }
    }
}

/// Why an [`OpLock`] could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Other processes hold the lock (and, for a wait, still did when it ran out).
    #[error("{} is in use by {}", path.display(), holders_text(holders))]
    Busy {
        /// The path the lock guards.
        path: PathBuf,
        /// Who holds it, as far as `/proc/locks` tells.
        holders: Vec<Holder>,
    },
    /// Opening or locking the lock file failed.
    #[error("Failed to {op} lock file {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The lock file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The blocking task doing the work failed.
    #[error("The lock task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn holders_text(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "another process".to_owned();
    }
    let names: Vec<String> = holders.iter().map(ToString::to_string).collect();
    names.join(", ")
}

/// A held lock on a path; released on drop (or when the process exits).
#[derive(Debug)]
pub struct OpLock {
    path: PathBuf,
    file: PathBuf,
    mode: LockMode,
    flock: Flock<File>,
}

impl OpLock {
    /// The lock file guarding `path`: `<path>.lock` beside it (a template directory gets a
    /// tmpfs mounted on it, so the lock cannot live inside).
    pub fn file_for(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        PathBuf::from(name)
    }

    /// Takes the lock guarding `path` in `mode`. While an exclusive holder has it (something
    /// being made or removed, which ends), tries again for up to `wait`; when only shared
    /// holders keep an exclusive request out (users of what it guards, which may never end),
    /// fails at once with [`LockError::Busy`] naming them.
    pub async fn acquire(path: &Path, mode: LockMode, wait: Duration) -> Result<Self, LockError> {
        Self::acquire_at(path, &Self::file_for(path), mode, wait).await
    }

    /// [`OpLock::acquire`] with the lock file at `file` (a run root keeps its own inside).
    pub async fn acquire_at(
        path: &Path,
        file: &Path,
        mode: LockMode,
        wait: Duration,
    ) -> Result<Self, LockError> {
        let deadline = Instant::now() + wait;
        let mut pause = FIRST_PAUSE;
        loop {
            let (owned, file) = (path.to_owned(), file.to_owned());
            let tried = tokio::task::spawn_blocking(move || try_lock(&owned, &file, mode))
                .await
                .map_err(LockError::Task)??;
            let holders = match tried {
                Ok(lock) => return Ok(lock),
                Err(holders) => holders,
            };
            let writer_inside = holders.iter().any(|h| h.mode == LockMode::Exclusive);
            // /proc/locks can miss a holder that is just leaving; then try again too.
            let waiting_helps = writer_inside || holders.is_empty();
            if !waiting_helps || Instant::now() >= deadline {
                return Err(LockError::Busy {
                    path: path.to_owned(),
                    holders,
                });
            }
            tokio::time::sleep(pause.min(deadline - Instant::now())).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// The path the lock guards.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the lock is held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// Releases the lock and, when no other process holds or waits for it, removes the lock
    /// file too, so a finished operation leaves nothing behind. Best effort: a lock file that
    /// stays is harmless (the next operation reuses it).
    pub async fn release(self) {
        let (path, file) = (self.path.clone(), self.file.clone());
        drop(self);
        let tidied = tokio::task::spawn_blocking(move || {
            match try_lock_once(&path, &file, LockMode::Exclusive) {
                Ok(Ok(lock)) if still_at_path(&lock) => std::fs::remove_file(&file).ok(),
                _ => None,
            }
        })
        .await;
        debug_assert!(tidied.is_ok(), "the tidy task does not panic");
    }

    /// Turns an exclusive lock into a shared one in place (done making, now using): nobody
    /// else can take it exclusively in between.
    pub async fn downgrade(mut self) -> Result<Self, LockError> {
        if self.mode == LockMode::Shared {
            return Ok(self);
        }
        let file = self.file.clone();
        let res = tokio::task::spawn_blocking(move || {
            let res = self.flock.relock(FlockArg::LockSharedNonblock);
            (self, res)
        })
        .await
        .map_err(LockError::Task)?;
        self = res.0;
        res.1.map_err(|errno| LockError::Io {
            op: "downgrade",
            path: file,
            source: errno.into(),
        })?;
        self.mode = LockMode::Shared;
        Ok(self)
    }

    /// Removes the lock file, then releases the lock: for the last step of removing what the
    /// lock guarded, so nothing is left. Only an exclusive holder may; a shared lock is just
    /// released. Anyone who opened the old file notices it was replaced and tries again.
    pub async fn remove(self) -> Result<(), LockError> {
        if self.mode != LockMode::Exclusive {
            return Ok(());
        }
        match tokio::fs::remove_file(&self.file).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LockError::Io {
                op: "remove",
                path: self.file.clone(),
                source,
            }),
        }
    }
}

/// One try: the lock, or who holds it.
fn try_lock(
    path: &Path,
    lock_path: &Path,
    mode: LockMode,
) -> Result<Result<OpLock, Vec<Holder>>, LockError> {
    loop {
        match try_lock_once(path, lock_path, mode)? {
            // Locked a file its last holder removed: lock the one now at the path.
            Ok(lock) if !still_at_path(&lock) => continue,
            res => return Ok(res),
        }
    }
}

/// Whether the locked file is still the one at its path (not removed by [`OpLock::remove`]).
fn still_at_path(lock: &OpLock) -> bool {
    let (Ok(held), Ok(now)) = (lock.flock.metadata(), std::fs::symlink_metadata(&lock.file)) else {
        return false;
    };
    held.dev() == now.dev() && held.ino() == now.ino()
}

/// One open and lock.
fn try_lock_once(
    path: &Path,
    lock_path: &Path,
    mode: LockMode,
) -> Result<Result<OpLock, Vec<Holder>>, LockError> {
    let io = |op, source| LockError::Io {
        op,
        path: lock_path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(LOCK_FILE_MODE)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(lock_path)
        .map_err(|e| io("open", e))?;
    let meta = file.metadata().map_err(|e| io("stat", e))?;
    let arg = match mode {
        LockMode::Shared => FlockArg::LockSharedNonblock,
        LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(flock) => Ok(Ok(OpLock {
            path: path.to_owned(),
            file: lock_path.to_owned(),
            mode,
            flock,
        })),
        Err((_, Errno::EWOULDBLOCK)) => Ok(Err(holders(meta.dev(), meta.ino()))),
        Err((_, errno)) => Err(io("lock", errno.into())),
    }
}

/// The processes `/proc/locks` shows holding a `flock` on the file `(dev, ino)`.
pub(crate) fn holders(dev: u64, ino: u64) -> Vec<Holder> {
    let Ok(text) = std::fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let (dev_major, dev_minor) = (major(dev), minor(dev));
    let mut out: Vec<Holder> = text
        .lines()
        .filter_map(|line| parse_lock_line(line, dev_major, dev_minor, ino))
        .collect();
    out.sort_by_key(|h| h.pid);
    out.dedup_by_key(|h| h.pid);
    out
}

/// A held (not waiting) `FLOCK` of `/proc/locks` on `major:minor:ino`, with its command line.
fn parse_lock_line(line: &str, dev_major: u64, dev_minor: u64, ino: u64) -> Option<Holder> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "1: FLOCK ADVISORY WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after the number.
    let [_, kind, _, access, pid, file, ..] = fields.as_slice() else {
        return None;
    };
    if *kind != "FLOCK" {
        return None;
    }
    let mut parts = file.split(':');
    let (maj, min, inode) = (parts.next()?, parts.next()?, parts.next()?);
    if u64::from_str_radix(maj, 16).ok()? != dev_major
        || u64::from_str_radix(min, 16).ok()? != dev_minor
        || inode.parse::<u64>().ok()? != ino
    {
        return None;
    }
    let mode = match *access {
        "WRITE" => LockMode::Exclusive,
        "READ" => LockMode::Shared,
        _ => return None,
    };
    let pid: u32 = pid.parse().ok()?;
    Some(Holder {
        pid,
        mode,
        command: command_line(pid),
    })
}

fn command_line(pid: u32) -> String {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    let text = text.trim();
    match text.char_indices().nth(MAX_COMMAND) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shared_holders_coexist_and_keep_a_writer_out_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("template");
        let a = OpLock::acquire(&path, LockMode::Shared, Duration::ZERO)
            .await
            .expect("shared");
        let b = OpLock::acquire(&path, LockMode::Shared, Duration::ZERO)
            .await
            .expect("second shared");
        assert_eq!(a.mode(), LockMode::Shared);
        let t0 = std::time::Instant::now();
        match OpLock::acquire(&path, LockMode::Exclusive, Duration::from_secs(30)).await {
            Err(LockError::Busy { holders, .. }) => {
                assert!(
                    holders.iter().any(|h| h.pid == std::process::id()),
                    "{holders:?}"
                );
                assert!(holders.iter().all(|h| h.mode == LockMode::Shared));
            }
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "readers only: no wait"
        );
        drop((a, b));
        let w = OpLock::acquire(&path, LockMode::Exclusive, Duration::ZERO)
            .await
            .expect("free now");
        assert_eq!(w.path(), path);
        let r = w.downgrade().await.expect("downgrade");
        assert_eq!(r.mode(), LockMode::Shared);
        OpLock::acquire(&path, LockMode::Shared, Duration::ZERO)
            .await
            .expect("readers share with a downgraded writer");
        let other = OpLock::acquire(&path, LockMode::Shared, Duration::ZERO)
            .await
            .expect("another reader");
        r.release().await;
        assert!(
            OpLock::file_for(&path).exists(),
            "kept while another holds it"
        );
        other.release().await;
        assert!(!OpLock::file_for(&path).exists(), "the last one out tidies");
        let w = OpLock::acquire(&path, LockMode::Exclusive, Duration::ZERO)
            .await
            .expect("free again");
        assert!(OpLock::file_for(&path).ends_with("template.lock"));
        w.remove().await.expect("remove");
        assert!(!OpLock::file_for(&path).exists(), "nothing left");
    }

    #[tokio::test]
    async fn a_lock_on_a_removed_file_is_not_a_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("root");
        let file = dir.path().join("root.lock");
        let w = OpLock::acquire_at(&path, &file, LockMode::Exclusive, Duration::ZERO)
            .await
            .expect("writer");
        // A reader that opened the file before the writer removed it must not end up holding
        // a lock on the removed file while a newcomer locks the new one.
        let reader = tokio::spawn({
            let (path, file) = (path.clone(), file.clone());
            async move {
                OpLock::acquire_at(&path, &file, LockMode::Shared, Duration::from_secs(30)).await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.remove().await.expect("remove");
        let r = reader.await.expect("join").expect("reader");
        assert!(still_at_path(&r), "the reader holds the file at the path");
        let err = OpLock::acquire_at(&path, &file, LockMode::Exclusive, Duration::ZERO)
            .await
            .expect_err("the reader keeps a writer out");
        assert!(matches!(err, LockError::Busy { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn a_writer_is_waited_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("template");
        let w = OpLock::acquire(&path, LockMode::Exclusive, Duration::ZERO)
            .await
            .expect("writer");
        let err = OpLock::acquire(&path, LockMode::Shared, Duration::ZERO)
            .await
            .expect_err("busy");
        assert!(err.to_string().contains("is in use by pid"), "{err}");
        assert!(!err.to_string().contains('\n'));
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(w);
        });
        OpLock::acquire(&path, LockMode::Shared, Duration::from_secs(30))
            .await
            .expect("taken once the writer left");
        release.await.expect("join");
    }

    #[test]
    fn lock_lines() {
        let line = "3: FLOCK  ADVISORY  WRITE 4242 fd:01:123 0 EOF";
        let h = parse_lock_line(line, 0xfd, 1, 123).expect("matches");
        assert_eq!((h.pid, h.mode), (4242, LockMode::Exclusive));
        assert!(parse_lock_line(line, 0xfd, 1, 124).is_none(), "other inode");
        let waiter = "3: -> FLOCK  ADVISORY  WRITE 4243 fd:01:123 0 EOF";
        assert!(parse_lock_line(waiter, 0xfd, 1, 123).is_none());
        let posix = "1: POSIX  ADVISORY  READ 99 fd:01:123 0 EOF";
        assert!(parse_lock_line(posix, 0xfd, 1, 123).is_none());
    }
}
