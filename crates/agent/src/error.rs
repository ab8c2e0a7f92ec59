//! The crate's error type.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Result of every fallible operation of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the agent client and its transports.
#[derive(Debug, Error)]
pub enum Error {
    /// The agent URL could not be parsed.
    #[error("Invalid agent URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The agent could not be reached before the dial deadline.
    #[error("Timed out after {timeout:?} dialing agent at {url}")]
    DialTimeout {
        /// The URL that was dialed.
        url: String,
        /// How long dialing was retried.
        timeout: Duration,
        /// The error of the last attempt, if any attempt failed before the deadline.
        #[source]
        last: Option<Box<Error>>,
    },

    /// A transport-level I/O operation failed.
    #[error("Failed to {op} {target}")]
    Io {
        /// What was being done ("connect to", "read", ...).
        op: &'static str,
        /// What it was done to (a path, an URL, a device).
        target: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The hybrid-vsock multiplexer did not accept the `CONNECT` request.
    #[error("Hybrid vsock socket {socket} refused CONNECT {port}: {reply:?}")]
    HvsockRejected {
        /// The unix socket of the multiplexer.
        socket: PathBuf,
        /// The vsock port that was requested.
        port: u32,
        /// What the multiplexer answered instead of `OK <n>` (empty on EOF).
        reply: String,
    },

    /// An RPC did not complete within the per-call timeout.
    #[error("Agent call {method} timed out after {timeout:?}")]
    Timeout {
        /// The RPC method.
        method: &'static str,
        /// The per-call timeout.
        timeout: Duration,
    },

    /// An RPC failed at the ttRPC layer or returned a non-OK status.
    #[error("Agent call {method} failed")]
    Rpc {
        /// The RPC method.
        method: &'static str,
        /// The ttRPC error.
        #[source]
        source: ttrpc::Error,
    },

    /// The agent answered with something this crate cannot interpret.
    #[error("Invalid agent response to {method}: {reason}")]
    InvalidResponse {
        /// The RPC method.
        method: &'static str,
        /// What is wrong with the response.
        reason: String,
    },

    /// The operation is not supported by this agent or on this platform.
    #[error("Unsupported: {0}")]
    Unsupported(&'static str),

    /// A failure injected into a `FakeAgent`.
    #[cfg(any(test, feature = "test-utils"))]
    #[error("Injected failure in {method}")]
    Injected {
        /// The method told to fail.
        method: &'static str,
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

    /// True when the error is a per-call or dial timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. } | Error::DialTimeout { .. })
    }
}
