//! The VM layer's hypervisor: an object-safe async [`Hypervisor`] trait and its QEMU backend
//! ([`Qemu`]), driven over QMP.
//!
//! This crate owns: the QEMU command line ([`cmdline`]), the QMP client ([`qmp`]), vsock guest
//! CIDs reserved in the kernel and handed to QEMU ([`vsock`]), QEMU and
//! `vhost-device-vsock` processes and the records each writes of itself in the run directory
//! before it execs ([`ProcessRecord`]), template save / boot-from-template (migration with
//! `x-ignore-shared`), CPU, memory and disk hotplug ([`disk`]), the wire form ([`QemuState`]) another process
//! uses to re-attach to a running VM, and what `accel = auto` and the CPU model resolve to
//! ([`accel`], with a cache file its caller names). It does not own the guest agent (it only reports where
//! the agent listens, see [`Hypervisor::agent_endpoint`]), the console proxy, template
//! metadata or run-directory bookkeeping: those live in the `agent`, `proxy`, `factory` and
//! `persist` crates.
//!
//! Facts about QEMU 7.2 this crate relies on:
//! - `query-status` reports `inmigrate` for a clone until `migrate-incoming` completes, then
//!   `paused`; a template after `migrate` reports `postmigrate`.
//! - `query-hotpluggable-cpus` lists every possible CPU slot; taken slots carry a `qom-path`.
//!   A slot is plugged with `device_add` of its `type` and all of its `props`.
//! - vhost-user devices (hybrid vsock) need guest RAM shared with the backend process
//!   (`memory-backend-memfd,share=on`), and block migration, hence no templates with them.
//! - vhost-vsock migrates: a clone's `guest-cid` comes from its own command line (it is not
//!   in the migration stream), and the device's post-load sends the guest
//!   `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` once it runs, on which the guest driver re-reads its
//!   CID and resets its connected sockets (listeners stay). So each clone takes a new CID.
//! - q35 hot-plugs behind `pcie-root-port`s through ACPI (ICH9-LPC's
//!   `acpi-pci-hotplug-with-bridge-support` is on in 7.2): the guest's eject after
//!   `device_del` took ~70 ms under TCG. `DEVICE_DELETED` comes twice,
//!   first for the virtio backend (a `path`, no `device`), then for the device.
//! - qapi 0.15's types follow QEMU 9.1's schema; where a 9.1 type may not match what 7.2 sends
//!   (`query-migrate`), this crate reads raw JSON.
//!
//! With the `test-utils` feature, `FakeHypervisor` stands in for QEMU in other crates' tests.
//!
//! # Example
//!
//! The README's example, compiled here (not run: it needs QEMU and a guest image):
//!
//! ```no_run
//! use vmfactory_hypervisor::{Hypervisor, HypervisorConfig, Qemu};
//!
//! # async fn example() -> vmfactory_hypervisor::Result<()> {
//! let cfg = HypervisorConfig::new("target/guest/vmlinuz", Some("target/guest/initramfs.cpio".into()));
//! let vm = Qemu::new("vm1", cfg, "/run/vc/vm/vm1")?;
//! vm.start().await?;                      // spawn QEMU, negotiate QMP
//! vm.add_vcpus(1).await?;                 // hotplug through query-hotpluggable-cpus + device_add
//! vm.stop().await?;                       // quit, SIGKILL after a bound, reap, remove sockets
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub mod accel;
pub mod cmdline;
pub mod config;
pub mod disk;
mod endpoint;
pub mod error;
mod exit;
#[cfg(feature = "test-utils")]
pub mod fake;
mod files;
mod process;
pub mod qemu;
pub mod qmp;
mod record;
pub mod state;
pub mod vsock;
pub mod wait;

pub use accel::{
    explain_accel, resolve_accel, resolve_accel_with_cache, AccelChoice, AccelReason,
    KVM_DEFAULT_CPU_MODEL, PROBE_TIMEOUT,
};
pub use cmdline::RunPaths;
pub use config::VmSize;
pub use config::{
    Accel, AgentChannel, HypervisorConfig, MachineType, NicConfig, TemplatePaths, TemplateRole,
    AGENT_VSOCK_PORT, DEFAULT_KERNEL_PARAMS, MAX_MEMORY_MIB, NIC_NETNS, NIC_TAP, VHOST_NET,
};
pub use disk::{AttachedDisk, DiskConfig, DiskError, DiskFormat};
pub use endpoint::AgentEndpoint;
pub use error::{ConfigError, Error, QmpError, QmpErrorClass, Result};
#[cfg(feature = "test-utils")]
pub use fake::{FakeCall, FakeHypervisor, FakeStep};
pub use qemu::{qemu_version, Qemu};
pub use qmp::QmpClient;
pub use record::{ProcessKind, ProcessRecord};
pub use state::{QemuState, VmStatus, QEMU_STATE_VERSION};
pub use vsock::{CidReservation, VsockError, VHOST_VSOCK_DEVICE};

/// A VM's hypervisor process, as the `vm` crate sees it.
///
/// Handles are cheap to share (`Arc<dyn Hypervisor>`); methods take `&self` and serialise
/// internally. Lifecycle: [`start`](Hypervisor::start) once, then any of the operations, then
/// [`stop`](Hypervisor::stop) (idempotent) or [`detach`](Hypervisor::detach).
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// The VM id.
    fn id(&self) -> &str;

    /// The config the VM was created with.
    fn config(&self) -> &HypervisorConfig;

    /// The run directory (sockets and logs live here).
    fn run_dir(&self) -> &Path;

    /// Boots the VM: spawns the hypervisor, connects and negotiates QMP. As a clone
    /// ([`TemplateRole::CloneFrom`]) it also loads the template state; the VM then stays paused until
    /// [`resume`](Hypervisor::resume). Any failure tears down what was created.
    async fn start(&self) -> Result<()>;

    /// Does ahead of need what [`start`](Hypervisor::start) can do before it knows the VM is
    /// wanted: for a clone, QEMU spawned, QMP negotiated and migration capabilities set, the
    /// template memory mapped but untouched, waiting for the state load. `start` then does the
    /// rest. Optional: by default nothing happens here and `start` does it all. Any failure
    /// tears down what was created; [`stop`](Hypervisor::stop) ends a pre-started VM.
    async fn prestart(&self) -> Result<()> {
        Ok(())
    }

    /// Stops the VM (`quit`, then SIGKILL after a bound), reaps it and removes the sockets and
    /// files it created. Idempotent.
    async fn stop(&self) -> Result<()>;

    /// Resolves, with [`Error::Exited`] (exit status and the tail of its stderr), as soon as
    /// the hypervisor process, or a helper process it runs, exits while this handle runs the
    /// VM. Pending before [`start`](Hypervisor::start) and after [`stop`](Hypervisor::stop) or
    /// [`detach`](Hypervisor::detach): those ends are not exits. Race it against a wait on the
    /// VM (`tokio::select!`) so that a VM that dies ends the wait at once; this trait's own
    /// methods do so already.
    async fn exited(&self) -> Error;

    /// Pauses the guest (QMP `stop`).
    async fn pause(&self) -> Result<()>;

    /// Resumes the guest (QMP `cont`).
    async fn resume(&self) -> Result<()>;

    /// Saves the VM as a template: pause, `x-ignore-shared`, migrate the device state to
    /// the template's state file and wait for completion. Needs [`TemplateRole::SaveTo`]. The VM is
    /// left in `postmigrate`; stop it afterwards.
    async fn save_template(&self) -> Result<()>;

    /// Hot-adds up to `n` vCPUs into free slots; returns how many were added (fewer when fewer
    /// slots are free). The guest sees them offline until it onlines them. If plugging one
    /// fails, those added by this call are unplugged and the error returned.
    async fn add_vcpus(&self, n: u32) -> Result<u32>;

    /// Hot-adds one DIMM of `mib` MiB (backend of the same kind as boot memory); returns the
    /// MiB added.
    async fn add_memory(&self, mib: u64) -> Result<u64>;

    /// Hot-plugs `disk` as a virtio-blk device in a free disk slot (see
    /// [`HypervisorConfig::disk_slots`]) and returns where the guest finds it. The image is
    /// checked first ([`DiskError::ImageUnreadable`] names its path); a failure undoes what
    /// this call added. A read-only image can be attached to many VMs at once. The guest
    /// still has to mount it.
    async fn attach_disk(&self, disk: &DiskConfig) -> Result<AttachedDisk>;

    /// Unplugs disk `id`: asks the guest to release it, waits until it has (at most
    /// [`disk::DETACH_TIMEOUT`], else [`DiskError::DetachTimeout`] and the disk stays), then
    /// closes the image.
    async fn detach_disk(&self, id: &str) -> Result<()>;

    /// The disks attached now, in attach order.
    async fn disks(&self) -> Vec<AttachedDisk>;

    /// The VM's run state.
    async fn status(&self) -> Result<VmStatus>;

    /// The VM's size as the hypervisor reports it now (QEMU: `query-cpus-fast` and
    /// `query-memory-devices`), for checking recorded sizes against the truth.
    async fn size(&self) -> Result<VmSize>;

    /// The hypervisor process id, while running.
    fn pid(&self) -> Option<u32>;

    /// The serial console's unix socket.
    fn console_address(&self) -> PathBuf;

    /// The file the serial console is logged to (by the VM's console proxy).
    fn console_log_path(&self) -> PathBuf;

    /// Where the agent listens, derived from the config's agent channel, the run directory
    /// and the vsock CID the VM holds. `None` for a vsock VM without a pinned CID before
    /// [`start`](Hypervisor::start) has reserved one and after
    /// [`stop`](Hypervisor::stop)/[`detach`](Hypervisor::detach).
    fn agent_endpoint(&self) -> Option<AgentEndpoint>;

    /// The wire form of this VM (for another process to re-attach).
    async fn state(&self) -> QemuState;

    /// Releases the VM without stopping it (closes QMP, forgets the process) and returns its
    /// wire form; the handle is unusable afterwards. QEMU serves one QMP client at a time, so
    /// a VM must be detached before another process attaches to it.
    async fn detach(&self) -> Result<QemuState>;
}
