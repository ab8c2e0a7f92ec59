//! Test doubles shared by the unit tests: [`FakeBackends`] builds VMs from `FakeHypervisor`,
//! `FakeAgent` and a console proxy that shows the agent re-listening; [`FakeHost`] stands in
//! for mounts and QEMU's version. Failures are injectable per VM kind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use vmfactory_agent::{Agent, AgentUrl, FakeAgent};
use vmfactory_hypervisor::{
    FakeHypervisor, FakeStep, Hypervisor, HypervisorConfig, QemuState, TemplateRole, VmStatus,
};
use vmfactory_proxy::{Proxy, ProxyKind};
use vmfactory_vm::{Backends, NewStep, VmAgentConfig, VmConfig};

use crate::template::{MountOutcome, TemplateError, TemplateHost, MEMORY_FILE, STATE_FILE};

/// The line the fake guest agent "prints" when it re-listens.
const LISTENING: &str = "vmfactory-agent: listening on agent.channel.0";

/// A proxy whose console shows the agent re-listening as soon as someone subscribes (when
/// `relisten` is set).
#[derive(Debug)]
pub(crate) struct TestProxy {
    lines: broadcast::Sender<String>,
    relisten: bool,
    running: AtomicBool,
}

#[async_trait]
impl Proxy for TestProxy {
    async fn start(&self, _id: &str, _c: &Path) -> vmfactory_proxy::Result<()> {
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    fn kind(&self) -> ProxyKind {
        ProxyKind::Builtin
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        let rx = self.lines.subscribe();
        if self.relisten {
            let _ = self.lines.send(LISTENING.to_owned());
        }
        Some(rx)
    }
}

/// VM parts for the factories under test, and a temporary run root with a kernel and initrd.
#[derive(Debug)]
pub(crate) struct FakeBackends {
    dir: tempfile::TempDir,
    hvs: Mutex<HashMap<String, FakeHypervisor>>,
    agents: Mutex<HashMap<String, Arc<FakeAgent>>>,
    /// Agent methods every new agent fails.
    pub(crate) agent_fail: Mutex<Vec<&'static str>>,
    /// Agent methods every new agent hangs in (never answers).
    pub(crate) agent_hang: Mutex<Vec<&'static str>>,
    /// Applied to each new non-template hypervisor.
    pub(crate) hv_fail: Mutex<Option<FakeStep>>,
    /// Applied to each new template (`boot_to_be_template`) hypervisor.
    pub(crate) template_fail: Mutex<Option<FakeStep>>,
    /// The step after which each new hypervisor's process exits (QEMU dying).
    pub(crate) hv_exit_after: Mutex<Option<FakeStep>>,
    /// Whether the template VM's console shows the agent re-listening.
    pub(crate) relisten: AtomicBool,
    /// How long each hypervisor start takes.
    pub(crate) boot_delay: Mutex<Duration>,
    /// Hypervisors created so far.
    pub(crate) boots: AtomicU32,
}

impl FakeBackends {
    pub(crate) fn new() -> Arc<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmf-fac-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::write(dir.path().join("kernel"), b"kernel").expect("kernel");
        std::fs::write(dir.path().join("initrd"), b"initrd").expect("initrd");
        Arc::new(Self {
            dir,
            hvs: Mutex::default(),
            agents: Mutex::default(),
            agent_fail: Mutex::default(),
            agent_hang: Mutex::default(),
            hv_fail: Mutex::default(),
            template_fail: Mutex::default(),
            hv_exit_after: Mutex::default(),
            relisten: AtomicBool::new(true),
            boot_delay: Mutex::new(Duration::ZERO),
            boots: AtomicU32::new(0),
        })
    }

    pub(crate) fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Where templates go in these tests.
    pub(crate) fn template_path(&self) -> PathBuf {
        self.root().join("template")
    }

    /// A hotplug-capable config (1 of 4 vCPUs, 256 MiB of 1 GiB, 2 slots) under the root.
    pub(crate) fn config(&self) -> VmConfig {
        let mut hv =
            HypervisorConfig::new(self.root().join("kernel"), Some(self.root().join("initrd")));
        hv.max_vcpus = 4;
        hv.memory_slots = 2;
        hv.max_memory_mib = 1024;
        let mut cfg = VmConfig::new(hv);
        cfg.run_root = self.root().to_owned();
        cfg.agent = VmAgentConfig {
            ready_timeout: Duration::from_millis(200),
            ..VmAgentConfig::default()
        };
        cfg
    }

    pub(crate) fn hv(&self, id: &str) -> FakeHypervisor {
        self.hvs.lock().expect("lock")[id].clone()
    }

    pub(crate) fn agent(&self, id: &str) -> Arc<FakeAgent> {
        self.agents.lock().expect("lock")[id].clone()
    }

    /// The agent of VM `id`, once it has one.
    pub(crate) fn agent_of(&self, id: &str) -> Option<Arc<FakeAgent>> {
        self.agents.lock().expect("lock").get(id).cloned()
    }

    /// Ids of hypervisors created from configs that satisfy `pred`.
    pub(crate) fn ids_where(&self, pred: impl Fn(&HypervisorConfig) -> bool) -> Vec<String> {
        let hvs = self.hvs.lock().expect("lock");
        hvs.iter()
            .filter(|(_, h)| pred(h.config()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// How many fake VMs are running or paused.
    pub(crate) async fn live(&self) -> usize {
        let hvs: Vec<FakeHypervisor> = self.hvs.lock().expect("lock").values().cloned().collect();
        let mut n = 0;
        for hv in hvs {
            if matches!(
                hv.status().await,
                Ok(VmStatus::Running | VmStatus::Paused | VmStatus::PostMigrate)
            ) {
                n += 1;
            }
        }
        n
    }

    /// The VM directories left under `<root>/vm`.
    pub(crate) fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.root().join("vm")).map_or(0, |d| d.count())
    }
}

#[async_trait]
impl Backends for FakeBackends {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        self.boots.fetch_add(1, Ordering::SeqCst);
        let hv = FakeHypervisor::new(id, config.clone(), run_dir);
        hv.exit_after(*self.hv_exit_after.lock().expect("lock"));
        if let Some(TemplateRole::SaveTo(paths)) = &config.template {
            hv.fail_at(*self.template_fail.lock().expect("lock"));
            // What QEMU would write: the RAM file now, the state file on save (here: now).
            let f = std::fs::File::create(&paths.memory).expect("memory file");
            f.set_len(config.memory_mib << 20).expect("size");
            std::fs::write(&paths.state, b"device state").expect("state file");
        } else {
            hv.fail_at(*self.hv_fail.lock().expect("lock"));
        }
        self.hvs
            .lock()
            .expect("lock")
            .insert(id.to_owned(), hv.clone());
        Ok(Arc::new(hv))
    }

    async fn attach_hypervisor(
        &self,
        state: QemuState,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        Ok(Arc::new(self.hv(&state.id)))
    }

    fn agent(
        &self,
        id: &str,
        _url: &AgentUrl,
        _c: &VmAgentConfig,
    ) -> vmfactory_vm::Result<Arc<dyn Agent>> {
        let agent = Arc::new(FakeAgent::new());
        for m in self.agent_fail.lock().expect("lock").iter() {
            agent.fail(m);
        }
        for m in self.agent_hang.lock().expect("lock").iter() {
            agent.hang(m);
        }
        self.agents
            .lock()
            .expect("lock")
            .insert(id.to_owned(), agent.clone());
        Ok(agent)
    }

    fn proxy(&self, _kind: ProxyKind) -> Arc<dyn Proxy> {
        Arc::new(TestProxy {
            lines: broadcast::channel(16).0,
            relisten: self.relisten.load(Ordering::SeqCst),
            running: AtomicBool::new(false),
        })
    }

    async fn before(&self, _id: &str, step: NewStep) -> vmfactory_vm::Result<()> {
        if step == NewStep::StartHypervisor {
            let delay = *self.boot_delay.lock().expect("lock");
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        Ok(())
    }
}

/// Mounts tracked in memory (with a stack count per path), a fixed QEMU version.
#[derive(Debug)]
pub(crate) struct FakeHost {
    pub(crate) mounts: Mutex<HashMap<PathBuf, u32>>,
    pub(crate) not_permitted: AtomicBool,
    pub(crate) qemu_version: Mutex<String>,
    pub(crate) mount_calls: AtomicU32,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self {
            mounts: Mutex::default(),
            not_permitted: AtomicBool::new(false),
            qemu_version: Mutex::new("QEMU emulator version 7.2.0 (fake)".into()),
            mount_calls: AtomicU32::new(0),
        }
    }
}

impl FakeHost {
    pub(crate) fn depth(&self, path: &Path) -> u32 {
        self.mounts
            .lock()
            .expect("lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

#[async_trait]
impl TemplateHost for FakeHost {
    async fn mount_type(&self, path: &Path) -> Result<Option<String>, TemplateError> {
        Ok((self.depth(path) > 0).then(|| "tmpfs".to_owned()))
    }

    async fn mount_tmpfs(&self, path: &Path, _size: u64) -> Result<MountOutcome, TemplateError> {
        self.mount_calls.fetch_add(1, Ordering::SeqCst);
        if self.not_permitted.load(Ordering::SeqCst) {
            return Ok(MountOutcome::NotPermitted);
        }
        assert!(path.is_dir(), "mount point {} must exist", path.display());
        *self
            .mounts
            .lock()
            .expect("lock")
            .entry(path.to_owned())
            .or_default() += 1;
        Ok(MountOutcome::Mounted)
    }

    async fn unmount(&self, path: &Path) -> Result<(), TemplateError> {
        let mut mounts = self.mounts.lock().expect("lock");
        match mounts.get_mut(path) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => Err(TemplateError::Unmount {
                path: path.to_owned(),
                source: nix::errno::Errno::EINVAL,
            }),
        }
    }

    async fn qemu_version(&self, _qemu: &Path) -> Result<String, TemplateError> {
        Ok(self.qemu_version.lock().expect("lock").clone())
    }
}

/// The memory and state file paths of a template directory.
pub(crate) fn template_files(dir: &Path) -> [PathBuf; 2] {
    [dir.join(MEMORY_FILE), dir.join(STATE_FILE)]
}
