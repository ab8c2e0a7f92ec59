//! `config check` on a Kata user's file: every problem in one run (exit 2, one line each),
//! Kata keys we do not read as warnings (exit 0), and the QEMU it would run.

use std::path::Path;

use super::{fake_qemu, stderr, stdout, Scratch, FAKE_QEMU_VERSION};

/// A Kata 1.x-style file with the scratch dir's guest files: `extra` goes at the end of
/// `[hypervisor.qemu]` (line 12 on).
fn kata_file(s: &Scratch, extra: &str) -> String {
    let root = s.path().display();
    format!(
        r#"[hypervisor.qemu]
path = "qemu-system-x86_64"
kernel = "vmlinuz"
initrd = "initramfs.cpio"
machine_type = "q35"
accel = "tcg"
default_vcpus = 1
default_maxvcpus = 0
default_memory = 256
default_bridges = 1
use_vsock = true
{extra}
[factory]
enable_template = true
template_path = "{root}/tpl"
vm_cache_endpoint = "{root}/cache.sock"

[proxy.kata]
path = "/usr/libexec/kata-containers/kata-proxy"

[shim.kata]
path = "/usr/libexec/kata-containers/kata-shim"

[agent.kata]
dial_timeout = 30

[netmon]
enable_netmon = false

[runtime]
run_root = "{root}/run"
internetworking_model = "tcfilter"
"#
    )
}

#[test]
fn a_kata_file_gets_all_its_problems_in_one_run() {
    let s = Scratch::new();
    let text = kata_file(
        &s,
        "kernal_params = \"quiet\"\ndefault_memory_mb = 512\nmsize_9p = \"big\"\n",
    )
    .replace("enable_template = true", "enable_template = \"yes\"");
    let cfg = s.write(&text);
    let o = s.run(&cfg, &["config", "check"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let file = cfg.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines[0],
        format!("vmfactory: 3 problems in {file}"),
        "{err}"
    );
    assert_eq!(
        lines[1..],
        [
            format!("{file} line 12: unknown key `kernal_params` in [hypervisor.qemu] (did you mean `kernel_params`?)"),
            format!("{file} line 13: unknown key `default_memory_mb` in [hypervisor.qemu] (did you mean `default_memory`?)"),
            format!("{file} line 17: `enable_template` in [factory]: invalid type: string \"yes\", expected a boolean"),
        ],
        "{err}"
    );
    assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    // Another command with the same file: the same problems, on one line.
    let o = s.run(&cfg, &["status"]);
    let err = stderr(&o);
    assert_eq!(
        (o.status.code(), err.lines().count()),
        (Some(2), 1),
        "{err}"
    );
    assert!(
        err.contains("3 problems in") && err.contains("line 17"),
        "{err}"
    );
}

#[test]
fn kata_keys_we_do_not_read_are_warnings_and_the_check_passes() {
    let s = Scratch::new();
    let cfg = s.write(&kata_file(&s, "enable_iothreads = true\n"));
    let o = s.run(&cfg, &["config", "check"]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{err}");
    let file = cfg.display().to_string();
    let warnings: Vec<&str> = err.lines().collect();
    let at = |line: u32| format!("vmfactory: warning: {file} line {line}: Kata's ");
    for (line, key) in [
        (10, "`default_bridges` in [hypervisor.qemu] is ignored: no equivalent: "),
        (11, "`use_vsock` in [hypervisor.qemu] is not supported, ignored: use agent_channel = \"vsock\""),
        (12, "`enable_iothreads` in [hypervisor.qemu] is ignored: no equivalent: "),
        (20, "`path` in [proxy.kata] is ignored: no equivalent: "),
        (23, "`path` in [shim.kata] is ignored: no equivalent: "),
        (29, "`enable_netmon` in [netmon] is ignored"),
        (33, "`internetworking_model` in [runtime] is not supported, ignored: use [network]"),
    ] {
        let start = format!("{}{key}", at(line));
        assert!(warnings.iter().any(|w| w.starts_with(&start)), "{start:?} not in {err}");
    }
    assert_eq!(warnings.len(), 7, "{err}");
    // The QEMU, its version and the accelerator; nothing left behind in the run root.
    assert!(
        out.contains(&format!("qemu: qemu-system-x86_64 ({FAKE_QEMU_VERSION})")),
        "{out}"
    );
    assert!(
        out.contains("accel: tcg (set in the configuration)"),
        "{out}"
    );
    assert!(out.ends_with(&format!("{file}: OK\n")), "{out}");
    assert!(
        !s.path().join("run").exists(),
        "config check makes no run root"
    );
    // Other commands take the file too, the warnings logged once each (`status` exits 1: the
    // template it configures is not made yet).
    let o = s.run(&cfg, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("vmfactory: Degraded: no template"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).matches("use_vsock").count(), 1, "{}", stderr(&o));
}

#[test]
fn config_check_names_the_accelerator_auto_resolves_to() {
    let s = Scratch::new();
    let cfg = s.write(&kata_file(&s, "").replace("accel = \"tcg\"", "accel = \"auto\""));
    let o = s.run(&cfg, &["config", "check"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let accel = out
        .lines()
        .find(|l| l.starts_with("accel: "))
        .expect("accel line");
    // Whatever this host has: tcg for a reason, or kvm from a probe boot, never `auto`.
    assert!(
        accel.starts_with("accel: tcg (") || accel.starts_with("accel: kvm ("),
        "{out}"
    );
    assert!(!s.path().join("run").exists(), "no probe cache written");
}

#[test]
fn a_missing_or_foreign_qemu_is_one_line_with_exit_2() {
    let s = Scratch::new();
    let not_qemu = fake_qemu(s.path(), "qemu-impostor", "Firecracker v1.7.0");
    let cases: [(String, &[&str]); 3] = [
        (
            "/nonexistent/qemu-system-x86_64".into(),
            &[
                "line 2",
                "QEMU /nonexistent/qemu-system-x86_64 cannot be run",
                "No such file",
            ],
        ),
        (
            "qemu-not-in-path-anywhere".into(),
            &["line 2", "QEMU qemu-not-in-path-anywhere cannot be run"],
        ),
        (
            not_qemu.display().to_string(),
            &["line 2", "is not QEMU", "Firecracker v1.7.0"],
        ),
    ];
    for (qemu, needles) in cases {
        let text =
            kata_file(&s, "").replace("path = \"qemu-system-x86_64\"", &format!("path = {qemu:?}"));
        let cfg = s.write(&text);
        let o = s.run(&cfg, &["config", "check"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{qemu}: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| !l.contains(": warning: ")).collect();
        assert_eq!(errors.len(), 1, "{qemu}: one error line: {err}");
        for n in needles {
            assert!(errors[0].contains(n), "{qemu}: {n:?} not in {err}");
        }
        assert!(stdout(&o).is_empty());
        assert!(!Path::new(&s.path().join("run")).exists());
    }
}
