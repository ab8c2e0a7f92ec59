//! `FakeSandbox`: a [`SandboxProvider`] whose VMs run scripted processes in memory.
//!
//! A process does what its first argument says, once started: `echo A B` prints `A B\n`;
//! `cat` copies stdin to stdout until stdin closes; `exit N` exits with N; `sleep` waits for a
//! signal; anything else exits 0. Any signal but 0 ends a running process with that signal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use oci_spec::runtime::Process as OciProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use crate::sandbox::{
    ContainerRequest, ContainerUsage, OutputStream, ProcessExit, SandboxError, SandboxProcess,
    SandboxProvider, SandboxVm, StdinStream,
};

/// What the fake saw, for assertions.
#[derive(Debug, Default)]
pub struct FakeState {
    /// Sandbox ids of the VMs handed out, in order.
    pub vms: Vec<String>,
    /// Sandbox ids of the VMs stopped.
    pub stopped: Vec<String>,
    /// Records given to `stop_recorded`.
    pub stopped_records: Vec<String>,
    /// Containers created and not removed, by id, with their image.
    pub containers: HashMap<String, std::path::PathBuf>,
    /// Terminal resizes (exec id or container id, rows, cols).
    pub resizes: Vec<(String, u32, u32)>,
    /// Make the next `create_container` fail.
    pub fail_create: bool,
    procs: HashMap<(String, String), Arc<Shared>>,
}

/// The fake provider; clones share one state.
#[derive(Debug, Clone, Default)]
pub struct FakeSandbox {
    /// What happened so far.
    pub state: Arc<Mutex<FakeState>>,
}

impl FakeSandbox {
    /// A fake with nothing created.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut s)
    }
}

#[derive(Debug)]
struct Shared {
    start: watch::Sender<bool>,
    exit: watch::Sender<Option<ProcessExit>>,
}

#[derive(Debug)]
struct FakeProcess {
    pid: u32,
    key: String,
    state: Arc<Mutex<FakeState>>,
    shared: Arc<Shared>,
    stdin: Option<DuplexStream>,
    stdout: Option<DuplexStream>,
    stderr: Option<DuplexStream>,
}

fn next_pid() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(100);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn spawn(
    args: Vec<String>,
    key: String,
    state: Arc<Mutex<FakeState>>,
    started: bool,
) -> FakeProcess {
    let (stdin_host, mut stdin_guest) = tokio::io::duplex(4096);
    let (stdout_host, mut stdout_guest) = tokio::io::duplex(4096);
    let (stderr_host, stderr_guest) = tokio::io::duplex(4096);
    let shared = Arc::new(Shared {
        start: watch::channel(started).0,
        exit: watch::channel(None).0,
    });
    let mut start = shared.start.subscribe();
    let run = shared.clone();
    tokio::spawn(async move {
        if start.wait_for(|s| *s).await.is_err() {
            return;
        }
        let mut ended = run.exit.subscribe();
        let script = async {
            match args.first().map(String::as_str) {
                Some("echo") => {
                    let line = format!("{}\n", args[1..].join(" "));
                    let _ = stdout_guest.write_all(line.as_bytes()).await;
                    0
                }
                Some("cat") => {
                    let mut buf = Vec::new();
                    let _ = stdin_guest.read_to_end(&mut buf).await;
                    let _ = stdout_guest.write_all(&buf).await;
                    0
                }
                Some("exit") => args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1),
                Some("sleep") => {
                    std::future::pending::<()>().await;
                    0
                }
                _ => 0,
            }
        };
        // A signal ends the script at once and closes its streams.
        let code = tokio::select! {
            code = script => code,
            _ = ended.wait_for(Option::is_some) => 0,
        };
        drop((stdout_guest, stderr_guest, stdin_guest));
        run.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(ProcessExit::Code(code));
                true
            } else {
                false
            }
        });
    });
    FakeProcess {
        pid: next_pid(),
        key,
        state,
        shared,
        stdin: Some(stdin_host),
        stdout: Some(stdout_host),
        stderr: Some(stderr_host),
    }
}

#[async_trait]
impl SandboxProcess for FakeProcess {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn take_stdin(&mut self) -> Option<StdinStream> {
        self.stdin.take().map(|s| Box::new(s) as StdinStream)
    }
    fn take_stdout(&mut self) -> Option<OutputStream> {
        self.stdout.take().map(|s| Box::new(s) as OutputStream)
    }
    fn take_stderr(&mut self) -> Option<OutputStream> {
        self.stderr.take().map(|s| Box::new(s) as OutputStream)
    }
    async fn wait(&self) -> Result<ProcessExit, SandboxError> {
        let mut rx = self.shared.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| SandboxError::Vm("fake process lost".into()))?;
        exit.ok_or_else(|| SandboxError::Vm("fake process lost".into()))
    }
    async fn signal(&self, signal: i32) -> Result<(), SandboxError> {
        kill(&self.shared, signal);
        Ok(())
    }
    async fn resize(&self, rows: u32, cols: u32) -> Result<(), SandboxError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.resizes.push((self.key.clone(), rows, cols));
        Ok(())
    }
}

fn kill(shared: &Shared, signal: i32) {
    if signal == 0 || !*shared.start.borrow() {
        return;
    }
    shared.exit.send_if_modified(|e| {
        if e.is_none() {
            *e = Some(ProcessExit::Signal(signal));
            true
        } else {
            false
        }
    });
}

/// One sandbox's VM in the fake.
#[derive(Debug)]
struct FakeVm {
    sandbox_id: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeVm {
    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn procs_of(&self, id: &str) -> Vec<Arc<Shared>> {
        self.lock()
            .procs
            .iter()
            .filter(|((c, _), _)| c == id)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

fn args_of(p: Option<&OciProcess>) -> Vec<String> {
    p.and_then(|p| p.args().clone()).unwrap_or_default()
}

#[async_trait]
impl SandboxVm for FakeVm {
    async fn create_container(
        &self,
        c: &ContainerRequest,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError> {
        let mut s = self.lock();
        if std::mem::take(&mut s.fail_create) {
            return Err(SandboxError::Vm("injected create failure".into()));
        }
        if s.containers.contains_key(&c.id) {
            return Err(SandboxError::Invalid(format!("container {} exists", c.id)));
        }
        s.containers.insert(c.id.clone(), c.rootfs_image.clone());
        let p = spawn(
            args_of(c.spec.process().as_ref()),
            c.id.clone(),
            self.state.clone(),
            false,
        );
        s.procs
            .insert((c.id.clone(), c.id.clone()), p.shared.clone());
        Ok(Box::new(p))
    }

    async fn start_container(&self, id: &str) -> Result<(), SandboxError> {
        let s = self.lock();
        let p = s
            .procs
            .get(&(id.to_owned(), id.to_owned()))
            .ok_or_else(|| SandboxError::NotFound(id.to_owned()))?;
        p.start.send_replace(true);
        Ok(())
    }

    async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        process: &OciProcess,
    ) -> Result<Box<dyn SandboxProcess>, SandboxError> {
        let mut s = self.lock();
        if !s.containers.contains_key(id) {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        let p = spawn(
            args_of(Some(process)),
            exec_id.to_owned(),
            self.state.clone(),
            true,
        );
        s.procs
            .insert((id.to_owned(), exec_id.to_owned()), p.shared.clone());
        Ok(Box::new(p))
    }

    async fn signal_container(&self, id: &str, signal: i32) -> Result<(), SandboxError> {
        for p in self.procs_of(id) {
            kill(&p, signal);
        }
        Ok(())
    }

    async fn container_pids(&self, id: &str) -> Result<Vec<u32>, SandboxError> {
        if !self.lock().containers.contains_key(id) {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        Ok(vec![1])
    }

    async fn container_stats(&self, id: &str) -> Result<ContainerUsage, SandboxError> {
        let n = self.procs_of(id).len() as u64;
        if n == 0 {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        Ok(ContainerUsage {
            cpu_usage_ns: 1_000,
            memory_usage_bytes: 4096,
            memory_limit_bytes: 1 << 30,
            pids: n,
        })
    }

    async fn remove_container(&self, id: &str) -> Result<(), SandboxError> {
        for p in self.procs_of(id) {
            p.start.send_replace(true);
            kill(&p, libc::SIGKILL);
        }
        let mut s = self.lock();
        s.containers.remove(id);
        s.procs.retain(|(c, _), _| c != id);
        Ok(())
    }

    async fn stop(&self) -> Result<(), SandboxError> {
        // A stopped VM takes its containers and their processes with it.
        let ids: Vec<String> = self.lock().containers.keys().cloned().collect();
        for id in ids {
            self.remove_container(&id).await?;
        }
        let mut s = self.lock();
        s.stopped.push(self.sandbox_id.clone());
        Ok(())
    }

    fn record(&self) -> String {
        format!("fake-vm-{}", self.sandbox_id)
    }
}

#[async_trait]
impl SandboxProvider for FakeSandbox {
    async fn new_vm(&self, sandbox_id: &str) -> Result<Arc<dyn SandboxVm>, SandboxError> {
        self.with(|s| s.vms.push(sandbox_id.to_owned()));
        Ok(Arc::new(FakeVm {
            sandbox_id: sandbox_id.to_owned(),
            state: self.state.clone(),
        }))
    }

    async fn stop_recorded(&self, record: &str) -> Result<(), SandboxError> {
        self.with(|s| s.stopped_records.push(record.to_owned()));
        Ok(())
    }
}
