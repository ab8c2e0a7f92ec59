//! Harness for the real-QEMU end-to-end tests: finds the guest image and host tools, decides
//! between running and skipping (never skipping under `CI=true`, nor under `cargo xtask
//! test|e2e`, which install the prerequisites first and set [`REQUIRE_ENV`]), and checks after
//! each scenario that nothing leaked: no process, mount, socket or directory of the test left.
//!
//! Every scenario runs under its own temporary run root, and every path QEMU or a helper
//! process is given lies under it; that is what makes the leak check exact.

use std::fs;
use std::path::{Path, PathBuf};

pub mod cli;
pub mod containerd;
pub mod oci;
pub mod vm;

/// What a real VM needs on this host.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Guest kernel (`target/guest/vmlinuz`).
    pub kernel: PathBuf,
    /// Guest initramfs (`target/guest/initramfs.cpio`).
    pub initrd: PathBuf,
    /// rust-vmm's `vhost-device-vsock`, when installed.
    pub vhost_device_vsock: Option<PathBuf>,
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Set to `1` (by `cargo xtask test` and `cargo xtask e2e`), a missing prerequisite fails the
/// real-QEMU tests instead of skipping them, as `CI=true` does.
pub const REQUIRE_ENV: &str = "VMFACTORY_E2E_REQUIRE";

/// A whole number by which the harness multiplies its time bounds (default 1). `cargo xtask
/// kvm-host` sets it: there the VMs run under KVM inside a TCG-emulated L1, several times
/// slower than on a real host. Bounds that are the behaviour under test (clock skew) stay.
pub const TIME_SCALE_ENV: &str = "VMFACTORY_E2E_TIME_SCALE";

/// When set, the guest CPU model (`-cpu`) of every VM the harness configures, instead of the
/// product's default for the accelerator (`host` under KVM). The nested KVM host sets it.
pub const CPU_MODEL_ENV: &str = "VMFACTORY_E2E_CPU_MODEL";

/// The CPU model [`CPU_MODEL_ENV`] names, if any.
pub fn cpu_model() -> Option<String> {
    std::env::var(CPU_MODEL_ENV).ok().filter(|m| !m.is_empty())
}

/// `bound` times [`TIME_SCALE_ENV`] (1 to 20; anything else counts as 1).
pub fn scaled(bound: std::time::Duration) -> std::time::Duration {
    let scale = std::env::var(TIME_SCALE_ENV)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|s| (1..=20).contains(s))
        .unwrap_or(1);
    bound * scale
}

/// Set to `1` (by the nested KVM host, which has the `vhost_vsock` module), a missing
/// `/dev/vhost-vsock` fails the vsock tests instead of skipping them. Not implied by
/// [`REQUIRE_ENV`] or `CI=true`: hosts without the module run everything else.
pub const REQUIRE_VSOCK_ENV: &str = "VMFACTORY_E2E_REQUIRE_VSOCK";

fn env_set(var: &str) -> bool {
    std::env::var(var)
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Whether the real-QEMU tests must run: `CI=true` or [`REQUIRE_ENV`]`=1`.
pub(crate) fn required() -> bool {
    env_set("CI") || env_set(REQUIRE_ENV)
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// With `RUST_LOG` set, the product's logs go to the test's output (timestamps make a slow
/// scenario's steps visible); without it, nothing is printed.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Returns the environment, or `None` (with a message) when a prerequisite is missing.
///
/// # Panics
/// Under `CI=true` (or [`REQUIRE_ENV`]`=1`) a missing prerequisite panics: the e2e tier must
/// run there.
pub fn guest_env() -> Option<GuestEnv> {
    init_logs();
    let dir = std::env::var_os("VMFACTORY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/guest"));
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.cpio");
    let missing = match find_on_path("qemu-system-x86_64") {
        None => Some("qemu-system-x86_64 is not installed (run `cargo xtask tools`)".to_string()),
        Some(_) if !kernel.is_file() || !initrd.is_file() => Some(format!(
            "no guest image in {} (run `cargo xtask guest`)",
            dir.display()
        )),
        Some(_) => None,
    };
    if let Some(why) = missing {
        assert!(
            !required(),
            "the real-QEMU tests must run here (CI=true or {REQUIRE_ENV}=1), but {why}"
        );
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let vhost_device_vsock = std::env::var_os("VMFACTORY_VHOST_DEVICE_VSOCK")
        .map(PathBuf::from)
        .or_else(|| Some(workspace_root().join("target/tools/bin/vhost-device-vsock")))
        .filter(|p| p.is_file());
    Some(GuestEnv {
        qemu: find_on_path("qemu-system-x86_64")?,
        kernel,
        initrd,
        vhost_device_vsock,
    })
}

/// Like [`guest_env`], and also requires `vhost-device-vsock`.
pub fn guest_env_with_vsock_backend() -> Option<GuestEnv> {
    let env = guest_env()?;
    if env.vhost_device_vsock.is_none() {
        assert!(
            !required(),
            "the real-QEMU tests must run here (CI=true or {REQUIRE_ENV}=1), but \
             vhost-device-vsock is missing (run `cargo xtask tools`)"
        );
        eprintln!("SKIPPED: vhost-device-vsock is not installed (run `cargo xtask tools`)");
        return None;
    }
    Some(env)
}

/// Like [`guest_env`], and also requires `/dev/vhost-vsock` (the `vhost_vsock` module) for the
/// vsock tests: missing, they are skipped, unless [`REQUIRE_VSOCK_ENV`]`=1`.
///
/// # Panics
/// With [`REQUIRE_VSOCK_ENV`]`=1` and no `/dev/vhost-vsock`.
pub fn guest_env_with_vhost_vsock() -> Option<GuestEnv> {
    let env = guest_env()?;
    let device = Path::new(vmfactory_hypervisor::VHOST_VSOCK_DEVICE);
    if !device.exists() {
        assert!(
            !env_set(REQUIRE_VSOCK_ENV),
            "the vsock tests must run here ({REQUIRE_VSOCK_ENV}=1), but there is no {} \
             (load the vhost_vsock module)",
            device.display()
        );
        eprintln!("SKIPPED: no /dev/vhost-vsock (the nested KVM host runs this)");
        return None;
    }
    Some(env)
}

/// A scenario's run root. Dropping it checks nothing; call [`RunRoot::assert_no_leaks`].
#[derive(Debug)]
pub struct RunRoot {
    dir: tempfile::TempDir,
}

impl RunRoot {
    /// A fresh run root under the system temp dir (short, so socket paths fit in 108 bytes).
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-e2e-")
            .tempdir_in("/tmp")
            .expect("temp dir");
        Self { dir }
    }

    /// The root path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Everything a test leaked under this root: processes, mounts, sockets and entries. The
    /// console logs of VMs that failed to come up (`<root>/failed`) are kept there on purpose
    /// until `destroy`, so they are not leaks (`e2e/tests/cli_logs.rs` checks that `destroy`
    /// removes them).
    pub fn leaks(&self) -> Vec<String> {
        let root = self.path().to_string_lossy().into_owned();
        let mut leaks = processes_mentioning(&root);
        leaks.extend(mounts_under(&root));
        let failed = vmfactory_vm::failed_root(self.path());
        leaks.extend(
            entries_under(self.path())
                .into_iter()
                .filter(|e| !Path::new(e.trim_start_matches("entry ")).starts_with(&failed)),
        );
        leaks
    }

    /// Panics with the list of leaks if there are any.
    pub fn assert_no_leaks(&self) {
        let leaks = self.leaks();
        assert!(leaks.is_empty(), "leaked after the scenario: {leaks:#?}");
    }
}

impl Drop for RunRoot {
    /// Cleans up after a scenario that failed half-way (a passing one has nothing left): kills
    /// its processes and unmounts its mounts, so one failing test does not leave QEMU running
    /// or tmpfs mounted for the rest of the run. The leak check itself is
    /// [`RunRoot::assert_no_leaks`]; this only limits the damage after a failure.
    fn drop(&mut self) {
        let root = self.path().to_string_lossy().into_owned();
        for line in processes_mentioning(&root) {
            let pid = line
                .strip_prefix("process ")
                .and_then(|l| l.split(':').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let mut mounts: Vec<String> = mounts_under(&root)
            .into_iter()
            .filter_map(|m| m.strip_prefix("mount ").map(str::to_owned))
            .collect();
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Default for RunRoot {
    fn default() -> Self {
        Self::new()
    }
}

/// Live processes (not zombies of ours) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !cmdline.contains(needle) {
            continue;
        }
        let state = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        if !zombie {
            found.push(format!("process {pid}: {}", cmdline.trim()));
        }
    }
    found
}

/// Mount points at or under `root`, from /proc/self/mountinfo.
pub fn mounts_under(root: &str) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(root))
        .map(|m| format!("mount {m}"))
        .collect()
}

/// Every file, socket or directory left under `root` (the root itself is allowed), but for
/// a run root's `accel.json`: what `accel = auto` resolved to is kept for the host on purpose.
pub fn entries_under(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_name() == vmfactory_factory::ACCEL_CACHE_FILE {
                continue;
            }
            found.push(format!("entry {}", path.display()));
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leak_checker_sees_files_and_processes() {
        let root = RunRoot::new();
        assert!(root.leaks().is_empty());
        fs::create_dir(root.path().join("vm")).unwrap();
        fs::write(root.path().join("vm/qmp.sock"), b"").unwrap();
        fs::write(root.path().join("accel.json"), b"{}").unwrap();
        assert_eq!(root.leaks().len(), 2, "the accelerator cache is no leak");
        fs::remove_dir_all(root.path().join("vm")).unwrap();

        // `sh -c CMD NAME` keeps NAME (a path under the root) in its command line. `read` is a
        // builtin waiting on a pipe nobody writes: no child process. (With `sleep 30; true`,
        // sh forked, and a fork not yet exec'd still showed sh's command line after sh was
        // killed: the last check below once failed that way on a loaded machine.)
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read -r line"])
            .arg(root.path().join("marker"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // `spawn` returns once `sh` is exec'd, yet one CI run found no such process on its
        // first look (not reproduced here). Look again until it shows, for up to 10 s; if it
        // never does, the message says what /proc held for the child.
        let deadline = std::time::Instant::now() + scaled(std::time::Duration::from_secs(10));
        let leaks = loop {
            let leaks = root.leaks();
            if leaks.iter().any(|l| l.starts_with("process"))
                || std::time::Instant::now() > deadline
            {
                break leaks;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let seen = fs::read(format!("/proc/{}/cmdline", child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            leaks.iter().any(|l| l.starts_with("process")),
            "leaks {leaks:?}; /proc/{}/cmdline reads {seen:?}",
            child.id()
        );
        let left = root.leaks();
        assert!(left.is_empty(), "after kill and wait: {left:?}");
    }
}
