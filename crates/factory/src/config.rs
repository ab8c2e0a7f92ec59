//! [`FactoryConfig`]: how a factory is built (Kata's `factory.Config` and the `[factory]`
//! section of its `configuration.toml`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmfactory_vm::VmConfig;

use crate::error::{Error, Result};

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
    pub fn validate(&self) -> Result<()> {
        if self.fetch_only && !self.template {
            return Err(Error::Config("fetch_only needs template = true".into()));
        }
        if self.fetch_only && self.cache > 0 {
            // Kata: a fetch-only template factory cannot feed a cache.
            return Err(Error::Config(
                "A cache cannot use a fetch-only template".into(),
            ));
        }
        if !self.template_path.is_absolute() {
            return Err(Error::Config(format!(
                "template_path {} is not absolute",
                self.template_path.display()
            )));
        }
        if self.template && self.vm.hypervisor.image.is_some() {
            return Err(Error::Config(
                "A template cannot use a disk image (clones would share it)".into(),
            ));
        }
        if self.template && self.vm.hypervisor.initrd.is_none() {
            return Err(Error::Config(
                "A template needs an initrd guest (no image)".into(),
            ));
        }
        self.vm.validate_shape()?;
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
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        c.template = true;
        c.validate().unwrap();
        c.cache = 2;
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        let mut c = cfg();
        c.template_path = "rel".into();
        assert!(matches!(c.validate(), Err(Error::Config(_))));
    }
}
