//! The factory half of `cargo xtask bench`: `get_vm` from a direct factory, from a template
//! factory and from a cache over a template, each to a VM whose agent answers, side by side;
//! then [`CONCURRENT`] at once from the template and from the direct factory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use vmfactory_e2e::{vm, GuestEnv};
use vmfactory_factory::{Factory, FactoryConfig};
use vmfactory_vm::VmConfig;

use crate::bench_concurrent::{get_vm_burst, Burst, CONCURRENT};
use crate::stat::Stat;

/// Rounds of the concurrent bursts (each a template burst, then a direct one).
const BURST_ROUNDS: usize = 3;

/// `get_vm` timings.
#[derive(Debug, Serialize)]
pub struct FactoryReport {
    /// `get_vm` from a direct factory (a cold boot).
    pub get_vm_direct_ms: Stat,
    /// `get_vm` from a template factory (clone, resume, reseed, clock, agent answering), with
    /// the default pre-started QEMU waiting.
    pub get_vm_template_ms: Stat,
    /// The same with pre-starting off: QEMU's start in every `get_vm`.
    pub get_vm_template_no_prestart_ms: Stat,
    /// PSS of one pre-started QEMU waiting for its state load, idle (MiB).
    pub prestarted_pss_mib: f64,
    /// `get_vm` from a cache (over a template) whose pool is full.
    pub cache_hit_ms: Stat,
    /// Template `get_vm` ÷ direct `get_vm` (target ≤ 0.025).
    pub get_vm_template_ratio: f64,
    /// Cache hit ÷ direct `get_vm` (target ≤ 0.005, and a hit ≤ 5 ms).
    pub cache_hit_ratio: f64,
    /// `get_vm` calls made at once on the template factory.
    pub concurrent_get_vm: usize,
    /// Time until all of them returned ready VMs (median over the rounds).
    pub concurrent_get_vm_ms: f64,
    /// Ready VMs per second at that concurrency.
    pub concurrent_get_vm_per_s: f64,
    /// As many `get_vm` calls at once on the direct factory (cold boots): the median time
    /// until all returned ready VMs.
    pub concurrent_cold_ms: f64,
    /// `concurrent_get_vm_ms` ÷ `concurrent_cold_ms` (target ≤ 0.06).
    pub concurrent_ratio: f64,
    /// Each round's template burst.
    pub concurrent_template: Vec<Burst>,
    /// Each round's direct burst.
    pub concurrent_cold: Vec<Burst>,
}

/// A factory config under `root`: a template factory when `template`, with a cache of `cache`.
pub fn factory_config(env: &GuestEnv, root: &Path, template: bool, cache: u32) -> FactoryConfig {
    let mut cfg = vm::template_factory_config(env, root);
    cfg.template = template;
    cfg.cache = cache;
    cfg
}

/// Waits (at most 60 s) until `factory` has a pre-started clone waiting.
pub async fn until_prestarted(factory: &Factory) -> Result<Vec<u32>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = factory.prestarted();
        if !p.pids.is_empty() {
            return Ok(p.pids);
        }
        if Instant::now() > deadline {
            bail!("No pre-started clone in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Times `runs` calls of `get_vm` on `factory`, stopping each VM after it is timed. With
/// `full_pool`, waits before each call until the factory's cache holds `pool` VMs.
async fn time_get_vm(
    factory: &Factory,
    cfg: &VmConfig,
    runs: usize,
    pool: usize,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let deadline = Instant::now() + Duration::from_secs(120);
        while factory.status().await.len() < pool {
            if Instant::now() > deadline {
                bail!("The cache did not fill in 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t0 = Instant::now();
        let vm = factory.get_vm(cfg).await?;
        samples.push(t0.elapsed());
        vm.stop().await?;
    }
    Ok(samples)
}

/// Runs the factory bench under `root`.
pub async fn run(env: &GuestEnv, root: &Path, runs: usize) -> Result<FactoryReport> {
    let mut direct_t = Vec::new();
    let mut template_t = Vec::new();
    let mut no_prestart_t = Vec::new();
    let mut hit_t = Vec::new();

    let direct_cfg = factory_config(env, &root.join("d"), false, 0);
    let template_cfg = factory_config(env, &root.join("t"), true, 0);
    let mut no_prestart_cfg = factory_config(env, &root.join("n"), true, 0);
    no_prestart_cfg.prestart = 0;
    let cache_cfg = factory_config(env, &root.join("c"), true, 1);
    for dir in ["d", "t", "n", "c"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    eprintln!("bench: factories (direct, template, cache of 1 over a template) ...");
    let direct = Factory::new(&direct_cfg).await?;
    let template = Factory::new(&template_cfg).await?;
    let no_prestart = Factory::new(&no_prestart_cfg).await?;
    let cache = Factory::new(&cache_cfg).await?;
    let mut prestarted_kib = 0;
    let timed = async {
        // Interleaved, one of each per round, so load drift hits all alike.
        for i in 0..runs {
            eprintln!("bench: get_vm round {}/{runs} ...", i + 1);
            direct_t.extend(time_get_vm(&direct, &direct_cfg.vm, 1, 0).await?);
            until_prestarted(&template).await?;
            template_t.extend(time_get_vm(&template, &template_cfg.vm, 1, 0).await?);
            no_prestart_t.extend(time_get_vm(&no_prestart, &no_prestart_cfg.vm, 1, 0).await?);
            hit_t.extend(time_get_vm(&cache, &cache_cfg.vm, 1, 1).await?);
        }
        // A waiting QEMU, settled.
        let pids = until_prestarted(&template).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        prestarted_kib = crate::bench::pss_kib(pids[0])?;
        let (mut tpl, mut cold) = (Vec::new(), Vec::new());
        for i in 0..BURST_ROUNDS {
            eprintln!(
                "bench: {CONCURRENT} concurrent get_vm, template then direct, round {}/{BURST_ROUNDS} ...",
                i + 1
            );
            // As for one `get_vm`: the template factory's pre-started QEMU is waiting.
            until_prestarted(&template).await?;
            tpl.push(get_vm_burst(&template, &template_cfg.vm).await?);
            cold.push(get_vm_burst(&direct, &direct_cfg.vm).await?);
        }
        anyhow::Ok((tpl, cold))
    }
    .await;
    for f in [&direct, &template, &no_prestart, &cache] {
        f.close().await?;
    }
    let (concurrent_template, concurrent_cold) = timed?;
    let wall = |b: &[Burst]| crate::stat::median(b.iter().map(|b| b.cpu.wall_ms).collect());
    let (tpl_ms, cold_ms) = (wall(&concurrent_template), wall(&concurrent_cold));
    let get_vm_direct_ms = Stat::of(&direct_t);
    let get_vm_template_ms = Stat::of(&template_t);
    let cache_hit_ms = Stat::of(&hit_t);
    Ok(FactoryReport {
        get_vm_template_ratio: get_vm_template_ms.median / get_vm_direct_ms.median,
        cache_hit_ratio: cache_hit_ms.median / get_vm_direct_ms.median,
        get_vm_direct_ms,
        get_vm_template_ms,
        get_vm_template_no_prestart_ms: Stat::of(&no_prestart_t),
        prestarted_pss_mib: prestarted_kib as f64 / 1024.0,
        cache_hit_ms,
        concurrent_get_vm: CONCURRENT,
        concurrent_get_vm_ms: tpl_ms,
        concurrent_get_vm_per_s: CONCURRENT as f64 / (tpl_ms / 1000.0),
        concurrent_cold_ms: cold_ms,
        concurrent_ratio: tpl_ms / cold_ms,
        concurrent_template,
        concurrent_cold,
    })
}
