//! The task service's calls after Create and Start: state, exec, signals, waits, delete.

use std::sync::Arc;
use std::time::Instant;

use tracing::{info, instrument, warn};

use super::{Exited, Proc, ProcState, TaskService};
use crate::events;
use crate::sandbox::{ContainerUsage, SandboxVm};
use crate::status::{one_line, Code, TaskError};
use crate::stdio::StdioPaths;

/// What State reports of one process.
#[derive(Debug, Clone)]
pub struct ProcessStatus {
    /// Guest pid (0 before an exec starts).
    pub pid: u32,
    /// Where it is.
    pub state: ProcState,
    /// Its FIFOs.
    pub stdio: StdioPaths,
    /// Its exit, once ended.
    pub exited: Option<Exited>,
    /// The container's bundle.
    pub bundle: String,
}

/// What Delete reports.
#[derive(Debug, Clone)]
pub struct DeleteOutcome {
    /// The process's pid.
    pub pid: u32,
    /// Its exit (a never-started process reports none).
    pub exited: Option<Exited>,
}

impl TaskService {
    async fn vm(&self, id: &str) -> Result<Arc<dyn SandboxVm>, TaskError> {
        let inner = self.inner.lock().await;
        match (inner.containers.contains_key(id), inner.vm.clone()) {
            (true, Some(vm)) => Ok(vm),
            _ => Err(TaskError::no_container(id)),
        }
    }

    /// State of the init (`exec_id` empty) or an exec.
    pub async fn state(&self, id: &str, exec_id: &str) -> Result<ProcessStatus, TaskError> {
        let inner = self.inner.lock().await;
        let c = inner
            .containers
            .get(id)
            .ok_or_else(|| TaskError::no_container(id))?;
        let p = c.proc(id, exec_id)?;
        let status = ProcessStatus {
            pid: p.pid,
            state: p.state(),
            stdio: p.stdio.clone(),
            exited: p.exit_rx.borrow().clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
        };
        Ok(status)
    }

    /// The container's guest pids.
    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, TaskError> {
        let vm = self.vm(id).await?;
        vm.container_pids(id)
            .await
            .map_err(|e| TaskError::from_sandbox(&e))
    }

    /// Exec: records a process to start later in the container.
    #[instrument(skip(self, spec, stdio))]
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        spec: oci_spec::runtime::Process,
        stdio: StdioPaths,
    ) -> Result<(), TaskError> {
        if exec_id.is_empty() || exec_id.contains('/') {
            return Err(TaskError::invalid(format!("invalid exec id {exec_id:?}")));
        }
        {
            let mut inner = self.inner.lock().await;
            let c = inner
                .containers
                .get_mut(id)
                .ok_or_else(|| TaskError::no_container(id))?;
            if c.execs.contains_key(exec_id) || exec_id == id {
                return Err(TaskError::new(
                    Code::AlreadyExists,
                    format!("exec {exec_id} exists in container {id}"),
                ));
            }
            if c.init.state() == ProcState::Stopped {
                return Err(TaskError::precondition(format!(
                    "container {id} has stopped"
                )));
            }
            let mut p = Proc::new(stdio);
            p.spec = Some(spec);
            c.execs.insert(exec_id.to_owned(), p);
        }
        self.events
            .publish(
                events::TASK_EXEC_ADDED,
                events::task_exec_added(id, exec_id),
            )
            .await;
        Ok(())
    }

    /// ResizePty of the init or an exec.
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), TaskError> {
        let handle = {
            let inner = self.inner.lock().await;
            inner.proc(id, exec_id)?.handle.clone()
        };
        let handle = handle
            .ok_or_else(|| TaskError::precondition(format!("{id}/{exec_id} has not started")))?;
        handle
            .resize(rows, cols)
            .await
            .map_err(|e| TaskError::from_sandbox(&e))
    }

    /// CloseIO: closes the process's stdin (the end of containerd's input).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), TaskError> {
        let mut inner = self.inner.lock().await;
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| TaskError::no_container(id))?;
        c.proc_mut(id, exec_id)?.stdin.close();
        Ok(())
    }

    /// Kill: `signal` to the init, an exec, or (`all`) every process of the container.
    #[instrument(skip(self))]
    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), TaskError> {
        let sig = i32::try_from(signal)
            .ok()
            .filter(|s| (0..=64).contains(s))
            .ok_or_else(|| TaskError::invalid(format!("invalid signal {signal}")))?;
        let (vm, handle, state) = {
            let inner = self.inner.lock().await;
            let p = inner.proc(id, exec_id)?;
            (inner.vm.clone(), p.handle.clone(), p.state())
        };
        match state {
            ProcState::Stopped if !all => {
                return Err(TaskError::new(
                    Code::NotFound,
                    format!("process {id}/{exec_id} has already exited"),
                ))
            }
            ProcState::Created if !exec_id.is_empty() => {
                return Err(TaskError::precondition(format!(
                    "exec {exec_id} has not started"
                )))
            }
            _ => {}
        }
        let result = match (all && exec_id.is_empty(), vm, handle) {
            (true, Some(vm), _) => vm.signal_container(id, sig).await,
            (false, _, Some(h)) => h.signal(sig).await,
            _ => return Err(TaskError::no_container(id)),
        };
        result.map_err(|e| TaskError::from_sandbox(&e))
    }

    /// Wait: until the process ends (any number of waiters).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exited, TaskError> {
        let mut rx = {
            let inner = self.inner.lock().await;
            inner.proc(id, exec_id)?.exit_rx.clone()
        };
        let exited = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TaskError::new(Code::NotFound, format!("{id}/{exec_id} was deleted")))?;
        exited
            .clone()
            .ok_or_else(|| TaskError::new(Code::Internal, "exit lost".to_owned()))
    }

    /// Delete of an exec (it must not be running) or of the container: removes it from the
    /// VM, unmounts the rootfs, and stops the VM after the last container.
    #[instrument(skip(self))]
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<DeleteOutcome, TaskError> {
        let mut inner = self.inner.lock().await;
        let c = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| TaskError::no_container(id))?;
        if !exec_id.is_empty() {
            let p = c.proc(id, exec_id)?;
            if p.state() == ProcState::Running {
                return Err(TaskError::precondition(format!(
                    "exec {exec_id} is running"
                )));
            }
            let p = c
                .execs
                .remove(exec_id)
                .ok_or_else(|| TaskError::no_exec(id, exec_id))?;
            let exited = p.exit_rx.borrow().clone();
            return Ok(DeleteOutcome { pid: p.pid, exited });
        }
        if c.init.state() == ProcState::Running {
            return Err(TaskError::precondition(format!(
                "container {id} is running"
            )));
        }
        let t = Instant::now();
        // The last container goes with the VM: removing it in the guest first (kill, unmount,
        // unplug) only delays the stop.
        let last = inner.containers.len() == 1;
        if let (false, Some(vm)) = (last, &inner.vm) {
            vm.remove_container(id)
                .await
                .map_err(|e| TaskError::from_sandbox(&e))?;
        }
        let c = inner
            .containers
            .remove(id)
            .ok_or_else(|| TaskError::no_container(id))?;
        let vm = match last {
            true => inner.vm.take(),
            false => None,
        };
        drop(inner);
        let t = super::step_took("container remove", t);
        if let Some(dir) = &c.mounted {
            crate::mounts::unmount(dir).await;
        }
        let _ = tokio::fs::remove_file(c.bundle.join(super::VM_RECORD_FILE)).await;
        if let Some(vm) = vm {
            if let Err(e) = vm.stop().await {
                warn!(error = %one_line(&e), "cannot stop the sandbox VM");
            }
            info!("last container deleted: sandbox VM stopped");
            super::step_took("vm stop", t);
        }
        let exited = c.init.exit_rx.borrow().clone();
        let pid = c.init.pid;
        let (status, at) = match &exited {
            Some(e) => (e.status, e.at.clone()),
            None => (0, events::now()),
        };
        self.events
            .publish(
                events::TASK_DELETE,
                events::task_delete(id, pid, status, at),
            )
            .await;
        Ok(DeleteOutcome { pid, exited })
    }

    /// The init's pid, for Connect (0 when there is no such container).
    pub async fn task_pid(&self, id: &str) -> u32 {
        let inner = self.inner.lock().await;
        inner.containers.get(id).map_or(0, |c| c.init.pid)
    }

    /// Shutdown: when no container is left, stops the VM and lets the shim exit; otherwise
    /// nothing (containerd asks after each delete).
    pub async fn shutdown(&self) -> bool {
        let vm = {
            let mut inner = self.inner.lock().await;
            if !inner.containers.is_empty() {
                return false;
            }
            inner.vm.take()
        };
        if let Some(vm) = vm {
            if let Err(e) = vm.stop().await {
                warn!(error = %one_line(&e), "cannot stop the sandbox VM");
            }
        }
        self.exit.signal();
        true
    }

    /// The container's resource use.
    pub async fn stats(&self, id: &str) -> Result<ContainerUsage, TaskError> {
        let vm = self.vm(id).await?;
        vm.container_stats(id)
            .await
            .map_err(|e| TaskError::from_sandbox(&e))
    }
}
