//! Listeners that outlive their failed accepts.
//!
//! A clone of a vsock template resumes with a transport reset: the guest kernel resets every
//! connected vsock socket (those of the host that made the template) and keeps listening
//! sockets. Whatever an accept reports then, or on any other bad day (a connection aborted
//! before it was taken, no descriptors left), ends that accept only: the listener is retried
//! after a pause, so the agent never stops serving and never spins on a lasting error.

use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;
use ttrpc::asynchronous::transport::Listener;

/// Pause after a failed accept, so a lasting failure does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A listening socket the server takes connections from.
pub(crate) trait Accept: Send + Sync + 'static {
    /// A connection.
    type Conn: AsyncRead + AsyncWrite + Send + Sync + 'static;
    /// Takes the next connection.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>>;
}

impl Accept for tokio_vsock::VsockListener {
    type Conn = tokio_vsock::VsockStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio_vsock::VsockListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Accept for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<Self::Conn>> {
        tokio::net::UnixListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

/// The connections of `listener`, as a ttRPC listener that never ends nor yields an error.
pub(crate) fn keep_accepting<L: Accept>(listener: L, what: &'static str) -> Listener {
    Listener::new(connections(listener, what))
}

fn connections<L: Accept>(
    listener: L,
    what: &'static str,
) -> impl futures::Stream<Item = io::Result<L::Conn>> + Send + 'static {
    futures::stream::unfold(listener, move |l| async move {
        loop {
            match std::future::poll_fn(|cx| l.poll_accept(cx)).await {
                Ok(conn) => return Some((Ok(conn), l)),
                Err(e) => {
                    warn!(listener = what, error = %e, "accept failed, listening on");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    /// Fails its first accepts with the given errors, then hands out unix socket pairs.
    struct Flaky {
        errors: Mutex<Vec<io::ErrorKind>>,
        peers: Mutex<Vec<UnixStream>>,
    }

    impl Accept for Flaky {
        type Conn = UnixStream;

        fn poll_accept(&self, _cx: &mut Context<'_>) -> Poll<io::Result<UnixStream>> {
            if let Some(kind) = self.errors.lock().expect("lock").pop() {
                return Poll::Ready(Err(kind.into()));
            }
            let (ours, theirs) = UnixStream::pair()?;
            self.peers.lock().expect("lock").push(theirs);
            Poll::Ready(Ok(ours))
        }
    }

    #[tokio::test]
    async fn failed_accepts_are_retried_never_the_end() {
        let flaky = Flaky {
            errors: Mutex::new(vec![
                io::ErrorKind::ConnectionReset,
                io::ErrorKind::ConnectionAborted,
                io::ErrorKind::Other,
            ]),
            peers: Mutex::default(),
        };
        let mut conns = Box::pin(connections(flaky, "test"));
        for _ in 0..2 {
            let mut conn = conns
                .next()
                .await
                .expect("the listener goes on")
                .expect("only connections are yielded");
            conn.write_all(b"x").await.expect("a live connection");
        }
    }

    #[tokio::test]
    async fn a_unix_listener_serves_after_a_client_leaves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let mut conns = Box::pin(connections(listener, "test"));
        for _ in 0..2 {
            let client = UnixStream::connect(&path).await.expect("connect");
            drop(client);
            let mut conn = conns.next().await.expect("next").expect("conn");
            let mut buf = [0; 1];
            assert_eq!(conn.read(&mut buf).await.expect("eof"), 0);
        }
    }
}
