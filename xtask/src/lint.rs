//! `cargo xtask lint`: formatting, clippy and rustdoc over the whole workspace, each failing on
//! any warning. `cargo xtask test` runs it first, so CI fails on a lint problem too.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::workspace_root;

/// One check: its name in the report, the cargo arguments, and extra environment.
struct Check {
    name: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

const CHECKS: &[Check] = &[
    Check {
        name: "fmt",
        args: &["fmt", "--all", "--check"],
        env: &[],
    },
    Check {
        name: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        env: &[],
    },
    Check {
        name: "doc",
        args: &["doc", "--workspace", "--no-deps"],
        env: &[("RUSTDOCFLAGS", "-D warnings")],
    },
];

/// Runs every check (all of them, so one run shows every problem) and fails naming those
/// that failed.
pub fn run() -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut failed = Vec::new();
    for check in CHECKS {
        let env: String = check
            .env
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\" "))
            .collect();
        let line = format!("{env}cargo {}", check.args.join(" "));
        println!("lint: {}: {line}", check.name);
        let status = Command::new(&cargo)
            .current_dir(workspace_root())
            .args(check.args)
            .envs(check.env.iter().copied())
            .status()
            .with_context(|| format!("Cannot run {line}"))?;
        if !status.success() {
            println!("lint: {} FAILED ({status}): {line}", check.name);
            failed.push(check.name);
        }
    }
    if !failed.is_empty() {
        bail!("Lint failed: {}", failed.join(", "));
    }
    println!("lint: fmt, clippy and doc passed");
    Ok(())
}
