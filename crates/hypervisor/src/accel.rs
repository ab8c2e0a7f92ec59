//! Resolving `accel = auto` to KVM or TCG.
//!
//! `auto` means KVM only if KVM can actually boot the configured kernel. Opening `/dev/kvm` is
//! not enough: on a PVM host (`kvm_pvm`, no `vmx`/`svm` in `/proc/cpuinfo`) the device opens but
//! stock kernels die under it (MSR assertion, a hang after SeaBIOS, or an emulation failure). The
//! probe, in order, stopping at the first "no":
//! 1. `/dev/kvm` opens read-write;
//! 2. `/proc/cpuinfo` shows `vmx` or `svm` (hardware virtualisation, so not PVM);
//! 3. a probe boot: the configured kernel under `-accel kvm`, no initrd, `root=` pointing
//!    nowhere, `panic=-1 -no-reboot`. It passes if QEMU exits by itself within
//!    [`PROBE_TIMEOUT`] and the serial output shows the kernel's `Kernel panic` (so the kernel
//!    ran all the way to mounting root).
//!
//! Steps 1–2 take microseconds, so on a PVM or KVM-less host `auto` resolves to TCG at once.
//! The result is cached for the process in a `OnceCell` (the first config's QEMU and kernel
//! decide).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::{Accel, HypervisorConfig};

/// Bound on the probe boot.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

static RESOLVED: OnceCell<Accel> = OnceCell::const_new();

/// The accelerator `cfg` runs with: `kvm` or `tcg` (never `auto`).
pub async fn resolve_accel(cfg: &HypervisorConfig) -> Accel {
    match cfg.accel {
        Accel::Kvm => Accel::Kvm,
        Accel::Tcg => Accel::Tcg,
        Accel::Auto => *RESOLVED.get_or_init(|| probe(cfg)).await,
    }
}

async fn probe(cfg: &HypervisorConfig) -> Accel {
    let accel = if !kvm_device_usable().await {
        info!("/dev/kvm is not usable; auto accelerator is tcg");
        Accel::Tcg
    } else if !hardware_virtualisation().await {
        info!("no vmx/svm in /proc/cpuinfo (PVM or nested without VT); auto accelerator is tcg");
        Accel::Tcg
    } else if probe_boot(&cfg.qemu_path, &cfg.kernel, cfg.machine.as_str()).await {
        info!("probe boot under kvm succeeded; auto accelerator is kvm");
        Accel::Kvm
    } else {
        warn!("probe boot under kvm failed; auto accelerator is tcg");
        Accel::Tcg
    };
    accel
}

async fn kvm_device_usable() -> bool {
    tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .await
        .is_ok()
}

async fn hardware_virtualisation() -> bool {
    match tokio::fs::read_to_string("/proc/cpuinfo").await {
        Ok(s) => cpuinfo_has_vt(&s),
        Err(_) => false,
    }
}

/// Whether a `/proc/cpuinfo` text lists `vmx` or `svm` among the flags.
fn cpuinfo_has_vt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

async fn probe_boot(qemu: &Path, kernel: &Path, machine: &str) -> bool {
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", machine, "-accel", "kvm", "-m", "256M", "-smp", "1"])
        .args(["-nographic", "-nodefaults", "-no-user-config", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 root=/dev/nonexistent"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).contains("Kernel panic"),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot run the kvm probe");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags() {
        assert!(cpuinfo_has_vt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpuinfo_has_vt("flags : svm\n"));
        assert!(!cpuinfo_has_vt("flags : fpu vmxx sse\nvmx\n"));
        assert!(!cpuinfo_has_vt(""));
    }

    #[tokio::test]
    async fn explicit_accels_are_kept() {
        let mut cfg = HypervisorConfig::new("/nonexistent", None);
        cfg.accel = Accel::Tcg;
        assert_eq!(resolve_accel(&cfg).await, Accel::Tcg);
        cfg.accel = Accel::Kvm;
        assert_eq!(resolve_accel(&cfg).await, Accel::Kvm);
    }
}
