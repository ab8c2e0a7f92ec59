//! Host client of the Kata agent protocol over ttRPC, and the vmfactory guest agent.
//!
//! This crate owns:
//! - the protocol subset (`grpc.Health`, `grpc.AgentService`, and our own
//!   `vmfactory.diag.Diagnostics`), generated from `protos/` by ttrpc-codegen;
//! - init duties of the guest agent when it runs as `/init` ([`init`]).
//!
//! It does not know about QEMU, run directories or VMs: `vmfactory-vm` chooses the channel and
//! hands this crate an agent URL.
#![deny(missing_docs)]

pub mod client;
mod convert;
pub mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod handshake;
pub mod init;
pub mod protocols;
pub mod server;
pub mod transport;
pub mod types;
pub mod url;

pub use client::{Agent, AgentConfig, KataAgent};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeAgent, FakeCall};
pub use types::{
    AgentDetails, GuestDetails, HealthStatus, OnlineCpuMem, Resources, Uptime, VersionInfo,
};
pub use url::AgentUrl;

/// The crate version, reported by the guest agent as `agent_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
