//! A private containerd for the container tests and bench: Debian's `containerd` (1.6)
//! started as a child on its own socket, root and state directories under a directory the
//! caller gives (a [`crate::RunRoot`]'s, so the leak check covers it), with a generated
//! config (no CRI plugin, overlayfs snapshotter, no registry), and `ctr` run against it.
//!
//! containerd finds a shim v2 runtime `io.containerd.NAME.v2` as the binary
//! `containerd-shim-NAME-v2` on its `PATH`; [`ContainerdConfig::shim_dir`] is put first on the
//! child's `PATH`, so the shim built from this tree is the one that runs. The child's
//! environment reaches the shims it starts ([`ContainerdConfig::env`], e.g. the vmfactory
//! configuration the shim should read).
//!
//! Dropping a [`Containerd`] deletes the tasks and containers left in its namespace (through
//! containerd, so their shims clean up), stops containerd, kills any shim of its socket still
//! running, unmounts what is left under its directory and removes the directory.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The namespace the harness's `ctr` commands use.
pub const NAMESPACE: &str = "vmfactory-test";

/// containerd's name for the vmfactory runtime (`ctr run --runtime`).
pub const VMFACTORY_RUNTIME: &str = "io.containerd.vmfactory.v2";

/// The binary containerd looks up on its `PATH` for [`VMFACTORY_RUNTIME`].
pub const SHIM_BINARY: &str = "containerd-shim-vmfactory-v2";

/// runc's runtime name, containerd's default.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// How long containerd may take to answer `ctr version` after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long containerd may take to exit on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to start containerd with.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ContainerdConfig {
    /// Where containerd's socket, root, state, config and log go (created; removed on drop).
    /// Keep it short: the socket path must fit in 108 bytes.
    pub dir: PathBuf,
    /// A directory holding [`SHIM_BINARY`], put first on containerd's `PATH`.
    pub shim_dir: Option<PathBuf>,
    /// Extra environment for containerd, which its shims inherit.
    pub env: Vec<(String, String)>,
    /// Log level of containerd (`info` when empty); `debug` shows the shims' logs too.
    pub log_level: String,
}

impl ContainerdConfig {
    /// Everything under `dir`, no shim directory, no extra environment.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Self::default()
        }
    }

    /// With [`SHIM_BINARY`] looked up in `shim_dir` first.
    pub fn shim_dir(mut self, shim_dir: impl Into<PathBuf>) -> Self {
        self.shim_dir = Some(shim_dir.into());
        self
    }

    /// With `key=value` in containerd's (and so the shims') environment.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// A running containerd, stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd as [`ContainerdConfig`] says and waits until `ctr version` answers.
    pub fn start(cfg: &ContainerdConfig) -> Result<Self> {
        ensure!(
            crate::find_on_path("containerd").is_some() && crate::find_on_path("ctr").is_some(),
            "containerd is not installed (run `cargo xtask tools`)"
        );
        if let Some(dir) = &cfg.shim_dir {
            let shim = dir.join(SHIM_BINARY);
            ensure!(shim.is_file(), "No shim binary at {}", shim.display());
        }
        fs::create_dir_all(&cfg.dir)
            .with_context(|| format!("Cannot create {}", cfg.dir.display()))?;
        let socket = cfg.dir.join("containerd.sock");
        let config = cfg.dir.join("config.toml");
        fs::write(&config, config_toml(&cfg.dir))
            .with_context(|| format!("Cannot write {}", config.display()))?;
        let log = fs::File::create(cfg.dir.join("containerd.log"))?;
        let mut path = std::env::var_os("PATH").unwrap_or_default();
        if let Some(dir) = &cfg.shim_dir {
            let mut dirs = vec![dir.clone()];
            dirs.extend(std::env::split_paths(&path));
            path = std::env::join_paths(dirs).context("Shim directory not usable in PATH")?;
        }
        let level = if cfg.log_level.is_empty() {
            "info"
        } else {
            &cfg.log_level
        };
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .args(["--log-level", level])
            .env("PATH", path)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&cfg.dir);
                return Err(anyhow::Error::new(e).context("Cannot start containerd"));
            }
        };
        let mut me = Self {
            child: Some(child),
            dir: cfg.dir.clone(),
            socket,
        };
        me.wait_ready()?;
        Ok(me)
    }

    /// [`Containerd::start`], or `None` (with a message) when containerd is not installed or
    /// this is not root, outside CI; under `CI=true` or `VMFACTORY_E2E_REQUIRE=1` that panics,
    /// as does a containerd that is there but does not start.
    pub fn start_or_skip(cfg: &ContainerdConfig) -> Option<Self> {
        let missing = if crate::find_on_path("containerd").is_none()
            || crate::find_on_path("ctr").is_none()
            || crate::find_on_path("runc").is_none()
        {
            Some("containerd, ctr or runc is not installed (run `cargo xtask tools`)")
        } else if !nix::unistd::geteuid().is_root() {
            Some("containerd needs root")
        } else {
            None
        };
        if let Some(why) = missing {
            assert!(
                !crate::required(),
                "the container tests must run here (CI=true or {}=1), but {why}",
                crate::REQUIRE_ENV
            );
            eprintln!("SKIPPED: {why}");
            return None;
        }
        Some(Self::start(cfg).unwrap_or_else(|e| panic!("{e:#}")))
    }

    /// Polls `ctr version` until it answers (or containerd exits, or the bound passes).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + crate::scaled(START_TIMEOUT);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("containerd exited ({status}): {}", self.log_tail());
                }
            }
            if self.socket.exists() && self.ctr(&["version"]).status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd did not answer within {:?}: {}",
                    START_TIMEOUT,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory everything of this containerd lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's log so far (its shims log there too).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// The warning and error lines of containerd's log (its shims' too), for a failure's
    /// message.
    pub fn log_problems(&self) -> String {
        self.log()
            .lines()
            .filter(|l| {
                ["level=warn", "level=error", " WARN ", " ERROR "]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `ctr --address SOCKET -n NAMESPACE`, for a caller that spawns it itself (a terminal,
    /// many at once, its own stdio).
    pub fn ctr_command(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", NAMESPACE]);
        cmd
    }

    /// Runs `ctr … args` with no stdin; its output and exit status.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_stdin(args, None)
    }

    /// Runs `ctr … args` with `stdin` written to its standard input (then closed), or with
    /// no stdin at all for `None`.
    pub fn ctr_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.ctr_command();
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let result = cmd.spawn().and_then(|mut child| {
            if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
                // A process that exits without reading is not an error of ours.
                let _ = pipe.write_all(data);
            }
            child.wait_with_output()
        });
        result.unwrap_or_else(|e| Output {
            status: failed_status(),
            stdout: Vec::new(),
            stderr: format!("cannot run ctr: {e}").into_bytes(),
        })
    }

    /// Like [`Containerd::ctr`], failing unless `ctr` exits 0; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args);
        ensure!(
            out.status.success(),
            "ctr {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports an OCI image tarball (`ctr image import`) unless an image named `reference`
    /// is already there; returns `reference`.
    pub fn import(&self, tarball: &Path, reference: &str) -> Result<String> {
        let listed = self.ctr_ok(&["image", "ls", "-q"])?;
        if !listed.lines().any(|l| l.trim() == reference) {
            let tarball = tarball.to_str().context("Image path is not UTF-8")?;
            self.ctr_ok(&["image", "import", tarball])?;
            let listed = self.ctr_ok(&["image", "ls", "-q"])?;
            ensure!(
                listed.lines().any(|l| l.trim() == reference),
                "ctr image import of {tarball} made no image {reference}"
            );
        }
        Ok(reference.to_string())
    }

    /// Imports the busybox test image ([`crate::oci`]), building it first if needed;
    /// returns its reference.
    pub fn import_busybox(&self) -> Result<String> {
        let tarball = match std::env::var_os(crate::oci::IMAGE_ENV) {
            Some(path) => PathBuf::from(path),
            None => crate::oci::ensure_image(&crate::oci::cache_dir(), true)?,
        };
        self.import(&tarball, crate::oci::IMAGE_REF)
    }

    /// The containers in the namespace.
    pub fn containers(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr_ok(&["containers", "ls", "-q"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Stops containerd, as dropping it does, but reports what could not be cleaned up.
    pub fn stop(mut self) -> Result<()> {
        let problems = self.shutdown();
        ensure!(problems.is_empty(), "containerd cleanup: {problems}");
        Ok(())
    }

    /// Deletes leftover tasks and containers, stops containerd, kills shims of this socket,
    /// unmounts and removes the directory; what went wrong, if anything.
    fn shutdown(&mut self) -> String {
        let mut problems = String::new();
        let Some(mut child) = self.child.take() else {
            return problems;
        };
        if matches!(child.try_wait(), Ok(None)) {
            for id in self.containers().unwrap_or_default() {
                // Through containerd, so the shim ends the task's VM or process itself.
                let _ = self.ctr(&["task", "delete", "--force", &id]);
                let out = self.ctr(&["containers", "delete", &id]);
                if !out.status.success() {
                    let _ = write!(problems, "container {id} not deleted; ");
                }
            }
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = write!(problems, "containerd ignored SIGTERM; ");
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        // Shims outlive containerd by design; those of this socket are this harness's.
        let dir = self.dir.to_string_lossy().into_owned();
        for line in crate::processes_mentioning(&dir) {
            let pid = line
                .strip_prefix("process ")
                .and_then(|l| l.split(':').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = write!(problems, "{line} left; ");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let mut mounts: Vec<String> = crate::mounts_under(&dir)
            .into_iter()
            .filter_map(|m| m.strip_prefix("mount ").map(str::to_owned))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = write!(problems, "mount {m} left; ");
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            let _ = write!(problems, "cannot remove {dir}: {e}; ");
        }
        problems
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let problems = self.shutdown();
        if !problems.is_empty() {
            eprintln!("containerd harness cleanup: {problems}");
        }
    }
}

/// containerd's config (v2, as 1.6 reads it): everything under `dir`, the CRI plugin off
/// (`ctr` talks to the task and image services directly), overlayfs snapshots (the
/// default snapshotter; its root named so the leak check sees it under `dir`).
fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"

[plugins."io.containerd.snapshotter.v1.overlayfs"]
  root_path = "{d}/root/overlayfs"
"#
    )
}

/// A non-zero exit status for a `ctr` that could not be started.
fn failed_status() -> std::process::ExitStatus {
    use std::os::unix::process::ExitStatusExt as _;
    std::process::ExitStatus::from_raw(127 << 8)
}

/// The shim binary built from this tree now, so it is the current code (`VMFACTORY_SHIM_BIN`
/// overrides): `<target>/debug/containerd-shim-vmfactory-v2`, beside the test binaries' dir.
pub fn shim_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VMFACTORY_SHIM_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "vmfactory-shim"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the shim failed");
    // <target>/debug/deps/<test>-<hash> → <target>/debug/<shim>
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(SHIM_BINARY);
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keeps_everything_under_the_dir_and_drops_cri() {
        let text = config_toml(Path::new("/tmp/x"));
        let parsed: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(parsed["version"].as_integer(), Some(2));
        for key in ["root", "state"] {
            assert!(parsed[key].as_str().expect(key).starts_with("/tmp/x/"));
        }
        for section in ["grpc", "ttrpc", "debug"] {
            let addr = parsed[section]["address"].as_str().expect(section);
            assert!(addr.starts_with("/tmp/x/"), "{section}: {addr}");
        }
        assert_eq!(parsed["disabled_plugins"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn a_missing_shim_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg = ContainerdConfig::new(dir.path().join("c")).shim_dir(dir.path());
        let err = Containerd::start(&cfg).expect_err("no shim there");
        let text = format!("{err:#}");
        assert!(
            text.contains(SHIM_BINARY) || text.contains("not installed"),
            "{text}"
        );
        assert!(!dir.path().join("c").exists(), "nothing created");
    }
}
