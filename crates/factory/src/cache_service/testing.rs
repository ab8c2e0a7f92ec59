//! Test doubles for the VM-cache tests: [`FakeBackends`] (fake hypervisor, a fake agent per
//! VM, no proxy) and [`FakeBase`], a [`FactoryBase`] with a pool of ready VMs on them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use vmfactory_agent::{Agent, AgentUrl, FakeAgent};
use vmfactory_hypervisor::{
    FakeHypervisor, Hypervisor, HypervisorConfig, QemuState, TemplatePaths, TemplateRole,
};
use vmfactory_proxy::{NoProxy, Proxy, ProxyKind};
use vmfactory_vm::{Backends, Vm, VmAgentConfig, VmConfig, VmInfo};

use crate::{BaseError, FactoryBase};

type Result<T> = std::result::Result<T, BaseError>;

/// Fake parts for every VM.
#[derive(Debug, Default)]
pub(crate) struct FakeBackends;

#[async_trait]
impl Backends for FakeBackends {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        Ok(Arc::new(FakeHypervisor::new(id, config.clone(), run_dir)))
    }

    async fn attach_hypervisor(
        &self,
        state: QemuState,
    ) -> vmfactory_vm::Result<Arc<dyn Hypervisor>> {
        let hv = FakeHypervisor::new(&state.id, state.config.clone(), state.paths.dir.clone());
        hv.start()
            .await
            .map_err(|e| vmfactory_vm::Error::Hypervisor {
                id: state.id.clone(),
                op: "attach",
                source: Box::new(e),
            })?;
        Ok(Arc::new(hv))
    }

    fn agent(
        &self,
        _id: &str,
        _url: &AgentUrl,
        _config: &VmAgentConfig,
    ) -> vmfactory_vm::Result<Arc<dyn Agent>> {
        Ok(Arc::new(FakeAgent::new()))
    }

    fn proxy(&self, _kind: ProxyKind) -> Arc<dyn Proxy> {
        Arc::new(NoProxy)
    }
}

/// A temporary run root with the guest files a config names.
#[derive(Debug)]
pub(crate) struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    pub(crate) fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-cs-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        for f in ["kernel", "initrd", "memory", "state"] {
            std::fs::write(dir.path().join(f), b"x").expect("guest file");
        }
        Self { dir }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.path().join("cache.sock")
    }

    /// A running-VM config (1 of 4 vCPUs, 256 MiB) under the root.
    pub(crate) fn config(&self) -> VmConfig {
        let mut hv = HypervisorConfig::new(self.path().join("kernel"), None);
        hv.max_vcpus = 4;
        let mut cfg = VmConfig::new(hv);
        cfg.run_root = self.path().to_owned();
        cfg.proxy = ProxyKind::None;
        cfg.agent.ready_timeout = Duration::from_millis(200);
        cfg
    }

    /// A template-clone config: its VMs boot paused.
    pub(crate) fn clone_config(&self) -> VmConfig {
        let mut cfg = self.config();
        let hv = &mut cfg.hypervisor;
        hv.initrd = Some(self.path().join("initrd"));
        hv.template = Some(TemplateRole::CloneFrom(TemplatePaths {
            memory: self.path().join("memory"),
            state: self.path().join("state"),
        }));
        cfg
    }

    /// VM directories left under the root.
    pub(crate) fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.path().join("vm"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

/// A base with a pool of ready VMs; makes a new one when the pool is empty.
#[derive(Debug)]
pub(crate) struct FakeBase {
    config: VmConfig,
    pool: Mutex<Vec<Vm>>,
    pub(crate) closes: AtomicU32,
    pub(crate) made: AtomicU32,
    pub(crate) fail: AtomicBool,
}

impl FakeBase {
    /// A base for `config` holding `ready` VMs.
    pub(crate) async fn new(config: VmConfig, ready: usize) -> Arc<Self> {
        let base = Arc::new(Self {
            config,
            pool: Mutex::new(Vec::new()),
            closes: AtomicU32::new(0),
            made: AtomicU32::new(0),
            fail: AtomicBool::new(false),
        });
        for _ in 0..ready {
            let vm = base.make().await.expect("pool VM");
            base.pool.lock().await.push(vm);
        }
        base
    }

    async fn make(&self) -> Result<Vm> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BaseError::Other("injected base failure".into()));
        }
        self.made.fetch_add(1, Ordering::SeqCst);
        Ok(Vm::new_with(self.config.clone(), &FakeBackends).await?)
    }
}

#[async_trait]
impl FactoryBase for FakeBase {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    async fn get_base_vm(&self, _config: &VmConfig) -> Result<Vm> {
        if let Some(vm) = self.pool.lock().await.pop() {
            return Ok(vm);
        }
        self.make().await
    }

    async fn status(&self) -> Vec<VmInfo> {
        let mut out = Vec::new();
        for vm in self.pool.lock().await.iter() {
            out.push(vm.status().await.expect("status"));
        }
        out
    }

    async fn close(&self) -> Result<()> {
        self.closes.fetch_add(1, Ordering::SeqCst);
        for vm in self.pool.lock().await.drain(..) {
            vm.stop().await?;
        }
        Ok(())
    }
}

/// Waits (up to 5 s) until `cond` holds; panics otherwise.
pub(crate) async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
