//! Network namespaces pinned by a bind mount of their `nsfs` file (as `ip netns add` does, but
//! at a path of the VM's run directory, so the VM's files and its namespace go together), and
//! running code inside one.
//!
//! A namespace belongs to a thread, so everything here runs on a thread of its own: entering a
//! namespace on one of tokio's shared threads would move whatever runs there next.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{NetError, Result};

/// The network namespace of the calling thread.
const THREAD_NS: &str = "/proc/thread-self/ns/net";

/// Runs `f` on a new OS thread and answers its result.
pub(crate) async fn on_own_thread<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("vmf-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetError::io("Starting a thread for", "a network namespace", e))?;
    rx.await
        .map_err(|_| NetError::Invalid("the network namespace thread panicked".into()))?
}

/// Moves the calling thread into a new network namespace and pins it at `path`, which must
/// not exist. On failure nothing is left at `path`.
pub(crate) fn unshare_to(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| NetError::io("Creating", path, e))?;
    let pinned = unshare(CloneFlags::CLONE_NEWNET)
        .and_then(|()| {
            mount(
                Some(THREAD_NS),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .map_err(|e| NetError::io("Pinning a new network namespace at", path, e.into()));
    if pinned.is_err() {
        let _ = std::fs::remove_file(path);
    }
    pinned
}

/// Moves the calling thread into the namespace pinned at `path`.
pub(crate) fn enter(path: &Path) -> Result<()> {
    let ns = File::open(path).map_err(|e| NetError::io("Opening", path, e))?;
    setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| NetError::io("Entering the network namespace", path, e.into()))
}

/// Unpins the namespace at `path` and removes the file; nothing there is fine. The namespace
/// itself ends when nothing else holds it (a QEMU's tap descriptor does, until it exits).
pub fn remove(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: a file that is not a mount point (a setup that failed before the mount).
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(NetError::io("Unmounting", path, e.into())),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::io("Removing", path, e)),
    }
}

/// Whether a namespace is pinned at `path` (a mount point there, as `/proc/self/mountinfo`
/// lists it).
pub fn is_pinned(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(wanted) = path.to_str() else {
        return false;
    };
    info.lines().any(|l| l.split(' ').nth(4) == Some(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pinned_namespace_outlives_its_thread_and_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netns");
        let p = path.clone();
        on_own_thread(move || unshare_to(&p))
            .await
            .expect("unshare");
        assert!(is_pinned(&path));
        // Entering it works from another thread, and it is not ours.
        let p = path.clone();
        let (inside, outside) = on_own_thread(move || {
            let before = std::fs::read_link(THREAD_NS).map_err(|e| NetError::io("", "", e))?;
            enter(&p)?;
            let after = std::fs::read_link(THREAD_NS).map_err(|e| NetError::io("", "", e))?;
            Ok((after, before))
        })
        .await
        .expect("enter");
        assert_ne!(inside, outside);
        // A second pin at the same path is refused and leaves the first.
        let p = path.clone();
        assert!(on_own_thread(move || unshare_to(&p)).await.is_err());
        assert!(is_pinned(&path));
        remove(&path).expect("remove");
        assert!(!is_pinned(&path) && !path.exists());
        remove(&path).expect("removing nothing");
    }
}
