//! `vmfactory`: the command-line face of the factory (the successor of `kata-runtime factory`).
//!
//! This crate owns the command line (`cli`), the subcommands (`commands`),
//! exit codes (`failure`) and progress output. It does not own how VMs are made, cloned,
//! pooled or served: that is `vmfactory-factory` and the crates under it, used through their
//! public APIs only; the configuration file and its checks are `vmfactory-config`, which the
//! containerd shim reads too (imported here as `config_file`).
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or a bad configuration. A failure
//! is reported as one line, `vmfactory: <message and its causes>`; `--verbose` prints the
//! causes one per line instead, and the last console lines of a VM that failed to come up. Logs go to stderr through `tracing` (`RUST_LOG`, default
//! `warn`; `--log-format json`).

mod cli;
mod commands;
use vmfactory_config as config_file;
mod failure;
mod lock;
mod probe;
mod progress;
mod version;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, ColorWhen, LogFormat};
use crate::failure::{EXIT_FAILURE, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => return clap_failure(&e),
    };
    let verbose = cli.verbose;
    if let Err(e) = init_logging(&cli) {
        return report(&e, EXIT_USAGE, verbose);
    }
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
        eprintln!(
            "vmfactory: {} (see --help)",
            one_line(&e.render().to_string())
        );
    }
    ExitCode::from(EXIT_USAGE)
}

/// Clap's error text up to its usage line, as one line: the message, then its tips ("a
/// similar subcommand exists") and the names of missing arguments, joined by `; `.
fn one_line(text: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    // Inside a list introduced by a line ending in ':' (the missing arguments, one per line).
    let mut listing = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            listing = false;
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        match parts.last_mut() {
            Some(last) if listing => {
                let sep = if last.ends_with(':') { " " } else { ", " };
                last.push_str(sep);
                last.push_str(line);
            }
            _ => {
                listing = line.ends_with(':');
                parts.push(line.to_owned());
            }
        }
    }
    if parts.is_empty() {
        return "bad usage".to_owned();
    }
    parts.join("; ")
}

/// Parses the command line, colouring clap's own output as `--color` asks.
fn parse() -> Result<Cli, clap::Error> {
    let color = match color_arg() {
        Some(ColorWhen::Always) => clap::ColorChoice::Always,
        Some(ColorWhen::Never) => clap::ColorChoice::Never,
        _ => clap::ColorChoice::Auto,
    };
    let mut matches = Cli::command().color(color).try_get_matches()?;
    Cli::from_arg_matches_mut(&mut matches)
}

/// `--color` as given, read before clap parses (clap's own help and errors use it).
fn color_arg() -> Option<ColorWhen> {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut value = None;
    for (i, a) in args.iter().enumerate() {
        if a == "--" {
            break;
        }
        if let Some(v) = a.strip_prefix("--color=") {
            value = Some(v.to_owned());
        } else if a == "--color" {
            value = args.get(i + 1).cloned();
        }
    }
    match value.as_deref() {
        Some("always") => Some(ColorWhen::Always),
        Some("never") => Some(ColorWhen::Never),
        Some("auto") => Some(ColorWhen::Auto),
        _ => None,
    }
}

fn report(error: &anyhow::Error, code: u8, verbose: bool) -> ExitCode {
    if verbose {
        eprintln!("vmfactory: {error}");
        for cause in error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        print_console_tail(error);
    } else {
        let line: Vec<String> = error.chain().map(ToString::to_string).collect();
        eprintln!("vmfactory: {}", line.join(": ").replace('\n', " "));
    }
    ExitCode::from(code)
}

/// Whether logs on stderr get ANSI colour.
fn colour(when: ColorWhen) -> bool {
    match when {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => {
            std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty())
                && std::io::stderr().is_terminal()
        }
    }
}

/// With `--verbose`, the last console lines of a VM that failed to come up (the one-line
/// message shows only the last few).
fn print_console_tail(error: &anyhow::Error) {
    use vmfactory_factory::{BaseError, GetVmError, TemplateError};
    // The factory's errors show a VM error transparently: look at each layer's own type.
    let postmortem = error.chain().find_map(|e| {
        e.downcast_ref::<vmfactory_vm::Error>()
            .and_then(vmfactory_vm::Error::postmortem)
            .or_else(|| e.downcast_ref::<GetVmError>()?.postmortem())
            .or_else(|| e.downcast_ref::<BaseError>()?.postmortem())
            .or_else(|| e.downcast_ref::<TemplateError>()?.postmortem())
    });
    if let Some(pm) = postmortem.filter(|pm| !pm.console_tail.is_empty()) {
        eprintln!("  console (last {} lines):", pm.console_tail.len());
        for line in &pm.console_tail {
            eprintln!("    | {line}");
        }
    }
}

/// Logs to stderr: `--log-level`, else `RUST_LOG`, else `warn`. A bad `--log-level` is a
/// usage error; a bad `RUST_LOG` falls back to `warn`, as before.
fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let filter = match &cli.log_level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("Bad --log-level {level:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(cli.color))
        .with_writer(std::io::stderr);
    // A second subscriber cannot be installed; there is none before this.
    let _ = match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::one_line;
    use crate::cli::Cli;
    use clap::Parser;

    fn error_of(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).expect_err("bad usage");
        one_line(&e.render().to_string())
    }

    #[test]
    fn one_line_keeps_suggestions() {
        let line = error_of(&["vmfactory", "stauts"]);
        assert!(line.contains("unrecognized subcommand 'stauts'"), "{line}");
        assert!(
            line.contains("a similar subcommand exists: 'status'"),
            "{line}"
        );
        let line = error_of(&["vmfactory", "status", "--jsn"]);
        assert!(line.contains("'--json'"), "{line}");
    }

    #[test]
    fn one_line_names_missing_arguments() {
        let line = error_of(&["vmfactory", "stop"]);
        assert!(line.contains("not provided: <ID>"), "{line}");
        let line = error_of(&["vmfactory", "inspect", "vm"]);
        assert!(line.contains("<ID>"), "{line}");
        assert!(!line.contains("Usage"), "{line}");
    }
}
