//! `xtask kvm-host-inside`: the runner inside L1 (see the parent module). Everything it
//! reports is one console line starting with [`MARK`].

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use vmfactory_hypervisor::{resolve_accel, Accel, HypervisorConfig};

use super::{Manifest, Mode, Shard, MARK};
use crate::scenario_result;

/// Runs what the manifest says; an error makes L1's runner exit non-zero.
pub fn run(manifest: &Path) -> Result<()> {
    let bytes =
        std::fs::read(manifest).with_context(|| format!("Cannot read {}", manifest.display()))?;
    let m: Manifest = serde_json::from_slice(&bytes)?;
    describe_host();
    // Proof of life for L0's hang watch: a stuck L1 prints nothing at all.
    std::thread::spawn(|| loop {
        std::thread::sleep(super::BEAT_EVERY);
        println!("{MARK}{}", super::BEAT);
    });

    let mut cfg = HypervisorConfig::new(&m.kernel, Some(m.initrd.clone()));
    cfg.cpu_model = m
        .env
        .iter()
        .find(|(k, v)| k == vmfactory_e2e::CPU_MODEL_ENV && !v.is_empty())
        .map(|(_, v)| v.clone());
    let rt = tokio::runtime::Runtime::new()?;
    let probe = Instant::now();
    let accel = rt.block_on(resolve_accel(&cfg));
    println!(
        "{MARK}accelerator: {} (resolved by the product's probe in {:.1} s)",
        accel.as_str(),
        probe.elapsed().as_secs_f64()
    );
    if accel != Accel::Kvm {
        bail!("accel = auto resolved to {} inside L1", accel.as_str());
    }
    match m.mode {
        Mode::Test => {
            let shard = shard_number(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
            let part = m
                .shards
                .get(shard)
                .with_context(|| format!("The manifest has no shard {shard}"))?;
            run_tests(&m, part)
        }
        Mode::Bench => {
            for (k, v) in &m.env {
                // Single-threaded here: the runtime above has no task running.
                std::env::set_var(k, v);
            }
            let mut report = rt.block_on(crate::bench::run(3, &[4]))?;
            report.accel = format!(
                "{} (nested KVM in a TCG-emulated L1: ratios hold, absolute times are not a \
                 real KVM host's)",
                report.accel
            );
            crate::bench::report(&report).map(drop)
        }
        Mode::BenchCtr => {
            for (k, v) in &m.env {
                // Single-threaded here: the runtime above has no task running.
                std::env::set_var(k, v);
            }
            let env = vmfactory_e2e::guest_env().context("No guest image in L1")?;
            let shim = crate::bench_ctr::shim_bin()?;
            let report = crate::bench_ctr::run(&env, shim, CTR_RUNS)?;
            crate::bench_ctr::report(&report).map(drop)
        }
    }
}

/// Timed rounds of the container bench in L1 (each a runc, a template and a direct run).
const CTR_RUNS: usize = 5;

fn describe_host() {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let release = read("/proc/sys/kernel/osrelease");
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let t0 = Instant::now();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("qemu-system-x86_64: {e}"));
    let qemu_version_ms = t0.elapsed().as_millis();
    let uptime = read("/proc/uptime");
    println!(
        "{MARK}L1 up at {} s: kernel {}, {cpus} vCPUs, {} (`--version` ran {qemu_version_ms} ms); \
         /dev/kvm {}, /dev/vhost-vsock {}",
        uptime.split_whitespace().next().unwrap_or("?"),
        release.trim(),
        qemu,
        yes_no(Path::new("/dev/kvm").exists()),
        yes_no(Path::new("/dev/vhost-vsock").exists()),
    );
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `kvmhost.shard=N` on a kernel command line, else 0.
fn shard_number(cmdline: &str) -> usize {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kvmhost.shard="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Each test binary in turn; one marked line per scenario, then a count.
fn run_tests(m: &Manifest, part: &Shard) -> Result<()> {
    let started = Instant::now();
    let (mut passed, mut failed, mut broken) = (0, 0, Vec::new());
    for (name, exe) in &part.tests {
        let mut child = Command::new(exe)
            .args(&part.args)
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("Cannot run {}", exe.display()))?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line?;
                match scenario_result(&line) {
                    Some((test, true)) => {
                        passed += 1;
                        println!("{MARK}ok    {name}::{test}");
                    }
                    Some((test, false)) => {
                        failed += 1;
                        println!("{MARK}FAIL  {name}::{test}");
                    }
                    None => println!("{line}"),
                }
            }
        }
        if !child.wait()?.success() {
            broken.push(name.as_str());
        }
    }
    println!(
        "{MARK}e2e: {passed} passed, {failed} failed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !broken.is_empty() {
        bail!("test binaries failed: {}", broken.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shard_number;

    #[test]
    fn shard_from_the_kernel_command_line() {
        assert_eq!(shard_number("console=ttyS0 kvmhost.shard=1 quiet"), 1);
        assert_eq!(shard_number("console=ttyS0"), 0);
        assert_eq!(shard_number("kvmhost.shard=x"), 0);
    }
}
