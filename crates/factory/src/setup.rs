//! [`Factory::new`]: a factory built from a [`FactoryConfig`] the way Kata's `NewFactory`
//! builds one: a VM-cache client, or a direct or template base with an optional cache around it.
//! It sits above both the core and the VM-cache service, so neither names the other.

use std::sync::Arc;

use tracing::{info, warn};
use vmfactory_vm::{Backends, QemuBackends};

use crate::base::FactoryBase;
use crate::cache::CacheFactory;
use crate::cache_service::{CacheClient, CacheServiceError};
use crate::config::{FactoryConfig, FactoryConfigError};
use crate::direct::DirectFactory;
use crate::factory::{BaseKind, Factory};
use crate::template::{SystemHost, TemplateError, TemplateFactory, TemplateHost};

/// Why [`Factory::new`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NewFactoryError {
    /// The config is invalid.
    #[error("Invalid factory config")]
    Config(#[from] FactoryConfigError),
    /// The fetch-only template is missing or does not match (a template this factory makes
    /// falls back to a direct base instead).
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// The VM-cache server could not be reached.
    #[error(transparent)]
    CacheService(#[from] CacheServiceError),
}

impl Factory {
    /// Builds a factory from `config` with QEMU and the real host; see [`Factory::new_with`].
    pub async fn new(config: &FactoryConfig) -> Result<Self, NewFactoryError> {
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
    ) -> Result<Self, NewFactoryError> {
        config.validate()?;
        if let Some(endpoint) = &config.cache_endpoint {
            let client = CacheClient::connect_with(endpoint, backends.clone()).await?;
            info!(endpoint = %endpoint.display(), "factory uses a VM-cache server");
            return Ok(Self::from_base(
                Arc::new(client),
                BaseKind::CacheClient,
                backends,
            ));
        }
        // `auto` resolved here, once per host (kept in the run root): a direct VM's QEMU then
        // takes the process's answer instead of probing without the cache.
        host.resolve_accel(&config.vm.hypervisor, &config.vm.run_root)
            .await;
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
            t.prestart(config.prestart as usize).await;
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
                Ok(t) => {
                    t.prestart(config.prestart as usize).await;
                    (Arc::new(t), BaseKind::Template)
                }
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
        info!(kind = ?this.kind(), cache = config.cache, "factory ready");
        Ok(this)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeHost;
    use vmfactory_hypervisor::FakeStep;
    use vmfactory_vm::FakeBackends;

    fn fconfig(b: &FakeBackends) -> FactoryConfig {
        let mut c = FactoryConfig::new(b.config());
        c.template_path = b.template_path();
        c
    }

    #[tokio::test]
    async fn builds_each_kind() {
        let b = Arc::new(FakeBackends::new());
        let host = Arc::new(FakeHost::default());
        let f = Factory::new_with(&fconfig(&b), b.clone(), host.clone())
            .await
            .expect("direct");
        assert_eq!((f.kind(), f.is_cached()), (BaseKind::Direct, false));
        let roots = host.accel_roots.lock().expect("lock").clone();
        assert_eq!(roots, [b.root()], "auto resolved with the run root's cache");
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
        let b = Arc::new(FakeBackends::new());
        let host = Arc::new(FakeHost::default());
        b.fail_template_at(Some(FakeStep::SaveTemplate));
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
            Err(NewFactoryError::Template(TemplateError::Missing { .. }))
        ));
    }

    #[tokio::test]
    async fn bad_option_combinations_are_config_errors() {
        let b = Arc::new(FakeBackends::new());
        let host = Arc::new(FakeHost::default());
        let mut c = fconfig(&b);
        c.cache_endpoint = Some(b.root().join("cache.sock"));
        c.cache = 1;
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host.clone()).await,
            Err(NewFactoryError::Config(
                FactoryConfigError::ClientWithLocalBase
            ))
        ));
        let mut c = fconfig(&b);
        c.template = true;
        c.fetch_only = true;
        c.cache = 2;
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host.clone()).await,
            Err(NewFactoryError::Config(
                FactoryConfigError::CacheOverFetchOnly
            ))
        ));
        // An endpoint nobody serves.
        let mut c = fconfig(&b);
        c.cache_endpoint = Some(b.root().join("cache.sock"));
        assert!(matches!(
            Factory::new_with(&c, b.clone(), host).await,
            Err(NewFactoryError::CacheService(_))
        ));
    }
}
