//! [`TemplateError`]: what can go wrong creating, fetching, cloning or removing a template.

use std::fmt;
use std::path::{Path, PathBuf};

/// A VM step of the template flow, named in [`TemplateError::Vm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateStep {
    /// Booting the template VM.
    Boot,
    /// Reseeding the template VM's RNG before it is saved.
    WarmUpReseed,
    /// Setting the template VM's clock before it is saved.
    WarmUpTimeSync,
    /// Asking the template VM's agent whether clones reseed themselves (`PrepareTemplate`).
    Prepare,
    /// Closing the host's agent connection so the guest re-listens.
    Disconnect,
    /// Waiting for the guest agent to re-listen (its console line).
    Relisten,
    /// Pausing the template VM.
    Pause,
    /// Saving the device state.
    Save,
    /// Stopping the template VM.
    Stop,
    /// Booting a clone.
    Clone,
}

impl fmt::Display for TemplateStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Boot => "boot",
            Self::WarmUpReseed => "warm-up reseed",
            Self::WarmUpTimeSync => "warm-up time sync",
            Self::Prepare => "preparation",
            Self::Disconnect => "disconnect",
            Self::Relisten => "re-listen wait",
            Self::Pause => "pause",
            Self::Save => "save",
            Self::Stop => "stop",
            Self::Clone => "clone",
        })
    }
}

/// Errors of template creation, fetching and removal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    /// The template's metadata does not match the config in `field`.
    #[error("Template does not match the config in {field}: template has {template}, config has {config}")]
    Mismatch {
        /// The field (a [`CloneKey`](super::CloneKey) field name, e.g. `memory_mib`, `kernel_file`).
        field: String,
        /// The template's value.
        template: String,
        /// The config's value.
        config: String,
    },
    /// A template file is missing.
    #[error("Template file {path} is missing")]
    Missing {
        /// The missing file.
        path: PathBuf,
    },
    /// A template file has the wrong size (a truncated memory file, an empty state file).
    #[error("Template file {path} has {found} bytes, expected {expected}")]
    FileSize {
        /// The file.
        path: PathBuf,
        /// The expected size (for the state file: at least 1).
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// A template data file was written after the save (its modification time is not the one
    /// recorded then). A clone never writes it, so its contents are no longer the saved VM's.
    #[error("Template file {path} was modified after the template was saved (at {saved}, now {found}); destroy and re-create the template")]
    Modified {
        /// The file.
        path: PathBuf,
        /// The modification time recorded at the save (seconds.nanoseconds since the epoch).
        saved: String,
        /// The modification time found.
        found: String,
    },
    /// A template data file (`memory`, `state`) cannot be used: a symlink (never followed), not
    /// a regular file (a FIFO, a device, a directory), or it cannot be opened.
    #[error("Template file {path} cannot be used")]
    File {
        /// The file.
        path: PathBuf,
        /// Why, from the one safe open ([`vmfactory_persist::open_regular`]).
        #[source]
        source: vmfactory_persist::Error,
    },
    /// The metadata file is not valid metadata JSON.
    #[error("Template metadata {path} is corrupt")]
    Corrupt {
        /// The metadata file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The metadata's recorded hash does not match its fields (edited or damaged).
    #[error("Template metadata {path} fails its hash check")]
    HashMismatch {
        /// The metadata file.
        path: PathBuf,
    },
    /// The metadata has a format version this build does not read.
    #[error("Template metadata {path} has version {found}, this build reads {supported}")]
    UnsupportedVersion {
        /// The metadata file.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Reading or writing the metadata file failed.
    #[error("Template metadata {path} could not be {op}")]
    Persist {
        /// `read` or `written`.
        op: &'static str,
        /// The metadata file.
        path: PathBuf,
        /// The persist error.
        #[source]
        source: vmfactory_persist::Error,
    },
    /// A file-system operation failed.
    #[error("Failed to {op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Mounting the template tmpfs failed (other than not being permitted).
    #[error("Mounting a tmpfs at {path} failed")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// Unmounting the template tmpfs failed.
    #[error("Unmounting {path} failed")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// The template path is a mount point or a non-empty directory that holds no usable
    /// template for this config; it is left alone (never mounted over).
    #[error("Template path {path} is in use and holds no usable template")]
    Occupied {
        /// The template path.
        path: PathBuf,
        /// Why the existing content is not usable.
        #[source]
        reason: Box<TemplateError>,
    },
    /// Another process is making, using or removing the template (its lock is busy).
    #[error("Template at {path} is busy")]
    Busy {
        /// The template path.
        path: PathBuf,
        /// The lock error, naming the holders.
        #[source]
        source: vmfactory_persist::LockError,
    },
    /// The path holds no template this user's vmfactory made (no marker): nothing there is
    /// removed or reused.
    #[error("{path} is not a template vmfactory made (no {marker} marker); left untouched")]
    NotOurs {
        /// The template path.
        path: PathBuf,
        /// The marker's file name.
        marker: &'static str,
    },
    /// Processes still map the template memory (VMs cloned from it run): nothing was removed.
    #[error("Template at {path} is still used by {} process(es) (pids {}): VMs cloned from it are running; stop them first", pids.len(), pid_list(pids))]
    InUse {
        /// The template path.
        path: PathBuf,
        /// The processes mapping its memory.
        pids: Vec<u32>,
    },
    /// `<qemu> --version` could not be run or failed.
    #[error("Cannot get the version of {qemu}")]
    QemuVersion {
        /// The QEMU binary.
        qemu: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The template VM's proxy does not read the console, so the agent's re-listen cannot be
    /// seen.
    #[error("The console proxy of template VM {id} does not read the console")]
    NoConsole {
        /// The template VM id.
        id: String,
    },
    /// The agent of the template VM did not re-listen after the host disconnected.
    #[error("The agent of template VM {id} did not re-listen")]
    Relisten {
        /// The template VM id.
        id: String,
        /// The wait's error.
        #[source]
        source: vmfactory_proxy::Error,
    },
    /// A VM step of the template flow failed.
    #[error("Template VM {step} failed")]
    Vm {
        /// The step.
        step: TemplateStep,
        /// The VM error (boxed: it is large).
        #[source]
        source: Box<vmfactory_vm::Error>,
    },
    /// The template config is invalid.
    #[error("Invalid template config")]
    Config(#[source] vmfactory_vm::ConfigError),
    /// A blocking task failed.
    #[error("A blocking template task failed")]
    Task(#[source] tokio::task::JoinError),
}

fn pid_list(pids: &[u32]) -> String {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    list.join(", ")
}

impl TemplateError {
    /// The hypervisor's `Exited` error if a VM of the template flow died (QEMU crashed or was
    /// killed): see [`vmfactory_vm::Error::hypervisor_exit`].
    pub fn hypervisor_exit(&self) -> Option<&vmfactory_vm::HypervisorError> {
        match self {
            Self::Vm { source, .. } => source.hypervisor_exit(),
            _ => None,
        }
    }

    /// The post-mortem (last console lines, kept log) if a VM of the template flow failed to
    /// come up: see [`vmfactory_vm::Error::postmortem`].
    pub fn postmortem(&self) -> Option<&vmfactory_vm::Postmortem> {
        match self {
            Self::Vm { source, .. } => source.postmortem(),
            _ => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn vm(step: TemplateStep, source: vmfactory_vm::Error) -> Self {
        Self::Vm {
            step,
            source: Box::new(source),
        }
    }
}
