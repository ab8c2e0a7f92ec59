//! Serving on a virtio-serial port: a [`Listener`](ttrpc::asynchronous::transport::Listener)
//! stream that yields one connection per host session.
//!
//! A virtio console port has no accept: the guest opens the device and the host side is either
//! connected or not. While no host is connected, `poll` reports `POLLHUP` continuously and reads
//! return EOF. The stream therefore:
//! 1. opens the port (`O_RDWR | O_CLOEXEC | O_NONBLOCK`) once and keeps it open;
//! 2. for each session, prints `vmfactory-agent: listening on <name>` on the console and waits for
//!    the host with edge-triggered epoll on `EPOLLOUT` (as Kata's Go agent did): `EPOLLOUT`
//!    means connected, `EPOLLERR` fails, `EPOLLHUP` means "not yet". The port itself cannot be
//!    given to tokio's `AsyncFd` for this wait (it keeps HUP readiness sticky, so it would
//!    spin): a private epoll instance watches the port, and tokio watches that instance;
//! 3. reads the host's `SYNC <nonce>` line (see [`vmfactory_agent::handshake`]), discarding anything
//!    before it, and answers `SYNCED <nonce>`;
//! 4. yields a duplicate of the port fd as a [`SerialConn`] (tokio `AsyncFd` based), whose
//!    reader follows ttRPC frame boundaries: bytes that do not start a frame (a new host's
//!    `SYNC` line read while this session still ran) end the session and are kept for the next;
//! 5. when ttRPC drops that connection (after EOF or an error), goes back to 2 at once (or to 3
//!    when the next host's hello is already kept).
//!
//! Why a duplicate and not a reopen: the kernel discards the port's unread input when the last
//! fd of the port is closed (`port_fops_release`). A host that disconnects and reconnects at
//! once can have its first request already queued in the guest by the time the old session
//! closes, and a close-and-reopen would silently drop it (measured: a reconnecting client hung
//! until its timeout). Closing a duplicate does not release the port, so nothing is lost.
//! The port is only reopened after an error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::Stream;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::stat::Mode;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tracing::{debug, warn};
use vmfactory_agent::channel::listening_line;
use vmfactory_agent::handshake;

use crate::console::console_line;

type OpenFn = dyn Fn() -> io::Result<OwnedFd> + Send + Sync;

/// How the serial listener opens its port.
#[derive(Clone)]
pub struct PortOpener {
    open: Arc<OpenFn>,
    keep_open: bool,
}

impl std::fmt::Debug for PortOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortOpener")
            .field("keep_open", &self.keep_open)
            .finish_non_exhaustive()
    }
}

impl PortOpener {
    /// Opens a device node (`/dev/vport0p1`) read-write, non-blocking, close-on-exec, once,
    /// and keeps it open across sessions.
    pub fn device(path: PathBuf) -> Self {
        let open = Arc::new(move || {
            let flags = OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
            let fd = nix::fcntl::open(&path, flags, Mode::empty())?;
            // SAFETY: `open` just returned this fd and nothing else owns it.
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        });
        PortOpener {
            open,
            keep_open: true,
        }
    }

    /// Calls `f` for a fresh fd per session (tests hand out one socketpair end per session).
    pub fn from_fn(f: impl Fn() -> io::Result<OwnedFd> + Send + Sync + 'static) -> Self {
        PortOpener {
            open: Arc::new(f),
            keep_open: false,
        }
    }

    /// Opens once and serves every session on a duplicate of that fd, as for a device.
    pub fn keep_open(mut self) -> Self {
        self.keep_open = true;
        self
    }

    fn open(&self) -> io::Result<OwnedFd> {
        let fd = (self.open)()?;
        set_nonblocking(fd.as_fd())?;
        Ok(fd)
    }
}

/// A stream of host sessions on a serial port, for `ttrpc::asynchronous::transport::Listener::new`.
///
/// `label` names the port in the console line printed each time a session wait starts.
/// Errors are logged and retried with backoff; the stream never ends.
pub fn serial_listener(
    opener: PortOpener,
    label: String,
) -> impl Stream<Item = io::Result<SerialConn>> + Send + 'static {
    struct State {
        opener: PortOpener,
        label: String,
        prev: Option<oneshot::Receiver<()>>,
        port: Option<KeptPort>,
        kept: Kept,
    }
    let state = State {
        opener,
        label,
        prev: None,
        port: None,
        kept: Kept::default(),
    };
    futures::stream::unfold(state, |mut st| async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            if let Some(prev) = st.prev.take() {
                // Resolves when the previous SerialConn is dropped (its sender goes away).
                let _ = prev.await;
                debug!(port = %st.label, "host session ended");
            }
            match accept(&st.opener, &mut st.port, &st.label, &st.kept).await {
                Ok((conn, closed)) => {
                    st.prev = Some(closed);
                    return Some((Ok(conn), st));
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The host left before its handshake: wait for the next one. The port
                    // stays open, so nothing queued in it is lost.
                    debug!(port = %st.label, "host left during the handshake");
                }
                Err(e) => {
                    // Start over with a fresh open of the port.
                    st.port = None;
                    warn!(port = %st.label, error = %e, "cannot serve on port");
                    console_line(&format!("vmfactory-agent: port {}: {e}", st.label));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
}

/// A port kept open across sessions, and its waiter.
#[derive(Debug)]
struct KeptPort {
    // Declared first so it is dropped (its epoll closed) before the port it watches.
    waiter: HostWaiter,
    fd: OwnedFd,
}

impl KeptPort {
    fn open(opener: &PortOpener) -> io::Result<Self> {
        let fd = opener.open()?;
        let waiter = HostWaiter::new()?;
        Ok(KeptPort { waiter, fd })
    }
}

/// Opens the port (or duplicates the kept one), announces it, waits for the host and wraps the
/// fd.
async fn accept(
    opener: &PortOpener,
    port: &mut Option<KeptPort>,
    label: &str,
    kept: &Kept,
) -> io::Result<(SerialConn, oneshot::Receiver<()>)> {
    // A kept port (opened the first time) or, without `keep_open`, one for this session only.
    let own = if opener.keep_open {
        None
    } else {
        Some(KeptPort::open(opener)?)
    };
    let waiting: &KeptPort = match &own {
        Some(own) => own,
        None => {
            let open = match port.take() {
                Some(open) => open,
                None => KeptPort::open(opener)?,
            };
            port.insert(open)
        }
    };
    let fd = waiting.fd.try_clone()?;
    // A hello already read by the previous session means its host is here: no need to wait.
    let pending = std::mem::take(&mut *kept.lock());
    if pending.is_empty() {
        // Armed before the announcement: a template saved right after it has the wait set up.
        waiting.waiter.arm(waiting.fd.as_fd())?;
    }
    console_line(&listening_line(label));
    if pending.is_empty() {
        waiting.waiter.wait(waiting.fd.as_fd()).await?;
    }
    drop(own);
    debug!(port = %label, "host connected");
    let mut stream = FdStream::new(fd)?;
    let (nonce, leftover) = read_hello(&mut stream, pending).await?;
    stream.write_all(&handshake::ack_line(nonce)).await?;
    debug!(port = %label, nonce = format_args!("{nonce:016x}"), "session synced");
    let (tx, rx) = oneshot::channel();
    let conn = SerialConn {
        stream,
        frames: FrameReader::new(leftover, kept.clone()),
        _closed: tx,
    };
    Ok((conn, rx))
}

/// Bytes a session read past its last frame: the next host's hello (and what follows).
type Kept = Arc<std::sync::Mutex<Vec<u8>>>;

trait LockKept {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>>;
}

impl LockKept for Kept {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding this lock cannot leave the buffer invalid: take it anyway.
        std::sync::Mutex::lock(self).unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads until a `SYNC <nonce>` line, starting with `pending`; anything else is discarded.
/// Returns the nonce and the bytes read after the line. EOF (the host left) is
/// `UnexpectedEof`.
async fn read_hello(stream: &mut FdStream, pending: Vec<u8>) -> io::Result<(u64, Vec<u8>)> {
    let mut buf = pending;
    let mut line = Vec::with_capacity(handshake::MAX_LINE);
    let mut chunk = [0u8; 256];
    loop {
        let mut consumed = 0;
        for (i, &b) in buf.iter().enumerate() {
            if b != b'\n' {
                if line.len() < handshake::MAX_LINE {
                    line.push(b);
                }
                continue;
            }
            if let Some(nonce) = handshake::parse_hello(&line) {
                return Ok((nonce, buf[i + 1..].to_vec()));
            }
            line.clear();
            consumed = i + 1;
        }
        if consumed == 0 && !buf.is_empty() && line.len() >= handshake::MAX_LINE {
            // A long run without a newline is not a hello; keep scanning.
            line.clear();
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.clear();
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Follows ttRPC frame boundaries in what a session reads (10-byte header, big-endian length
/// first, at most 4 MiB so its first byte is 0). At a boundary, a non-zero byte is not the
/// current host's: it ends the session, and it and everything after it are kept for the next.
#[derive(Debug)]
struct FrameReader {
    pending: Vec<u8>,
    header: [u8; 10],
    header_len: usize,
    body_left: u64,
    kept: Kept,
    ended: bool,
}

impl FrameReader {
    fn new(pending: Vec<u8>, kept: Kept) -> Self {
        Self {
            pending,
            header: [0; 10],
            header_len: 0,
            body_left: 0,
            kept,
            ended: false,
        }
    }

    /// Moves bytes of the current session from `self.pending` into `out`; returns how many.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) -> usize {
        let mut i = 0;
        while i < self.pending.len() && out.remaining() > 0 {
            if self.body_left > 0 {
                let n = (self.pending.len() - i)
                    .min(out.remaining())
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                out.put_slice(&self.pending[i..i + n]);
                self.body_left -= n as u64;
                i += n;
                continue;
            }
            let b = self.pending[i];
            if self.header_len == 0 && b != 0 {
                // Not a frame: the next host's hello. Keep it and end this session.
                self.kept.lock().extend_from_slice(&self.pending[i..]);
                self.pending.clear();
                self.ended = true;
                return i;
            }
            self.header[self.header_len] = b;
            self.header_len += 1;
            out.put_slice(&[b]);
            i += 1;
            if self.header_len == self.header.len() {
                let len = [
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ];
                self.body_left = u64::from(u32::from_be_bytes(len));
                self.header_len = 0;
            }
        }
        self.pending.drain(..i);
        i
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits for a host on one port: an edge-triggered epoll instance watching the port for
/// `EPOLLOUT`, itself watched by tokio (an epoll fd is readable while it has events pending), so
/// the wait runs on the async worker with no thread hand-off.
///
/// A waiter is made once per open port and is kept, but it watches the port only while
/// waiting: `arm` adds the port to its epoll, the end of the wait deletes it. Nothing is
/// created or closed per session, and that matters for clones: a template is saved mid-wait,
/// and closing files in the guest after resume (the epoll and pipe of a per-wait thread, as
/// before) set off RCU and dentry work that TCG translates afresh in every clone (measured:
/// ~1,200 of ~9,000 translated blocks per clone `get_vm`). Watching the port during sessions
/// too (armed for good, or with an empty interest, which still holds `EPOLLHUP`) made a request
/// go unanswered until the next one came, in 3 of ~3,300 clones (5 calls each, 3 s bound);
/// with the port deleted during sessions, 0 of 2,400.
#[derive(Debug)]
struct HostWaiter {
    epoll: AsyncFd<EpollFd>,
}

/// An [`Epoll`] as an `AsRawFd` for [`AsyncFd`].
#[derive(Debug)]
struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl HostWaiter {
    /// A disarmed waiter, for one port.
    fn new() -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        // SAFETY: the epoll fd is owned by the `EpollFd` the AsyncFd owns, and stays open and
        // unchanged until that AsyncFd is dropped.
        let epoll = unsafe {
            AsyncFd::register_with_interest(EpollFd(epoll), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(HostWaiter { epoll })
    }

    /// Arms the waiter on `port`: the port's current state is checked at once, so a host
    /// already there is seen.
    fn arm(&self, port: BorrowedFd<'_>) -> io::Result<()> {
        let mut armed = EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, 0);
        let epoll = &self.epoll.get_ref().0;
        match epoll.add(port, armed) {
            // Still armed from a wait that was given up (its future dropped).
            Err(Errno::EEXIST) => Ok(epoll.modify(port, &mut armed)?),
            res => Ok(res?),
        }
    }

    /// Disarms the waiter: it no longer watches `port`, which is then neither polled nor woken
    /// for it (an epoll entry with an empty interest still is: `EPOLLHUP` is always in it).
    fn disarm(&self, port: BorrowedFd<'_>) -> io::Result<()> {
        Ok(self.epoll.get_ref().0.delete(port)?)
    }

    /// Resolves once `port` reports `EPOLLOUT` without `EPOLLHUP` (a host is connected), and
    /// disarms the waiter. Arm it first.
    async fn wait(&self, port: BorrowedFd<'_>) -> io::Result<()> {
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut events = [EpollEvent::empty(); 1];
            let n = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 1 {
                let flags = events[0].events();
                // A virtio port never reports OUT and HUP together; a pty master whose slave
                // is closed does, and is not connected either.
                if flags.contains(EpollFlags::EPOLLOUT) && !flags.contains(EpollFlags::EPOLLHUP) {
                    return self.disarm(port);
                }
                if flags.contains(EpollFlags::EPOLLERR) {
                    return Err(io::Error::other("error condition on port"));
                }
            }
            // Nothing pending, or EPOLLHUP alone (no host yet): the next edge wakes us. An
            // edge after the `wait` above sets readiness again; `clear_ready` keeps it.
            guard.clear_ready();
        }
    }
}

/// A non-blocking fd (serial port, pty, socket) as tokio `AsyncRead + AsyncWrite`.
#[derive(Debug)]
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, making it non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        // SAFETY: `OwnedFd` is a valid open fd that stays open and unchanged until the AsyncFd
        // (its owner) is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)?;
        Ok(FdStream { fd })
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A pty master whose other side closed reads EIO: that is end of session.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Hang-up readiness is sticky in tokio: with nothing to read, it is EOF.
                Err(_) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(res) => return Poll::Ready(res),
                // The peer hung up and the port will never drain: fail instead of spinning.
                Err(_) if closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "peer hung up",
                    )))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One host session on a serial port. Dropping it (ttRPC does after EOF) closes the port and
/// lets the listener reopen it.
#[derive(Debug)]
pub struct SerialConn {
    stream: FdStream,
    frames: FrameReader,
    _closed: oneshot::Sender<()>,
}

impl AsyncRead for SerialConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.frames.ended || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.frames.pending.is_empty() {
                if this.frames.deliver(buf) > 0 || this.frames.ended {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut chunk = [0u8; 4096];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut chunk_buf))?;
            if chunk_buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.frames.pending.extend_from_slice(chunk_buf.filled());
        }
    }
}

impl AsyncWrite for SerialConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    // Waiting while no host is there goes through the listener in tests/serial.rs
    // (`pty_hangup_waits_for_host`, `socket_hangup_waits_for_host`).
    #[tokio::test]
    async fn waiter_sees_a_ready_port_and_can_be_rearmed() {
        let (port, _host) = UnixStream::pair().expect("socketpair");
        let port = OwnedFd::from(port);
        let waiter = HostWaiter::new().expect("waiter");
        // A connected socket is writable: armed, the wait ends at once.
        waiter.arm(port.as_fd()).expect("arm");
        tokio::time::timeout(Duration::from_secs(5), waiter.wait(port.as_fd()))
            .await
            .expect("in time")
            .expect("connected");
        // The wait disarmed it: the port is no longer watched.
        assert_eq!(
            waiter.disarm(port.as_fd()).map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENOENT))
        );
        // Armed twice (a wait given up half-way leaves it armed): still one wait that works.
        waiter.arm(port.as_fd()).expect("arm");
        waiter.arm(port.as_fd()).expect("arm again");
        tokio::time::timeout(Duration::from_secs(5), waiter.wait(port.as_fd()))
            .await
            .expect("in time")
            .expect("connected");
    }
}
