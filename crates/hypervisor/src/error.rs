//! Error types of the hypervisor crate.
//!
//! Three enums, one per concern: [`ConfigError`] (validation of a [`crate::HypervisorConfig`]),
//! [`QmpError`] (the QMP client) and the crate-wide [`Error`] returned by the
//! [`crate::Hypervisor`] trait, which wraps the other two, [`crate::vsock::VsockError`]
//! (reserving a vsock CID) and [`crate::disk::DiskError`] (disk hotplug), each beside its
//! operation. Callers branch on variants, never on text.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Result type of the hypervisor crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A [`crate::HypervisorConfig`] that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The kernel image is missing or unreadable.
    #[error("Kernel {path} is not readable")]
    KernelUnreadable {
        /// The configured kernel path.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is missing or unreadable.
    #[error("Initrd {path} is not readable")]
    InitrdUnreadable {
        /// The configured initrd path.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// The disk image is missing or unreadable.
    #[error("Disk image {path} is not readable")]
    ImageUnreadable {
        /// The configured image path.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// `vcpus` is 0.
    #[error("A VM needs at least one vCPU")]
    ZeroVcpus,
    /// `vcpus` is greater than `max_vcpus`.
    #[error("{vcpus} vCPUs exceed the maximum of {max_vcpus}")]
    TooManyVcpus {
        /// Boot vCPUs.
        vcpus: u32,
        /// Configured maximum.
        max_vcpus: u32,
    },
    /// `memory_mib` is 0.
    #[error("A VM needs memory (memory_mib is 0)")]
    ZeroMemory,
    /// `memory_mib` is greater than `max_memory_mib`.
    #[error("{memory_mib} MiB of memory exceed the maximum of {max_memory_mib} MiB")]
    TooMuchMemory {
        /// Boot memory.
        memory_mib: u64,
        /// Configured maximum.
        max_memory_mib: u64,
    },
    /// `max_memory_mib` is above what any VM may have ([`crate::config::MAX_MEMORY_MIB`]).
    #[error("{max_memory_mib} MiB of memory exceed the limit of {limit} MiB")]
    MemoryOverLimit {
        /// The configured maximum.
        max_memory_mib: u64,
        /// The limit.
        limit: u64,
    },
    /// A requested vCPU count is outside what the VM boots with and can grow to
    /// ([`crate::HypervisorConfig::check_size`]).
    #[error("{vcpus} vCPUs are outside {min}..={max}")]
    VcpusOutOfRange {
        /// The requested vCPUs.
        vcpus: u32,
        /// Boot vCPUs.
        min: u32,
        /// Configured maximum.
        max: u32,
    },
    /// A requested memory size is outside what the VM boots with and can grow to
    /// ([`crate::HypervisorConfig::check_size`]).
    #[error("{memory_mib} MiB of memory are outside {min}..={max} MiB")]
    MemoryOutOfRange {
        /// The requested memory in MiB.
        memory_mib: u64,
        /// Boot memory.
        min: u64,
        /// Configured maximum.
        max: u64,
    },
    /// A requested memory size needs hotplug, but no memory slots are configured.
    #[error("Growing memory from {boot_mib} to {memory_mib} MiB needs memory slots")]
    NoMemoryHotplug {
        /// The requested memory in MiB.
        memory_mib: u64,
        /// Boot memory.
        boot_mib: u64,
    },
    /// Memory slots are configured but there is no room above the boot memory to plug into.
    #[error("Memory slots need max_memory_mib above memory_mib")]
    SlotsWithoutMaxMemory,
    /// A template role is set with a disk image: clones would share a writable disk.
    #[error("Only initrd guests can be templated (a disk image is configured)")]
    TemplateWithImage,
    /// A template role is set but no initrd is.
    #[error("Only initrd guests can be templated (no initrd is configured)")]
    TemplateWithoutInitrd,
    /// The NIC's MAC is not six hex pairs of a unicast address.
    #[error("Bad NIC MAC {mac:?}: want six hex pairs of a unicast address (aa:bb:cc:dd:ee:ff)")]
    BadMac {
        /// As configured.
        mac: String,
    },
    /// vhost-net is required but the host has none.
    #[error("vhost-net is required (nic.vhost = true) but {path} does not exist")]
    NoVhostNet {
        /// Where it was looked for.
        path: &'static str,
    },
    /// Hybrid vsock uses a non-migratable vhost-user device, so it cannot be templated.
    #[error("Hybrid vsock cannot be used with templates")]
    HybridVsockWithTemplate,
    /// The machine type cannot hot-plug, but the config asks for hotplug room.
    #[error("Machine {machine} does not support hotplug (max_vcpus or memory_slots set)")]
    HotplugUnsupported {
        /// The machine type.
        machine: crate::MachineType,
    },
    /// A pinned vsock CID with a template role: every clone would claim the same CID.
    #[error("A pinned guest CID ({cid}) cannot be used with templates (each clone gets its own)")]
    PinnedCidWithTemplate {
        /// The configured CID.
        cid: u32,
    },
    /// The guest CID is reserved (0, 1 and 2 are the hypervisor, loopback and host; u32::MAX
    /// is `VMADDR_CID_ANY`).
    #[error("Guest CID {cid} is reserved (must be 3 to 4294967294)")]
    ReservedCid {
        /// The configured CID.
        cid: u32,
    },
    /// The CPU model is not a name with optional `,feature` parts.
    #[error("Invalid CPU model {0:?} (expected a QEMU model name such as host or max)")]
    InvalidCpuModel(String),
    /// CPU model `host` with `accel = tcg`: `host` passes the host CPU through, which only KVM
    /// can do.
    #[error("CPU model host needs KVM (accel is tcg)")]
    HostCpuWithoutKvm,
    /// More disk slots than the machine has room for ([`crate::disk::MAX_DISK_SLOTS`]).
    #[error("{slots} disk slots exceed the maximum of {max}")]
    TooManyDiskSlots {
        /// The configured disk slots.
        slots: u32,
        /// The maximum.
        max: u32,
    },
    /// `-machine` options that are not comma-separated `key=value` pairs, or that set
    /// `memory-backend`.
    #[error("Invalid machine options {0:?} (expected key=value pairs such as sata=off,smbus=off)")]
    InvalidMachineOptions(String),
    /// An unknown machine type string.
    #[error("Unknown machine type {0:?} (expected q35, pc or microvm)")]
    UnknownMachine(String),
    /// An unknown accelerator string.
    #[error("Unknown accelerator {0:?} (expected auto, kvm or tcg)")]
    UnknownAccel(String),
}

/// The class of a QMP error reply, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QmpErrorClass {
    /// `GenericError`: most errors.
    GenericError,
    /// `CommandNotFound`: the command does not exist in this QEMU.
    CommandNotFound,
    /// `DeviceNotActive`.
    DeviceNotActive,
    /// `DeviceNotFound`.
    DeviceNotFound,
    /// `KVMMissingCap`.
    KvmMissingCap,
    /// A class this crate does not know, kept verbatim.
    Other(String),
}

impl QmpErrorClass {
    /// Parses a class name as it appears on the wire.
    pub fn from_wire(s: &str) -> Self {
        match s {
            "GenericError" => Self::GenericError,
            "CommandNotFound" => Self::CommandNotFound,
            "DeviceNotActive" => Self::DeviceNotActive,
            "DeviceNotFound" => Self::DeviceNotFound,
            "KVMMissingCap" => Self::KvmMissingCap,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The class name as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Self::GenericError => "GenericError",
            Self::CommandNotFound => "CommandNotFound",
            Self::DeviceNotActive => "DeviceNotActive",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::KvmMissingCap => "KVMMissingCap",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for QmpErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure of the QMP client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    /// QEMU answered a command with an error reply.
    #[error("QMP command {command} failed ({class}): {desc}")]
    Qmp {
        /// The command name.
        command: String,
        /// The error class, kept as QEMU sent it.
        class: QmpErrorClass,
        /// QEMU's description.
        desc: String,
    },
    /// No reply (or greeting) within the deadline.
    #[error("QMP command {command} timed out after {timeout:?}")]
    Timeout {
        /// The command name (`greeting` for the greeting).
        command: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// The connection closed before the reply arrived.
    #[error("QMP connection closed during {command}")]
    Disconnected {
        /// The command name (`greeting` for the greeting).
        command: String,
    },
    /// Writing the command failed.
    #[error("Sending QMP command {command} failed")]
    Send {
        /// The command name.
        command: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The command could not be encoded.
    #[error("Encoding QMP command {command} failed")]
    Encode {
        /// The command name.
        command: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The reply did not have the expected shape.
    #[error("Unexpected reply to QMP command {command}")]
    Decode {
        /// The command name.
        command: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The greeting was not a QMP greeting.
    #[error("Unexpected QMP greeting: {0}")]
    BadGreeting(String),
}

impl QmpError {
    /// The QMP error class if this is an error reply from QEMU.
    pub fn class(&self) -> Option<&QmpErrorClass> {
        match self {
            Self::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// The crate-wide error, returned by every [`crate::Hypervisor`] method.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error("Invalid hypervisor config")]
    Config(#[from] ConfigError),
    /// A QMP exchange failed.
    #[error("QMP exchange with VM {id} failed")]
    Qmp {
        /// VM id.
        id: String,
        /// The QMP failure.
        #[source]
        source: QmpError,
    },
    /// Spawning a process failed.
    #[error("Spawning {binary} failed")]
    Spawn {
        /// The binary that could not be started.
        binary: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A process of the VM (QEMU, or the vsock backend) exited while the VM was meant to run:
    /// it crashed, was killed, or its guest shut down. Every wait on a running VM ends with
    /// this as soon as the exit happens.
    #[error("{what} of VM {id} exited ({}){}", exit_status(.status), stderr_quote(.stderr_tail))]
    Exited {
        /// VM id.
        id: String,
        /// `QEMU` or `vsock backend`.
        what: &'static str,
        /// Its exit status; `None` when it was re-attached (not our child to reap).
        status: Option<std::process::ExitStatus>,
        /// The last lines it wrote to stderr (joined with ` | `; empty if it wrote none).
        stderr_tail: String,
    },
    /// A socket did not appear / accept connections in time.
    #[error("Socket {path} of VM {id} not ready after {timeout:?}")]
    SocketTimeout {
        /// VM id.
        id: String,
        /// The socket path.
        path: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// A file-system operation on the run directory failed.
    #[error("{op} {path} failed")]
    Io {
        /// What was attempted (`Creating`, `Removing`, ...).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A migration (template save or template boot) reported `failed` or `cancelled`.
    #[error("Migration of VM {id} {status}: {desc}")]
    Migration {
        /// VM id.
        id: String,
        /// The final migration status.
        status: String,
        /// QEMU's error description, if any.
        desc: String,
    },
    /// A migration did not complete in time.
    #[error("Migration of VM {id} not completed after {timeout:?}")]
    MigrationTimeout {
        /// VM id.
        id: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The operation needs a running VM.
    #[error("VM {id} is not running")]
    NotRunning {
        /// VM id.
        id: String,
    },
    /// `start` was called twice.
    #[error("VM {id} was already started")]
    AlreadyStarted {
        /// VM id.
        id: String,
    },
    /// The operation is not supported by this VM's configuration or machine.
    #[error("{what} is not supported by VM {id}")]
    Unsupported {
        /// VM id.
        id: String,
        /// What was attempted.
        what: &'static str,
    },
    /// Hot-adding memory would go past `max_memory_mib`.
    #[error("VM {id} cannot grow by {requested_mib} MiB: {current_mib} of {max_mib} MiB in use")]
    MemoryLimit {
        /// VM id.
        id: String,
        /// Requested MiB.
        requested_mib: u64,
        /// Current guest memory in MiB.
        current_mib: u64,
        /// The maximum in MiB.
        max_mib: u64,
    },
    /// No free memory slot is left.
    #[error("VM {id} has no free memory slot")]
    NoFreeMemorySlot {
        /// VM id.
        id: String,
    },
    /// The process recorded in a wire state is gone (or its pid was reused).
    #[error("QEMU process {pid} of VM {id} is not running")]
    ProcessGone {
        /// VM id.
        id: String,
        /// The recorded pid.
        pid: u32,
    },
    /// Sending a signal failed.
    #[error("Signalling process {pid} of VM {id} failed")]
    Signal {
        /// VM id.
        id: String,
        /// The pid.
        pid: u32,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// The process did not exit even after SIGKILL.
    #[error("Process {pid} of VM {id} did not exit after SIGKILL")]
    Unkillable {
        /// VM id.
        id: String,
        /// The pid.
        pid: u32,
    },
    /// A process record in a run directory cannot be read as one (see [`crate::ProcessRecord`]).
    #[error("Process record {path} is unusable: {reason}")]
    BadRecord {
        /// The record file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No vsock guest CID could be reserved for the VM.
    #[error("Reserving a vsock guest CID for VM {id} failed")]
    Vsock {
        /// VM id.
        id: String,
        /// Why.
        #[source]
        source: crate::vsock::VsockError,
    },
    /// A disk could not be attached or detached.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// A failure injected into a fake hypervisor (feature `test-utils`).
    #[error("Injected failure at {step}")]
    Injected {
        /// The step name.
        step: &'static str,
    },
}

/// An exit status as [`Error::Exited`] shows it.
fn exit_status(status: &Option<std::process::ExitStatus>) -> String {
    status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string())
}

/// The stderr tail as [`Error::Exited`] quotes it.
fn stderr_quote(tail: &str) -> String {
    if tail.is_empty() {
        ", writing nothing to stderr".to_owned()
    } else {
        format!(": {tail}")
    }
}

impl Error {
    /// Wraps a QMP error with the VM id.
    pub(crate) fn qmp(id: &str, source: QmpError) -> Self {
        Self::Qmp {
            id: id.to_owned(),
            source,
        }
    }

    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_class_round_trips() {
        for s in [
            "GenericError",
            "CommandNotFound",
            "DeviceNotActive",
            "DeviceNotFound",
            "KVMMissingCap",
            "SomethingNew",
        ] {
            assert_eq!(QmpErrorClass::from_wire(s).as_str(), s);
        }
        assert_eq!(
            QmpErrorClass::from_wire("SomethingNew"),
            QmpErrorClass::Other("SomethingNew".into())
        );
    }

    #[test]
    fn messages_are_one_line() {
        let e = Error::from(ConfigError::TooManyVcpus {
            vcpus: 4,
            max_vcpus: 2,
        });
        assert!(!e.to_string().contains('\n'));
        let q = QmpError::Qmp {
            command: "stop".into(),
            class: QmpErrorClass::GenericError,
            desc: "nope".into(),
        };
        assert_eq!(q.class(), Some(&QmpErrorClass::GenericError));
    }

    #[test]
    fn exits_name_the_status_and_quote_stderr() {
        use std::os::unix::process::ExitStatusExt;
        let e = Error::Exited {
            id: "vm1".into(),
            what: "QEMU",
            status: Some(std::process::ExitStatus::from_raw(1 << 8)),
            stderr_tail: "qemu-system-x86_64: boom | more".into(),
        };
        assert_eq!(
            e.to_string(),
            "QEMU of VM vm1 exited (exit status: 1): qemu-system-x86_64: boom | more"
        );
        let e = Error::Exited {
            id: "vm1".into(),
            what: "QEMU",
            status: None,
            stderr_tail: String::new(),
        };
        assert_eq!(
            e.to_string(),
            "QEMU of VM vm1 exited (status unknown), writing nothing to stderr"
        );
    }
}
