//! `cargo xtask bench`: the speed and memory of clones against cold boots, measured side by
//! side in one run on this machine. Prints a table and writes `target/bench/bench.json`.
//!
//! Method: one template is made first. Then, `runs` times, a cold boot and a clone are timed in
//! turn (interleaved, so drift in machine load hits both alike), each until the guest agent
//! answers `Check`; medians are reported. Then [`CONCURRENT`] clones at once, by phase
//! (`bench_concurrent`). Memory: N idle direct VMs, then N idle clones, the proportional set
//! size (PSS, `/proc/PID/smaps_rollup`) of their QEMU processes and where it goes (`smaps`).
//! Then `get_vm` through the factories (`bench_factory`) and the workload rows (`bench_run`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use vmfactory_e2e::vm::{self, TestVm};
use vmfactory_hypervisor::{Hypervisor, HypervisorConfig};

use crate::bench_concurrent::{ClonePhases, CpuUse, CONCURRENT};
use crate::smaps::Breakdown;
use crate::stat::{median, Stat};
use crate::util::workspace_root;

/// Memory of N idle VMs of one kind.
#[derive(Debug, Serialize)]
pub struct Pss {
    pub n: usize,
    pub per_vm_mib: f64,
    pub total_mib: f64,
    /// Where one VM's PSS goes (the mean over the N), MiB.
    pub breakdown: Breakdown,
}

/// The JSON report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub accel: String,
    guest_memory_mib: u64,
    template_create_ms: f64,
    cold_boot_ms: Stat,
    clone_loaded_ms: Stat,
    clone_ready_ms: Stat,
    /// Clone time to ready ÷ cold boot time to ready (target ≤ 0.05).
    clone_ratio: f64,
    /// [`CONCURRENT`] clones started at once: each one's phases, sorted by ready time.
    clone_burst: Vec<ClonePhases>,
    /// …and where their time went.
    clone_burst_cpu: CpuUse,
    pss_direct: Vec<Pss>,
    pss_clone: Vec<Pss>,
    /// PSS per clone ÷ PSS per direct VM, at the first N (target ≤ 0.07).
    clone_pss_ratio: f64,
    /// Resident size of the template's memory file on its tmpfs: paid once for all clones.
    template_resident_mib: f64,
    /// `get_vm` through the factories.
    #[serde(flatten)]
    factory: crate::bench_factory::FactoryReport,
    /// `vmfactory run`, exec latency, stdout throughput.
    #[serde(flatten)]
    workload: crate::bench_run::RunReport,
}

/// Runs the bench.
pub async fn run(runs: usize, pss_counts: &[usize]) -> Result<Report> {
    let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
    let root = tempfile::Builder::new()
        .prefix("vmf-bench-")
        .tempdir_in("/tmp")?;
    // The template's memory lives on a tmpfs, as the template factory puts it.
    let tpl_dir = tempfile::Builder::new()
        .prefix("vmf-bench-tpl-")
        .tempdir_in("/dev/shm")?;
    let base = vm::config(&env);
    let tpl = vm::template_config(base.clone(), tpl_dir.path());

    eprintln!("bench: making the template ...");
    let template_create = vm::make_template(root.path(), tpl.clone()).await?;

    let (mut cold, mut loaded, mut ready) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("bench: run {}/{runs}: cold boot and clone ...", i + 1);
        let (vm, t) = TestVm::boot(root.path(), &format!("cold{i}"), base.clone()).await?;
        cold.push(t);
        vm.stop().await?;
        let (vm, l, t) = vm::boot_clone(root.path(), &format!("clone{i}"), &tpl).await?;
        loaded.push(l);
        ready.push(t);
        vm.stop().await?;
    }

    eprintln!("bench: {CONCURRENT} clones at once, by phase ...");
    let (clone_burst, clone_burst_cpu) =
        crate::bench_concurrent::clone_burst(root.path(), &tpl).await?;

    let (mut pss_direct, mut pss_clone) = (Vec::new(), Vec::new());
    for &n in pss_counts {
        eprintln!("bench: PSS of {n} idle direct VMs and {n} idle clones ...");
        pss_direct.push(pss_of(root.path(), n, &base, false).await?);
        pss_clone.push(pss_of(root.path(), n, &tpl, true).await?);
    }
    let template_resident_mib = resident_mib(&tpl_dir.path().join("memory"))?;
    // The factories keep their VMs under a tmpfs run root, as the default `/run/vc` is.
    let run_root = tempfile::Builder::new()
        .prefix("vmf-bench-run-")
        .tempdir_in("/dev/shm")?;
    let factory = crate::bench_factory::run(&env, run_root.path(), runs).await?;
    let workload = crate::bench_run::run(&env, run_root.path(), runs).await?;

    let cold_boot_ms = Stat::of(&cold);
    let clone_ready_ms = Stat::of(&ready);
    let clone_ratio = clone_ready_ms.median / cold_boot_ms.median;
    let clone_pss_ratio = match (pss_clone.first(), pss_direct.first()) {
        (Some(c), Some(d)) => c.per_vm_mib / d.per_vm_mib,
        _ => f64::NAN,
    };
    let accel = vmfactory_hypervisor::resolve_accel(&base)
        .await
        .as_str()
        .to_string();
    Ok(Report {
        accel,
        guest_memory_mib: base.memory_mib,
        template_create_ms: template_create.as_secs_f64() * 1000.0,
        cold_boot_ms,
        clone_loaded_ms: Stat::of(&loaded),
        clone_ready_ms,
        clone_ratio,
        clone_burst,
        clone_burst_cpu,
        pss_direct,
        pss_clone,
        clone_pss_ratio,
        template_resident_mib,
        factory,
        workload,
    })
}

/// Boots `n` VMs (clones of `cfg` when `clone`), lets them idle, and sums their PSS.
async fn pss_of(root: &Path, n: usize, cfg: &HypervisorConfig, clone: bool) -> Result<Pss> {
    Ok(pss_timed(root, n, cfg, clone).await?.0)
}

/// [`pss_of`], and the time each VM took to be ready (booted one after the other).
pub async fn pss_timed(
    root: &Path,
    n: usize,
    cfg: &HypervisorConfig,
    clone: bool,
) -> Result<(Pss, Vec<Duration>)> {
    let (mut vms, mut times) = (Vec::new(), Vec::new());
    let booted = async {
        for i in 0..n {
            let id = format!("{}{i}", if clone { "pss-clone" } else { "pss-direct" });
            let (vm, ready) = if clone {
                let (vm, _, ready) = vm::boot_clone(root, &id, cfg).await?;
                (vm, ready)
            } else {
                TestVm::boot(root, &id, cfg.clone()).await?
            };
            vms.push(vm);
            times.push(ready);
        }
        // Let boot-time work settle before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut total_kib = 0;
        let mut parts = Vec::new();
        for vm in &vms {
            let pid = vm.vm.pid().context("VM has no pid")?;
            total_kib += pss_kib(pid)?;
            parts.push(Breakdown::of_pid(pid, cfg.memory_mib)?);
        }
        anyhow::Ok((total_kib, parts))
    }
    .await;
    for vm in vms {
        vm.stop().await?;
    }
    let (total_kib, parts) = booted?;
    let total_mib = total_kib as f64 / 1024.0;
    let pss = Pss {
        n,
        per_vm_mib: total_mib / n as f64,
        total_mib,
        breakdown: Breakdown::mean(&parts),
    };
    Ok((pss, times))
}

/// `Pss:` of `/proc/PID/smaps_rollup`, in KiB.
pub fn pss_kib(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("No Pss in smaps_rollup")
}

/// Blocks actually stored for a file (its resident size on tmpfs).
fn resident_mib(path: &Path) -> Result<f64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    Ok(meta.blocks() as f64 * 512.0 / (1024.0 * 1024.0))
}

/// Prints the table and writes the JSON; returns the JSON path.
pub fn report(r: &Report) -> Result<std::path::PathBuf> {
    println!(
        "vmfactory bench ({} accel, {} MiB guests)",
        r.accel, r.guest_memory_mib
    );
    println!(
        "{:<40} {:>12} {:>10} {:>10}",
        "metric", "median", "min", "max"
    );
    let row = crate::stat::print_row;
    row(
        &format!("cold boot to agent Check (n={})", r.cold_boot_ms.runs),
        &r.cold_boot_ms,
    );
    row("clone: QEMU up + template loaded", &r.clone_loaded_ms);
    row(
        &format!("clone to agent Check (n={})", r.clone_ready_ms.runs),
        &r.clone_ready_ms,
    );
    println!(
        "{:<40} {:>9.1} ms",
        "template creation", r.template_create_ms
    );
    for (d, c) in r.pss_direct.iter().zip(&r.pss_clone) {
        println!(
            "{:<40} {:>9.1} MiB",
            format!("PSS per idle direct VM (N={})", d.n),
            d.per_vm_mib
        );
        println!(
            "{:<40} {:>9.1} MiB",
            format!("PSS per idle clone (N={})", c.n),
            c.per_vm_mib
        );
    }
    println!(
        "{:<40} {:>9.1} MiB",
        "template memory file on tmpfs (once)", r.template_resident_mib
    );
    if let (Some(d), Some(c)) = (r.pss_direct.first(), r.pss_clone.first()) {
        print_breakdowns(
            &format!("PSS per VM by part (N={}), MiB", d.n),
            &[("direct", &d.breakdown), ("clone", &c.breakdown)],
        );
    }
    let f = &r.factory;
    let n = f.get_vm_direct_ms.runs;
    row(
        &format!("get_vm, direct factory (n={n})"),
        &f.get_vm_direct_ms,
    );
    row(
        &format!("get_vm, template factory (n={n})"),
        &f.get_vm_template_ms,
    );
    row(
        &format!("get_vm, template, no pre-start (n={n})"),
        &f.get_vm_template_no_prestart_ms,
    );
    row(&format!("get_vm, cache hit (n={n})"), &f.cache_hit_ms);
    println!(
        "{:<40} {:>9.1} MiB",
        "PSS of a pre-started QEMU (idle)", f.prestarted_pss_mib
    );
    println!(
        "{:<40} {:>9.1} ms   ({:.1} VMs/s)",
        format!("{} concurrent get_vm, template", f.concurrent_get_vm),
        f.concurrent_get_vm_ms,
        f.concurrent_get_vm_per_s
    );
    println!(
        "{:<40} {:>9.1} ms",
        format!("{} concurrent get_vm, direct", f.concurrent_get_vm),
        f.concurrent_cold_ms
    );
    for (name, bursts) in [
        ("  template burst", &f.concurrent_template),
        ("  direct burst", &f.concurrent_cold),
    ] {
        // The round whose wall time is the median.
        let mut sorted: Vec<_> = bursts.iter().collect();
        sorted.sort_by(|a, b| a.cpu.wall_ms.total_cmp(&b.cpu.wall_ms));
        if let Some(b) = sorted.get(sorted.len() / 2) {
            crate::bench_concurrent::print_cpu(name, &b.cpu);
        }
    }
    print_clone_burst(&r.clone_burst, &r.clone_burst_cpu);
    println!(
        "{:<40} {:>12.3}   (target <= 0.05)",
        "clone_ratio", r.clone_ratio
    );
    println!(
        "{:<40} {:>12.3}   (target <= 0.07)",
        "clone_pss_ratio", r.clone_pss_ratio
    );
    println!(
        "{:<40} {:>12.3}   (target <= 0.025)",
        "get_vm_template_ratio", f.get_vm_template_ratio
    );
    println!(
        "{:<40} {:>12.3}   (target <= 0.06)",
        "concurrent_ratio", f.concurrent_ratio
    );
    println!(
        "{:<40} {:>12.4}   (target <= 0.005, hit <= 5 ms)",
        "cache_hit_ratio", f.cache_hit_ratio
    );
    crate::bench_run::report(&r.workload);
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    println!("json: {}", path.display());
    Ok(path)
}

/// A table of breakdowns side by side: one row per part, one column per `(name, breakdown)`.
pub fn print_breakdowns(title: &str, columns: &[(&str, &Breakdown)]) {
    print!("{title:<40}");
    for (name, _) in columns {
        print!(" {name:>10}");
    }
    println!();
    let rows: Vec<_> = columns.iter().map(|(_, b)| b.rows()).collect();
    for i in 0..rows.first().map_or(0, |r| r.len()) {
        print!("  {:<38}", rows[0][i].0);
        for r in &rows {
            print!(" {:>10.1}", r[i].1);
        }
        println!();
    }
}

/// The phases of the clones started at once: median and slowest, and where the time went.
pub fn print_clone_burst(phases: &[ClonePhases], cpu: &CpuUse) {
    let col = |f: fn(&ClonePhases) -> f64| {
        let v: Vec<f64> = phases.iter().map(f).collect();
        (median(v.clone()), v.into_iter().fold(0.0, f64::max))
    };
    for (name, (med, max)) in [
        ("QEMU up, template loaded", col(|p| p.loaded_ms)),
        ("resumed", col(|p| p.resumed_ms)),
        ("agent answers Check", col(|p| p.ready_ms)),
        ("its QEMU's CPU when loaded", col(|p| p.cpu_loaded_ms)),
        ("its QEMU's CPU when ready", col(|p| p.cpu_ready_ms)),
    ] {
        println!(
            "{:<40} {:>9.1} ms (median), {:.1} ms (last)",
            format!("{CONCURRENT} raw clones at once: {name}"),
            med,
            max
        );
    }
    crate::bench_concurrent::print_cpu("  raw clone burst", cpu);
}
