//! [`Factory`]: the factory a runtime uses, over any [`FactoryBase`]. Building one from a
//! [`crate::FactoryConfig`] ([`Factory::new`]) is in `setup.rs`, handing out VMs
//! ([`Factory::get_vm`]) in `get_vm.rs`.

use std::fmt;
use std::sync::Arc;

use vmfactory_vm::{Backends, VmConfig, VmInfo};

use crate::base::{BaseError, FactoryBase};
use crate::metrics::{GetVmSource, Metrics};

/// The kind of base a [`Factory`] ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    /// A new VM per call.
    Direct,
    /// Clones of a template made by this factory.
    Template,
    /// Clones of an existing template (fetch-only).
    FetchedTemplate,
    /// A VM-cache server.
    CacheClient,
}

/// Hands out VMs sized to each request, from a base of ready-made ones (the seed's
/// `factory`).
pub struct Factory {
    pub(crate) base: Arc<dyn FactoryBase>,
    kind: BaseKind,
    pub(crate) cached: bool,
    backends: Arc<dyn Backends>,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for Factory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Factory")
            .field("kind", &self.kind)
            .field("cached", &self.cached)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Factory {
    /// A factory over an existing `base` of `kind` (any [`FactoryBase`], also one defined
    /// outside this crate); direct fallbacks use `backends`.
    pub fn from_base(
        base: Arc<dyn FactoryBase>,
        kind: BaseKind,
        backends: Arc<dyn Backends>,
    ) -> Self {
        Self {
            base,
            kind,
            cached: false,
            backends,
            metrics: None,
        }
    }

    /// Records in `metrics` each VM [`Factory::get_vm`] hands out that no cache counts: the
    /// direct VMs booted for requests that differ from the base config (`fallback`) and, for
    /// an uncached direct or template base, its VMs. (A cache counts its own with
    /// [`crate::CacheFactory::with_metrics`]; a VM-cache server counts those of its clients.)
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Records a VM handed out from `source` after `took`, if metrics are kept.
    pub(crate) fn record_get_vm(&self, source: GetVmSource, took: std::time::Duration) {
        if let Some(m) = &self.metrics {
            m.record_get_vm(source, took);
        }
    }

    /// The `source` of this factory's base VMs when no cache counts them itself.
    pub(crate) fn uncounted_source(&self) -> Option<GetVmSource> {
        match (self.cached, self.kind) {
            (true, _) | (false, BaseKind::CacheClient) => None,
            (false, BaseKind::Direct) => Some(GetVmSource::Direct),
            (false, BaseKind::Template | BaseKind::FetchedTemplate) => Some(GetVmSource::Template),
        }
    }

    /// The base (a [`crate::CacheFactory`] around the kind's base when cached).
    pub fn base(&self) -> &Arc<dyn FactoryBase> {
        &self.base
    }

    /// The kind of base (under the cache, if any).
    pub fn kind(&self) -> BaseKind {
        self.kind
    }

    /// Whether a cache wraps the base.
    pub fn is_cached(&self) -> bool {
        self.cached
    }

    /// The base VM config.
    pub fn config(&self) -> &VmConfig {
        self.base.config()
    }

    /// The VMs the base holds ready.
    pub async fn status(&self) -> Vec<VmInfo> {
        self.base.status().await
    }

    /// The pre-started clones waiting in a template base.
    pub fn prestarted(&self) -> crate::base::Prestarted {
        self.base.prestarted()
    }

    /// Closes the base: stops cached VMs, removes a template this factory made. Idempotent.
    pub async fn close(&self) -> Result<(), BaseError> {
        self.base.close().await
    }

    pub(crate) fn backends(&self) -> &dyn Backends {
        self.backends.as_ref()
    }
}
