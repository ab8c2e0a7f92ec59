//! `cargo xtask bench --memfloor`: the memory floor of an idle clone, cut by cut. Each variant
//! (a config change, or an environment for QEMU) gets its own template, then N idle clones
//! whose PSS is broken down by part (`smaps`) and whose time to ready is taken; some also get
//! N idle direct VMs. Variants are interleaved within each round, so load drift on this shared
//! machine hits all alike; medians over the rounds are reported.
//!
//! Then the guest pages a clone dirties while idle: its private (copied) pages of the template
//! memory after a growing idle time, and where they are in guest-physical memory
//! (`/proc/PID/pagemap`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use vmfactory_e2e::vm;
use vmfactory_hypervisor::{Hypervisor, HypervisorConfig};

use crate::bench::{print_breakdowns, pss_timed};
use crate::smaps::{parse, Breakdown};
use crate::stat::Stat;

/// One way of running QEMU to measure.
struct Variant {
    name: &'static str,
    /// Its effect is on TCG's translation buffer only (nothing to cut under KVM).
    tcg_only: bool,
    /// Also measure N idle direct VMs.
    direct: bool,
    apply: fn(&mut HypervisorConfig),
    /// Environment QEMU runs with (through a wrapper script).
    env: &'static [(&'static str, &'static str)],
}

/// No cuts: what the code did before (all machine options and THP as QEMU and the host chose).
fn before(c: &mut HypervisorConfig) {
    c.machine_options = Some(String::new());
    c.clone_thp = true;
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "before: no cuts",
        tcg_only: false,
        direct: true,
        apply: before,
        env: &[],
    },
    Variant {
        name: "sata=off",
        tcg_only: false,
        direct: false,
        apply: |c| {
            before(c);
            c.machine_options = Some("sata=off".into());
        },
        env: &[],
    },
    Variant {
        name: "no THP in clones",
        tcg_only: false,
        direct: false,
        apply: |c| {
            before(c);
            c.clone_thp = false;
        },
        env: &[],
    },
    Variant {
        name: "defaults now: both",
        tcg_only: false,
        direct: true,
        apply: |_| {},
        env: &[],
    },
    Variant {
        name: "+ smbus,hpet,i8042,vmport off",
        tcg_only: false,
        direct: false,
        apply: |c| {
            c.machine_options = Some("sata=off,smbus=off,hpet=off,i8042=off,vmport=off".into())
        },
        env: &[],
    },
    Variant {
        name: "+ disk_slots=0 (no root ports)",
        tcg_only: false,
        direct: false,
        apply: |c| c.disk_slots = 0,
        env: &[],
    },
    Variant {
        name: "+ MALLOC_ARENA_MAX=1",
        tcg_only: false,
        direct: false,
        apply: |_| {},
        env: &[("MALLOC_ARENA_MAX", "1")],
    },
    Variant {
        name: "+ MALLOC_ARENA_MAX=2",
        tcg_only: false,
        direct: false,
        apply: |_| {},
        env: &[("MALLOC_ARENA_MAX", "2")],
    },
    Variant {
        name: "+ MALLOC_TRIM_THRESHOLD_=0",
        tcg_only: false,
        direct: false,
        apply: |_| {},
        env: &[("MALLOC_TRIM_THRESHOLD_", "0")],
    },
    Variant {
        name: "+ tb-size=4",
        tcg_only: true,
        direct: false,
        apply: |c| c.tcg_tb_size_mib = Some(4),
        env: &[],
    },
    Variant {
        name: "+ tb-size=8",
        tcg_only: true,
        direct: false,
        apply: |c| c.tcg_tb_size_mib = Some(8),
        env: &[],
    },
    Variant {
        name: "+ tb-size=16",
        tcg_only: true,
        direct: true,
        apply: |c| c.tcg_tb_size_mib = Some(16),
        env: &[],
    },
    Variant {
        name: "+ tb-size=32",
        tcg_only: true,
        direct: true,
        apply: |c| c.tcg_tb_size_mib = Some(32),
        env: &[],
    },
];

/// What one variant measured over the rounds.
#[derive(Debug, Serialize)]
pub struct VariantReport {
    pub name: &'static str,
    pub tcg_only: bool,
    /// Per idle clone, the round with the median total.
    pub clone: Breakdown,
    /// Per idle direct VM, the round with the median total (if measured).
    pub direct: Option<Breakdown>,
    /// Clone PSS ÷ direct PSS (if measured).
    pub clone_pss_ratio: Option<f64>,
    /// Each clone's time to its agent answering (N per round).
    pub clone_ready_ms: Stat,
}

/// A clone's private guest pages after an idle time.
#[derive(Debug, Serialize)]
pub struct Dirtied {
    pub idle_s: u64,
    pub private_mib: f64,
    /// The guest-physical MiB ranges holding most of them: `(first MiB, private pages)`.
    pub top_ranges: Vec<(u64, u64)>,
}

/// The `--memfloor` report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub n: usize,
    pub rounds: usize,
    pub variants: Vec<VariantReport>,
    pub dirtied: Vec<Dirtied>,
}

/// A script that runs `qemu` with `env`, in `dir`.
fn wrapper(dir: &Path, i: usize, qemu: &Path, env: &[(&str, &str)]) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("qemu-{i}.sh"));
    let mut text = String::from("#!/bin/sh\n");
    for (k, v) in env {
        text.push_str(&format!("export {k}={v}\n"));
    }
    text.push_str(&format!(
        "exec {} \"$@\"\n",
        vmfactory_hypervisor::cmdline::shell_quote(qemu)
    ));
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// The round whose total is the median (the breakdowns of one round stay together).
fn median_round(mut all: Vec<Breakdown>) -> Breakdown {
    all.sort_by(|a, b| a.total.total_cmp(&b.total));
    let mid = all.len() / 2;
    all.into_iter().nth(mid).unwrap_or_default()
}

/// Runs the variants `rounds` times with `n` VMs each, then the dirtying measurement.
pub async fn run(n: usize, rounds: usize) -> Result<Report> {
    let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
    let root = tempfile::Builder::new()
        .prefix("vmf-memfloor-")
        .tempdir_in("/tmp")?;
    let base = vm::config(&env);
    let mut clones: Vec<Vec<Breakdown>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    let mut directs: Vec<Vec<Breakdown>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    let mut ready: Vec<Vec<Duration>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, v) in VARIANTS.iter().enumerate() {
            eprintln!("memfloor: round {}/{rounds}: {} ...", round + 1, v.name);
            let dir = root.path().join(format!("r{round}v{i}"));
            std::fs::create_dir_all(&dir)?;
            let mut cfg = base.clone();
            (v.apply)(&mut cfg);
            if !v.env.is_empty() {
                cfg.qemu_path = wrapper(&dir, i, &env.qemu, v.env)?;
            }
            // The template's memory on a tmpfs, as the template factory puts it.
            let tpl_dir = tempfile::Builder::new()
                .prefix("vmf-memfloor-tpl-")
                .tempdir_in("/dev/shm")?;
            let tpl = vm::template_config(cfg.clone(), tpl_dir.path());
            vm::make_template(&dir, tpl.clone()).await?;
            let (pss, times) = pss_timed(&dir, n, &tpl, true).await?;
            clones[i].push(pss.breakdown);
            ready[i].extend(times);
            drop(tpl_dir);
            if v.direct {
                directs[i].push(pss_timed(&dir, n, &cfg, false).await?.0.breakdown);
            }
        }
    }
    let variants = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let clone = median_round(std::mem::take(&mut clones[i]));
            let direct =
                (!directs[i].is_empty()).then(|| median_round(std::mem::take(&mut directs[i])));
            VariantReport {
                name: v.name,
                tcg_only: v.tcg_only,
                clone_pss_ratio: direct.as_ref().map(|d| clone.total / d.total),
                clone,
                direct,
                clone_ready_ms: Stat::of(&ready[i]),
            }
        })
        .collect();
    let dirtied = dirtied(root.path(), &base).await?;
    Ok(Report {
        n,
        rounds,
        variants,
        dirtied,
    })
}

/// Idle times at which a clone's private guest pages are counted.
const IDLE_S: [u64; 4] = [0, 5, 15, 45];

/// One clone of a fresh template left idle: its private guest pages at each of [`IDLE_S`].
async fn dirtied(root: &Path, base: &HypervisorConfig) -> Result<Vec<Dirtied>> {
    eprintln!(
        "memfloor: guest pages a clone dirties while idle ({:?} s) ...",
        IDLE_S
    );
    let tpl_dir = tempfile::Builder::new()
        .prefix("vmf-memfloor-tpl-")
        .tempdir_in("/dev/shm")?;
    let dir = root.join("dirtied");
    std::fs::create_dir_all(&dir)?;
    let tpl = vm::template_config(base.clone(), tpl_dir.path());
    vm::make_template(&dir, tpl.clone()).await?;
    let (clone, _, _) = vm::boot_clone(&dir, "idle", &tpl).await?;
    let measured = async {
        let pid = clone.vm.pid().context("The clone has no pid")?;
        let t0 = std::time::Instant::now();
        let mut out = Vec::new();
        for idle_s in IDLE_S {
            let at = Duration::from_secs(idle_s);
            tokio::time::sleep(at.saturating_sub(t0.elapsed())).await;
            let pages = private_guest_pages(pid, &tpl_dir.path().join("memory"))?;
            out.push(Dirtied {
                idle_s,
                private_mib: pages.len() as f64 * 4.0 / 1024.0,
                top_ranges: top_ranges(&pages, 5),
            });
        }
        anyhow::Ok(out)
    }
    .await;
    clone.stop().await?;
    measured
}

/// The guest-physical page numbers (offsets in the template memory file `memory`) that the
/// clone `pid` holds privately: present, and not the file's page (`/proc/PID/pagemap` bit 63
/// set, bit 61 clear).
fn private_guest_pages(pid: u32, memory: &Path) -> Result<Vec<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let name = memory.to_string_lossy();
    let map = parse(&text)?
        .into_iter()
        .find(|m| m.name == name)
        .context("The clone does not map the template memory")?;
    let pages = (map.end - map.start) / 4096;
    let mut f = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    f.seek(SeekFrom::Start(map.start / 4096 * 8))?;
    let mut buf = vec![0u8; pages as usize * 8];
    f.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .enumerate()
        .filter_map(|(i, e)| {
            let e = u64::from_le_bytes(e.try_into().ok()?);
            let private = e & (1 << 63) != 0 && e & (1 << 61) == 0;
            private.then_some(i as u64)
        })
        .collect())
}

/// The `k` guest-physical MiB holding most of `pages`: `(MiB, pages in it)`.
fn top_ranges(pages: &[u64], k: usize) -> Vec<(u64, u64)> {
    let mut per_mib = std::collections::BTreeMap::<u64, u64>::new();
    for p in pages {
        *per_mib.entry(p / 256).or_default() += 1;
    }
    let mut v: Vec<(u64, u64)> = per_mib.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

/// Prints the report and writes `target/bench/memfloor.json`.
pub fn report(r: &Report) -> Result<PathBuf> {
    println!(
        "vmfactory bench --memfloor: PSS per idle VM (N={}), medians of {} rounds",
        r.n, r.rounds
    );
    println!(
        "{:<31}{:>7}{:>6}{:>6}{:>6}{:>6}{:>6}{:>6}{:>8}{:>7}{:>7}",
        "variant (MiB; ms)",
        "clone",
        "USS",
        "TCG",
        "heap",
        "ROMs",
        "anon",
        "files",
        "direct",
        "ratio",
        "ready"
    );
    for v in &r.variants {
        let c = &v.clone;
        println!(
            "{:<31}{:>7.1}{:>6.1}{:>6.1}{:>6.1}{:>6.1}{:>6.1}{:>6.1}{:>8}{:>7}{:>7.0}{}",
            v.name,
            c.total,
            c.private,
            c.tcg_buffer,
            c.heap + c.arenas,
            c.ram_blocks,
            c.other,
            c.qemu_binary + c.libraries,
            v.direct
                .as_ref()
                .map_or("-".into(), |d| format!("{:.1}", d.total)),
            v.clone_pss_ratio.map_or("-".into(), |x| format!("{x:.3}")),
            v.clone_ready_ms.median,
            if v.tcg_only { "  TCG only" } else { "" }
        );
    }
    let columns: Vec<(&str, &Breakdown)> = r
        .variants
        .iter()
        .take(4)
        .map(|v| (v.name.split(':').next().unwrap_or(v.name), &v.clone))
        .collect();
    print_breakdowns("clone PSS by part, MiB", &columns);
    let directs: Vec<(&str, &Breakdown)> = r
        .variants
        .iter()
        .filter_map(|v| {
            Some((
                v.name.split(':').next().unwrap_or(v.name),
                v.direct.as_ref()?,
            ))
        })
        .collect();
    print_breakdowns("direct VM PSS by part, MiB", &directs);
    for d in &r.dirtied {
        println!(
            "clone idle {:>2} s: {:>6.2} MiB private guest pages; busiest guest MiB (MiB: pages) {:?}",
            d.idle_s, d.private_mib, d.top_ranges
        );
    }
    let dir = crate::util::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("memfloor.json");
    std::fs::write(&path, serde_json::to_vec_pretty(r)?)?;
    println!("json: {}", path.display());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busiest_guest_ranges() {
        let pages = [0, 1, 2, 256, 257, 4096 * 4, 300];
        assert_eq!(top_ranges(&pages, 2), [(0, 3), (1, 3)]);
        assert_eq!(top_ranges(&[], 3), []);
    }

    #[test]
    fn variants_apply_to_a_config() {
        let mut c = HypervisorConfig::new("/k", None);
        (VARIANTS[0].apply)(&mut c);
        assert_eq!((c.effective_machine_options(), c.clone_thp), ("", true));
        let mut c = HypervisorConfig::new("/k", None);
        (VARIANTS[3].apply)(&mut c);
        assert_eq!(
            (c.effective_machine_options(), c.clone_thp),
            ("sata=off", false)
        );
        assert!(VARIANTS.iter().all(|v| v.name.len() <= 32));
    }
}
