//! What the task service needs from a sandbox VM, free of any backend's types.
//!
//! The real implementation (module `vm_sandbox`) is a thin adapter over
//! `vmfactory_vm::Vm`'s containers API; `FakeSandbox` (feature `test-utils`) stands in for
//! unit tests.

use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

/// A process's stdin end: writes go to the process; dropping it closes the process's stdin.
pub type StdinStream = Box<dyn AsyncWrite + Send + Unpin>;
/// A process's stdout or stderr, read to its end.
pub type OutputStream = Box<dyn AsyncRead + Send + Unpin>;

/// Why a sandbox call failed. The service maps each variant to a ttRPC code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SandboxError {
    /// No such container or process in the VM.
    #[error("Not found in the sandbox: {0}")]
    NotFound(String),
    /// The request is malformed (bad spec, bad id).
    #[error("Invalid request: {0}")]
    Invalid(String),
    /// This shim cannot do it (an operation the guest does not offer).
    #[error("Unsupported: {0}")]
    Unsupported(String),
    /// The VM or its agent failed; the text is the whole error chain on one line.
    #[error("Sandbox VM failed: {0}")]
    Vm(String),
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessExit {
    /// It exited with this code.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ProcessExit {
    /// The status containerd reports: the code, or 128 + the signal (as a shell does).
    pub fn status(self) -> u32 {
        match self {
            ProcessExit::Code(c) => c as u32,
            ProcessExit::Signal(s) => 128 + s as u32,
        }
    }
}

/// Resource use of one container, turned into containerd's cgroups v1 `Metrics` by Stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ContainerUsage {
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory in use, bytes.
    pub memory_usage_bytes: u64,
    /// Memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Number of processes.
    pub pids: u64,
}

/// A container to create: the contract's `ContainerConfig`, in this crate's terms.
#[derive(Debug, Clone)]
pub struct ContainerRequest {
    /// The container id (also the init process's exec id in the guest).
    pub id: String,
    /// The bundle's config.json.
    pub spec: oci_spec::runtime::Spec,
    /// The erofs image of its rootfs, on the host.
    pub rootfs_image: PathBuf,
}

/// A process in the VM: the container's init or an exec.
#[async_trait]
pub trait SandboxProcess: Send + Sync + Debug {
    /// The process's pid in the guest.
    fn pid(&self) -> u32;
    /// The stdin end, once.
    fn take_stdin(&mut self) -> Option<StdinStream>;
    /// The stdout end, once (with a terminal: stdout and stderr together).
    fn take_stdout(&mut self) -> Option<OutputStream>;
    /// The stderr end, once (empty with a terminal).
    fn take_stderr(&mut self) -> Option<OutputStream>;
    /// Waits for the end of the process.
    async fn wait(&self) -> Result<ProcessExit, SandboxError>;
    /// Sends a signal; no-op once it has ended.
    async fn signal(&self, signal: i32) -> Result<(), SandboxError>;
    /// Resizes its terminal.
    async fn resize(&self, rows: u32, cols: u32) -> Result<(), SandboxError>;
}

/// The VM of one sandbox: its containers.
#[async_trait]
pub trait SandboxVm: Send + Sync + Debug {
    /// Creates the container and its init process (created, not started; streams exist).
    async fn create_container(
        &self,
        c: &ContainerRequest,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError>;
    /// Starts the init process of a created container.
    async fn start_container(&self, id: &str) -> Result<(), SandboxError>;
    /// Starts another process in the container.
    async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError>;
    /// Signals every process of the container.
    async fn signal_container(&self, id: &str, signal: i32) -> Result<(), SandboxError>;
    /// The guest pids of the container's processes.
    async fn container_pids(&self, id: &str) -> Result<Vec<u32>, SandboxError>;
    /// The container's resource use.
    async fn container_stats(&self, id: &str) -> Result<ContainerUsage, SandboxError>;
    /// Kills what is left and removes the container. Idempotent.
    async fn remove_container(&self, id: &str) -> Result<(), SandboxError>;
    /// Stops the VM (every container goes with it).
    async fn stop(&self) -> Result<(), SandboxError>;
    /// Where a later `delete` can find the VM to stop it if this shim dies (e.g. its id).
    fn record(&self) -> String;
}

/// Hands out the VM of a sandbox: from the node's factory in the real shim.
#[async_trait]
pub trait SandboxProvider: Send + Sync + Debug {
    /// A new VM for sandbox `sandbox_id` (called once, at its first container).
    async fn new_vm(&self, sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, SandboxError>;
    /// Stops the VM a dead shim recorded (the text of [`SandboxVm::record`]); idempotent.
    async fn stop_recorded(&self, record: &str) -> Result<(), SandboxError>;
}

/// A provider that refuses every VM with one error: a shim whose node configuration does not
/// load.
#[derive(Debug, Clone)]
pub struct Refused(pub SandboxError);

#[async_trait]
impl SandboxProvider for Refused {
    async fn new_vm(&self, _sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, SandboxError> {
        Err(self.0.clone())
    }

    async fn stop_recorded(&self, _record: &str) -> Result<(), SandboxError> {
        Err(self.0.clone())
    }
}
