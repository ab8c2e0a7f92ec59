//! Step durations for benches: one debug line per step on one target, so
//! `RUST_LOG=vmfactory::timing=debug` shows where an operation's time goes and nothing else.

use std::time::Instant;

use tracing::debug;

/// The log target of [`step_took`].
pub const TIMING_TARGET: &str = "vmfactory::timing";

/// Logs (debug, [`TIMING_TARGET`], fields `step` and `ms`) that `step` took from `since`
/// until now, and returns now, the next step's start.
pub fn step_took(step: &'static str, since: Instant) -> Instant {
    let now = Instant::now();
    let ms = now.duration_since(since).as_secs_f64() * 1000.0;
    debug!(target: TIMING_TARGET, step, ms, "step done");
    now
}
