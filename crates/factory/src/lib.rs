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
mod config;
mod error;

pub use base::FactoryBase;
pub use config::FactoryConfig;
pub use error::{Error, Result};
