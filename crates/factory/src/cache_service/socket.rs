//! The VM-cache server's unix socket: an absolute path that fits a socket address; a live
//! one refused, a stale one replaced, bound 0600 (see `crate::unix_socket`).

use std::path::Path;

use tokio::net::UnixListener;
use tracing::info;

use vmfactory_vm::MAX_SOCKET_PATH;

use super::error::{CacheServiceError, Result};
use crate::unix_socket::{self, bind_private, probe_socket, SocketPath};

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
    let err = |(op, source)| CacheServiceError::Socket {
        op,
        path: path.to_owned(),
        source,
    };
    match probe_socket(path).await.map_err(err)? {
        SocketPath::Free => Ok(()),
        SocketPath::Live => Err(CacheServiceError::SocketInUse {
            path: path.to_owned(),
        }),
        SocketPath::NotASocket => Err(CacheServiceError::NotASocket {
            path: path.to_owned(),
        }),
        SocketPath::Stale => {
            info!(path = %path.display(), "removing stale VM-cache socket");
            remove(path).await
        }
    }
}

/// Removes the socket file; a missing file is fine.
pub(crate) async fn remove(path: &Path) -> Result<()> {
    unix_socket::remove(path)
        .await
        .map_err(|source| CacheServiceError::Socket {
            op: "remove",
            path: path.to_owned(),
            source,
        })
}

/// Binds `path`, mode 0600 before anything is accepted.
pub(crate) async fn bind(path: &Path) -> Result<UnixListener> {
    bind_private(path)
        .await
        .map_err(|(op, source)| CacheServiceError::Socket {
            op,
            path: path.to_owned(),
            source,
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
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
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
