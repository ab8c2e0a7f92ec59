//! The VM-cache server and its client (Kata Containers 1.x's VMCache: `kata-runtime factory
//! init` with `vm_cache_number > 0`, and `factory/grpccache`).
//!
//! [`CacheServer`] serves a [`crate::FactoryBase`] — typically a cache over a direct or template
//! base — to other processes over ttRPC on a unix socket created 0600, with Kata's
//! `cache.CacheService`: `Config` (the base [`vmfactory_vm::VmConfig`]), `GetBaseVM` (a VM,
//! handed over as its wire form), `Status` (the server's pid and its ready VMs) and `Quit`.
//! [`CacheClient`] is the other end and a [`crate::FactoryBase`] itself: it re-attaches to each
//! VM it gets from the wire form ([`vmfactory_vm::Vm::from_wire`]).
//!
//! Differences from Kata, on purpose:
//! - A template base works: its VMs are paused clones, handed out paused and resumed by
//!   `get_vm` in the client's process (Kata's VMCache refused templates).
//! - `GrpcVM.hypervisor` carries the whole VM wire form ([`vmfactory_vm::VmState`]: id, config,
//!   QEMU state, agent URL, sizes), not only the hypervisor's; the other `GrpcVM` fields repeat
//!   it as Kata's message has them. `proxyPid` is 0 (our proxies run in the process that holds
//!   the VM) and `proxyURL` is the agent URL.
//! - `GrpcVMStatus` adds `id` (4) and `state` (5), which Kata peers ignore.
//! - The server refuses to start on a live socket and replaces a stale one; it stops cleanly on
//!   `Quit`, SIGTERM and SIGINT (closing the base: cached VMs stop) and removes its socket.
//! - A `GetBaseVM` whose client hangs up before the VM is ready does not leak the VM: it is
//!   stopped. (A client that hangs up after the VM was detached but before the reply arrived
//!   still orphans it, as in Kata: the wire form is in the lost reply and in
//!   `<run_root>/vm/<id>/state.json`.)
//!
//! The protocol code is generated at build time from `protos/cache.proto` (ttrpc-codegen, no
//! protoc); `google.protobuf.Empty` comes from the `protobuf` crate's well-known types.

mod client;
mod convert;
mod error;
pub mod protocols;
mod server;
pub(crate) mod socket;

pub use client::{CacheClient, CacheStatus, CALL_TIMEOUT, GET_BASE_VM_TIMEOUT};
pub use error::{CacheServiceError, Result};
pub use server::CacheServer;
pub use socket::check_endpoint;
