//! The ttRPC services of the guest agent, on one [`GuestAgent`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use protobuf::well_known_types::empty::Empty;
use tracing::{info, instrument, warn};
use ttrpc::r#async::TtrpcContext;
use ttrpc::{get_status, Code};

use vmfactory_agent::protocols::{
    agent as pb, agent_ttrpc, diag, diag_ttrpc, health, health_ttrpc, template, template_ttrpc,
    types as tpb, workload as wl, workload_ttrpc,
};
use vmfactory_agent::types::{
    self, AgentDetails, ForkReseed, GuestDetails, HealthStatus, OnlineCpuMem, Uptime,
};
use vmfactory_agent::{ContainerSpec, CopyFileChunk, Interface, ProcessSpec, Route};

use super::config::GuestConfig;
use super::containers::{Containers, Env};
use super::fork::ForkBarrier;
use super::net::NetError;
use super::process::Processes;
use super::rpc_status::{invalid, net_status, status};
use super::storage::{Storages, DEVICE_TIMEOUT};
use super::{files, sysfs};
use crate::error::{Error, Result};

/// Largest `GetRandom` request served.
pub const MAX_RANDOM_LEN: u32 = 1 << 20;

/// Protocol version reported as `grpc_version`.
const GRPC_VERSION: &str = "ttrpc-0.10";

nix::ioctl_write_ptr_bad!(
    rnd_add_to_ent_cnt,
    nix::request_code_write!(b'R', 0x01, std::mem::size_of::<libc::c_int>()),
    libc::c_int
);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// The guest agent: implements `grpc.Health`, `grpc.AgentService` and our
/// `vmfactory.diag.Diagnostics`, `vmfactory.workload.Workload` and
/// `vmfactory.template.Template` over the guest described by a [`GuestConfig`].
#[derive(Debug)]
pub struct GuestAgent {
    cfg: GuestConfig,
    started: Instant,
    /// The random device, opened by the first reseed and kept: a template's clones then
    /// inherit it open instead of each walking the path again on `get_vm`'s path.
    random_dev: OnceLock<File>,
    procs: Arc<Processes>,
    storages: Arc<Storages>,
    containers: Arc<Containers>,
    /// Holds a template clone's clock call, processes and random reads until its kernel
    /// reseeded itself (see `fork.rs`).
    fork: Arc<ForkBarrier>,
}

impl GuestAgent {
    /// An agent over `cfg`; its uptime starts now.
    pub fn new(cfg: GuestConfig) -> Self {
        let fork = Arc::new(ForkBarrier::new(&cfg.paths));
        GuestAgent {
            cfg,
            started: Instant::now(),
            random_dev: OnceLock::new(),
            procs: Arc::default(),
            storages: Arc::default(),
            containers: Arc::default(),
            fork,
        }
    }

    /// The VM-fork barrier.
    pub fn fork_barrier(&self) -> &ForkBarrier {
        &self.fork
    }

    /// `ReadStdout` or `ReadStderr`.
    async fn read_stream(
        &self,
        method: &str,
        req: pb::ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        let data = self
            .procs
            .read(&req.container_id, &req.exec_id, stderr, req.len)
            .await
            .map_err(|e| status(method, e))?;
        Ok(pb::ReadStreamResponse {
            data,
            ..Default::default()
        })
    }

    /// What the container calls work with.
    fn env(&self) -> Env<'_> {
        Env {
            paths: &self.cfg.paths,
            procs: &self.procs,
            storages: &self.storages,
            device_timeout: DEVICE_TIMEOUT,
        }
    }

    /// The containers this agent made and still keeps.
    pub fn containers(&self) -> &Containers {
        &self.containers
    }

    /// The processes this agent started and still keeps.
    pub fn processes(&self) -> &Processes {
        &self.procs
    }

    /// Onlines CPUs and memory as `OnlineCPUMem` asks, waiting up to the configured timeout for
    /// hot-plugged CPUs to appear.
    pub async fn online_cpu_mem(&self, req: OnlineCpuMem) -> Result<()> {
        let paths = self.cfg.paths.clone();
        let deadline = Instant::now() + self.cfg.online_timeout;
        let mut onlined = 0;
        while onlined < req.nb_cpus {
            let p = paths.clone();
            let want = req.nb_cpus - onlined;
            onlined += blocking(move || sysfs::online_cpus(&p, want)).await?;
            if onlined >= req.nb_cpus {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::WaitTimeout {
                    what: format!("{} more CPUs to online", req.nb_cpus - onlined),
                    timeout: self.cfg.online_timeout,
                });
            }
            // Hot-plugged CPUs appear in sysfs asynchronously and nothing signals it.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !req.cpu_only {
            let mem = blocking(move || sysfs::online_memory(&paths)).await?;
            info!(cpus = onlined, memory_blocks = mem, "resources onlined");
        } else {
            info!(cpus = onlined, "cpus onlined");
        }
        Ok(())
    }

    /// Writes `data` to the random device, credits it and reseeds the CRNG.
    ///
    /// Runs on the async worker on purpose: opening, writing (mixing into the input pool) and
    /// these ioctls never block on Linux, and a trip through the blocking pool costs a thread
    /// wake-up or spawn, which under TCG was most of the call (reseed is on `get_vm`'s path).
    pub async fn reseed(&self, data: Vec<u8>) -> Result<()> {
        let dev = self.cfg.paths.dev.join("random");
        let mut f = match self.random_dev.get() {
            Some(f) => f,
            None => {
                let opened = OpenOptions::new()
                    .write(true)
                    .open(&dev)
                    .map_err(|e| Error::io("open", dev.display(), e))?;
                // Two first reseeds at once: one file is kept, the other closed.
                self.random_dev.get_or_init(|| opened)
            }
        };
        f.write_all(&data)
            .map_err(|e| Error::io("write", dev.display(), e))?;
        let bits = libc::c_int::try_from(data.len().saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is open for the whole call and the ioctl reads one c_int from a valid
        // pointer.
        unsafe { rnd_add_to_ent_cnt(f.as_raw_fd(), &bits) }
            .map_err(|e| Error::sys("RNDADDTOENTCNT", dev.display(), e))?;
        // SAFETY: the fd is open for the whole call and RNDRESEEDCRNG takes no argument.
        unsafe { rnd_reseed_crng(f.as_raw_fd()) }
            .map_err(|e| Error::sys("RNDRESEEDCRNG", dev.display(), e))?;
        Ok(())
    }

    /// Reads `len` bytes from the guest's urandom.
    pub async fn random(&self, len: u32) -> Result<Vec<u8>> {
        if len > MAX_RANDOM_LEN {
            return Err(Error::Unsupported("random reads over 1 MiB"));
        }
        let dev = self.cfg.paths.dev.join("urandom");
        blocking(move || {
            let mut buf = vec![0; len as usize];
            std::fs::File::open(&dev)
                .and_then(|mut f| f.read_exact(&mut buf))
                .map_err(|e| Error::io("read", dev.display(), e))?;
            Ok(buf)
        })
        .await
    }

    /// The guest details `GetGuestDetails` answers.
    pub async fn guest_details(&self, req: &pb::GuestDetailsRequest) -> Result<GuestDetails> {
        let mem_block_size_bytes = if req.mem_block_size {
            let paths = self.cfg.paths.clone();
            blocking(move || sysfs::memory_block_size(&paths)).await?
        } else {
            0
        };
        Ok(GuestDetails {
            mem_block_size_bytes,
            agent_details: Some(AgentDetails {
                version: vmfactory_agent::VERSION.to_owned(),
                init_daemon: self.cfg.init_daemon,
                ..Default::default()
            }),
            support_mem_hotplug_probe: false,
        })
    }
}

/// Runs a synchronous sysfs/devfs operation off the async workers.
/// How long CreateContainer waits for its disks: as long as its caller waits (less a margin,
/// so the caller gets this agent's one-line answer rather than its own timeout), else
/// [`DEVICE_TIMEOUT`]. A busy host (many VMs starting at once, a nested KVM host) can take
/// more than 10 s to hot-plug a disk; the host's call timeout is what its user set for that.
fn device_wait(timeout_nano: i64) -> std::time::Duration {
    const MARGIN: std::time::Duration = std::time::Duration::from_millis(500);
    match u64::try_from(timeout_nano) {
        Ok(n) if n > 0 => std::time::Duration::from_nanos(n)
            .saturating_sub(MARGIN)
            .max(std::time::Duration::from_secs(1)),
        _ => DEVICE_TIMEOUT,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("run", "blocking task", std::io::Error::other(e)))?
}

#[async_trait]
impl health_ttrpc::Health for GuestAgent {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        Ok(HealthStatus::Serving.into())
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        Ok(types::VersionInfo {
            grpc_version: GRPC_VERSION.to_owned(),
            agent_version: vmfactory_agent::VERSION.to_owned(),
        }
        .into())
    }
}

#[async_trait]
impl agent_ttrpc::AgentService for GuestAgent {
    #[instrument(level = "debug", skip_all, fields(wait = req.wait, nb_cpus = req.nb_cpus, cpu_only = req.cpu_only))]
    async fn online_cpu_mem(
        &self,
        _ctx: &TtrpcContext,
        req: pb::OnlineCPUMemRequest,
    ) -> ttrpc::Result<Empty> {
        let req = OnlineCpuMem::from(req);
        if req.nb_cpus == 0 && req.cpu_only {
            return Err(ttrpc::Error::RpcStatus(get_status(
                Code::INVALID_ARGUMENT,
                "nb_cpus is 0 and cpu_only is set: nothing to online",
            )));
        }
        if req.wait {
            self.online_cpu_mem(req)
                .await
                .map_err(|e| status("OnlineCPUMem", e))?;
        } else {
            let agent = GuestAgent {
                cfg: self.cfg.clone(),
                started: self.started,
                random_dev: OnceLock::new(),
                procs: self.procs.clone(),
                storages: self.storages.clone(),
                containers: self.containers.clone(),
                fork: self.fork.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = agent.online_cpu_mem(req).await {
                    warn!(error = %e, "background OnlineCPUMem failed");
                }
            });
        }
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(len = req.data.len()))]
    async fn reseed_random_dev(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReseedRandomDevRequest,
    ) -> ttrpc::Result<Empty> {
        self.reseed(req.data)
            .await
            .map_err(|e| status("ReseedRandomDev", e))?;
        // Host entropy makes a clone's CRNG its own as well as a VM-fork reseed does.
        self.fork.release();
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(sec = req.Sec, usec = req.Usec))]
    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        let nsec = u32::try_from(req.Usec)
            .ok()
            .filter(|us| *us < 1_000_000)
            .map(|us| us * 1000);
        let t = nsec
            .and_then(|n| types::from_sec_nsec(req.Sec, n))
            .ok_or_else(|| {
                ttrpc::Error::RpcStatus(get_status(Code::INVALID_ARGUMENT, "time out of range"))
            })?;
        // `get_vm`'s last guest call: once it is answered, a clone's CRNG is its own.
        self.fork
            .wait()
            .await
            .map_err(|e| status("SetGuestDateTime", e))?;
        self.cfg
            .clock
            .set(t)
            .map_err(|e| status("SetGuestDateTime", e))?;
        Ok(Empty::new())
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        req: pb::GuestDetailsRequest,
    ) -> ttrpc::Result<pb::GuestDetailsResponse> {
        self.guest_details(&req)
            .await
            .map(Into::into)
            .map_err(|e| status("GetGuestDetails", e))
    }

    #[instrument(level = "debug", skip_all, fields(container_id = %req.container_id))]
    async fn create_container(
        &self,
        ctx: &TtrpcContext,
        req: pb::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.fork
            .wait()
            .await
            .map_err(|e| status("CreateContainer", e))?;
        let spec = ContainerSpec::from(req.OCI.into_option().unwrap_or_default());
        let storages = req.storages.into_iter().map(Into::into).collect();
        let mut env = self.env();
        env.device_timeout = device_wait(ctx.timeout_nano);
        self.containers
            .create(env, &req.container_id, &req.exec_id, storages, spec)
            .await
            .map_err(|e| status("CreateContainer", e))?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(container_id = %req.container_id))]
    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.containers
            .start(&req.container_id)
            .await
            .map_err(|e| status("StartContainer", e))?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all, fields(container_id = %req.container_id))]
    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        let timeout = (req.timeout > 0).then(|| Duration::from_secs(req.timeout.into()));
        self.containers
            .remove(self.env(), &req.container_id, timeout)
            .await
            .map_err(|e| status("RemoveContainer", e))?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: pb::StatsContainerRequest,
    ) -> ttrpc::Result<pb::StatsContainerResponse> {
        let st = self
            .containers
            .stats(&req.container_id)
            .await
            .map_err(|e| status("StatsContainer", e))?;
        Ok((&st).into())
    }

    #[instrument(level = "debug", skip_all, fields(exec_id = %req.exec_id))]
    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.fork
            .wait()
            .await
            .map_err(|e| status("ExecProcess", e))?;
        let mut spec = ProcessSpec::from(req.process.into_option().unwrap_or_default());
        spec.container_id = req.container_id.clone();
        let res = if req.container_id.is_empty() {
            self.procs
                .exec(&req.exec_id, spec, &self.cfg.paths.root)
                .await
        } else {
            self.containers
                .exec(
                    &self.procs,
                    &self.cfg.paths,
                    &req.container_id,
                    &req.exec_id,
                    spec,
                )
                .await
        };
        res.map_err(|e| status("ExecProcess", e))?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WaitProcessRequest,
    ) -> ttrpc::Result<pb::WaitProcessResponse> {
        let st = self
            .procs
            .wait(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| status("WaitProcess", e))?;
        Ok(pb::WaitProcessResponse {
            status: st.to_wire(),
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: pb::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        let res = if !req.container_id.is_empty() && req.exec_id.is_empty() {
            self.containers.signal_all(&req.container_id, req.signal)
        } else {
            self.procs
                .signal(&req.container_id, &req.exec_id, req.signal)
        };
        res.map_err(|e| status("SignalProcess", e))?;
        Ok(Empty::new())
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::WriteStreamRequest,
    ) -> ttrpc::Result<pb::WriteStreamResponse> {
        let n = self
            .procs
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await
            .map_err(|e| status("WriteStdin", e))?;
        Ok(pb::WriteStreamResponse {
            len: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read_stream("ReadStdout", req, false).await
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: pb::ReadStreamRequest,
    ) -> ttrpc::Result<pb::ReadStreamResponse> {
        self.read_stream("ReadStderr", req, true).await
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.procs
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map_err(|e| status("CloseStdin", e))?;
        Ok(Empty::new())
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: pb::TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        self.procs
            .resize(&req.container_id, &req.exec_id, req.row, req.column)
            .map_err(|e| status("TtyWinResize", e))?;
        Ok(Empty::new())
    }

    #[instrument(level = "debug", skip_all)]
    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateInterfaceRequest,
    ) -> ttrpc::Result<tpb::Interface> {
        const M: &str = "UpdateInterface";
        let iface = Interface::try_from(req.interface.into_option().unwrap_or_default())
            .map_err(|e| invalid(e.to_owned()))?;
        let cfg = iface
            .validate()
            .map_err(|e| net_status(M, NetError::from(e)))?;
        let got = self
            .cfg
            .net
            .update_interface(&cfg)
            .await
            .map_err(|e| net_status(M, e))?;
        Ok((&got).into())
    }

    #[instrument(level = "debug", skip_all)]
    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: pb::UpdateRoutesRequest,
    ) -> ttrpc::Result<pb::Routes> {
        const M: &str = "UpdateRoutes";
        let routes = Vec::<Route>::try_from(req.routes.into_option().unwrap_or_default())
            .map_err(|e| invalid(e.to_owned()))?;
        let cfgs = routes
            .iter()
            .map(Route::validate)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| net_status(M, NetError::from(e)))?;
        let got = self
            .cfg
            .net
            .update_routes(&cfgs)
            .await
            .map_err(|e| net_status(M, e))?;
        Ok(got.as_slice().into())
    }

    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ListInterfacesRequest,
    ) -> ttrpc::Result<pb::Interfaces> {
        let got = self
            .cfg
            .net
            .list_interfaces()
            .await
            .map_err(|e| net_status("ListInterfaces", e))?;
        Ok(got.as_slice().into())
    }

    async fn list_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: pb::ListRoutesRequest,
    ) -> ttrpc::Result<pb::Routes> {
        let got = self
            .cfg
            .net
            .list_routes()
            .await
            .map_err(|e| net_status("ListRoutes", e))?;
        Ok(got.as_slice().into())
    }

    #[instrument(level = "debug", skip_all, fields(path = %req.path, offset = req.offset))]
    async fn copy_file(
        &self,
        _ctx: &TtrpcContext,
        req: pb::CopyFileRequest,
    ) -> ttrpc::Result<Empty> {
        let chunk = CopyFileChunk::try_from(req).map_err(|e| invalid(e.to_owned()))?;
        let root = self.cfg.paths.root.clone();
        blocking(move || files::copy_chunk(&root, &chunk))
            .await
            .map_err(|e| status("CopyFile", e))?;
        Ok(Empty::new())
    }
}

#[async_trait]
impl workload_ttrpc::Workload for GuestAgent {
    async fn read_file(
        &self,
        _ctx: &TtrpcContext,
        req: wl::ReadFileRequest,
    ) -> ttrpc::Result<wl::ReadFileResponse> {
        let root = self.cfg.paths.root.clone();
        blocking(move || files::read_chunk(&root, &req.path, req.offset, req.len))
            .await
            .map(Into::into)
            .map_err(|e| status("ReadFile", e))
    }

    #[instrument(level = "debug", skip_all)]
    async fn add_storage(
        &self,
        _ctx: &TtrpcContext,
        req: wl::AddStorageRequest,
    ) -> ttrpc::Result<Empty> {
        let storage = req.storage.into_option().unwrap_or_default().into();
        self.storages
            .add(&self.cfg.paths, storage, DEVICE_TIMEOUT)
            .await
            .map_err(|e| status("AddStorage", e))?;
        Ok(Empty::new())
    }

    async fn list_container_pids(
        &self,
        _ctx: &TtrpcContext,
        req: wl::ListContainerPidsRequest,
    ) -> ttrpc::Result<wl::ListContainerPidsResponse> {
        let pids = self
            .containers
            .pids(&req.container_id)
            .await
            .map_err(|e| status("ListContainerPids", e))?;
        Ok(wl::ListContainerPidsResponse {
            pids,
            ..Default::default()
        })
    }

    async fn remove_storage(
        &self,
        _ctx: &TtrpcContext,
        req: wl::RemoveStorageRequest,
    ) -> ttrpc::Result<Empty> {
        self.storages
            .remove(&self.cfg.paths, &req.mount_point)
            .await
            .map_err(|e| status("RemoveStorage", e))?;
        Ok(Empty::new())
    }
}

#[async_trait]
impl template_ttrpc::Template for GuestAgent {
    async fn prepare_template(
        &self,
        _ctx: &TtrpcContext,
        _req: template::PrepareTemplateRequest,
    ) -> ttrpc::Result<template::PrepareTemplateResponse> {
        let answer = self.fork.arm(&self.cfg.paths);
        info!(?answer, "prepared for a template save");
        let (reseeds_on_fork, reason) = match answer {
            ForkReseed::Active => (true, String::new()),
            ForkReseed::Inactive(reason) => (false, reason),
        };
        Ok(template::PrepareTemplateResponse {
            reseeds_on_fork,
            reason,
            ..Default::default()
        })
    }
}

#[async_trait]
impl diag_ttrpc::Diagnostics for GuestAgent {
    async fn get_random(
        &self,
        _ctx: &TtrpcContext,
        req: diag::RandomRequest,
    ) -> ttrpc::Result<diag::RandomResponse> {
        self.fork.wait().await.map_err(|e| status("GetRandom", e))?;
        let data = self
            .random(req.len)
            .await
            .map_err(|e| status("GetRandom", e))?;
        Ok(diag::RandomResponse {
            data,
            ..Default::default()
        })
    }

    async fn get_time(
        &self,
        _ctx: &TtrpcContext,
        _req: diag::TimeRequest,
    ) -> ttrpc::Result<diag::TimeResponse> {
        let d = self
            .cfg
            .clock
            .now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(diag::TimeResponse {
            sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nsec: d.subsec_nanos(),
            ..Default::default()
        })
    }

    async fn get_resources(
        &self,
        _ctx: &TtrpcContext,
        _req: diag::ResourcesRequest,
    ) -> ttrpc::Result<diag::ResourcesResponse> {
        let paths = self.cfg.paths.clone();
        blocking(move || sysfs::resources(&paths))
            .await
            .map(Into::into)
            .map_err(|e| status("GetResources", e))
    }

    async fn uptime(
        &self,
        _ctx: &TtrpcContext,
        _req: diag::UptimeRequest,
    ) -> ttrpc::Result<diag::UptimeResponse> {
        let paths = self.cfg.paths.clone();
        let system = blocking(move || sysfs::system_uptime(&paths))
            .await
            .map_err(|e| status("Uptime", e))?;
        Ok(Uptime {
            agent: self.started.elapsed(),
            system,
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_device_wait_follows_the_callers_deadline() {
        use std::time::Duration;
        assert_eq!(super::device_wait(0), super::DEVICE_TIMEOUT);
        assert_eq!(super::device_wait(-1), super::DEVICE_TIMEOUT);
        assert_eq!(
            super::device_wait(60_000_000_000),
            Duration::from_millis(59_500)
        );
        assert_eq!(super::device_wait(1_000_000), Duration::from_secs(1));
    }

    use super::*;

    fn agent_over(dev: &std::path::Path) -> GuestAgent {
        let mut cfg = GuestConfig::default();
        cfg.paths.dev = dev.to_owned();
        GuestAgent::new(cfg)
    }

    #[tokio::test]
    async fn reseed_opens_the_random_device_once_and_keeps_it() {
        let dev = tempfile::tempdir().expect("tempdir");
        let agent = agent_over(dev.path());
        // No device yet: an open error, and nothing is kept.
        let err = agent.reseed(vec![1, 2]).await.expect_err("no device");
        assert!(err.to_string().contains("open"), "{err}");
        // A plain file stands in for the device: the data is written, then the entropy ioctl
        // fails (a file is no random device).
        let random = dev.path().join("random");
        std::fs::write(&random, b"").expect("file");
        agent.reseed(vec![1, 2]).await.expect_err("ioctl on a file");
        agent.reseed(vec![3]).await.expect_err("ioctl on a file");
        // The second write went on where the first ended: the same open file, not a reopen.
        assert_eq!(std::fs::read(&random).expect("read"), [1, 2, 3]);
    }
}
