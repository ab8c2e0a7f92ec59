//! The crate's error type.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Result of every fallible operation of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while storing or loading VM state.
#[derive(Debug, Error)]
pub enum Error {
    /// A VM id failed validation (see [`crate::validate_id`]).
    #[error("Invalid VM id {id:?}: {reason}")]
    InvalidId {
        /// The id as given.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// A path handed to a helper cannot be used (for example it has no parent directory).
    #[error("Invalid path {path}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The VM's directory already exists.
    #[error("Storage for VM {id} already exists")]
    AlreadyExists {
        /// The VM id.
        id: String,
    },

    /// The VM's directory does not exist.
    #[error("No storage for VM {id}")]
    VmNotFound {
        /// The VM id.
        id: String,
    },

    /// A file to be read does not exist (for a VM: its directory exists but holds no state).
    #[error("No such file or directory: {path}")]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },

    /// A file to be read is a symbolic link, which is never followed (it could point anywhere).
    #[error("File {path} is a symbolic link (not followed)")]
    Symlink {
        /// The link.
        path: PathBuf,
    },

    /// A file to be read is not a regular file (a FIFO would block, `/dev/zero` never ends).
    #[error("File {path} is not a regular file")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        #[source]
        kind: FileKind,
    },

    /// Another holder (this or another process) has the VM's lock.
    #[error("VM {id} is locked by another owner")]
    Locked {
        /// The VM id.
        id: String,
    },

    /// A file is larger than the limit its reader accepts.
    #[error("File {path} is too large ({size} bytes, limit {limit})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, or the number of bytes read before giving up.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// A state file is not valid JSON, is truncated, or does not match the expected shape.
    #[error("Corrupt state file {path}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },

    /// A state file was written by a newer version of vmfactory.
    #[error("State file {path} has version {found}, newer than the supported {supported}")]
    VersionTooNew {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },

    /// A state file was written by an older, no longer readable version of vmfactory.
    #[error("State file {path} has version {found}, older than the oldest supported {oldest}")]
    VersionTooOld {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
    },

    /// A state file belongs to another VM than the directory it is in.
    #[error("State file {path} is for VM {found:?}, expected {expected}")]
    IdMismatch {
        /// The file.
        path: PathBuf,
        /// The id of the directory.
        expected: String,
        /// The id recorded in the file.
        found: String,
    },

    /// A state could not be serialised.
    #[error("Failed to encode state of VM {id}")]
    Encode {
        /// The VM id.
        id: String,
        /// The serialisation error.
        #[source]
        source: serde_json::Error,
    },

    /// A filesystem operation failed.
    #[error("Failed to {op} {path}")]
    Io {
        /// What was being done ("create", "rename", ...).
        op: &'static str,
        /// What it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The blocking task doing the filesystem work panicked or was cancelled.
    #[error("Storage task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// What a path that is not a regular file turned out to be, by `fstat` of the open descriptor.
///
/// It is the cause (`#[source]`) of [`Error::NotRegular`], worded as the system words its own
/// errors (`Is a directory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileKind {
    /// A directory.
    #[error("Is a directory")]
    Directory,
    /// A FIFO (named pipe): opening it for reading would wait for a writer.
    #[error("Is a FIFO")]
    Fifo,
    /// A character device (`/dev/zero` never ends).
    #[error("Is a character device")]
    CharDevice,
    /// A block device.
    #[error("Is a block device")]
    BlockDevice,
    /// A unix socket.
    #[error("Is a socket")]
    Socket,
    /// Something else the system reports.
    #[error("Is of an unknown file type")]
    Unknown,
}

impl FileKind {
    /// The kind of a file of type `ty`, or `None` for a regular file.
    pub fn of(ty: std::fs::FileType) -> Option<Self> {
        use std::os::unix::fs::FileTypeExt;
        if ty.is_file() {
            None
        } else if ty.is_dir() {
            Some(Self::Directory)
        } else if ty.is_fifo() {
            Some(Self::Fifo)
        } else if ty.is_char_device() {
            Some(Self::CharDevice)
        } else if ty.is_block_device() {
            Some(Self::BlockDevice)
        } else if ty.is_socket() {
            Some(Self::Socket)
        } else {
            Some(Self::Unknown)
        }
    }
}
