//! [`FactoryConfig`]: how a factory is built (Kata's `factory.Config` and the `[factory]`
//! section of its `configuration.toml`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmfactory_vm::VmConfig;

/// Why a [`FactoryConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FactoryConfigError {
    /// `fetch_only` without `template`.
    #[error("fetch_only needs template = true")]
    FetchOnlyWithoutTemplate,
    /// A cache over a fetch-only template (Kata refuses it too).
    #[error("A cache cannot use a fetch-only template")]
    CacheOverFetchOnly,
    /// A VM-cache client that would also make its own base VMs.
    #[error("A VM-cache client cannot also use a template or a local cache")]
    ClientWithLocalBase,
    /// The template path is relative.
    #[error("template_path {path} is not absolute")]
    RelativeTemplatePath {
        /// The configured path.
        path: PathBuf,
    },
    /// `template` is on but the base VM cannot be templated (see
    /// [`vmfactory_hypervisor::HypervisorConfig::check_templatable`]).
    #[error("The base VM cannot be templated")]
    NotTemplatable(#[source] vmfactory_hypervisor::ConfigError),
    /// The base VM config is invalid.
    #[error("Invalid base VM config")]
    Vm(#[from] vmfactory_vm::ConfigError),
}

/// Default template directory (a tmpfs is mounted here).
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";

/// How a factory is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactoryConfig {
    /// Make base VMs as clones of a template (Kata `enable_template`).
    #[serde(default)]
    pub template: bool,
    /// Where the template lives (a tmpfs is mounted there).
    #[serde(default = "default_template_path")]
    pub template_path: PathBuf,
    /// Use an existing template and never create one (Kata's fetch-only template factory).
    #[serde(default)]
    pub fetch_only: bool,
    /// Keep this many ready VMs in a cache (Kata `vm_cache_number`); 0 disables the cache.
    #[serde(default)]
    pub cache: u32,
    /// Get base VMs from the VM-cache server on this unix socket (Kata `vm_cache_endpoint`).
    #[serde(default)]
    pub cache_endpoint: Option<PathBuf>,
    /// The base VM config.
    pub vm: VmConfig,
}

fn default_template_path() -> PathBuf {
    PathBuf::from(DEFAULT_TEMPLATE_PATH)
}

impl FactoryConfig {
    /// A direct factory for `vm` (no template, no cache).
    pub fn new(vm: VmConfig) -> Self {
        Self {
            template: false,
            template_path: default_template_path(),
            fetch_only: false,
            cache: 0,
            cache_endpoint: None,
            vm,
        }
    }

    /// Checks the combination of options and the VM config's shape (no file access).
    pub fn validate(&self) -> Result<(), FactoryConfigError> {
        if self.fetch_only && !self.template {
            return Err(FactoryConfigError::FetchOnlyWithoutTemplate);
        }
        if self.fetch_only && self.cache > 0 {
            return Err(FactoryConfigError::CacheOverFetchOnly);
        }
        if self.cache_endpoint.is_some() && (self.template || self.cache > 0) {
            // The server owns templates and pools.
            return Err(FactoryConfigError::ClientWithLocalBase);
        }
        if !self.template_path.is_absolute() {
            return Err(FactoryConfigError::RelativeTemplatePath {
                path: self.template_path.clone(),
            });
        }
        self.vm.validate_shape()?;
        if self.template {
            self.vm
                .hypervisor
                .check_templatable()
                .map_err(FactoryConfigError::NotTemplatable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_hypervisor::HypervisorConfig;

    fn cfg() -> FactoryConfig {
        let hv = HypervisorConfig::new("/k", Some("/i".into()));
        FactoryConfig::new(VmConfig::new(hv))
    }

    #[test]
    fn option_combinations() {
        cfg().validate().unwrap();
        let mut c = cfg();
        c.fetch_only = true;
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::FetchOnlyWithoutTemplate)
        ));
        c.template = true;
        c.validate().unwrap();
        c.cache = 2;
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::CacheOverFetchOnly)
        ));
        let mut c = cfg();
        c.template_path = "rel".into();
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::RelativeTemplatePath { .. })
        ));
    }
}
