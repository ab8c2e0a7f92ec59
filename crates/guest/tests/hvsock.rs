//! Hybrid vsock against a fake multiplexer (a unix listener speaking `CONNECT n` / `OK n`), and
//! call timeouts against a server that never answers.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent, FakeGuest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vmfactory_agent::{Agent, AgentUrl, Error, HealthStatus};

#[derive(Clone, Copy)]
enum Mode {
    /// Answer `OK <port>` and splice to the agent.
    Accept,
    /// Close the first N connections without a word (guest not listening yet), then accept.
    CloseFirst(usize),
    /// Answer this line instead of OK.
    Answer(&'static str),
}

async fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.unwrap_or(0) == 0 || b[0] == b'\n' {
            return String::from_utf8_lossy(&line).into_owned();
        }
        line.push(b[0]);
    }
}

/// Starts a fake multiplexer at `<dir>/mux.sock` in front of the agent socket `backend`.
fn start_mux(dir: &Path, backend: PathBuf, mode: Mode) -> (PathBuf, Arc<AtomicUsize>) {
    let path = dir.join("mux.sock");
    let listener = UnixListener::bind(&path).expect("bind mux");
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            let backend = backend.clone();
            tokio::spawn(async move {
                let line = read_line(&mut s).await;
                assert_eq!(line, "CONNECT 1024");
                match mode {
                    Mode::CloseFirst(k) if n < k => {}
                    Mode::Accept | Mode::CloseFirst(_) => {
                        s.write_all(b"OK 1073741824\n").await.expect("write OK");
                        let mut agent = UnixStream::connect(&backend).await.expect("backend");
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut agent).await;
                    }
                    Mode::Answer(reply) => {
                        let _ = s.write_all(reply.as_bytes()).await;
                    }
                }
            });
        }
    });
    (path, seen)
}

fn hvsock(path: &Path) -> AgentUrl {
    AgentUrl::parse(&format!("hvsock://{}:1024", path.display())).expect("url")
}

#[tokio::test]
async fn multiplexer_accepts() {
    let guest = FakeGuest::new();
    let (_server, backend) = guest.serve_unix().await;
    let (mux, _) = start_mux(guest.dir.path(), backend, Mode::Accept);
    let a = agent(hvsock(&mux), Duration::from_secs(5));
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
    assert_eq!(
        a.resources().await.expect("resources").online_cpus,
        vec![0, 1]
    );
    a.disconnect().await.expect("disconnect");
    assert_eq!(
        a.uptime().await.expect("uptime").system,
        Duration::from_millis(42_250)
    );
}

#[tokio::test]
async fn dial_retries_until_guest_listens() {
    let guest = FakeGuest::new();
    let (_server, backend) = guest.serve_unix().await;
    let (mux, seen) = start_mux(guest.dir.path(), backend, Mode::CloseFirst(3));
    let a = agent(hvsock(&mux), Duration::from_secs(5));
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
    assert_eq!(seen.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn multiplexer_rejects_or_answers_garbage() {
    for reply in ["FAILED\n", "OK\n", "\u{1}\u{2}garbage\n", "OK 12x\n"] {
        let guest = FakeGuest::new();
        let (mux, seen) = start_mux(guest.dir.path(), guest.sock("none"), Mode::Answer(reply));
        let a = agent(hvsock(&mux), Duration::from_secs(5));
        let start = Instant::now();
        match a.check().await {
            Err(Error::HvsockRejected {
                socket,
                port,
                reply: got,
            }) => {
                assert_eq!(socket, mux);
                assert_eq!(port, 1024);
                assert_eq!(got, reply.trim_end_matches('\n'));
            }
            other => panic!("{reply:?}: expected HvsockRejected, got {other:?}"),
        }
        // A rejection is final: no retry loop until the deadline.
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn multiplexer_never_accepting_times_out() {
    let guest = FakeGuest::new();
    let (mux, _) = start_mux(
        guest.dir.path(),
        guest.sock("none"),
        Mode::CloseFirst(usize::MAX),
    );
    let a = agent(hvsock(&mux), Duration::from_millis(200));
    let start = Instant::now();
    match a.check().await {
        Err(Error::DialTimeout { last, timeout, url }) => {
            assert_eq!(timeout, Duration::from_millis(200));
            assert_eq!(url, hvsock(&mux).to_string());
            assert!(
                matches!(last.as_deref(), Some(Error::Io { .. })),
                "{last:?}"
            );
        }
        other => panic!("expected DialTimeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn silent_server_times_out_within_bound() {
    let guest = FakeGuest::new();
    let path = guest.sock("silent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // read nothing, answer nothing
        }
    });
    // A connected peer that never answers a call: plain unix (no serial session handshake).
    let a = agent(common::url("unix", &path), Duration::from_millis(200));
    for _ in 0..2 {
        let start = Instant::now();
        match a.check().await {
            Err(
                e @ Error::Timeout {
                    method: "Check", ..
                },
            ) => assert!(e.is_timeout()),
            other => panic!("expected Timeout, got {other:?}"),
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}

#[tokio::test]
async fn silent_serial_port_fails_the_session_handshake() {
    let guest = FakeGuest::new();
    let path = guest.sock("silent-serial.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s); // never answers SYNC
        }
    });
    let a = agent(common::url("serial", &path), Duration::from_millis(300));
    let start = Instant::now();
    match a.check().await {
        Err(e @ Error::DialTimeout { .. }) => assert!(e.is_timeout()),
        other => panic!("expected DialTimeout, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));
}
