//! [`Factory`]: the factory a runtime uses, built from a [`FactoryConfig`] the way Kata's
//! `NewFactory` is. Handing out VMs ([`Factory::get_vm`]) is in `get_vm.rs`.

use std::fmt;
use std::sync::Arc;

use tracing::{info, warn};
use vmfactory_vm::{Backends, QemuBackends, VmConfig, VmInfo};

use crate::base::FactoryBase;
use crate::cache::CacheFactory;
use crate::cache_service::CacheClient;
use crate::config::FactoryConfig;
use crate::direct::DirectFactory;
use crate::error::{Error, Result};
use crate::host::{SystemHost, TemplateHost};
use crate::template::TemplateFactory;

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
    base: Arc<dyn FactoryBase>,
    kind: BaseKind,
    cached: bool,
    backends: Arc<dyn Backends>,
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
    /// Builds a factory from `config` with QEMU and the real host; see [`Factory::new_with`].
    pub async fn new(config: &FactoryConfig) -> Result<Self> {
        Self::new_with(config, Arc::new(QemuBackends), Arc::new(SystemHost)).await
    }

    /// Builds a factory from `config` (Kata's `NewFactory`):
    /// - `cache_endpoint` set: a client of that VM-cache server (the server owns templates and
    ///   pools, so `template` and `cache` must be off);
    /// - else `template`: with `fetch_only`, the existing template at `template_path` (an
    ///   error if it is missing or does not match); otherwise a new template there, and if
    ///   making it fails, a direct base (the failure is logged);
    /// - else a direct base;
    /// - then, with `cache > 0`, a cache of that many VMs around the base.
    pub async fn new_with(
        config: &FactoryConfig,
        backends: Arc<dyn Backends>,
        host: Arc<dyn TemplateHost>,
    ) -> Result<Self> {
        config.validate()?;
        if let Some(endpoint) = &config.cache_endpoint {
            if config.template || config.cache > 0 {
                return Err(Error::Config(
                    "A VM-cache client cannot also use a template or a local cache".into(),
                ));
            }
            let client = CacheClient::connect_with(endpoint, backends.clone()).await?;
            info!(endpoint = %endpoint.display(), "factory uses a VM-cache server");
            return Ok(Self::from_base(
                Arc::new(client),
                BaseKind::CacheClient,
                backends,
            ));
        }
        let (base, kind): (Arc<dyn FactoryBase>, BaseKind) = if !config.template {
            (
                Arc::new(DirectFactory::with_backends(
                    config.vm.clone(),
                    backends.clone(),
                )),
                BaseKind::Direct,
            )
        } else if config.fetch_only {
            let t = TemplateFactory::fetch_with(
                &config.vm,
                &config.template_path,
                backends.clone(),
                host,
            )
            .await?;
            (Arc::new(t), BaseKind::FetchedTemplate)
        } else {
            match TemplateFactory::new_with(
                &config.vm,
                &config.template_path,
                backends.clone(),
                host,
            )
            .await
            {
                Ok(t) => (Arc::new(t), BaseKind::Template),
                Err(e) => {
                    warn!(
                        error = %e,
                        source = ?std::error::Error::source(&e),
                        "making the template failed, falling back to a direct factory"
                    );
                    (
                        Arc::new(DirectFactory::with_backends(
                            config.vm.clone(),
                            backends.clone(),
                        )),
                        BaseKind::Direct,
                    )
                }
            }
        };
        let mut this = Self::from_base(base, kind, backends);
        if config.cache > 0 {
            this.base = Arc::new(CacheFactory::new(config.cache, this.base));
            this.cached = true;
        }
        info!(kind = ?this.kind, cache = config.cache, "factory ready");
        Ok(this)
    }

    /// A factory over an existing `base` of `kind`; direct fallbacks use `backends`.
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
        }
    }

    /// The base (a [`CacheFactory`] around the kind's base when cached).
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

    /// Closes the base: stops cached VMs, removes a template this factory made. Idempotent.
    pub async fn close(&self) -> Result<()> {
        self.base.close().await
    }

    pub(crate) fn backends(&self) -> &dyn Backends {
        self.backends.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{FakeBackends, FakeHost};
    use vmfactory_hypervisor::FakeStep;

    fn fconfig(b: &FakeBackends) -> FactoryConfig {
        let mut c = FactoryConfig::new(b.config());
        c.template_path = b.template_path();
        c
    }

    #[tokio::test]
    async fn builds_each_kind() {
        let b = FakeBackends::new();
        let host = Arc::new(FakeHost::default());
        let f = Factory::new_with(&fconfig(&b), b.clone(), host.clone())
            .await
            .expect("direct");
        assert_eq!((f.kind(), f.is_cached()), (BaseKind::Direct, false));
        f.close().await.expect("close");

        let mut c = fconfig(&b);
        c.template = true;
        let t = Factory::new_with(&c, b.clone(), host.clone())
            .await
            .expect("template");
        assert_eq!(t.kind(), BaseKind::Template);
        c.fetch_only = true;
        let f = Factory::new_with(&c, b.clone(), host.clone())
            .await
            .expect("fetch");
        assert_eq!(f.kind(), BaseKind::FetchedTemplate);
        f.close().await.expect("close");
        assert!(
            b.template_path().exists(),
            "a fetched template is not removed"
        );
        t.close().await.expect("close");
        assert!(!b.template_path().exists());

        let mut c = fconfig(&b);
        c.template = true;
        c.cache = 1;
        let f = Factory::new_with(&c, b.clone(), host.clone())
            .await
            .expect("cached template");
        assert_eq!((f.kind(), f.is_cached()), (BaseKind::Template, true));
        f.close().await.expect("close");
        assert!(
            !b.template_path().exists(),
            "closing the cache closes the template"
        );
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn template_failure_falls_back_to_direct_but_fetch_failure_is_an_error() {
        let b = FakeBackends::new();
        let host = Arc::new(FakeHost::default());
        *b.template_fail.lock().expect("lock") = Some(FakeStep::SaveTemplate);
        let mut c = fconfig(&b);
        c.template = true;
        let f = Factory::new_with(&c, b.clone(), host.clone())
            .await
            .expect("fallback");
        assert_eq!(f.kind(), BaseKind::Direct);
        assert!(!b.template_path().exists(), "cleaned up");
        assert_eq!(host.depth(&b.template_path()), 0);
        let vm = f.get_vm(&b.config()).await.expect("a direct VM");
        vm.stop().await.expect("stop");

        c.fetch_only = true;
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host.clone()).await,
            Err(Error::Template(
                crate::metadata::TemplateError::Missing { .. }
            ))
        ));
    }

    #[tokio::test]
    async fn bad_option_combinations_are_config_errors() {
        let b = FakeBackends::new();
        let host = Arc::new(FakeHost::default());
        let mut c = fconfig(&b);
        c.cache_endpoint = Some(b.root().join("cache.sock"));
        c.cache = 1;
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host.clone()).await,
            Err(Error::Config(_))
        ));
        let mut c = fconfig(&b);
        c.template = true;
        c.fetch_only = true;
        c.cache = 2;
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host.clone()).await,
            Err(Error::Config(_))
        ));
        // An endpoint nobody serves.
        let mut c = fconfig(&b);
        c.cache_endpoint = Some(b.root().join("cache.sock"));
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host).await,
            Err(Error::CacheService(_))
        ));
    }
}
