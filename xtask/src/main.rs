//! Project automation: `cargo xtask <guest|tools|test|e2e|bench|demo>`.

mod bench;
mod bench_factory;
mod demo;
mod guest;
mod tools;
mod util;

use std::process::Command;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::util::{is_ci, run, workspace_root};

#[derive(Parser)]
#[command(about = "vmfactory project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The README's first command: install QEMU if missing, build the guest image and the
    /// `vmfactory` CLI, make a template with `vmfactory init`, hand out two VMs with
    /// `vmfactory get`, compare with a cold boot, destroy it all and check nothing is left.
    Demo,
    /// Build the guest image (kernel + initramfs with the static agent) into target/guest.
    Guest,
    /// Install what the tests need: QEMU (apt) and vhost-device-vsock (crates.io).
    Tools,
    /// Run every test: unit, protocol and real-QEMU end-to-end.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run only the real-QEMU end-to-end suite.
    E2e {
        /// Extra arguments for the test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure clones against cold boots (time to ready, PSS); table + target/bench/bench.json.
    Bench {
        /// Timed runs of each kind (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Numbers of idle VMs to measure PSS with.
        #[arg(long, value_delimiter = ',', default_value = "4,8")]
        pss: Vec<usize>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Demo => {
            tools::ensure_qemu()?;
            guest::build(false)?;
            demo::run()
        }
        Cmd::Guest => guest::build(false).map(drop),
        Cmd::Tools => prerequisites(),
        Cmd::Test { args } => {
            prerequisites()?;
            cargo_test(&["--workspace"], &args)
        }
        Cmd::E2e { args } => {
            prerequisites()?;
            e2e_with_summary(&args)
        }
        Cmd::Bench { runs, pss } => {
            tools::ensure_qemu()?;
            guest::build(true)?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench::run(runs.max(1), &pss))?;
            bench::report(&report).map(drop)
        }
    }
}

/// QEMU, the guest image and the vhost-user vsock backend: everything real VMs need.
fn prerequisites() -> Result<()> {
    tools::ensure_qemu()?;
    guest::build(false)?;
    tools::ensure_vhost_device_vsock()?;
    Ok(())
}

fn cargo_test(selection: &[&str], extra: &[String]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .arg("test")
        .args(selection)
        .env("VMFACTORY_GUEST_DIR", guest::guest_dir())
        .env("VMFACTORY_VHOST_DEVICE_VSOCK", tools::vhost_device_vsock());
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    if is_ci() {
        cmd.env("CI", "true");
    }
    run(&mut cmd)
}

/// Runs the real-QEMU suite, printing one line per scenario (`ok`/`FAIL` and its name) as it
/// finishes; everything else the tests print goes to stderr.
fn e2e_with_summary(extra: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["test", "-p", "vmfactory-e2e", "--"])
        .args(extra)
        .env("VMFACTORY_GUEST_DIR", guest::guest_dir())
        .env("VMFACTORY_VHOST_DEVICE_VSOCK", tools::vhost_device_vsock())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match scenario_result(&line) {
                Some((name, true)) => {
                    passed += 1;
                    println!("ok    {name}");
                }
                Some((name, false)) => {
                    failed += 1;
                    println!("FAIL  {name}");
                }
                None => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait()?;
    println!("e2e: {passed} passed, {failed} failed");
    anyhow::ensure!(status.success(), "The e2e suite failed ({status})");
    Ok(())
}

/// `test NAME ... ok` → `(NAME, true)`, `test NAME ... FAILED` → `(NAME, false)`.
fn scenario_result(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("test ")?;
    let (name, outcome) = rest.rsplit_once(" ... ")?;
    match outcome.trim() {
        "ok" => Some((name, true)),
        "FAILED" => Some((name, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::scenario_result;

    #[test]
    fn scenario_lines() {
        assert_eq!(scenario_result("test boot ... ok"), Some(("boot", true)));
        assert_eq!(
            scenario_result("test a::b ... FAILED"),
            Some(("a::b", false))
        );
        assert_eq!(scenario_result("test result: ok. 3 passed"), None);
        assert_eq!(scenario_result("running 3 tests"), None);
    }
}
