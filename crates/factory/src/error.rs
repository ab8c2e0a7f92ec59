//! The crate's error type.

use thiserror::Error;

/// Factory errors.
#[derive(Debug, Error)]
pub enum Error {
    /// A bad factory configuration.
    #[error("Invalid factory config: {0}")]
    Config(String),
    /// The base VM config is invalid.
    #[error(transparent)]
    VmConfig(#[from] vmfactory_vm::ConfigError),
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] vmfactory_vm::Error),
    /// Creating, fetching or removing a template failed.
    #[error(transparent)]
    Template(#[from] crate::metadata::TemplateError),
    /// Turning a base VM into the requested VM failed (the VM was stopped).
    #[error(transparent)]
    GetVm(#[from] crate::get_vm::GetVmError),
    /// The factory was closed.
    #[error("The {what} factory is closed")]
    Closed {
        /// Which factory (`direct`, `template`, `cache`).
        what: &'static str,
    },
    /// The VM-cache server or client failed.
    #[error(transparent)]
    CacheService(#[from] crate::cache_service::CacheServiceError),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An error and its sources on one line (`a: b: c`): for ttRPC status messages, which are all
/// a client sees, and for the CLI's one-line reports.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}
