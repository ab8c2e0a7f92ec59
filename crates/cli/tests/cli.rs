//! The `vmfactory` binary, run for real: every subcommand, the exit codes (0 ok, 1 runtime
//! failure, 2 bad usage or config), the one-line error of bad configurations and of bad stored
//! inputs (template metadata, VM state, wire forms). No QEMU is started here (the guest files
//! are empty placeholders); `e2e/tests/cli.rs` boots VMs.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

// `inspect` (and `status` on the same template metadata), in a file of its own for size.
#[path = "cli/inspect.rs"]
mod inspect;
// FIFOs, devices, symlinks and oversized files where vmfactory reads: refused at once.
#[path = "cli/hostile.rs"]
mod hostile;
// A Kata user's file: all problems at once, warnings, the QEMU check.
#[path = "cli/kata.rs"]
mod kata;
// Orphaned VMs: `status` and `destroy`, in a file of its own for size.
#[path = "cli/leftovers.rs"]
mod leftovers;
// Suggestions, VMFACTORY_CONFIG, --log-level, colour, --version, completions, man, list, stop.
#[path = "cli/conventions.rs"]
mod conventions;
// `logs`, and `destroy` of the logs of VMs that failed to come up.
#[path = "cli/logs.rs"]
mod logs;

#[path = "cli/metrics.rs"]
mod metrics;

const BIN: &str = env!("CARGO_BIN_EXE_vmfactory");

/// A scratch directory with placeholder guest files and a config pointing everything there.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-cli-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::write(dir.path().join("vmlinuz"), b"kernel").expect("kernel");
        std::fs::write(dir.path().join("initramfs.cpio"), b"initrd").expect("initrd");
        fake_qemu(dir.path(), "qemu-system-x86_64", FAKE_QEMU_VERSION);
        Self { dir }
    }

    /// `PATH` with this directory first: the configs' bare `qemu-system-x86_64` is the fake.
    fn path_env(&self) -> std::ffi::OsString {
        with_path(self.path())
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A valid config with `[factory]` as given; relative guest paths (resolved against the
    /// config's directory).
    fn config(&self, template: bool, cache: u32) -> String {
        let root = self.path().display();
        format!(
            r#"[hypervisor.qemu]
kernel = "vmlinuz"
initrd = "initramfs.cpio"
default_vcpus = 1
default_maxvcpus = 4
default_memory = 256
memory_slots = 2
default_maxmemory = 1024
accel = "tcg"

[factory]
enable_template = {template}
template_path = "{root}/tpl"
vm_cache_number = {cache}
vm_cache_endpoint = "{root}/cache.sock"

[runtime]
run_root = "{root}/run"
"#
        )
    }

    fn write(&self, text: &str) -> PathBuf {
        let p = self.path().join("config.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    fn run(&self, config: &Path, args: &[&str]) -> Output {
        self.run_with_stdin(config, args, b"")
    }

    /// [`Scratch::run`] with `input` on standard input.
    fn run_with_stdin(&self, config: &Path, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .env_remove("RUST_LOG")
            .env("PATH", self.path_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run vmfactory");
        let mut stdin = child.stdin.take().expect("stdin");
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || stdin.write_all(input));
            let output = child.wait_with_output().expect("wait for vmfactory");
            // A command that does not read its input may exit first: a broken pipe is fine.
            let _ = writer.join();
            output
        })
    }
}

/// What the fake QEMU's `--version` prints first.
const FAKE_QEMU_VERSION: &str = "QEMU emulator version 7.2.0 (fake)";

/// A script at `dir/name` that prints `banner` for `--version` and exits 0 for anything else
/// (so an accelerator probe boot with it fails at once): `config check` runs the QEMU binary,
/// and these tests start no real QEMU.
fn fake_qemu(dir: &Path, name: &str, banner: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!("#!/bin/sh\necho '{banner}'\necho 'Copyright'\n"),
    )
    .expect("qemu");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// `PATH` with `dir` first.
fn with_path(dir: &Path) -> std::ffi::OsString {
    let mut dirs = vec![dir.to_owned()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).expect("PATH")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit code `code` and a single `vmfactory: ` error line containing every `needle`.
fn assert_one_line_error(o: &Output, code: i32, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(lines[0].starts_with("vmfactory: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
}

#[test]
fn help_and_usage_errors() {
    let o = Command::new(BIN).arg("--help").output().expect("run");
    assert_eq!(o.status.code(), Some(0));
    for cmd in ["init", "status", "destroy", "get", "config", "inspect"] {
        assert!(stdout(&o).contains(cmd), "{cmd} missing from --help");
    }
    let o = Command::new(BIN)
        .args(["get", "--help"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("--hold"));

    let o = Command::new(BIN).arg("frobnicate").output().expect("run");
    assert_one_line_error(&o, 2, &["frobnicate"]);
    let o = Command::new(BIN).output().expect("run");
    assert_eq!(o.status.code(), Some(2), "no subcommand");
    let o = Command::new(BIN)
        .args(["--log-format", "xml", "status"])
        .output()
        .expect("run");
    assert_one_line_error(&o, 2, &["xml"]);
}

#[test]
fn config_default_parses_back_and_validates() {
    let s = Scratch::new();
    let o = Command::new(BIN)
        .args(["config", "default"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert!(text.contains("[hypervisor.qemu]") && text.contains("[factory]"));
    // Keep it off /run: the same file with its paths under the scratch dir; its relative guest
    // paths then resolve against the scratch dir, where the placeholders are.
    let root = s.path().display().to_string();
    let text = text
        .replace("/run/vc/vm/template", &format!("{root}/tpl"))
        .replace("/run/vc/cache.sock", &format!("{root}/cache.sock"))
        .replace("\"/run/vc\"", &format!("\"{root}/run\""));
    assert!(!text.contains("/run/vc"), "every /run/vc path replaced");
    let cfg = s.write(&text);
    let o = s.run(&cfg, &["config", "check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("OK"));
}

#[test]
fn embedded_default_uses_the_guest_dir_from_the_environment() {
    if Path::new("/etc/vmfactory/config.toml").exists() {
        eprintln!("SKIPPED: /etc/vmfactory/config.toml exists and would be used");
        return;
    }
    let s = Scratch::new();
    let o = Command::new(BIN)
        .args(["config", "check"])
        .env("VMFACTORY_GUEST_DIR", s.path())
        .env("PATH", s.path_env())
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("embedded default"));
    let empty = tempfile::tempdir().expect("tempdir");
    let o = Command::new(BIN)
        .args(["config", "check"])
        .env("VMFACTORY_GUEST_DIR", empty.path())
        .env("PATH", s.path_env())
        .output()
        .expect("run");
    assert_one_line_error(&o, 2, &["embedded default", "Kernel", "cargo xtask guest"]);
}

#[test]
fn status_on_a_fresh_root_says_off_and_degraded() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 2));
    // A template and a VM-cache server are configured and neither is there: a health probe
    // must fail (exit 1), with both reasons.
    let o = s.run(&cfg, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("factory:       off"), "{out}");
    assert!(out.contains("health:        degraded"), "{out}");
    assert!(
        out.contains("absent") && out.contains("not running"),
        "{out}"
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("no template at") && err.contains("cache.sock: not running"),
        "{err}"
    );

    let o = s.run(&cfg, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["factory"], "off");
    assert_eq!(v["health"], "degraded");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["template"]["present"], false);
    assert_eq!(v["template"]["enabled"], true);
    assert_eq!(v["cache_server"]["running"], false);
    assert_eq!(v["cache_server"]["vm_cache_number"], 2);
    assert!(!s.path().join("run").exists(), "status creates nothing");

    // A direct factory needs nothing running: healthy.
    let cfg = s.write(&s.config(false, 0));
    let o = s.run(&cfg, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["health"], "ok");
}

#[test]
fn status_reports_an_unusable_template_and_exits_2() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    std::fs::create_dir(s.path().join("tpl")).expect("mkdir");
    std::fs::write(s.path().join("tpl/metadata.json"), b"{not json").expect("write");
    let o = s.run(&cfg, &["status", "--json"]);
    // Bad stored input: exit 2 and one line, after the report of everything else.
    assert_one_line_error(&o, 2, &["metadata.json", "corrupt"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["factory"], "on");
    assert_eq!(v["template"]["present"], true);
    assert!(v["template"]["error"].is_string());
}

#[test]
fn destroy_is_idempotent_and_cleans_stale_state() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 2));
    // Leftovers: a template directory vmfactory made (its marker says so) and a socket nobody
    // listens on.
    let tpl = s.path().join("tpl");
    std::fs::create_dir(&tpl).expect("mkdir");
    for f in ["memory", "state", "metadata.json"] {
        std::fs::write(tpl.join(f), b"x").expect("write");
    }
    std::fs::write(
        tpl.join(".vmfactory-template"),
        br#"{"version":1,"created_dir":true,"mounted":false}"#,
    )
    .expect("marker");
    drop(std::os::unix::net::UnixListener::bind(s.path().join("cache.sock")).expect("bind"));

    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("removed the stale socket"), "{out}");
    assert!(out.contains("removed the template"), "{out}");
    assert!(!tpl.exists() && !s.path().join("cache.sock").exists());

    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "nothing to destroy");
}

/// A `template_path` pointing at a directory vmfactory did not make (no marker): `destroy`
/// touches nothing there, whatever its files are called.
#[test]
fn destroy_leaves_a_directory_vmfactory_did_not_make() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    let tpl = s.path().join("tpl");
    std::fs::create_dir(&tpl).expect("mkdir");
    for f in ["memory", "state", "metadata.json", "notes.txt"] {
        std::fs::write(tpl.join(f), b"precious").expect("write");
    }
    let o = s.run(&cfg, &["destroy"]);
    assert_one_line_error(&o, 1, &["not a template vmfactory made", "left untouched"]);
    for f in ["memory", "state", "metadata.json", "notes.txt"] {
        assert_eq!(std::fs::read(tpl.join(f)).expect("kept"), b"precious");
    }
}

#[test]
fn destroy_refuses_to_remove_a_file_that_is_not_a_socket() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 1));
    std::fs::write(s.path().join("cache.sock"), b"precious").expect("write");
    let o = s.run(&cfg, &["destroy"]);
    assert_one_line_error(&o, 1, &["not a socket"]);
    assert!(s.path().join("cache.sock").exists());
}

#[test]
fn get_rejects_bad_sizes_with_2_and_a_missing_factory_with_1() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    for (args, needle) in [
        (&["get", "--vcpus", "0"][..], "--vcpus"),
        (&["get", "--vcpus", "5"][..], "--vcpus 5"),
        (&["get", "--memory", "4096"][..], "--memory 4096"),
        (&["get", "--memory", "128"][..], "--memory 128"),
        (&["get", "--vcpus", "two"][..], "two"),
    ] {
        let o = s.run(&cfg, args);
        assert_one_line_error(&o, 2, &[needle]);
    }
    // No template was made: a runtime failure that says what to do.
    let o = s.run(&cfg, &["get"]);
    assert_one_line_error(&o, 1, &["vmfactory init"]);
    let cfg = s.write(&s.config(false, 1));
    let o = s.run(&cfg, &["get"]);
    assert_one_line_error(&o, 1, &["No VM-cache server", "vmfactory init"]);
}

#[test]
fn get_sizes_follow_the_library_rule() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    // The largest size the config allows passes the check (and fails only for want of a
    // template here); one past it is refused up front by the same rule.
    for args in [
        &["get", "--memory", "1024"][..],
        &["get", "--vcpus", "4", "--memory", "1024"],
    ] {
        let o = s.run(&cfg, args);
        assert_one_line_error(&o, 1, &["vmfactory init"]);
    }
    let o = s.run(&cfg, &["get", "--memory", "1025"]);
    assert_one_line_error(&o, 2, &["--memory 1025 is outside 256..=1024 MiB"]);
    let cfg = s.write(
        &s.config(true, 0)
            .replace("memory_slots = 2", "memory_slots = 0"),
    );
    let o = s.run(&cfg, &["get", "--memory", "512"]);
    assert_one_line_error(&o, 2, &["--memory 512", "memory_slots"]);
}

#[test]
fn arguments_that_are_not_utf8_are_usage_errors_not_panics() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    let bad = OsStr::from_bytes(b"caf\xe9");
    for args in [
        vec![OsStr::new("inspect"), OsStr::new("vm"), bad],
        vec![OsStr::new("get"), OsStr::new("--memory"), bad],
        vec![OsStr::new("--verbose"), bad],
        vec![bad],
    ] {
        let o = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(&args)
            .output()
            .expect("run");
        if args[0] == "--verbose" {
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
            assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        } else {
            assert_one_line_error(&o, 2, &[]);
        }
    }
    // Where an argument is a path, any bytes are a path: here, one that does not exist.
    let missing = s.path().join(OsStr::from_bytes(b"caf\xe9.toml"));
    let o = Command::new(BIN)
        .arg("--config")
        .arg(&missing)
        .arg("status")
        .output()
        .expect("run");
    assert_one_line_error(&o, 2, &["Cannot read config", "caf"]);
}

#[test]
fn init_with_nothing_enabled_is_a_usage_error() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let o = s.run(&cfg, &["init"]);
    assert_one_line_error(&o, 2, &["Nothing to initialise"]);
}

#[test]
fn verbose_prints_the_chain_and_json_logs_are_json() {
    let s = Scratch::new();
    let missing = s.path().join("nope.toml");
    let o = s.run(&missing, &["status"]);
    assert_one_line_error(&o, 2, &["Cannot read config", "No such file"]);
    let o = s.run(&missing, &["--verbose", "status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).lines().count() >= 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("caused by"));

    let cfg = s.write(&s.config(false, 0));
    let o = Command::new(BIN)
        .args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .arg("status")
        .env("RUST_LOG", "debug")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let logs = stderr(&o);
    assert!(!logs.is_empty(), "debug logs expected");
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("a JSON log line");
    }
}

#[test]
fn bad_configs_fail_with_2_and_one_line() {
    let s = Scratch::new();
    let good = s.config(true, 0);
    // (what, edit of the good config, substrings of the error line)
    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
        (
            "unknown key",
            Box::new(|t: &str| {
                t.replace("accel = \"tcg\"", "accel = \"tcg\"\nkernal_params = \"\"")
            }),
            vec!["line 10", "kernal_params"],
        ),
        (
            "unknown section",
            Box::new(|t: &str| format!("{t}\n[shim]\npath = \"/x\"\n")),
            vec!["line 20", "unknown section [shim]"],
        ),
        (
            "missing QEMU",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\npath = \"/nonexistent/qemu\"",
                )
            }),
            vec![
                "line 10",
                "QEMU /nonexistent/qemu cannot be run",
                "No such file",
            ],
        ),
        (
            "QEMU not executable",
            Box::new(|t: &str| {
                t.replace("accel = \"tcg\"", "accel = \"tcg\"\npath = \"./vmlinuz\"")
            }),
            vec!["line 10", "/./vmlinuz cannot be run", "Permission denied"],
        ),
        (
            "not QEMU",
            Box::new(|t: &str| {
                t.replace("accel = \"tcg\"", "accel = \"tcg\"\npath = \"/bin/true\"")
            }),
            vec!["line 10", "/bin/true is not QEMU"],
        ),
        (
            "wrong type",
            Box::new(|t: &str| t.replace("default_vcpus = 1", "default_vcpus = \"one\"")),
            vec!["line 4", "invalid type", "\"one\""],
        ),
        (
            "not TOML",
            Box::new(|t: &str| t.replace("default_memory = 256", "default_memory = = 256")),
            vec!["line 6"],
        ),
        (
            "zero memory",
            Box::new(|t: &str| t.replace("default_memory = 256", "default_memory = 0")),
            vec!["line 6", "default_memory must be at least 1 MiB"],
        ),
        (
            "vcpus > max",
            Box::new(|t: &str| t.replace("default_vcpus = 1", "default_vcpus = 8")),
            vec!["line 5", "default_vcpus (8) exceeds default_maxvcpus (4)"],
        ),
        (
            "memory > max",
            Box::new(|t: &str| t.replace("default_memory = 256", "default_memory = 2048")),
            vec![
                "line 8",
                "default_memory (2048 MiB) exceeds default_maxmemory",
            ],
        ),
        (
            "slots without room",
            Box::new(|t: &str| t.replace("default_maxmemory = 1024", "default_maxmemory = 256")),
            vec!["line 7", "memory_slots"],
        ),
        (
            "bad metrics address",
            Box::new(|t: &str| {
                t.replace(
                    "vm_cache_number = 0",
                    "vm_cache_number = 0\nmetrics_address = \"localhost:9464\"",
                )
            }),
            vec![
                "line 15",
                "metrics_address must be IP:PORT",
                "\"localhost:9464\"",
            ],
        ),
        (
            "missing kernel file",
            Box::new(|t: &str| t.replace("kernel = \"vmlinuz\"", "kernel = \"nope/vmlinuz\"")),
            vec!["line 2", "Kernel", "nope/vmlinuz"],
        ),
        (
            "no kernel key",
            Box::new(|t: &str| t.replace("kernel = \"vmlinuz\"\n", "")),
            vec!["kernel"],
        ),
        (
            "template with an image",
            Box::new(|t: &str| {
                t.replace("accel = \"tcg\"", "accel = \"tcg\"\nimage = \"vmlinuz\"")
            }),
            vec!["line 10", "enable_template", "image"],
        ),
        (
            "template without initrd",
            Box::new(|t: &str| t.replace("initrd = \"initramfs.cpio\"\n", "")),
            vec!["enable_template", "initrd"],
        ),
        (
            "relative run root",
            Box::new(|t: &str| {
                let root = t.lines().last().unwrap_or_default().to_owned();
                t.replace(&root, "run_root = \"run\"")
            }),
            vec!["line 18", "run_root must be an absolute path"],
        ),
        (
            "relative endpoint",
            Box::new(|t: &str| {
                let line = t
                    .lines()
                    .find(|l| l.starts_with("vm_cache_endpoint"))
                    .unwrap_or_default()
                    .to_owned();
                t.replace(&line, "vm_cache_endpoint = \"cache.sock\"")
            }),
            vec!["line 15", "vm_cache_endpoint"],
        ),
        (
            "bad accel",
            Box::new(|t: &str| t.replace("accel = \"tcg\"", "accel = \"hvf\"")),
            vec!["line 9", "hvf"],
        ),
        (
            "bad machine type",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\nmachine_type = \"virt\"",
                )
            }),
            vec!["line 10", "virt"],
        ),
        (
            "microvm with hotplug",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\nmachine_type = \"microvm\"",
                )
            }),
            vec!["hotplug"],
        ),
        (
            "zero agent timeout",
            Box::new(|t: &str| format!("{t}\n[agent]\ncall_timeout_ms = 0\n")),
            vec!["line 21", "call_timeout_ms must not be 0"],
        ),
        (
            "bad proxy kind",
            Box::new(|t: &str| format!("{t}\n[proxy]\nkind = \"kata\"\n")),
            vec!["line 21", "kata"],
        ),
        (
            "hybrid vsock template",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\nagent_channel = \"hybrid-vsock\"",
                )
            }),
            vec!["line 10", "hybrid-vsock"],
        ),
        (
            "negative cache size",
            Box::new(|t: &str| t.replace("vm_cache_number = 0", "vm_cache_number = -1")),
            vec!["line 14"],
        ),
        (
            "huge max memory",
            Box::new(|t: &str| {
                t.replace(
                    "default_maxmemory = 1024",
                    "default_maxmemory = 99999999999",
                )
            }),
            vec![],
        ),
        (
            "max vcpus below vcpus",
            Box::new(|t: &str| {
                t.replace("default_maxvcpus = 4", "default_maxvcpus = 0")
                    .replace("default_vcpus = 1", "default_vcpus = 9999")
            }),
            vec!["line 5", "default_vcpus (9999) exceeds default_maxvcpus ("],
        ),
        (
            "negative memory slots",
            Box::new(|t: &str| t.replace("memory_slots = 2", "memory_slots = -2")),
            vec!["line 7"],
        ),
        (
            "machine type of the wrong type",
            Box::new(|t: &str| t.replace("accel = \"tcg\"", "accel = \"tcg\"\nmachine_type = 35")),
            vec!["line 10"],
        ),
        (
            "host cpu model under tcg",
            Box::new(|t: &str| {
                t.replace("accel = \"tcg\"", "accel = \"tcg\"\ncpu_model = \"host\"")
            }),
            vec!["line 10", "cpu_model = \"host\" needs KVM"],
        ),
        (
            "malformed cpu model",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\ncpu_model = \"max -smp 64\"",
                )
            }),
            vec!["line 10", "Invalid CPU model \"max -smp 64\""],
        ),
        (
            "unknown agent channel",
            Box::new(|t: &str| {
                t.replace(
                    "accel = \"tcg\"",
                    "accel = \"tcg\"\nagent_channel = \"pigeon\"",
                )
            }),
            vec!["line 10", "pigeon"],
        ),
        (
            "relative template path",
            Box::new(|t: &str| {
                let start = t.find("template_path = ").expect("key");
                let end = start + t[start..].find('\n').expect("eol");
                format!("{}template_path = \"tpl\"{}", &t[..start], &t[end..])
            }),
            vec![],
        ),
    ];
    // Template paths vmfactory must never mount over or remove files from (line 13).
    let template_path = |to: &'static str| -> Edit {
        Box::new(move |t: &str| {
            let start = t.find("template_path = ").expect("key");
            let end = start + t[start..].find('\n').expect("eol");
            format!("{}template_path = \"{to}\"{}", &t[..start], &t[end..])
        })
    };
    let mut cases = cases;
    cases.extend([
        (
            "template path /",
            template_path("/"),
            vec!["line 13", "template_path / is the root directory"],
        ),
        (
            "template path /etc",
            template_path("/etc"),
            vec!["line 13", "template_path /etc is a system directory"],
        ),
        (
            "template path the default run root",
            template_path("/run/vc"),
            vec!["line 13", "template_path /run/vc is a run root"],
        ),
        (
            "template path with ..",
            template_path("/run/vc/vm/../../../etc"),
            vec!["line 13", "has a .. component"],
        ),
    ]);
    assert!(cases.len() >= 25, "{} bad configs", cases.len());
    for (what, edit, needles) in cases {
        let text = edit(&good);
        assert_ne!(text, good, "{what}: the edit changed nothing");
        let cfg = s.write(&text);
        let o = s.run(&cfg, &["config", "check"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {err}");
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("vmfactory: "), "{what}: {err}");
        assert!(
            err.contains(&cfg.display().to_string()),
            "{what}: names the file: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{what}: {n:?} not in {err}");
        }
    }
}
