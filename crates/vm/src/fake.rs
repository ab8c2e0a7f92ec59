//! [`FakeBackends`]: the [`Backends`] of VMs under test, for this and other crates' unit tests
//! (feature `test-utils`). Each VM gets a `FakeHypervisor`, a `FakeAgent` and a `FakeProxy`;
//! failures are injected per part, per step or per template VM; and the backends own a
//! temporary run root with the guest files their configs name.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use vmfactory_agent::channel::{listening_line, AGENT_PORT_NAME};
use vmfactory_agent::{Agent, AgentUrl, FakeAgent};
use vmfactory_hypervisor::{
    FakeHypervisor, FakeStep, Hypervisor, HypervisorConfig, QemuState, TemplatePaths, TemplateRole,
    VmStatus,
};
use vmfactory_persist::Store;
use vmfactory_proxy::{FakeProxy, Proxy, ProxyKind};

use crate::backends::{Backends, NewStep};
use crate::config::{VmAgentConfig, VmConfig};
use crate::error::{Error, Result};

/// What the parts made from now on fail at, and how the steps go.
#[derive(Debug)]
struct Faults {
    hv_create: bool,
    hv_at: Option<FakeStep>,
    template_at: Option<FakeStep>,
    agent_create: bool,
    agent_methods: Vec<&'static str>,
    agent_hang: Vec<&'static str>,
    hv_exit_after: Option<FakeStep>,
    proxy_start: bool,
    console: Vec<String>,
    relisten: bool,
    fork_reseed: bool,
    abort_at: Option<NewStep>,
    boot_delay: Duration,
}

/// What was asked for and made so far, in order.
#[derive(Debug, Default)]
struct Made {
    boots: u32,
    hvs: Vec<FakeHypervisor>,
    agents: Vec<(String, Arc<FakeAgent>)>,
    last_agent: Option<Arc<FakeAgent>>,
    agent_urls: Vec<AgentUrl>,
    proxies: Vec<Arc<FakeProxy>>,
    steps: Vec<NewStep>,
}

/// VM parts without QEMU or a guest, and a temporary run root (removed on drop) holding a
/// kernel, an initrd and a template's `memory` and `state` files.
///
/// Each hypervisor asked for is a new `FakeHypervisor`; one that saves a template writes the
/// template's files as QEMU would. Re-attaching makes a new, started handle on the same VM.
/// Each VM id has one `FakeAgent` (a re-attached VM gets the same one) and each proxy is a new
/// `FakeProxy`, whose console shows the agent re-listening to a subscriber unless told not to.
/// The `fail_*` knobs, [`abort_at`](Self::abort_at) and [`set_boot_delay`](Self::set_boot_delay)
/// apply to what is made from then on.
#[derive(Debug)]
pub struct FakeBackends {
    dir: tempfile::TempDir,
    faults: Mutex<Faults>,
    made: Mutex<Made>,
}

impl Default for FakeBackends {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBackends {
    /// Backends that fail nothing, with a new run root under `/tmp` (short enough for the VMs'
    /// socket paths).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-fake-")
            .tempdir_in("/tmp")
            .expect("a temporary run root");
        for file in ["kernel", "initrd", "memory", "state"] {
            std::fs::write(dir.path().join(file), file).expect("a guest file");
        }
        Self {
            dir,
            faults: Mutex::new(Faults {
                hv_create: false,
                hv_at: None,
                template_at: None,
                agent_create: false,
                agent_methods: Vec::new(),
                agent_hang: Vec::new(),
                hv_exit_after: None,
                proxy_start: false,
                console: Vec::new(),
                relisten: true,
                fork_reseed: false,
                abort_at: None,
                boot_delay: Duration::ZERO,
            }),
            made: Mutex::default(),
        }
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn made(&self) -> MutexGuard<'_, Made> {
        self.made.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The run root.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The storage of the run root.
    pub fn store(&self) -> Store {
        Store::new(self.root())
    }

    /// A hotplug-capable config under the run root: 1 of 4 vCPUs, 256 MiB of 1 GiB, 2 memory
    /// slots, the root's kernel and initrd, an agent ready timeout of 200 ms.
    pub fn config(&self) -> VmConfig {
        let mut hv =
            HypervisorConfig::new(self.root().join("kernel"), Some(self.root().join("initrd")));
        hv.max_vcpus = 4;
        hv.memory_slots = 2;
        hv.max_memory_mib = 1024;
        let mut config = VmConfig::new(hv);
        config.run_root = self.root().to_owned();
        config.agent = VmAgentConfig {
            ready_timeout: Duration::from_millis(200),
            ..VmAgentConfig::default()
        };
        config
    }

    /// [`config`](Self::config) for a clone of the template whose files are the root's
    /// `memory` and `state`: its VMs boot paused.
    pub fn clone_config(&self) -> VmConfig {
        let mut config = self.config();
        config.hypervisor.template = Some(TemplateRole::CloneFrom(TemplatePaths {
            memory: self.root().join("memory"),
            state: self.root().join("state"),
        }));
        config
    }

    /// Where a factory under test keeps its template: `<root>/template` (not created).
    pub fn template_path(&self) -> PathBuf {
        self.root().join("template")
    }

    /// Makes asking for a hypervisor fail (`Error::Hypervisor` with op `create`).
    pub fn fail_hv_create(&self, fail: bool) {
        self.faults().hv_create = fail;
    }

    /// Makes each later hypervisor, except a template's, fail at `step` (`None`: at nothing).
    pub fn fail_hv_at(&self, step: Option<FakeStep>) {
        self.faults().hv_at = step;
    }

    /// Makes each later template VM's hypervisor (one that saves a template) fail at `step`.
    pub fn fail_template_at(&self, step: Option<FakeStep>) {
        self.faults().template_at = step;
    }

    /// Makes asking for an agent fail (`Error::Agent` with op `create`).
    pub fn fail_agent_create(&self, fail: bool) {
        self.faults().agent_create = fail;
    }

    /// Makes each later new agent fail `methods` (`FakeAgent::fail`); replaces the earlier
    /// list.
    pub fn fail_agent_methods(&self, methods: impl IntoIterator<Item = &'static str>) {
        self.faults().agent_methods = methods.into_iter().collect();
    }

    /// Makes each later new agent hang in `methods` (never answer, `FakeAgent::hang`);
    /// replaces the earlier list.
    pub fn hang_agent_methods(&self, methods: impl IntoIterator<Item = &'static str>) {
        self.faults().agent_hang = methods.into_iter().collect();
    }

    /// Makes each later hypervisor's process exit right after `step` succeeds, as a QEMU that
    /// dies (`FakeHypervisor::exit_after`; `None`: never).
    pub fn exit_hv_after(&self, step: Option<FakeStep>) {
        self.faults().hv_exit_after = step;
    }

    /// Makes each later proxy's `start` fail.
    pub fn fail_proxy_start(&self, fail: bool) {
        self.faults().proxy_start = fail;
    }

    /// Lines each later proxy's console shows when it starts, as a guest's boot would (to
    /// its tail and the VM's console log).
    pub fn set_console<S: Into<String>>(&self, lines: impl IntoIterator<Item = S>) {
        self.faults().console = lines.into_iter().map(Into::into).collect();
    }

    /// Whether each later proxy's console shows the agent re-listening
    /// (`vmfactory-agent: listening on agent.channel.0`) to a subscriber, as the template
    /// factory awaits; on by default.
    pub fn set_relisten(&self, relisten: bool) {
        self.faults().relisten = relisten;
    }

    /// Whether each later agent says its clones reseed themselves (`prepare_template`,
    /// `FakeAgent::set_fork_reseed`), as a guest with VMGenID; off by default.
    pub fn set_fork_reseed(&self, active: bool) {
        self.faults().fork_reseed = active;
    }

    /// Makes [`Backends::before`] fail at `step` with `Error::Aborted` (`None`: never).
    pub fn abort_at(&self, step: Option<NewStep>) {
        self.faults().abort_at = step;
    }

    /// How long each hypervisor start (and pre-start) takes from now on.
    pub fn set_boot_delay(&self, delay: Duration) {
        self.faults().boot_delay = delay;
    }

    /// How many hypervisors were asked for (not counting re-attaches).
    pub fn boots(&self) -> u32 {
        self.made().boots
    }

    /// The last hypervisor made for VM `id`.
    ///
    /// # Panics
    /// If none was.
    pub fn hv(&self, id: &str) -> FakeHypervisor {
        self.made()
            .hvs
            .iter()
            .rev()
            .find(|hv| hv.id() == id)
            .cloned()
            .unwrap_or_else(|| panic!("no hypervisor was made for {id}"))
    }

    /// The last hypervisor made.
    ///
    /// # Panics
    /// If none was.
    pub fn last_hv(&self) -> FakeHypervisor {
        self.made()
            .hvs
            .last()
            .cloned()
            .expect("a hypervisor was made")
    }

    /// Whether any hypervisor was made.
    pub fn hv_created(&self) -> bool {
        !self.made().hvs.is_empty()
    }

    /// The ids of the VMs whose hypervisor config satisfies `pred`, in creation order.
    pub fn ids_where(&self, pred: impl Fn(&HypervisorConfig) -> bool) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for hv in &self.made().hvs {
            if pred(hv.config()) && !ids.iter().any(|id| id == hv.id()) {
                ids.push(hv.id().to_owned());
            }
        }
        ids
    }

    /// How often `method` was called on all agents made so far.
    pub fn agent_calls(&self, method: &str) -> usize {
        self.made()
            .agents
            .iter()
            .map(|(_, agent)| agent.count(method))
            .sum()
    }

    /// VM `id`'s agent, once it has one.
    pub fn agent_of(&self, id: &str) -> Option<Arc<FakeAgent>> {
        self.made()
            .agents
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, agent)| agent.clone())
    }

    /// VM `id`'s agent.
    ///
    /// # Panics
    /// If none was made.
    pub fn agent(&self, id: &str) -> Arc<FakeAgent> {
        self.made()
            .agents
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, agent)| agent.clone())
            .unwrap_or_else(|| panic!("no agent was made for {id}"))
    }

    /// The agent handed out last.
    ///
    /// # Panics
    /// If none was.
    pub fn last_agent(&self) -> Arc<FakeAgent> {
        self.made()
            .last_agent
            .clone()
            .expect("an agent was handed out")
    }

    /// The URLs agents were asked for, in order.
    pub fn agent_urls(&self) -> Vec<AgentUrl> {
        self.made().agent_urls.clone()
    }

    /// The last proxy made.
    ///
    /// # Panics
    /// If none was.
    pub fn last_proxy(&self) -> Arc<FakeProxy> {
        self.made()
            .proxies
            .last()
            .cloned()
            .expect("a proxy was made")
    }

    /// How many times any proxy was started.
    pub fn proxy_starts(&self) -> usize {
        self.made().proxies.iter().map(|p| p.starts()).sum()
    }

    /// Whether any proxy is running.
    pub fn proxy_running(&self) -> bool {
        self.made().proxies.iter().any(|p| p.is_running())
    }

    /// The steps [`Backends::before`] was called with, in order.
    pub fn steps(&self) -> Vec<NewStep> {
        self.made().steps.clone()
    }

    /// How many VMs are running or paused (or saved as a template and not yet stopped, or
    /// pre-started).
    pub async fn live(&self) -> usize {
        let hvs = self.made().hvs.clone();
        let mut n = 0;
        for hv in hvs {
            if matches!(
                hv.status().await,
                Ok(VmStatus::Running
                    | VmStatus::Paused
                    | VmStatus::PostMigrate
                    | VmStatus::InMigrate)
            ) {
                n += 1;
            }
        }
        n
    }

    /// The VM directories under `<root>/vm`.
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root().join("vm"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// How many VM directories are under `<root>/vm`.
    pub fn vm_dir_count(&self) -> usize {
        self.vm_dirs().len()
    }

    /// Asserts that no VM directory, running proxy, connected agent or live hypervisor is
    /// left.
    ///
    /// # Panics
    /// If one is.
    pub async fn assert_nothing_left(&self) {
        assert_eq!(self.vm_dirs(), Vec::<PathBuf>::new(), "VM directories left");
        assert!(!self.root().join("vm").exists(), "<root>/vm left");
        assert!(!self.proxy_running(), "proxy left running");
        let (hvs, agents) = {
            let made = self.made();
            (made.hvs.clone(), made.agents.clone())
        };
        for (id, agent) in agents {
            assert!(!agent.is_connected(), "agent of {id} left connected");
        }
        for hv in hvs {
            let status = hv.status().await.expect("status");
            assert!(
                matches!(status, VmStatus::Stopped | VmStatus::NotStarted),
                "hypervisor of {} left {status:?}",
                hv.id()
            );
        }
    }
}

/// Writes what QEMU would for a template VM: the RAM file at start, the state file on save
/// (here: both at once).
fn write_template_files(paths: &TemplatePaths, memory_mib: u64) {
    let memory = std::fs::File::create(&paths.memory).expect("template memory file");
    memory
        .set_len(memory_mib << 20)
        .expect("template memory size");
    std::fs::write(&paths.state, b"device state").expect("template state file");
}

#[async_trait]
impl Backends for FakeBackends {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> Result<Arc<dyn Hypervisor>> {
        self.made().boots += 1;
        let (fail_create, fail_at) = {
            let faults = self.faults();
            let at = match config.template {
                Some(TemplateRole::SaveTo(_)) => faults.template_at,
                _ => faults.hv_at,
            };
            (faults.hv_create, at)
        };
        if fail_create {
            let injected = vmfactory_hypervisor::Error::Injected { step: "create" };
            return Err(Error::hv(id, "create", injected));
        }
        let hv = FakeHypervisor::new(id, config.clone(), run_dir);
        hv.fail_at(fail_at);
        hv.exit_after(self.faults().hv_exit_after);
        if let Some(TemplateRole::SaveTo(paths)) = &config.template {
            write_template_files(paths, config.memory_mib);
        }
        self.made().hvs.push(hv.clone());
        Ok(Arc::new(hv))
    }

    async fn attach_hypervisor(&self, state: QemuState) -> Result<Arc<dyn Hypervisor>> {
        let hv = FakeHypervisor::attached(&state);
        hv.start()
            .await
            .map_err(|e| Error::hv(&state.id, "attach", e))?;
        hv.fail_at(self.faults().hv_at);
        self.made().hvs.push(hv.clone());
        Ok(Arc::new(hv))
    }

    fn agent(&self, id: &str, url: &AgentUrl, _config: &VmAgentConfig) -> Result<Arc<dyn Agent>> {
        let (fail_create, methods, hang, fork_reseed) = {
            let faults = self.faults();
            (
                faults.agent_create,
                faults.agent_methods.clone(),
                faults.agent_hang.clone(),
                faults.fork_reseed,
            )
        };
        if fail_create {
            let injected = vmfactory_agent::Error::Injected { method: "create" };
            return Err(Error::agent(id, "create", injected));
        }
        let mut made = self.made();
        made.agent_urls.push(url.clone());
        let known = made.agents.iter().find(|(i, _)| i == id);
        let agent = match known {
            Some((_, agent)) => agent.clone(),
            None => {
                let agent = Arc::new(FakeAgent::new());
                agent.set_fork_reseed(fork_reseed);
                for method in methods {
                    agent.fail(method);
                }
                for method in hang {
                    agent.hang(method);
                }
                made.agents.push((id.to_owned(), agent.clone()));
                agent
            }
        };
        made.last_agent = Some(agent.clone());
        Ok(agent)
    }

    fn proxy(&self, kind: ProxyKind) -> Arc<dyn Proxy> {
        let proxy = Arc::new(FakeProxy::new(kind));
        let (fail_start, relisten, console) = {
            let faults = self.faults();
            (faults.proxy_start, faults.relisten, faults.console.clone())
        };
        proxy.fail_start(fail_start);
        proxy.show_on_start(console);
        if relisten {
            proxy.greet_subscribers([listening_line(AGENT_PORT_NAME)]);
        }
        self.made().proxies.push(proxy.clone());
        proxy
    }

    async fn before(&self, id: &str, step: NewStep) -> Result<()> {
        self.made().steps.push(step);
        let (abort_at, delay) = {
            let faults = self.faults();
            (faults.abort_at, faults.boot_delay)
        };
        if abort_at == Some(step) {
            return Err(Error::Aborted {
                id: id.to_owned(),
                step,
            });
        }
        let starts = matches!(step, NewStep::StartHypervisor | NewStep::PrestartHypervisor);
        if starts && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_follow_the_vm_and_the_knobs() {
        let b = FakeBackends::new();
        let url = AgentUrl::Unix {
            path: b.root().join("agent.sock"),
        };
        let config = VmAgentConfig::default();
        let agent = Backends::agent(&b, "a", &url, &config).expect("agent");
        b.fail_agent_methods(["check"]);
        let again = Backends::agent(&b, "a", &url, &config).expect("agent");
        assert!(Arc::ptr_eq(&agent, &again), "one agent per VM");
        assert!(again.check().await.is_ok(), "knobs apply to new agents");
        Backends::agent(&b, "b", &url, &config).expect("agent");
        assert!(b.last_agent().check().await.is_err());
        assert_eq!(b.agent_urls().len(), 3);

        // A template VM's hypervisor writes the template's files and has its own faults.
        let dir = b.template_path();
        std::fs::create_dir(&dir).expect("template dir");
        let mut tpl = b.config().hypervisor;
        tpl.template = Some(TemplateRole::SaveTo(TemplatePaths {
            memory: dir.join("memory"),
            state: dir.join("state"),
        }));
        b.fail_template_at(Some(FakeStep::SaveTemplate));
        b.fail_hv_at(Some(FakeStep::Start));
        let hv = b.hypervisor("t", &tpl, b.root()).expect("template hv");
        hv.start().await.expect("template faults only");
        assert!(hv.save_template().await.is_err());
        let memory = std::fs::metadata(dir.join("memory")).expect("memory file");
        assert_eq!(memory.len(), tpl.memory_mib << 20);
        assert!(dir.join("state").is_file());
        assert_eq!(
            (b.boots(), b.ids_where(|c| c.saves_template())),
            (1, vec!["t".into()])
        );

        // Proxies show the agent re-listening unless told not to.
        let mut lines = b.proxy(ProxyKind::Builtin).subscribe().expect("console");
        assert!(lines.try_recv().is_ok_and(|l| l.contains("listening")));
        b.set_relisten(false);
        let mut lines = b.proxy(ProxyKind::Builtin).subscribe().expect("console");
        assert!(lines.try_recv().is_err());
        assert!(b.proxy(ProxyKind::None).subscribe().is_none());
    }
}
