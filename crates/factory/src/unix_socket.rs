//! The unix sockets this crate's servers listen on (the VM-cache server, the metrics
//! endpoint): what is at a socket path (free, a live server, a stale socket, another file),
//! binding one 0600, and accepting only peers of our own user (or root).
//!
//! Permissions: the socket is `chmod`ed to 0600 right after `bind`, before the listener is
//! used, so nothing is accepted before the mode is set. Changing the umask around `bind` would
//! close the window between the two calls, but the umask is process-wide and would race with
//! every other thread creating files (VM directories, logs). Instead the listener checks each
//! peer's credentials (`SO_PEERCRED`) and drops connections from other users, which also
//! covers a peer that connected inside that window.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use futures::stream::Stream;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// The sockets' mode.
pub(crate) const SOCKET_MODE: u32 = 0o600;

/// What is at a socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketPath {
    /// Nothing.
    Free,
    /// A socket a server answers on.
    Live,
    /// A socket nobody listens on (its server died without removing it).
    Stale,
    /// Another kind of file: never ours to remove.
    NotASocket,
}

/// A failed socket operation: which one (`stat`, `probe`, `bind`, `chmod`, `remove`) and why.
pub(crate) type OpError = (&'static str, io::Error);

/// Looks at `path` without changing anything; `Err` names the step that failed.
pub async fn probe_socket(path: &Path) -> Result<SocketPath, (&'static str, io::Error)> {
    let meta = match tokio::fs::symlink_metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketPath::Free),
        Err(e) => return Err(("stat", e)),
    };
    if !meta.file_type().is_socket() {
        return Ok(SocketPath::NotASocket);
    }
    match UnixStream::connect(path).await {
        Ok(_) => Ok(SocketPath::Live),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(SocketPath::Stale),
        Err(e) => Err(("probe", e)),
    }
}

/// Removes a socket file; a missing one is fine.
pub(crate) async fn remove(path: &Path) -> io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Binds `path` and sets its mode to [`SOCKET_MODE`] before anything is accepted; a failed
/// `chmod` removes the socket again.
pub(crate) async fn bind_private(path: &Path) -> Result<UnixListener, OpError> {
    let listener = UnixListener::bind(path).map_err(|e| ("bind", e))?;
    let perms = std::fs::Permissions::from_mode(SOCKET_MODE);
    if let Err(e) = tokio::fs::set_permissions(path, perms).await {
        drop(listener);
        if let Err(e) = remove(path).await {
            warn!(error = %e, path = %path.display(), "removing the socket after chmod failed");
        }
        return Err(("chmod", e));
    }
    Ok(listener)
}

/// True when `peer` may use the server: the same effective user as this process, or root.
fn allowed(peer: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    match peer.peer_cred() {
        Ok(cred) => cred.uid() == me || cred.uid() == 0,
        Err(e) => {
            warn!(error = %e, "cannot read peer credentials; dropping connection");
            false
        }
    }
}

/// The accepted connections of `listener`, without peers of other users.
pub(crate) fn incoming(listener: UnixListener) -> impl Stream<Item = io::Result<UnixStream>> {
    futures::stream::unfold(listener, |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) if allowed(&s) => return Some((Ok(s), l)),
                Ok((s, _)) => {
                    debug!(peer = ?s.peer_cred().ok(), "refused a peer of another user");
                }
                Err(e) => return Some((Err(e), l)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_tells_free_live_stale_and_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        assert_eq!(probe_socket(&path).await.expect("probe"), SocketPath::Free);
        let listener = bind_private(&path).await.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        assert_eq!(probe_socket(&path).await.expect("probe"), SocketPath::Live);
        drop(listener);
        assert_eq!(probe_socket(&path).await.expect("probe"), SocketPath::Stale);
        remove(&path).await.expect("remove");
        remove(&path).await.expect("a missing file is fine");
        std::fs::write(&path, b"x").expect("file");
        assert_eq!(
            probe_socket(&path).await.expect("probe"),
            SocketPath::NotASocket
        );
    }
}
