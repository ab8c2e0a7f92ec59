//! `containerd-shim-vmfactory-v2`: a containerd shim v2 that runs a sandbox's OCI containers
//! in one factory VM.
//!
//! This crate owns the shim's side: containerd's task API ([`task`], [`service`]), the
//! lifecycle of shim processes ([`shim`]: one per sandbox, CRI annotations group a pod's
//! containers), containerd's stdio FIFOs ([`stdio`]), task events ([`events`]) and the rootfs
//! as an erofs image ([`rootfs`]). It does not own the VM or what runs in it: that is
//! `vmfactory-vm`'s containers API and the guest agent, reached through the narrow
//! [`sandbox::SandboxVm`] trait (the real adapter is the `vm_sandbox` module).
//!
//! The container's root in the guest is an overlay of the read-only erofs image and a tmpfs:
//! writes go to guest memory and are gone when the container is deleted; they are never
//! reflected in containerd's snapshot.

#![deny(missing_docs)]

// The README crates.io shows: its example compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod events;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod logging;
pub mod mounts;
pub mod node;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod shim;
pub mod status;
pub mod stdio;
pub mod task;
pub mod vm_sandbox;

pub use rootfs::{RootfsCache, RootfsConfig, RootfsError};
pub use sandbox::{SandboxError, SandboxProcess, SandboxProvider, SandboxVm};
pub use service::TaskService;
pub use shim::{ShimSetup, VmfactoryShim};
pub use status::{Code, TaskError};

/// The runtime name containerd knows this shim by.
pub const RUNTIME_ID: &str = "io.containerd.vmfactory.v2";

/// The factory's default run root (`vmfactory_vm`'s `DEFAULT_ROOT`): images live in
/// `<run_root>/rootfs`.
pub const DEFAULT_RUN_ROOT: &str = "/run/vc";
