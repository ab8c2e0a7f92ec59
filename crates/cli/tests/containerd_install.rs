//! `vmfactory containerd install` on the real binary, in temporary directories: a fresh
//! config, an existing one whose text is kept, a second run that changes nothing, a dry run,
//! and refusals (missing shim, version 1 config, unwritable directories) that print one line
//! and change nothing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vmfactory");
const SHIM: &str = "containerd-shim-vmfactory-v2";
const ENTRY: &str = "[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmfactory]\nruntime_type = \"io.containerd.vmfactory.v2\"\n";

/// Debian's /etc/containerd/config.toml (containerd 1.6.20), with a comment of the user's.
const DEBIAN: &str = r#"# the user's comment
version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"#;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-ctrd-install-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        // Readable by the unprivileged user of the unwritable-directory cases.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["bin", "etc"] {
            fs::create_dir(dir.path().join(sub)).expect("mkdir");
        }
        let shim = dir.path().join("shim-build");
        fs::write(&shim, b"#!/bin/sh\necho shim\n").expect("shim");
        fs::set_permissions(&shim, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self) -> PathBuf {
        self.path().join("etc/config.toml")
    }

    fn installed(&self) -> PathBuf {
        self.path().join("bin").join(SHIM)
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["containerd", "install", "--containerd-config"])
            .arg(self.config())
            .arg("--bin-dir")
            .arg(self.path().join("bin"))
            .arg("--shim")
            .arg(self.path().join("shim-build"))
            .args(extra)
            .env_remove("VMFACTORY_CONFIG");
        cmd
    }

    fn install(&self, extra: &[&str]) -> Output {
        self.command(extra).output().expect("run vmfactory")
    }

    /// Every file under the setup with its bytes and mode.
    fn snapshot(&self) -> BTreeMap<PathBuf, (Vec<u8>, u32)> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).expect("read_dir").flatten() {
                let meta = e.metadata().expect("meta");
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    let data = fs::read(e.path()).expect("read");
                    out.insert(e.path(), (data, meta.permissions().mode() & 0o7777));
                }
            }
        }
        out
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
}

/// Exit `code`, one line on stderr containing `needle`; returns it.
fn assert_refused(o: &Output, code: i32, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
    err
}

#[test]
fn fresh_config_then_a_second_run_changes_nothing() {
    let s = Setup::new();
    let out = assert_ok(&s.install(&[]));
    assert!(out.contains("systemctl restart containerd"), "{out}");
    assert_eq!(
        fs::read(s.installed()).expect("installed"),
        fs::read(s.path().join("shim-build")).expect("source")
    );
    let mode = fs::metadata(s.installed())
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let config = fs::read_to_string(s.config()).expect("config");
    assert_eq!(config, format!("version = 2\n\n{ENTRY}"));
    assert!(
        !s.path().join("etc/config.toml.vmfactory-backup").exists(),
        "no backup of a file that did not exist"
    );
    assert!(!out.contains("previous config"), "{out}");

    let before = s.snapshot();
    let again = assert_ok(&s.install(&[]));
    assert!(!again.contains("restart"), "{again}");
    assert!(again.contains("up to date"), "{again}");
    assert!(again.contains("already registers"), "{again}");
    assert_eq!(s.snapshot(), before, "the second run changed something");
}

#[test]
fn existing_config_is_kept_and_backed_up() {
    let s = Setup::new();
    fs::write(s.config(), DEBIAN).expect("config");
    fs::set_permissions(s.config(), fs::Permissions::from_mode(0o600)).expect("chmod");
    assert_ok(&s.install(&[]));
    let config = fs::read_to_string(s.config()).expect("config");
    assert_eq!(config, format!("{DEBIAN}\n{ENTRY}"));
    let mode = fs::metadata(s.config()).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config keeps its mode");
    assert_eq!(
        fs::read_to_string(s.path().join("etc/config.toml.vmfactory-backup")).expect("backup"),
        DEBIAN
    );
    // No staged file is left beside either target.
    let names: Vec<String> = ["bin", "etc"]
        .iter()
        .flat_map(|d| fs::read_dir(s.path().join(d)).expect("dir").flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".vmfactory-install")),
        "{names:?}"
    );

    let before = s.snapshot();
    assert_ok(&s.install(&[]));
    assert_eq!(s.snapshot(), before);
}

#[test]
fn a_symlinked_config_is_edited_where_it_points() {
    let s = Setup::new();
    let real = s.path().join("etc/real.toml");
    fs::write(&real, DEBIAN).expect("config");
    std::os::unix::fs::symlink(&real, s.config()).expect("symlink");
    let out = assert_ok(&s.install(&[]));
    assert!(fs::symlink_metadata(s.config()).expect("meta").is_symlink());
    assert_eq!(
        fs::read_to_string(&real).expect("real"),
        format!("{DEBIAN}\n{ENTRY}")
    );
    assert!(out.contains("real.toml.vmfactory-backup"), "{out}");
}

#[test]
fn dry_run_prints_and_changes_nothing() {
    let s = Setup::new();
    fs::write(s.config(), DEBIAN).expect("config");
    let before = s.snapshot();
    let out = assert_ok(&s.install(&["--dry-run"]));
    assert!(out.contains("Would install"), "{out}");
    assert!(out.contains(ENTRY), "{out}");
    assert_eq!(s.snapshot(), before);
}

#[test]
fn refusals_are_one_line_and_change_nothing() {
    let s = Setup::new();
    fs::write(
        s.config(),
        "# an old config\nroot = \"/var/lib/containerd\"\n",
    )
    .expect("v1");
    let before = s.snapshot();
    assert_refused(&s.install(&[]), 2, "version = 2");
    assert_eq!(s.snapshot(), before);

    fs::write(
        s.config(),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.vmfactory]\nruntime_type = \"io.containerd.runc.v2\"\n",
    )
    .expect("taken");
    let before = s.snapshot();
    assert_refused(&s.install(&[]), 2, "io.containerd.runc.v2");
    assert_eq!(s.snapshot(), before);

    fs::remove_file(s.config()).expect("rm");
    fs::remove_file(s.path().join("shim-build")).expect("rm");
    let before = s.snapshot();
    let out = s.install(&[]);
    assert_refused(&out, 2, "shim-build");
    assert_eq!(s.snapshot(), before);
}

/// Runs the install as an unprivileged user when this is root (root writes anywhere).
fn unprivileged(mut cmd: Command) -> Output {
    if nix::unistd::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    cmd.output().expect("run vmfactory")
}

#[test]
fn unwritable_directories_are_one_line_and_change_nothing() {
    // The bin directory read-only: nothing is staged, the config is not touched.
    let s = Setup::new();
    fs::write(s.config(), DEBIAN).expect("config");
    fs::set_permissions(s.config(), fs::Permissions::from_mode(0o666)).expect("chmod");
    fs::set_permissions(s.path().join("etc"), fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::set_permissions(s.path().join("bin"), fs::Permissions::from_mode(0o555)).expect("chmod");
    let before = s.snapshot();
    let err = assert_refused(&unprivileged(s.command(&[])), 1, "bin");
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(s.snapshot(), before);

    // The config's directory read-only: the staged shim is taken back.
    fs::set_permissions(s.path().join("bin"), fs::Permissions::from_mode(0o777)).expect("chmod");
    fs::set_permissions(s.path().join("etc"), fs::Permissions::from_mode(0o555)).expect("chmod");
    let before = s.snapshot();
    let err = assert_refused(&unprivileged(s.command(&[])), 1, "etc");
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(s.snapshot(), before);
    assert!(!s.installed().exists());
    fs::set_permissions(s.path().join("etc"), fs::Permissions::from_mode(0o755)).expect("chmod");
}
