//! The host side: [`KataAgent`], the ttRPC implementation of the [`Agent`] trait.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tracing::{debug, instrument};

pub use crate::agent::Agent;
use crate::container::{ContainerSpec, ContainerStats};
use crate::convert;
use crate::error::{Error, Result};
use crate::net::{Interface, Route};
use crate::protocols::{
    agent as pb, agent_ttrpc, diag, diag_ttrpc, health, health_ttrpc, template, template_ttrpc,
    workload as wl, workload_ttrpc,
};
use crate::transport;
use crate::types::{
    self, ForkReseed, GuestDetails, HealthStatus, OnlineCpuMem, Resources, Uptime, VersionInfo,
};
use crate::url::AgentUrl;
use crate::workload::{CopyFileChunk, ExitStatus, FileChunk, ProcessSpec, Storage};

/// Default per-call timeout of [`KataAgent`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients of the three services over one ttRPC connection.
#[derive(Clone)]
struct Clients {
    health: health_ttrpc::HealthClient,
    agent: agent_ttrpc::AgentServiceClient,
    diag: diag_ttrpc::DiagnosticsClient,
    workload: workload_ttrpc::WorkloadClient,
    template: template_ttrpc::TemplateClient,
}

impl Clients {
    fn new(client: ttrpc::r#async::Client) -> Self {
        Clients {
            health: health_ttrpc::HealthClient::new(client.clone()),
            agent: agent_ttrpc::AgentServiceClient::new(client.clone()),
            diag: diag_ttrpc::DiagnosticsClient::new(client.clone()),
            workload: workload_ttrpc::WorkloadClient::new(client.clone()),
            template: template_ttrpc::TemplateClient::new(client),
        }
    }
}

/// Connection state of a [`KataAgent`].
#[derive(Clone)]
enum Conn {
    Disconnected,
    Connected(Arc<Clients>),
}

/// Timeouts of a [`KataAgent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentConfig {
    /// Bound on each RPC.
    pub call_timeout: Duration,
    /// How long dialing retries before giving up.
    pub dial_timeout: Duration,
}

impl AgentConfig {
    /// Timeouts of `call_timeout` per RPC and `dial_timeout` for dialing.
    pub fn new(call_timeout: Duration, dial_timeout: Duration) -> Self {
        Self {
            call_timeout,
            dial_timeout,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            call_timeout: DEFAULT_CALL_TIMEOUT,
            dial_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

/// The Kata agent protocol over ttRPC, on any [`AgentUrl`] transport.
pub struct KataAgent {
    url: AgentUrl,
    cfg: AgentConfig,
    conn: Mutex<Conn>,
}

impl fmt::Debug for KataAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KataAgent")
            .field("url", &self.url)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl KataAgent {
    /// An agent at `url` (a `&str` or an [`AgentUrl`]) whose calls and dials are bounded by
    /// `timeout`. Does not connect.
    pub fn new<U>(url: U, timeout: Duration) -> Result<Self>
    where
        U: TryInto<AgentUrl, Error = Error>,
    {
        Ok(Self::with_config(
            url.try_into()?,
            AgentConfig {
                call_timeout: timeout,
                dial_timeout: timeout,
            },
        ))
    }

    /// An agent at `url` with explicit timeouts. Does not connect.
    pub fn with_config(url: AgentUrl, cfg: AgentConfig) -> Self {
        KataAgent {
            url,
            cfg,
            conn: Mutex::new(Conn::Disconnected),
        }
    }

    /// An agent already connected over `stream` (a socketpair, a pty, an accepted socket).
    /// After [`Agent::disconnect`] it dials `url` like any other agent. Must be called inside a
    /// tokio runtime.
    pub fn with_stream<S>(url: AgentUrl, cfg: AgentConfig, stream: S) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Sync + 'static,
    {
        let socket = ttrpc::asynchronous::transport::Socket::new(stream);
        let clients = Arc::new(Clients::new(ttrpc::r#async::Client::new(socket)));
        KataAgent {
            url,
            cfg,
            conn: Mutex::new(Conn::Connected(clients)),
        }
    }

    /// The agent's URL.
    pub fn url(&self) -> &AgentUrl {
        &self.url
    }

    /// The agent's timeouts.
    pub fn config(&self) -> AgentConfig {
        self.cfg
    }

    /// True when a connection is open.
    pub async fn is_connected(&self) -> bool {
        matches!(*self.conn.lock().await, Conn::Connected(_))
    }

    async fn clients(&self) -> Result<Arc<Clients>> {
        let mut conn = self.conn.lock().await;
        if let Conn::Connected(c) = &*conn {
            return Ok(c.clone());
        }
        let socket = transport::dial(&self.url, self.cfg.dial_timeout).await?;
        let clients = Arc::new(Clients::new(ttrpc::r#async::Client::new(socket)));
        *conn = Conn::Connected(clients.clone());
        debug!(url = %self.url, "agent connection open");
        Ok(clients)
    }

    /// Runs one RPC with the per-call timeout; a broken connection is dropped so that the next
    /// call dials again.
    async fn call<T, F, Fut>(&self, method: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Clients>, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        self.call_bounded(method, Some(self.cfg.call_timeout), f)
            .await
    }

    /// Runs one RPC that may wait for the guest as long as it takes (a process's exit, its
    /// next output): no deadline, but a lost connection still ends it.
    async fn call_unbounded<T, F, Fut>(&self, method: &'static str, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Clients>, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        self.call_bounded(method, None, f).await
    }

    async fn call_bounded<T, F, Fut>(
        &self,
        method: &'static str,
        timeout: Option<Duration>,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(Arc<Clients>, ttrpc::context::Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let clients = self.clients().await?;
        let res = match timeout {
            Some(timeout) => {
                let nanos = i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX);
                let ctx = ttrpc::context::with_timeout(nanos);
                tokio::time::timeout(timeout, f(clients.clone(), ctx)).await
            }
            None => Ok(f(clients.clone(), ttrpc::context::with_timeout(0)).await),
        };
        let timeout = timeout.unwrap_or_default();
        match res {
            Ok(Ok(v)) => Ok(v),
            Err(_) => Err(Error::Timeout { method, timeout }),
            Ok(Err(source)) => {
                if is_deadline(&source) {
                    return Err(Error::Timeout { method, timeout });
                }
                if is_connection_error(&source) {
                    let mut conn = self.conn.lock().await;
                    if matches!(&*conn, Conn::Connected(c) if Arc::ptr_eq(c, &clients)) {
                        debug!(url = %self.url, error = %source, "agent connection lost");
                        *conn = Conn::Disconnected;
                    }
                }
                Err(Error::Rpc { method, source })
            }
        }
    }
}

impl KataAgent {
    /// `ReadStdout` or `ReadStderr`: no deadline, the next output may be far off.
    async fn read_stream(
        &self,
        container_id: &str,
        exec_id: &str,
        len: u32,
        stderr: bool,
    ) -> Result<Vec<u8>> {
        let req = pb::ReadStreamRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            len: len.min(crate::workload::MAX_CHUNK),
            ..Default::default()
        };
        let method = if stderr { "ReadStderr" } else { "ReadStdout" };
        let resp = self
            .call_unbounded(method, |c, ctx| async move {
                if stderr {
                    c.agent.read_stderr(ctx, &req).await
                } else {
                    c.agent.read_stdout(ctx, &req).await
                }
            })
            .await?;
        Ok(resp.data)
    }
}

fn invalid(method: &'static str, reason: &str) -> Error {
    Error::InvalidResponse {
        method,
        reason: reason.to_owned(),
    }
}

/// ttRPC's own client-side deadline (not a DEADLINE_EXCEEDED status sent by the guest, which
/// stays an [`Error::Rpc`]).
fn is_deadline(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Others(m) if m.contains("deadline elapsed"))
}

/// Whether a ttRPC call failed because its connection is gone (socket error, closed, EOF), so
/// that the caller should drop the connection and dial again. Shared by every ttRPC client of
/// the workspace (the agent here, the VM-cache client in the factory crate).
pub fn is_connection_error(e: &ttrpc::Error) -> bool {
    matches!(
        e,
        ttrpc::Error::Socket(_)
            | ttrpc::Error::LocalClosed
            | ttrpc::Error::RemoteClosed
            | ttrpc::Error::Eof
            | ttrpc::Error::Nix(_)
    )
}

#[async_trait]
impl Agent for KataAgent {
    async fn connect(&self) -> Result<()> {
        self.clients().await.map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn check(&self) -> Result<HealthStatus> {
        let req = health::CheckRequest::new();
        let resp = self
            .call(
                "Check",
                |c, ctx| async move { c.health.check(ctx, &req).await },
            )
            .await?;
        Ok(resp.status.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn version(&self) -> Result<VersionInfo> {
        let req = health::CheckRequest::new();
        let resp = self
            .call("Version", |c, ctx| async move {
                c.health.version(ctx, &req).await
            })
            .await?;
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn online_cpu_mem(&self, wait: bool, nb_cpus: u32, cpu_only: bool) -> Result<()> {
        let req: pb::OnlineCPUMemRequest = OnlineCpuMem {
            wait,
            nb_cpus,
            cpu_only,
        }
        .into();
        self.call("OnlineCPUMem", |c, ctx| async move {
            c.agent.online_cpu_mem(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip_all, fields(url = %self.url, len = data.len()))]
    async fn reseed_random_dev(&self, data: &[u8]) -> Result<()> {
        let req = convert::reseed_request(data);
        self.call("ReseedRandomDev", |c, ctx| async move {
            c.agent.reseed_random_dev(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn set_guest_date_time(&self, t: SystemTime) -> Result<()> {
        let (sec, usec) = types::to_sec_usec(t);
        let req = convert::set_time_request(sec, usec);
        self.call("SetGuestDateTime", |c, ctx| async move {
            c.agent.set_guest_date_time(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn sync_guest_clock(&self) -> Result<Duration> {
        self.call("SetGuestDateTime", |c, ctx| async move {
            let sent = Instant::now();
            let (sec, usec) = types::to_sec_usec(SystemTime::now());
            let req = convert::set_time_request(sec, usec);
            c.agent.set_guest_date_time(ctx, &req).await?;
            Ok(sent.elapsed())
        })
        .await
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn get_guest_details(&self) -> Result<GuestDetails> {
        let req = pb::GuestDetailsRequest {
            mem_block_size: true,
            mem_hotplug_probe: true,
            ..Default::default()
        };
        let resp = self
            .call("GetGuestDetails", |c, ctx| async move {
                c.agent.get_guest_details(ctx, &req).await
            })
            .await?;
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn random(&self, len: u32) -> Result<Vec<u8>> {
        let req = diag::RandomRequest {
            len,
            ..Default::default()
        };
        let resp = self
            .call("GetRandom", |c, ctx| async move {
                c.diag.get_random(ctx, &req).await
            })
            .await?;
        if resp.data.len() != len as usize {
            return Err(Error::InvalidResponse {
                method: "GetRandom",
                reason: format!("asked {len} bytes, got {}", resp.data.len()),
            });
        }
        Ok(resp.data)
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn guest_time(&self) -> Result<SystemTime> {
        let req = diag::TimeRequest::new();
        let resp = self
            .call("GetTime", |c, ctx| async move {
                c.diag.get_time(ctx, &req).await
            })
            .await?;
        types::from_sec_nsec(resp.sec, resp.nsec).ok_or_else(|| Error::InvalidResponse {
            method: "GetTime",
            reason: format!("time out of range: {}s {}ns", resp.sec, resp.nsec),
        })
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn resources(&self) -> Result<Resources> {
        let req = diag::ResourcesRequest::new();
        let resp = self
            .call("GetResources", |c, ctx| async move {
                c.diag.get_resources(ctx, &req).await
            })
            .await?;
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn uptime(&self) -> Result<Uptime> {
        let req = diag::UptimeRequest::new();
        let resp = self
            .call(
                "Uptime",
                |c, ctx| async move { c.diag.uptime(ctx, &req).await },
            )
            .await?;
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn prepare_template(&self) -> Result<ForkReseed> {
        let req = template::PrepareTemplateRequest::new();
        let res = self
            .call("PrepareTemplate", |c, ctx| async move {
                c.template.prepare_template(ctx, &req).await
            })
            .await;
        match res {
            Ok(resp) if resp.reseeds_on_fork => Ok(ForkReseed::Active),
            Ok(resp) => Ok(ForkReseed::Inactive(resp.reason)),
            // No such service: Go's ttrpc (Kata's agent) says UNIMPLEMENTED, Rust's (an older
            // vmfactory-agent) INVALID_ARGUMENT; the request has no field to be invalid.
            Err(Error::Rpc {
                source: ttrpc::Error::RpcStatus(st),
                ..
            }) if matches!(
                st.code(),
                ttrpc::Code::UNIMPLEMENTED | ttrpc::Code::INVALID_ARGUMENT
            ) =>
            {
                Ok(ForkReseed::Inactive(
                    "the agent has no PrepareTemplate".into(),
                ))
            }
            Err(e) => Err(e),
        }
    }

    #[instrument(skip_all, fields(url = %self.url, container_id, storages = storages.len()))]
    async fn create_container(
        &self,
        container_id: &str,
        storages: &[Storage],
        spec: &ContainerSpec,
    ) -> Result<()> {
        let req = convert::create_container_request(container_id, storages, spec);
        self.call("CreateContainer", |c, ctx| async move {
            c.agent.create_container(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn start_container(&self, container_id: &str) -> Result<()> {
        let req = pb::StartContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        self.call("StartContainer", |c, ctx| async move {
            c.agent.start_container(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn remove_container(&self, container_id: &str, timeout: Duration) -> Result<()> {
        let secs = u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX);
        let req = pb::RemoveContainerRequest {
            container_id: container_id.to_owned(),
            // A bound under a second is a second: 0 would mean none.
            timeout: if timeout.is_zero() { 0 } else { secs.max(1) },
            ..Default::default()
        };
        // The guest's own bound plus the usual call time.
        let bound = (!timeout.is_zero()).then(|| timeout + self.cfg.call_timeout);
        self.call_bounded("RemoveContainer", bound, |c, ctx| async move {
            c.agent.remove_container(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats> {
        let req = pb::StatsContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let resp = self
            .call("StatsContainer", |c, ctx| async move {
                c.agent.stats_container(ctx, &req).await
            })
            .await?;
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn container_pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = wl::ListContainerPidsRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let resp = self
            .call("ListContainerPids", |c, ctx| async move {
                c.workload.list_container_pids(ctx, &req).await
            })
            .await?;
        Ok(resp.pids)
    }

    #[instrument(skip_all, fields(url = %self.url, container_id = %spec.container_id, exec_id, args = ?spec.args))]
    async fn exec_process(&self, exec_id: &str, spec: &ProcessSpec) -> Result<()> {
        let req = convert::exec_request(exec_id, spec);
        self.call("ExecProcess", |c, ctx| async move {
            c.agent.exec_process(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<ExitStatus> {
        let req = pb::WaitProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        let resp = self
            .call_unbounded("WaitProcess", |c, ctx| async move {
                c.agent.wait_process(ctx, &req).await
            })
            .await?;
        Ok(ExitStatus::from_wire(resp.status))
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let req = pb::SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            ..Default::default()
        };
        self.call("SignalProcess", |c, ctx| async move {
            c.agent.signal_process(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(level = "trace", skip(self, data), fields(url = %self.url, len = data.len()))]
    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        // The agent answers once the pipe took the bytes: a process that does not read holds
        // the writer, which is the back-pressure wanted.
        for chunk in data.chunks(crate::workload::MAX_CHUNK as usize) {
            let req = pb::WriteStreamRequest {
                container_id: container_id.to_owned(),
                exec_id: exec_id.to_owned(),
                data: chunk.to_vec(),
                ..Default::default()
            };
            let resp = self
                .call_unbounded("WriteStdin", |c, ctx| async move {
                    c.agent.write_stdin(ctx, &req).await
                })
                .await?;
            if resp.len as usize != chunk.len() {
                return Err(Error::InvalidResponse {
                    method: "WriteStdin",
                    reason: format!("wrote {} of {} bytes", resp.len, chunk.len()),
                });
            }
        }
        Ok(())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = pb::CloseStdinRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.call("CloseStdin", |c, ctx| async move {
            c.agent.close_stdin(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(level = "trace", skip(self), fields(url = %self.url))]
    async fn read_stdout(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>> {
        self.read_stream(container_id, exec_id, len, false).await
    }

    #[instrument(level = "trace", skip(self), fields(url = %self.url))]
    async fn read_stderr(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>> {
        self.read_stream(container_id, exec_id, len, true).await
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<()> {
        let req = pb::TtyWinResizeRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            row: rows,
            column: cols,
            ..Default::default()
        };
        self.call("TtyWinResize", |c, ctx| async move {
            c.agent.tty_win_resize(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip_all, fields(url = %self.url, path = %chunk.path, offset = chunk.offset, len = chunk.data.len()))]
    async fn copy_file(&self, chunk: &CopyFileChunk) -> Result<()> {
        let req = pb::CopyFileRequest::from(chunk);
        self.call("CopyFile", |c, ctx| async move {
            c.agent.copy_file(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn read_file(&self, path: &str, offset: u64, len: u32) -> Result<FileChunk> {
        let req = wl::ReadFileRequest {
            path: path.to_owned(),
            offset,
            len,
            ..Default::default()
        };
        let resp = self
            .call("ReadFile", |c, ctx| async move {
                c.workload.read_file(ctx, &req).await
            })
            .await?;
        if resp.data.len() > len as usize {
            return Err(Error::InvalidResponse {
                method: "ReadFile",
                reason: format!("asked {len} bytes, got {}", resp.data.len()),
            });
        }
        Ok(resp.into())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn add_storage(&self, storage: &Storage) -> Result<()> {
        let req = wl::AddStorageRequest {
            storage: protobuf::MessageField::some(storage.into()),
            ..Default::default()
        };
        self.call("AddStorage", |c, ctx| async move {
            c.workload.add_storage(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn remove_storage(&self, mount_point: &str) -> Result<()> {
        let req = wl::RemoveStorageRequest {
            mount_point: mount_point.to_owned(),
            ..Default::default()
        };
        self.call("RemoveStorage", |c, ctx| async move {
            c.workload.remove_storage(ctx, &req).await
        })
        .await
        .map(|_| ())
    }

    #[instrument(skip_all, fields(url = %self.url, hw_addr = %iface.hw_addr, name = %iface.name))]
    async fn update_interface(&self, iface: &Interface) -> Result<Interface> {
        let req = pb::UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(iface.into()),
            ..Default::default()
        };
        let resp = self
            .call("UpdateInterface", |c, ctx| async move {
                c.agent.update_interface(ctx, &req).await
            })
            .await?;
        Interface::try_from(resp).map_err(|reason| invalid("UpdateInterface", reason))
    }

    #[instrument(skip_all, fields(url = %self.url, routes = routes.len()))]
    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>> {
        let req = pb::UpdateRoutesRequest {
            routes: protobuf::MessageField::some(routes.into()),
            ..Default::default()
        };
        let resp = self
            .call("UpdateRoutes", |c, ctx| async move {
                c.agent.update_routes(ctx, &req).await
            })
            .await?;
        Vec::try_from(resp).map_err(|reason| invalid("UpdateRoutes", reason))
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn list_interfaces(&self) -> Result<Vec<Interface>> {
        let req = pb::ListInterfacesRequest::new();
        let resp = self
            .call("ListInterfaces", |c, ctx| async move {
                c.agent.list_interfaces(ctx, &req).await
            })
            .await?;
        Vec::try_from(resp).map_err(|reason| invalid("ListInterfaces", reason))
    }

    #[instrument(skip(self), fields(url = %self.url))]
    async fn list_routes(&self) -> Result<Vec<Route>> {
        let req = pb::ListRoutesRequest::new();
        let resp = self
            .call("ListRoutes", |c, ctx| async move {
                c.agent.list_routes(ctx, &req).await
            })
            .await?;
        Vec::try_from(resp).map_err(|reason| invalid("ListRoutes", reason))
    }

    async fn disconnect(&self) -> Result<()> {
        let mut conn = self.conn.lock().await;
        if let Conn::Connected(_) = std::mem::replace(&mut *conn, Conn::Disconnected) {
            debug!(url = %self.url, "agent connection closed");
        }
        Ok(())
    }

    async fn reuse_agent(&self, other: &dyn Agent) -> Result<()> {
        let other = other
            .as_any()
            .downcast_ref::<KataAgent>()
            .ok_or(Error::Unsupported(
                "reusing the connection of a non-ttRPC agent",
            ))?;
        if std::ptr::eq(self, other) {
            return Ok(());
        }
        let theirs = other.conn.lock().await.clone();
        *self.conn.lock().await = theirs;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
