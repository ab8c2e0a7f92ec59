//! Task errors and their ttRPC status codes.

use containerd_shim::protos::ttrpc;

use crate::sandbox::SandboxError;

/// The ttRPC codes the service answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Bad request (bad bundle, bad id, bad signal).
    InvalidArgument,
    /// No such container or exec.
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// Not in a state for it (start twice, delete running).
    FailedPrecondition,
    /// Not supported by this shim.
    Unimplemented,
    /// The VM or the host failed.
    Internal,
}

impl Code {
    fn ttrpc(self) -> ttrpc::Code {
        match self {
            Code::InvalidArgument => ttrpc::Code::INVALID_ARGUMENT,
            Code::NotFound => ttrpc::Code::NOT_FOUND,
            Code::AlreadyExists => ttrpc::Code::ALREADY_EXISTS,
            Code::FailedPrecondition => ttrpc::Code::FAILED_PRECONDITION,
            Code::Unimplemented => ttrpc::Code::UNIMPLEMENTED,
            Code::Internal => ttrpc::Code::INTERNAL,
        }
    }
}

/// A failed task call: a code and one line of text (the whole error chain).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TaskError {
    /// The ttRPC code.
    pub code: Code,
    /// The message.
    pub message: String,
}

impl TaskError {
    /// An error with `code` and `message`.
    pub fn new(code: Code, message: String) -> Self {
        TaskError { code, message }
    }

    /// `InvalidArgument`.
    pub fn invalid(message: String) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// `FailedPrecondition`.
    pub fn precondition(message: String) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }

    /// No such container.
    pub fn no_container(id: &str) -> Self {
        Self::new(Code::NotFound, format!("container {id} not found"))
    }

    /// No such exec.
    pub fn no_exec(id: &str, exec_id: &str) -> Self {
        Self::new(
            Code::NotFound,
            format!("exec {exec_id} not found in container {id}"),
        )
    }

    /// `code` with `e`'s chain as the message.
    pub fn from_error(code: Code, e: &(dyn std::error::Error + 'static)) -> Self {
        Self::new(code, one_line(e))
    }

    /// The code a sandbox error maps to.
    pub fn from_sandbox(e: &SandboxError) -> Self {
        let code = match e {
            SandboxError::NotFound(_) => Code::NotFound,
            SandboxError::Invalid(_) => Code::InvalidArgument,
            SandboxError::Unsupported(_) => Code::Unimplemented,
            SandboxError::Vm(_) => Code::Internal,
        };
        Self::from_error(code, e)
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: &str) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<TaskError> for ttrpc::Error {
    fn from(e: TaskError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code.ttrpc(), e.message))
    }
}

/// An error and its sources on one line.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}
