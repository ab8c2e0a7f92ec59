//! [`FactoryBase`]: a source of base VMs.

use std::fmt;

use async_trait::async_trait;
use vmfactory_vm::{Vm, VmConfig, VmInfo};

use crate::error::Result;

/// A source of base VMs, all made from one [`VmConfig`] (the seed's `FactoryBase`).
///
/// A base VM has the base config's size. What it is in depends on the kind: a direct base
/// hands out running VMs; a template base hands out paused clones (resume them); a cache hands
/// out what its own base made. `get_vm` in this crate turns a base VM into the VM a caller
/// asked for.
#[async_trait]
pub trait FactoryBase: Send + Sync + fmt::Debug {
    /// The config every base VM is made from.
    fn config(&self) -> &VmConfig;

    /// A new base VM for `config`, which must equal [`FactoryBase::config`] in everything
    /// the base fixes (callers check with [`crate::FactoryConfig`]'s rules).
    async fn get_base_vm(&self, config: &VmConfig) -> Result<Vm>;

    /// Whether the VMs this base hands out are already fresh: running, their agent
    /// answering, their RNG reseeded from host entropy and their clock set, each for that VM
    /// alone. A cache prepares its pool so; `get_vm` then skips those steps on the hot path.
    fn hands_out_fresh(&self) -> bool {
        false
    }

    /// The VMs this base holds ready (a cache's pool); empty for the others.
    async fn status(&self) -> Vec<VmInfo> {
        Vec::new()
    }

    /// Releases everything the base holds (cached VMs, the template and its mount).
    /// Idempotent.
    async fn close(&self) -> Result<()>;
}
