//! [`Stat`]: the median, min and max of repeated timings, as the bench reports them.

use std::time::Duration;

use serde::Serialize;

/// One measured quantity over repeated runs, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Stat {
    /// Median.
    pub median: f64,
    /// Fastest run.
    pub min: f64,
    /// Slowest run.
    pub max: f64,
    /// How many runs.
    pub runs: usize,
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

impl Stat {
    /// Median, min and max of `samples`.
    pub fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        let median = match ms.len() {
            0 => 0.0,
            n if n % 2 == 1 => ms[n / 2],
            n => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
        };
        Self {
            median,
            min: ms.first().copied().unwrap_or(0.0),
            max: ms.last().copied().unwrap_or(0.0),
            runs: ms.len(),
        }
    }
}

/// Prints one table row: `name`, then the median, min and max of `s` in ms.
pub fn print_row(name: &str, s: &Stat) {
    println!(
        "{:<40} {:>9.1} ms {:>7.1} ms {:>7.1} ms",
        name, s.median, s.min, s.max
    );
}
