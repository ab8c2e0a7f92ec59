//! Fault injection on real QEMU: QEMU SIGKILLed at each stage of a boot, during the agent
//! wait, during a template save, during a clone's restore and during a hotplug; a guest that
//! stops answering (QEMU SIGSTOPped); a template tmpfs with no room left for the device
//! state; the template's state file deleted or truncated, or its memory file corrupted, under
//! a live factory. Each fault must end in a typed error (a QEMU that died: its exit, at once),
//! and `RunRoot::assert_no_leaks` must find no process, mount, socket or directory afterwards.
//!
//! Faults are injected through the public hooks: a [`Backends`] wrapping [`QemuBackends`]
//! whose `before` kills QEMU at a [`NewStep`], and whose hypervisors wrap QEMU's to kill it
//! (or fill its template tmpfs) when an operation starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmfactory_agent::{Agent, AgentUrl};
use vmfactory_e2e::{guest_env, vm, GuestEnv, RunRoot};
use vmfactory_factory::{
    error_chain, BaseError, BaseKind, Factory, FactoryConfig, GetVmError, GetVmStep,
    NewFactoryError, SystemHost, TemplateError, TemplateFactory, TemplateStep, MEMORY_FILE,
    STATE_FILE,
};
use vmfactory_hypervisor::{
    AgentEndpoint, AttachedDisk, DiskConfig, Error as HvError, Hypervisor, HypervisorConfig,
    QemuState, VmSize, VmStatus,
};
use vmfactory_proxy::{Proxy, ProxyKind};
use vmfactory_vm::{
    Backends, Error as VmError, NewStep, QemuBackends, Vm, VmAgentConfig, VmConfig,
};

/// Ready bound for scenarios where QEMU dies before the agent answers. Generous on purpose:
/// `Vm::new`'s agent wait ends as soon as QEMU exits (`HypervisorExited`); running out this
/// bound (`AgentNotReady`) would mean it no longer notices.
const DEAD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a [`FaultyHv`] strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HvFault {
    /// SIGKILL QEMU as `save_template` starts.
    KillOnSave,
    /// Fill the template tmpfs (memory file's directory) before `save_template`.
    FillOnSave,
    /// SIGKILL a clone's QEMU as soon as it has a pid, while `start` loads the template.
    KillOnCloneStart,
    /// SIGKILL QEMU as `add_vcpus` starts.
    KillOnAddVcpus,
}

/// [`QemuBackends`] with faults.
#[derive(Debug, Default)]
struct Faulty {
    kill_at: Option<NewStep>,
    /// Kill this long after `kill_at` begins (in a task), instead of right away.
    kill_delay: Option<Duration>,
    hv_fault: Option<HvFault>,
    hvs: Mutex<HashMap<String, Arc<dyn Hypervisor>>>,
}

impl Faulty {
    fn at(step: NewStep) -> Self {
        Self {
            kill_at: Some(step),
            ..Self::default()
        }
    }

    fn hv(fault: HvFault) -> Self {
        Self {
            hv_fault: Some(fault),
            ..Self::default()
        }
    }
}

fn sigkill(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[async_trait]
impl Backends for Faulty {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        let inner = QemuBackends.hypervisor(id, config, run_dir)?;
        self.hvs
            .lock()
            .expect("lock")
            .insert(id.to_owned(), inner.clone());
        Ok(Arc::new(FaultyHv {
            inner,
            fault: self.hv_fault,
        }))
    }

    async fn attach_hypervisor(
        &self,
        state: QemuState,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        QemuBackends.attach_hypervisor(state).await
    }

    fn agent(
        &self,
        id: &str,
        url: &AgentUrl,
        config: &VmAgentConfig,
    ) -> vmfactory_vm::Result<Arc<dyn Agent>> {
        QemuBackends.agent(id, url, config)
    }

    fn proxy(&self, kind: ProxyKind) -> Arc<dyn Proxy> {
        QemuBackends.proxy(kind)
    }

    async fn before(&self, id: &str, step: NewStep) -> vmfactory_vm::Result<()> {
        if self.kill_at != Some(step) {
            return Ok(());
        }
        let hv = self.hvs.lock().expect("lock").get(id).cloned();
        if let Some(hv) = hv {
            match self.kill_delay {
                None => sigkill(hv.pid()),
                Some(d) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        sigkill(hv.pid());
                    });
                }
            }
        }
        Ok(())
    }
}

/// A QEMU hypervisor with one fault.
#[derive(Debug)]
struct FaultyHv {
    inner: Arc<dyn Hypervisor>,
    fault: Option<HvFault>,
}

/// Fills the file system holding `dir` with a filler file until it is full.
fn fill(dir: &Path) {
    use std::io::Write;
    let Ok(mut f) = std::fs::File::create(dir.join("filler")) else {
        return;
    };
    let chunk = vec![0xa5u8; 1 << 20];
    while f.write_all(&chunk).is_ok() {}
    while f.write_all(&chunk[..4096]).is_ok() {}
    while f.write_all(&chunk[..1]).is_ok() {}
}

#[async_trait]
impl Hypervisor for FaultyHv {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn config(&self) -> &HypervisorConfig {
        self.inner.config()
    }
    fn run_dir(&self) -> &Path {
        self.inner.run_dir()
    }
    async fn start(&self) -> vmfactory_hypervisor::Result<()> {
        if self.fault == Some(HvFault::KillOnCloneStart) && self.config().clones_template() {
            // `pid()` is known only once `start` returns: find QEMU by its run directory.
            let dir = self.inner.run_dir().to_string_lossy().into_owned();
            let killer = tokio::spawn(async move {
                loop {
                    let pid = vmfactory_e2e::processes_mentioning(&dir)
                        .first()
                        .and_then(|l| l.strip_prefix("process "))
                        .and_then(|l| l.split(':').next())
                        .and_then(|p| p.parse::<u32>().ok());
                    if pid.is_some() {
                        sigkill(pid);
                        return;
                    }
                    tokio::task::yield_now().await;
                }
            });
            let res = self.inner.start().await;
            killer.abort();
            return res;
        }
        self.inner.start().await
    }
    async fn stop(&self) -> vmfactory_hypervisor::Result<()> {
        self.inner.stop().await
    }
    async fn exited(&self) -> vmfactory_hypervisor::Error {
        self.inner.exited().await
    }
    async fn pause(&self) -> vmfactory_hypervisor::Result<()> {
        self.inner.pause().await
    }
    async fn resume(&self) -> vmfactory_hypervisor::Result<()> {
        self.inner.resume().await
    }
    async fn save_template(&self) -> vmfactory_hypervisor::Result<()> {
        match self.fault {
            Some(HvFault::KillOnSave) => sigkill(self.inner.pid()),
            Some(HvFault::FillOnSave) => {
                if let Some(dir) = self
                    .config()
                    .template
                    .as_ref()
                    .and_then(|t| t.paths().memory.parent())
                {
                    let dir = dir.to_owned();
                    let _ = tokio::task::spawn_blocking(move || fill(&dir)).await;
                }
            }
            _ => {}
        }
        self.inner.save_template().await
    }
    async fn add_vcpus(&self, n: u32) -> vmfactory_hypervisor::Result<u32> {
        if self.fault == Some(HvFault::KillOnAddVcpus) {
            sigkill(self.inner.pid());
        }
        self.inner.add_vcpus(n).await
    }
    async fn add_memory(&self, mib: u64) -> vmfactory_hypervisor::Result<u64> {
        self.inner.add_memory(mib).await
    }
    async fn attach_disk(&self, disk: &DiskConfig) -> vmfactory_hypervisor::Result<AttachedDisk> {
        self.inner.attach_disk(disk).await
    }
    async fn detach_disk(&self, id: &str) -> vmfactory_hypervisor::Result<()> {
        self.inner.detach_disk(id).await
    }
    async fn disks(&self) -> Vec<AttachedDisk> {
        self.inner.disks().await
    }
    async fn status(&self) -> vmfactory_hypervisor::Result<VmStatus> {
        self.inner.status().await
    }
    async fn size(&self) -> vmfactory_hypervisor::Result<VmSize> {
        self.inner.size().await
    }
    fn pid(&self) -> Option<u32> {
        self.inner.pid()
    }
    fn console_address(&self) -> PathBuf {
        self.inner.console_address()
    }
    fn console_log_path(&self) -> PathBuf {
        self.inner.console_log_path()
    }
    fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        self.inner.agent_endpoint()
    }
    async fn state(&self) -> QemuState {
        self.inner.state().await
    }
    async fn detach(&self) -> vmfactory_hypervisor::Result<QemuState> {
        self.inner.detach().await
    }
}

fn vm_config(env: &GuestEnv, root: &RunRoot) -> VmConfig {
    let mut cfg = vm::vm_config(vm::config(env));
    cfg.run_root = root.path().to_owned();
    cfg
}

/// SIGKILL at `step` of `Vm::new`: a typed error and nothing left.
async fn kill_at(step: NewStep, delay: Option<Duration>) -> VmError {
    let env = guest_env().expect("checked by the caller");
    let root = RunRoot::new();
    let mut cfg = vm_config(&env, &root);
    cfg.agent.ready_timeout = DEAD_READY_TIMEOUT;
    let mut faulty = Faulty::at(step);
    faulty.kill_delay = delay;
    let err = Vm::new_with(cfg, &faulty)
        .await
        .expect_err("QEMU was killed");
    assert!(!err.to_string().contains('\n'), "{err}");
    root.assert_no_leaks();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_boot() {
    if guest_env().is_none() {
        return;
    }
    // Right after QEMU started, before the proxy attaches to its console.
    let err = kill_at(NewStep::StartProxy, None).await;
    assert!(
        matches!(
            err.failure(),
            VmError::Proxy { .. } | VmError::HypervisorExited { .. }
        ),
        "{err:?}"
    );
    // Before the agent client exists, and as the agent wait begins: the wait notices that
    // QEMU is gone (its exit), instead of running out its timeout.
    for step in [NewStep::CreateAgent, NewStep::CheckAgent] {
        let err = kill_at(step, None).await;
        assert!(
            matches!(err.failure(), VmError::HypervisorExited { .. }),
            "{step:?}: {err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_the_agent_wait() {
    if guest_env().is_none() {
        return;
    }
    // The guest is still booting (a TCG boot takes ~2 s) when QEMU dies.
    let err = kill_at(NewStep::CheckAgent, Some(Duration::from_millis(300))).await;
    assert!(
        matches!(err.failure(), VmError::HypervisorExited { .. }),
        "{err:?}"
    );
}

/// A template made with `faulty` at a path under `root`: must fail typed and leave nothing.
async fn failing_template(env: &GuestEnv, faulty: Faulty) -> TemplateError {
    let root = RunRoot::new();
    let cfg = vm_config(env, &root);
    let err = TemplateFactory::new_with(
        &cfg,
        root.path().join("template"),
        Arc::new(faulty),
        Arc::new(SystemHost),
    )
    .await
    .expect_err("the template cannot be made");
    assert!(!err.to_string().contains('\n'), "{err}");
    root.assert_no_leaks();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_template_save() {
    let Some(env) = guest_env() else { return };
    let err = failing_template(&env, Faulty::hv(HvFault::KillOnSave)).await;
    assert!(
        matches!(
            err,
            TemplateError::Vm {
                step: TemplateStep::Save,
                ..
            }
        ) && err.hypervisor_exit().is_some(),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_tmpfs_full_at_save() {
    let Some(env) = guest_env() else { return };
    let err = failing_template(&env, Faulty::hv(HvFault::FillOnSave)).await;
    assert!(
        matches!(
            err,
            TemplateError::Vm {
                step: TemplateStep::Save,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A template factory with `backends`, its path under `root`.
async fn template_factory(
    env: &GuestEnv,
    root: &RunRoot,
    backends: Arc<dyn Backends>,
) -> (FactoryConfig, Factory) {
    let mut cfg = FactoryConfig::new(vm_config(env, root));
    cfg.template = true;
    cfg.template_path = root.path().join("template");
    let f = Factory::new_with(&cfg, backends, Arc::new(SystemHost))
        .await
        .expect("factory");
    assert_eq!(f.kind(), BaseKind::Template);
    (cfg, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_during_clone_restore_and_hotplug() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (cfg, f) =
        template_factory(&env, &root, Arc::new(Faulty::hv(HvFault::KillOnCloneStart))).await;
    let err = f.get_vm(&cfg.vm).await.expect_err("the clone was killed");
    assert!(
        matches!(
            err,
            GetVmError::Base(BaseError::Template(TemplateError::Vm {
                step: TemplateStep::Clone,
                ..
            }))
        ) && err.hypervisor_exit().is_some(),
        "{err:?}"
    );
    f.close().await.expect("close");
    root.assert_no_leaks();

    let root = RunRoot::new();
    let (mut cfg, f) =
        template_factory(&env, &root, Arc::new(Faulty::hv(HvFault::KillOnAddVcpus))).await;
    cfg.vm.hypervisor.vcpus = 2;
    let err = f.get_vm(&cfg.vm).await.expect_err("killed during hotplug");
    assert!(
        matches!(
            err,
            GetVmError::Step {
                step: GetVmStep::AddCpus,
                ..
            }
        ) && err.hypervisor_exit().is_some(),
        "{err:?}"
    );
    f.close().await.expect("close");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_stops_answering() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut cfg = vm_config(&env, &root);
    cfg.agent.call_timeout = Duration::from_secs(2);
    let v = Vm::new(cfg).await.expect("boot");
    let pid = v.hypervisor().pid().expect("pid");
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGSTOP,
    )
    .expect("SIGSTOP");
    // A hang guard, not a timing assertion: the call must end by itself.
    let res = tokio::time::timeout(
        vmfactory_e2e::scaled(Duration::from_secs(30)),
        v.agent().check(),
    )
    .await
    .expect("the call ends within its bound");
    assert!(
        matches!(res, Err(vmfactory_agent::Error::Timeout { .. })),
        "{res:?}"
    );
    tokio::time::timeout(vmfactory_e2e::scaled(Duration::from_secs(60)), v.stop())
        .await
        .expect("stop ends")
        .expect("stop kills a stopped QEMU");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_state_deleted_or_truncated_under_a_live_factory() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (cfg, f) = template_factory(&env, &root, Arc::new(QemuBackends)).await;
    let state = cfg.template_path.join(STATE_FILE);
    let bytes = std::fs::read(&state).expect("state");

    // Truncated: refused before a clone starts (the save recorded its size).
    std::fs::write(&state, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = f.get_vm(&cfg.vm).await.expect_err("truncated state");
    assert!(
        matches!(
            err,
            GetVmError::Base(BaseError::Template(TemplateError::FileSize { .. }))
        ),
        "{err:?}"
    );

    // Deleted: fetch refuses it, and so does the clone.
    std::fs::remove_file(&state).expect("rm");
    let err = f.get_vm(&cfg.vm).await.expect_err("no state");
    assert!(
        matches!(
            err,
            GetVmError::Base(BaseError::Template(TemplateError::Missing { .. }))
        ),
        "{err:?}"
    );
    assert!(matches!(
        TemplateFactory::fetch(&cfg.vm, &cfg.template_path).await,
        Err(TemplateError::Missing { .. })
    ));
    let mut fetch = cfg.clone();
    fetch.fetch_only = true;
    assert!(matches!(
        Factory::new(&fetch).await,
        Err(NewFactoryError::Template(TemplateError::Missing { .. }))
    ));
    // A new template factory on the occupied path never mounts over it: it falls back to
    // direct VMs (logged).
    let other = Factory::new(&cfg).await.expect("fallback");
    assert_eq!(other.kind(), BaseKind::Direct);
    other.close().await.expect("close");

    // Closing the broken factory removes the template; the next one rebuilds it.
    f.close().await.expect("close");
    let rebuilt = Factory::new(&cfg).await.expect("rebuilt");
    assert_eq!(rebuilt.kind(), BaseKind::Template);
    let v = rebuilt
        .get_vm(&cfg.vm)
        .await
        .expect("a clone of the new template");
    v.stop().await.expect("stop");
    rebuilt.close().await.expect("close");
    root.assert_no_leaks();
}

/// A VM whose owner went away without stopping it (here: handed over and never taken, as
/// when the VM-cache server dies with VMs in flight) is an orphan: `Vm::reap_orphans` stops
/// it and removes its storage, and leaves a VM with a live owner alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_vms_are_reaped_and_owned_ones_kept() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let owned = Vm::new(vm_config(&env, &root)).await.expect("owned VM");
    let orphan = Vm::new(vm_config(&env, &root)).await.expect("orphan VM");
    let orphan_id = orphan.id().to_owned();
    let orphan_pid = orphan.hypervisor().pid().expect("pid");
    let _wire = orphan.detach().await.expect("detach");
    drop(orphan);

    let reaped = Vm::reap_orphans(root.path()).await.expect("reap");
    assert_eq!(reaped, vec![orphan_id]);
    assert!(
        !Path::new(&format!("/proc/{orphan_pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{orphan_pid}/cmdline"))
                .map(|c| c.is_empty())
                .unwrap_or(true),
        "the orphan's QEMU still runs"
    );
    // The owned VM was not touched and still answers.
    owned.agent().check().await.expect("owned VM answers");
    assert!(Vm::reap_orphans(root.path())
        .await
        .expect("reap")
        .is_empty());
    owned.stop().await.expect("stop");
    root.assert_no_leaks();
}

/// Overwrites `memory` in place with garbage of the same size (so the template's size checks
/// still pass), as a damaged template file would be; returns its modification time before.
fn corrupt(memory: &Path) -> std::time::SystemTime {
    use std::io::Write;
    let meta = std::fs::metadata(memory).expect("memory file");
    let saved = meta.modified().expect("mtime");
    // File times tick with the kernel's coarse clock: make the write's time differ.
    std::thread::sleep(Duration::from_millis(20));
    let len = meta.len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(memory)
        .expect("open memory");
    let chunk = vec![0xffu8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).expect("chunk");
        f.write_all(&chunk[..n]).expect("overwrite memory");
        left -= n as u64;
    }
    f.sync_all().expect("sync");
    saved
}

/// A template's `memory` file overwritten after the save (same size, so the size checks pass).
/// First it is refused before any clone maps it: its modification time is not the one the
/// metadata recorded. Then, with the time put back (damage the file times do not show), a
/// clone runs on garbage: QEMU may exit (its device state no longer matches the rings in
/// memory), or the guest may hang and QEMU's monitor with it (seen in 1 of ~7 runs). Either
/// way `get_vm` fails with one line, quoting QEMU if it exited, within the agent's dial
/// timeout plus bounded checks (it took 97 s when a hung monitor held up every QMP query), and
/// leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_template_memory_is_refused_or_fails_fast() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (cfg, f) = template_factory(&env, &root, Arc::new(QemuBackends)).await;
    let memory = cfg.template_path.join(MEMORY_FILE);
    let saved = corrupt(&memory);
    let err = f.get_vm(&cfg.vm).await.expect_err("modified memory");
    let chain = error_chain(&err);
    eprintln!("get_vm on a modified memory file: {chain}");
    assert!(
        matches!(
            err,
            GetVmError::Base(BaseError::Template(TemplateError::Modified { .. }))
        ),
        "{err:?}"
    );
    assert!(!chain.contains('\n'), "{chain}");

    std::fs::File::options()
        .write(true)
        .open(&memory)
        .and_then(|f| f.set_modified(saved))
        .expect("put the time back");
    let t = std::time::Instant::now();
    let err = f.get_vm(&cfg.vm).await.expect_err("corrupt memory");
    let elapsed = t.elapsed();
    let chain = error_chain(&err);
    eprintln!("get_vm on corrupt memory failed in {elapsed:?}: {chain}");
    if let Some(HvError::Exited {
        what: "QEMU",
        stderr_tail,
        ..
    }) = err.hypervisor_exit()
    {
        assert!(!stderr_tail.is_empty(), "QEMU's own message: {err:?}");
        assert!(chain.contains(stderr_tail.as_str()), "{chain}");
    }
    assert!(!chain.contains('\n'), "{chain}");
    // Not a timing assertion: only that no wait beyond the agent's dial ran to its end.
    let bound = cfg.vm.agent.dial_timeout + vmfactory_e2e::scaled(Duration::from_secs(10));
    assert!(elapsed < bound, "{elapsed:?}");
    f.close().await.expect("close");
    root.assert_no_leaks();
}
