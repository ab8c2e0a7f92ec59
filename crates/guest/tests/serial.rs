//! The virtio-serial listener logic with stand-ins for the port: a socketpair per session, and
//! a pty (the port is the master, the host is the slave), including close and reopen.
//!
//! A real virtio console port reports POLLHUP until the host connects and then an EPOLLOUT edge
//! (on PORT_OPEN); neither stand-in can produce that edge for a *second* host on the same fd, so
//! these tests cover: serve → host closes → session dropped → new session (fresh fd per
//! session), and, on a kept-open fd, that a hung-up port yields no session until a host is
//! back. The full cycle on one fd is exercised against QEMU's virtio-serial.

mod common;

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{url, FakeGuest};
use futures::StreamExt;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use ttrpc::asynchronous::transport::Listener;
use vmfactory_agent::handshake::{ack_line, hello_line, host_handshake};
use vmfactory_agent::{Agent, AgentConfig, HealthStatus, KataAgent};
use vmfactory_guest::server::{serial_listener, AgentServer, FdStream, PortOpener};

const T: Duration = Duration::from_secs(5);

fn cfg() -> AgentConfig {
    AgentConfig::new(T, T)
}

async fn serve(guest: &FakeGuest, opener: PortOpener) -> AgentServer {
    let listener = serial_listener(opener, "test-port".into());
    AgentServer::start(guest.agent(), Listener::new(listener))
        .await
        .expect("start")
}

#[tokio::test]
async fn socketpair_port_reopens_after_each_session() {
    let guest = FakeGuest::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opener = PortOpener::from_fn(move || {
        let (port, host) = std::os::unix::net::UnixStream::pair()?;
        tx.send(host).map_err(std::io::Error::other)?;
        Ok(OwnedFd::from(port))
    });
    let _server = serve(&guest, opener).await;
    for round in 0..3 {
        let host = tokio::time::timeout(T, rx.recv())
            .await
            .expect("port reopened in time")
            .expect("opener alive");
        host.set_nonblocking(true).expect("nonblocking");
        let mut stream = tokio::net::UnixStream::from_std(host).expect("tokio stream");
        host_handshake(&mut stream, Path::new("pair"))
            .await
            .expect("session handshake");
        let a = KataAgent::with_stream(url("unix", &guest.sock("x")), cfg(), stream);
        assert_eq!(
            a.check().await.expect("check"),
            HealthStatus::Serving,
            "round {round}"
        );
        assert_eq!(a.random(2).await.expect("random"), vec![7, 7]);
        a.disconnect().await.expect("disconnect");
    }
    // Only one session is open at a time: nothing reopened before the last one closed... and
    // after it closed, exactly one new open.
    let next = tokio::time::timeout(T, rx.recv()).await.expect("reopen");
    assert!(next.is_some());
    assert!(rx.try_recv().is_err(), "port opened twice");
}

struct Pty {
    master: OwnedFd,
    slave_path: String,
}

fn open_pty() -> std::io::Result<Pty> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let slave_path = nix::pty::ptsname_r(&master)?;
    // SAFETY: into_raw_fd hands over sole ownership of the master fd.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    Ok(Pty { master, slave_path })
}

/// Opens the host side of the pty in raw mode, as an async stream.
fn open_slave(path: &str) -> FdStream {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .expect("open pty slave");
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut t = tcgetattr(&fd).expect("tcgetattr");
    cfmakeraw(&mut t);
    tcsetattr(&fd, SetArg::TCSANOW, &t).expect("tcsetattr");
    FdStream::new(fd).expect("fd stream")
}

#[tokio::test]
async fn pty_port_serves_closes_and_reopens() {
    let guest = FakeGuest::new();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let opener = PortOpener::from_fn(move || {
        let pty = open_pty()?;
        tx.send(pty.slave_path).map_err(std::io::Error::other)?;
        Ok(pty.master)
    });
    let _server = serve(&guest, opener).await;
    for round in 0..3 {
        let path = tokio::time::timeout(T, rx.recv())
            .await
            .expect("port reopened in time")
            .expect("opener alive");
        let mut slave = open_slave(&path);
        host_handshake(&mut slave, Path::new(&path))
            .await
            .expect("session handshake");
        let a = KataAgent::with_stream(url("unix", &guest.sock("x")), cfg(), slave);
        assert_eq!(
            a.check().await.expect("check"),
            HealthStatus::Serving,
            "round {round}"
        );
        let r = a.resources().await.expect("resources");
        assert_eq!(r.online_cpus, vec![0, 1]);
        // Closing the host side (the slave) makes the master read EIO: end of session.
        a.disconnect().await.expect("disconnect");
    }
}

/// A kept-open port whose host hung up must not yield a new session until the host is back:
/// it is opened once, yields one session, then waits (no spinning through sessions).
async fn hangup_waits(port: OwnedFd, mut host: FdStream) {
    let port = std::sync::Mutex::new(Some(port));
    let opens = Arc::new(AtomicUsize::new(0));
    let counted = opens.clone();
    let opener = PortOpener::from_fn(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        port.lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .take()
            .ok_or_else(|| std::io::Error::other("opened twice"))
    })
    .keep_open();
    let mut sessions = Box::pin(serial_listener(opener, "test-port".into()));
    let (conn, synced) = tokio::join!(
        tokio::time::timeout(T, sessions.next()),
        host_handshake(&mut host, Path::new("port"))
    );
    synced.expect("session handshake");
    let mut conn = conn
        .expect("first session")
        .expect("stream")
        .expect("session");
    // A frame's first bytes (a ttRPC length starts with 0).
    host.write_all(b"\0\0\0\x01").await.expect("write");
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"\0\0\0\x01");
    drop(host);
    // The host is gone: the session reads EOF and ends.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).await.expect("read to end");
    drop(conn);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), sessions.next())
            .await
            .is_err(),
        "a session was yielded with no host connected"
    );
    assert_eq!(opens.load(Ordering::SeqCst), 1, "port reopened");
}

#[tokio::test]
async fn pty_hangup_waits_for_host() {
    // The port is the pty master; the host is the slave. A master whose slave closed polls
    // OUT|HUP (a virtio port polls HUP alone); neither means a connected host. A pty master gets
    // no wake-up when the slave is reopened (a virtio port does, on PORT_OPEN), so the next
    // session cannot be driven with a pty; the QEMU e2e covers it.
    let pty = open_pty().expect("pty");
    let host = open_slave(&pty.slave_path);
    hangup_waits(pty.master, host).await;
}

#[tokio::test]
async fn socket_hangup_waits_for_host() {
    let (port, host) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    hangup_waits(
        OwnedFd::from(port),
        FdStream::new(OwnedFd::from(host)).expect("host"),
    )
    .await;
}

/// The race a real port has under load: the next host's hello is read by the session still
/// open for the previous host. The session must end at the frame boundary and the next one
/// must start from the kept hello, with no host event in between.
#[tokio::test]
async fn hello_read_by_the_old_session_starts_the_next_one() {
    let (port, host) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let port = std::sync::Mutex::new(Some(OwnedFd::from(port)));
    let opener = PortOpener::from_fn(move || {
        port.lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .take()
            .ok_or_else(|| std::io::Error::other("opened twice"))
    })
    .keep_open();
    let mut host = FdStream::new(OwnedFd::from(host)).expect("host");
    let mut sessions = Box::pin(serial_listener(opener, "test-port".into()));
    let (first, synced) = tokio::join!(
        tokio::time::timeout(T, sessions.next()),
        host_handshake(&mut host, Path::new("port"))
    );
    synced.expect("first handshake");
    let mut first = first
        .expect("first session")
        .expect("stream")
        .expect("session");

    // One whole frame (2-byte body), then a new host's hello right behind it.
    let frame = [0, 0, 0, 2, 0, 0, 0, 1, 1, 0, b'o', b'k'];
    host.write_all(&frame).await.expect("frame");
    host.write_all(&hello_line(42)).await.expect("hello");
    let mut got = Vec::new();
    tokio::time::timeout(T, first.read_to_end(&mut got))
        .await
        .expect("old session ends")
        .expect("read");
    assert_eq!(
        got, frame,
        "the old session gets its frame and nothing after it"
    );
    drop(first);

    let second = tokio::time::timeout(T, sessions.next())
        .await
        .expect("second session without a host event")
        .expect("stream")
        .expect("session");
    let want = ack_line(42);
    let mut ack = vec![0u8; want.len()];
    host.read_exact(&mut ack).await.expect("ack");
    assert_eq!(ack, want);
    drop(second);
}
