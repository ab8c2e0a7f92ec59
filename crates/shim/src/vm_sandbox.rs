//! The real sandbox: `vmfactory_vm::Vm`'s containers API, VMs from the node's factory.
//!
//! Feature `vm`. Written to the containers contract of issue 19 (`Vm::create_container`,
//! `start_container`, `exec_in`, `signal_container`, `container_pids`, `container_stats`,
//! `remove_container`, `ContainerConfig::new`, `ProcessSpec::container_id`).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tracing::info;
use vmfactory_agent::{ExitStatus, ProcessSpec};
use vmfactory_factory::{Factory, FactoryConfig};
use vmfactory_vm::containers::{ContainerConfig, ContainerError};
use vmfactory_vm::{HypervisorConfig, Process, Vm, VmConfig};

use crate::sandbox::{
    ContainerRequest, ContainerUsage, OutputStream, ProcessExit, SandboxError, SandboxProcess,
    SandboxProvider, SandboxVm, StdinStream,
};
use crate::status::one_line;

/// `VMFACTORY_CACHE_SOCKET`: take VMs from this VM-cache server.
pub const ENV_CACHE_SOCKET: &str = "VMFACTORY_CACHE_SOCKET";
/// `VMFACTORY_TEMPLATE_PATH`: clone VMs from the template there (fetch-only).
pub const ENV_TEMPLATE_PATH: &str = "VMFACTORY_TEMPLATE_PATH";
/// `VMFACTORY_RUN_ROOT`: the factory's run root (default `/run/vc`).
pub const ENV_RUN_ROOT: &str = "VMFACTORY_RUN_ROOT";
/// `VMFACTORY_GUEST_DIR`: the guest's `vmlinuz` and `initramfs.cpio` (default
/// `/usr/share/vmfactory/guest`), as the e2e harness lays them out.
pub const ENV_GUEST_DIR: &str = "VMFACTORY_GUEST_DIR";
/// The guest directory when `VMFACTORY_GUEST_DIR` is unset.
pub const DEFAULT_GUEST_DIR: &str = "/usr/share/vmfactory/guest";

fn vm_error(e: &ContainerError) -> SandboxError {
    SandboxError::Vm(one_line(e))
}

fn vm_error2(e: &vmfactory_vm::Error) -> SandboxError {
    SandboxError::Vm(one_line(e))
}

/// VMs from a factory built from a `FactoryConfig` at the first container.
#[derive(Debug)]
pub struct FactoryProvider {
    config: FactoryConfig,
    factory: OnceCell<Factory>,
}

impl FactoryProvider {
    /// A provider over `config`.
    pub fn new(config: FactoryConfig) -> Self {
        FactoryProvider {
            config,
            factory: OnceCell::new(),
        }
    }

    /// The factory config the environment names: a VM-cache client with
    /// `VMFACTORY_CACHE_SOCKET`, else clones of the template at `VMFACTORY_TEMPLATE_PATH`,
    /// else direct VMs; run root from `VMFACTORY_RUN_ROOT`. (The node's config file is read
    /// by the CLI; the shim's use of it is wired by the lead.)
    pub fn from_env() -> Self {
        let guest = std::env::var_os(ENV_GUEST_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR));
        let hv = HypervisorConfig::new(guest.join("vmlinuz"), Some(guest.join("initramfs.cpio")));
        let mut vm = VmConfig::new(hv);
        if let Some(root) = std::env::var_os(ENV_RUN_ROOT) {
            vm.run_root = PathBuf::from(root);
        }
        let mut config = FactoryConfig::new(vm);
        if let Some(sock) = std::env::var_os(ENV_CACHE_SOCKET) {
            config.cache_endpoint = Some(PathBuf::from(sock));
        } else if let Some(t) = std::env::var_os(ENV_TEMPLATE_PATH) {
            config.template = true;
            config.fetch_only = true;
            config.template_path = PathBuf::from(t);
        }
        Self::new(config)
    }

    /// The run root of the VMs (rootfs images go in `<run_root>/rootfs`).
    pub fn run_root(&self) -> PathBuf {
        self.config.vm.run_root.clone()
    }
}

#[async_trait]
impl SandboxProvider for FactoryProvider {
    async fn new_vm(&self, sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, SandboxError> {
        let factory = self
            .factory
            .get_or_try_init(|| Factory::new(&self.config))
            .await
            .map_err(|e| SandboxError::Vm(one_line(&e)))?;
        // The base's own config: a VM-cache server's base is the server's.
        let vm = factory
            .get_vm(factory.config())
            .await
            .map_err(|e| SandboxError::Vm(one_line(&e)))?;
        info!(sandbox = sandbox_id, vm = vm.id(), "sandbox VM ready");
        Ok(Arc::new(VmSandbox {
            vm,
            run_root: self.run_root(),
        }))
    }

    async fn stop_recorded(&self, record: &str) -> Result<(), SandboxError> {
        let (root, id) = record
            .split_once('\n')
            .ok_or_else(|| SandboxError::Invalid(format!("bad VM record {record:?}")))?;
        Vm::reap_orphan(std::path::Path::new(root), id)
            .await
            .map(|_| ())
            .map_err(|e| vm_error2(&e))
    }
}

/// One sandbox's VM.
#[derive(Debug)]
pub struct VmSandbox {
    vm: Vm,
    run_root: PathBuf,
}

/// An OCI process as the agent's `ProcessSpec` in container `id`.
pub fn process_spec(id: &str, p: &oci_spec::runtime::Process) -> ProcessSpec {
    let mut spec = ProcessSpec::new(p.args().clone().unwrap_or_default());
    spec.env = p.env().clone().unwrap_or_default();
    spec.cwd = p.cwd().to_string_lossy().into_owned();
    spec.uid = p.user().uid();
    spec.gid = p.user().gid();
    spec.additional_gids = p.user().additional_gids().clone().unwrap_or_default();
    spec.terminal = p.terminal().unwrap_or(false);
    spec.console_size = p
        .console_size()
        .as_ref()
        .map(|b| (b.height() as u32, b.width() as u32));
    spec.container_id = id.to_owned();
    spec
}

impl VmSandbox {
    /// The guest pid of a process just made: the one pid of the container not in `before`
    /// (the contract's `Process` has no pid; the newest pid wins if several appeared).
    async fn new_pid(&self, id: &str, before: &[u32]) -> u32 {
        let now = self.vm.container_pids(id).await.unwrap_or_default();
        now.into_iter()
            .filter(|p| !before.contains(p))
            .max()
            .unwrap_or(0)
    }
}

#[async_trait]
impl SandboxVm for VmSandbox {
    async fn create_container(
        &self,
        c: &ContainerRequest,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError> {
        let config = ContainerConfig::new(c.id.clone(), c.spec.clone(), c.rootfs_image.clone());
        let process = self
            .vm
            .create_container(&config)
            .await
            .map_err(|e| vm_error(&e))?;
        let pid = self.new_pid(&c.id, &[]).await;
        Ok(Box::new(VmProcess { process, pid }))
    }

    async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        self.vm.start_container(id).await.map_err(|e| vm_error(&e))
    }

    async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError> {
        let before = self.vm.container_pids(id).await.unwrap_or_default();
        let process = self
            .vm
            .exec_in(id, exec_id, process_spec(id, process))
            .await
            .map_err(|e| vm_error(&e))?;
        let pid = self.new_pid(id, &before).await;
        Ok(Box::new(VmProcess { process, pid }))
    }

    async fn signal_container(&self, id: &str, signal: i32) -> Result<(), SandboxError> {
        self.vm
            .signal_container(id, signal)
            .await
            .map_err(|e| vm_error(&e))
    }

    async fn container_pids(&self, id: &str) -> Result<Vec<u32>, SandboxError> {
        self.vm.container_pids(id).await.map_err(|e| vm_error(&e))
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerUsage, SandboxError> {
        let s = self
            .vm
            .container_stats(id)
            .await
            .map_err(|e| vm_error(&e))?;
        Ok(ContainerUsage {
            cpu_usage_ns: s.cpu_usage_ns,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_limit_bytes: s.memory_limit_bytes,
            pids: s.pids,
        })
    }

    async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        self.vm.remove_container(id).await.map_err(|e| vm_error(&e))
    }

    async fn stop(&self) -> Result<(), SandboxError> {
        self.vm.stop().await.map_err(|e| vm_error2(&e))
    }

    fn record(&self) -> String {
        format!("{}\n{}", self.run_root.display(), self.vm.id())
    }
}

/// A `vmfactory_vm::Process` with its guest pid.
#[derive(Debug)]
struct VmProcess {
    process: Process,
    pid: u32,
}

#[async_trait]
impl SandboxProcess for VmProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn take_stdin(&mut self) -> Option<StdinStream> {
        self.process.stdin().map(|s| Box::new(s) as StdinStream)
    }
    fn take_stdout(&mut self) -> Option<OutputStream> {
        self.process.stdout().map(|s| Box::new(s) as OutputStream)
    }
    fn take_stderr(&mut self) -> Option<OutputStream> {
        self.process.stderr().map(|s| Box::new(s) as OutputStream)
    }
    async fn wait(&self) -> Result<ProcessExit, SandboxError> {
        match self.process.wait().await.map_err(|e| vm_error2(&e))? {
            ExitStatus::Code(c) => Ok(ProcessExit::Code(c)),
            ExitStatus::Signal(s) => Ok(ProcessExit::Signal(s)),
        }
    }
    async fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        self.process.signal(signal).await.map_err(|e| vm_error2(&e))
    }
    async fn resize(&self, rows: u32, cols: u32) -> Result<(), SandboxError> {
        self.process
            .resize(rows, cols)
            .await
            .map_err(|e| vm_error2(&e))
    }
}
