//! The real sandbox: `vmfactory_vm::Vm`'s containers API, VMs from the node's factory.
//!
//! A thin adapter: each call is one call of `Vm`'s containers API (`create_container`,
//! `start_container`, `exec_in`, `signal_container`, `container_pids`, `container_stats`,
//! `remove_container`).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::OnceCell;
use tracing::info;
use vmfactory_agent::{ExitStatus, ProcessSpec};
use vmfactory_config::Settings;
use vmfactory_factory::Factory;
use vmfactory_vm::{ContainerConfig, ContainerError};
use vmfactory_vm::{Process, Vm};

use crate::sandbox::{
    ContainerRequest, ContainerUsage, OutputStream, ProcessExit, SandboxError, SandboxProcess,
    SandboxProvider, SandboxVm, StdinStream,
};
use crate::status::one_line;

fn vm_error(e: &ContainerError) -> SandboxError {
    SandboxError::Vm(one_line(e))
}

fn vm_error2(e: &vmfactory_vm::Error) -> SandboxError {
    SandboxError::Vm(one_line(e))
}

/// VMs from the node's factory: the VM-cache server if it answers, else the template, else
/// direct boots (`Settings::factory_for_use`, chosen at the first container).
#[derive(Debug)]
pub struct FactoryProvider {
    settings: Settings,
    factory: OnceCell<Factory>,
}

impl FactoryProvider {
    /// A provider for the node configured by `settings`.
    pub fn new(settings: Settings) -> Self {
        FactoryProvider {
            settings,
            factory: OnceCell::new(),
        }
    }

    /// The run root of the VMs.
    pub fn run_root(&self) -> PathBuf {
        self.settings.vm.run_root.clone()
    }
}

#[async_trait]
impl SandboxProvider for FactoryProvider {
    async fn new_vm(&self, sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, SandboxError> {
        let t = std::time::Instant::now();
        let factory = self
            .factory
            .get_or_try_init(|| async {
                let (f, choice) = self.settings.factory_for_use().await?;
                info!(?choice, "sandbox VMs come from this factory");
                Ok::<_, vmfactory_factory::NewFactoryError>(f)
            })
            .await
            .map_err(|e| SandboxError::Vm(one_line(&e)))?;
        let t = vmfactory_vm::step_took("factory", t);
        // The base's own config: a VM-cache server's base is the server's.
        let vm = factory
            .get_vm(factory.config())
            .await
            .map_err(|e| SandboxError::Vm(one_line(&e)))?;
        vmfactory_vm::step_took("get_vm", t);
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
