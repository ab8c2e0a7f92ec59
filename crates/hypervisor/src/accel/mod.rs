//! Resolving `accel = auto` to KVM or TCG, and the CPU model a VM gets under each.
//!
//! `auto` means KVM only if KVM can actually boot the configured kernel. Opening `/dev/kvm` is
//! not enough: on a PVM host (`kvm_pvm`, no `vmx`/`svm` in `/proc/cpuinfo`) the device opens but
//! stock kernels die under it (MSR assertion, a hang after SeaBIOS, or an emulation failure). The
//! probe, in order, stopping at the first "no":
//! 1. `/dev/kvm` opens read-write;
//! 2. `/proc/cpuinfo` shows `vmx` or `svm` (hardware virtualisation, so not PVM);
//! 3. a probe boot: the configured kernel under `-accel kvm` with the CPU model a VM would get
//!    there, no initrd, `root=` pointing nowhere, `quiet panic=-1 -no-reboot`. It passes if
//!    QEMU exits by itself within [`PROBE_TIMEOUT`] and the serial output shows the kernel's
//!    `Kernel panic` (so the kernel ran all the way to mounting root).
//!
//! Steps 1–2 take microseconds and every process runs them, so on a PVM or KVM-less host
//! `auto` is TCG at once. The probe boot takes seconds (14.4 s once on a nested KVM host), so
//! its verdict is kept: for the process in a `OnceCell` (the first config's QEMU and kernel
//! decide), and, given a cache file ([`resolve_accel_with_cache`]), for the host until QEMU,
//! the kernel, `/dev/kvm` or the boot changes.

mod cache;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::config::{Accel, HypervisorConfig};
pub use cache::MAX_CACHE_FILE_SIZE;
use cache::{AccelCache, ProbeKey};

/// Bound on the probe boot. It runs once per host (the verdict is cached), and a nested KVM
/// host took 14.4 s in one run and more than 15 s in another, so the bound is generous.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// How much longer than a probe a process waits for another one's probe of the same run root.
const PROBE_LOCK_MARGIN: Duration = Duration::from_secs(30);

/// The CPU model a VM gets under KVM when none is configured: the host's own, so the guest
/// sees the host's features instead of QEMU's `qemu64` baseline.
pub const KVM_DEFAULT_CPU_MODEL: &str = "host";

static RESOLVED: OnceCell<Accel> = OnceCell::const_new();

/// The accelerator `cfg` runs with: `kvm` or `tcg` (never `auto`). `auto` is resolved once
/// per process, without a cache file; see [`resolve_accel_with_cache`].
pub async fn resolve_accel(cfg: &HypervisorConfig) -> Accel {
    resolve_accel_with_cache(cfg, None).await
}

/// [`resolve_accel`], keeping the probe boot's verdict in the file `cache` (e.g.
/// `<run_root>/accel.json`) for other processes on this host. The verdict there is used while
/// its key holds: the QEMU binary (path, size, mtime, version), the kernel (path, size,
/// mtime), the machine type and CPU model the probe used, `/dev/kvm` (presence, device
/// number, and inode and change time: a module reload makes a new node) and the boot id (a
/// reboot re-probes). A missing, corrupt, foreign or
/// stale file is probed over and rewritten; failing to write it is logged, never an error.
/// The first resolution in a process decides for the whole process.
pub async fn resolve_accel_with_cache(cfg: &HypervisorConfig, cache: Option<&Path>) -> Accel {
    match cfg.accel {
        Accel::Kvm => Accel::Kvm,
        Accel::Tcg => Accel::Tcg,
        Accel::Auto => {
            let host = HostProbe::default();
            *RESOLVED
                .get_or_init(|| resolve_auto(cfg, cache, &host))
                .await
        }
    }
}

impl HypervisorConfig {
    /// The `-cpu` model a VM of this config gets under `accel`: the configured one; else
    /// [`KVM_DEFAULT_CPU_MODEL`] under KVM; else none, i.e. QEMU's default (`qemu64`), which
    /// TCG guests have always had and the TCG timings were measured with.
    pub fn cpu_model_for(&self, accel: Accel) -> Option<&str> {
        match (&self.cpu_model, accel) {
            (Some(model), _) => Some(model),
            (None, Accel::Kvm) => Some(KVM_DEFAULT_CPU_MODEL),
            (None, _) => None,
        }
    }

    /// This config as it runs under the resolved `accel` (`kvm` or `tcg`), with the CPU model
    /// that implies written in: what a template records and its clones start with, so that no
    /// later process resolves `auto` for them again.
    pub fn pinned(&self, accel: Accel) -> Self {
        Self {
            accel,
            cpu_model: self.cpu_model_for(accel).map(str::to_owned),
            ..self.clone()
        }
    }
}

/// What `auto` is decided by: the host, or a fake in tests.
trait Probe {
    /// Step 1: `/dev/kvm` opens read-write.
    async fn kvm_usable(&self) -> bool;
    /// Step 2: the CPU has hardware virtualisation.
    async fn hardware_vt(&self) -> bool;
    /// What the probe boot's verdict depends on.
    async fn key(&self, cfg: &HypervisorConfig) -> std::io::Result<ProbeKey>;
    /// Step 3: whether the kernel boots under KVM.
    async fn boot(&self, cfg: &HypervisorConfig) -> ProbeBoot;
}

/// How a probe boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeBoot {
    /// The kernel ran under KVM to its panic.
    Kvm,
    /// QEMU could not run it, or it ended without the panic: KVM cannot boot this kernel.
    Failed,
    /// [`PROBE_TIMEOUT`] passed: a broken KVM, or only a loaded host. Not kept in the cache.
    TimedOut,
}

/// Why [`explain_accel`] (and so `auto`) chose what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelReason {
    /// `accel` is set to `kvm` or `tcg`: nothing to resolve.
    Configured,
    /// `/dev/kvm` cannot be opened read-write.
    NoKvmDevice,
    /// `/proc/cpuinfo` shows no `vmx` or `svm` (PVM, or nested without VT).
    NoHardwareVt,
    /// A probe boot's verdict kept in the cache file (same QEMU, kernel, `/dev/kvm`, boot).
    Cached,
    /// The probe boot under KVM reached the kernel's panic.
    ProbeBooted,
    /// The probe boot under KVM failed.
    ProbeFailed,
    /// The probe boot under KVM ran past [`PROBE_TIMEOUT`].
    ProbeTimedOut,
}

impl std::fmt::Display for AccelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Configured => "set in the configuration",
            Self::NoKvmDevice => "/dev/kvm cannot be opened read-write",
            Self::NoHardwareVt => "no vmx/svm in /proc/cpuinfo (PVM, or nested without VT)",
            Self::Cached => "the probe boot's verdict kept in the cache file",
            Self::ProbeBooted => "a probe boot under kvm reached the kernel's panic",
            Self::ProbeFailed => "a probe boot under kvm failed",
            Self::ProbeTimedOut => "a probe boot under kvm timed out",
        })
    }
}

/// An accelerator (`kvm` or `tcg`) and why it was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccelChoice {
    /// `kvm` or `tcg`.
    pub accel: Accel,
    /// Why.
    pub reason: AccelReason,
}

/// What `cfg` would run with on this host, and why, by the steps of
/// [`resolve_accel_with_cache`], reading the cache file `cache` but never writing it and
/// without the per-process answer: for a check that must leave nothing behind. A probe boot
/// it needs runs (and is waited for) here.
pub async fn explain_accel(cfg: &HypervisorConfig, cache: Option<&Path>) -> AccelChoice {
    match cfg.accel {
        Accel::Kvm | Accel::Tcg => AccelChoice {
            accel: cfg.accel,
            reason: AccelReason::Configured,
        },
        Accel::Auto => decide(cfg, cache, &HostProbe::default(), false).await,
    }
}

async fn resolve_auto(cfg: &HypervisorConfig, cache: Option<&Path>, probe: &impl Probe) -> Accel {
    decide(cfg, cache, probe, true).await.accel
}

/// Resolves `auto`; `store`: keep a probe boot's verdict in `cache`.
async fn decide(
    cfg: &HypervisorConfig,
    cache: Option<&Path>,
    probe: &impl Probe,
    store: bool,
) -> AccelChoice {
    let tcg = |reason| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if !probe.kvm_usable().await {
        info!("auto accelerator is tcg: /dev/kvm cannot be opened read-write");
        return tcg(AccelReason::NoKvmDevice);
    }
    if !probe.hardware_vt().await {
        info!("auto accelerator is tcg: no vmx/svm in /proc/cpuinfo (PVM, or nested without VT)");
        return tcg(AccelReason::NoHardwareVt);
    }
    let cached = match cache {
        Some(path) => match probe.key(cfg).await {
            Ok(key) => Some((AccelCache::new(path), key)),
            Err(e) => {
                warn!(error = %e, "cannot identify QEMU, the kernel or the boot: probing without the cache");
                None
            }
        },
        None => None,
    };
    // One probe per run root at a time: the processes that wait then find its verdict (four
    // `vmfactory` processes started together on a nested KVM host each probed, and each ran
    // past the bound).
    let _lock = match &cached {
        Some((cache, _)) => cache.lock(PROBE_TIMEOUT + PROBE_LOCK_MARGIN).await,
        None => None,
    };
    if let Some((cache, key)) = &cached {
        if let Some(accel) = cache.load(key).await {
            info!(%accel, cache = %cache.path().display(), "auto accelerator from the probe cache (same QEMU, kernel, /dev/kvm and boot)");
            return AccelChoice {
                accel,
                reason: AccelReason::Cached,
            };
        }
    }
    let t0 = Instant::now();
    let outcome = probe.boot(cfg).await;
    let choice = match outcome {
        ProbeBoot::Kvm => {
            info!(elapsed = ?t0.elapsed(), "auto accelerator is kvm: the probe boot under kvm reached the kernel's panic");
            AccelChoice {
                accel: Accel::Kvm,
                reason: AccelReason::ProbeBooted,
            }
        }
        ProbeBoot::Failed => {
            warn!(elapsed = ?t0.elapsed(), "auto accelerator is tcg: the probe boot under kvm failed");
            tcg(AccelReason::ProbeFailed)
        }
        ProbeBoot::TimedOut => {
            warn!(timeout = ?PROBE_TIMEOUT, "auto accelerator is tcg for this process: the probe boot under kvm timed out (not kept: the next process probes again)");
            tcg(AccelReason::ProbeTimedOut)
        }
    };
    if let Some((cache, key)) = &cached {
        if store && outcome != ProbeBoot::TimedOut {
            cache.store(key, choice.accel).await;
        }
    }
    choice
}

/// The real host's files.
#[derive(Debug)]
struct HostProbe {
    kvm: PathBuf,
    cpuinfo: PathBuf,
    boot_id: PathBuf,
}

impl Default for HostProbe {
    fn default() -> Self {
        Self {
            kvm: "/dev/kvm".into(),
            cpuinfo: "/proc/cpuinfo".into(),
            boot_id: "/proc/sys/kernel/random/boot_id".into(),
        }
    }
}

impl Probe for HostProbe {
    async fn kvm_usable(&self) -> bool {
        tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.kvm)
            .await
            .is_ok()
    }

    async fn hardware_vt(&self) -> bool {
        match tokio::fs::read_to_string(&self.cpuinfo).await {
            Ok(s) => cpuinfo_has_vt(&s),
            Err(_) => false,
        }
    }

    async fn key(&self, cfg: &HypervisorConfig) -> std::io::Result<ProbeKey> {
        ProbeKey::gather(cfg, &self.kvm, &self.boot_id).await
    }

    async fn boot(&self, cfg: &HypervisorConfig) -> ProbeBoot {
        let mut cmd = Command::new(&cfg.qemu_path);
        cmd.args(probe_args(cfg))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(PROBE_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) if String::from_utf8_lossy(&out.stdout).contains("Kernel panic") => {
                ProbeBoot::Kvm
            }
            Ok(Ok(_)) => ProbeBoot::Failed,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot run the kvm probe");
                ProbeBoot::Failed
            }
            Err(_) => ProbeBoot::TimedOut,
        }
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

/// The probe boot's QEMU arguments. `quiet`: nested, every serial byte is a VM exit, and the
/// panic line is `KERN_EMERG`, printed anyway.
fn probe_args(cfg: &HypervisorConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["-M", cfg.machine.as_str(), "-accel", "kvm"]
        .iter()
        .map(OsString::from)
        .collect();
    if let Some(model) = cfg.cpu_model_for(Accel::Kvm) {
        a.extend(["-cpu".into(), model.into()]);
    }
    a.extend(
        [
            "-m",
            "256M",
            "-smp",
            "1",
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
        ]
        .map(OsString::from),
    );
    a.push(cfg.kernel.clone().into());
    a.extend(["-append".into(), PROBE_KERNEL_PARAMS.into()]);
    a
}

/// The probe kernel's command line: panic at once (`-no-reboot` then ends QEMU) when the
/// nonexistent root cannot be mounted.
const PROBE_KERNEL_PARAMS: &str = "console=ttyS0 quiet panic=-1 root=/dev/nonexistent";

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

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

    #[test]
    fn cpu_models_and_pinning() {
        let mut cfg = HypervisorConfig::new("/k", None);
        assert_eq!(cfg.cpu_model_for(Accel::Kvm), Some("host"));
        assert_eq!(cfg.cpu_model_for(Accel::Tcg), None, "QEMU's default");
        let kvm = cfg.pinned(Accel::Kvm);
        assert_eq!(
            (kvm.accel, kvm.cpu_model.as_deref()),
            (Accel::Kvm, Some("host"))
        );
        let tcg = cfg.pinned(Accel::Tcg);
        assert_eq!((tcg.accel, tcg.cpu_model.as_deref()), (Accel::Tcg, None));
        assert_eq!(
            tcg.without_template(),
            HypervisorConfig {
                accel: Accel::Tcg,
                ..cfg.clone()
            }
        );
        cfg.cpu_model = Some("max".into());
        assert_eq!(cfg.cpu_model_for(Accel::Kvm), Some("max"));
        assert_eq!(cfg.pinned(Accel::Tcg).cpu_model.as_deref(), Some("max"));
        // Pinning twice changes nothing.
        assert_eq!(kvm.pinned(Accel::Kvm), kvm);
    }

    #[test]
    fn the_probe_boot_is_quiet_and_uses_the_vms_cpu_model() {
        let mut cfg = HypervisorConfig::new("/g/vmlinuz", None);
        let line = |cfg: &HypervisorConfig| {
            probe_args(cfg)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line(&cfg),
            "-M q35 -accel kvm -cpu host -m 256M -smp 1 -nographic -nodefaults \
             -no-user-config -no-reboot -serial stdio -kernel /g/vmlinuz \
             -append console=ttyS0 quiet panic=-1 root=/dev/nonexistent"
        );
        cfg.cpu_model = Some("Skylake-Client".into());
        assert!(line(&cfg).contains("-accel kvm -cpu Skylake-Client -m"));
    }

    /// A host whose answers are set, counting probe boots.
    struct FakeProbe {
        kvm: bool,
        vt: bool,
        key: Option<ProbeKey>,
        boots: ProbeBoot,
        probed: AtomicU32,
    }

    impl FakeProbe {
        /// A host with /dev/kvm and VT whose probe boot ends as `boots`.
        fn kvm_host(boots: ProbeBoot) -> Self {
            Self {
                kvm: true,
                vt: true,
                key: Some(key("boot-1")),
                boots,
                probed: AtomicU32::new(0),
            }
        }
    }

    impl Probe for FakeProbe {
        async fn kvm_usable(&self) -> bool {
            self.kvm
        }
        async fn hardware_vt(&self) -> bool {
            self.vt
        }
        async fn key(&self, _: &HypervisorConfig) -> std::io::Result<ProbeKey> {
            self.key
                .clone()
                .ok_or_else(|| std::io::ErrorKind::NotFound.into())
        }
        async fn boot(&self, _: &HypervisorConfig) -> ProbeBoot {
            self.probed.fetch_add(1, Ordering::SeqCst);
            // Long enough for concurrent resolutions to meet at the lock.
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.boots
        }
    }

    fn key(boot_id: &str) -> ProbeKey {
        serde_json::from_value(serde_json::json!({
            "qemu": {"path": "/usr/bin/qemu", "size": 1, "mtime_secs": 2, "mtime_nanos": 3},
            "qemu_version": "QEMU emulator version 7.2.0",
            "kernel": {"path": "/g/vmlinuz", "size": 4, "mtime_secs": 5, "mtime_nanos": 6},
            "machine": "q35",
            "cpu_model": "host",
            "kvm_device": {"rdev": 2792, "ino": 7, "ctime_secs": 8, "ctime_nanos": 9},
            "boot_id": boot_id,
        }))
        .expect("key")
    }

    #[tokio::test]
    async fn the_probe_boot_runs_once_per_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("accel.json");
        let cfg = HypervisorConfig::new("/g/vmlinuz", None);
        let mut host = FakeProbe::kvm_host(ProbeBoot::Kvm);
        let probed = |h: &FakeProbe| h.probed.load(Ordering::SeqCst);
        // First process: probes, keeps the verdict; the next ones find it.
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        assert_eq!(probed(&host), 1);
        assert!(file.is_file());
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        assert_eq!(probed(&host), 1, "from the cache");
        // A reboot (another key): probed again, now failing, and that is kept too.
        host.key = Some(key("boot-2"));
        host.boots = ProbeBoot::Failed;
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Tcg);
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Tcg);
        assert_eq!(probed(&host), 2);
        // A corrupt file: probed over and rewritten.
        std::fs::write(&file, b"\0garbage").expect("write");
        host.boots = ProbeBoot::Kvm;
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        assert_eq!(probed(&host), 3);
        // Without a cache file, or without a key, every resolution probes.
        assert_eq!(resolve_auto(&cfg, None, &host).await, Accel::Kvm);
        host.key = None;
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        assert_eq!(probed(&host), 5);
    }

    #[tokio::test]
    async fn concurrent_resolutions_probe_once_and_a_timeout_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("accel.json");
        let cfg = HypervisorConfig::new("/g/vmlinuz", None);
        let mut host = FakeProbe::kvm_host(ProbeBoot::TimedOut);
        // A timed-out probe answers TCG but leaves no verdict behind.
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Tcg);
        assert!(!file.exists());
        assert_eq!(host.probed.load(Ordering::SeqCst), 1);
        // Four at once: the lock makes one probe, the others read its verdict.
        host.boots = ProbeBoot::Kvm;
        let r = || resolve_auto(&cfg, Some(&file), &host);
        let all = tokio::join!(r(), r(), r(), r());
        assert_eq!(all, (Accel::Kvm, Accel::Kvm, Accel::Kvm, Accel::Kvm));
        assert_eq!(host.probed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_kvm_device_or_no_vt_is_tcg_without_a_probe_or_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("accel.json");
        let cfg = HypervisorConfig::new("/g/vmlinuz", None);
        for (kvm, vt) in [(false, true), (true, false)] {
            let host = FakeProbe {
                kvm,
                vt,
                ..FakeProbe::kvm_host(ProbeBoot::Kvm)
            };
            assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Tcg);
            assert_eq!(host.probed.load(Ordering::SeqCst), 0);
            assert!(!file.exists());
        }
    }

    #[tokio::test]
    async fn a_check_reads_the_cache_but_never_writes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("accel.json");
        let cfg = HypervisorConfig::new("/g/vmlinuz", None);
        let host = FakeProbe::kvm_host(ProbeBoot::Kvm);
        let choice = decide(&cfg, Some(&file), &host, false).await;
        assert_eq!(choice.reason, AccelReason::ProbeBooted);
        assert!(!file.exists(), "a check leaves no file");
        assert_eq!(resolve_auto(&cfg, Some(&file), &host).await, Accel::Kvm);
        let choice = decide(&cfg, Some(&file), &host, false).await;
        assert_eq!(
            (choice.accel, choice.reason),
            (Accel::Kvm, AccelReason::Cached)
        );
        assert_eq!(host.probed.load(Ordering::SeqCst), 2);
        let no_vt = FakeProbe {
            vt: false,
            ..FakeProbe::kvm_host(ProbeBoot::Kvm)
        };
        let choice = decide(&cfg, Some(&file), &no_vt, false).await;
        assert_eq!(
            (choice.accel, choice.reason),
            (Accel::Tcg, AccelReason::NoHardwareVt)
        );
        let mut tcg = cfg.clone();
        tcg.accel = Accel::Tcg;
        assert_eq!(
            explain_accel(&tcg, None).await.reason,
            AccelReason::Configured
        );
    }
}
