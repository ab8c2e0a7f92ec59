//! The QEMU backend: [`Qemu`], a thin handle over `Arc<Inner>` whose lifecycle state sits in a
//! tokio `Mutex` (operations on one VM are serialised; different VMs are independent).
//!
//! Start: validate (in `spawn_blocking`, it opens files), reserve a vsock CID (`vsock.rs`),
//! resolve the accelerator, create the run directory, spawn `vhost-device-vsock` first for
//! hybrid vsock (wait for its socket), spawn QEMU (with the CID's descriptor), connect to its
//! QMP socket with retries until a deadline, negotiate, and for a clone run the incoming
//! migration. Every failure path kills what was spawned, closes and removes what was made.
//!
//! Every wait on the VM, from the first socket to the last QMP command, runs under the VM's
//! exit guard (`exit.rs`): a QEMU (or vsock backend) that exits ends it at once with
//! [`Error::Exited`], its exit status and the tail of its stderr.

mod disks;
#[cfg(test)]
mod fake_qmp;
mod nic;
mod ops;
mod version;

pub use version::{qemu_version, QEMU_VERSION_TIMEOUT};
#[cfg(test)]
mod vsock_tests;

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use tokio::net::UnixStream;
use tokio::sync::{watch, MappedMutexGuard, Mutex, MutexGuard};
use tracing::{debug, info, instrument, warn};

use crate::accel::resolve_accel;
use crate::cmdline::{agent_endpoint, qemu_args, vsock_backend_args, NicFds, RunPaths};
use crate::config::VmSize;
use crate::config::{Accel, AgentChannel, HypervisorConfig, TemplateRole};
use crate::disk::{AttachedDisk, DiskConfig, DETACH_TIMEOUT, FIRST_DISK_NUMBER};
use crate::endpoint::AgentEndpoint;
use crate::error::QmpError;
use crate::error::{Error, Result};
use crate::exit::{ProcExit, VmExit};
use crate::process::Proc;
use crate::qmp::{QmpClient, DEFAULT_COMMAND_TIMEOUT};
use crate::record::{remove_records, ProcessKind, RecordTarget};
use crate::state::{QemuState, VmStatus, QEMU_STATE_VERSION};
use crate::vsock::{self, CidKernel, CidReservation, VhostVsock};
use crate::wait::wait_until;
use crate::Hypervisor;

/// How long QEMU (and the vsock backend) get to create their sockets.
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// How long QEMU gets to exit after `quit` before SIGKILL.
pub const QUIT_GRACE: Duration = Duration::from_secs(5);

/// How long a migration (template save or load) may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// A running VM's resources.
#[derive(Debug)]
struct Running {
    qmp: QmpClient,
    qemu: Proc,
    backend: Option<Proc>,
    accel: Accel,
    /// The CID QEMU's vhost-vsock device holds (vsock channel).
    vsock_cid: Option<u32>,
    created_run_dir: bool,
    vcpus: u32,
    memory_mib: u64,
    next_cpu_id: u32,
    next_mem_id: u32,
    /// Hot-plugged disks, in attach order.
    disks: Vec<AttachedDisk>,
    /// Next `diskN` number.
    next_disk_id: u32,
    /// A pre-started clone's state descriptor (its number in QEMU), not loaded yet.
    pending_state: Option<RawFd>,
}

impl Running {
    /// The watch of the VM's processes, whose exit ends every wait guarded by it.
    fn exit(&self, id: &str) -> VmExit {
        VmExit::new(
            id,
            self.qemu.exit().clone(),
            self.backend.as_ref().map(|b| b.exit().clone()),
        )
    }
}

/// The lifecycle state: the QMP connection exists only in `Running`.
#[derive(Debug)]
enum VmState {
    Created,
    Running(Box<Running>),
    Stopped,
}

#[derive(Debug)]
struct Inner {
    id: String,
    config: HypervisorConfig,
    paths: RunPaths,
    /// QEMU's pid while running, 0 otherwise (readable without the lock).
    pid: AtomicU32,
    /// The vsock CID QEMU holds while running, 0 otherwise (no guest has CID 0).
    vsock_cid: AtomicU32,
    /// Where vsock CIDs are reserved (the kernel; a stand-in in tests).
    cid_kernel: Arc<dyn CidKernel>,
    /// The running VM's exit watch, `None` while not running (readable without the lock, so
    /// [`Hypervisor::exited`] never waits behind an operation).
    exit: watch::Sender<Option<VmExit>>,
    state: Mutex<VmState>,
}

/// A QEMU VM. Clone it freely; all clones drive the same VM.
#[derive(Debug, Clone)]
pub struct Qemu {
    inner: Arc<Inner>,
}

impl Qemu {
    /// A VM `id` with `config`, keeping its sockets and logs in `run_dir` (created on start if
    /// missing). Checks the config's shape; files are checked on start.
    pub fn new(
        id: impl Into<String>,
        config: HypervisorConfig,
        run_dir: impl Into<PathBuf>,
    ) -> Result<Self> {
        config.validate_shape()?;
        let paths = RunPaths::new(run_dir);
        Ok(Self::from_parts(id.into(), config, paths, VmState::Created))
    }

    /// [`Qemu::new`] reserving vsock CIDs through `cid_kernel` (a stand-in kernel in tests).
    #[cfg(test)]
    fn with_cid_kernel(
        id: &str,
        config: HypervisorConfig,
        run_dir: impl Into<PathBuf>,
        cid_kernel: Arc<dyn CidKernel>,
    ) -> Result<Self> {
        let mut vm = Self::new(id, config, run_dir)?;
        if let Some(inner) = Arc::get_mut(&mut vm.inner) {
            inner.cid_kernel = cid_kernel;
        }
        Ok(vm)
    }

    fn from_parts(id: String, config: HypervisorConfig, paths: RunPaths, state: VmState) -> Self {
        let (pid, cid, exit) = match &state {
            VmState::Running(r) => (r.qemu.pid, r.vsock_cid, Some(r.exit(&id))),
            _ => (0, None, None),
        };
        Self {
            inner: Arc::new(Inner {
                id,
                config,
                paths,
                pid: AtomicU32::new(pid),
                vsock_cid: AtomicU32::new(cid.unwrap_or(0)),
                cid_kernel: Arc::new(VhostVsock::default()),
                exit: watch::Sender::new(exit),
                state: Mutex::new(state),
            }),
        }
    }

    /// Re-attaches to a VM started (and detached) by another process: checks that QEMU (same
    /// pid and start time) is alive and reconnects QMP. `stop` then kills it by pid and waits
    /// for it to exit by polling `/proc`.
    #[instrument(skip(state), fields(vm = %state.id))]
    pub async fn attach(state: QemuState) -> Result<Self> {
        let gone = |pid| Error::ProcessGone {
            id: state.id.clone(),
            pid,
        };
        let (Some(pid), Some(start)) = (state.pid, state.pid_start_time) else {
            return Err(gone(0));
        };
        let paths = &state.paths;
        let qemu = Proc::attach("QEMU", pid, start, &paths.qemu_stderr)
            .await
            .ok_or_else(|| gone(pid))?;
        let backend = match state.backend {
            Some((bpid, bstart)) => Some(
                Proc::attach("vsock backend", bpid, bstart, &paths.backend_stderr)
                    .await
                    .ok_or_else(|| gone(bpid))?,
            ),
            None => None,
        };
        let exit = VmExit::new(
            &state.id,
            qemu.exit().clone(),
            backend.as_ref().map(|b| b.exit().clone()),
        );
        let qmp = exit
            .guard(async {
                let stream = UnixStream::connect(&paths.qmp)
                    .await
                    .map_err(|e| Error::io("Connecting to", &paths.qmp, e))?;
                QmpClient::connect(stream, DEFAULT_COMMAND_TIMEOUT)
                    .await
                    .map_err(|e| Error::qmp(&state.id, e))
            })
            .await?;
        let running = Running {
            qmp,
            qemu,
            backend,
            accel: state.accel,
            vsock_cid: state.vsock_cid,
            created_run_dir: state.created_run_dir,
            vcpus: state.vcpus,
            memory_mib: state.memory_mib,
            next_cpu_id: state.next_cpu_id,
            next_mem_id: state.next_mem_id,
            disks: state.disks,
            next_disk_id: state.next_disk_id,
            pending_state: None,
        };
        info!(pid, "re-attached");
        Ok(Self::from_parts(
            state.id,
            state.config,
            state.paths,
            VmState::Running(Box::new(running)),
        ))
    }

    /// The run-directory paths.
    pub fn paths(&self) -> &RunPaths {
        &self.inner.paths
    }

    /// Boots from `Created` (see [`Inner::boot`]); a failure tears down what was made.
    async fn boot_locked(&self, state: &mut VmState, defer_load: bool) -> Result<()> {
        let mut partial = Partial::default();
        match self.inner.boot(&mut partial, defer_load).await {
            Ok(running) => {
                self.inner.pid.store(running.qemu.pid, Ordering::Relaxed);
                self.inner
                    .vsock_cid
                    .store(running.vsock_cid.unwrap_or(0), Ordering::Relaxed);
                self.inner
                    .exit
                    .send_replace(Some(running.exit(&self.inner.id)));
                let cpu = self.inner.config.cpu_model_for(running.accel);
                let what = if defer_load { "pre-started" } else { "started" };
                info!(pid = running.qemu.pid, accel = %running.accel, cpu = cpu.unwrap_or("default"), "{what}");
                *state = VmState::Running(Box::new(running));
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "start failed, tearing down");
                let Partial {
                    mut qemu,
                    mut backend,
                    created_run_dir,
                } = partial;
                if let Err(te) = self
                    .inner
                    .teardown(None, qemu.as_mut(), backend.as_mut(), created_run_dir)
                    .await
                {
                    warn!(error = %te, "teardown after failed start");
                }
                Err(e)
            }
        }
    }

    /// Stops a running VM (see [`Hypervisor::stop`]); nothing to do otherwise.
    async fn stop_locked(&self, state: &mut VmState) -> Result<()> {
        let VmState::Running(mut r) = std::mem::replace(state, VmState::Stopped) else {
            return Ok(());
        };
        // A stop is no exit: waiters on `exited` keep waiting (their own waits end them).
        self.inner.exit.send_replace(None);
        self.inner.pid.store(0, Ordering::Relaxed);
        self.inner.vsock_cid.store(0, Ordering::Relaxed);
        let attached = r.qemu.is_attached();
        let result = self
            .inner
            .teardown(
                Some(&r.qmp),
                Some(&mut r.qemu),
                r.backend.as_mut(),
                r.created_run_dir,
            )
            .await;
        info!(ok = result.is_ok(), attached, "stopped");
        result
    }

    /// Locks the state and returns the running VM, or fails with [`Error::NotRunning`].
    async fn running(&self) -> Result<MappedMutexGuard<'_, Running>> {
        let state = self.inner.state.lock().await;
        MutexGuard::try_map(state, |s| match s {
            VmState::Running(r) => Some(&mut **r),
            _ => None,
        })
        .map_err(|_| Error::NotRunning {
            id: self.inner.id.clone(),
        })
    }

    fn snapshot(&self, running: Option<&Running>) -> QemuState {
        let cfg = &self.inner.config;
        QemuState {
            version: QEMU_STATE_VERSION,
            id: self.inner.id.clone(),
            config: cfg.clone(),
            accel: running.map_or(cfg.accel, |r| r.accel),
            paths: self.inner.paths.clone(),
            pid: running.map(|r| r.qemu.pid),
            pid_start_time: running.map(|r| r.qemu.start_time),
            backend: running
                .and_then(|r| r.backend.as_ref())
                .map(|b| (b.pid, b.start_time)),
            vsock_cid: running.and_then(|r| r.vsock_cid),
            created_run_dir: running.is_some_and(|r| r.created_run_dir),
            vcpus: running.map_or(cfg.vcpus, |r| r.vcpus),
            memory_mib: running.map_or(cfg.memory_mib, |r| r.memory_mib),
            next_cpu_id: running.map_or(cfg.vcpus, |r| r.next_cpu_id),
            next_mem_id: running.map_or(1, |r| r.next_mem_id),
            disks: running.map(|r| r.disks.clone()).unwrap_or_default(),
            next_disk_id: running.map_or(FIRST_DISK_NUMBER, |r| r.next_disk_id),
        }
    }
}

impl Inner {
    /// Spawns everything and negotiates QMP, and loads a clone's state unless `defer_load`
    /// (then [`Inner::load_pending`] does); on error the caller cleans up via `Partial`.
    async fn boot(&self, partial: &mut Partial, defer_load: bool) -> Result<Running> {
        let cfg = self.config.clone();
        tokio::task::spawn_blocking(move || cfg.validate())
            .await
            .map_err(|e| {
                Error::io("Validating", &self.config.kernel, std::io::Error::other(e))
            })??;
        // Before anything is created: a host without vhost-vsock fails here, leaving nothing.
        let vsock = match self.config.agent_channel {
            AgentChannel::Vsock { guest_cid } => {
                Some(vsock::reserve_for(&self.id, &self.cid_kernel, guest_cid).await?)
            }
            _ => None,
        };
        let accel = resolve_accel(&self.config).await;
        // `cpu_model = "host"` is valid under `auto`, not once `auto` resolved to TCG.
        self.config.pinned(accel).validate_shape()?;
        let dir = &self.paths.dir;
        if tokio::fs::metadata(dir).await.is_err() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| Error::io("Creating", dir, e))?;
            partial.created_run_dir = true;
        }
        remove_files(&self.paths).await;

        if let AgentChannel::HybridVsock { backend, guest_cid } = &self.config.agent_channel {
            let args = vsock_backend_args(*guest_cid, &self.paths);
            let record = RecordTarget::new(dir, ProcessKind::VsockBackend)?;
            let proc = Proc::spawn(
                "vsock backend",
                backend,
                &args,
                &self.paths.backend_stderr,
                record,
            )
            .await?;
            let exit = partial.backend.insert(proc).exit();
            self.wait_socket(exit, &self.paths.vhost_user_vsock).await?;
        }

        let vhost = vsock.as_ref().map(CidReservation::for_qemu);
        let nic = match &self.config.nic {
            Some(nic) => Some(nic::open_nic(nic, dir).await?),
            None => None,
        };
        let nic_fds = nic.as_ref().map(|(tap, vhost)| NicFds {
            tap: tap.as_raw_fd(),
            vhost: vhost.as_ref().map(AsRawFd::as_raw_fd),
        });
        let args = qemu_args(&self.id, &self.config, &self.paths, accel, vhost, nic_fds);
        // A clone's device state, opened here so that a missing file fails before QEMU runs.
        let state = match &self.config.template {
            Some(TemplateRole::CloneFrom(paths)) => Some(ops::open_state(&paths.state).await?),
            _ => None,
        };
        let inherit = [
            state.as_ref().map(AsFd::as_fd),
            vsock.as_ref().map(AsFd::as_fd),
            nic.as_ref().map(|(tap, _)| tap.as_fd()),
            nic.as_ref()
                .and_then(|(_, vhost)| vhost.as_ref().map(AsFd::as_fd)),
        ];
        debug!(vm = %self.id, args = ?args, "spawning qemu");
        let proc = Proc::spawn_with_fds(
            "QEMU",
            &self.config.qemu_path,
            &args,
            &self.paths.qemu_stderr,
            RecordTarget::new(dir, ProcessKind::Qemu)?,
            &inherit.into_iter().flatten().collect::<Vec<_>>(),
            // See `HypervisorConfig::clone_thp`.
            !self.config.clones_template() || self.config.clone_thp,
        )
        .await?;
        // QEMU holds the CID now; ours closes, so the CID ends with QEMU, wherever it is handed.
        let vsock_cid = vsock.map(|r| r.cid());
        let qemu = partial.qemu.insert(proc).exit().clone();
        let exit = VmExit::new(
            &self.id,
            qemu.clone(),
            partial.backend.as_ref().map(|b| b.exit().clone()),
        );
        let qmp = exit
            .guard(async {
                let stream = self.wait_socket(&qemu, &self.paths.qmp).await?;
                let qmp = QmpClient::connect(stream, DEFAULT_COMMAND_TIMEOUT)
                    .await
                    .map_err(|e| Error::qmp(&self.id, e))?;
                if let Some(state) = &state {
                    // Ours is closed once QEMU has taken the state (QEMU's copy has the same
                    // number).
                    ops::prepare_incoming(&self.id, &qmp).await?;
                    if !defer_load {
                        ops::incoming(&self.id, &qmp, state.as_raw_fd()).await?;
                    }
                }
                Ok(qmp)
            })
            .await?;
        let (Some(qemu), backend) = (partial.qemu.take(), partial.backend.take()) else {
            return Err(Error::NotRunning {
                id: self.id.clone(),
            });
        };
        Ok(Running {
            qmp,
            qemu,
            backend,
            accel,
            vsock_cid,
            created_run_dir: partial.created_run_dir,
            vcpus: self.config.vcpus,
            memory_mib: self.config.memory_mib,
            next_cpu_id: self.config.vcpus,
            next_mem_id: 1,
            disks: Vec::new(),
            next_disk_id: FIRST_DISK_NUMBER,
            pending_state: state
                .as_ref()
                .filter(|_| defer_load)
                .map(AsRawFd::as_raw_fd),
        })
    }

    /// Loads a pre-started clone's state, under its exit guard.
    async fn load_pending(&self, r: &mut Running) -> Result<()> {
        if let Some(state) = r.pending_state {
            r.exit(&self.id)
                .guard(ops::incoming(&self.id, &r.qmp, state))
                .await?;
            r.pending_state = None;
        }
        Ok(())
    }

    /// Connects to `socket` until it accepts, failing at once if the process that is to create
    /// it exits.
    async fn wait_socket(&self, exit: &ProcExit, socket: &Path) -> Result<UnixStream> {
        let connect = wait_until(SOCKET_TIMEOUT, || async {
            UnixStream::connect(socket).await.ok()
        });
        tokio::select! {
            biased;
            ended = exit.ended() => Err(exit.error(&self.id, &ended)),
            stream = connect => stream.ok_or_else(|| Error::SocketTimeout {
                id: self.id.clone(),
                path: socket.to_owned(),
                timeout: SOCKET_TIMEOUT,
            }),
        }
    }

    /// Ends the processes (QEMU gets `quit` first if QMP is up) and removes the files; their
    /// records only once they are gone.
    async fn teardown(
        &self,
        qmp: Option<&QmpClient>,
        qemu: Option<&mut Proc>,
        backend: Option<&mut Proc>,
        created_run_dir: bool,
    ) -> Result<()> {
        let mut result = Ok(());
        if let Some(qemu) = qemu {
            let mut grace = Duration::from_secs(2);
            if let Some(qmp) = qmp.filter(|q| !q.is_closed()) {
                // QEMU may close the socket before or after replying: both are fine. A quit
                // not answered in time means a hung main loop, where SIGTERM is not acted on
                // either: straight to SIGKILL.
                grace = match qmp
                    .execute_with_timeout(qapi::qmp::quit {}, Duration::from_secs(2))
                    .await
                {
                    Err(e @ QmpError::Timeout { .. }) => {
                        warn!(vm = %self.id, error = %e, "QEMU does not answer quit");
                        Duration::ZERO
                    }
                    Err(e) => {
                        debug!(vm = %self.id, error = %e, "quit");
                        QUIT_GRACE
                    }
                    Ok(_) => QUIT_GRACE,
                };
            } else {
                result = qemu.signal(&self.id, Signal::SIGTERM).await;
                if qmp.is_some() {
                    // QMP closed: QEMU is likely exiting already.
                    grace = QUIT_GRACE;
                }
            }
            result = result.and(qemu.terminate(&self.id, grace).await);
        }
        if let Some(backend) = backend {
            let r = match backend.signal(&self.id, Signal::SIGTERM).await {
                Ok(()) => backend.terminate(&self.id, Duration::from_secs(2)).await,
                Err(e) => Err(e),
            };
            result = result.and(r);
        }
        remove_files(&self.paths).await;
        if result.is_ok() {
            remove_records(&self.paths.dir).await;
        }
        if created_run_dir {
            // Only if empty: the run dir may hold other crates' files.
            let _ = tokio::fs::remove_dir(&self.paths.dir).await;
        }
        result
    }
}

/// What a failed start has created so far.
#[derive(Debug, Default)]
struct Partial {
    qemu: Option<Proc>,
    backend: Option<Proc>,
    created_run_dir: bool,
}

/// Removes every file this crate may have made in the run dir (missing ones are fine).
async fn remove_files(paths: &RunPaths) {
    for f in paths.all_files() {
        match tokio::fs::remove_file(f).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %f.display(), error = %e, "cannot remove"),
        }
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn config(&self) -> &HypervisorConfig {
        &self.inner.config
    }

    fn run_dir(&self) -> &Path {
        &self.inner.paths.dir
    }

    #[instrument(skip(self), fields(vm = %self.inner.id))]
    async fn start(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        match &mut *state {
            VmState::Created => self.boot_locked(&mut state, false).await,
            VmState::Running(r) if r.pending_state.is_some() => {
                match self.inner.load_pending(r).await {
                    Ok(()) => {
                        info!(pid = r.qemu.pid, "started (pre-started)");
                        Ok(())
                    }
                    Err(e) => {
                        warn!(error = %e, "loading the pre-started clone failed, tearing down");
                        if let Err(te) = self.stop_locked(&mut state).await {
                            warn!(error = %te, "teardown after failed start");
                        }
                        Err(e)
                    }
                }
            }
            _ => Err(Error::AlreadyStarted {
                id: self.inner.id.clone(),
            }),
        }
    }

    /// A clone's QEMU is started up to the state load; anything else waits for `start`.
    #[instrument(skip(self), fields(vm = %self.inner.id))]
    async fn prestart(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        if !matches!(*state, VmState::Created) {
            return Err(Error::AlreadyStarted {
                id: self.inner.id.clone(),
            });
        }
        if !self.inner.config.clones_template() {
            return Ok(());
        }
        self.boot_locked(&mut state, true).await
    }

    #[instrument(skip(self), fields(vm = %self.inner.id))]
    async fn stop(&self) -> Result<()> {
        let mut state = self.inner.state.lock().await;
        self.stop_locked(&mut state).await
    }

    async fn exited(&self) -> Error {
        let mut watch = self.inner.exit.subscribe();
        loop {
            let exit = watch.borrow_and_update().clone();
            // A new watch (started) or none (stopped, detached): look again. The sender lives
            // as long as `self`, so `changed` fails only if it is dropped under us: never.
            let changed = async {
                if watch.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            match exit {
                Some(exit) => tokio::select! {
                    exited = exit.exited() => return exited,
                    () = changed => {}
                },
                None => changed.await,
            }
        }
    }

    async fn pause(&self) -> Result<()> {
        let r = self.running().await?;
        let id = &self.inner.id;
        r.exit(id)
            .guard(async {
                r.qmp
                    .execute(qapi::qmp::stop {})
                    .await
                    .map_err(|e| Error::qmp(id, e))
            })
            .await?;
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let r = self.running().await?;
        let id = &self.inner.id;
        r.exit(id)
            .guard(async {
                r.qmp
                    .execute(qapi::qmp::cont {})
                    .await
                    .map_err(|e| Error::qmp(id, e))
            })
            .await?;
        Ok(())
    }

    async fn save_template(&self) -> Result<()> {
        let mut r = self.running().await?;
        let exit = r.exit(&self.inner.id);
        exit.guard(ops::save_template(&self.inner, &mut r)).await
    }

    async fn add_vcpus(&self, n: u32) -> Result<u32> {
        let mut r = self.running().await?;
        let exit = r.exit(&self.inner.id);
        exit.guard(ops::add_vcpus(&self.inner, &mut r, n)).await
    }

    async fn add_memory(&self, mib: u64) -> Result<u64> {
        let mut r = self.running().await?;
        let exit = r.exit(&self.inner.id);
        exit.guard(ops::add_memory(&self.inner, &mut r, mib)).await
    }

    async fn attach_disk(&self, disk: &DiskConfig) -> Result<AttachedDisk> {
        let mut r = self.running().await?;
        let exit = r.exit(&self.inner.id);
        exit.guard(disks::attach_disk(&self.inner, &mut r, disk))
            .await
    }

    async fn detach_disk(&self, id: &str) -> Result<()> {
        let mut r = self.running().await?;
        let exit = r.exit(&self.inner.id);
        exit.guard(disks::detach_disk(&self.inner, &mut r, id, DETACH_TIMEOUT))
            .await
    }

    async fn disks(&self) -> Vec<AttachedDisk> {
        match &*self.inner.state.lock().await {
            VmState::Running(r) => r.disks.clone(),
            _ => Vec::new(),
        }
    }

    async fn status(&self) -> Result<VmStatus> {
        let state = self.inner.state.lock().await;
        let id = &self.inner.id;
        match &*state {
            VmState::Created => Ok(VmStatus::NotStarted),
            VmState::Stopped => Ok(VmStatus::Stopped),
            VmState::Running(r) => {
                let st = r
                    .exit(id)
                    .guard(async {
                        r.qmp
                            .execute(qapi::qmp::query_status {})
                            .await
                            .map_err(|e| Error::qmp(id, e))
                    })
                    .await?;
                Ok(VmStatus::from_qmp(qapi::Enum::name(&st.status)))
            }
        }
    }

    async fn size(&self) -> Result<VmSize> {
        let r = self.running().await?;
        r.exit(&self.inner.id)
            .guard(ops::size(&self.inner, &r))
            .await
    }

    fn pid(&self) -> Option<u32> {
        match self.inner.pid.load(Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }

    fn console_address(&self) -> PathBuf {
        self.inner.paths.console.clone()
    }

    fn console_log_path(&self) -> PathBuf {
        self.inner.paths.console_log.clone()
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        let cid = Some(self.inner.vsock_cid.load(Ordering::Relaxed)).filter(|c| *c != 0);
        agent_endpoint(&self.inner.config.agent_channel, &self.inner.paths, cid)
    }

    async fn state(&self) -> QemuState {
        let state = self.inner.state.lock().await;
        match &*state {
            VmState::Running(r) => self.snapshot(Some(r)),
            _ => self.snapshot(None),
        }
    }

    #[instrument(skip(self), fields(vm = %self.inner.id))]
    async fn detach(&self) -> Result<QemuState> {
        let mut state = self.inner.state.lock().await;
        let VmState::Running(r) = std::mem::replace(&mut *state, VmState::Stopped) else {
            return Err(Error::NotRunning {
                id: self.inner.id.clone(),
            });
        };
        self.inner.exit.send_replace(None);
        self.inner.pid.store(0, Ordering::Relaxed);
        self.inner.vsock_cid.store(0, Ordering::Relaxed);
        let snapshot = self.snapshot(Some(&r));
        // Dropping closes QMP; the processes keep running (tokio reaps them if they exit while
        // this process lives).
        drop(r);
        info!("detached");
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests;
