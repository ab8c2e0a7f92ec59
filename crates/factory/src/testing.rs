//! Test doubles of the factory's own traits, shared by its unit tests: [`FakeHost`] stands in
//! for mounts and QEMU's version ([`TemplateHost`]), [`FakeBase`] is a [`FactoryBase`] with a
//! pool of ready VMs for the VM-cache tests. VMs are built on `vmfactory_vm::FakeBackends`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use vmfactory_hypervisor::{Accel, HypervisorConfig};
use vmfactory_vm::{FakeBackends, Vm, VmConfig, VmInfo};

use crate::template::{MountOutcome, TemplateError, TemplateHost, MEMORY_FILE, STATE_FILE};
use crate::{BaseError, FactoryBase};

/// Mounts tracked in memory (with a stack count per path), a fixed QEMU version, and a set
/// answer for `accel = auto` (TCG unless changed), with the run roots it was asked for.
#[derive(Debug)]
pub(crate) struct FakeHost {
    pub(crate) mounts: Mutex<HashMap<PathBuf, u32>>,
    pub(crate) not_permitted: AtomicBool,
    pub(crate) qemu_version: Mutex<String>,
    pub(crate) mount_calls: AtomicU32,
    pub(crate) auto_accel: Mutex<Accel>,
    pub(crate) accel_roots: Mutex<Vec<PathBuf>>,
}

impl Default for FakeHost {
    fn default() -> Self {
        Self {
            mounts: Mutex::default(),
            not_permitted: AtomicBool::new(false),
            qemu_version: Mutex::new("QEMU emulator version 7.2.0 (fake)".into()),
            mount_calls: AtomicU32::new(0),
            auto_accel: Mutex::new(Accel::Tcg),
            accel_roots: Mutex::default(),
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

    async fn resolve_accel(&self, cfg: &HypervisorConfig, run_root: &Path) -> Accel {
        let roots = &mut *self.accel_roots.lock().expect("lock");
        roots.push(run_root.to_owned());
        match cfg.accel {
            Accel::Auto => *self.auto_accel.lock().expect("lock"),
            explicit => explicit,
        }
    }
}

/// The memory and state file paths of a template directory.
pub(crate) fn template_files(dir: &Path) -> [PathBuf; 2] {
    [dir.join(MEMORY_FILE), dir.join(STATE_FILE)]
}

/// Where the VM-cache tests serve: `<root>/cache.sock`.
pub(crate) fn cache_socket(backends: &FakeBackends) -> PathBuf {
    backends.root().join("cache.sock")
}

/// A base with a pool of ready VMs on fake backends; makes a new one when the pool is empty.
#[derive(Debug)]
pub(crate) struct FakeBase {
    config: VmConfig,
    backends: Arc<FakeBackends>,
    pool: tokio::sync::Mutex<Vec<Vm>>,
    pub(crate) closes: AtomicU32,
    pub(crate) made: AtomicU32,
    pub(crate) fail: AtomicBool,
}

impl FakeBase {
    /// A base for `config` holding `ready` VMs made on `backends`.
    pub(crate) async fn new(
        backends: &Arc<FakeBackends>,
        config: VmConfig,
        ready: usize,
    ) -> Arc<Self> {
        let base = Arc::new(Self {
            config,
            backends: backends.clone(),
            pool: tokio::sync::Mutex::new(Vec::new()),
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

    async fn make(&self) -> Result<Vm, BaseError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(BaseError::Other("injected base failure".into()));
        }
        self.made.fetch_add(1, Ordering::SeqCst);
        Ok(Vm::new_with(self.config.clone(), &*self.backends).await?)
    }
}

#[async_trait]
impl FactoryBase for FakeBase {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    async fn get_base_vm(&self, _config: &VmConfig) -> Result<Vm, BaseError> {
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

    async fn close(&self) -> Result<(), BaseError> {
        self.closes.fetch_add(1, Ordering::SeqCst);
        for vm in self.pool.lock().await.drain(..) {
            vm.stop().await?;
        }
        Ok(())
    }
}
