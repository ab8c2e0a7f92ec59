//! Host client of the Kata agent protocol over ttRPC, and the vmfactory guest agent.
//!
//! This crate owns:
//! - the protocol subset (`grpc.Health`, `grpc.AgentService`, and our own
//!   `vmfactory.diag.Diagnostics`), generated from `protos/` by ttrpc-codegen;
//! - init duties of the guest agent when it runs as `/init` ([`init`]).
//!
//! It does not know about QEMU, run directories or VMs: `vmfactory-vm` chooses the channel and
//! hands this crate an agent URL.
//!
//! # Example
//!
//! The README's example, compiled here (not run: it needs a guest):
//!
//! ```no_run
//! use std::time::Duration;
//! use vmfactory_agent::{Agent, KataAgent};
//!
//! # async fn example() -> vmfactory_agent::Result<()> {
//! let agent = KataAgent::new("serial:///run/vc/vm/vm1/agent.sock", Duration::from_secs(5))?;
//! agent.check().await?;                   // grpc.Health/Check over ttRPC
//! agent.online_cpu_mem(true, 1, true).await?;
//! println!("{:?}", agent.resources().await?); // our diagnostics service: CPUs, MemTotal, blocks
//! # Ok(())
//! # }
//! ```
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
