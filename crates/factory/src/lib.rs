//! The factories of vmfactory: where VMs come from (the Rust successor of Kata Containers 1.x
//! `virtcontainers/factory`).
//!
//! This crate owns:
//! - [`FactoryBase`], the source of base VMs, and its kinds: direct (a new VM per call),
//!   template (a clone of a saved VM per call) and cache (a pool of ready VMs from another base);
//! - [`FactoryConfig`], the configuration a [`FactoryBase`] is built from;
//! - the VM-cache server and its client ([`cache_service`]), on top of the core: they use
//!   [`FactoryBase`] and the core never names them; [`Factory::new`] (in `setup.rs`) is the
//!   one place that chooses between a local base and a VM-cache client;
//! - the factory's Prometheus metrics ([`metrics`]): a registry the cache and [`Factory`]
//!   record in, and the HTTP endpoint (`GET /metrics`) a long-running process serves it on.
//!
//! Errors are per operation, beside it: [`FactoryConfigError`] (`FactoryConfig::validate`),
//! [`NewFactoryError`] ([`Factory::new`]), [`BaseError`] (a [`FactoryBase`]'s `get_base_vm`
//! and `close`), [`GetVmError`] ([`Factory::get_vm`]), [`TemplateError`] (making, fetching
//! and removing templates), [`CacheServiceError`] (the VM-cache server and client) and
//! [`metrics::MetricsError`] (the metrics endpoint).
//!
//! It does not own the VM itself (`vmfactory-vm`), QEMU (`vmfactory-hypervisor`) or the agent
//! protocol (`vmfactory-agent`).
#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod base;
mod cache;
pub mod cache_service;
mod config;
mod direct;
mod factory;
mod get_vm;
pub mod metrics;
mod report;
mod setup;
mod template;
#[cfg(test)]
mod testing;
mod unix_socket;

pub use base::{BaseError, FactoryBase, Prestarted};
pub use cache::CacheFactory;
pub use cache_service::{CacheClient, CacheServer, CacheServiceError};
pub use config::{
    FactoryConfig, FactoryConfigError, TemplatePathProblem, DEFAULT_PRESTART,
    DEFAULT_TEMPLATE_PATH, SYSTEM_DIRS,
};
pub use direct::DirectFactory;
pub use factory::{BaseKind, Factory};
pub use get_vm::{config_difference, GetVmError, GetVmStep};
pub use metrics::{GetVmSource, Metrics, MetricsAddress, MetricsServer};
pub use report::error_chain;
pub use setup::NewFactoryError;
pub use template::{
    clone_vm_config, template_paths, template_vm_config, CloneKey, FileIdentity, MountOutcome,
    SystemHost, TemplateError, TemplateFactory, TemplateHost, TemplateMetadata, TemplateStep,
    ACCEL_CACHE_FILE, MARKER_FILE, MAX_METADATA_SIZE, MEMORY_FILE, METADATA_FILE, STATE_FILE,
    TEMPLATE_METADATA_VERSION,
};
pub use unix_socket::{probe_socket, SocketPath};
