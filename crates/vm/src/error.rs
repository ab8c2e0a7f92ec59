//! Error types of the vm crate.
//!
//! [`Error`] is returned by every [`crate::Vm`] operation. Two concerns with many failure modes
//! of their own have their own enums, wrapped by it: [`ConfigError`] (validation of a
//! [`crate::VmConfig`]) and [`WireError`] (encoding and decoding the wire forms). Callers branch
//! on variants, never on text.

use std::path::PathBuf;
use std::time::Duration;

use crate::NewStep;

/// Result type of the vm crate.
pub type Result<T> = std::result::Result<T, Error>;

/// One of the agent timeouts of [`crate::VmAgentConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentTimeout {
    /// `call_timeout`: one agent call.
    Call,
    /// `dial_timeout`: reaching the agent.
    Dial,
    /// `ready_timeout`: the agent answering `Check` after boot.
    Ready,
}

impl std::fmt::Display for AgentTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Call => "call",
            Self::Dial => "dial",
            Self::Ready => "ready",
        })
    }
}

/// A [`crate::VmConfig`] that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The hypervisor part is invalid.
    #[error("Invalid hypervisor config")]
    Hypervisor(#[source] vmfactory_hypervisor::ConfigError),
    /// The network part is invalid.
    #[error("Invalid network config")]
    Network(#[source] vmfactory_net::NetError),
    /// A network is configured but the hypervisor has no NIC (use `VmConfig::with_network`).
    #[error("A network needs a NIC in the VM (hypervisor.nic)")]
    NetworkWithoutNic,
    /// The hypervisor has a NIC but no network is configured for its tap.
    #[error("A NIC needs a network (the config's network section)")]
    NicWithoutNetwork,
    /// An agent timeout is zero.
    #[error("Agent {what} timeout must not be zero")]
    ZeroTimeout {
        /// Which timeout.
        what: AgentTimeout,
    },
    /// The run root is not an absolute path.
    #[error("Run root {path} is not an absolute path")]
    RelativeRunRoot {
        /// The configured root.
        path: PathBuf,
    },
    /// The run root is so long that the VM's sockets would not fit in a unix socket address.
    #[error("Run root {path} is too long ({len} bytes, at most {max})")]
    RunRootTooLong {
        /// The configured root.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest root that works.
        max: usize,
    },
    /// Validation could not run (its blocking task failed).
    #[error("Validating the VM config failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Bytes that are not a wire form this build can read, or a value that cannot be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The bytes exceed the size limit.
    #[error("Wire form is too large ({size} bytes, limit {limit})")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not valid JSON of the expected shape (corrupt or truncated).
    #[error("Corrupt wire form")]
    Corrupt(#[source] serde_json::Error),
    /// The bytes are a vmfactory wire form of another kind (or not a vmfactory wire form).
    #[error("Wire form is of kind {found:?}, expected {expected:?}")]
    WrongKind {
        /// The expected kind.
        expected: &'static str,
        /// The kind found.
        found: String,
    },
    /// The wire form's version is not the one this build reads.
    #[error("Wire form has version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// The embedded hypervisor state has a version this build does not read.
    #[error("Hypervisor state has version {found}, this build reads version {supported}")]
    UnsupportedHypervisorVersion {
        /// The version found.
        found: u32,
        /// The version the hypervisor crate reads.
        supported: u32,
    },
    /// The parts of the wire form disagree or are invalid (ids, config).
    #[error("Inconsistent wire form: {reason}")]
    Inconsistent {
        /// What is wrong.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("Encoding the wire form failed")]
    Encode(#[source] serde_json::Error),
}

/// The crate-wide error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid.
    #[error("Invalid VM config")]
    Config(#[from] ConfigError),
    /// A wire form could not be encoded or decoded.
    #[error("Bad VM wire form")]
    Wire(#[from] WireError),
    /// A hypervisor operation failed.
    #[error("Hypervisor {op} of VM {id} failed")]
    Hypervisor {
        /// VM id.
        id: String,
        /// The operation (`create`, `start`, `pause`, ...).
        op: &'static str,
        /// The hypervisor error (boxed: it is large).
        #[source]
        source: Box<vmfactory_hypervisor::Error>,
    },
    /// The VM's hypervisor process exited (crashed, was killed, or its guest shut down) during
    /// `op`, which ended at once. The source is the hypervisor's `Exited` error: the exit
    /// status and the last lines of QEMU's stderr ([`Error::hypervisor_exit`]).
    #[error("VM {id} died during {op}")]
    HypervisorExited {
        /// VM id.
        id: String,
        /// What was under way (`start`, `resume`, `wait for the agent`, an agent method, ...).
        op: &'static str,
        /// The hypervisor's `Exited` error (boxed: it is large).
        #[source]
        source: Box<vmfactory_hypervisor::Error>,
    },
    /// An agent operation failed.
    #[error("Agent {op} of VM {id} failed")]
    Agent {
        /// VM id.
        id: String,
        /// The operation (`create`, `online_cpu_mem`, ...).
        op: &'static str,
        /// The agent error (boxed: it is large).
        #[source]
        source: Box<vmfactory_agent::Error>,
    },
    /// The agent did not answer `Check` with `SERVING` in time.
    #[error("Agent of VM {id} not ready after {timeout:?}")]
    AgentNotReady {
        /// VM id.
        id: String,
        /// The ready timeout.
        timeout: Duration,
        /// The last failure, if the last attempt failed (rather than answered `NOT_SERVING`).
        #[source]
        last: Option<Box<vmfactory_agent::Error>>,
    },
    /// Making, addressing or removing the VM's network failed.
    #[error("Network {op} of VM {id} failed")]
    Network {
        /// VM id.
        id: String,
        /// What was done.
        op: &'static str,
        /// The network error.
        #[source]
        source: vmfactory_net::NetError,
    },
    /// Starting the console proxy failed.
    #[error("Proxy of VM {id} failed to start")]
    Proxy {
        /// VM id.
        id: String,
        /// The proxy error.
        #[source]
        source: vmfactory_proxy::Error,
    },
    /// A run-directory storage operation failed.
    #[error("Storage {op} of VM {id} failed")]
    Storage {
        /// VM id.
        id: String,
        /// The operation (`create`, `lock`, `save`, `destroy`).
        op: &'static str,
        /// The persist error.
        #[source]
        source: vmfactory_persist::Error,
    },
    /// Reading host entropy failed.
    #[error("Reading host entropy from {path} failed")]
    Entropy {
        /// The entropy source.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A host file of a copy in or out of the guest could not be used.
    #[error("Failed to {op} host file {path}")]
    HostFile {
        /// What was attempted (`open`, `read`, `create`, `rename`, ...).
        op: &'static str,
        /// The host path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A disk is already mounted at this mount point.
    #[error("VM {id} already has a disk mounted at {mount_point}")]
    MountPointTaken {
        /// VM id.
        id: String,
        /// The mount point.
        mount_point: String,
    },
    /// No disk of this id is attached through this VM.
    #[error("VM {id} has no attached disk {disk}")]
    UnknownDisk {
        /// VM id.
        id: String,
        /// The disk id asked for.
        disk: String,
    },
    /// A path to be linked to a sandbox exists and is not a symlink.
    #[error("Sandbox link {path} exists and is not a symlink")]
    LinkExists {
        /// The path.
        path: PathBuf,
    },
    /// A file-system operation for a sandbox link failed.
    #[error("{op} {path} failed")]
    Link {
        /// What was attempted (`Creating`, `Removing`, ...).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The recorded size differs from what the hypervisor reports.
    #[error("VM {id} records {recorded_vcpus} vCPUs / {recorded_mib} MiB, the hypervisor reports {vcpus} / {mib}")]
    SizeMismatch {
        /// VM id.
        id: String,
        /// Recorded vCPUs.
        recorded_vcpus: u32,
        /// Recorded memory in MiB.
        recorded_mib: u64,
        /// vCPUs the hypervisor reports.
        vcpus: u32,
        /// Memory in MiB the hypervisor reports.
        mib: u64,
    },
    /// The VM was stopped or detached through this handle.
    #[error("VM {id} is {state} through this handle")]
    NotOwned {
        /// VM id.
        id: String,
        /// `stopped` or `detached`.
        state: &'static str,
    },
    /// The VM failed to come up (`Vm::new`, `PreparedVm::start`: the agent never answered,
    /// QEMU exited during boot, a clone's state did not load, ...) and there is something to
    /// show of it: the one-line message adds the last console lines and where the console log
    /// was kept ([`crate::Postmortem`]). The failure itself is the source; branch on it with
    /// [`Error::failure`].
    #[error("VM {id} failed to come up{}", postmortem.summary())]
    NotUp {
        /// VM id.
        id: String,
        /// The console tail and the kept log.
        postmortem: Box<crate::Postmortem>,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// A [`crate::Backends::before`] hook aborted `Vm::new` or `Vm::from_wire`.
    #[error("Creating VM {id} aborted before {step:?}")]
    Aborted {
        /// VM id (empty before the id exists).
        id: String,
        /// The step that was about to run.
        step: NewStep,
    },
}

impl Error {
    /// The hypervisor's `Exited` error if this is the VM's hypervisor process exiting
    /// ([`Error::HypervisorExited`], also as the failure of [`Error::NotUp`]), to branch on and
    /// to read its status and stderr from.
    pub fn hypervisor_exit(&self) -> Option<&vmfactory_hypervisor::Error> {
        match self.failure() {
            Self::HypervisorExited { source, .. } => Some(source),
            _ => None,
        }
    }

    /// What failed: this error, or for [`Error::NotUp`] the failure it reports. Branch on
    /// this.
    pub fn failure(&self) -> &Error {
        match self {
            Self::NotUp { source, .. } => source.failure(),
            other => other,
        }
    }

    /// The post-mortem of a VM that failed to come up ([`Error::NotUp`]): its last console
    /// lines and where its console log was kept.
    pub fn postmortem(&self) -> Option<&crate::Postmortem> {
        match self {
            Self::NotUp { postmortem, .. } => Some(postmortem),
            _ => None,
        }
    }

    /// A failed hypervisor operation `op`: [`Error::HypervisorExited`] if its process exited,
    /// else [`Error::Hypervisor`].
    pub(crate) fn hv(id: &str, op: &'static str, source: vmfactory_hypervisor::Error) -> Self {
        let (id, source) = (id.to_owned(), Box::new(source));
        match *source {
            vmfactory_hypervisor::Error::Exited { .. } => Self::HypervisorExited { id, op, source },
            _ => Self::Hypervisor { id, op, source },
        }
    }

    pub(crate) fn agent(id: &str, op: &'static str, source: vmfactory_agent::Error) -> Self {
        Self::Agent {
            id: id.to_owned(),
            op,
            source: Box::new(source),
        }
    }

    pub(crate) fn storage(id: &str, op: &'static str, source: vmfactory_persist::Error) -> Self {
        Self::Storage {
            id: id.to_owned(),
            op,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn messages_are_one_line_and_do_not_repeat_the_source() {
        let e = Error::hv(
            "vm1",
            "start",
            vmfactory_hypervisor::Error::NotRunning { id: "vm1".into() },
        );
        assert_eq!(e.to_string(), "Hypervisor start of VM vm1 failed");
        assert!(e.source().is_some());
        assert!(e.hypervisor_exit().is_none());
        let e = Error::hv(
            "vm1",
            "resume",
            vmfactory_hypervisor::Error::Exited {
                id: "vm1".into(),
                what: "QEMU",
                status: None,
                stderr_tail: "qemu: boom".into(),
            },
        );
        assert_eq!(e.to_string(), "VM vm1 died during resume");
        assert!(matches!(
            e.hypervisor_exit(),
            Some(vmfactory_hypervisor::Error::Exited { stderr_tail, .. }) if stderr_tail == "qemu: boom"
        ));
        let e = Error::from(ConfigError::ZeroTimeout {
            what: AgentTimeout::Call,
        });
        assert!(!e.to_string().contains('\n'));
        assert!(matches!(
            e,
            Error::Config(ConfigError::ZeroTimeout {
                what: AgentTimeout::Call
            })
        ));
    }
}
