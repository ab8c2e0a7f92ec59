//! The session handshake on a virtio-serial port.
//!
//! A virtio-serial port is one byte pipe for every host that ever connects to it, and the guest
//! learns about connects and disconnects through control messages that are processed apart from
//! (and may be processed after) the data. So under load a guest can read a new host's first
//! bytes in the session it still holds for the previous host; measured on real QEMU: 2 of 150
//! immediate reconnects lost their request and hung until their timeout.
//!
//! The handshake gives every host session a clean start:
//! - the host sends `SYNC <nonce>\n` (16 hex digits) before any ttRPC byte;
//! - the guest starts a session only on such a line, and answers `SYNCED <nonce>\n`;
//! - the host discards whatever precedes its exact answer (a previous session's late output).
//!
//! A ttRPC frame starts with its length as a big-endian `u32` of at most 4 MiB, so its first
//! byte is always `0`; a `SYNC` line starts with `S`. That lets the guest see, at every frame
//! boundary, whether the next bytes belong to the current session or start a new one (see
//! `vmfactory-guest`'s `server::serial`, the guest side). A host whose handshake is not answered in time reconnects and tries again.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Error, Result};

/// What a host sends first: `SYNC <nonce>\n`.
pub const HELLO_PREFIX: &[u8] = b"SYNC ";

/// What the guest answers: `SYNCED <nonce>\n`.
pub const ACK_PREFIX: &[u8] = b"SYNCED ";

/// Longest handshake line either side accepts.
pub const MAX_LINE: usize = 64;

/// How long a host waits for the answer before it reconnects and tries again.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes a host discards while looking for its answer (a ttRPC frame is at most 4 MiB).
const MAX_DISCARD: usize = 8 << 20;

/// The hello line for `nonce`.
pub fn hello_line(nonce: u64) -> Vec<u8> {
    format!("SYNC {nonce:016x}\n").into_bytes()
}

/// The answer line for `nonce`.
pub fn ack_line(nonce: u64) -> Vec<u8> {
    format!("SYNCED {nonce:016x}\n").into_bytes()
}

/// Parses a hello line (without its `\n`); `None` if it is not one.
pub fn parse_hello(line: &[u8]) -> Option<u64> {
    let hex = line.strip_prefix(HELLO_PREFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// A fresh nonce for one handshake (not a secret: it only tells sessions apart).
pub fn new_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// Host side: sends a hello and waits (up to [`ATTEMPT_TIMEOUT`]) for its exact answer,
/// discarding anything before it. No byte after the answer is consumed.
pub async fn host_handshake<S>(stream: &mut S, socket: &Path) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let nonce = new_nonce();
    let io = |op, e| Error::io(op, socket.display(), e);
    stream
        .write_all(&hello_line(nonce))
        .await
        .map_err(|e| io("write SYNC to", e))?;
    let want = ack_line(nonce);
    let wait = async {
        let mut window: Vec<u8> = Vec::with_capacity(want.len());
        for _ in 0..MAX_DISCARD {
            let mut byte = [0u8; 1];
            let n = stream
                .read(&mut byte)
                .await
                .map_err(|e| io("read SYNCED from", e))?;
            if n == 0 {
                return Err(io(
                    "read SYNCED from",
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            if window.len() == want.len() {
                window.remove(0);
            }
            window.push(byte[0]);
            if window == want {
                return Ok(());
            }
        }
        Err(io(
            "read SYNCED from",
            std::io::Error::other("no answer in 8 MiB"),
        ))
    };
    match tokio::time::timeout(ATTEMPT_TIMEOUT, wait).await {
        Ok(res) => res,
        Err(_) => Err(io("read SYNCED from", std::io::ErrorKind::TimedOut.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let hello = hello_line(0xdead_beef);
        assert_eq!(hello, b"SYNC 00000000deadbeef\n");
        assert_eq!(parse_hello(&hello[..hello.len() - 1]), Some(0xdead_beef));
        assert_eq!(ack_line(1), b"SYNCED 0000000000000001\n");
        assert_eq!(parse_hello(b"SYNC 123"), None);
        assert_eq!(parse_hello(b"SYNC 00000000deadbeeg"), None);
        assert_eq!(parse_hello(b"SYNCED 00000000deadbeef"), None);
        assert_ne!(new_nonce(), new_nonce());
    }

    #[tokio::test]
    async fn host_skips_stale_bytes_and_stops_after_its_answer() {
        let (mut host, mut guest) = tokio::io::duplex(1024);
        let peer = tokio::spawn(async move {
            let mut line = vec![0u8; 22];
            guest.read_exact(&mut line).await.unwrap();
            let nonce = parse_hello(&line[..21]).unwrap();
            // A previous session's late output, an answer for someone else, then ours.
            guest
                .write_all(b"\0\0\0\x05stale\nSYNCED 0000000000000000\n")
                .await
                .unwrap();
            guest.write_all(&ack_line(nonce)).await.unwrap();
            guest.write_all(b"ttrpc").await.unwrap();
            guest
        });
        host_handshake(&mut host, Path::new("/t")).await.unwrap();
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"ttrpc");
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn host_gives_up_on_silence() {
        let (mut host, _guest) = tokio::io::duplex(1024);
        let err = host_handshake(&mut host, Path::new("/t"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
