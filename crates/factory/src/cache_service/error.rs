//! [`CacheServiceError`]: what can go wrong serving or using the VM cache.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Result of the VM-cache server and client.
pub type Result<T> = std::result::Result<T, CacheServiceError>;

/// Errors of the VM-cache server ([`super::CacheServer`]) and client ([`super::CacheClient`]).
///
/// [`vmfactory_vm::Error`] and [`ttrpc::Error`] sources are boxed: they are large.
#[derive(Debug, Error)]
pub enum CacheServiceError {
    /// The socket path is relative.
    #[error("VM-cache socket path {path} is not absolute")]
    RelativeEndpoint {
        /// The path.
        path: PathBuf,
    },

    /// The socket path does not fit in a unix socket address.
    #[error("VM-cache socket path {path} is too long ({len} bytes, at most {max})")]
    EndpointTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The longest that fits.
        max: usize,
    },

    /// Another server answers on the socket.
    #[error("VM-cache socket {path} is in use by a running server")]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },

    /// Something that is not a socket is in the way.
    #[error("VM-cache socket path {path} exists and is not a socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },

    /// A file-system operation on the socket failed (bind, chmod, remove, stat).
    #[error("Failed to {op} VM-cache socket {path}")]
    Socket {
        /// What was being done.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The client could not reach the server (no socket, nobody listening).
    #[error("Failed to connect to the VM-cache server at {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The connection to the server broke during a call (the server quit or died).
    #[error("VM-cache server at {path} went away during {method}")]
    ServerGone {
        /// The socket path.
        path: PathBuf,
        /// The RPC method.
        method: &'static str,
        /// The ttRPC error.
        #[source]
        source: Box<ttrpc::Error>,
    },

    /// A call did not complete in time.
    #[error("VM-cache call {method} timed out after {timeout:?}")]
    Timeout {
        /// The RPC method.
        method: &'static str,
        /// The bound.
        timeout: Duration,
    },

    /// A call failed at the ttRPC layer or the server answered with an error status.
    #[error("VM-cache call {method} failed")]
    Rpc {
        /// The RPC method.
        method: &'static str,
        /// The ttRPC error (the server's status is in it).
        #[source]
        source: Box<ttrpc::Error>,
    },

    /// The server answered with something the client cannot use.
    #[error("Invalid VM-cache reply to {method}")]
    InvalidReply {
        /// The RPC method.
        method: &'static str,
        /// Why the reply was rejected (a bad wire form).
        #[source]
        source: Box<vmfactory_vm::Error>,
    },

    /// Encoding the base config failed when the server started.
    #[error("Failed to encode the base VM config")]
    EncodeConfig(#[source] Box<vmfactory_vm::Error>),

    /// Re-attaching to a handed-out VM failed (it is released again, not stopped).
    #[error("Failed to re-attach to VM {id} handed out by the VM-cache server")]
    Attach {
        /// The VM id.
        id: String,
        /// The VM error.
        #[source]
        source: Box<vmfactory_vm::Error>,
    },

    /// Starting the ttRPC server failed.
    #[error("Failed to start the VM-cache server on {path}")]
    Start {
        /// The socket path.
        path: PathBuf,
        /// The ttRPC error.
        #[source]
        source: Box<ttrpc::Error>,
    },

    /// Closing the base factory while stopping the server failed.
    #[error("Failed to close the base factory of the VM-cache server")]
    CloseBase(#[source] Box<crate::BaseError>),

    /// Installing a signal handler failed.
    #[error("Failed to install a handler for {signal}")]
    Signal {
        /// The signal name.
        signal: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The client was closed ([`crate::FactoryBase::close`]).
    #[error("VM-cache client of {path} is closed")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
}
