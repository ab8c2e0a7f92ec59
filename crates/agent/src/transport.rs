//! Dialing the agent: one connected byte stream per [`AgentUrl`], retried with backoff until a
//! deadline, handed to ttRPC as a [`Socket`].

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tracing::{debug, trace};
use ttrpc::asynchronous::transport::Socket;

use crate::error::{Error, Result};
use crate::url::AgentUrl;

/// First retry delay when dialing; doubles up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(5);
/// Largest retry delay when dialing.
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);
/// Longest hybrid-vsock handshake reply accepted.
const MAX_REPLY: usize = 64;

/// Dials `url`, retrying failed attempts with backoff (5 ms doubling to 100 ms) until `timeout`
/// has passed. A hybrid-vsock multiplexer that answers something other than `OK <n>` fails at
/// once; every other failure (socket missing, refused, EOF during a handshake, a serial
/// session handshake not answered in time) is retried on a new connection.
pub async fn dial(url: &AgentUrl, timeout: Duration) -> Result<Socket> {
    let deadline = Instant::now() + timeout;
    let mut backoff = INITIAL_BACKOFF;
    let mut attempts = 0u32;
    let mut last = None;
    loop {
        attempts += 1;
        match tokio::time::timeout_at(deadline, dial_once(url)).await {
            Ok(Ok(socket)) => {
                debug!(%url, attempts, "agent connected");
                return Ok(socket);
            }
            Ok(Err(e @ Error::HvsockRejected { .. })) => return Err(e),
            Ok(Err(e)) => {
                trace!(%url, error = %e, "dial attempt failed");
                last = Some(Box::new(e));
            }
            // The deadline cut an attempt short: report the previous attempt's error, if any.
            Err(_elapsed) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::DialTimeout {
                url: url.to_string(),
                timeout,
                last,
            });
        }
        tokio::time::sleep_until((now + backoff).min(deadline)).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection attempt, no retry.
pub async fn dial_once(url: &AgentUrl) -> Result<Socket> {
    match url {
        AgentUrl::Vsock { cid, port } => {
            let addr = tokio_vsock::VsockAddr::new(*cid, *port);
            let stream = tokio_vsock::VsockStream::connect(addr)
                .await
                .map_err(|e| Error::io("connect to", url, e))?;
            Ok(Socket::new(stream))
        }
        AgentUrl::Hvsock { path, port } => {
            let mut stream = connect_unix(path).await?;
            hvsock_handshake(&mut stream, path, *port).await?;
            Ok(Socket::new(stream))
        }
        AgentUrl::Serial { path } => {
            let mut stream = connect_unix(path).await?;
            crate::handshake::host_handshake(&mut stream, path).await?;
            Ok(Socket::new(stream))
        }
        AgentUrl::Unix { path } => Ok(Socket::new(connect_unix(path).await?)),
    }
}

async fn connect_unix(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path)
        .await
        .map_err(|e| Error::io("connect to", path.display(), e))
}

/// Sends `CONNECT <port>\n` and requires `OK <n>\n`. The reply is read one byte at a time up to
/// the newline so that no ttRPC byte after it is consumed.
pub async fn hvsock_handshake<S>(stream: &mut S, socket: &Path, port: u32) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| Error::io("write CONNECT to", socket.display(), e))?;
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(|e| Error::io("read CONNECT reply from", socket.display(), e))?;
        if n == 0 {
            // The multiplexer closes when nothing listens on the port yet: retryable.
            return Err(Error::io(
                "read CONNECT reply from",
                socket.display(),
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    let ok = text
        .strip_prefix("OK ")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        trace!(socket = %socket.display(), reply = %text, "hybrid vsock connected");
        Ok(())
    } else {
        Err(Error::HvsockRejected {
            socket: socket.to_path_buf(),
            port,
            reply: text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    async fn handshake_with(reply: &'static [u8]) -> (Result<()>, Vec<u8>) {
        let (mut client, mut server) = duplex(256);
        let peer = tokio::spawn(async move {
            let mut req = vec![0; 13];
            server.read_exact(&mut req).await.expect("read request");
            server.write_all(reply).await.expect("write reply");
            req
        });
        let res = hvsock_handshake(&mut client, Path::new("/run/x.vsock"), 1024).await;
        let req = peer.await.expect("peer");
        (res, req)
    }

    #[tokio::test]
    async fn handshake_accepts_ok_and_leaves_following_bytes() {
        let (mut client, mut server) = duplex(256);
        tokio::spawn(async move {
            let mut req = vec![0; 13];
            server.read_exact(&mut req).await.expect("read");
            assert_eq!(req, b"CONNECT 1024\n");
            server
                .write_all(b"OK 1073741824\nTTRPC")
                .await
                .expect("write");
        });
        hvsock_handshake(&mut client, Path::new("/s"), 1024)
            .await
            .expect("handshake");
        let mut rest = [0u8; 5];
        client.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"TTRPC");
    }

    #[tokio::test]
    async fn handshake_rejects_garbage() {
        for reply in [&b"NO\n"[..], b"OK\n", b"OK x\n", b"ok 1\n"] {
            let (res, req) = handshake_with(reply).await;
            assert_eq!(req, b"CONNECT 1024\n");
            match res {
                Err(Error::HvsockRejected {
                    socket,
                    port,
                    reply: got,
                }) => {
                    assert_eq!(socket, Path::new("/run/x.vsock"));
                    assert_eq!(port, 1024);
                    assert_eq!(got.as_bytes(), &reply[..reply.len() - 1]);
                }
                other => panic!("expected HvsockRejected, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn handshake_eof_is_io_error() {
        let (res, _) = handshake_with(b"OK 1").await;
        assert!(matches!(res, Err(Error::Io { .. })), "{res:?}");
    }

    #[tokio::test]
    async fn dial_missing_socket_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = AgentUrl::Serial {
            path: dir.path().join("nothing"),
        };
        let start = std::time::Instant::now();
        let res = dial(&url, Duration::from_millis(100)).await;
        assert!(start.elapsed() < Duration::from_secs(2));
        match res {
            Err(Error::DialTimeout {
                last: Some(last), ..
            }) => {
                assert!(matches!(*last, Error::Io { .. }));
            }
            Err(e) => panic!("expected DialTimeout, got {e:?}"),
            Ok(_) => panic!("expected DialTimeout, got a socket"),
        }
    }
}
