//! How a command fails: [`Failure`] carries the exit code (1 a runtime failure, 2 bad usage
//! or a bad configuration) beside the error that `main` reports.

use crate::config_file::ConfigFileError;

/// Exit code of a runtime failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code of bad usage or a bad configuration.
pub const EXIT_USAGE: u8 = 2;

/// A failed command: its exit code and the error.
#[derive(Debug)]
pub struct Failure {
    /// [`EXIT_FAILURE`] or [`EXIT_USAGE`].
    pub code: u8,
    /// What failed, with its causes.
    pub error: anyhow::Error,
    /// Print the error's lines as they are (a list of problems), not joined into one.
    pub multiline: bool,
}

impl Failure {
    /// Bad usage or configuration (exit 2).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: EXIT_USAGE,
            error: error.into(),
            multiline: false,
        }
    }

    /// This failure, printed one line per line of its text.
    pub fn multiline(self) -> Self {
        Self {
            multiline: true,
            ..self
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_FAILURE,
            error,
            multiline: false,
        }
    }
}

impl From<ConfigFileError> for Failure {
    fn from(error: ConfigFileError) -> Self {
        Self::usage(error)
    }
}

/// Result of a command.
pub type CmdResult = Result<(), Failure>;
