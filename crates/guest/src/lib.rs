//! The vmfactory guest agent: the program that runs as `/init` (PID 1) of the guest image and
//! serves the Kata agent protocol to the host.
//!
//! This crate owns:
//! - the PID 1 duties ([`init`]): mount the pseudo file systems, load the kernel modules, keep
//!   the console on stdio;
//! - the ttRPC server ([`server`]) of `grpc.Health`, `grpc.AgentService` (with the processes,
//!   files and storages it starts and mounts, and the links and routes it configures),
//!   `vmfactory.diag.Diagnostics` and `vmfactory.workload.Workload`, on the virtio-serial port
//!   `agent.channel.0`, on vsock port 1024, or on any listener (tests use unix sockets,
//!   socketpairs and ptys), and the reaper of every child of the guest;
//! - the guest's console lines ([`console`]) and the `vmfactory-agent` binary that ties it all
//!   together.
//!
//! It does not own the protocol: the generated code, the request/response types, the serial
//! session handshake, and the port names and console lines the host matches are
//! `vmfactory-agent`'s, so host and guest compile the same definitions. This crate depends on
//! `vmfactory-agent`, never the reverse, and nothing on the host depends on this crate.
//!
//! # Example
//!
//! Serving on a unix socket, as `vmfactory-agent --serve-unix PATH` does on a host (not run:
//! it serves forever):
//!
//! ```no_run
//! use vmfactory_guest::server::{serve_unix, GuestConfig};
//!
//! # async fn example() -> vmfactory_guest::Result<()> {
//! serve_unix(GuestConfig::default(), "/tmp/agent.sock".as_ref()).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod console;
pub mod error;
pub mod init;
pub mod server;

pub use error::{Error, Result};
pub use init::InitError;
pub use server::{AgentServer, GuestAgent, GuestClock, GuestConfig, GuestPaths, SystemClock};
