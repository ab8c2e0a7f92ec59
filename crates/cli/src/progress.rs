//! Progress for long steps: an indicatif spinner on a terminal, nothing otherwise (logs and
//! the commands' own output still say what happened).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One long step.
#[derive(Debug)]
pub struct Step {
    bar: ProgressBar,
    started: Instant,
}

impl Step {
    /// Starts a step saying `what` (a spinner on stderr when it is a terminal).
    pub fn start(what: impl Into<String>) -> Self {
        let bar = if std::io::stderr().is_terminal() {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        let style = ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(what.into());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self {
            bar,
            started: Instant::now(),
        }
    }

    /// Updates the message.
    pub fn set(&self, what: impl Into<String>) {
        self.bar.set_message(what.into());
    }

    /// Ends the step; returns how long it took.
    pub fn done(self) -> Duration {
        self.bar.finish_and_clear();
        self.started.elapsed()
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}
