//! `cargo xtask kvm-host`: a real KVM host, nested, for the KVM path our machines cannot run
//! directly (their `/dev/kvm` is a PVM host on which stock kernels fail).
//!
//! An L1 VM boots under TCG with `-cpu max` (which emulates AMD SVM with nested paging) on QEMU
//! 10 from bookworm-backports, unpacked under `target/kvm-host`. Its initramfs carries the
//! project's test binaries, CLI, guest image and tools, and QEMU 10 as the VMM. L1 loads
//! `kvm_amd` and `vhost_vsock`, and this same xtask binary, run there as `kvm-host-inside`,
//! resolves the accelerator through the product's probe boot (it must be KVM), runs the
//! real-QEMU e2e suite (or the bench), and reports on L1's console. Lines it marks (`@kvm `)
//! are printed here; each L1's whole console goes to `target/kvm-host/run-PID/console-N-TRY.log`.

mod image;
pub mod inside;
mod packages;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::{run, workspace_root};
use crate::{guest, tools};

/// Marks the lines of L1's console that are the runner's report.
pub const MARK: &str = "@kvm ";

/// The scenarios CI runs in L1, one or more per part of the KVM path: direct boot and
/// lifecycle, hotplug, template save and clones (x-ignore-shared, kvmclock after restore), the
/// factory's `get_vm` with hotplug, cache, VM-cache server, faults at save and restore,
/// isolation of clones (RNG, clock), virtio-serial reconnects, plain vsock, networks (tap
/// with vhost-net in L1), and the CLI. The
/// whole suite (`--all`) takes longer in L1 than CI's budget allows: every QEMU and every guest
/// runs emulated there. Hybrid vsock is left out: its L2 hung before init in 2 of 5 nested runs
/// (docs/kvm-host.md), while it passes on every TCG run of the main suite.
pub const CI_SCENARIOS: &[&str] = &[
    "boot_pause_resume_stop",
    "cpu_and_memory_hotplug_are_onlined",
    "template_save_and_two_clones",
    "template_get_vm_reseed_time_hotplug_fetch_and_close",
    "cache_of_two_over_a_template_hands_out_three",
    "template_backed_server_serves_concurrent_clients_and_quits_clean",
    "qemu_killed_during_template_save",
    "qemu_killed_during_clone_restore_and_hotplug",
    "clones_share_no_randomness_time_or_memory",
    "serial_check_survives_three_reconnects",
    "_cid",
    "init_status_get_destroy_leaves_nothing",
    "processes_streams_files_and_a_terminal_in_a_clone",
    "disks_mounted_in_clones_read_write_and_shared_read_only",
    "qemu_killed_mid_exec_is_one_error_and_leaks_nothing",
    "a_held_vm_serves_exec_and_an_outside_client",
    "prestarted_clones_are_handed_out_once_replaced_and_dropped",
    "eight_clones_each_reach_the_host_and_only_the_host",
    "init_notifies_systemd_status_probes_list_and_stop",
    "init_serves_metrics_that_count_a_get_and_destroy_removes_the_socket",
    "config_check_runs_the_real_qemu_and_leaves_nothing",
    "a_vm_that_cannot_boot_reports_its_console_and_keeps_its_log",
    "ctr_runs_execs_kills_and_cleans_up_containers_in_template_clones",
];

/// L1's CPU: TCG's `max` (AMD SVM with nested paging) without `fsgsbase`. With it, an L2
/// under `-cpu host` gets FSGSBASE too, and after some VM exits L1's kernel ran on with a
/// wrong GS base (recursive page faults in `exc_page_fault`, "stack guard page was hit", L1
/// panicked within a minute): TCG's SVM does not restore it. Real AMD hosts do.
const L1_CPU: &str = "max,-fsgsbase";

/// The L2 guests' CPU model in CI: a configured model, not the product's `host`. Under TCG's
/// emulated SVM, L2 guests with `-cpu host` hung L1 in 2 of 5 runs (a vCPU stayed in L2 and
/// never took L1's interrupts: RCU stalls, or no output at all); with `qemu64` none of 4 did.
/// Real AMD and Intel hosts run `host` (docs/kvm-host.md).
pub const CI_L2_CPU: &str = "qemu64";

/// The runner's heartbeat line, printed every [`BEAT_EVERY`].
pub const BEAT: &str = "beat";
/// How often the runner prints [`BEAT`].
pub const BEAT_EVERY: Duration = Duration::from_secs(20);
/// A silent L1 console for this long means L1 hung: killed, and its share run once more.
const HANG_AFTER: Duration = Duration::from_secs(120);

/// Why an L1 QEMU stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Exited,
    TimedOut,
    Hung,
}

/// How much the e2e harness stretches its time bounds in L1 (`VMFACTORY_E2E_TIME_SCALE`).
const TIME_SCALE: u32 = 5;

/// What L1 runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Mode {
    /// The real-QEMU e2e suite.
    Test,
    /// `cargo xtask bench`.
    Bench,
    /// `cargo xtask bench --ctr`: containerd's `ctr run` with runc, template clones and
    /// direct VMs, under KVM.
    BenchCtr,
}

impl Mode {
    /// A bench: one L1, release binaries.
    fn is_bench(self) -> bool {
        matches!(self, Mode::Bench | Mode::BenchCtr)
    }
}

/// How to run the nested host.
#[derive(Debug, Clone)]
pub struct Options {
    /// What L1 runs.
    pub mode: Mode,
    /// Extra arguments for each test binary (e.g. a name filter), or for nothing in bench mode.
    /// With none, [`CI_SCENARIOS`] (unless `all`).
    pub args: Vec<String>,
    /// The whole e2e suite rather than [`CI_SCENARIOS`].
    pub all: bool,
    /// L1's memory.
    pub memory_mib: u32,
    /// Each L1's vCPUs (TCG runs one host thread per vCPU).
    pub vcpus: u32,
    /// L1 VMs run at a time, each for one scenario (or test binary); bench: one.
    pub hosts: u32,
    /// The CPU model of the L2 guests (`None`: the product's default, `host`).
    pub l2_cpu: Option<String>,
    /// Bound on the whole nested run.
    pub timeout: Duration,
}

impl Default for Options {
    /// What `cargo xtask test` runs: [`CI_SCENARIOS`], each in an L1 of 1 vCPU and 4 GiB, two
    /// at a time, 30 minutes in all. One vCPU each: with two, L1 hung in one run (a CPU stuck
    /// in L2 never took an IPI; RCU stalls, soft lockups), so the second host core runs a
    /// second L1 instead.
    fn default() -> Self {
        Self {
            mode: Mode::Test,
            args: Vec::new(),
            all: false,
            memory_mib: 4096,
            vcpus: 1,
            hosts: 2,
            l2_cpu: Some(CI_L2_CPU.into()),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// What the runner inside L1 reads from `/kvm-host/manifest.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// What to run.
    pub mode: Mode,
    /// What each L1 runs; L1 number N (`kvmhost.shard=N` on its kernel command line) runs
    /// `shards[N]`.
    pub shards: Vec<Shard>,
    /// Environment for the tests.
    pub env: Vec<(String, String)>,
    /// The guest image.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initrd: PathBuf,
}

/// One L1's share of the tests.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Shard {
    /// Test binaries: (name, path).
    pub tests: Vec<(String, PathBuf)>,
    /// Extra arguments for each test binary (name filters).
    pub args: Vec<String>,
}

/// The work, one L1 each: a CI scenario (the binaries that hold it, filtered by its name), or
/// else a test binary that `args` select tests of. One scenario per L1 keeps what a hung L1
/// costs to one scenario.
fn shards(tests: &[(String, PathBuf)], args: &[String], all: bool) -> Result<Vec<Shard>> {
    if args.is_empty() && !all {
        CI_SCENARIOS
            .iter()
            .map(|name| {
                let args = vec![(*name).to_string()];
                let tests = holding(tests, &args)?;
                ensure!(!tests.is_empty(), "no e2e test is named {name}");
                Ok(Shard { tests, args })
            })
            .collect()
    } else {
        Ok(holding(tests, args)?
            .into_iter()
            .map(|t| Shard {
                tests: vec![t],
                args: args.to_vec(),
            })
            .collect())
    }
}

/// The test binaries that `args` select at least one test of (as `--list` says): an L1 boot
/// costs seconds under TCG, so none is spent on a binary that would run nothing.
fn holding(tests: &[(String, PathBuf)], args: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut kept = Vec::new();
    for (name, path) in tests {
        let out = Command::new(path)
            .args(["--list", "--format", "terse"])
            .args(args)
            .output()
            .with_context(|| format!("Cannot list the tests of {}", path.display()))?;
        ensure!(out.status.success(), "{} --list failed", path.display());
        if String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.ends_with(": test"))
        {
            kept.push((name.clone(), path.clone()));
        }
    }
    Ok(kept)
}

/// Tries per shard: a hung L1 (the emulated SVM's fault, not a test's) is run again, loudly.
const ATTEMPTS: u32 = 3;

/// Builds the L1 image, boots it and reports; fails unless L1 said KVM and all passed.
pub fn run_nested(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    let dir = root.join("target/kvm-host");
    std::fs::create_dir_all(&dir)?;
    let guest = guest::build(true)?;
    // L1 stays on the 6.1 kernel its KVM setup was measured with (uncompressed modules).
    let kernel = guest::kernel_tree(guest::GuestKernel::V6_1)?;
    let backend = tools::ensure_vhost_device_vsock()?;
    let pkgs = packages::ensure(&dir)?;
    eprintln!("kvm-host: outer QEMU and VMM in L1: {}", pkgs.qemu_version);

    let tests = if opts.mode == Mode::Test {
        build_tests()?
    } else {
        Vec::new()
    };
    // The bench times the CLI as users run it: release.
    let cli = build_cli(opts.mode.is_bench())?;
    let shim = match opts.mode {
        Mode::BenchCtr => crate::bench_ctr::shim_bin()?,
        _ => build_shim()?,
    };
    // The container scenarios' image, built here: L1 has no apt.
    let oci_image = vmfactory_e2e::oci::ensure_image(&vmfactory_e2e::oci::cache_dir(), true)?;
    let runner = std::env::current_exe().context("Cannot find the xtask binary")?;

    let mut img = image::Image::default();
    img.base(&pkgs.root.join("bin/busybox"), &kernel)?;
    img.program_at(Path::new("/usr/bin/qemu-system-x86_64"), &pkgs.qemu())?;
    for share in ["qemu", "seabios"] {
        let rel = Path::new("usr/share").join(share);
        img.tree(&Path::new("/").join(&rel), &pkgs.root.join(&rel))?;
    }
    for (_, path) in &tests {
        img.program(path)?;
    }
    img.program(&cli)?;
    img.program(&shim)?;
    img.program(&runner)?;
    // The container scenarios: containerd and ctr, mkfs.erofs for the rootfs images,
    // `script` for a terminal on ctr's side, and runc with its shim (the harness's and the
    // bench's baseline runtime).
    for tool in [
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/ctr",
        "/usr/bin/mkfs.erofs",
        "/usr/bin/script",
        "/usr/sbin/runc",
    ] {
        img.program(Path::new(tool))?;
    }
    img.file(&oci_image, &oci_image, false);
    // The disk scenarios make and read ext4 images on the host (L1).
    img.program_at(
        Path::new("/usr/sbin/mkfs.ext4"),
        Path::new("/usr/sbin/mke2fs"),
    )?;
    img.program(Path::new("/usr/sbin/debugfs"))?;
    // VM networks: their rules go through `nft` (the host's, installed with QEMU's tools).
    img.program(Path::new("/usr/sbin/nft"))?;
    img.file(
        Path::new("/etc/mke2fs.conf"),
        Path::new("/etc/mke2fs.conf"),
        false,
    );
    img.program(&backend)?;
    img.file(&guest.kernel, &guest.kernel, false);
    img.file(&guest.initrd, &guest.initrd, false);
    // What the guest image is (its kernel's release: the container scenarios compare it).
    let manifest_json = guest::guest_dir().join("manifest.json");
    img.file(&manifest_json, &manifest_json, false);
    let hosts = if opts.mode.is_bench() {
        1
    } else {
        opts.hosts.max(1)
    };
    let manifest = Manifest {
        mode: opts.mode,
        shards: if opts.mode.is_bench() {
            vec![Shard::default()]
        } else {
            shards(&tests, &opts.args, opts.all)?
        },
        env: vec![
            ("CI".into(), "true".into()),
            ("VMFACTORY_E2E_REQUIRE".into(), "1".into()),
            ("VMFACTORY_E2E_REQUIRE_VSOCK".into(), "1".into()),
            ("VMFACTORY_E2E_REQUIRE_VHOST_NET".into(), "1".into()),
            // Measured: L2 boots and QEMU starts take 5-10x a TCG host's time in L1.
            ("VMFACTORY_E2E_TIME_SCALE".into(), TIME_SCALE.to_string()),
            // The stress test's rounds are a parameter; a few exercise the KVM path.
            ("VMFACTORY_STRESS_ROUNDS".into(), "4".into()),
            ("VMFACTORY_GUEST_DIR".into(), path_str(&guest::guest_dir())?),
            ("VMFACTORY_VHOST_DEVICE_VSOCK".into(), path_str(&backend)?),
            ("VMFACTORY_BIN".into(), path_str(&cli)?),
            ("VMFACTORY_SHIM_BIN".into(), path_str(&shim)?),
            (vmfactory_e2e::oci::IMAGE_ENV.into(), path_str(&oci_image)?),
            (
                vmfactory_e2e::CPU_MODEL_ENV.into(),
                opts.l2_cpu.clone().unwrap_or_default(),
            ),
        ],
        kernel: guest.kernel.clone(),
        initrd: guest.initrd.clone(),
    };
    img.bytes(
        Path::new("/kvm-host/manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
        false,
    );
    img.bytes(
        Path::new("/kvm-host/runner"),
        path_str(&runner)?.into_bytes(),
        false,
    );
    // Per run: two runs in one tree (tests and bench) must not boot each other's image.
    let run_dir = dir.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let initrd = run_dir.join("l1.cpio");
    let size = img.write(&initrd, &run_dir.join("stage"))?;
    eprintln!(
        "kvm-host: L1 image {} MiB, built in {:.1} s",
        size >> 20,
        started.elapsed().as_secs_f64()
    );
    let count = manifest.shards.len();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..hosts.min(count as u32) {
            let (pkgs, kernel, initrd, dir) = (&pkgs, &guest.kernel, &initrd, &run_dir);
            let (next, results) = (&next, &results);
            s.spawn(move || loop {
                let shard = next.fetch_add(1, Ordering::SeqCst);
                if shard >= count {
                    return;
                }
                let r = run_shard(opts, pkgs, kernel, initrd, dir, shard);
                if let Ok(mut all) = results.lock() {
                    all.push(r);
                }
            });
        }
    });
    let reports = results.into_inner().unwrap_or_default();
    // The consoles stay for a look after a failure; the image (~250 MiB) goes.
    let _ = std::fs::remove_file(&initrd);
    let (mut passed, mut failed, mut errors) = (0, 0, Vec::new());
    for r in reports {
        match r {
            Ok(r) => {
                passed += r.passed;
                failed += r.failed;
                errors.extend(r.problem);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    println!(
        "kvm-host: {passed} passed, {failed} failed in {count} L1 VM(s), {hosts} at a time, in \
         {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// The e2e test binaries, built now: (target name, executable).
fn build_tests() -> Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["test", "-p", "vmfactory-e2e", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("Cannot run cargo test --no-run")?;
    ensure!(out.status.success(), "Building the e2e tests failed");
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        tests.push((name.to_owned(), PathBuf::from(exe)));
    }
    ensure!(!tests.is_empty(), "cargo built no e2e test binary");
    tests.sort();
    Ok(tests)
}

fn build_cli(release: bool) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-q", "-p", "vmfactory"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let profile = if release { "release" } else { "debug" };
    Ok(workspace_root()
        .join("target")
        .join(profile)
        .join("vmfactory"))
}

/// The containerd shim (debug: what the e2e tests on this machine run).
fn build_shim() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo).current_dir(workspace_root()).args([
        "build",
        "-q",
        "-p",
        "vmfactory-shim",
    ]))?;
    Ok(workspace_root()
        .join("target/debug")
        .join(vmfactory_e2e::containerd::SHIM_BINARY))
}

/// Runs `shard` in an L1 of its own, again after a hang, up to [`ATTEMPTS`] times.
fn run_shard(
    opts: &Options,
    pkgs: &packages::Unpacked,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    shard: usize,
) -> Result<Report> {
    let tag = format!("[L1 #{shard}] ");
    for attempt in 1..=ATTEMPTS {
        let log = dir.join(format!("console-{shard}-{attempt}.log"));
        let report = boot(opts, pkgs, kernel, initrd, shard, &tag, &log)?;
        if !report.hung {
            return Ok(report);
        }
        println!("{tag}kvm-host: L1 #{shard} hung (attempt {attempt} of {ATTEMPTS})");
    }
    bail!(
        "L1 #{shard} hung {ATTEMPTS} times; consoles in {}",
        dir.display()
    )
}

/// Boots L1 number `shard` and follows its console until it powers off; the verdict comes
/// from its report.
fn boot(
    opts: &Options,
    pkgs: &packages::Unpacked,
    kernel: &Path,
    initrd: &Path,
    shard: usize,
    tag: &str,
    log: &Path,
) -> Result<Report> {
    let share = pkgs.root.join("usr/share");
    let mut cmd = Command::new(pkgs.qemu());
    cmd.arg("-L")
        .arg(share.join("qemu"))
        .arg("-L")
        .arg(share.join("seabios"))
        .args(["-M", "q35", "-accel", "tcg", "-cpu", L1_CPU])
        .args(["-smp", &opts.vcpus.to_string()])
        .args(["-m", &format!("{}M", opts.memory_mib)])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 rdinit=/init kvmhost.shard={shard}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("Cannot start the L1 QEMU")?;
    let done = Arc::new(AtomicBool::new(false));
    let last_line_ms = Arc::new(AtomicU64::new(0));
    let pid = child.id();
    let watchdog = {
        let (done, last_line_ms) = (Arc::clone(&done), Arc::clone(&last_line_ms));
        let timeout = opts.timeout;
        std::thread::spawn(move || {
            let stop = loop {
                if done.load(Ordering::SeqCst) {
                    return Stop::Exited;
                }
                let quiet = started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last_line_ms.load(Ordering::SeqCst)));
                if started.elapsed() > timeout {
                    break Stop::TimedOut;
                }
                if quiet > HANG_AFTER {
                    break Stop::Hung;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            stop
        })
    };
    let mut log_file = std::fs::File::create(log)?;
    let mut report = Report::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).split(b'\n') {
            let line = String::from_utf8_lossy(&line?).trim_end().to_string();
            let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            last_line_ms.store(ms, Ordering::SeqCst);
            writeln!(log_file, "{line}")?;
            match line.find(MARK) {
                Some(at) => {
                    let text = &line[at + MARK.len()..];
                    if text != BEAT {
                        report.note(text, started.elapsed());
                        println!("{tag}{text}");
                    }
                }
                None => eprintln!("{tag}{line}"),
            }
        }
    }
    let status = child.wait()?;
    done.store(true, Ordering::SeqCst);
    let stop = watchdog.join().unwrap_or(Stop::Exited);
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{tag}kvm-host: L1 ran {wall:.0} s; accelerator {}; {} passed, {} failed",
        report.accel.as_deref().unwrap_or("unknown"),
        report.passed,
        report.failed
    );
    if stop == Stop::Hung {
        println!(
            "{tag}kvm-host: L1-{shard} HUNG: no console line for {} s (its runner prints one \
             every {} s); killed. This is the emulated SVM's hang (docs/kvm-host.md), not a \
             test failing; console in {}",
            HANG_AFTER.as_secs(),
            BEAT_EVERY.as_secs(),
            log.display()
        );
        report.hung = true;
        return Ok(report);
    }
    if stop == Stop::TimedOut {
        bail!(
            "The nested run passed its bound of {} s; console in {}",
            opts.timeout.as_secs(),
            log.display()
        );
    }
    report.problem = if report.accel.as_deref() != Some("kvm") {
        Some(format!(
            "L1 #{shard} did not resolve the accelerator to KVM (QEMU {status}); console in {}",
            log.display()
        ))
    } else {
        match report.exit {
            Some(0) => None,
            Some(code) => Some(format!(
                "L1 #{shard} failed (runner exit {code}); console in {}",
                log.display()
            )),
            None => Some(format!(
                "L1 #{shard} stopped without a verdict (QEMU {status}); console in {}",
                log.display()
            )),
        }
    };
    Ok(report)
}

/// What L1's report said so far.
#[derive(Debug, Default)]
struct Report {
    /// L1 stopped printing and was killed (see [`HANG_AFTER`]).
    hung: bool,
    /// Why this L1 fails the run, if it does: not KVM, a failed test, no verdict.
    problem: Option<String>,
    accel: Option<String>,
    passed: usize,
    failed: usize,
    exit: Option<i32>,
}

impl Report {
    fn note(&mut self, text: &str, _at: Duration) {
        if let Some(rest) = text.strip_prefix("accelerator: ") {
            self.accel = rest.split_whitespace().next().map(str::to_owned);
        } else if text.starts_with("ok ") {
            self.passed += 1;
        } else if text.starts_with("FAIL ") {
            self.failed += 1;
        } else if let Some(code) = text.strip_prefix("exit ") {
            self.exit = code.trim().parse().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines() {
        let mut r = Report::default();
        for line in [
            "accelerator: kvm (probe boot 3.1 s)",
            "ok    vm::boots",
            "FAIL  vm::clones",
            "ok    x",
            "exit 1",
        ] {
            r.note(line, Duration::ZERO);
        }
        assert_eq!(r.accel.as_deref(), Some("kvm"));
        assert_eq!((r.passed, r.failed, r.exit), (2, 1, Some(1)));
    }
}
