//! The server's unix socket: refuse a live one, replace a stale one, bind it 0600, and accept
//! only peers of our own user (or root).
//!
//! Permissions: the socket is `chmod`ed to 0600 right after `bind`, before the listener is
//! handed to the ttRPC server, so nothing is accepted before the mode is set. Changing the umask
//! around `bind` would close the window between the two calls, but the umask is process-wide and
//! would race with every other thread creating files (VM directories, logs). Instead the
//! listener checks each peer's credentials (`SO_PEERCRED`) and drops connections from other
//! users, which also covers a peer that connected inside that window.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use futures::stream::Stream;
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

use vmfactory_vm::MAX_SOCKET_PATH;

use super::error::{CacheServiceError, Result};

/// The socket's mode.
pub(crate) const SOCKET_MODE: u32 = 0o600;

/// Checks that `path` can be a VM-cache socket: absolute, and short enough for a unix socket
/// address. The server and the client both check it first.
pub fn check_endpoint(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        return Err(CacheServiceError::RelativeEndpoint {
            path: path.to_owned(),
        });
    }
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(CacheServiceError::EndpointTooLong {
            path: path.to_owned(),
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    Ok(())
}

/// Makes `path` free for a new server: fails if a server answers there or if something other
/// than a socket is in the way; removes a stale socket (nobody listening).
pub(crate) async fn clear_stale(path: &Path) -> Result<()> {
    let meta = match tokio::fs::symlink_metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(CacheServiceError::Socket {
                op: "stat",
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(CacheServiceError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(CacheServiceError::SocketInUse {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale VM-cache socket");
            remove(path).await
        }
        Err(source) => Err(CacheServiceError::Socket {
            op: "probe",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the socket file; a missing file is fine.
pub(crate) async fn remove(path: &Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheServiceError::Socket {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Binds `path` and sets its mode to [`SOCKET_MODE`] before anything is accepted.
pub(crate) async fn bind(path: &Path) -> Result<UnixListener> {
    let listener = UnixListener::bind(path).map_err(|source| CacheServiceError::Socket {
        op: "bind",
        path: path.to_owned(),
        source,
    })?;
    let perms = std::fs::Permissions::from_mode(SOCKET_MODE);
    if let Err(source) = tokio::fs::set_permissions(path, perms).await {
        drop(listener);
        if let Err(e) = remove(path).await {
            warn!(error = %e, "removing the socket after chmod failed");
        }
        return Err(CacheServiceError::Socket {
            op: "chmod",
            path: path.to_owned(),
            source,
        });
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

    #[test]
    fn endpoint_must_be_absolute_and_fit_a_socket_address() {
        check_endpoint(Path::new("/run/vc/cache.sock")).expect("ok");
        assert!(matches!(
            check_endpoint(Path::new("cache.sock")),
            Err(CacheServiceError::RelativeEndpoint { .. })
        ));
        let long = format!("/{}", "x".repeat(MAX_SOCKET_PATH));
        assert!(matches!(
            check_endpoint(Path::new(&long)),
            Err(CacheServiceError::EndpointTooLong { len, max: MAX_SOCKET_PATH, .. }) if len == MAX_SOCKET_PATH + 1
        ));
    }

    #[tokio::test]
    async fn bind_sets_the_mode_and_clear_stale_tells_live_from_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache.sock");
        clear_stale(&path).await.expect("nothing there");

        let listener = bind(&path).await.expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, SOCKET_MODE);
        assert!(matches!(
            clear_stale(&path).await,
            Err(CacheServiceError::SocketInUse { .. })
        ));

        drop(listener); // the file stays, nobody listens: stale
        assert!(path.exists());
        clear_stale(&path).await.expect("stale socket removed");
        assert!(!path.exists());

        std::fs::write(&path, b"x").expect("file");
        assert!(matches!(
            clear_stale(&path).await,
            Err(CacheServiceError::NotASocket { .. })
        ));
        assert!(path.exists(), "a regular file is left alone");
    }
}
