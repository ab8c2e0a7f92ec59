//! [`CacheServer`]: serves a [`FactoryBase`]'s VMs to other processes (Kata's VMCache server,
//! `kata-runtime factory init` with `vm_cache_number > 0`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use tokio::sync::{oneshot, watch, OwnedRwLockReadGuard, RwLock};
use tracing::{debug, info, instrument, warn};
use ttrpc::asynchronous::transport::Listener;
use ttrpc::r#async::{Server, TtrpcContext};
use ttrpc::{get_status, Code};
use vmfactory_vm::{Vm, VmState};

use super::convert;
use super::error::{CacheServiceError, Result};
use super::protocols::cache::{GrpcStatus, GrpcVM, GrpcVMConfig};
use super::protocols::cache_ttrpc;
use super::socket;
use crate::{error_chain, FactoryBase};

/// A running VM-cache server on a unix socket.
///
/// It stops on [`CacheServer::shutdown`], on a client's `Quit`, or (through
/// [`CacheServer::run_until_signal`]) on SIGTERM/SIGINT. Stopping stops accepting, lets
/// `GetBaseVM` calls in flight finish, closes the base factory (its cached VMs stop), removes the
/// socket and closes the connections. Dropping the handle stops the server in the background.
pub struct CacheServer {
    socket: PathBuf,
    stop: Arc<watch::Sender<bool>>,
    stopped: watch::Receiver<bool>,
    outcome: Arc<Mutex<Option<Result<()>>>>,
}

impl fmt::Debug for CacheServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheServer")
            .field("socket", &self.socket)
            .field("stopped", &*self.stopped.borrow())
            .finish_non_exhaustive()
    }
}

impl CacheServer {
    /// Starts serving `base` on a new unix socket at `socket`, created with mode 0600.
    ///
    /// Fails with [`CacheServiceError::SocketInUse`] when a server answers there, and with
    /// [`CacheServiceError::NotASocket`] when another kind of file is in the way; a stale socket
    /// (nobody listening) is replaced. The base config is encoded once, here.
    pub async fn start(base: Arc<dyn FactoryBase>, socket: &Path) -> Result<Self> {
        socket::check_endpoint(socket)?;
        let config = convert::config_to_grpc(base.config())?;
        socket::clear_stale(socket).await?;
        let listener = socket::bind(socket).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stop = Arc::new(stop_tx);
        let gate = Arc::new(RwLock::new(false));
        let service = Arc::new(Service {
            base: base.clone(),
            config,
            gate: gate.clone(),
            stop: stop.clone(),
        });
        let mut server = Server::new()
            .add_listener(Listener::new(crate::unix_socket::incoming(listener)))
            .register_service(cache_ttrpc::create_cache_service(service));
        if let Err(source) = server.start().await {
            if let Err(e) = socket::remove(socket).await {
                warn!(error = %e, "removing the socket after a failed start");
            }
            return Err(CacheServiceError::Start {
                path: socket.to_owned(),
                source: Box::new(source),
            });
        }
        info!(socket = %socket.display(), pid = std::process::id(), "VM-cache server started");
        let (stopped_tx, stopped) = watch::channel(false);
        let outcome = Arc::new(Mutex::new(None));
        tokio::spawn(supervise(Supervisor {
            server,
            base,
            gate,
            socket: socket.to_owned(),
            stop_rx,
            stopped_tx,
            outcome: outcome.clone(),
        }));
        Ok(Self {
            socket: socket.to_owned(),
            stop,
            stopped,
            outcome,
        })
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True once the server has stopped.
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Waits until the server has stopped (after `Quit`, [`CacheServer::shutdown`] or a signal).
    ///
    /// The first caller gets the stop's error, if any (closing the base factory, removing the
    /// socket); later callers get `Ok`.
    pub async fn wait(&self) -> Result<()> {
        let mut rx = self.stopped.clone();
        // An error means the supervisor is gone, which only happens once it has stopped.
        let _ = rx.wait_for(|s| *s).await;
        let outcome = self
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        outcome.unwrap_or(Ok(()))
    }

    /// Stops the server (see the type's docs) and waits until it has stopped. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        self.stop.send_replace(true);
        self.wait().await
    }

    /// Serves until `Quit`, SIGTERM or SIGINT, then stops gracefully (for the CLI's
    /// `factory init`).
    pub async fn run_until_signal(&self) -> Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind, name| {
            signal(kind).map_err(|source| CacheServiceError::Signal {
                signal: name,
                source,
            })
        };
        let mut term = install(SignalKind::terminate(), "SIGTERM")?;
        let mut int = install(SignalKind::interrupt(), "SIGINT")?;
        tokio::select! {
            res = self.wait() => return res,
            _ = term.recv() => info!("SIGTERM: stopping the VM-cache server"),
            _ = int.recv() => info!("SIGINT: stopping the VM-cache server"),
        }
        self.shutdown().await
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// The background task that owns the ttRPC server and performs the stop.
struct Supervisor {
    server: Server,
    base: Arc<dyn FactoryBase>,
    gate: Arc<RwLock<bool>>,
    socket: PathBuf,
    stop_rx: watch::Receiver<bool>,
    stopped_tx: watch::Sender<bool>,
    outcome: Arc<Mutex<Option<Result<()>>>>,
}

async fn supervise(mut s: Supervisor) {
    // An error means every sender is gone: nobody can ask any more, so stop too.
    let _ = s.stop_rx.wait_for(|stop| *stop).await;
    info!(socket = %s.socket.display(), "VM-cache server stopping");
    s.server.stop_listen().await;
    // Wait for GetBaseVM calls in flight (they hold the gate) and refuse later ones.
    *s.gate.write().await = true;
    let removed = socket::remove(&s.socket).await;
    let closed = s
        .base
        .close()
        .await
        .map_err(|e| CacheServiceError::CloseBase(Box::new(e)));
    // Connections end here; replies already queued (Quit's) are written first.
    s.server.shutdown().await.ok();
    let res = closed.and(removed);
    match &res {
        Ok(()) => info!("VM-cache server stopped"),
        Err(e) => warn!(error = %e, "VM-cache server stopped with an error"),
    }
    *s.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(res);
    s.stopped_tx.send_replace(true);
}

/// The `cache.CacheService` implementation.
struct Service {
    base: Arc<dyn FactoryBase>,
    config: GrpcVMConfig,
    /// Read-held by each `GetBaseVM`; `true` once the server stops.
    gate: Arc<RwLock<bool>>,
    stop: Arc<watch::Sender<bool>>,
}

fn status(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(code, msg.to_string()))
}

impl Service {
    /// Takes a base VM in a task of its own, so that a client hanging up mid-call (which
    /// cancels the handler) cannot drop a VM half made: if nobody takes the VM, it is stopped.
    /// The returned guard keeps the server from stopping until the VM is handed over.
    async fn take_vm(&self) -> ttrpc::Result<(Vm, OwnedRwLockReadGuard<bool>)> {
        let guard = self.gate.clone().read_owned().await;
        if *guard {
            return Err(status(Code::UNAVAILABLE, "VM-cache server is stopping"));
        }
        let base = self.base.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let res = base.get_base_vm(base.config()).await;
            match res {
                Ok(vm) => {
                    if let Err(Ok((vm, _guard))) = tx.send(Ok((vm, guard))) {
                        warn!(vm = %vm.id(), "client left before taking its VM; stopping it");
                        if let Err(e) = vm.stop().await {
                            warn!(vm = %vm.id(), error = %e, "stopping an untaken VM failed");
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        match rx.await {
            Ok(Ok(taken)) => Ok(taken),
            Ok(Err(e)) => Err(status(Code::INTERNAL, error_chain(&e))),
            Err(_) => Err(status(Code::INTERNAL, "base VM task failed")),
        }
    }
}

#[async_trait]
impl cache_ttrpc::CacheService for Service {
    async fn config(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<GrpcVMConfig> {
        Ok(self.config.clone())
    }

    #[instrument(skip_all)]
    async fn get_base_vm(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<GrpcVM> {
        let (vm, _guard) = self.take_vm().await?;
        let bytes = match vm.detach().await {
            Ok(b) => b,
            Err(e) => {
                warn!(vm = %vm.id(), error = %e, "detaching a base VM failed; stopping it");
                if let Err(e) = vm.stop().await {
                    warn!(vm = %vm.id(), error = %e, "stopping it failed");
                }
                return Err(status(Code::INTERNAL, error_chain(&e)));
            }
        };
        let state =
            VmState::from_wire(&bytes).map_err(|e| status(Code::INTERNAL, error_chain(&e)))?;
        debug!(vm = %state.id, "handing out a VM");
        Ok(convert::vm_to_grpc(&state, bytes))
    }

    async fn status(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<GrpcStatus> {
        let mut msg = GrpcStatus::new();
        msg.pid = i64::from(std::process::id());
        msg.vmstatus = self
            .base
            .status()
            .await
            .iter()
            .map(convert::status_to_grpc)
            .collect();
        Ok(msg)
    }

    async fn quit(&self, _ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        info!("Quit requested");
        self.stop.send_replace(true);
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::testing::{cache_socket, FakeBase};
    use vmfactory_hypervisor::wait::wait_until;
    use vmfactory_vm::FakeBackends;

    #[tokio::test]
    async fn socket_is_0600_and_a_live_socket_refuses_a_second_server() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 1).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        let mode = std::fs::metadata(cache_socket(&backends))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let other = FakeBase::new(&backends, backends.config(), 0).await;
        assert!(matches!(
            CacheServer::start(other.clone(), &cache_socket(&backends)).await,
            Err(CacheServiceError::SocketInUse { .. })
        ));
        assert_eq!(other.closes.load(Ordering::SeqCst), 0);
        assert!(!server.is_stopped(), "the first server still serves");

        server.shutdown().await.expect("shutdown");
        server.shutdown().await.expect("shutdown is idempotent");
        assert!(server.is_stopped());
        assert!(!cache_socket(&backends).exists(), "socket removed");
        assert_eq!(base.closes.load(Ordering::SeqCst), 1, "base closed once");
        assert_eq!(
            backends.vm_dirs(),
            Vec::<PathBuf>::new(),
            "cached VMs stopped"
        );
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced() {
        let backends = Arc::new(FakeBackends::new());
        drop(std::os::unix::net::UnixListener::bind(cache_socket(&backends)).expect("bind"));
        assert!(cache_socket(&backends).exists());
        let base = FakeBase::new(&backends, backends.config(), 0).await;
        let server = CacheServer::start(base, &cache_socket(&backends))
            .await
            .expect("start over a stale socket");
        let mode = std::fs::metadata(cache_socket(&backends))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        server.shutdown().await.expect("shutdown");
        assert!(!cache_socket(&backends).exists());
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_server() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 1).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        drop(server);
        let socket = cache_socket(&backends);
        wait_until(Duration::from_secs(5), || async {
            (!socket.exists()).then_some(())
        })
        .await
        .expect("socket removed");
        wait_until(Duration::from_secs(5), || async {
            (base.closes.load(Ordering::SeqCst) == 1).then_some(())
        })
        .await
        .expect("base closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_stops_a_server_run_until_signal() {
        use tokio::signal::unix::{signal, SignalKind};
        // Our own handler first: from here on SIGTERM cannot kill the test process.
        let _guard = signal(SignalKind::terminate()).expect("handler");
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 1).await;
        let server = Arc::new(
            CacheServer::start(base.clone(), &cache_socket(&backends))
                .await
                .expect("start"),
        );
        let runner = {
            let server = server.clone();
            tokio::spawn(async move { server.run_until_signal().await })
        };
        // The runner installs its handlers when first polled: signal until it has stopped.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !server.is_stopped() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "SIGTERM not handled"
            );
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        runner.await.expect("runner").expect("clean stop");
        assert!(!cache_socket(&backends).exists());
        assert_eq!(base.closes.load(Ordering::SeqCst), 1);
    }
}
