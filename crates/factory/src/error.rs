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
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
