//! The host's view of a guest agent: the [`Agent`] trait every implementation (the ttRPC
//! [`crate::KataAgent`], the tests' fake) provides.

use std::any::Any;
use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::container::{ContainerSpec, ContainerStats};
use crate::error::Result;
use crate::net::{Interface, Route};
use crate::types::{ForkReseed, GuestDetails, HealthStatus, Resources, Uptime, VersionInfo};
use crate::workload::{CopyFileChunk, ExitStatus, FileChunk, ProcessSpec, Storage};

/// The host's view of a guest agent. Object-safe: VMs hold an `Arc<dyn Agent>`.
///
/// Calls on an agent that is not connected dial first.
#[async_trait]
pub trait Agent: Send + Sync + fmt::Debug {
    /// Connects now if not connected (calls connect lazily anyway).
    async fn connect(&self) -> Result<()>;
    /// `grpc.Health.Check`.
    async fn check(&self) -> Result<HealthStatus>;
    /// `grpc.Health.Version`.
    async fn version(&self) -> Result<VersionInfo>;
    /// `OnlineCPUMem`: online `nb_cpus` newly hot-plugged CPUs, and memory unless `cpu_only`;
    /// with `wait`, answer only when done.
    async fn online_cpu_mem(&self, wait: bool, nb_cpus: u32, cpu_only: bool) -> Result<()>;
    /// `ReseedRandomDev`: feed `data` to the guest RNG and reseed it.
    async fn reseed_random_dev(&self, data: &[u8]) -> Result<()>;
    /// `SetGuestDateTime`: set the guest wall clock (microsecond resolution).
    async fn set_guest_date_time(&self, t: SystemTime) -> Result<()>;
    /// `SetGuestDateTime` with the host's time read just before the request is sent (after
    /// any dial). Answers the call's round trip: the guest clock lags by at most that.
    async fn sync_guest_clock(&self) -> Result<Duration>;
    /// `GetGuestDetails` (memory block size and agent details).
    async fn get_guest_details(&self) -> Result<GuestDetails>;
    /// Diagnostics: `len` bytes of guest randomness.
    async fn random(&self, len: u32) -> Result<Vec<u8>>;
    /// Diagnostics: the guest wall clock.
    async fn guest_time(&self) -> Result<SystemTime>;
    /// Diagnostics: online CPUs and memory.
    async fn resources(&self) -> Result<Resources>;
    /// Diagnostics: agent and system uptime.
    async fn uptime(&self) -> Result<Uptime>;
    /// `CreateContainer`: mount `storages` (the first is the root image), make the container
    /// `container_id` from `spec` and its init process (exec id = `container_id`), stopped
    /// before exec until [`Agent::start_container`]; its streams exist from now on.
    async fn create_container(
        &self,
        container_id: &str,
        storages: &[Storage],
        spec: &ContainerSpec,
    ) -> Result<()>;
    /// `StartContainer`: let the init process exec.
    async fn start_container(&self, container_id: &str) -> Result<()>;
    /// `RemoveContainer`: kill every process of the container, wait up to `timeout` (zero: no
    /// bound) for them to end, unmount its root and storages and forget it.
    async fn remove_container(&self, container_id: &str, timeout: Duration) -> Result<()>;
    /// `StatsContainer`: the container's cgroup figures.
    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats>;
    /// `ListContainerPids` (ours): the guest pids of the container's processes.
    async fn container_pids(&self, container_id: &str) -> Result<Vec<u32>>;
    /// `ExecProcess`: start `spec` as `exec_id` in `spec.container_id` (empty: the VM's own
    /// root).
    async fn exec_process(&self, exec_id: &str, spec: &ProcessSpec) -> Result<()>;
    /// `WaitProcess`: wait, without a timeout, until `exec_id` of `container_id` ends.
    async fn wait_process(&self, container_id: &str, exec_id: &str) -> Result<ExitStatus>;
    /// `SignalProcess`: send `signal` to `exec_id` (a no-op once it has ended); an empty
    /// `exec_id` with a container signals every process of that container.
    async fn signal_process(&self, container_id: &str, exec_id: &str, signal: u32) -> Result<()>;
    /// `WriteStdin`: write all of `data` to the process's stdin; answers once the pipe took it.
    async fn write_stdin(&self, container_id: &str, exec_id: &str, data: &[u8]) -> Result<()>;
    /// `CloseStdin`: the process reads EOF.
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<()>;
    /// `ReadStdout`: up to `len` bytes, waiting without a timeout until there are some; empty
    /// at the end of the stream.
    async fn read_stdout(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>>;
    /// `ReadStderr`, as [`Agent::read_stdout`].
    async fn read_stderr(&self, container_id: &str, exec_id: &str, len: u32) -> Result<Vec<u8>>;
    /// `TtyWinResize`: set the terminal size of a process started with a terminal.
    async fn tty_win_resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<()>;
    /// `CopyFile`: write one chunk of a file into the guest.
    async fn copy_file(&self, chunk: &CopyFileChunk) -> Result<()>;
    /// `ReadFile` (ours): read up to `len` bytes at `offset` of a guest file.
    async fn read_file(&self, path: &str, offset: u64, len: u32) -> Result<FileChunk>;
    /// `AddStorage` (ours): find the storage's device and mount it.
    async fn add_storage(&self, storage: &Storage) -> Result<()>;
    /// `RemoveStorage` (ours): unmount what is mounted at `mount_point`.
    async fn remove_storage(&self, mount_point: &str) -> Result<()>;
    /// `UpdateInterface`: configure the link whose MAC is `iface.hw_addr` (MTU, name, all its
    /// addresses) and bring it up; answers the link as the guest then reports it.
    async fn update_interface(&self, iface: &Interface) -> Result<Interface>;
    /// `UpdateRoutes`: replace the routes of the links `routes` name with `routes`; answers
    /// the guest's routes after.
    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>>;
    /// `ListInterfaces`: the guest's links with their addresses.
    async fn list_interfaces(&self) -> Result<Vec<Interface>>;
    /// `ListRoutes`: the routes of the guest's main table.
    async fn list_routes(&self) -> Result<Vec<Route>>;
    /// `PrepareTemplate` (ours), on a VM about to be saved as a template: whether its clones
    /// will reseed their CRNG themselves. An agent without the call (Kata's, an older
    /// vmfactory-agent) answers [`ForkReseed::Inactive`].
    async fn prepare_template(&self) -> Result<ForkReseed>;
    /// Closes the connection; the next call dials again.
    async fn disconnect(&self) -> Result<()>;
    /// Shares `other`'s connection (the seed's `reuseAgent`): after this, calls on `self` go
    /// over the connection `other` holds. Fails with [`crate::Error::Unsupported`] for another
    /// implementation.
    async fn reuse_agent(&self, other: &dyn Agent) -> Result<()>;
    /// The implementation, for [`Agent::reuse_agent`].
    fn as_any(&self) -> &dyn Any;
}
