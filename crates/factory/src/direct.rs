//! [`DirectFactory`]: a new VM per call (Kata's `factory/direct`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tracing::debug;
use vmfactory_vm::{Backends, QemuBackends, Vm, VmConfig};

use crate::base::{BaseError, FactoryBase};

type Result<T> = std::result::Result<T, BaseError>;

/// Boots a new VM for each [`FactoryBase::get_base_vm`]: running, agent ready.
pub struct DirectFactory {
    config: VmConfig,
    backends: Arc<dyn Backends>,
    closed: AtomicBool,
}

impl fmt::Debug for DirectFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectFactory")
            .field("config", &self.config)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl DirectFactory {
    /// A direct factory booting VMs of `config` with QEMU.
    pub fn new(config: VmConfig) -> Self {
        Self::with_backends(config, Arc::new(QemuBackends))
    }

    /// A direct factory booting VMs of `config` from `backends`.
    pub fn with_backends(config: VmConfig, backends: Arc<dyn Backends>) -> Self {
        Self {
            config,
            backends,
            closed: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl FactoryBase for DirectFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    /// `Vm::new(config)`: boots `config` (normally [`FactoryBase::config`]).
    async fn get_base_vm(&self, config: &VmConfig) -> Result<Vm> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(BaseError::Closed { what: "direct" });
        }
        debug!("direct factory: booting a VM");
        Ok(Vm::new_with(config.clone(), self.backends.as_ref()).await?)
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_hypervisor::VmStatus;
    use vmfactory_vm::FakeBackends;

    #[tokio::test]
    async fn boots_a_running_vm_per_call_until_closed() {
        let b = Arc::new(FakeBackends::new());
        let f = DirectFactory::with_backends(b.config(), b.clone());
        let vm1 = f.get_base_vm(f.config()).await.expect("vm");
        let vm2 = f.get_base_vm(f.config()).await.expect("vm");
        assert_ne!(vm1.id(), vm2.id());
        assert_eq!(vm1.status().await.expect("s").state, VmStatus::Running);
        assert!(f.status().await.is_empty());
        f.close().await.expect("close");
        f.close().await.expect("idempotent");
        assert!(matches!(
            f.get_base_vm(f.config()).await,
            Err(BaseError::Closed { what: "direct" })
        ));
        vm1.stop().await.expect("stop");
        vm2.stop().await.expect("stop");
        assert_eq!(b.live().await, 0);
    }
}
