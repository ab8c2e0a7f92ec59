//! The workload half of `cargo xtask bench`: `vmfactory run -- true` timed from the command's
//! start to its exit for each place a VM comes from, with the cache hit split into named parts;
//! then, through the library, exec latency in a ready VM and stdout throughput per agent channel.
//!
//! The command is the release build of `vmfactory` (built here), as a user runs it. Its parts
//! come from the same runs: the CLI logs each step's duration at debug level under the target
//! `vmfactory::timing`, which alone is switched on (`RUST_LOG`), read back as JSON log lines.
//! The library measurements run in this (debug-built) xtask, as the rest of the bench does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use vmfactory_e2e::{vm, GuestEnv};
use vmfactory_factory::{Factory, FactoryConfig};
use vmfactory_vm::{ProcessOutput, ProcessSpec, Vm, TIMING_TARGET};

use crate::stat::{median, Stat};
use crate::util::workspace_root;

/// VMs the cache server keeps ready for the cache-hit runs.
const CACHE_VMS: usize = 2;
/// Sequential execs timed in one ready VM.
const EXECS: usize = 100;
/// Bytes the guest writes to stdout for the throughput rows.
const STREAM_BYTES: u64 = 64 << 20;
/// Streams timed per agent channel (medians are reported).
const STREAMS: usize = 3;
/// Bound on the template, the cache server's pool, or one command.
const WAIT: Duration = Duration::from_secs(120);

/// What others reach, for scale (from the issue): not measured here.
pub const ANCHORS: &str = "code-sandbox services start a sandbox in ~150 ms; \
     Firecracker restores a snapshot in 5-30 ms on KVM";

/// Where the time of `vmfactory run -- true` on a cache hit goes: medians per step, in ms.
#[derive(Debug, Serialize)]
pub struct CacheParts {
    /// Loading and checking the configuration file.
    pub config_ms: f64,
    /// Flags, file checks and signal handlers before the factory.
    pub prepare_ms: f64,
    /// Connecting to the VM-cache server (the factory).
    pub connect_ms: f64,
    /// Taking the run root's lock (shared).
    pub lock_ms: f64,
    /// `get_vm` over the cache socket: the VM handed over and its agent answering.
    pub get_vm_ms: f64,
    /// Closing the factory's connection.
    pub close_ms: f64,
    /// `exec` of `true`, its streams read to the end and its exit status.
    pub exec_ms: f64,
    /// `Vm::stop`: QMP `quit`, QEMU's exit, the VM's files and directory removed.
    pub stop_ms: f64,
    /// Letting go of the run root's lock.
    pub release_ms: f64,
    /// The rest of the wall time: exec of the binary, runtime and logging set-up, exit.
    pub rest_ms: f64,
}

/// Exec latency percentiles, in ms.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Stdout throughput over one agent channel.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub channel: String,
    pub bytes: u64,
    /// Median over the streams.
    pub mib_per_s: f64,
    pub runs: Vec<f64>,
}

/// The workload measurements.
#[derive(Debug, Serialize)]
pub struct RunReport {
    /// The build of `vmfactory` timed.
    pub cli_profile: &'static str,
    /// `vmfactory run -- true` after `vmfactory init` (a template, no cache server).
    pub run_template_ms: Stat,
    /// `vmfactory run -- true` with a VM-cache server holding a full pool.
    pub run_cache_ms: Stat,
    /// `vmfactory run -- true` without a template (a cold boot).
    pub run_direct_ms: Stat,
    /// Template ÷ direct (target ≤ 0.05).
    pub run_template_ratio: f64,
    /// The cache-hit runs by step (target: the whole ≤ 50 ms).
    pub run_cache_parts: CacheParts,
    /// `Vm::exec(true)`, its streams drained, `wait`, in one VM from a template factory.
    pub exec_latency_ms: Latency,
    /// Stdout of `head -c 64M /dev/zero` read to the end on the host, per channel.
    pub stdout_throughput: Vec<Throughput>,
    /// Others' numbers for scale.
    pub anchors: &'static str,
}

/// The `vmfactory` to time: `VMFACTORY_BIN` when set (the nested KVM host carries a release
/// build and has no cargo), else the release build, built now.
pub(crate) fn cli_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("VMFACTORY_BIN") {
        let bin = PathBuf::from(bin);
        ensure!(bin.is_file(), "VMFACTORY_BIN {} is no file", bin.display());
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::util::run(
        std::process::Command::new(cargo)
            .current_dir(workspace_root())
            .args(["build", "--quiet", "--release", "-p", "vmfactory"]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("release/vmfactory");
    ensure!(bin.is_file(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// A configuration file for the CLI with everything under `root`.
pub(crate) fn cli_config(env: &GuestEnv, root: &Path, template: bool, cache: usize) -> String {
    format!(
        r#"[hypervisor.qemu]
path = "{qemu}"
kernel = "{kernel}"
initrd = "{initrd}"
accel = "auto"
{cpu_model}
[factory]
enable_template = {template}
template_path = "{root}/template"
vm_cache_number = {cache}
vm_cache_endpoint = "{root}/cache.sock"

[runtime]
run_root = "{root}/run"
"#,
        qemu = env.qemu.display(),
        kernel = env.kernel.display(),
        initrd = env.initrd.display(),
        cpu_model = vmfactory_e2e::cpu_model()
            .map(|m| format!("cpu_model = \"{m}\""))
            .unwrap_or_default(),
        root = root.display(),
    )
}

/// The CLI with one configuration.
struct Cli {
    bin: PathBuf,
    config: PathBuf,
}

impl Cli {
    fn new(bin: &Path, env: &GuestEnv, root: &Path, template: bool, cache: usize) -> Result<Self> {
        std::fs::create_dir_all(root)?;
        let config = root.join("vmfactory.toml");
        std::fs::write(&config, cli_config(env, root, template, cache))?;
        Ok(Self {
            bin: bin.to_owned(),
            config,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `args` to the end; fails on a non-zero exit.
    async fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output().await?;
        ensure!(
            out.status.success(),
            "vmfactory {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `vmfactory run -- true`: its wall time and the durations of the steps it logged.
    async fn run_true(&self) -> Result<(Duration, BTreeMap<String, f64>)> {
        let mut cmd = self.command(&["--log-format", "json", "run", "--", "true"]);
        cmd.env("RUST_LOG", format!("warn,{TIMING_TARGET}=debug"));
        let t0 = Instant::now();
        let out = tokio::time::timeout(WAIT, cmd.output())
            .await
            .context("vmfactory run timed out")??;
        let took = t0.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success(),
            "vmfactory run -- true failed ({}): {stderr}",
            out.status
        );
        Ok((took, steps(&stderr)))
    }

    /// How many VMs the cache server holds ready, or `None` while it does not answer.
    async fn cached_vms(&self) -> Result<Option<usize>> {
        // Exit 1 is `status` calling the factory degraded: the server is not up yet.
        let out = self.command(&["status", "--json"]).output().await?;
        ensure!(
            matches!(out.status.code(), Some(0 | 1)),
            "vmfactory status failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let server = &v["cache_server"];
        Ok((server["running"] == true).then(|| server["vms"].as_array().map_or(0, Vec::len)))
    }

    /// Waits until the cache server, `server`, holds `n` VMs.
    async fn wait_pool(&self, server: &mut Child, n: usize) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(exit) = server.try_wait()? {
                bail!("vmfactory init exited ({exit})");
            }
            if self.cached_vms().await? == Some(n) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "The cache did not fill in {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `step`/`ms` pairs of the CLI's timing log lines.
fn steps(stderr: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in stderr.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["target"] != TIMING_TARGET {
            continue;
        }
        let f = &v["fields"];
        if let (Some(step), Some(ms)) = (f["step"].as_str(), f["ms"].as_f64()) {
            *out.entry(step.to_owned()).or_default() += ms;
        }
    }
    out
}

/// Medians of the steps of the cache-hit runs; `rest` is each run's wall time less its steps.
fn cache_parts(runs: &[(Duration, BTreeMap<String, f64>)]) -> Result<CacheParts> {
    let step = |name: &str| -> Result<f64> {
        let v = runs
            .iter()
            .map(|(_, s)| s.get(name).copied())
            .collect::<Option<Vec<_>>>()
            .with_context(|| format!("A run logged no {name:?} step"))?;
        Ok(median(v))
    };
    let rest = runs
        .iter()
        .map(|(wall, s)| wall.as_secs_f64() * 1000.0 - s.values().sum::<f64>())
        .collect();
    Ok(CacheParts {
        config_ms: step("config")?,
        prepare_ms: step("prepare")?,
        connect_ms: step("factory")?,
        lock_ms: step("lock")?,
        get_vm_ms: step("get_vm")?,
        close_ms: step("close")?,
        exec_ms: step("exec")?,
        stop_ms: step("stop")?,
        release_ms: step("release")?,
        rest_ms: median(rest),
    })
}

/// `vmfactory run -- true` from each source.
struct CliTimes {
    /// The build profile of the binary timed (from its path).
    profile: &'static str,
    direct: Stat,
    template: Stat,
    cache: Stat,
    cache_parts: CacheParts,
}

/// Times `vmfactory run -- true` `runs` times from each source, interleaved per round.
async fn time_cli(env: &GuestEnv, root: &Path, runs: usize) -> Result<CliTimes> {
    let bin = cli_bin()?;
    let profile = if bin.components().any(|c| c.as_os_str() == "debug") {
        "debug"
    } else {
        "release"
    };
    let direct = Cli::new(&bin, env, &root.join("direct"), false, 0)?;
    let template = Cli::new(&bin, env, &root.join("template"), true, 0)?;
    let cache = Cli::new(&bin, env, &root.join("cache"), true, CACHE_VMS)?;
    eprintln!("bench: vmfactory init (template), and init as a cache server of {CACHE_VMS} ...");
    template.ok(&["init"]).await?;
    let log = std::fs::File::create(root.join("cache/init.log"))?;
    let mut server = cache
        .command(&["init"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let timed = async {
        let (mut d, mut t, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            eprintln!("bench: vmfactory run -- true, round {}/{runs} ...", i + 1);
            d.push(direct.run_true().await?.0);
            t.push(template.run_true().await?.0);
            cache.wait_pool(&mut server, CACHE_VMS).await?;
            c.push(cache.run_true().await?);
        }
        anyhow::Ok((d, t, c))
    }
    .await;
    let destroyed = cache.ok(&["destroy"]).await;
    let server_exit = tokio::time::timeout(WAIT, server.wait()).await;
    template.ok(&["destroy"]).await?;
    destroyed?;
    server_exit.context("The cache server did not exit after destroy")??;
    let (d, t, c) = timed?;
    let walls: Vec<Duration> = c.iter().map(|(w, _)| *w).collect();
    Ok(CliTimes {
        profile,
        direct: Stat::of(&d),
        template: Stat::of(&t),
        cache: Stat::of(&walls),
        cache_parts: cache_parts(&c)?,
    })
}

/// Reads `out` to its end, counting the bytes.
async fn drain(out: Option<ProcessOutput>) -> Result<u64> {
    let Some(mut out) = out else { return Ok(0) };
    let mut buf = vec![0u8; 256 << 10];
    let mut n = 0;
    loop {
        match out.read(&mut buf).await? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// Runs `args` in `vm`, reads stdout and stderr to the end, waits; returns stdout's size.
async fn exec_drained(vm: &Vm, args: &[&str]) -> Result<u64> {
    let mut p = vm.exec(ProcessSpec::new(args.iter().copied())).await?;
    let (stdout, stderr) = tokio::join!(drain(p.stdout()), drain(p.stderr()));
    let (stdout, _) = (stdout?, stderr?);
    let status = p.wait().await?;
    ensure!(
        matches!(status, vmfactory_vm::ExitStatus::Code(0)),
        "{args:?} ended with {status:?}"
    );
    Ok(stdout)
}

/// p50, p99, min and max of `EXECS` sequential `exec(true)` in one VM of `factory`.
async fn exec_latency(factory: &Factory, cfg: &FactoryConfig) -> Result<Latency> {
    let vm = factory.get_vm(&cfg.vm).await?;
    let timed = async {
        // One untimed exec: the first one in a clone translates the agent's exec path.
        exec_drained(&vm, &["true"]).await?;
        let mut ms = Vec::with_capacity(EXECS);
        for _ in 0..EXECS {
            let t0 = Instant::now();
            exec_drained(&vm, &["true"]).await?;
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::Ok(ms)
    }
    .await;
    vm.stop().await?;
    let mut ms = timed?;
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    Ok(Latency {
        n: ms.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        min: ms[0],
        max: ms[ms.len() - 1],
    })
}

/// Stdout throughput of [`STREAM_BYTES`] from a direct VM over `channel`'s agent channel.
async fn throughput(channel: &str, cfg: &FactoryConfig) -> Result<Throughput> {
    let factory = Factory::new(cfg).await?;
    let got = factory.get_vm(&cfg.vm).await;
    let closed = factory.close().await;
    let vm = got?;
    closed?;
    let count = STREAM_BYTES.to_string();
    let timed = async {
        let mut runs = Vec::new();
        for _ in 0..STREAMS {
            let t0 = Instant::now();
            let n = exec_drained(&vm, &["head", "-c", &count, "/dev/zero"]).await?;
            let secs = t0.elapsed().as_secs_f64();
            ensure!(
                n == STREAM_BYTES,
                "{n} of {STREAM_BYTES} bytes over {channel}"
            );
            runs.push(n as f64 / (1024.0 * 1024.0) / secs);
        }
        anyhow::Ok(runs)
    }
    .await;
    vm.stop().await?;
    let runs = timed?;
    Ok(Throughput {
        channel: channel.to_owned(),
        bytes: STREAM_BYTES,
        mib_per_s: median(runs.clone()),
        runs,
    })
}

/// Runs the workload bench under `root` (a tmpfs, as the default `/run/vc` is).
pub async fn run(env: &GuestEnv, root: &Path, runs: usize) -> Result<RunReport> {
    let cli = time_cli(env, &root.join("cli"), runs).await?;

    eprintln!("bench: {EXECS} sequential exec(true) in one VM from a template factory ...");
    let tpl_root = root.join("exec");
    std::fs::create_dir_all(&tpl_root)?;
    let tpl_cfg = crate::bench_factory::factory_config(env, &tpl_root, true, 0);
    let factory = Factory::new(&tpl_cfg).await?;
    let latency = exec_latency(&factory, &tpl_cfg).await;
    factory.close().await?;
    let exec_latency_ms = latency?;

    let backend = env
        .vhost_device_vsock
        .clone()
        .context("vhost-device-vsock missing (cargo xtask tools)")?;
    let channels = [
        ("virtio-serial", vm::config(env)),
        (
            "hybrid-vsock",
            vm::hybrid_vsock_config(vm::config(env), backend),
        ),
    ];
    let mut stdout_throughput = Vec::new();
    for (name, hv) in channels {
        eprintln!("bench: stdout throughput over {name} ({STREAMS} x 64 MiB, direct VM) ...");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let mut vm_cfg = vm::vm_config(hv);
        vm_cfg.run_root = dir;
        stdout_throughput.push(throughput(name, &FactoryConfig::new(vm_cfg)).await?);
    }
    Ok(RunReport {
        cli_profile: cli.profile,
        run_template_ratio: cli.template.median / cli.direct.median,
        run_template_ms: cli.template,
        run_cache_ms: cli.cache,
        run_direct_ms: cli.direct,
        run_cache_parts: cli.cache_parts,
        exec_latency_ms,
        stdout_throughput,
        anchors: ANCHORS,
    })
}

/// Prints the workload rows of the bench table.
pub fn report(r: &RunReport) {
    let row = crate::stat::print_row;
    let n = r.run_direct_ms.runs;
    println!(
        "vmfactory run -- true, start to exit ({} CLI):",
        r.cli_profile
    );
    row(&format!("run, direct boot (n={n})"), &r.run_direct_ms);
    row(&format!("run, template (n={n})"), &r.run_template_ms);
    row(&format!("run, cache hit (n={n})"), &r.run_cache_ms);
    let p = &r.run_cache_parts;
    for (name, ms) in [
        ("config load", p.config_ms),
        ("flags, file checks, signals", p.prepare_ms),
        ("connect to the cache server", p.connect_ms),
        ("run-root lock", p.lock_ms),
        ("get_vm over the cache socket", p.get_vm_ms),
        ("close the factory", p.close_ms),
        ("exec + wait `true`", p.exec_ms),
        ("stop: quit, QEMU exit, files", p.stop_ms),
        ("release the lock", p.release_ms),
        ("rest: process start, exit", p.rest_ms),
    ] {
        println!("{:<40} {:>9.1} ms", format!("  cache hit: {name}"), ms);
    }
    let l = &r.exec_latency_ms;
    println!(
        "{:<40} {:>9.1} ms {:>7.1} ms {:>7.1} ms",
        format!("exec true + drain + wait, p50 (n={})", l.n),
        l.p50,
        l.min,
        l.max
    );
    println!("{:<40} {:>9.1} ms", "exec true + drain + wait, p99", l.p99);
    for t in &r.stdout_throughput {
        println!(
            "{:<40} {:>9.1} MiB/s",
            format!("stdout {} MiB, {}", t.bytes >> 20, t.channel),
            t.mib_per_s
        );
    }
    println!(
        "{:<40} {:>12.3}   (target <= 0.05)",
        "run_template_ratio", r.run_template_ratio
    );
    println!(
        "{:<40} {:>9.1} ms   (target <= 50 ms)",
        "run_cache_ms", r.run_cache_ms.median
    );
    println!("anchors: {}", r.anchors);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_reads_only_timing_lines() {
        let log = concat!(
            r#"{"level":"DEBUG","fields":{"message":"step done","step":"get_vm","ms":1.5},"target":"vmfactory::timing"}"#,
            "\n",
            r#"{"level":"WARN","fields":{"message":"x","step":"get_vm","ms":9.0},"target":"other"}"#,
            "\nvmfactory: not json\n",
            r#"{"level":"DEBUG","fields":{"message":"step done","step":"stop","ms":2.0},"target":"vmfactory::timing"}"#,
        );
        let s = steps(log);
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("get_vm"), Some(&1.5));
        assert_eq!(s.get("stop"), Some(&2.0));
    }
}
