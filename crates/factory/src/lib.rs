//! The factories of vmfactory: where VMs come from (the Rust successor of Kata Containers 1.x
//! `virtcontainers/factory`).
//!
//! This crate owns:
//! - [`FactoryBase`], the source of base VMs, and its kinds: direct (a new VM per call),
//!   template (a clone of a saved VM per call) and cache (a pool of ready VMs from another base);
//! - [`FactoryConfig`], the configuration a [`FactoryBase`] is built from;
//! - the VM-cache server and its client.
//!
//! It does not own the VM itself (`vmfactory-vm`), QEMU (`vmfactory-hypervisor`) or the agent
//! protocol (`vmfactory-agent`).
#![deny(missing_docs)]

mod base;
mod cache;
pub mod cache_service;
mod config;
mod direct;
mod error;
mod factory;
mod get_vm;
mod host;
mod metadata;
mod template;
#[cfg(test)]
mod testing;

pub use base::FactoryBase;
pub use cache::CacheFactory;
pub use cache_service::{CacheClient, CacheServer, CacheServiceError};
pub use config::{FactoryConfig, DEFAULT_TEMPLATE_PATH};
pub use direct::DirectFactory;
pub use error::{error_chain, Error, Result};
pub use factory::{BaseKind, Factory};
pub use get_vm::{config_difference, GetVmError, GetVmStep};
pub use host::{MountOutcome, SystemHost, TemplateHost};
pub use metadata::{
    CloneKey, FileIdentity, TemplateError, TemplateMetadata, MAX_METADATA_SIZE, MEMORY_FILE,
    METADATA_FILE, STATE_FILE, TEMPLATE_METADATA_VERSION,
};
pub use template::{
    clone_vm_config, template_paths, template_vm_config, TemplateFactory, AGENT_LISTENING_PREFIX,
};
