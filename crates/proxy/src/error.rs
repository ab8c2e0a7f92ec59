//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Result of every fallible operation of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in a proxy.
#[derive(Debug, Error)]
pub enum Error {
    /// A proxy kind name is not one of `builtin`, `none`.
    #[error("Unknown proxy kind {kind:?} (expected \"builtin\" or \"none\")")]
    UnknownKind {
        /// The name as given.
        kind: String,
    },

    /// The console socket did not accept a connection before the deadline.
    #[error("Timed out after {timeout:?} connecting to console {path}")]
    ConnectTimeout {
        /// The console socket.
        path: PathBuf,
        /// How long connecting was retried.
        timeout: Duration,
        /// The error of the last attempt.
        #[source]
        last: io::Error,
    },

    /// Connecting to the console socket failed in a way retrying cannot fix.
    #[error("Failed to connect to console {path}")]
    Connect {
        /// The console socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The console log file could not be opened.
    #[error("Failed to open console log {path}")]
    Log {
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// No console line matched before the timeout.
    #[error("No matching console line within {timeout:?}")]
    WaitTimeout {
        /// How long was waited.
        timeout: Duration,
    },

    /// The console subscription ended (the proxy was stopped or dropped).
    #[error("Console subscription closed")]
    ConsoleClosed,

    /// A failure injected into a `FakeProxy`.
    #[cfg(any(test, feature = "test-utils"))]
    #[error("Injected failure in {method}")]
    Injected {
        /// The method told to fail.
        method: &'static str,
    },
}
