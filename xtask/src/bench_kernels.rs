//! `cargo xtask bench-kernels`: the guest kernels side by side (Debian's cloud 6.1 and 6.12),
//! and what VMGenID changes, in one run on this machine. Prints a table and writes
//! `target/bench/kernels.json`; docs/benchmarks.md ("VMGenID and the 6.12 kernel") has a run.
//!
//! Method: both images are built (`target/guest-kernels/{6.1,6.12}`, same agent and busybox).
//! Then `runs` rounds, each timing one of every kind in turn (interleaved, so drift in machine
//! load hits all alike): a cold boot (`get_vm` of a direct factory: boot until the agent
//! answers), and `get_vm` of a template factory on each kernel with the `vmgenid` device on
//! and off. On 6.12 with the device, clones reseed themselves and `get_vm` makes only the
//! clock call; to isolate that, each round also takes two clones of one such template through
//! `get_vm`'s steps by hand, one with the host's reseed and one without (a paired difference).
//! Last, the PSS of N idle cold VMs and N idle clones per kernel.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use vmfactory_e2e::{vm, GuestEnv};
use vmfactory_factory::Factory;
use vmfactory_vm::{Vm, VmConfig};

use crate::guest::{self, GuestKernel};
use crate::stat::Stat;
use crate::util::workspace_root;

/// The kernels compared.
const KERNELS: [GuestKernel; 2] = [GuestKernel::V6_1, GuestKernel::V6_12];

/// One kernel's image and measurements.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    kernel: String,
    kernel_release: String,
    vmlinuz_kib: u64,
    initramfs_kib: u64,
    /// `get_vm` of a direct factory: a cold boot until the agent answers.
    cold_ms: Stat,
    /// `get_vm` of a template factory, `vmgenid` on.
    clone_ms: Stat,
    /// The same with `vmgenid` off.
    clone_no_vmgenid_ms: Stat,
    /// QEMU's CPU time (all threads, since its start) when `get_vm` returned: cold boot.
    cold_cpu_ms: Stat,
    /// The same for a clone, `vmgenid` on.
    clone_cpu_ms: Stat,
    /// The same for a clone, `vmgenid` off.
    clone_no_vmgenid_cpu_ms: Stat,
    /// Whether the template said its clones reseed themselves (with `vmgenid` on).
    clones_reseed_themselves: bool,
    pss_cold_mib: f64,
    pss_clone_mib: f64,
    pss_n: usize,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    accel: String,
    runs: usize,
    kernels: Vec<KernelReport>,
    /// 6.12, `vmgenid` on: a clone resumed, clock set, size checked (what `get_vm` does).
    manual_skip_ms: Stat,
    /// The same plus the host's reseed beside the clock call (what `get_vm` did before).
    manual_reseed_ms: Stat,
    /// Median over rounds of (with reseed − without), each pair from one round.
    manual_paired_saving_ms: f64,
    /// QEMU CPU time (all threads) over those steps, without the host's reseed.
    manual_skip_cpu_ms: Stat,
    /// The same with it.
    manual_reseed_cpu_ms: Stat,
    /// Median over rounds of the CPU time difference.
    manual_paired_cpu_saving_ms: f64,
}

/// A guest environment on the image of `kernel`, built (or reused) in its own directory.
fn image(kernel: GuestKernel) -> Result<(GuestEnv, guest::Manifest)> {
    let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
    let (img, dir) = guest::build_kernel_image(kernel, true)?;
    let manifest: guest::Manifest =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)?;
    Ok((
        GuestEnv {
            kernel: img.kernel,
            initrd: img.initrd,
            ..env
        },
        manifest,
    ))
}

/// The factories of one kernel.
struct Factories {
    direct: (Factory, VmConfig),
    clone: (Factory, VmConfig),
    clone_off: (Factory, VmConfig),
}

impl Factories {
    async fn new(env: &GuestEnv, root: &Path) -> Result<Self> {
        let make = |sub: &str, template: bool, vmgenid: bool| {
            let dir = root.join(sub);
            let env = env.clone();
            async move {
                std::fs::create_dir_all(&dir)?;
                let mut cfg = vm::template_factory_config(&env, &dir);
                cfg.template = template;
                cfg.vm.hypervisor.vmgenid = vmgenid;
                let f = Factory::new(&cfg).await?;
                anyhow::Ok((f, cfg.vm))
            }
        };
        Ok(Self {
            // Cold boots as configured by default: without the device.
            direct: make("d", false, false).await?,
            clone: make("t", true, true).await?,
            clone_off: make("n", true, false).await?,
        })
    }

    async fn close(&self) -> Result<()> {
        for (f, _) in [&self.direct, &self.clone, &self.clone_off] {
            f.close().await?;
        }
        Ok(())
    }
}

/// One `get_vm`: its wall time and its QEMU's CPU time so far; the VM is stopped after.
async fn timed_get_vm((f, cfg): &(Factory, VmConfig)) -> Result<Timing> {
    let t0 = Instant::now();
    let vm = f.get_vm(cfg).await?;
    let took = t0.elapsed();
    let cpu = vm
        .hypervisor()
        .pid()
        .context("VM has no pid")
        .and_then(cpu_time);
    vm.stop().await?;
    Ok((took, cpu?))
}

/// CPU time of all threads of process `pid` (`/proc/PID/task/*/schedstat`, nanoseconds).
fn cpu_time(pid: u32) -> Result<Duration> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(Duration::from_nanos(ns))
}

/// A clone of `f`'s template through `get_vm`'s steps by hand: resume, then the clock call
/// with (`reseed`) or without the host's reseed beside it, and the size check beside both.
/// Returns the wall time and the QEMU CPU time the steps took.
async fn timed_manual_clone((f, cfg): &(Factory, VmConfig), reseed: bool) -> Result<Timing> {
    let vm: Vm = f.base().get_base_vm(cfg).await?;
    let pid = vm.hypervisor().pid().context("VM has no pid")?;
    let cpu0 = cpu_time(pid)?;
    let t0 = Instant::now();
    let steps = async {
        vm.resume().await?;
        let calls = async {
            if reseed {
                tokio::try_join!(vm.reseed_rng(), vm.sync_time()).map(drop)
            } else {
                vm.sync_time().await
            }
        };
        tokio::try_join!(calls, vm.verify_size()).map(drop)
    }
    .await;
    let took = t0.elapsed();
    let cpu = cpu_time(pid)?.saturating_sub(cpu0);
    vm.stop().await?;
    steps?;
    Ok((took, cpu))
}

/// PSS per VM, in MiB, of `n` idle VMs from `f`.
async fn pss_per_vm((f, cfg): &(Factory, VmConfig), n: usize) -> Result<f64> {
    let mut vms = Vec::new();
    let measured = async {
        for _ in 0..n {
            vms.push(f.get_vm(cfg).await?);
        }
        // Let boot-time work settle before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut total = 0;
        for v in &vms {
            let pid = v.hypervisor().pid().context("VM has no pid")?;
            total += crate::bench::pss_kib(pid)?;
        }
        anyhow::Ok(total)
    }
    .await;
    for v in vms {
        v.stop().await?;
    }
    Ok(measured? as f64 / 1024.0 / n as f64)
}

fn kib(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len()
        / 1024)
}

/// Runs the comparison.
pub async fn run(runs: usize, pss_n: usize) -> Result<Report> {
    let mut envs = Vec::new();
    for k in KERNELS {
        eprintln!("bench-kernels: guest image with the {k} kernel ...");
        envs.push(image(k)?);
    }
    // The factories keep their VMs and templates under a tmpfs, as the default `/run/vc` is.
    let root = tempfile::Builder::new()
        .prefix("vmf-benchk-")
        .tempdir_in("/dev/shm")?;
    let mut factories = Vec::new();
    for (i, (env, _)) in envs.iter().enumerate() {
        eprintln!("bench-kernels: factories on {} ...", KERNELS[i]);
        factories.push(Factories::new(env, &root.path().join(KERNELS[i].as_str())).await?);
    }
    let measured = measure(&factories, runs, pss_n).await;
    for f in &factories {
        f.close().await?;
    }
    let (samples, manual_skip, manual_reseed, pss) = measured?;
    let paired = |pick: fn(&Timing) -> Duration| {
        let diffs = manual_reseed
            .iter()
            .zip(&manual_skip)
            .map(|(r, s)| (pick(r).as_secs_f64() - pick(s).as_secs_f64()) * 1000.0)
            .collect();
        median(diffs)
    };
    let stat = |v: &[Timing], pick: fn(&Timing) -> Duration| {
        Stat::of(&v.iter().map(pick).collect::<Vec<_>>())
    };
    let mut kernels = Vec::new();
    for (i, (env, manifest)) in envs.iter().enumerate() {
        let [cold, clone, off] = &samples[i];
        kernels.push(KernelReport {
            cold_cpu_ms: stat(cold, cpu),
            clone_cpu_ms: stat(clone, cpu),
            clone_no_vmgenid_cpu_ms: stat(off, cpu),
            kernel: KERNELS[i].to_string(),
            kernel_release: manifest.kernel_release.clone(),
            vmlinuz_kib: kib(&env.kernel)?,
            initramfs_kib: kib(&env.initrd)?,
            cold_ms: stat(cold, wall),
            clone_ms: stat(clone, wall),
            clone_no_vmgenid_ms: stat(off, wall),
            clones_reseed_themselves: factories[i].clone.0.base().clones_reseed_themselves(),
            pss_cold_mib: pss[i].0,
            pss_clone_mib: pss[i].1,
            pss_n,
        });
    }
    let accel = vmfactory_hypervisor::resolve_accel(&vm::config(&envs[0].0))
        .await
        .as_str()
        .to_string();
    Ok(Report {
        accel,
        runs,
        kernels,
        manual_skip_ms: stat(&manual_skip, wall),
        manual_reseed_ms: stat(&manual_reseed, wall),
        manual_paired_saving_ms: paired(wall),
        manual_skip_cpu_ms: stat(&manual_skip, cpu),
        manual_reseed_cpu_ms: stat(&manual_reseed, cpu),
        manual_paired_cpu_saving_ms: paired(cpu),
    })
}

/// (wall, QEMU CPU) of one VM.
type Timing = (Duration, Duration);
/// Per kernel: cold, clone, clone without vmgenid.
type Samples = Vec<[Vec<Timing>; 3]>;
/// The by-hand clones.
type Manual = Vec<Timing>;

async fn measure(
    factories: &[Factories],
    runs: usize,
    pss_n: usize,
) -> Result<(Samples, Manual, Manual, Vec<(f64, f64)>)> {
    let mut samples: Samples = factories.iter().map(|_| Default::default()).collect();
    let (mut skip, mut reseed) = (Vec::new(), Vec::new());
    let with_vmgenid = factories.last().context("no kernels")?;
    for round in 0..runs {
        eprintln!("bench-kernels: round {}/{runs} ...", round + 1);
        for (i, f) in factories.iter().enumerate() {
            samples[i][0].push(timed_get_vm(&f.direct).await?);
            samples[i][1].push(timed_get_vm(&f.clone).await?);
            samples[i][2].push(timed_get_vm(&f.clone_off).await?);
        }
        // Alternate which goes first, so neither always follows the other.
        if round % 2 == 0 {
            skip.push(timed_manual_clone(&with_vmgenid.clone, false).await?);
            reseed.push(timed_manual_clone(&with_vmgenid.clone, true).await?);
        } else {
            reseed.push(timed_manual_clone(&with_vmgenid.clone, true).await?);
            skip.push(timed_manual_clone(&with_vmgenid.clone, false).await?);
        }
    }
    let mut pss = Vec::new();
    for (i, f) in factories.iter().enumerate() {
        eprintln!(
            "bench-kernels: PSS of {pss_n} idle cold VMs and clones on {} ...",
            KERNELS[i]
        );
        pss.push((
            pss_per_vm(&f.direct, pss_n).await?,
            pss_per_vm(&f.clone, pss_n).await?,
        ));
    }
    Ok((samples, skip, reseed, pss))
}

/// The wall time of a [`Timing`].
fn wall(t: &Timing) -> Duration {
    t.0
}

/// The QEMU CPU time of a [`Timing`].
fn cpu(t: &Timing) -> Duration {
    t.1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Prints the table and writes the JSON; returns the JSON path.
pub fn report(r: &Report) -> Result<PathBuf> {
    println!(
        "vmfactory bench-kernels ({} accel, {} rounds, medians [min-max])",
        r.accel, r.runs
    );
    let cell = |s: &Stat| format!("{:.0} [{:.0}-{:.0}]", s.median, s.min, s.max);
    print!("{:<44}", "");
    for k in &r.kernels {
        print!(" {:>22}", k.kernel);
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&KernelReport) -> String| {
        print!("{name:<44}");
        for k in &r.kernels {
            print!(" {:>22}", f(k));
        }
        println!();
    };
    row("kernel release", &|k| k.kernel_release.clone());
    row("vmlinuz KiB", &|k| k.vmlinuz_kib.to_string());
    row("initramfs KiB", &|k| k.initramfs_kib.to_string());
    row("cold boot to agent ready, ms", &|k| cell(&k.cold_ms));
    row("  QEMU CPU by then, ms", &|k| cell(&k.cold_cpu_ms));
    row("template clone get_vm (vmgenid on), ms", &|k| {
        cell(&k.clone_ms)
    });
    row("  QEMU CPU by then, ms", &|k| cell(&k.clone_cpu_ms));
    row("template clone get_vm (vmgenid off), ms", &|k| {
        cell(&k.clone_no_vmgenid_ms)
    });
    row("  QEMU CPU by then, ms", &|k| {
        cell(&k.clone_no_vmgenid_cpu_ms)
    });
    row("clones reseed themselves", &|k| {
        k.clones_reseed_themselves.to_string()
    });
    row("PSS per idle cold VM, MiB", &|k| {
        format!("{:.1}", k.pss_cold_mib)
    });
    row("PSS per idle clone, MiB", &|k| {
        format!("{:.1}", k.pss_clone_mib)
    });
    println!(
        "6.12 clone by hand, wall: resume + clock {} ms; + host reseed {} ms; paired saving {:.1} ms",
        cell(&r.manual_skip_ms),
        cell(&r.manual_reseed_ms),
        r.manual_paired_saving_ms
    );
    println!(
        "6.12 clone by hand, QEMU CPU: without reseed {} ms; with {} ms; paired saving {:.1} ms",
        cell(&r.manual_skip_cpu_ms),
        cell(&r.manual_reseed_cpu_ms),
        r.manual_paired_cpu_saving_ms
    );
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("kernels.json");
    std::fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    println!("JSON: {}", path.display());
    Ok(path)
}
