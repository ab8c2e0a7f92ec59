//! The error type of the guest server: serving, and the guest work a request does.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Result of the guest server's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What the guest server can fail at. Request handlers map it to a ttRPC status.
#[derive(Debug, Error)]
pub enum Error {
    /// A file operation failed (sysfs, procfs, a device node, a socket).
    #[error("Failed to {op} {target}")]
    Io {
        /// What was being done ("read", "bind", ...).
        op: &'static str,
        /// What it was done to (a path, a device).
        target: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A system call failed (an ioctl, setting the clock).
    #[error("Failed to {op} {target}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// What it was done to.
        target: String,
        /// The errno.
        #[source]
        source: nix::Error,
    },

    /// The guest has no virtio port with the requested name.
    #[error("No virtio port named {name} under {dir}")]
    PortNotFound {
        /// The port name looked for (`agent.channel.0`).
        name: String,
        /// The directory that was scanned.
        dir: PathBuf,
    },

    /// Waiting for a guest-side condition (CPUs online) timed out.
    #[error("Timed out after {timeout:?} waiting for {what}")]
    WaitTimeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        timeout: Duration,
    },

    /// The request is malformed (an empty exec id, a relative path, a bad signal).
    #[error("Invalid request: {0}")]
    Invalid(String),

    /// No process has this exec id (never started, or already waited for and drained).
    #[error("No process {0:?}")]
    NoProcess(String),

    /// A request named a container the agent does not have.
    #[error("No container {0:?}")]
    NoContainer(String),

    /// `CreateContainer` of an id already in use.
    #[error("Container {0:?} already exists")]
    ContainerExists(String),

    /// A process with this exec id is still known.
    #[error("Process {0:?} already exists")]
    ProcessExists(String),

    /// The agent keeps this many processes and takes no more until some are waited for.
    #[error("Too many processes ({0}): wait for some first")]
    TooManyProcesses(usize),

    /// The process could not be started (no such program, bad working directory, ...).
    #[error("Failed to start {program:?}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },

    /// The process has no terminal (resize) or its stdin is closed (write).
    #[error("Process {exec_id:?}: {what}")]
    NotPossible {
        /// The process.
        exec_id: String,
        /// What is not possible.
        what: &'static str,
    },

    /// A path was refused: it leaves its directory, goes through a symlink, or names
    /// something that is not a regular file.
    #[error("Refusing {path}: {reason}")]
    Refused {
        /// The path as asked.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// The request is not supported by this agent.
    #[error("Unsupported: {0}")]
    Unsupported(&'static str),

    /// The ttRPC server did not start.
    // The console has always shown this text; kept so old and new logs read alike.
    #[error("Agent call Server::start failed")]
    Start {
        /// The ttRPC error.
        #[source]
        source: ttrpc::Error,
    },
}

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, target: impl std::fmt::Display, source: io::Error) -> Self {
        Error::Io {
            op,
            target: target.to_string(),
            source,
        }
    }

    /// Builds an [`Error::Sys`].
    pub(crate) fn sys(
        op: &'static str,
        target: impl std::fmt::Display,
        source: nix::Error,
    ) -> Self {
        Error::Sys {
            op,
            target: target.to_string(),
            source,
        }
    }
}
