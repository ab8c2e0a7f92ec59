//! The task service: containerd's `Task` API over the containers of one sandbox VM.
//!
//! One shim serves one sandbox (CRI groups a pod's containers on its sandbox's socket), so it
//! holds at most one VM, made at the first Create and stopped when the last container is
//! deleted. Each process (a container's init, or an exec) has a watch channel of its exit:
//! Wait subscribes to it, so any number of waiters see the same status, and the exit is
//! published only after its output has been copied to containerd's FIFOs to the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::ExitSignal;
use tokio::sync::{watch, Mutex};
use tracing::{info, instrument, warn};

use crate::events::{self, EventSink};
use crate::rootfs::{Layers, RootfsCache, RootfsImage, RootfsMount};
use crate::sandbox::{ContainerRequest, SandboxProcess, SandboxProvider, SandboxVm};
use crate::status::{Code, TaskError};
use crate::stdio::{self, StdinCopy, StdioPaths};

/// The file in a bundle naming the VM that runs its container, for `delete` after a crash.
pub const VM_RECORD_FILE: &str = "vmfactory-vm";

/// The CRI annotation naming a container's sandbox.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// A process's exit as containerd reports it.
#[derive(Debug, Clone)]
pub struct Exited {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When it was seen.
    pub at: Timestamp,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Made, not started.
    Created,
    /// Started, not ended.
    Running,
    /// Ended.
    Stopped,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    stdio: StdioPaths,
    handle: Option<Arc<dyn SandboxProcess>>,
    /// Taken by Start (the copies go to the exit watcher).
    pending_outputs: Option<stdio::OutputCopies>,
    stdin: StdinCopy,
    exit_tx: Option<watch::Sender<Option<Exited>>>,
    exit_rx: watch::Receiver<Option<Exited>>,
    /// An exec's process spec, until Start runs it.
    spec: Option<oci_spec::runtime::Process>,
}

impl Proc {
    fn new(stdio: StdioPaths) -> Self {
        let (tx, rx) = watch::channel(None);
        Proc {
            pid: 0,
            stdio,
            handle: None,
            pending_outputs: None,
            stdin: StdinCopy::default(),
            exit_tx: Some(tx),
            exit_rx: rx,
            spec: None,
        }
    }

    fn state(&self) -> ProcState {
        if self.exit_rx.borrow().is_some() {
            ProcState::Stopped
        } else if self.exit_tx.is_some() {
            ProcState::Created
        } else {
            ProcState::Running
        }
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    /// bundle/rootfs when the request's mounts were mounted there.
    mounted: Option<PathBuf>,
    _image: RootfsImage,
    init: Proc,
    execs: HashMap<String, Proc>,
}

impl Container {
    fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc, TaskError> {
        match exec_id {
            "" => Ok(&self.init),
            e => self.execs.get(e).ok_or_else(|| TaskError::no_exec(id, e)),
        }
    }

    fn proc_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Proc, TaskError> {
        match exec_id {
            "" => Ok(&mut self.init),
            e => self
                .execs
                .get_mut(e)
                .ok_or_else(|| TaskError::no_exec(id, e)),
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    vm: Option<Arc<dyn SandboxVm>>,
    containers: HashMap<String, Container>,
}

impl Inner {
    /// The init (`exec_id` empty) or an exec of container `id`.
    fn proc(&self, id: &str, exec_id: &str) -> Result<&Proc, TaskError> {
        self.containers
            .get(id)
            .ok_or_else(|| TaskError::no_container(id))?
            .proc(id, exec_id)
    }
}

/// The task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    provider: Arc<dyn SandboxProvider>,
    events: Arc<dyn EventSink>,
    rootfs: RootfsCache,
    exit: Arc<ExitSignal>,
    inner: Arc<Mutex<Inner>>,
    /// Serialises Create: one VM per shim, made by the first.
    creating: Arc<Mutex<()>>,
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("provider", &self.provider)
            .field("rootfs", &self.rootfs)
            .finish_non_exhaustive()
    }
}

/// What Create needs, from containerd's `CreateTaskRequest`.
#[derive(Debug, Clone, Default)]
pub struct CreateParams {
    /// Container id.
    pub id: String,
    /// The bundle directory (config.json, rootfs/).
    pub bundle: String,
    /// The snapshot's mounts.
    pub rootfs: Vec<RootfsMount>,
    /// Its stdio FIFOs.
    pub stdio: StdioPaths,
}

impl TaskService {
    /// A service getting its VM from `provider`, publishing to `events`, signalling `exit`
    /// when Shutdown finds nothing left.
    pub fn new(
        provider: Arc<dyn SandboxProvider>,
        events: Arc<dyn EventSink>,
        rootfs: RootfsCache,
        exit: Arc<ExitSignal>,
    ) -> Self {
        TaskService {
            provider,
            events,
            rootfs,
            exit,
            inner: Arc::default(),
            creating: Arc::default(),
        }
    }

    /// Create: reads the bundle, mounts and images the rootfs, creates the container in the
    /// sandbox VM (made on the first Create) and wires its stdio. Returns the init's pid.
    #[instrument(skip_all, fields(id = %p.id))]
    pub async fn create(&self, p: CreateParams) -> Result<u32, TaskError> {
        let _one = self.creating.lock().await;
        let t = Instant::now();
        check_id(&p.id)?;
        if self.inner.lock().await.containers.contains_key(&p.id) {
            return Err(TaskError::new(
                Code::AlreadyExists,
                format!("container {} exists", p.id),
            ));
        }
        let bundle = PathBuf::from(&p.bundle);
        if !bundle.is_absolute() {
            return Err(TaskError::invalid(format!(
                "bundle {:?} is not absolute",
                p.bundle
            )));
        }
        let spec = load_spec(&bundle).await?;
        let rootfs_dir = bundle.join("rootfs");
        let layers = Layers::from_mounts(&p.rootfs, &rootfs_dir)
            .map_err(|e| TaskError::from_error(Code::InvalidArgument, &e))?;
        let sandbox_id = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(SANDBOX_ID_ANNOTATION).cloned())
            .unwrap_or_else(|| p.id.clone());

        // The VM first: a node that cannot give one (a bad configuration, no QEMU)
        // mounts and builds nothing.
        let vm = self.vm_for(&sandbox_id).await?;
        let t = step_took("vm", t);
        let mounted = match p.rootfs.is_empty() {
            true => None,
            false => {
                if let Err(e) = crate::mounts::mount_all(&p.rootfs, &rootfs_dir).await {
                    self.stop_vm_if_idle().await;
                    return Err(e);
                }
                Some(rootfs_dir.clone())
            }
        };
        let undo_mount = |m: &Option<PathBuf>| {
            let m = m.clone();
            async move {
                if let Some(dir) = m {
                    crate::mounts::unmount(&dir).await;
                }
            }
        };
        let t = step_took("rootfs mount", t);
        let image = match self.rootfs.image(&layers).await {
            Ok(i) => i,
            Err(e) => {
                undo_mount(&mounted).await;
                self.stop_vm_if_idle().await;
                return Err(TaskError::from_error(Code::Internal, &e));
            }
        };
        let t = step_took("rootfs image", t);
        if let Err(e) = tokio::fs::write(bundle.join(VM_RECORD_FILE), vm.record()).await {
            warn!(error = %e, "cannot record the VM in the bundle");
        }
        let req = ContainerRequest {
            id: p.id.clone(),
            spec,
            rootfs_image: image.path.clone(),
        };
        let mut process = match vm.create_container(&req).await {
            Ok(pr) => pr,
            Err(e) => {
                undo_mount(&mounted).await;
                self.stop_vm_if_idle().await;
                return Err(TaskError::from_sandbox(&e));
            }
        };
        step_took("container create", t);
        let copies = match stdio::wire(process.as_mut(), &p.stdio) {
            Ok(c) => c,
            Err(e) => {
                let _ = vm.remove_container(&p.id).await;
                undo_mount(&mounted).await;
                self.stop_vm_if_idle().await;
                return Err(TaskError::from_error(Code::InvalidArgument, &e));
            }
        };
        let mut init = Proc::new(p.stdio.clone());
        init.pid = process.pid();
        init.handle = Some(Arc::from(process));
        init.stdin = copies.stdin;
        init.pending_outputs = Some(copies.outputs);
        let pid = init.pid;
        self.inner.lock().await.containers.insert(
            p.id.clone(),
            Container {
                bundle,
                mounted,
                _image: image,
                init,
                execs: HashMap::new(),
            },
        );
        self.events
            .publish(events::TASK_CREATE, events::task_create(&p, pid))
            .await;
        info!(pid, sandbox = %sandbox_id, "container created");
        Ok(pid)
    }

    async fn vm_for(&self, sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, TaskError> {
        if let Some(vm) = self.inner.lock().await.vm.clone() {
            return Ok(vm);
        }
        let vm = self
            .provider
            .new_vm(sandbox_id)
            .await
            .map_err(|e| TaskError::from_sandbox(&e))?;
        self.inner.lock().await.vm = Some(vm.clone());
        Ok(vm)
    }

    async fn stop_vm_if_idle(&self) {
        let vm = {
            let mut inner = self.inner.lock().await;
            match inner.containers.is_empty() {
                true => inner.vm.take(),
                false => None,
            }
        };
        if let Some(vm) = vm {
            if let Err(e) = vm.stop().await {
                warn!(error = %crate::status::one_line(&e), "cannot stop the sandbox VM");
            }
        }
    }

    /// Start: the init (container) or a created exec. Returns its guest pid.
    #[instrument(skip(self))]
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let mut inner = self.inner.lock().await;
        let vm = inner.vm.clone();
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| TaskError::no_container(id))?;
        if exec_id.is_empty() {
            if c.init.state() != ProcState::Created {
                return Err(TaskError::precondition(format!(
                    "container {id} already started"
                )));
            }
            let vm = vm.ok_or_else(|| TaskError::no_container(id))?;
            let t = Instant::now();
            vm.start_container(id)
                .await
                .map_err(|e| TaskError::from_sandbox(&e))?;
            step_took("container start", t);
            let pid = c.init.pid;
            self.watch_exit(id, "", &mut c.init);
            drop(inner);
            self.events
                .publish(events::TASK_START, events::task_start(id, pid))
                .await;
            return Ok(pid);
        }
        let init_running = c.init.state() == ProcState::Running;
        let p = c.proc_mut(id, exec_id)?;
        if p.state() != ProcState::Created {
            return Err(TaskError::precondition(format!(
                "exec {exec_id} already started"
            )));
        }
        if !init_running {
            return Err(TaskError::precondition(format!(
                "container {id} is not running"
            )));
        }
        let spec = p
            .spec
            .clone()
            .ok_or_else(|| TaskError::no_exec(id, exec_id))?;
        let vm = vm.ok_or_else(|| TaskError::no_container(id))?;
        let mut process = vm
            .exec_in(id, exec_id, &spec)
            .await
            .map_err(|e| TaskError::from_sandbox(&e))?;
        let copies = match stdio::wire(process.as_mut(), &p.stdio) {
            Ok(c) => c,
            Err(e) => {
                let _ = process.signal(libc::SIGKILL).await;
                return Err(TaskError::from_error(Code::InvalidArgument, &e));
            }
        };
        p.pid = process.pid();
        p.handle = Some(Arc::from(process));
        p.stdin = copies.stdin;
        p.pending_outputs = Some(copies.outputs);
        let pid = p.pid;
        self.watch_exit(id, exec_id, p);
        drop(inner);
        self.events
            .publish(
                events::TASK_EXEC_STARTED,
                events::task_exec_started(id, exec_id, pid),
            )
            .await;
        Ok(pid)
    }

    /// Marks `p` running and waits for its end in the background: then its output is copied
    /// to the end, its exit recorded and published.
    fn watch_exit(&self, id: &str, exec_id: &str, p: &mut Proc) {
        let (Some(tx), Some(handle)) = (p.exit_tx.take(), p.handle.clone()) else {
            return;
        };
        let outputs = p.pending_outputs.take();
        let events = self.events.clone();
        let (id, exec_id, pid) = (id.to_owned(), exec_id.to_owned(), p.pid);
        tokio::spawn(async move {
            let status = match handle.wait().await {
                Ok(exit) => exit.status(),
                Err(e) => {
                    warn!(%id, %exec_id, error = %crate::status::one_line(&e), "wait failed");
                    255
                }
            };
            if let Some(o) = outputs {
                o.done().await;
            }
            let at = events::now();
            tx.send_replace(Some(Exited {
                status,
                at: at.clone(),
            }));
            let process_id = if exec_id.is_empty() { &id } else { &exec_id };
            events
                .publish(
                    events::TASK_EXIT,
                    events::task_exit(&id, process_id, pid, status, at),
                )
                .await;
        });
    }
}

/// A container id is one path element of printable characters.
fn check_id(id: &str) -> Result<(), TaskError> {
    if id.is_empty()
        || id.contains('/')
        || id == "."
        || id == ".."
        || id.chars().any(char::is_control)
    {
        return Err(TaskError::invalid(format!("invalid container id {id:?}")));
    }
    Ok(())
}

/// The bundle's config.json.
async fn load_spec(bundle: &Path) -> Result<oci_spec::runtime::Spec, TaskError> {
    let path = bundle.join("config.json");
    tokio::task::spawn_blocking(move || oci_spec::runtime::Spec::load(&path))
        .await
        .map_err(|e| TaskError::new(Code::Internal, e.to_string()))?
        .map_err(|e| {
            TaskError::from_error(Code::InvalidArgument, &e).context("Bad bundle config.json")
        })
}

pub use vmfactory_vm::{step_took, TIMING_TARGET};

#[path = "service_ops.rs"]
mod ops;
pub use ops::DeleteOutcome;

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
