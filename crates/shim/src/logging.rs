//! The serving shim's log: our tracing events and containerd-shim's `log` records, as text
//! lines with their targets, into the `log` FIFO containerd reads in the bundle directory.
//!
//! containerd-shim's own logger reads `RUST_LOG` as a bare level, so `warn,vmfactory=debug`
//! fell back to `info` and dropped every debug line, and its lines carry no target. Here
//! `RUST_LOG` takes tracing's full directive syntax; without it the level is `info`, or
//! `debug` when containerd runs at debug level (it passes `-debug`).

use std::fs::OpenOptions;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// The FIFO's name in the bundle directory, the shim's working directory.
const LOG_FIFO: &str = "log";

/// The filter of the shim's log: `rust_log` (`RUST_LOG`) when it parses, else `debug` or
/// `info` by containerd's `-debug` flag.
pub fn filter(rust_log: Option<&str>, debug: bool) -> EnvFilter {
    let fallback = if debug { "debug" } else { "info" };
    rust_log
        .filter(|s| !s.trim().is_empty())
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(fallback))
}

/// Sets the global subscriber for the serving shim (no action argument); `start` and `delete`
/// answer on stdout and keep no log. Returns whether the log was set up: without the FIFO
/// (the shim run by hand) there is nothing to write to.
pub fn init(args: &[std::ffi::OsString]) -> bool {
    let Ok(flags) = containerd_shim::parse(args) else {
        return false;
    };
    if !flags.action.is_empty() || flags.version || flags.info {
        return false;
    }
    let Ok(fifo) = OpenOptions::new().write(true).open(LOG_FIFO) else {
        return false;
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log.as_deref(), flags.debug))
        .with_ansi(false)
        .with_writer(Mutex::new(fifo))
        .try_init()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_directives_win_else_the_debug_flag() {
        let f = filter(Some("warn,vmfactory::timing=debug"), false).to_string();
        assert!(f.contains("vmfactory::timing=debug"), "{f}");
        assert!(f.contains("warn"), "{f}");
        assert_eq!(filter(None, true).to_string(), "debug");
        assert_eq!(filter(None, false).to_string(), "info");
        assert_eq!(filter(Some(""), true).to_string(), "debug");
        assert_eq!(filter(Some("=[bad"), false).to_string(), "info");
    }
}
