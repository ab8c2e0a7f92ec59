//! How the agent's errors become ttRPC statuses: a code and one line.

use tracing::warn;
use ttrpc::{get_status, Code};

use super::net::NetError;
use crate::error::Error;

/// Maps a crate error to a ttRPC status.
pub(super) fn status(method: &str, e: Error) -> ttrpc::Error {
    warn!(method, error = %e, "request failed");
    let code = match &e {
        Error::Unsupported(_) => Code::UNIMPLEMENTED,
        Error::WaitTimeout { .. } => Code::DEADLINE_EXCEEDED,
        Error::Invalid(_) => Code::INVALID_ARGUMENT,
        Error::NoProcess(_) | Error::NoContainer(_) => Code::NOT_FOUND,
        Error::ProcessExists(_) | Error::ContainerExists(_) => Code::ALREADY_EXISTS,
        Error::TooManyProcesses(_) => Code::RESOURCE_EXHAUSTED,
        Error::NotPossible { .. } => Code::FAILED_PRECONDITION,
        Error::Refused { .. } => Code::PERMISSION_DENIED,
        Error::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Code::NOT_FOUND
        }
        _ => Code::INTERNAL,
    };
    let msg = match std::error::Error::source(&e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    };
    ttrpc::Error::RpcStatus(get_status(code, msg))
}

/// Maps a networking error to a ttRPC status: one line, the cause appended.
pub(super) fn net_status(method: &str, e: NetError) -> ttrpc::Error {
    warn!(method, error = %e, "request failed");
    let msg = match std::error::Error::source(&e) {
        Some(s) if !matches!(e, NetError::Invalid(_)) => format!("{e}: {s}"),
        _ => e.to_string(),
    };
    ttrpc::Error::RpcStatus(get_status(e.code(), msg))
}

/// An `INVALID_ARGUMENT` status.
pub(super) fn invalid(msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(get_status(Code::INVALID_ARGUMENT, msg))
}
