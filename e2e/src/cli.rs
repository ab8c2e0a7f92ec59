//! Running the `vmfactory` binary in a scenario: the binary built from this tree, a config
//! for a run root, and the checks every CLI test makes on an invocation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::{guest_env, scaled, GuestEnv, RunRoot};

/// The `vmfactory` binary, built now so that it is the current code (`VMFACTORY_BIN`
/// overrides). The e2e crate cannot use `CARGO_BIN_EXE_*` for another package's binary.
pub fn vmfactory_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("VMFACTORY_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "vmfactory"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building vmfactory failed");
    // <target>/debug/deps/cli-<hash> → <target>/debug/vmfactory
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("vmfactory");
    assert!(bin.is_file(), "{} missing", bin.display());
    bin
}

/// A config for `env` with everything under `root` (template, cache socket, VMs), a
/// VM-cache server of 2 VMs.
pub fn config(env: &GuestEnv, root: &Path) -> String {
    let root = root.display();
    format!(
        r#"[hypervisor.qemu]
path = "{qemu}"
kernel = "{kernel}"
initrd = "{initrd}"
default_vcpus = 1
default_maxvcpus = 4
default_memory = 256
memory_slots = 2
default_maxmemory = 1024
accel = "auto"
{cpu_model}
[agent]
dial_timeout_ms = {dial_ms}
call_timeout_ms = {call_ms}
ready_timeout_ms = {ready_ms}

[factory]
enable_template = true
template_path = "{root}/template"
vm_cache_number = 2
vm_cache_endpoint = "{root}/cache.sock"

[runtime]
run_root = "{root}"
"#,
        qemu = env.qemu.display(),
        cpu_model = crate::cpu_model()
            .map(|m| format!("cpu_model = \"{m}\"\n"))
            .unwrap_or_default(),
        dial_ms = scaled(Duration::from_secs(10)).as_millis(),
        call_ms = scaled(Duration::from_secs(10)).as_millis(),
        ready_ms = scaled(Duration::from_secs(60)).as_millis(),
        kernel = env.kernel.display(),
        initrd = env.initrd.display(),
    )
}

/// Runs the binary with `--config cfg` and `args`.
pub fn run(bin: &Path, cfg: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run vmfactory")
}

/// The stdout of a `status`: exit 0 (healthy) or 1 (degraded: a template or server that is
/// configured is not there yet, or no more), else its stderr is shown.
pub fn status_out(o: &Output, what: &str) -> String {
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "{what}: {:?} {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The stdout of `o`, which must have exited 0 (else its stderr is shown).
pub fn ok(o: &Output, what: &str) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One scenario's CLI, run root and config file; the config (and any output) live outside the
/// run root, in `scratch`, so they are not leaks.
#[derive(Debug)]
pub struct Setup {
    /// The binary.
    pub bin: PathBuf,
    /// The run root.
    pub root: RunRoot,
    /// Where the config and outputs go.
    pub scratch: tempfile::TempDir,
    /// The config file.
    pub cfg: PathBuf,
}

impl Setup {
    /// `None` when the guest image is missing outside CI (see `guest_env`). `cache` is
    /// `vm_cache_number`.
    pub fn new(cache: u32) -> Option<Self> {
        let env = guest_env()?;
        let bin = vmfactory_bin();
        let root = RunRoot::new();
        let scratch = tempfile::tempdir().expect("scratch dir");
        let cfg = scratch.path().join("config.toml");
        let text = config(&env, root.path())
            .replace("vm_cache_number = 2", &format!("vm_cache_number = {cache}"));
        fs::write(&cfg, text).expect("write config");
        Some(Self {
            bin,
            root,
            scratch,
            cfg,
        })
    }
}

/// A `get --hold` child: started, its VM printed; SIGTERM ends it (and its VM).
#[derive(Debug)]
pub struct Held(pub Child);

impl Held {
    /// Starts `get --hold` and reads the VM it prints.
    pub fn start(bin: &Path, cfg: &Path) -> (Self, serde_json::Value) {
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(cfg)
            .args(["get", "--hold"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn get --hold");
        let stdout = child.stdout.take().expect("stdout");
        let held = Self(child);
        // Pretty JSON, then it holds: read until the closing brace.
        let mut text = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let line = line.expect("read get --hold");
            text.push_str(&line);
            if line == "}" {
                break;
            }
        }
        let vm = serde_json::from_str(&text).expect("get --hold JSON");
        (held, vm)
    }

    /// SIGTERM, then its exit, which must be a success.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let exit = self.0.wait().expect("get --hold exits");
        assert!(exit.success(), "get --hold exited {exit}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A background `vmfactory init` (or any child), killed if the test ends before it exits.
#[derive(Debug)]
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
