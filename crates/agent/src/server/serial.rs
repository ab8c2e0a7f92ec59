//! Serving on a virtio-serial port: a [`Listener`](ttrpc::asynchronous::transport::Listener)
//! stream that yields one connection per host session.
//!
//! A virtio console port has no accept: the guest opens the device and the host side is either
//! connected or not. While no host is connected, `poll` reports `POLLHUP` continuously and reads
//! return EOF. The stream therefore:
//! 1. opens the port (`O_RDWR | O_CLOEXEC | O_NONBLOCK`) once and keeps it open;
//! 2. for each session, prints `vmfactory-agent: listening on <name>` on the console and waits for
//!    the host with edge-triggered epoll on `EPOLLOUT` (as Kata's Go agent did): `EPOLLOUT`
//!    means connected, `EPOLLERR` fails, `EPOLLHUP` means "not yet". tokio's `AsyncFd` cannot
//!    do this wait: it keeps HUP readiness sticky, so it would spin;
//! 3. yields a duplicate of the port fd as a [`SerialConn`] (tokio `AsyncFd` based);
//! 4. when ttRPC drops that connection (after EOF or an error), goes back to 2 at once.
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::init::console_line;

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
        port: Option<OwnedFd>,
    }
    let state = State {
        opener,
        label,
        prev: None,
        port: None,
    };
    futures::stream::unfold(state, |mut st| async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            if let Some(prev) = st.prev.take() {
                // Resolves when the previous SerialConn is dropped (its sender goes away).
                let _ = prev.await;
                debug!(port = %st.label, "host session ended");
            }
            match accept(&st.opener, &mut st.port, &st.label).await {
                Ok((conn, closed)) => {
                    st.prev = Some(closed);
                    return Some((Ok(conn), st));
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

/// Opens the port (or duplicates the kept one), announces it, waits for the host and wraps the
/// fd.
async fn accept(
    opener: &PortOpener,
    kept: &mut Option<OwnedFd>,
    label: &str,
) -> io::Result<(SerialConn, oneshot::Receiver<()>)> {
    let fd = if opener.keep_open {
        let port = match kept.take() {
            Some(port) => port,
            None => opener.open()?,
        };
        let dup = port.try_clone()?;
        *kept = Some(port);
        dup
    } else {
        opener.open()?
    };
    console_line(&format!("vmfactory-agent: listening on {label}"));
    let fd = wait_for_host(fd).await?;
    debug!(port = %label, "host connected");
    let (tx, rx) = oneshot::channel();
    let conn = SerialConn {
        stream: FdStream::new(fd)?,
        _closed: tx,
    };
    Ok((conn, rx))
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits (in a blocking thread) until the port reports `EPOLLOUT`. Dropping the returned future
/// wakes and ends the blocking thread through a pipe.
async fn wait_for_host(fd: OwnedFd) -> io::Result<OwnedFd> {
    let (cancel_rx, cancel_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let task = tokio::task::spawn_blocking(move || {
        let res = wait_for_host_blocking(fd.as_fd(), cancel_rx.as_fd());
        res.map(|()| fd)
    });
    let res = task.await.map_err(io::Error::other)?;
    drop(cancel_tx);
    res
}

const PORT_TOKEN: u64 = 0;
const CANCEL_TOKEN: u64 = 1;

fn wait_for_host_blocking(port: BorrowedFd<'_>, cancel: BorrowedFd<'_>) -> io::Result<()> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(
        port,
        EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, PORT_TOKEN),
    )?;
    epoll.add(cancel, EpollEvent::new(EpollFlags::EPOLLIN, CANCEL_TOKEN))?;
    let mut events = [EpollEvent::empty(); 2];
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            if ev.data() == CANCEL_TOKEN {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "listener dropped",
                ));
            }
            let flags = ev.events();
            // A virtio port never reports OUT and HUP together; a pty master whose slave is
            // closed does, and is not connected either.
            if flags.contains(EpollFlags::EPOLLOUT) && !flags.contains(EpollFlags::EPOLLHUP) {
                return Ok(());
            }
            if flags.contains(EpollFlags::EPOLLERR) {
                return Err(io::Error::other("error condition on port"));
            }
            // EPOLLHUP alone: no host connected yet; the next edge wakes us.
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
    _closed: oneshot::Sender<()>,
}

impl AsyncRead for SerialConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
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
