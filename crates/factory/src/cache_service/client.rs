//! [`CacheClient`]: a [`FactoryBase`] whose base VMs come from a VM-cache server (Kata's
//! `factory/grpccache`).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tracing::{debug, info, instrument, warn};
use ttrpc::asynchronous::transport::Socket;
use vmfactory_agent::client::is_connection_error;
use vmfactory_vm::{Backends, QemuBackends, Vm, VmConfig, VmInfo};

use super::convert;
use super::error::{CacheServiceError, Result};
use super::protocols::cache_ttrpc::CacheServiceClient;
use crate::{BaseError, FactoryBase};

/// Bound on `Config`, `Status` and `Quit`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on `GetBaseVM` (the server may have to make the VM: a cold boot under TCG takes
/// seconds, more under load).
pub const GET_BASE_VM_TIMEOUT: Duration = Duration::from_secs(120);

/// What a VM-cache server reports about itself (`Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStatus {
    /// The server's process id.
    pub pid: u32,
    /// The VMs its base holds ready (`cpu_delta` is not on the wire and reads 0).
    pub vms: Vec<VmInfo>,
}

/// Connection state of a [`CacheClient`].
enum Conn {
    /// No connection; the next call dials.
    Disconnected,
    Connected(CacheServiceClient),
    /// [`FactoryBase::close`]d: calls fail.
    Closed,
}

/// A client of a VM-cache server, usable as a [`FactoryBase`]: `get_base_vm` asks the server
/// for a VM and re-attaches to it from its wire form (QMP, agent and proxy reconnected here).
///
/// A VM from a template base arrives paused, as from a local template factory; `get_vm`
/// resumes it. [`FactoryBase::close`] only disconnects: the server keeps running (use
/// [`CacheClient::quit`] to stop it).
pub struct CacheClient {
    endpoint: PathBuf,
    config: VmConfig,
    backends: Arc<dyn Backends>,
    conn: Mutex<Conn>,
}

impl fmt::Debug for CacheClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheClient")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

async fn dial(endpoint: &Path) -> Result<CacheServiceClient> {
    let stream =
        UnixStream::connect(endpoint)
            .await
            .map_err(|source| CacheServiceError::Connect {
                path: endpoint.to_owned(),
                source,
            })?;
    let client = ttrpc::r#async::Client::new(Socket::new(stream));
    Ok(CacheServiceClient::new(client))
}

impl CacheClient {
    /// Connects to the server at `endpoint` and fetches its base config (once); VMs are
    /// re-attached with the real backends (QEMU, the Kata agent).
    pub async fn connect(endpoint: &Path) -> Result<Self> {
        Self::connect_with(endpoint, Arc::new(QemuBackends)).await
    }

    /// [`CacheClient::connect`], re-attaching VMs with parts from `backends`.
    pub async fn connect_with(endpoint: &Path, backends: Arc<dyn Backends>) -> Result<Self> {
        super::socket::check_endpoint(endpoint)?;
        let client = dial(endpoint).await?;
        let mut this = Self {
            endpoint: endpoint.to_owned(),
            // Replaced below; `call` needs a value to exist.
            config: VmConfig::new(vmfactory_hypervisor::HypervisorConfig::new("/", None)),
            backends,
            conn: Mutex::new(Conn::Connected(client)),
        };
        let msg = this
            .call("Config", CALL_TIMEOUT, |c, ctx| async move {
                c.config(ctx, &Empty::new()).await
            })
            .await?;
        this.config = convert::config_from_grpc(&msg)?;
        debug!(endpoint = %endpoint.display(), "connected to the VM-cache server");
        Ok(this)
    }

    /// The server's socket.
    pub fn endpoint(&self) -> &Path {
        &self.endpoint
    }

    async fn client(&self) -> Result<CacheServiceClient> {
        let mut conn = self.conn.lock().await;
        match &*conn {
            Conn::Connected(c) => Ok(c.clone()),
            Conn::Closed => Err(CacheServiceError::Closed {
                path: self.endpoint.clone(),
            }),
            Conn::Disconnected => {
                let c = dial(&self.endpoint).await?;
                *conn = Conn::Connected(c.clone());
                Ok(c)
            }
        }
    }

    /// Runs one RPC bounded by `timeout`; a broken connection is dropped so that the next call
    /// dials again (and fails with [`CacheServiceError::Connect`] if the server is gone).
    async fn call<T, F, Fut>(&self, method: &'static str, timeout: Duration, f: F) -> Result<T>
    where
        F: FnOnce(CacheServiceClient, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let client = self.client().await?;
        let nanos = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
        let ctx = ttrpc::context::with_timeout(nanos);
        match tokio::time::timeout(timeout, f(client, ctx)).await {
            Err(_) => Err(CacheServiceError::Timeout { method, timeout }),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) if is_connection_error(&source) => {
                let mut conn = self.conn.lock().await;
                if matches!(&*conn, Conn::Connected(_)) {
                    *conn = Conn::Disconnected;
                }
                Err(CacheServiceError::ServerGone {
                    path: self.endpoint.clone(),
                    method,
                    source: Box::new(source),
                })
            }
            Ok(Err(source)) => Err(CacheServiceError::Rpc {
                method,
                source: Box::new(source),
            }),
        }
    }

    /// Asks the server for a VM (`GetBaseVM`) and re-attaches to it.
    ///
    /// If re-attaching fails, the VM is released again (not stopped) and the error names it;
    /// its state stays in `<run_root>/vm/<id>/`.
    #[instrument(skip(self), fields(endpoint = %self.endpoint.display()))]
    pub async fn take_vm(&self) -> Result<Vm> {
        let msg = self
            .call("GetBaseVM", GET_BASE_VM_TIMEOUT, |c, ctx| async move {
                c.get_base_vm(ctx, &Empty::new()).await
            })
            .await?;
        let vm = Vm::from_wire_with(&msg.hypervisor, self.backends.as_ref())
            .await
            .map_err(|source| CacheServiceError::Attach {
                id: msg.id.clone(),
                source: Box::new(source),
            })?;
        info!(vm = %vm.id(), "VM taken from the VM-cache server");
        Ok(vm)
    }

    /// The server's pid and the VMs it holds ready (`Status`).
    pub async fn server_status(&self) -> Result<CacheStatus> {
        let msg = self
            .call("Status", CALL_TIMEOUT, |c, ctx| async move {
                c.status(ctx, &Empty::new()).await
            })
            .await?;
        Ok(CacheStatus {
            pid: u32::try_from(msg.pid).unwrap_or(0),
            vms: msg.vmstatus.iter().map(convert::status_from_grpc).collect(),
        })
    }

    /// Asks the server to stop (`Quit`); it answers first, then stops.
    pub async fn quit(&self) -> Result<()> {
        self.call("Quit", CALL_TIMEOUT, |c, ctx| async move {
            c.quit(ctx, &Empty::new()).await
        })
        .await?;
        *self.conn.lock().await = Conn::Disconnected;
        Ok(())
    }
}

#[async_trait]
impl FactoryBase for CacheClient {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    /// `config` is not sent: the server makes every VM from its own base config
    /// ([`FactoryBase::config`] here), as in Kata.
    /// Failures are [`BaseError::Other`] holding the [`CacheServiceError`].
    async fn get_base_vm(&self, _config: &VmConfig) -> std::result::Result<Vm, BaseError> {
        self.take_vm()
            .await
            .map_err(|e| BaseError::Other(Box::new(e)))
    }

    /// The server's cached VMs; empty (and logged) when the server cannot be asked.
    async fn status(&self) -> Vec<VmInfo> {
        match self.server_status().await {
            Ok(s) => s.vms,
            Err(e) => {
                warn!(error = %e, "VM-cache Status failed");
                Vec::new()
            }
        }
    }

    /// Disconnects; the server keeps running. Idempotent.
    async fn close(&self) -> std::result::Result<(), BaseError> {
        *self.conn.lock().await = Conn::Closed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;

    use vmfactory_hypervisor::VmStatus;

    use super::*;
    use crate::cache_service::CacheServer;
    use crate::testing::{cache_socket, FakeBase};
    use vmfactory_vm::FakeBackends;

    async fn client(backends: &Arc<FakeBackends>) -> CacheClient {
        CacheClient::connect_with(&cache_socket(backends), backends.clone())
            .await
            .expect("connect")
    }

    #[tokio::test]
    async fn config_vms_and_status_round_trip() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 3).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        let c = client(&backends).await;
        assert_eq!(FactoryBase::config(&c), &backends.config());

        let st = c.server_status().await.expect("status");
        assert_eq!(st.pid, std::process::id());
        assert_eq!(st.vms.len(), 3);
        assert!(st.vms.iter().all(|v| v.vcpus == 1 && v.memory_mib == 256));
        assert!(st.vms.iter().all(|v| v.state == VmStatus::Running));

        let a = c.get_base_vm(&backends.config()).await.expect("vm a");
        let b = c.get_base_vm(&backends.config()).await.expect("vm b");
        assert_ne!(a.id(), b.id());
        for vm in [&a, &b] {
            let info = vm.status().await.expect("re-attached VM answers");
            assert_eq!(info.state, VmStatus::Running);
            assert_eq!((info.vcpus, info.memory_mib), (1, 256));
            vm.add_cpus(1).await.expect("the client owns it");
        }
        let left: Vec<String> = FactoryBase::status(&c)
            .await
            .into_iter()
            .map(|v| v.id)
            .collect();
        assert_eq!(left.len(), 1);
        assert!(!left.contains(&a.id().to_owned()) && !left.contains(&b.id().to_owned()));

        a.stop().await.expect("stop a");
        b.stop().await.expect("stop b");
        server.shutdown().await.expect("shutdown");
        assert_eq!(backends.vm_dirs(), Vec::<PathBuf>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_clients_get_distinct_vms() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 2).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let socket = cache_socket(&backends);
            let backends = backends.clone();
            tasks.push(tokio::spawn(async move {
                let c = CacheClient::connect_with(&socket, backends)
                    .await
                    .expect("connect");
                let vm = c.take_vm().await.expect("vm");
                c.close().await.expect("close");
                vm
            }));
        }
        let mut vms = Vec::new();
        for t in tasks {
            vms.push(t.await.expect("task"));
        }
        let ids: HashSet<&str> = vms.iter().map(|v| v.id()).collect();
        assert_eq!(ids.len(), 8);
        assert_eq!(
            base.made.load(Ordering::SeqCst),
            8,
            "2 from the pool, 6 made"
        );
        for vm in &vms {
            vm.stop().await.expect("stop");
        }
        server.shutdown().await.expect("shutdown");
        assert_eq!(backends.vm_dirs(), Vec::<PathBuf>::new());
    }

    #[tokio::test]
    async fn template_clones_arrive_paused_and_resume() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.clone_config(), 1).await;
        let server = CacheServer::start(base, &cache_socket(&backends))
            .await
            .expect("start");
        let c = client(&backends).await;
        assert_eq!(
            c.server_status().await.expect("status").vms[0].state,
            VmStatus::Paused
        );
        let vm = c.take_vm().await.expect("vm");
        assert_eq!(vm.status().await.expect("status").state, VmStatus::Paused);
        vm.resume().await.expect("resume");
        assert_eq!(vm.status().await.expect("status").state, VmStatus::Running);
        vm.stop().await.expect("stop");
        server.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn quit_stops_the_server_and_clients_get_typed_errors() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 2).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        let c = client(&backends).await;
        let other = client(&backends).await;
        c.quit().await.expect("Quit is answered");
        server.wait().await.expect("stopped cleanly");
        assert!(server.is_stopped());
        assert!(!cache_socket(&backends).exists(), "socket removed");
        assert_eq!(base.closes.load(Ordering::SeqCst), 1);
        assert_eq!(
            backends.vm_dirs(),
            Vec::<PathBuf>::new(),
            "cached VMs stopped"
        );

        // A client still connected sees the server gone; the next call redials and fails.
        let err = other.take_vm().await.expect_err("server is gone");
        assert!(
            matches!(
                err,
                CacheServiceError::ServerGone { .. } | CacheServiceError::Connect { .. }
            ),
            "{err:?}"
        );
        assert!(matches!(
            other.server_status().await,
            Err(CacheServiceError::Connect { .. })
        ));
        assert!(FactoryBase::status(&other).await.is_empty());
        assert!(matches!(
            CacheClient::connect_with(&cache_socket(&backends), backends.clone()).await,
            Err(CacheServiceError::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn base_failure_is_an_rpc_error_and_close_only_disconnects() {
        let backends = Arc::new(FakeBackends::new());
        let base = FakeBase::new(&backends, backends.config(), 0).await;
        let server = CacheServer::start(base.clone(), &cache_socket(&backends))
            .await
            .expect("start");
        let c = client(&backends).await;
        base.fail.store(true, Ordering::SeqCst);
        let err = c.take_vm().await.expect_err("base fails");
        let CacheServiceError::Rpc {
            method: "GetBaseVM",
            source,
        } = &err
        else {
            panic!("unexpected {err:?}");
        };
        let ttrpc::Error::RpcStatus(status) = source.as_ref() else {
            panic!("unexpected {source:?}");
        };
        assert_eq!(status.code(), ttrpc::Code::INTERNAL);
        assert!(status.message().contains("injected"), "{status:?}");

        c.close().await.expect("close");
        c.close().await.expect("close is idempotent");
        assert!(matches!(
            c.server_status().await,
            Err(CacheServiceError::Closed { .. })
        ));
        assert!(matches!(
            c.get_base_vm(&backends.config()).await,
            Err(BaseError::Other(e))
                if matches!(e.downcast_ref(), Some(CacheServiceError::Closed { .. }))
        ));
        assert!(!server.is_stopped(), "close does not Quit the server");
        assert_eq!(base.closes.load(Ordering::SeqCst), 0);
        let again = client(&backends).await;
        again.server_status().await.expect("server still serves");
        server.shutdown().await.expect("shutdown");
    }
}
