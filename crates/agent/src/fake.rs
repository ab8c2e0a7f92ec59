//! [`FakeAgent`]: an in-memory [`Agent`] for other crates' unit tests (feature `test-utils`).

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::client::Agent;
use crate::container::{ContainerSpec, ContainerStats};
use crate::error::{Error, Result};
use crate::net::{Interface, Route};
use crate::types::{
    AgentDetails, ForkReseed, GuestDetails, HealthStatus, Resources, Uptime, VersionInfo,
};
use crate::workload::{CopyFileChunk, ExitStatus, FileChunk, ProcessSpec, Storage};

mod net;
mod workload;
use net::FakeNetwork;
use workload::FakeGuest;

/// One call recorded by a [`FakeAgent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// [`Agent::connect`].
    Connect,
    /// [`Agent::check`].
    Check,
    /// [`Agent::version`].
    Version,
    /// [`Agent::online_cpu_mem`].
    OnlineCpuMem {
        /// `wait` argument.
        wait: bool,
        /// `nb_cpus` argument.
        nb_cpus: u32,
        /// `cpu_only` argument.
        cpu_only: bool,
    },
    /// [`Agent::reseed_random_dev`] with its data.
    ReseedRandomDev(Vec<u8>),
    /// [`Agent::set_guest_date_time`] or [`Agent::sync_guest_clock`] with the time sent.
    SetGuestDateTime(SystemTime),
    /// [`Agent::get_guest_details`].
    GetGuestDetails,
    /// [`Agent::random`] with its length.
    Random(u32),
    /// [`Agent::guest_time`].
    GuestTime,
    /// [`Agent::resources`].
    Resources,
    /// [`Agent::uptime`].
    Uptime,
    /// [`Agent::create_container`] with the container id and its storages.
    CreateContainer(String, Vec<Storage>),
    /// [`Agent::start_container`].
    StartContainer(String),
    /// [`Agent::remove_container`].
    RemoveContainer(String),
    /// [`Agent::stats_container`].
    StatsContainer(String),
    /// [`Agent::container_pids`].
    ContainerPids(String),
    /// [`Agent::exec_process`] with its exec id and arguments.
    ExecProcess(String, Vec<String>),
    /// [`Agent::wait_process`].
    WaitProcess(String),
    /// [`Agent::signal_process`] with its signal.
    SignalProcess(String, u32),
    /// [`Agent::write_stdin`] with the number of bytes.
    WriteStdin(String, usize),
    /// [`Agent::close_stdin`].
    CloseStdin(String),
    /// [`Agent::read_stdout`].
    ReadStdout(String),
    /// [`Agent::read_stderr`].
    ReadStderr(String),
    /// [`Agent::tty_win_resize`] with rows and columns.
    TtyWinResize(String, u32, u32),
    /// [`Agent::copy_file`] with path, offset and length.
    CopyFile(String, u64, usize),
    /// [`Agent::read_file`] with path and offset.
    ReadFile(String, u64),
    /// [`Agent::add_storage`].
    AddStorage(Storage),
    /// [`Agent::remove_storage`] with its mount point.
    RemoveStorage(String),
    /// [`Agent::update_interface`] with the interface asked for.
    UpdateInterface(Interface),
    /// [`Agent::update_routes`] with the routes asked for.
    UpdateRoutes(Vec<Route>),
    /// [`Agent::list_interfaces`].
    ListInterfaces,
    /// [`Agent::list_routes`].
    ListRoutes,
    /// [`Agent::prepare_template`].
    PrepareTemplate,
    /// [`Agent::disconnect`].
    Disconnect,
    /// [`Agent::reuse_agent`].
    ReuseAgent,
}

impl FakeCall {
    /// The method name, as given to [`FakeAgent::fail`].
    pub fn method(&self) -> &'static str {
        match self {
            FakeCall::Connect => "connect",
            FakeCall::Check => "check",
            FakeCall::Version => "version",
            FakeCall::OnlineCpuMem { .. } => "online_cpu_mem",
            FakeCall::ReseedRandomDev(_) => "reseed_random_dev",
            FakeCall::SetGuestDateTime(_) => "set_guest_date_time",
            FakeCall::GetGuestDetails => "get_guest_details",
            FakeCall::Random(_) => "random",
            FakeCall::GuestTime => "guest_time",
            FakeCall::Resources => "resources",
            FakeCall::Uptime => "uptime",
            FakeCall::CreateContainer(..) => "create_container",
            FakeCall::StartContainer(_) => "start_container",
            FakeCall::RemoveContainer(_) => "remove_container",
            FakeCall::StatsContainer(_) => "stats_container",
            FakeCall::ContainerPids(_) => "container_pids",
            FakeCall::ExecProcess(..) => "exec_process",
            FakeCall::WaitProcess(_) => "wait_process",
            FakeCall::SignalProcess(..) => "signal_process",
            FakeCall::WriteStdin(..) => "write_stdin",
            FakeCall::CloseStdin(_) => "close_stdin",
            FakeCall::ReadStdout(_) => "read_stdout",
            FakeCall::ReadStderr(_) => "read_stderr",
            FakeCall::TtyWinResize(..) => "tty_win_resize",
            FakeCall::CopyFile(..) => "copy_file",
            FakeCall::ReadFile(..) => "read_file",
            FakeCall::AddStorage(_) => "add_storage",
            FakeCall::RemoveStorage(_) => "remove_storage",
            FakeCall::UpdateInterface(_) => "update_interface",
            FakeCall::UpdateRoutes(_) => "update_routes",
            FakeCall::ListInterfaces => "list_interfaces",
            FakeCall::ListRoutes => "list_routes",
            FakeCall::PrepareTemplate => "prepare_template",
            FakeCall::Disconnect => "disconnect",
            FakeCall::ReuseAgent => "reuse_agent",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<FakeCall>,
    failing: HashSet<&'static str>,
    hanging: HashSet<&'static str>,
    connected: bool,
    resources: Resources,
    clock_offset: Option<SystemTime>,
    /// Round trips the next `sync_guest_clock` calls report, in order; then zero.
    clock_round_trips: VecDeque<Duration>,
    /// What `prepare_template` answers: whether the fake guest reseeds on a VM fork.
    fork_reseed: bool,
    guest: FakeGuest,
    net: FakeNetwork,
}

/// An [`Agent`] that records its calls, answers plausibly, and fails the methods it is told to
/// fail with [`Error::Injected`].
#[derive(Debug)]
pub struct FakeAgent {
    state: Mutex<State>,
    started: std::time::Instant,
    /// Wakes readers and waiters of fake processes when anything changes.
    changed: tokio::sync::Notify,
}

impl Default for FakeAgent {
    fn default() -> Self {
        FakeAgent::new()
    }
}

impl FakeAgent {
    /// A fake guest with one online CPU and 256 MiB.
    pub fn new() -> Self {
        let resources = Resources {
            online_cpus: vec![0],
            mem_total_kb: 256 * 1024,
            online_memory_blocks: 2,
            memory_block_size_bytes: 128 << 20,
            ..Default::default()
        };
        FakeAgent {
            state: Mutex::new(State {
                resources,
                ..Default::default()
            }),
            started: std::time::Instant::now(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The files the fake guest holds, with their bytes.
    pub fn files(&self) -> HashMap<String, Vec<u8>> {
        self.lock().guest.files()
    }

    /// The storages mounted in the fake guest, by mount point.
    pub fn storages(&self) -> HashMap<String, Storage> {
        self.lock().guest.storages.clone()
    }

    /// Gives the fake guest a NIC named `name` with `mac` (MTU 1500, no address), as the
    /// host's hot-plug of a virtio-net device would. Besides it the guest has only `lo`.
    pub fn add_link(&self, name: &str, mac: [u8; 6]) {
        self.lock().net.add_link(name, mac);
    }

    /// Ids of the fake guest's containers.
    pub fn containers(&self) -> Vec<String> {
        self.lock().guest.container_ids()
    }

    /// Exec ids of fake processes not yet waited for (`container/exec` for a container's).
    pub fn processes(&self) -> Vec<String> {
        self.lock().guest.process_ids()
    }

    /// Waits until `f` gives an answer for the fake guest, re-checking after every change.
    async fn until<T>(&self, mut f: impl FnMut(&mut FakeGuest) -> Option<Result<T>>) -> Result<T> {
        loop {
            let notified = self.changed.notified();
            if let Some(r) = f(&mut self.lock().guest) {
                self.changed.notify_waiters();
                return r;
            }
            notified.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every later call of `method` (an [`Agent`] method name, see [`FakeCall::method`])
    /// fail with [`Error::Injected`].
    pub fn fail(&self, method: &'static str) {
        self.lock().failing.insert(method);
    }

    /// Makes every later call of `method` hang: recorded, then never answered, as by a guest
    /// that stopped answering (or a VM that died under the call).
    pub fn hang(&self, method: &'static str) {
        self.lock().hanging.insert(method);
    }

    /// Stops failing or hanging `method`.
    pub fn heal(&self, method: &'static str) {
        let mut st = self.lock();
        st.failing.remove(method);
        st.hanging.remove(method);
    }

    /// The calls so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// How many times `method` was called.
    pub fn count(&self, method: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method() == method)
            .count()
    }

    /// True between a successful call and [`Agent::disconnect`].
    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// Replaces the resources the fake guest reports.
    pub fn set_resources(&self, r: Resources) {
        self.lock().resources = r;
    }

    /// Whether the fake guest says its clones reseed themselves (`prepare_template`); off by
    /// default, as a guest kernel without VMGenID.
    pub fn set_fork_reseed(&self, active: bool) {
        self.lock().fork_reseed = active;
    }

    /// Makes the next `sync_guest_clock` calls report these round trips, as a slow guest.
    pub fn set_clock_round_trips(&self, trips: impl IntoIterator<Item = Duration>) {
        self.lock().clock_round_trips = trips.into_iter().collect();
    }

    /// Records `call`, then hangs if its method is to hang, fails if it is to fail.
    async fn record(&self, call: FakeCall) -> Result<MutexGuard<'_, State>> {
        let method = call.method();
        let hang = {
            let mut st = self.lock();
            st.calls.push(call);
            st.hanging.contains(method)
        };
        if hang {
            std::future::pending::<()>().await;
        }
        let mut st = self.lock();
        if st.failing.contains(method) {
            return Err(Error::Injected { method });
        }
        if method != "disconnect" {
            st.connected = true;
        }
        Ok(st)
    }
}

#[async_trait]
impl Agent for FakeAgent {
    async fn connect(&self) -> Result<()> {
        self.record(FakeCall::Connect).await.map(|_| ())
    }

    async fn check(&self) -> Result<HealthStatus> {
        self.record(FakeCall::Check)
            .await
            .map(|_| HealthStatus::Serving)
    }

    async fn version(&self) -> Result<VersionInfo> {
        self.record(FakeCall::Version).await.map(|_| VersionInfo {
            grpc_version: "fake".into(),
            agent_version: crate::VERSION.into(),
        })
    }

    async fn online_cpu_mem(&self, wait: bool, nb_cpus: u32, cpu_only: bool) -> Result<()> {
        let mut st = self
            .record(FakeCall::OnlineCpuMem {
                wait,
                nb_cpus,
                cpu_only,
            })
            .await?;
        let mut onlined = 0;
        while onlined < nb_cpus {
            match st.resources.offline_cpus.first().copied() {
                Some(cpu) => {
                    st.resources.offline_cpus.remove(0);
                    st.resources.online_cpus.push(cpu);
                }
                None => {
                    let next = st.resources.online_cpus.iter().max().map_or(0, |m| m + 1);
                    st.resources.online_cpus.push(next);
                }
            }
            onlined += 1;
        }
        st.resources.online_cpus.sort_unstable();
        if !cpu_only {
            st.resources.online_memory_blocks += st.resources.offline_memory_blocks;
            st.resources.offline_memory_blocks = 0;
        }
        Ok(())
    }

    async fn reseed_random_dev(&self, data: &[u8]) -> Result<()> {
        self.record(FakeCall::ReseedRandomDev(data.to_vec()))
            .await
            .map(|_| ())
    }

    async fn set_guest_date_time(&self, t: SystemTime) -> Result<()> {
        let mut st = self.record(FakeCall::SetGuestDateTime(t)).await?;
        st.clock_offset = Some(t);
        Ok(())
    }

    async fn sync_guest_clock(&self) -> Result<Duration> {
        let t = SystemTime::now();
        let mut st = self.record(FakeCall::SetGuestDateTime(t)).await?;
        st.clock_offset = Some(t);
        Ok(st.clock_round_trips.pop_front().unwrap_or_default())
    }

    async fn get_guest_details(&self) -> Result<GuestDetails> {
        let st = self.record(FakeCall::GetGuestDetails).await?;
        Ok(GuestDetails {
            mem_block_size_bytes: st.resources.memory_block_size_bytes,
            agent_details: Some(AgentDetails {
                version: crate::VERSION.into(),
                init_daemon: true,
                ..Default::default()
            }),
            support_mem_hotplug_probe: false,
        })
    }

    async fn random(&self, len: u32) -> Result<Vec<u8>> {
        let st = self.record(FakeCall::Random(len)).await?;
        let seed = st.calls.len() as u8;
        Ok((0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect())
    }

    async fn guest_time(&self) -> Result<SystemTime> {
        let st = self.record(FakeCall::GuestTime).await?;
        Ok(st.clock_offset.unwrap_or_else(SystemTime::now))
    }

    async fn resources(&self) -> Result<Resources> {
        self.record(FakeCall::Resources)
            .await
            .map(|st| st.resources.clone())
    }

    async fn uptime(&self) -> Result<Uptime> {
        drop(self.record(FakeCall::Uptime).await?);
        let agent = self.started.elapsed();
        Ok(Uptime {
            agent,
            system: agent + Duration::from_millis(100),
        })
    }

    async fn create_container(
        &self,
        container_id: &str,
        storages: &[Storage],
        spec: &ContainerSpec,
    ) -> Result<()> {
        let mut st = self
            .record(FakeCall::CreateContainer(
                container_id.into(),
                storages.to_vec(),
            ))
            .await?;
        st.guest.create_container(container_id, storages, spec)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn start_container(&self, container_id: &str) -> Result<()> {
        let mut st = self
            .record(FakeCall::StartContainer(container_id.into()))
            .await?;
        st.guest.start_container(container_id)
    }

    async fn remove_container(&self, container_id: &str, _timeout: Duration) -> Result<()> {
        let mut st = self
            .record(FakeCall::RemoveContainer(container_id.into()))
            .await?;
        st.guest.remove_container(container_id)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats> {
        let st = self
            .record(FakeCall::StatsContainer(container_id.into()))
            .await?;
        st.guest.stats_container(container_id)
    }

    async fn container_pids(&self, container_id: &str) -> Result<Vec<u32>> {
        let st = self
            .record(FakeCall::ContainerPids(container_id.into()))
            .await?;
        st.guest.container_pids(container_id)
    }

    async fn exec_process(&self, exec_id: &str, spec: &ProcessSpec) -> Result<()> {
        let mut st = self
            .record(FakeCall::ExecProcess(exec_id.into(), spec.args.clone()))
            .await?;
        st.guest.exec(&spec.container_id, exec_id, spec)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<ExitStatus> {
        drop(self.record(FakeCall::WaitProcess(exec_id.into())).await?);
        self.until(|g| g.wait(container_id, exec_id)).await
    }

    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<()> {
        let mut st = self
            .record(FakeCall::SignalProcess(exec_id.into(), signal))
            .await?;
        st.guest.signal(container_id, exec_id, signal)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        let mut st = self
            .record(FakeCall::WriteStdin(exec_id.into(), data.len()))
            .await?;
        st.guest.write_stdin(container_id, exec_id, data)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let mut st = self.record(FakeCall::CloseStdin(exec_id.into())).await?;
        st.guest.close_stdin(container_id, exec_id)?;
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    async fn read_stdout(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>> {
        drop(self.record(FakeCall::ReadStdout(exec_id.into())).await?);
        self.until(|g| g.read(container_id, exec_id, false, len))
            .await
    }

    async fn read_stderr(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>> {
        drop(self.record(FakeCall::ReadStderr(exec_id.into())).await?);
        self.until(|g| g.read(container_id, exec_id, true, len))
            .await
    }

    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<()> {
        let mut st = self
            .record(FakeCall::TtyWinResize(exec_id.into(), rows, cols))
            .await?;
        st.guest.resize(container_id, exec_id, rows, cols)
    }

    async fn copy_file(&self, chunk: &CopyFileChunk) -> Result<()> {
        let mut st = self
            .record(FakeCall::CopyFile(
                chunk.path.clone(),
                chunk.offset,
                chunk.data.len(),
            ))
            .await?;
        st.guest.copy_file(chunk)
    }

    async fn read_file(&self, path: &str, offset: u64, len: u32) -> Result<FileChunk> {
        let st = self.record(FakeCall::ReadFile(path.into(), offset)).await?;
        st.guest.read_file(path, offset, len)
    }

    async fn add_storage(&self, storage: &Storage) -> Result<()> {
        let mut st = self.record(FakeCall::AddStorage(storage.clone())).await?;
        st.guest.add_storage(storage)
    }

    async fn remove_storage(&self, mount_point: &str) -> Result<()> {
        let mut st = self
            .record(FakeCall::RemoveStorage(mount_point.into()))
            .await?;
        st.guest.remove_storage(mount_point)
    }

    async fn update_interface(&self, iface: &Interface) -> Result<Interface> {
        let mut st = self
            .record(FakeCall::UpdateInterface(iface.clone()))
            .await?;
        st.net.update_interface(iface)
    }

    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>> {
        let mut st = self.record(FakeCall::UpdateRoutes(routes.to_vec())).await?;
        st.net.update_routes(routes)
    }

    async fn list_interfaces(&self) -> Result<Vec<Interface>> {
        let st = self.record(FakeCall::ListInterfaces).await?;
        Ok(st.net.interfaces())
    }

    async fn list_routes(&self) -> Result<Vec<Route>> {
        let st = self.record(FakeCall::ListRoutes).await?;
        Ok(st.net.routes())
    }

    async fn prepare_template(&self) -> Result<ForkReseed> {
        let st = self.record(FakeCall::PrepareTemplate).await?;
        Ok(if st.fork_reseed {
            ForkReseed::Active
        } else {
            ForkReseed::Inactive("fake guest without VMGenID".into())
        })
    }

    async fn disconnect(&self) -> Result<()> {
        let mut st = self.record(FakeCall::Disconnect).await?;
        st.connected = false;
        Ok(())
    }

    async fn reuse_agent(&self, other: &dyn Agent) -> Result<()> {
        let connected = match other.as_any().downcast_ref::<FakeAgent>() {
            Some(o) if std::ptr::eq(o, self) => self.lock().connected,
            Some(o) => o.is_connected(),
            None => return Err(Error::Unsupported("reusing a non-fake agent")),
        };
        let mut st = self.record(FakeCall::ReuseAgent).await?;
        st.connected = connected;
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests;
