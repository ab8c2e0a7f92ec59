//! The VM of vmfactory: a hypervisor, a guest agent, a console proxy and persisted state wired
//! together (the Rust successor of Kata Containers 1.x `virtcontainers/vm.go`).
//!
//! This crate owns:
//! - [`VmConfig`] (hypervisor, agent timeouts, proxy kind, run root) and its validation;
//! - [`Vm`]: [`Vm::new`] boots a VM step by step ([`NewStep`]) and undoes every earlier step
//!   when one fails, so no process, socket, directory or proxy is left behind; pause, resume,
//!   save (as a template), hotplug that keeps the recorded size true, onlining, RNG reseed,
//!   guest time sync, sandbox links, status; [`Vm::stop`] stops the VM and destroys its
//!   storage; a VM that fails to come up reports its last console lines and keeps its console
//!   log under `<run_root>/failed/<id>/` ([`Postmortem`], [`Error::NotUp`]); [`Vm::orphans`] lists, and [`Vm::reap_orphans`] ends, the VMs whose owner died
//!   (exactly the processes they recorded);
//! - the wire forms of a config ([`VmConfig::to_wire`]) and of a running VM ([`VmState`],
//!   [`Vm::detach`] / [`Vm::from_wire`]) so another handle, in this or another process, can
//!   re-attach to a running VM: QMP and the agent reconnected, QEMU's pid checked alive.
//!
//! Each VM lives in `<run_root>/vm/<id>/` (run root default `/run/vc`): the `persist` crate
//! creates, locks and destroys that directory and keeps `state.json` in it, and the same
//! directory is the hypervisor's run directory, so the VM's sockets and logs are there too and
//! go with it. The lock makes one handle the owner of a VM at a time.
//!
//! It does not own QEMU, QMP or the command line (`vmfactory-hypervisor`), the agent protocol
//! (`vmfactory-agent`), the console (`vmfactory-proxy`), the storage format
//! (`vmfactory-persist`), or templates, pools and request sizing (`vmfactory-factory`).
//!
//! Differences from the seed, on purpose:
//! - `Vm::new` boots; there is no separate `start` (the seed's `Start` re-ran the hypervisor's
//!   start on a VM `NewVM` had already started). A template clone boots paused:
//!   [`Vm::resume`] starts its guest.
//! - [`Vm::disconnect`] only closes the agent connection; the proxy runs until
//!   [`Vm::stop`] / [`Vm::detach`], so the console keeps showing the guest.
//! - [`Vm::add_memory`] updates the recorded memory, and hotplug bookkeeping is saved.
//! - [`Vm::assign_sandbox`] refuses to replace anything but a symlink, and rolls back.
//!
//! Parts come from a [`Backends`] ([`QemuBackends`] for the real ones); tests use fakes
//! (`FakeBackends`, with the `test-utils` feature for other crates' tests). The
//! hypervisor reports where the agent listens as an [`AgentEndpoint`]; [`agent_url`] turns it
//! into the [`AgentUrl`] the agent client dials, and nothing stores either: both derive from the
//! hypervisor's config and run directory.
//!
//! The types of the leaf crates that this crate's API exposes (in signatures, public fields
//! and error sources) are re-exported here, so `vmfactory-vm` is the only dependency a user
//! needs. The leaf crates' errors are re-exported as `HypervisorError`,
//! `HypervisorConfigError`, `AgentError`, `ProxyError` and `PersistError`.
//!
//! # Examples
//! ```no_run
//! # async fn example(kernel: std::path::PathBuf, initrd: std::path::PathBuf)
//! # -> vmfactory_vm::Result<()> {
//! use vmfactory_vm::{HypervisorConfig, Vm, VmConfig};
//!
//! let vm = Vm::new(VmConfig::new(HypervisorConfig::new(kernel, Some(initrd)))).await?;
//! vm.add_cpus(1).await?;
//! vm.online_cpu_memory().await?;
//! let wire = vm.detach().await?; // hand over ...
//! let vm = Vm::from_wire(&wire).await?; // ... and take over
//! vm.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything a user names comes from this crate alone:
//! ```
//! use std::sync::Arc;
//! use vmfactory_vm::{
//!     agent_url, Accel, Agent, AgentChannel, AgentConfig, AgentEndpoint, AgentUrl, Error,
//!     Hypervisor, HypervisorConfig, HypervisorError, MachineType, Proxy, ProxyKind, QemuState,
//!     RunPaths, TemplatePaths, TemplateRole, Vm, VmConfig, VmStatus,
//! };
//!
//! let mut hv = HypervisorConfig::new("/guest/vmlinuz", Some("/guest/initramfs.cpio".into()));
//! hv.accel = Accel::Tcg;
//! hv.machine = MachineType::Q35;
//! hv.agent_channel = AgentChannel::Vsock { guest_cid: None }; // a CID per start
//! hv.template = Some(TemplateRole::SaveTo(TemplatePaths {
//!     memory: "/run/vc/template/memory".into(),
//!     state: "/run/vc/template/state".into(),
//! }));
//! let mut config = VmConfig::new(hv);
//! config.proxy = ProxyKind::None;
//! let client: AgentConfig = config.agent.client_config();
//! assert_eq!(client.call_timeout, config.agent.call_timeout);
//!
//! let url: AgentUrl = agent_url(&AgentEndpoint::Vsock { cid: 3, port: 1024 });
//! assert_eq!(url.to_string(), "vsock://3:1024");
//!
//! // What a `Vm` and its wire form hand out.
//! fn parts(vm: &Vm) -> (&Arc<dyn Hypervisor>, &Arc<dyn Agent>, &Arc<dyn Proxy>, AgentUrl) {
//!     (vm.hypervisor(), vm.agent(), vm.proxy(), vm.agent_url())
//! }
//! fn socket_dir(state: &QemuState) -> &RunPaths {
//!     &state.paths
//! }
//! fn paused(status: &VmStatus) -> bool {
//!     *status == VmStatus::Paused
//! }
//! fn qemu_gone(e: &Error) -> bool {
//!     matches!(e, Error::Hypervisor { source, .. }
//!         if matches!(**source, HypervisorError::ProcessGone { .. }))
//! }
//! # let _ = (parts, socket_dir, paused, qemu_gone);
//! ```
#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod backends;
mod config;
mod containers;
mod disks;
mod endpoint;
mod envelope;
mod error;
mod exit;
#[cfg(test)]
mod exit_tests;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod handover;
mod links;
mod network;
mod ops;
mod orphans;
mod postmortem;
mod prepared;
mod sandbox;
mod timing;
mod vm;
mod wire;
mod workload;

pub use backends::{Backends, NewStep, QemuBackends};
pub use config::{
    VmAgentConfig, VmConfig, DEFAULT_CALL_TIMEOUT, DEFAULT_DIAL_TIMEOUT, DEFAULT_READY_TIMEOUT,
    MAX_SOCKET_PATH,
};
pub use containers::{
    container_spec, ContainerConfig, ContainerError, REMOVE_TIMEOUT, ROOTFS_FSTYPE,
};
pub use disks::DiskMount;
pub use endpoint::agent_url;
pub use envelope::{MAX_WIRE_SIZE, WIRE_VERSION};
pub use error::{AgentTimeout, ConfigError, Error, Result, WireError};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::FakeBackends;
pub use network::GUEST_NIC;
pub use ops::{VmInfo, CLOCK_SYNC_ATTEMPTS, CLOCK_SYNC_TOLERANCE, ENTROPY_SOURCE, RESEED_BYTES};
pub use orphans::{Orphan, RecordedProcess};
pub use postmortem::{
    failed_root, list_failed, remove_failed, FailedVm, Postmortem, FAILED_DIR, KEEP_FAILED,
};
pub use prepared::PreparedVm;
pub use sandbox::{SandboxLinks, SHARED_DIR};
pub use timing::{step_took, TIMING_TARGET};
pub use vm::Vm;
pub use wire::VmState;
pub use workload::{Process, ProcessOutput};

// The leaf types this crate's public API exposes.
/// The OCI spec crate [`ContainerConfig`] takes its `Spec` from, for callers without their own.
pub use oci_spec;
pub use vmfactory_agent::{
    Agent, AgentConfig, AgentUrl, ContainerStats, Error as AgentError, ExitStatus, ForkReseed,
    KataAgent, ProcessSpec,
};
pub use vmfactory_hypervisor::{
    Accel, AgentChannel, AgentEndpoint, AttachedDisk, ConfigError as HypervisorConfigError,
    DiskConfig, DiskError, DiskFormat, Error as HypervisorError, Hypervisor, HypervisorConfig,
    MachineType, ProcessKind, ProcessRecord, QemuState, RunPaths, TemplatePaths, TemplateRole,
    VmStatus, VsockError,
};
pub use vmfactory_persist::Error as PersistError;
pub use vmfactory_proxy::{rotated_path, Error as ProxyError, Proxy, ProxyKind};
