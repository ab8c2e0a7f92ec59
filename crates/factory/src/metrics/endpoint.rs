//! [`MetricsServer`]: `GET /metrics` over HTTP/1 (hyper) on a TCP address or a unix socket.
//!
//! A unix socket is made like the VM-cache socket: a live one is refused, a stale one
//! replaced, the new one set to 0600 before anything is accepted, peers of other users are
//! dropped, and the file is removed when the server stops.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use vmfactory_vm::MAX_SOCKET_PATH;

use super::Metrics;
use crate::unix_socket::{self, bind_private, probe_socket, SocketPath};

/// The content type of the Prometheus text exposition format.
const CONTENT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A client gets this long to send its request head (a stuck client holds one task only).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix of a unix socket address.
const UNIX_PREFIX: &str = "unix:";

/// Where the metrics endpoint listens: `HOST:PORT` or `unix:/ABSOLUTE/PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddress {
    /// A TCP address (port 0: one the system picks).
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for MetricsAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{UNIX_PREFIX}{}", p.display()),
        }
    }
}

/// Why a metrics address does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsAddressError {
    /// Neither `HOST:PORT` (an IP address and a port) nor `unix:PATH`.
    #[error("Metrics address {0:?} is neither IP:PORT (e.g. 127.0.0.1:9464) nor unix:/PATH")]
    Invalid(String),
    /// The unix socket path is relative.
    #[error("Metrics socket path {0} is not absolute")]
    Relative(PathBuf),
    /// The unix socket path does not fit in a socket address.
    #[error("Metrics socket path {path} is too long ({len} bytes, at most {max})")]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest that fits.
        max: usize,
    },
}

impl FromStr for MetricsAddress {
    type Err = MetricsAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix(UNIX_PREFIX) {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(MetricsAddressError::Relative(path));
            }
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(MetricsAddressError::TooLong {
                    path,
                    len,
                    max: MAX_SOCKET_PATH,
                });
            }
            return Ok(Self::Unix(path));
        }
        s.parse()
            .map(Self::Tcp)
            .map_err(|_| MetricsAddressError::Invalid(s.to_owned()))
    }
}

/// Why the metrics endpoint could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Something listens there already (a live socket, or a TCP port taken).
    #[error("Metrics address {address} is in use")]
    InUse {
        /// The address.
        address: MetricsAddress,
    },
    /// A file that is not a socket is in the way of the unix socket.
    #[error("Metrics socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding, probing, chmod-ing or removing failed.
    #[error("Failed to {op} metrics address {address}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The address.
        address: MetricsAddress,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A running metrics endpoint. Stopped by [`MetricsServer::shutdown`]; dropping it stops it in
/// the background.
#[derive(Debug)]
pub struct MetricsServer {
    address: MetricsAddress,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), MetricsError>>>,
}

impl MetricsServer {
    /// Serves `metrics` at `address`. Fails with [`MetricsError::InUse`] if something listens
    /// there, and leaves nothing behind on any failure.
    pub async fn start(
        address: &MetricsAddress,
        metrics: Arc<Metrics>,
    ) -> Result<Self, MetricsError> {
        let (stop, stopped) = watch::channel(false);
        let (bound, task) = match address {
            MetricsAddress::Tcp(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(|source| {
                    if source.kind() == io::ErrorKind::AddrInUse {
                        MetricsError::InUse {
                            address: address.clone(),
                        }
                    } else {
                        MetricsError::Io {
                            op: "bind",
                            address: address.clone(),
                            source,
                        }
                    }
                })?;
                // Port 0 became a real port: report that one.
                let bound = listener
                    .local_addr()
                    .map(MetricsAddress::Tcp)
                    .map_err(|source| MetricsError::Io {
                        op: "read the bound address of",
                        address: address.clone(),
                        source,
                    })?;
                let accepted = futures::stream::unfold(listener, |l| async move {
                    Some((l.accept().await.map(|(s, _)| s), l))
                });
                let task = tokio::spawn(serve(accepted, metrics, stopped, None));
                (bound, task)
            }
            MetricsAddress::Unix(path) => {
                let listener = bind_unix(address, path).await?;
                let accepted = unix_socket::incoming(listener);
                let task = tokio::spawn(serve(accepted, metrics, stopped, Some(path.clone())));
                (address.clone(), task)
            }
        };
        info!(address = %bound, "metrics endpoint started");
        Ok(Self {
            address: bound,
            stop,
            task: Some(task),
        })
    }

    /// The address it listens on (with the real port when port 0 was asked for).
    pub fn address(&self) -> &MetricsAddress {
        &self.address
    }

    /// Stops accepting and removes a unix socket. Idempotent.
    pub async fn shutdown(&mut self) -> Result<(), MetricsError> {
        self.stop.send_replace(true);
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Makes the unix socket: refuses a live one, replaces a stale one, binds and sets 0600.
async fn bind_unix(address: &MetricsAddress, path: &Path) -> Result<UnixListener, MetricsError> {
    let io_err = |(op, source)| MetricsError::Io {
        op,
        address: address.clone(),
        source,
    };
    match probe_socket(path).await.map_err(io_err)? {
        SocketPath::Free => {}
        SocketPath::NotASocket => return Err(MetricsError::NotASocket(path.to_owned())),
        SocketPath::Live => {
            return Err(MetricsError::InUse {
                address: address.clone(),
            })
        }
        SocketPath::Stale => {
            info!(path = %path.display(), "removing stale metrics socket");
            unix_socket::remove(path)
                .await
                .map_err(|e| io_err(("remove", e)))?;
        }
    }
    bind_private(path).await.map_err(io_err)
}

/// Accepts connections until `stopped`, each served on a task of its own; then removes the
/// unix socket, if any.
async fn serve<S, C>(
    accepted: S,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
    unix: Option<PathBuf>,
) -> Result<(), MetricsError>
where
    S: futures::Stream<Item = io::Result<C>>,
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::pin!(accepted);
    loop {
        let conn = tokio::select! {
            _ = stopped.wait_for(|s| *s) => break,
            c = accepted.next() => c,
        };
        match conn {
            Some(Ok(stream)) => {
                let metrics = metrics.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let metrics = metrics.clone();
                        async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                    });
                    let res = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = res {
                        debug!(error = %e, "metrics connection ended with an error");
                    }
                });
            }
            Some(Err(e)) => {
                // Out of descriptors, say: the next accept may work.
                warn!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => break,
        }
    }
    info!("metrics endpoint stopped");
    match unix {
        Some(path) => unix_socket::remove(&path)
            .await
            .map_err(|source| MetricsError::Io {
                op: "remove",
                address: MetricsAddress::Unix(path.clone()),
                source,
            }),
        None => Ok(()),
    }
}

/// `GET /metrics`: the text exposition; another path 404, another method 405.
fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let reply = |status, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "Not found: try /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "Only GET\n".into());
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = reply(StatusCode::OK, metrics.encode());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT));
    r
}
