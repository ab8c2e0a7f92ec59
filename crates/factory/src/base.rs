//! [`FactoryBase`]: a source of base VMs, and [`BaseError`], what its operations fail with.

use std::fmt;

use async_trait::async_trait;
use vmfactory_vm::{Vm, VmConfig, VmInfo};

use crate::template::TemplateError;

/// Why a [`FactoryBase`] could not hand out a VM or close.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaseError {
    /// The base was closed.
    #[error("The {what} factory is closed")]
    Closed {
        /// Which base (`direct`, `template`, `cache`, `VM-cache client`).
        what: &'static str,
    },
    /// Booting or preparing a VM failed.
    #[error(transparent)]
    Vm(#[from] vmfactory_vm::Error),
    /// Cloning or removing a template failed.
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// A base defined outside this crate's core (the VM-cache client, a caller's own) failed;
    /// its own error is the source, to downcast where a caller needs its variants.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl BaseError {
    /// The hypervisor's `Exited` error if the VM being made died (QEMU crashed or was killed):
    /// see [`vmfactory_vm::Error::hypervisor_exit`]. `None` for [`BaseError::Other`], whose
    /// error is its base's own (downcast it).
    pub fn hypervisor_exit(&self) -> Option<&vmfactory_vm::HypervisorError> {
        match self {
            Self::Vm(e) => e.hypervisor_exit(),
            Self::Template(e) => e.hypervisor_exit(),
            Self::Closed { .. } | Self::Other(_) => None,
        }
    }

    /// The post-mortem (last console lines, kept log) if the VM being made failed to come
    /// up: see [`vmfactory_vm::Error::postmortem`].
    pub fn postmortem(&self) -> Option<&vmfactory_vm::Postmortem> {
        match self {
            Self::Vm(e) => e.postmortem(),
            Self::Template(e) => e.postmortem(),
            Self::Closed { .. } | Self::Other(_) => None,
        }
    }
}

/// Pre-started clones waiting for their state load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prestarted {
    /// How many wait.
    pub waiting: usize,
    /// Their QEMUs' pids (fewer than `waiting` with fake hypervisors, which have none).
    pub pids: Vec<u32>,
}

/// A source of base VMs, all made from one [`VmConfig`] (the seed's `FactoryBase`).
///
/// A base VM has the base config's size. What it is in depends on the kind: a direct base
/// hands out running VMs; a template base hands out paused clones (resume them); a cache hands
/// out what its own base made. [`crate::Factory::get_vm`] turns a base VM into the VM a caller
/// asked for.
#[async_trait]
pub trait FactoryBase: Send + Sync + fmt::Debug {
    /// The config every base VM is made from.
    fn config(&self) -> &VmConfig;

    /// A new base VM for `config`, which must equal [`FactoryBase::config`] in everything
    /// the base fixes (callers check with [`crate::config_difference`]).
    async fn get_base_vm(&self, config: &VmConfig) -> Result<Vm, BaseError>;

    /// Whether the VMs this base hands out are already fresh: running, their agent
    /// answering, their RNG reseeded from host entropy and their clock set, each for that VM
    /// alone. A cache prepares its pool so; `get_vm` then skips those steps on the hot path.
    fn hands_out_fresh(&self) -> bool {
        false
    }

    /// Whether the VMs this base makes reseed their guest CRNG themselves as they resume:
    /// clones of a template whose guest kernel has a VMGenID driver and whose agent holds
    /// each clone's clock call until that reseed happened (`PrepareTemplate`). `get_vm` and a
    /// cache then leave out the host's reseed; the clock call still comes, and is the wait.
    fn clones_reseed_themselves(&self) -> bool {
        false
    }

    /// The VMs this base holds ready (a cache's pool); empty for the others.
    async fn status(&self) -> Vec<VmInfo> {
        Vec::new()
    }

    /// The pre-started clones waiting in this base (a template's); none for the others.
    fn prestarted(&self) -> Prestarted {
        Prestarted::default()
    }

    /// Releases everything the base holds (cached VMs, the template and its mount).
    /// Idempotent.
    async fn close(&self) -> Result<(), BaseError>;
}
