//! `vmfactory`: the command-line face of the factory (the successor of `kata-runtime factory`).
//!
//! This crate owns the command line (`cli`), the configuration file and its checks
//! (`config_file`, with the embedded `config/default.toml`), the subcommands (`commands`),
//! exit codes (`failure`) and progress output. It does not own how VMs are made, cloned,
//! pooled or served: that is `vmfactory-factory` and the crates under it, used through their
//! public APIs only.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or a bad configuration. A failure
//! is reported as one line, `vmfactory: <message and its causes>`; `--verbose` prints the
//! causes one per line instead. Logs go to stderr through `tracing` (`RUST_LOG`, default
//! `warn`; `--log-format json`).

mod cli;
mod commands;
mod config_file;
mod failure;
mod lock;
mod probe;
mod progress;

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, LogFormat};
use crate::failure::{EXIT_FAILURE, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_failure(&e),
    };
    init_logging(cli.log_format);
    let verbose = cli.verbose;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            return report(
                &anyhow::Error::new(e).context("Cannot start the runtime"),
                EXIT_FAILURE,
                verbose,
            )
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // A forwarded stdin (`run -i`) leaves a read of our stdin blocked on a runtime thread:
    // do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => report(&f.error, f.code, verbose || f.multiline),
    }
}

/// Help and version go to stdout with 0; usage errors are one line with 2 (the full clap text
/// with `--verbose`).
fn clap_failure(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        // Printing can only fail on a closed stdout; nothing more to say then.
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(EXIT_USAGE)
        } else {
            ExitCode::SUCCESS
        };
    }
    // `args_os`: `args` panics on an argument that is not UTF-8, the very input clap refused.
    let verbose = std::env::args_os().any(|a| a == "--verbose" || a == "-v");
    if verbose {
        let _ = e.print();
    } else {
        let text = e.render().to_string();
        let first = text.lines().next().unwrap_or("bad usage");
        let first = first.strip_prefix("error: ").unwrap_or(first);
        eprintln!("vmfactory: {first} (see --help)");
    }
    ExitCode::from(EXIT_USAGE)
}

fn report(error: &anyhow::Error, code: u8, verbose: bool) -> ExitCode {
    if verbose {
        eprintln!("vmfactory: {error}");
        for cause in error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
    } else {
        let line: Vec<String> = error.chain().map(ToString::to_string).collect();
        eprintln!("vmfactory: {}", line.join(": ").replace('\n', " "));
    }
    ExitCode::from(code)
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second subscriber cannot be installed; there is none before this.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
