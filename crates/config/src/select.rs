//! The factory a one-off user of the node takes a VM from: `vmfactory run`, and the containerd
//! shim for each sandbox. Same order as Kata's runtime: the VM-cache server if one answers,
//! else the template, else a direct boot.

use vmfactory_factory::{Factory, FactoryConfig, NewFactoryError, TemplateError};

use crate::Settings;

/// Where [`Settings::factory_for_use`] found its VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactoryChoice {
    /// The VM-cache server at `vm_cache_endpoint` answered.
    Cache,
    /// The template at `template_path` was fetched.
    Template,
    /// Direct boots. `faster_configured` when the configuration asks for a template or a
    /// cache that is not there (`vmfactory init` makes them): worth telling the user.
    Direct {
        /// A template or a VM cache is configured but absent.
        faster_configured: bool,
    },
}

impl Settings {
    /// The fastest factory available now, for a process that takes one VM at a time: no
    /// pre-started clones (a QEMU started ahead would only be stopped again).
    pub async fn factory_for_use(&self) -> Result<(Factory, FactoryChoice), NewFactoryError> {
        if self.cache_number > 0 {
            let mut config = FactoryConfig::new(self.vm.clone());
            config.template_path = self.template_path.clone();
            config.cache_endpoint = Some(self.endpoint.clone());
            match Factory::new(&config).await {
                Ok(f) => return Ok((f, FactoryChoice::Cache)),
                Err(e) => tracing::debug!(error = %e, "no VM-cache server"),
            }
        }
        if self.template {
            let mut config = FactoryConfig::new(self.vm.clone());
            config.template_path = self.template_path.clone();
            config.template = true;
            config.fetch_only = true;
            config.prestart = 0;
            match Factory::new(&config).await {
                Ok(f) => return Ok((f, FactoryChoice::Template)),
                // Not made yet is normal; a template there that cannot serve is not.
                Err(NewFactoryError::Template(TemplateError::Missing { .. })) => {
                    tracing::info!("no template yet: direct VMs")
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    source = ?std::error::Error::source(&e),
                    "the template cannot serve: direct VMs"
                ),
            }
        }
        let faster_configured = self.template || self.cache_number > 0;
        let f = Factory::new(&FactoryConfig::new(self.vm.clone())).await?;
        Ok((f, FactoryChoice::Direct { faster_configured }))
    }
}
