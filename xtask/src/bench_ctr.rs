//! `cargo xtask bench --ctr`: `ctr run --rm IMG ID true` with runc, with vmfactory on a
//! template, and with vmfactory on a direct (cold-booted) VM, interleaved round by round in
//! one run; medians, a table and `target/bench/ctr.json`.
//!
//! Two private containerd instances ([`vmfactory_e2e::containerd`]) run the shim built from
//! this tree (release), one with the environment that points it at a template
//! made by `vmfactory init`, one without (direct VMs); runc runs on the first. The image is
//! the busybox OCI image ([`vmfactory_e2e::oci`]). The first vmfactory run of each kind builds
//! the erofs rootfs image and is reported on its own. Where the vmfactory rows' time goes
//! comes from the shim's own timing lines (debug, target `vmfactory::timing`, `step`/`ms`
//! fields, as `vmfactory run` logs them), which containerd copies into its log.
//!
//! Without the shim binary the bench fails: it never reports runc alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use vmfactory_e2e::containerd::{
    Containerd, ContainerdConfig, RUNC_RUNTIME, SHIM_BINARY, VMFACTORY_RUNTIME,
};
use vmfactory_e2e::GuestEnv;
use vmfactory_vm::TIMING_TARGET;

use crate::stat::{median, print_row, Stat};
use crate::util::workspace_root;

/// When set, the shim binary to time instead of building one.
const SHIM_BIN_ENV: &str = "VMFACTORY_SHIM_BIN";

/// One step of the shim, over the timed runs.
#[derive(Debug, Serialize)]
pub struct Part {
    /// Median of the step's durations, in ms.
    pub median_ms: f64,
    /// How many times the step was logged.
    pub samples: usize,
}

/// The container rows.
#[derive(Debug, Serialize)]
pub struct CtrReport {
    /// `ctr run --rm IMG ID true` with runc.
    pub runc_ms: Stat,
    /// The same with the vmfactory shim, VMs cloned from a template.
    pub vmfactory_template_ms: Stat,
    /// The same with the vmfactory shim, VMs booted directly.
    pub vmfactory_direct_ms: Stat,
    /// The first template run (the rootfs image is built then), not in the rows above.
    pub first_template_ms: f64,
    /// The first direct run, likewise.
    pub first_direct_ms: f64,
    /// Median template run less median runc run: what a VM per container costs.
    pub template_gap_ms: f64,
    /// The shim's steps in the template runs (from its timing log lines).
    pub template_parts: BTreeMap<String, Part>,
    /// The shim's steps in the direct runs.
    pub direct_parts: BTreeMap<String, Part>,
    /// The shim binary timed.
    pub shim: PathBuf,
}

/// The shim to time: [`SHIM_BIN_ENV`], else the release build of this tree, built now.
pub fn shim_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(SHIM_BIN_ENV) {
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "{SHIM_BIN_ENV} {} is no file", bin.display());
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(["build", "--quiet", "--release", "-p", "vmfactory-shim"])
        .args(["--bin", SHIM_BINARY])
        .status()
        .context("Cannot run cargo build")?;
    ensure!(
        status.success(),
        "The vmfactory rows need the shim, and building {SHIM_BINARY} (package vmfactory-shim, \
         feature vm) failed ({status}); set {SHIM_BIN_ENV} to use a built one"
    );
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("release").join(SHIM_BINARY);
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// What the shim reads from its environment (containerd's, which it inherits) to find its
/// guest image, run root and factory; `template` names the template to clone.
fn shim_env(
    cfg: ContainerdConfig,
    env: &GuestEnv,
    root: &Path,
    template: Option<&Path>,
) -> ContainerdConfig {
    let guest = env.kernel.parent().unwrap_or(Path::new("."));
    let mut cfg = cfg
        .env("VMFACTORY_GUEST_DIR", guest.to_string_lossy())
        .env("VMFACTORY_RUN_ROOT", root.join("run").to_string_lossy())
        .env(
            "VMFACTORY_CONFIG",
            root.join("vmfactory.toml").to_string_lossy(),
        )
        .env("RUST_LOG", format!("warn,{TIMING_TARGET}=debug"));
    if let Some(t) = template {
        cfg = cfg.env("VMFACTORY_TEMPLATE_PATH", t.to_string_lossy());
    }
    cfg
}

/// Runs the bench with the shim binary `shim`: `runs` timed rounds after one warm-up run of
/// each kind.
pub fn run(env: &GuestEnv, shim: PathBuf, runs: usize) -> Result<CtrReport> {
    let shim_dir = shim.parent().context("shim dir")?.to_path_buf();
    let cli = crate::bench_run::cli_bin()?;
    // Short: containerd's socket paths must fit in 108 bytes.
    let scratch = tempfile::Builder::new()
        .prefix("vmf-bench-ctr-")
        .tempdir_in("/tmp")?;
    let root = scratch.path();

    // The template, made by `vmfactory init` (no cache server: it returns when made).
    let t_root = root.join("t");
    let d_root = root.join("d");
    for (dir, template) in [(&t_root, true), (&d_root, false)] {
        std::fs::create_dir_all(dir)?;
        let text = crate::bench_run::cli_config(env, dir, template, 0);
        std::fs::write(dir.join("vmfactory.toml"), text)?;
    }
    let vmfactory = |dir: &Path, args: &[&str]| -> Result<()> {
        crate::util::run(
            Command::new(&cli)
                .arg("--config")
                .arg(dir.join("vmfactory.toml"))
                .args(args),
        )
    };
    eprintln!("bench: vmfactory init (the template) ...");
    vmfactory(&t_root, &["init"])?;
    let result = time_rows(env, &shim_dir, &t_root, &d_root, root, runs);
    // The template goes whatever happened.
    let destroyed = vmfactory(&t_root, &["destroy"]);
    let mut report = result?;
    destroyed?;
    report.shim = shim;
    Ok(report)
}

fn time_rows(
    env: &GuestEnv,
    shim_dir: &Path,
    t_root: &Path,
    d_root: &Path,
    root: &Path,
    runs: usize,
) -> Result<CtrReport> {
    let template = t_root.join("template");
    let t_cfg = shim_env(
        ContainerdConfig::new(root.join("ct")).shim_dir(shim_dir),
        env,
        t_root,
        Some(&template),
    );
    let d_cfg = shim_env(
        ContainerdConfig::new(root.join("cd")).shim_dir(shim_dir),
        env,
        d_root,
        None,
    );
    let ct = Containerd::start(&t_cfg)?;
    let cd = Containerd::start(&d_cfg)?;
    let image = ct.import_busybox()?;
    cd.import_busybox()?;

    eprintln!("bench: first runs (the rootfs image is built) ...");
    let first_template = ctr_true(&ct, RUNC_RUNTIME, &image, "warm-runc")
        .and_then(|_| ctr_true(&ct, VMFACTORY_RUNTIME, &image, "warm-t"))?;
    let first_direct = ctr_true(&cd, VMFACTORY_RUNTIME, &image, "warm-d")?;
    let (t_mark, d_mark) = (ct.log().len(), cd.log().len());

    let (mut runc, mut t, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        eprintln!("bench: round {}/{runs}", i + 1);
        runc.push(ctr_true(&ct, RUNC_RUNTIME, &image, &format!("runc-{i}"))?);
        t.push(ctr_true(&ct, VMFACTORY_RUNTIME, &image, &format!("t-{i}"))?);
        d.push(ctr_true(&cd, VMFACTORY_RUNTIME, &image, &format!("d-{i}"))?);
    }
    let template_parts = parts(ct.log().get(t_mark..).unwrap_or_default());
    let direct_parts = parts(cd.log().get(d_mark..).unwrap_or_default());
    ct.stop()?;
    cd.stop()?;
    let (runc_ms, template_ms) = (Stat::of(&runc), Stat::of(&t));
    Ok(CtrReport {
        template_gap_ms: template_ms.median - runc_ms.median,
        runc_ms,
        vmfactory_template_ms: template_ms,
        vmfactory_direct_ms: Stat::of(&d),
        first_template_ms: ms(first_template),
        first_direct_ms: ms(first_direct),
        template_parts,
        direct_parts,
        shim: PathBuf::new(),
    })
}

/// Times `ctr run --rm --runtime RUNTIME IMAGE ID true`, which must exit 0.
fn ctr_true(ctrd: &Containerd, runtime: &str, image: &str, id: &str) -> Result<Duration> {
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    // runc's pivot_root fails on an initramfs root (the nested KVM host's L1).
    if runtime == RUNC_RUNTIME && root_is_initramfs() {
        args.push("--no-pivot");
    }
    args.extend([image, id, "true"]);
    let t0 = Instant::now();
    let out = ctrd.ctr(&args);
    let took = t0.elapsed();
    ensure!(
        out.status.success(),
        "ctr run --runtime {runtime} {id} true failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(took)
}

/// Whether `/` is the initramfs (`rootfs`), where pivot_root cannot be used.
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (fields, fs) = l.split_once(" - ")?;
            (fields.split(' ').nth(4)? == "/").then(|| fs.split(' ').next().map(str::to_owned))?
        })
        .next_back()
        .is_some_and(|fs| fs == "rootfs")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The medians of the `step`/`ms` pairs of the timing lines in `log`.
fn parts(log: &str) -> BTreeMap<String, Part> {
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (step, ms) in log.lines().filter_map(timing_line) {
        samples.entry(step).or_default().push(ms);
    }
    samples
        .into_iter()
        .map(|(step, v)| {
            let samples = v.len();
            (
                step,
                Part {
                    median_ms: median(v),
                    samples,
                },
            )
        })
        .collect()
}

/// `(step, ms)` of one timing line: tracing's JSON (`fields.step`, `fields.ms`) or its text
/// form (`... vmfactory::timing: step done step="x" ms=1.5`, quotes optional).
fn timing_line(line: &str) -> Option<(String, f64)> {
    if !line.contains(TIMING_TARGET) {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        let f = &v["fields"];
        return Some((f["step"].as_str()?.to_owned(), f["ms"].as_f64()?));
    }
    let field = |name: &str| -> Option<String> {
        let key = format!(" {name}=");
        let rest = &line[line.find(&key)? + key.len()..];
        let value = match rest.strip_prefix('"') {
            Some(quoted) => quoted.split('"').next()?,
            None => rest.split_whitespace().next()?,
        };
        Some(value.to_owned())
    };
    Some((field("step")?, field("ms")?.parse().ok()?))
}

/// Prints the table and writes `target/bench/ctr.json`; returns its path.
pub fn report(r: &CtrReport) -> Result<PathBuf> {
    println!(
        "\n`ctr run --rm IMG ID true` (busybox image), {} runs each",
        r.runc_ms.runs
    );
    println!("{:<40} {:>12} {:>10} {:>10}", "", "median", "min", "max");
    print_row("runc", &r.runc_ms);
    print_row("vmfactory, template clone", &r.vmfactory_template_ms);
    print_row("vmfactory, direct VM", &r.vmfactory_direct_ms);
    println!(
        "first runs (rootfs image built): template {:.1} ms, direct {:.1} ms",
        r.first_template_ms, r.first_direct_ms
    );
    println!("template - runc: {:.1} ms", r.template_gap_ms);
    for (title, parts) in [("template", &r.template_parts), ("direct", &r.direct_parts)] {
        if parts.is_empty() {
            println!("shim steps ({title}): none logged at {TIMING_TARGET}");
            continue;
        }
        println!("shim steps ({title}), medians:");
        for (step, p) in parts {
            println!(
                "  {step:<38} {:>9.1} ms  ({} samples)",
                p.median_ms, p.samples
            );
        }
    }
    let out = workspace_root().join("target/bench/ctr.json");
    std::fs::create_dir_all(out.parent().context("bench dir")?)?;
    std::fs::write(&out, serde_json::to_vec_pretty(r)?)?;
    println!("JSON: {}", out.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_lines_in_json_and_text() {
        let json = r#"{"level":"DEBUG","fields":{"message":"step done","step":"get_vm","ms":12.5},"target":"vmfactory::timing"}"#;
        assert_eq!(timing_line(json), Some(("get_vm".into(), 12.5)));
        let text =
            "2026-11-30T15:00:00Z DEBUG vmfactory::timing: step done step=\"rootfs\" ms=3.25";
        assert_eq!(timing_line(text), Some(("rootfs".into(), 3.25)));
        let bare = "DEBUG vmfactory::timing: step done step=create ms=7";
        assert_eq!(timing_line(bare), Some(("create".into(), 7.0)));
        assert_eq!(timing_line("INFO other: step=x ms=1"), None);
        assert_eq!(timing_line("DEBUG vmfactory::timing: no fields"), None);
    }

    #[test]
    fn parts_are_medians_per_step() {
        let log = "\
DEBUG vmfactory::timing: step done step=vm ms=10
time=... level=info msg=\"shim started\"
DEBUG vmfactory::timing: step done step=vm ms=30
DEBUG vmfactory::timing: step done step=vm ms=20
DEBUG vmfactory::timing: step done step=rootfs ms=2
";
        let p = parts(log);
        assert_eq!(p.len(), 2);
        assert_eq!((p["vm"].median_ms, p["vm"].samples), (20.0, 3));
        assert_eq!((p["rootfs"].median_ms, p["rootfs"].samples), (2.0, 1));
    }
}
