//! [`FakeHypervisor`]: an in-memory [`Hypervisor`] for other crates' unit tests
//! (feature `test-utils`). It records every call, tracks size and run state like QEMU would,
//! fails on demand at a named step ([`FakeStep`]), and can die like QEMU
//! ([`FakeHypervisor::exit`]).

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::cmdline::{agent_endpoint, RunPaths};
use crate::config::VmSize;
use crate::config::{AgentChannel, HypervisorConfig, MachineType};
use crate::disk::{
    pci_path, root_port_slot, AttachedDisk, DiskConfig, DiskError, FIRST_DISK_NUMBER,
};
use crate::endpoint::AgentEndpoint;
use crate::error::{Error, Result};
use crate::state::{QemuState, VmStatus, QEMU_STATE_VERSION};
use crate::Hypervisor;

/// A step a [`FakeHypervisor`] can be told to fail at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeStep {
    /// [`Hypervisor::start`].
    Start,
    /// [`Hypervisor::prestart`].
    Prestart,
    /// [`Hypervisor::stop`].
    Stop,
    /// [`Hypervisor::pause`].
    Pause,
    /// [`Hypervisor::resume`].
    Resume,
    /// [`Hypervisor::save_template`].
    SaveTemplate,
    /// [`Hypervisor::add_vcpus`].
    AddVcpus,
    /// [`Hypervisor::add_memory`].
    AddMemory,
    /// [`Hypervisor::attach_disk`].
    AttachDisk,
    /// [`Hypervisor::detach_disk`].
    DetachDisk,
    /// [`Hypervisor::status`].
    Status,
    /// [`Hypervisor::size`].
    Size,
    /// [`Hypervisor::detach`].
    Detach,
}

impl FakeStep {
    fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Prestart => "prestart",
            Self::Stop => "stop",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SaveTemplate => "save_template",
            Self::AddVcpus => "add_vcpus",
            Self::AddMemory => "add_memory",
            Self::AttachDisk => "attach_disk",
            Self::DetachDisk => "detach_disk",
            Self::Status => "status",
            Self::Size => "size",
            Self::Detach => "detach",
        }
    }
}

/// A call recorded by a [`FakeHypervisor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// `start`.
    Start,
    /// `prestart`.
    Prestart,
    /// `stop`.
    Stop,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
    /// `save_template`.
    SaveTemplate,
    /// `add_vcpus(n)`.
    AddVcpus(u32),
    /// `add_memory(mib)`.
    AddMemory(u64),
    /// `attach_disk(disk)`.
    AttachDisk(DiskConfig),
    /// `detach_disk(id)`.
    DetachDisk(String),
    /// `status`.
    Status,
    /// `size`.
    Size,
    /// `detach`.
    Detach,
}

#[derive(Debug)]
struct FakeInner {
    calls: Vec<FakeCall>,
    fail_at: Option<FakeStep>,
    exit_after: Option<FakeStep>,
    /// `status` never answers (a QEMU whose monitor hangs).
    status_hangs: bool,
    status: VmStatus,
    vcpus: u32,
    memory_mib: u64,
    slots_used: u32,
    /// The vsock CID "held" while running (vsock channel).
    vsock_cid: Option<u32>,
    disks: Vec<AttachedDisk>,
    next_disk_id: u32,
}

/// The next CID a fake hands out: distinct within a test process, as the kernel's are.
static NEXT_FAKE_CID: AtomicU32 = AtomicU32::new(3);

/// How a fake VM's process ended: its exit status and stderr tail.
type FakeExit = Option<(ExitStatus, String)>;

/// An in-memory hypervisor. Clones share state.
#[derive(Debug, Clone)]
pub struct FakeHypervisor {
    id: String,
    config: HypervisorConfig,
    paths: RunPaths,
    inner: Arc<Mutex<FakeInner>>,
    /// Set by [`FakeHypervisor::exit`] while running; cleared by `stop`.
    exit: Arc<watch::Sender<FakeExit>>,
}

impl FakeHypervisor {
    /// A fake VM `id` with `config` and `run_dir` (nothing is created on disk).
    pub fn new(
        id: impl Into<String>,
        config: HypervisorConfig,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        let inner = FakeInner {
            calls: Vec::new(),
            fail_at: None,
            exit_after: None,
            status_hangs: false,
            status: VmStatus::NotStarted,
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            slots_used: 0,
            vsock_cid: None,
            disks: Vec::new(),
            next_disk_id: FIRST_DISK_NUMBER,
        };
        Self {
            id: id.into(),
            paths: RunPaths::new(run_dir),
            config,
            inner: Arc::new(Mutex::new(inner)),
            exit: Arc::new(watch::Sender::new(None)),
        }
    }

    /// A fake VM re-attached from `state`: not started yet (call `start`), and keeping the
    /// vsock CID and the disks `state` records, as a re-attached QEMU does.
    pub fn attached(state: &QemuState) -> Self {
        let hv = Self::new(&state.id, state.config.clone(), state.paths.dir.clone());
        let mut g = hv.lock();
        g.vsock_cid = state.vsock_cid;
        g.disks.clone_from(&state.disks);
        g.next_disk_id = state.next_disk_id;
        drop(g);
        hv
    }

    /// Makes the VM's process exit now with `status`, having written `stderr_tail`, as a QEMU
    /// that crashed or was killed: [`Hypervisor::exited`] resolves, and every operation but
    /// `stop`, `state` and the path getters fails with [`Error::Exited`] until `stop` cleans
    /// up. Does nothing unless the VM runs.
    pub fn exit(&self, status: ExitStatus, stderr_tail: &str) {
        self.exit_locked(&self.lock(), status, stderr_tail);
    }

    fn exit_locked(&self, g: &FakeInner, status: ExitStatus, stderr_tail: &str) {
        if !matches!(g.status, VmStatus::NotStarted | VmStatus::Stopped) {
            self.exit
                .send_replace(Some((status, stderr_tail.to_owned())));
        }
    }

    /// Ends a successful `step`: the process exits (SIGKILL) if told to after it.
    fn done(&self, g: &FakeInner, step: FakeStep) {
        if g.exit_after == Some(step) {
            use std::os::unix::process::ExitStatusExt;
            let tail = format!("fake QEMU: exited after {}", step.name());
            self.exit_locked(g, ExitStatus::from_raw(libc::SIGKILL), &tail);
        }
    }

    /// The [`Error::Exited`] of an exit.
    fn exited_error(&self, (status, stderr_tail): (ExitStatus, String)) -> Error {
        Error::Exited {
            id: self.id.clone(),
            what: "QEMU",
            status: Some(status),
            stderr_tail,
        }
    }

    /// Makes `step` fail with [`Error::Injected`] from now on (`None` clears it).
    pub fn fail_at(&self, step: Option<FakeStep>) {
        self.lock().fail_at = step;
    }

    /// Makes the VM's process exit as `step` succeeds from now on (`None` clears it), as a
    /// QEMU that dies right after resuming a corrupt template; see [`FakeHypervisor::exit`].
    pub fn exit_after(&self, step: Option<FakeStep>) {
        self.lock().exit_after = step;
    }

    /// Makes `status` hang from now on (`false` clears it), as the status query of a QEMU
    /// whose monitor stopped answering.
    pub fn hang_status(&self, hang: bool) {
        self.lock().status_hangs = hang;
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Current `(vcpus, memory_mib)`.
    pub fn size(&self) -> (u32, u64) {
        let g = self.lock();
        (g.vcpus, g.memory_mib)
    }

    fn lock(&self) -> MutexGuard<'_, FakeInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `call` and checks the injected failure and the run state.
    fn enter(
        &self,
        call: FakeCall,
        step: FakeStep,
        need_running: bool,
    ) -> Result<MutexGuard<'_, FakeInner>> {
        let mut g = self.lock();
        g.calls.push(call);
        if g.fail_at == Some(step) {
            return Err(Error::Injected { step: step.name() });
        }
        if let Some(exit) = self
            .exit
            .borrow()
            .clone()
            .filter(|_| step != FakeStep::Stop)
        {
            return Err(self.exited_error(exit));
        }
        let live = !matches!(g.status, VmStatus::NotStarted | VmStatus::Stopped);
        if need_running && !live {
            return Err(Error::NotRunning {
                id: self.id.clone(),
            });
        }
        Ok(g)
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn id(&self) -> &str {
        &self.id
    }

    fn config(&self) -> &HypervisorConfig {
        &self.config
    }

    fn run_dir(&self) -> &Path {
        &self.paths.dir
    }

    async fn start(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::Start, FakeStep::Start, false)?;
        // A pre-started clone waits in `inmigrate`, as QEMU does.
        if !matches!(g.status, VmStatus::NotStarted | VmStatus::InMigrate) {
            return Err(Error::AlreadyStarted {
                id: self.id.clone(),
            });
        }
        self.config.validate_shape()?;
        if let AgentChannel::Vsock { guest_cid } = self.config.agent_channel {
            let held = g.vsock_cid.or(guest_cid);
            g.vsock_cid = held.or_else(|| Some(NEXT_FAKE_CID.fetch_add(1, Ordering::Relaxed)));
        }
        g.status = if self.config.clones_template() {
            VmStatus::Paused
        } else {
            VmStatus::Running
        };
        self.done(&g, FakeStep::Start);
        Ok(())
    }

    async fn prestart(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::Prestart, FakeStep::Prestart, false)?;
        if g.status != VmStatus::NotStarted {
            return Err(Error::AlreadyStarted {
                id: self.id.clone(),
            });
        }
        self.config.validate_shape()?;
        if self.config.clones_template() {
            g.status = VmStatus::InMigrate;
        }
        self.done(&g, FakeStep::Prestart);
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::Stop, FakeStep::Stop, false)?;
        g.status = VmStatus::Stopped;
        g.vsock_cid = None;
        self.exit.send_replace(None);
        Ok(())
    }

    async fn exited(&self) -> Error {
        let mut rx = self.exit.subscribe();
        // The sender lives as long as `self`: `wait_for` fails only if it is dropped under us.
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|e| e.clone());
        match exit {
            Some(exit) => self.exited_error(exit),
            None => std::future::pending().await,
        }
    }

    async fn pause(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::Pause, FakeStep::Pause, true)?;
        g.status = VmStatus::Paused;
        self.done(&g, FakeStep::Pause);
        Ok(())
    }

    async fn resume(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::Resume, FakeStep::Resume, true)?;
        g.status = VmStatus::Running;
        self.done(&g, FakeStep::Resume);
        Ok(())
    }

    async fn save_template(&self) -> Result<()> {
        let mut g = self.enter(FakeCall::SaveTemplate, FakeStep::SaveTemplate, true)?;
        if !self.config.saves_template() {
            return Err(Error::Unsupported {
                id: self.id.clone(),
                what: "Saving a template (the VM has no save-to template role)",
            });
        }
        g.status = VmStatus::PostMigrate;
        self.done(&g, FakeStep::SaveTemplate);
        Ok(())
    }

    async fn add_vcpus(&self, n: u32) -> Result<u32> {
        let mut g = self.enter(FakeCall::AddVcpus(n), FakeStep::AddVcpus, true)?;
        let added = n.min(self.config.max_vcpus.saturating_sub(g.vcpus));
        g.vcpus += added;
        self.done(&g, FakeStep::AddVcpus);
        Ok(added)
    }

    async fn add_memory(&self, mib: u64) -> Result<u64> {
        let mut g = self.enter(FakeCall::AddMemory(mib), FakeStep::AddMemory, true)?;
        if mib == 0 {
            return Ok(0);
        }
        if self.config.memory_slots == 0 {
            return Err(Error::Unsupported {
                id: self.id.clone(),
                what: "Memory hotplug (no memory slots)",
            });
        }
        if g.memory_mib + mib > self.config.max_memory_mib {
            return Err(Error::MemoryLimit {
                id: self.id.clone(),
                requested_mib: mib,
                current_mib: g.memory_mib,
                max_mib: self.config.max_memory_mib,
            });
        }
        if g.slots_used >= self.config.memory_slots {
            return Err(Error::NoFreeMemorySlot {
                id: self.id.clone(),
            });
        }
        g.slots_used += 1;
        g.memory_mib += mib;
        self.done(&g, FakeStep::AddMemory);
        Ok(mib)
    }

    /// Checks the path's shape but opens nothing; slots are the root ports' on q35 (`10/00`,
    /// `11/00`, ...) and the same slot numbers on `pci.0` on pc (`10`, ...).
    async fn attach_disk(&self, disk: &DiskConfig) -> Result<AttachedDisk> {
        let call = FakeCall::AttachDisk(disk.clone());
        let mut g = self.enter(call, FakeStep::AttachDisk, true)?;
        if self.config.machine == MachineType::Microvm {
            return Err(Error::Unsupported {
                id: self.id.clone(),
                what: "Disk hotplug (microvm has no PCI)",
            });
        }
        disk.qemu_path()?;
        let port = (0..self.config.disk_slots)
            .map(|i| {
                let slot = root_port_slot(i);
                match self.config.machine {
                    MachineType::Q35 => pci_path(&[slot, 0]),
                    _ => pci_path(&[slot]),
                }
            })
            .find(|p| !g.disks.iter().any(|d| d.pci_path == *p))
            .ok_or_else(|| DiskError::NoFreeSlot {
                id: self.id.clone(),
                slots: self.config.disk_slots,
            })?;
        let attached = AttachedDisk {
            id: format!("disk{}", g.next_disk_id),
            pci_path: port,
            config: disk.clone(),
        };
        g.next_disk_id += 1;
        g.disks.push(attached.clone());
        self.done(&g, FakeStep::AttachDisk);
        Ok(attached)
    }

    async fn detach_disk(&self, id: &str) -> Result<()> {
        let call = FakeCall::DetachDisk(id.to_owned());
        let mut g = self.enter(call, FakeStep::DetachDisk, true)?;
        let Some(index) = g.disks.iter().position(|d| d.id == id) else {
            return Err(DiskError::UnknownDisk {
                id: self.id.clone(),
                disk: id.to_owned(),
            }
            .into());
        };
        g.disks.remove(index);
        self.done(&g, FakeStep::DetachDisk);
        Ok(())
    }

    async fn disks(&self) -> Vec<AttachedDisk> {
        self.lock().disks.clone()
    }

    async fn status(&self) -> Result<VmStatus> {
        let status = {
            let g = self.enter(FakeCall::Status, FakeStep::Status, false)?;
            (!g.status_hangs).then(|| g.status.clone())
        };
        match status {
            Some(status) => Ok(status),
            None => std::future::pending().await,
        }
    }

    async fn size(&self) -> Result<VmSize> {
        let g = self.enter(FakeCall::Size, FakeStep::Size, false)?;
        Ok(VmSize {
            vcpus: g.vcpus,
            memory_mib: g.memory_mib,
        })
    }

    fn pid(&self) -> Option<u32> {
        None
    }

    fn console_address(&self) -> PathBuf {
        self.paths.console.clone()
    }

    fn console_log_path(&self) -> PathBuf {
        self.paths.console_log.clone()
    }

    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        agent_endpoint(
            &self.config.agent_channel,
            &self.paths,
            self.lock().vsock_cid,
        )
    }

    async fn state(&self) -> QemuState {
        self.snapshot(&self.lock())
    }

    async fn detach(&self) -> Result<QemuState> {
        let mut g = self.enter(FakeCall::Detach, FakeStep::Detach, true)?;
        g.status = VmStatus::Stopped;
        let state = self.snapshot(&g);
        g.vsock_cid = None;
        Ok(state)
    }
}

impl FakeHypervisor {
    /// The wire form of the VM as `g` describes it.
    fn snapshot(&self, g: &FakeInner) -> QemuState {
        QemuState {
            version: QEMU_STATE_VERSION,
            id: self.id.clone(),
            config: self.config.clone(),
            accel: self.config.accel,
            paths: self.paths.clone(),
            pid: None,
            pid_start_time: None,
            backend: None,
            vsock_cid: g.vsock_cid,
            created_run_dir: false,
            vcpus: g.vcpus,
            memory_mib: g.memory_mib,
            next_cpu_id: g.vcpus,
            next_mem_id: g.slots_used + 1,
            disks: g.disks.clone(),
            next_disk_id: g.next_disk_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HypervisorConfig {
        let mut c = HypervisorConfig::new("/k", None);
        c.max_vcpus = 4;
        c.memory_slots = 2;
        c.max_memory_mib = 1024;
        c
    }

    #[tokio::test]
    async fn records_and_tracks_size() {
        let hv = FakeHypervisor::new("f", cfg(), "/run/f");
        let dynhv: Arc<dyn Hypervisor> = Arc::new(hv.clone());
        assert!(matches!(dynhv.pause().await, Err(Error::NotRunning { .. })));
        dynhv.start().await.expect("start");
        assert_eq!(dynhv.add_vcpus(5).await.expect("cpus"), 3);
        assert_eq!(dynhv.add_memory(256).await.expect("mem"), 256);
        assert!(matches!(
            dynhv.add_memory(1024).await,
            Err(Error::MemoryLimit { .. })
        ));
        assert_eq!(hv.size(), (4, 512));
        dynhv.stop().await.expect("stop");
        assert_eq!(dynhv.status().await.expect("status"), VmStatus::Stopped);
        assert_eq!(
            hv.calls(),
            [
                FakeCall::Pause,
                FakeCall::Start,
                FakeCall::AddVcpus(5),
                FakeCall::AddMemory(256),
                FakeCall::AddMemory(1024),
                FakeCall::Stop,
                FakeCall::Status
            ]
        );
    }

    #[tokio::test]
    async fn exit_ends_waits_and_fails_operations_until_stopped() {
        use std::os::unix::process::ExitStatusExt;
        let hv = FakeHypervisor::new("f", cfg(), "/run/f");
        hv.exit(ExitStatus::from_raw(9), "ignored: not running");
        hv.start().await.expect("start");
        let waiter = {
            let hv = hv.clone();
            tokio::spawn(async move { hv.exited().await })
        };
        tokio::task::yield_now().await;
        hv.exit(ExitStatus::from_raw(9), "qemu: boom");
        let err = waiter.await.expect("join");
        assert!(
            matches!(&err, Error::Exited { status: Some(s), stderr_tail, .. }
                if s.signal() == Some(9) && stderr_tail == "qemu: boom"),
            "{err:?}"
        );
        assert!(matches!(hv.resume().await, Err(Error::Exited { .. })));
        assert!(matches!(hv.status().await, Err(Error::Exited { .. })));
        hv.stop().await.expect("stop cleans up after a dead VM");
        let hv2 = FakeHypervisor::new("g", cfg(), "/run/g");
        hv2.exit_after(Some(FakeStep::Resume));
        hv2.start().await.expect("start");
        hv2.pause().await.expect("pause");
        hv2.resume().await.expect("the resume itself succeeds");
        assert!(matches!(hv2.status().await, Err(Error::Exited { .. })));
        assert_eq!(hv.status().await.expect("status"), VmStatus::Stopped);
        let pending = tokio::time::timeout(std::time::Duration::from_millis(20), hv.exited());
        assert!(pending.await.is_err(), "no exit after a stop");
    }

    #[tokio::test]
    async fn vsock_cids_are_held_while_running_and_kept_on_attach() {
        let mut c = cfg();
        c.agent_channel = AgentChannel::Vsock { guest_cid: None };
        let (a, b) = (
            FakeHypervisor::new("a", c.clone(), "/run/a"),
            FakeHypervisor::new("b", c, "/run/b"),
        );
        assert_eq!(a.agent_endpoint(), None, "no CID before start");
        a.start().await.expect("start");
        b.start().await.expect("start");
        let (Some(ea), Some(eb)) = (a.agent_endpoint(), b.agent_endpoint()) else {
            panic!("running VMs hold CIDs");
        };
        assert_ne!(ea, eb);
        let st = a.detach().await.expect("detach");
        assert_eq!(a.agent_endpoint(), None);
        let again = FakeHypervisor::attached(&st);
        again.start().await.expect("attach");
        assert_eq!(again.agent_endpoint(), Some(ea));
        b.stop().await.expect("stop");
        assert_eq!(b.agent_endpoint(), None);
    }

    #[tokio::test]
    async fn disks_get_slots_until_full_and_survive_a_detach() {
        use crate::disk::DiskFormat;
        let mut c = cfg();
        c.disk_slots = 2;
        let hv = FakeHypervisor::new("f", c, "/run/f");
        let disk = DiskConfig::new("/i/a.raw", DiskFormat::Raw);
        assert!(matches!(
            hv.attach_disk(&disk).await,
            Err(Error::NotRunning { .. })
        ));
        hv.start().await.expect("start");
        let a = hv.attach_disk(&disk).await.expect("attach");
        let b = hv.attach_disk(&disk).await.expect("attach");
        assert_eq!(
            (a.id.as_str(), a.pci_path.as_str(), b.pci_path.as_str()),
            ("disk1", "10/00", "11/00")
        );
        assert!(matches!(
            hv.attach_disk(&disk).await,
            Err(Error::Disk(DiskError::NoFreeSlot { slots: 2, .. }))
        ));
        hv.detach_disk("disk1").await.expect("detach");
        assert!(matches!(
            hv.detach_disk("disk1").await,
            Err(Error::Disk(DiskError::UnknownDisk { .. }))
        ));
        let c = hv.attach_disk(&disk).await.expect("the freed slot");
        assert_eq!((c.id.as_str(), c.pci_path.as_str()), ("disk3", "10/00"));
        hv.fail_at(Some(FakeStep::AttachDisk));
        assert!(matches!(
            hv.attach_disk(&disk).await,
            Err(Error::Injected {
                step: "attach_disk"
            })
        ));
        let st = hv.detach().await.expect("detach");
        assert_eq!(st.disks, [b.clone(), c.clone()]);
        let again = FakeHypervisor::attached(&st);
        again.start().await.expect("attach");
        assert_eq!(again.disks().await, [b, c]);
        assert_eq!(
            again.attach_disk(&disk).await.map(|d| d.id).ok(),
            None,
            "still full"
        );
    }

    #[tokio::test]
    async fn injected_failure() {
        let hv = FakeHypervisor::new("f", cfg(), "/run/f");
        hv.fail_at(Some(FakeStep::Start));
        assert!(matches!(
            hv.start().await,
            Err(Error::Injected { step: "start" })
        ));
        hv.fail_at(None);
        hv.start().await.expect("start");
        assert_eq!(hv.status().await.expect("status"), VmStatus::Running);
    }
}
