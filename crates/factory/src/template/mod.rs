//! Templates: a VM saved once and cloned for every base VM, with the metadata that tells
//! whether a saved template still matches a config, the host operations (mounts, QEMU's
//! version) it needs, and [`TemplateError`], the error of all of them.
//!
//! Inside, modules depend one way: `factory` → `make`, `owner` → `metadata` → `host` →
//! `error`, and `factory` → `prestart` → `files` (the data files' kind, size and times) →
//! `error`.

mod error;
mod factory;
#[cfg(test)]
mod fetch_tests;
mod files;
mod host;
mod make;
mod metadata;
mod owner;
#[cfg(test)]
mod ownership_tests;
mod prestart;
#[cfg(test)]
mod prestart_tests;
#[cfg(test)]
mod vsock_tests;

pub use error::{TemplateError, TemplateStep};
pub use factory::{clone_vm_config, template_paths, template_vm_config, TemplateFactory};
pub use host::{MountOutcome, SystemHost, TemplateHost, ACCEL_CACHE_FILE};
pub(crate) use metadata::first_difference;
pub use metadata::{
    CloneKey, FileIdentity, TemplateMetadata, MAX_METADATA_SIZE, MEMORY_FILE, METADATA_FILE,
    STATE_FILE, TEMPLATE_METADATA_VERSION,
};
pub use owner::MARKER_FILE;
