//! The Kata agent protocol, its host client and transports.
//!
//! This crate owns:
//! - the protocol subset (`grpc.Health`, `grpc.AgentService`, and our own
//!   `vmfactory.diag.Diagnostics`), generated from `protos/` by ttrpc-codegen ([`protocols`]),
//!   with its own request/response [`types`] converted to and from the wire in one place;
//! - the host client: the object-safe [`Agent`] trait and [`KataAgent`], and `FakeAgent` for
//!   other crates' tests (feature `test-utils`);
//! - guest networking ([`net`]): the interfaces and routes the host sets through the agent;
//! - the transports ([`AgentUrl`]: virtio-serial, vsock, hybrid vsock, unix) and the session
//!   [`handshake`] of a virtio-serial port, both sides of it;
//! - what host and guest agree on about the agent's endpoints and console lines ([`channel`]).
//!
//! It does not hold the guest agent program: that is `vmfactory-guest`, which depends on this
//! crate for the protocol. Nor does it know about QEMU, run directories or VMs: `vmfactory-vm`
//! chooses the channel and hands this crate an agent URL.
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

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod agent;
pub mod channel;
pub mod client;
pub mod container;
mod convert;
pub mod error;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod handshake;
pub mod net;
pub mod protocols;
pub mod transport;
pub mod types;
pub mod url;
pub mod workload;

pub use agent::Agent;
pub use channel::{AGENT_PORT_NAME, AGENT_VSOCK_PORT, READY_LINE};
pub use client::{AgentConfig, KataAgent};
pub use container::{ContainerSpec, ContainerStats, Mount, Namespace, Rlimit};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeAgent, FakeCall};
pub use net::{Interface, IpAddress, IpFamily, NetConfigError, Route};
pub use types::{
    AgentDetails, ForkReseed, GuestDetails, HealthStatus, OnlineCpuMem, Resources, Uptime,
    VersionInfo,
};
pub use url::AgentUrl;
pub use workload::{CopyFileChunk, ExitStatus, FileChunk, ProcessSpec, Storage};

/// The crate version; the guest agent reports it as `agent_version`, so a host can compare it
/// with its own.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
