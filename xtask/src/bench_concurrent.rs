//! The concurrency rows of `cargo xtask bench`: [`CONCURRENT`] `get_vm` calls at once on a
//! template factory against as many on a direct factory (cold boots) in the same run, and where
//! the time goes when that many clones start at once on this machine's cores.
//!
//! Where the time goes is read from the kernel, not guessed: each QEMU's CPU time and the time
//! its threads waited runnable for a core (`/proc/PID/task/*/schedstat`: on-CPU ns, run-queue
//! ns), this process's CPU time (`/proc/self/stat`: the host side, i.e. factory, QMP and agent
//! clients), against the CPU there was (cores × wall time). For the clones, each VM's phases
//! are timed too: QEMU up with the template loaded, resumed, agent answering.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use vmfactory_e2e::vm::{self, TestVm};
use vmfactory_factory::Factory;
use vmfactory_hypervisor::{Hypervisor, HypervisorConfig};
use vmfactory_vm::VmConfig;

/// VMs asked for at once.
pub const CONCURRENT: usize = 8;

/// CPU use of a set of processes over one burst, in ms.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CpuUse {
    /// Wall time of the burst.
    pub wall_ms: f64,
    /// Cores × wall time: the CPU time there was.
    pub capacity_ms: f64,
    /// CPU time of the VMs' QEMUs (their live threads; a thread that exited is not counted).
    pub qemu_cpu_ms: f64,
    /// Time the QEMUs' threads were runnable but waited for a core.
    pub qemu_runqueue_ms: f64,
    /// CPU time of this process: the host side (factory, QMP, agent clients).
    pub host_cpu_ms: f64,
    /// CPU time the whole machine used (`/proc/stat`: all but idle, iowait and steal): the
    /// rest of it went to other processes (this machine is shared).
    pub machine_busy_ms: f64,
    /// Time the hypervisor under this machine ran others on its cores (`steal`).
    pub steal_ms: f64,
}

/// One burst of [`CONCURRENT`] VMs.
#[derive(Debug, Serialize)]
pub struct Burst {
    /// When each VM was ready, ms after the burst started, sorted.
    pub ready_ms: Vec<f64>,
    /// Where the time went.
    pub cpu: CpuUse,
}

/// Phases of one clone started with others, ms after the burst started.
#[derive(Debug, Clone, Serialize)]
pub struct ClonePhases {
    /// QEMU up and the template's state loaded (paused).
    pub loaded_ms: f64,
    /// Resumed.
    pub resumed_ms: f64,
    /// Agent answering `Check`.
    pub ready_ms: f64,
    /// Its QEMU's CPU time when loaded.
    pub cpu_loaded_ms: f64,
    /// Its QEMU's CPU time when its agent answered.
    pub cpu_ready_ms: f64,
}

/// On-CPU and run-queue time of every live thread of `pid`, in ns.
fn schedstat(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| parse_schedstat(&s))
        .fold((0, 0), |(r, w), (run, wait)| (r + run, w + wait))
}

/// `run_ns wait_ns timeslices` → `(run_ns, wait_ns)`.
fn parse_schedstat(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

/// Busy and steal time of the whole machine so far (`/proc/stat`'s `cpu` line), in ms.
fn machine_cpu_ms() -> (f64, f64) {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().and_then(parse_cpu_line))
        .map_or((0.0, 0.0), |(busy, steal)| {
            let ms = 1000.0 / clock_ticks_per_s();
            (busy as f64 * ms, steal as f64 * ms)
        })
}

/// `cpu user nice system idle iowait irq softirq steal …` (ticks) → `(busy, steal)`, where
/// busy is user + nice + system + irq + softirq.
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut f = line.strip_prefix("cpu ")?.split_whitespace();
    let mut v = [0u64; 8];
    for slot in &mut v {
        *slot = f.next()?.parse().ok()?;
    }
    Some((v[0] + v[1] + v[2] + v[5] + v[6], v[7]))
}

fn clock_ticks_per_s() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100)
        .max(1) as f64
}

/// This process's user + system CPU time (all threads, live or not), in ms.
fn own_cpu_ms() -> f64 {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_cpu_ticks(&s))
        .unwrap_or(0);
    ticks as f64 * 1000.0 / clock_ticks_per_s()
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces; the fields after it start past its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Where a burst starts: the time, and the CPU this process and the machine had used.
struct Start {
    t0: Instant,
    host_ms: f64,
    machine: (f64, f64),
}

impl Start {
    fn now() -> Self {
        Self {
            t0: Instant::now(),
            host_ms: own_cpu_ms(),
            machine: machine_cpu_ms(),
        }
    }
}

/// What the QEMUs `pids` (all their CPU, since they started within the burst), this process
/// and the machine used since `start`.
fn cpu_use(pids: &[u32], start: &Start) -> CpuUse {
    let wall_ms = start.t0.elapsed().as_secs_f64() * 1000.0;
    let (busy, steal) = machine_cpu_ms();
    let (run, wait) = pids
        .iter()
        .map(|&p| schedstat(p))
        .fold((0, 0), |(r, w), (a, b)| (r + a, w + b));
    CpuUse {
        wall_ms,
        capacity_ms: wall_ms * cores(),
        qemu_cpu_ms: run as f64 / 1e6,
        qemu_runqueue_ms: wait as f64 / 1e6,
        host_cpu_ms: own_cpu_ms() - start.host_ms,
        machine_busy_ms: busy - start.machine.0,
        steal_ms: steal - start.machine.1,
    }
}

/// [`CONCURRENT`] `get_vm` calls at once on `factory`: when each returned a ready VM, and the
/// CPU their QEMUs and this process used until the last one did.
pub async fn get_vm_burst(factory: &Factory, cfg: &VmConfig) -> Result<Burst> {
    let start = Start::now();
    let t0 = start.t0;
    let results = futures::future::join_all((0..CONCURRENT).map(|_| async {
        let vm = factory.get_vm(cfg).await;
        (vm, t0.elapsed())
    }))
    .await;
    let pids: Vec<u32> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().ok())
        .filter_map(|vm| vm.hypervisor().pid())
        .collect();
    let cpu = cpu_use(&pids, &start);
    let mut ready = Vec::new();
    let mut first_err = None;
    for (r, t) in results {
        match r {
            Ok(vm) => {
                ready.push(ms(t));
                vm.stop().await?;
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e.into());
    }
    ready.sort_by(f64::total_cmp);
    Ok(Burst {
        ready_ms: ready,
        cpu,
    })
}

/// [`CONCURRENT`] clones of the template `tpl` started at once through the hypervisor API,
/// each timed by phase.
pub async fn clone_burst(
    root: &Path,
    tpl: &HypervisorConfig,
) -> Result<(Vec<ClonePhases>, CpuUse)> {
    let start = Start::now();
    let t0 = start.t0;
    let results = futures::future::join_all((0..CONCURRENT).map(|i| async move {
        let vm = TestVm::start(root, &format!("burst{i}"), vm::clone_config(tpl)).await?;
        let loaded = t0.elapsed();
        let pid = vm.vm.pid().unwrap_or(0);
        let cpu_loaded = schedstat(pid).0;
        let phases = async {
            vm.vm.resume().await?;
            let resumed = t0.elapsed();
            vm.wait_ready().await?;
            anyhow::Ok(ClonePhases {
                loaded_ms: ms(loaded),
                resumed_ms: ms(resumed),
                ready_ms: ms(t0.elapsed()),
                cpu_loaded_ms: cpu_loaded as f64 / 1e6,
                cpu_ready_ms: schedstat(pid).0 as f64 / 1e6,
            })
        }
        .await;
        anyhow::Ok((vm, phases))
    }))
    .await;
    let pids: Vec<u32> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter_map(|(vm, _)| vm.vm.pid())
        .collect();
    let cpu = cpu_use(&pids, &start);
    let mut phases = Vec::new();
    let mut first_err = None;
    for r in results {
        match r {
            Ok((vm, p)) => {
                vm.stop().await?;
                match p {
                    Ok(p) => phases.push(p),
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    if let Some(e) = first_err {
        return Err(e).context("A clone of the burst failed");
    }
    phases.sort_by(|a, b| a.ready_ms.total_cmp(&b.ready_ms));
    Ok((phases, cpu))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `cargo xtask bench --concurrency` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Each round's template `get_vm` burst, then its direct one.
    pub template: Vec<Burst>,
    pub direct: Vec<Burst>,
    /// Median template burst ÷ median direct burst.
    pub concurrent_ratio: f64,
    /// Raw clones at once, by phase, and their CPU.
    pub clones: Vec<ClonePhases>,
    pub clones_cpu: CpuUse,
}

/// Only the concurrency rows: raw clones at once by phase, then `rounds` rounds of a template
/// and a direct `get_vm` burst.
pub async fn run(rounds: usize) -> Result<Report> {
    let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
    let root = tempfile::Builder::new()
        .prefix("vmf-burst-")
        .tempdir_in("/dev/shm")?;
    let tpl_dir = root.path().join("tpl");
    std::fs::create_dir_all(&tpl_dir)?;
    let tpl = vm::template_config(vm::config(&env), &tpl_dir);
    vm::make_template(root.path(), tpl.clone()).await?;
    eprintln!("bench: {CONCURRENT} clones at once, by phase ...");
    let (clones, clones_cpu) = clone_burst(root.path(), &tpl).await?;
    let direct_cfg = crate::bench_factory::factory_config(&env, &root.path().join("d"), false, 0);
    let template_cfg = crate::bench_factory::factory_config(&env, &root.path().join("t"), true, 0);
    let direct = Factory::new(&direct_cfg).await?;
    let template = Factory::new(&template_cfg).await?;
    let bursts = async {
        let (mut t, mut d) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            eprintln!(
                "bench: {CONCURRENT} get_vm at once, template then direct, round {}/{rounds} ...",
                i + 1
            );
            t.push(get_vm_burst(&template, &template_cfg.vm).await?);
            d.push(get_vm_burst(&direct, &direct_cfg.vm).await?);
        }
        anyhow::Ok((t, d))
    }
    .await;
    for f in [&direct, &template] {
        f.close().await?;
    }
    let (template, direct) = bursts?;
    let wall = |b: &[Burst]| crate::stat::median(b.iter().map(|b| b.cpu.wall_ms).collect());
    Ok(Report {
        concurrent_ratio: wall(&template) / wall(&direct),
        template,
        direct,
        clones,
        clones_cpu,
    })
}

/// Prints the `--concurrency` report and writes `target/bench/concurrency.json`.
pub fn report(r: &Report) -> Result<std::path::PathBuf> {
    for (name, bursts) in [("template", &r.template), ("direct", &r.direct)] {
        for b in bursts.iter() {
            print_cpu(&format!("{CONCURRENT} get_vm at once, {name}"), &b.cpu);
        }
    }
    println!(
        "{:<40} {:>12.3}   (target <= 0.06)",
        "concurrent_ratio", r.concurrent_ratio
    );
    crate::bench::print_clone_burst(&r.clones, &r.clones_cpu);
    let dir = crate::util::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("concurrency.json");
    std::fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    println!("json: {}", path.display());
    Ok(path)
}

/// Prints the CPU split of a burst.
pub fn print_cpu(name: &str, c: &CpuUse) {
    println!(
        "{:<40} {:>9.0} ms wall x {} cores = {:.0} ms CPU: QEMUs {:.0}, host side {:.0}, \
         other processes {:.0}, stolen {:.0} ms; QEMU threads waited {:.0} ms for a core",
        name,
        c.wall_ms,
        cores(),
        c.capacity_ms,
        c.qemu_cpu_ms,
        c.host_cpu_ms,
        (c.machine_busy_ms - c.qemu_cpu_ms - c.host_cpu_ms).max(0.0),
        c.steal_ms,
        c.qemu_runqueue_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_schedstat_and_stat() {
        assert_eq!(parse_schedstat("123456 7890 12\n"), Some((123_456, 7_890)));
        assert_eq!(parse_schedstat("x"), None);
        let stat = "42 (qemu system) S 1 42 42 0 -1 4194560 100 0 0 0 250 40 0 0 20 0 5 0 99";
        assert_eq!(stat_cpu_ticks(stat), Some(290));
        assert_eq!(stat_cpu_ticks("42 (x"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("stat");
        assert!(stat_cpu_ticks(&own).is_some());
        assert_eq!(
            parse_cpu_line("cpu  100 5 50 900 7 3 2 11 0 0"),
            Some((160, 11))
        );
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu  1 2"), None);
    }
}
