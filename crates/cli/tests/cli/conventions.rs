//! The conventions a command line is expected to keep, on the real binary without QEMU:
//! clap's suggestions and missing argument names in the one-line errors, `VMFACTORY_CONFIG`,
//! `--log-level`, colour only where asked or on a terminal, `--version` naming the commit and
//! what the configuration would run, completions and manual pages, and `list` / `stop` on VMs
//! made by the test (a stand-in `sleep` as their QEMU).

use std::process::{Command, Output};

use vmfactory_persist::Store;

use super::leftovers::{block_on, orphan};
use super::{assert_one_line_error, stderr, stdout, Scratch, BIN};

fn bin(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("VMFACTORY_CONFIG")
        .output()
        .expect("run vmfactory")
}

#[test]
fn usage_errors_keep_suggestions_and_missing_names_on_one_line() {
    let o = bin(&["stauts"]);
    assert_one_line_error(
        &o,
        2,
        &["'stauts'", "a similar subcommand exists: 'status'"],
    );
    let o = bin(&["status", "--jsn"]);
    assert_one_line_error(&o, 2, &["'--jsn'", "'--json'"]);
    let o = bin(&["stop"]);
    assert_one_line_error(&o, 2, &["were not provided: <ID>"]);
    let o = bin(&["exec", "some-id"]);
    assert_one_line_error(&o, 2, &["<CMD>"]);
    let o = bin(&["--verbose"]);
    assert_one_line_error(&o, 2, &["subcommand is required"]);
    // `--verbose` keeps clap's whole text, usage included.
    let o = bin(&["--verbose", "stauts"]);
    assert!(stderr(&o).contains("Usage:"), "{}", stderr(&o));
}

#[test]
fn vmfactory_config_is_the_default_config_path_and_config_wins() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let o = Command::new(BIN)
        .args(["config", "check"])
        .env("VMFACTORY_CONFIG", &cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&cfg.display().to_string()),
        "{}",
        stdout(&o)
    );
    let o = Command::new(BIN)
        .args(["config", "check"])
        .env("VMFACTORY_CONFIG", s.path().join("missing.toml"))
        .output()
        .expect("run");
    assert_one_line_error(&o, 2, &["missing.toml"]);
    // `--config` overrides the variable.
    let o = Command::new(BIN)
        .args(["--config"])
        .arg(&cfg)
        .args(["config", "check"])
        .env("VMFACTORY_CONFIG", s.path().join("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn log_level_filters_and_colour_only_when_asked() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let cfg_arg = cfg.display().to_string();
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(BIN);
        c.args(["--config", &cfg_arg]).args(extra).args(["list"]);
        c.env_remove("RUST_LOG").env_remove("NO_COLOR");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run")
    };
    // Nothing below `warn` by default; `--log-level debug` shows the config being loaded, and
    // wins over RUST_LOG.
    assert!(!stderr(&run(&[], &[])).contains("configuration loaded"));
    let o = run(&["--log-level", "debug"], &[("RUST_LOG", "error")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("configuration loaded"), "{err}");
    // Piped: no colour. `--color always` colours; NO_COLOR stops `auto` only.
    assert!(!err.contains('\u{1b}'), "{err}");
    let o = run(&["--log-level", "debug", "--color", "always"], &[]);
    assert!(stderr(&o).contains('\u{1b}'), "{}", stderr(&o));
    let o = run(
        &["--log-level", "debug", "--color", "never"],
        &[("NO_COLOR", "1")],
    );
    assert!(!stderr(&o).contains('\u{1b}'));
    // A bad filter: one line, exit 2, nothing run.
    let o = run(&["--log-level", "vmfactory=loud"], &[]);
    assert_one_line_error(&o, 2, &["--log-level", "vmfactory=loud"]);
    assert!(stdout(&o).is_empty());
}

#[test]
fn version_names_the_commit_qemu_and_guest_image() {
    let s = Scratch::new();
    let qemu = s.path().join("fake-qemu");
    std::fs::write(
        &qemu,
        "#!/bin/sh\necho 'QEMU emulator version 9.8.7 (test)'\n",
    )
    .expect("fake qemu");
    std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::write(
        s.path().join("manifest.json"),
        r#"{"format": 3, "kernel_release": "6.1.0-test", "agent_sha256": "abcdef0123456789"}"#,
    )
    .expect("manifest");
    let text = s.config(false, 0).replace(
        "[hypervisor.qemu]\n",
        &format!("[hypervisor.qemu]\npath = \"{}\"\n", qemu.display()),
    );
    let cfg = s.write(&text);
    for flag in ["--version", "-V"] {
        let o = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .arg(flag)
            .output()
            .expect("run");
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        let first = out.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(&format!("vmfactory {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{out}"
        );
        assert!(
            !first.contains("commit unknown"),
            "built from a checkout: {out}"
        );
        assert!(out.contains("QEMU emulator version 9.8.7"), "{out}");
        assert!(
            out.contains("image format 3, kernel 6.1.0-test, agent sha256 abcdef012345"),
            "{out}"
        );
    }
    // No manifest, a QEMU that is not there: still a version, and why the rest is unknown.
    std::fs::remove_file(s.path().join("manifest.json")).expect("rm");
    std::fs::remove_file(&qemu).expect("rm");
    let o = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("--version")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("cannot run it") && out.contains("no image manifest"),
        "{out}"
    );
}

#[test]
fn completions_and_man_pages_render() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = bin(&["completions", shell]);
        assert_eq!(o.status.code(), Some(0), "{shell}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(
            out.contains("vmfactory") && out.contains("inspect"),
            "{shell}"
        );
    }
    let o = bin(&["completions", "tcsh"]);
    assert_one_line_error(&o, 2, &["'tcsh'"]);

    let o = bin(&["man"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let page = stdout(&o);
    assert!(page.contains(".TH vmfactory 1"), "{page}");
    assert!(
        page.contains("VMFACTORY_CONFIG"),
        "the environment is documented"
    );
    for sub in ["init", "status", "list", "stop", "run"] {
        assert!(page.contains(sub), "{sub} in the page");
    }
    // A page per subcommand, found by alias too.
    let o = bin(&["man", "ps"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(".TH vmfactory-list 1"),
        "{}",
        stdout(&o)
    );
    let o = bin(&["man", "nonsense"]);
    assert_one_line_error(&o, 2, &["\"nonsense\""]);
    // The subcommand's page carries the global options too.
    let page = stdout(&bin(&["man", "stop"]));
    assert!(
        page.contains(".SH SYNOPSIS") && page.contains("\\-\\-config"),
        "{page}"
    );
}

struct Sleep(std::process::Child);

impl Drop for Sleep {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn list_and_stop_an_orphan_refuse_a_foreign_owner() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let root = s.path().join("run");
    // Nothing yet: the header only, for `list` and its alias.
    for cmd in ["list", "ps"] {
        let o = s.run(&cfg, &[cmd]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(stdout(&o).lines().count(), 1, "{}", stdout(&o));
    }
    const ORPHAN: &str = "3f9e5c74-6d20-4c79-8a90-7abc5e4f3a03";
    const OWNED: &str = "4a0f6d85-7e31-4d8a-9ba1-8bcd6f5a4b04";
    let mut qemu = Sleep(Command::new("sleep").arg("300").spawn().expect("sleep"));
    block_on(async {
        orphan(&root, ORPHAN, Some(qemu.0.id())).await;
        orphan(&root, OWNED, None).await;
    });
    // This test process owns OWNED: not a vmfactory command, so `stop` must not signal it.
    let store = Store::new(&root);
    let lock = block_on(store.lock(OWNED)).expect("lock");

    let o = s.run(&cfg, &["list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let vms = v.as_array().expect("array");
    assert_eq!(vms.len(), 2, "{v}");
    let by_id = |id: &str| {
        vms.iter()
            .find(|vm| vm["id"] == id)
            .expect("listed")
            .clone()
    };
    assert!(by_id(ORPHAN)["owner_pid"].is_null(), "{v}");
    assert_eq!(by_id(OWNED)["owner_pid"], std::process::id(), "{v}");
    // No state stored yet (a VM being created): listed as starting.
    assert_eq!(by_id(OWNED)["source"], "starting", "{v}");
    assert!(by_id(OWNED)["error"].is_null(), "{v}");
    assert_eq!(by_id(ORPHAN)["pid"], qemu.0.id(), "its recorded QEMU: {v}");
    let table = stdout(&s.run(&cfg, &["list"]));
    assert!(table.contains("orphan") && table.contains(OWNED), "{table}");

    let o = s.run(&cfg, &["stop", OWNED]);
    assert_one_line_error(&o, 2, &[OWNED, "not a vmfactory command"]);
    assert!(root.join("vm").join(OWNED).exists(), "nothing changed");

    let o = s.run(&cfg, &["stop", ORPHAN]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("no process owned it"), "{}", stdout(&o));
    assert!(
        qemu.0.try_wait().expect("wait").is_some(),
        "its recorded QEMU was ended"
    );
    assert!(!root.join("vm").join(ORPHAN).exists());

    for bad in [ORPHAN, "../etc", "no-such-vm"] {
        let o = s.run(&cfg, &["stop", bad]);
        assert_one_line_error(&o, 2, &["No VM", "vmfactory list"]);
    }
    drop(lock);
}
