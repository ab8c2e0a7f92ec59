//! Test doubles shared by the unit tests: a [`Harness`] that is the [`Backends`] of a VM under
//! test (fake hypervisor and agent, a recording proxy, injectable failures) and owns its
//! temporary run root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use vmfactory_agent::{Agent, AgentUrl, FakeAgent};
use vmfactory_hypervisor::{FakeHypervisor, FakeStep, Hypervisor, HypervisorConfig, QemuState};
use vmfactory_persist::Store;
use vmfactory_proxy::{Proxy, ProxyKind};

use crate::backends::{Backends, NewStep};
use crate::config::{VmAgentConfig, VmConfig};
use crate::error::{Error, Result};
use crate::vm::Vm;

/// A proxy that records starts and stops and fails on demand.
#[derive(Debug, Default)]
pub(crate) struct TestProxy {
    pub(crate) running: AtomicBool,
    pub(crate) starts: AtomicU32,
    pub(crate) fail: AtomicBool,
}

#[async_trait]
impl Proxy for TestProxy {
    async fn start(&self, _vm_id: &str, _console: &Path) -> vmfactory_proxy::Result<()> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(vmfactory_proxy::Error::WaitTimeout {
                timeout: Duration::ZERO,
            });
        }
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn stop(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    fn kind(&self) -> ProxyKind {
        ProxyKind::None
    }
}

/// The backends of one VM under test, and its run root.
#[derive(Debug)]
pub(crate) struct Harness {
    dir: tempfile::TempDir,
    pub(crate) agent: Arc<FakeAgent>,
    pub(crate) proxy: Arc<TestProxy>,
    hv: Mutex<Option<FakeHypervisor>>,
    /// Applied to each fake hypervisor when it is created.
    pub(crate) hv_fail: Mutex<Option<FakeStep>>,
    pub(crate) fail_hv_create: AtomicBool,
    pub(crate) fail_agent_create: AtomicBool,
    pub(crate) abort_at: Mutex<Option<NewStep>>,
    pub(crate) steps: Mutex<Vec<NewStep>>,
    /// The URLs agent clients were created for.
    pub(crate) agent_urls: Mutex<Vec<AgentUrl>>,
}

impl Harness {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-vm-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::write(dir.path().join("kernel"), b"k").expect("kernel");
        Self {
            dir,
            agent: Arc::new(FakeAgent::new()),
            proxy: Arc::new(TestProxy::default()),
            hv: Mutex::new(None),
            hv_fail: Mutex::new(None),
            fail_hv_create: AtomicBool::new(false),
            fail_agent_create: AtomicBool::new(false),
            abort_at: Mutex::new(None),
            steps: Mutex::new(Vec::new()),
            agent_urls: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn store(&self) -> Store {
        Store::new(self.root())
    }

    /// A hotplug-capable config (1 of 4 vCPUs, 256 MiB of 1 GiB, 2 slots) under the root.
    pub(crate) fn config(&self) -> VmConfig {
        let mut hv = HypervisorConfig::new(self.root().join("kernel"), None);
        hv.max_vcpus = 4;
        hv.memory_slots = 2;
        hv.max_memory_mib = 1024;
        let mut cfg = VmConfig::new(hv);
        cfg.run_root = self.root().to_owned();
        cfg.agent = VmAgentConfig {
            ready_timeout: Duration::from_millis(100),
            ..VmAgentConfig::default()
        };
        cfg
    }

    /// The last fake hypervisor created.
    pub(crate) fn hv(&self) -> FakeHypervisor {
        self.hv
            .lock()
            .expect("lock")
            .clone()
            .expect("a hypervisor was created")
    }

    pub(crate) fn hv_created(&self) -> bool {
        self.hv.lock().expect("lock").is_some()
    }

    /// The VM directories under the root.
    pub(crate) fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root().join("vm"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Asserts that no directory, running proxy, connected agent or live hypervisor is left.
    pub(crate) async fn assert_nothing_left(&self) {
        assert_eq!(self.vm_dirs(), Vec::<PathBuf>::new(), "VM directories left");
        assert!(!self.root().join("vm").exists(), "<root>/vm left");
        assert!(
            !self.proxy.running.load(Ordering::SeqCst),
            "proxy left running"
        );
        assert!(!self.agent.is_connected(), "agent left connected");
        if self.hv_created() {
            let st = self.hv().status().await.expect("status");
            assert!(
                matches!(
                    st,
                    vmfactory_hypervisor::VmStatus::Stopped
                        | vmfactory_hypervisor::VmStatus::NotStarted
                ),
                "hypervisor left {st:?}"
            );
        }
    }
}

#[async_trait]
impl Backends for Harness {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> Result<Arc<dyn Hypervisor>> {
        if self.fail_hv_create.load(Ordering::SeqCst) {
            return Err(Error::hv(
                id,
                "create",
                vmfactory_hypervisor::Error::Injected { step: "create" },
            ));
        }
        let hv = FakeHypervisor::new(id, config.clone(), run_dir);
        hv.fail_at(*self.hv_fail.lock().expect("lock"));
        *self.hv.lock().expect("lock") = Some(hv.clone());
        Ok(Arc::new(hv))
    }

    async fn attach_hypervisor(&self, state: QemuState) -> Result<Arc<dyn Hypervisor>> {
        let hv = FakeHypervisor::new(&state.id, state.config.clone(), state.paths.dir.clone());
        hv.start()
            .await
            .map_err(|e| Error::hv(&state.id, "attach", e))?;
        hv.fail_at(*self.hv_fail.lock().expect("lock"));
        *self.hv.lock().expect("lock") = Some(hv.clone());
        Ok(Arc::new(hv))
    }

    fn agent(&self, id: &str, url: &AgentUrl, _config: &VmAgentConfig) -> Result<Arc<dyn Agent>> {
        if self.fail_agent_create.load(Ordering::SeqCst) {
            return Err(Error::agent(
                id,
                "create",
                vmfactory_agent::Error::Injected { method: "create" },
            ));
        }
        self.agent_urls.lock().expect("lock").push(url.clone());
        Ok(self.agent.clone())
    }

    fn proxy(&self, _kind: ProxyKind) -> Arc<dyn Proxy> {
        self.proxy.clone()
    }

    async fn before(&self, id: &str, step: NewStep) -> Result<()> {
        self.steps.lock().expect("lock").push(step);
        if *self.abort_at.lock().expect("lock") == Some(step) {
            return Err(Error::Aborted {
                id: id.to_owned(),
                step,
            });
        }
        Ok(())
    }
}

/// A VM created on `h`'s backends with `h.config()`.
pub(crate) async fn new_vm(h: &Harness) -> Vm {
    Vm::new_with(h.config(), h).await.expect("new VM")
}
