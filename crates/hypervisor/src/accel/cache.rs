//! The probe boot's verdict, kept in a file for the other processes on this host.
//!
//! The file is JSON, `{"version": 1, "accel": "kvm"|"tcg", "key": {...}}`, written atomically
//! (mode 0600, its directory made 0700 if missing) and read with a size limit, no symlink
//! followed. Anything else found there (missing, corrupt, another version or key, `auto`) is
//! probed over and rewritten; the cache never makes resolution fail. Concurrent processes may
//! both probe: the last writer wins, with the same verdict.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::config::{Accel, HypervisorConfig, MachineType};
use crate::files::{read_limited, write_atomic};
use crate::qemu::qemu_version;

/// Largest cache file read, in bytes (a real one is about 600).
pub const MAX_CACHE_FILE_SIZE: u64 = 16 * 1024;

/// The format this build writes and reads.
const CACHE_VERSION: u32 = 1;

/// Which file, how large, last modified when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileStamp {
    path: PathBuf,
    size: u64,
    mtime_secs: i64,
    mtime_nanos: i64,
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(Self {
            path: path.to_owned(),
            size: m.size(),
            mtime_secs: m.mtime(),
            mtime_nanos: m.mtime_nsec(),
        })
    }
}

/// `/dev/kvm` as found: its device number, and its inode and change time, which are new when
/// the module is loaded again (devtmpfs makes the node anew).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KvmNode {
    rdev: u64,
    ino: u64,
    ctime_secs: i64,
    ctime_nanos: i64,
}

/// Everything the probe boot's verdict depends on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProbeKey {
    /// The QEMU binary (found in `PATH` for a bare name).
    pub(super) qemu: FileStamp,
    /// First line of `<qemu> --version`.
    pub(super) qemu_version: String,
    /// The kernel the probe boots.
    pub(super) kernel: FileStamp,
    /// The probe's machine type.
    pub(super) machine: MachineType,
    /// The probe's CPU model.
    pub(super) cpu_model: Option<String>,
    /// `/dev/kvm`, `None` when it is missing.
    pub(super) kvm_device: Option<KvmNode>,
    /// `/proc/sys/kernel/random/boot_id`: new at every boot.
    pub(super) boot_id: String,
}

impl ProbeKey {
    /// The key of a probe of `cfg` on this host, with `/dev/kvm` and the boot id at `kvm` and
    /// `boot_id`.
    pub(super) async fn gather(
        cfg: &HypervisorConfig,
        kvm: &Path,
        boot_id: &Path,
    ) -> std::io::Result<Self> {
        let (qemu, kernel) = (cfg.qemu_path.clone(), cfg.kernel.clone());
        let (kvm, boot_id) = (kvm.to_owned(), boot_id.to_owned());
        let (qemu, kernel, kvm_device, boot_id) = tokio::task::spawn_blocking(move || {
            let qemu = FileStamp::of(&find_program(&qemu)?)?;
            let kvm_device = match std::fs::metadata(&kvm) {
                Ok(m) => Some(KvmNode {
                    rdev: m.rdev(),
                    ino: m.ino(),
                    ctime_secs: m.ctime(),
                    ctime_nanos: m.ctime_nsec(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            let boot_id = std::fs::read_to_string(&boot_id)?.trim().to_owned();
            Ok((qemu, FileStamp::of(&kernel)?, kvm_device, boot_id))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self {
            qemu_version: qemu_version(&qemu.path).await?,
            qemu,
            kernel,
            machine: cfg.machine,
            cpu_model: cfg.cpu_model_for(Accel::Kvm).map(str::to_owned),
            kvm_device,
            boot_id,
        })
    }
}

/// `program` as `Command` runs it: a path with a `/` as is, a bare name from `PATH`.
fn find_program(program: &Path) -> std::io::Result<PathBuf> {
    if program.as_os_str().is_empty() || program.components().count() > 1 {
        return Ok(program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} is not in PATH", program.display()),
            )
        })
}

/// The file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    accel: Accel,
    key: ProbeKey,
}

/// The probe lock of a run root, held until dropped.
#[derive(Debug)]
pub(super) struct ProbeLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// The cache file at a path.
#[derive(Debug)]
pub(crate) struct AccelCache {
    path: PathBuf,
}

impl AccelCache {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `bound` for the exclusive probe lock of the cache's directory (the run
    /// root: `flock` on the directory itself, so no lock file is left). `None` when it cannot
    /// be had; the caller then probes without it.
    pub(super) async fn lock(&self, bound: Duration) -> Option<ProbeLock> {
        use nix::fcntl::{Flock, FlockArg};
        let dir = self.path.parent()?;
        let mut file = match tokio::fs::File::open(dir).await {
            Ok(f) => f.into_std().await,
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "no probe lock: probing without it");
                return None;
            }
        };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(flock) => return Some(ProbeLock { _flock: flock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK))
                    if tokio::time::Instant::now() < deadline =>
                {
                    file = f;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err((_, e)) => {
                    warn!(dir = %dir.display(), error = %e, "probe lock not taken: probing without it");
                    return None;
                }
            }
        }
    }

    /// The verdict kept for `key`, if the file holds one; anything unusable there is logged
    /// and ignored.
    pub(super) async fn load(&self, key: &ProbeKey) -> Option<Accel> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || read_limited(&path, MAX_CACHE_FILE_SIZE))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                debug!(cache = %self.path.display(), "no probe cache yet");
                return None;
            }
            Err(e) => {
                warn!(cache = %self.path.display(), error = %e, "unreadable probe cache ignored");
                return None;
            }
        };
        let record = match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) if r.version == CACHE_VERSION && r.accel != Accel::Auto => r,
            Ok(r) => {
                warn!(cache = %self.path.display(), version = r.version, accel = %r.accel, "foreign probe cache ignored");
                return None;
            }
            Err(e) => {
                warn!(cache = %self.path.display(), error = %e, "corrupt probe cache ignored");
                return None;
            }
        };
        if record.key != *key {
            debug!(cache = %self.path.display(), "probe cache is for another QEMU, kernel, /dev/kvm or boot");
            return None;
        }
        Some(record.accel)
    }

    /// Keeps `accel` for `key`; a failure is logged (the next process probes again).
    pub(super) async fn store(&self, key: &ProbeKey, accel: Accel) {
        let record = Record {
            version: CACHE_VERSION,
            accel,
            key: key.clone(),
        };
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec_pretty(&record)?;
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)?;
            }
            write_atomic(&path, &bytes, 0o600)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(()) => debug!(cache = %self.path.display(), %accel, "probe verdict cached"),
            Err(e) => {
                warn!(cache = %self.path.display(), error = %e, "cannot write the probe cache")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fake host: a QEMU script printing `version`, a kernel, `/dev/kvm` and a boot id, all
    /// files in a temporary directory.
    struct Host {
        dir: tempfile::TempDir,
        cfg: HypervisorConfig,
    }

    impl Host {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let qemu = dir.path().join("qemu");
            std::fs::write(&qemu, "#!/bin/sh\ncat \"$(dirname \"$0\")/version\"\n").expect("qemu");
            std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            for (name, text) in [
                ("version", "QEMU emulator version 7.2.0\n"),
                ("vmlinuz", "kernel"),
                ("kvm", ""),
                ("boot_id", "5e1f0c3a-0000-4000-8000-000000000001\n"),
            ] {
                std::fs::write(dir.path().join(name), text).expect("file");
            }
            let mut cfg = HypervisorConfig::new(dir.path().join("vmlinuz"), None);
            cfg.qemu_path = qemu;
            Self { dir, cfg }
        }

        fn file(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        async fn key(&self) -> ProbeKey {
            ProbeKey::gather(&self.cfg, &self.file("kvm"), &self.file("boot_id"))
                .await
                .expect("key")
        }
    }

    #[tokio::test]
    async fn each_part_of_the_host_changes_the_key() {
        let host = Host::new();
        let key = host.key().await;
        assert_eq!(key.qemu_version, "QEMU emulator version 7.2.0");
        let kvm = key
            .kvm_device
            .as_ref()
            .expect("a regular file stands in for /dev/kvm");
        assert_eq!(kvm.rdev, 0);
        assert_eq!(key.cpu_model.as_deref(), Some("host"));
        assert_eq!(host.key().await, key, "nothing changed");

        type Change = (&'static str, fn(&Host));
        let changes: [Change; 5] = [
            ("qemu_version", |h| {
                std::fs::write(h.file("version"), "QEMU 9.2.0\n").expect("w")
            }),
            ("kernel", |h| {
                std::fs::write(h.file("vmlinuz"), "kernel2").expect("w")
            }),
            ("qemu", |h| {
                let script = std::fs::read(h.file("qemu")).expect("r");
                std::fs::write(h.file("qemu"), [script.as_slice(), b"\n"].concat()).expect("w");
            }),
            ("kvm_device", |h| {
                std::fs::remove_file(h.file("kvm")).expect("rm")
            }),
            ("boot_id", |h| {
                std::fs::write(h.file("boot_id"), "another\n").expect("w")
            }),
        ];
        for (part, change) in changes {
            let before = host.key().await;
            change(&host);
            let after = host.key().await;
            let diff = |a: &ProbeKey, b: &ProbeKey| {
                let (a, b) = (
                    serde_json::to_value(a).expect("json"),
                    serde_json::to_value(b).expect("json"),
                );
                let (a, b) = (a.as_object().expect("obj"), b.as_object().expect("obj"));
                a.keys()
                    .filter(|k| a[*k] != b[*k])
                    .cloned()
                    .collect::<Vec<_>>()
            };
            assert_eq!(diff(&before, &after), [part], "{part}");
        }
        // The probe's machine and CPU model are part of it too.
        let mut cfg = host.cfg.clone();
        cfg.cpu_model = Some("max".into());
        let key = ProbeKey::gather(&cfg, &host.file("kvm"), &host.file("boot_id"))
            .await
            .expect("key");
        assert_eq!(key.cpu_model.as_deref(), Some("max"));
        // No boot id, no key (a reboot could not be told).
        std::fs::remove_file(host.file("boot_id")).expect("rm");
        assert!(
            ProbeKey::gather(&host.cfg, &host.file("kvm"), &host.file("boot_id"))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_stored_verdict_is_found_for_its_key_only() {
        let host = Host::new();
        let cache = AccelCache::new(&host.file("run/accel.json"));
        let key = host.key().await;
        assert_eq!(cache.load(&key).await, None, "no file yet");
        cache.store(&key, Accel::Kvm).await;
        assert_eq!(cache.load(&key).await, Some(Accel::Kvm));
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&host.file("run")), 0o700, "run root made 0700");
        assert_eq!(mode(cache.path()), 0o600);

        let mut others = Vec::new();
        let kvm = key.kvm_device.clone().expect("kvm");
        for node in [
            KvmNode {
                rdev: 10 << 8 | 232,
                ..kvm.clone()
            },
            // The module loaded again: a new node.
            KvmNode {
                ino: kvm.ino + 1,
                ..kvm.clone()
            },
            KvmNode {
                ctime_nanos: kvm.ctime_nanos + 1,
                ..kvm.clone()
            },
        ] {
            let mut k = key.clone();
            k.kvm_device = Some(node);
            others.push(k);
        }
        let mut k = key.clone();
        k.kvm_device = None;
        others.push(k);
        let mut k = key.clone();
        k.machine = MachineType::Pc;
        others.push(k);
        let mut k = key.clone();
        k.cpu_model = None;
        others.push(k);
        let mut k = key.clone();
        k.kernel.mtime_nanos += 1;
        others.push(k);
        let mut k = key.clone();
        k.qemu.path = "/usr/bin/qemu-kvm".into();
        others.push(k);
        for other in &others {
            assert_eq!(cache.load(other).await, None, "{other:?}");
        }
        // Overwritten by a later verdict (last writer wins), no temporary file left.
        cache.store(&key, Accel::Tcg).await;
        assert_eq!(cache.load(&key).await, Some(Accel::Tcg));
        let names: Vec<_> = std::fs::read_dir(host.file("run"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["accel.json"]);
    }

    #[tokio::test]
    async fn corrupt_or_foreign_files_are_ignored_and_overwritten() {
        let host = Host::new();
        let path = host.file("accel.json");
        let cache = AccelCache::new(&path);
        let key = host.key().await;
        let valid = serde_json::to_value(Record {
            version: CACHE_VERSION,
            accel: Accel::Kvm,
            key: key.clone(),
        })
        .expect("json");
        let with = |field: &str, value: serde_json::Value| {
            let mut v = valid.clone();
            v[field] = value;
            v.to_string().into_bytes()
        };
        let bad: Vec<(&str, Vec<u8>)> = vec![
            ("not json", b"{\"version\":1,".to_vec()),
            ("another version", with("version", 2.into())),
            ("auto", with("accel", "auto".into())),
            ("unknown accel", with("accel", "hvf".into())),
            ("unknown field", with("extra", true.into())),
            ("too long", vec![b' '; 64 * 1024]),
        ];
        for (what, bytes) in bad {
            std::fs::write(&path, &bytes).expect("write");
            assert_eq!(cache.load(&key).await, None, "{what}");
            cache.store(&key, Accel::Kvm).await;
            assert_eq!(
                cache.load(&key).await,
                Some(Accel::Kvm),
                "{what}: overwritten"
            );
        }
        // A symlink to a valid file is not followed, and is replaced by the file itself.
        let elsewhere = host.file("elsewhere.json");
        std::fs::rename(&path, &elsewhere).expect("mv");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("ln");
        assert_eq!(cache.load(&key).await, None);
        cache.store(&key, Accel::Tcg).await;
        assert!(!std::fs::symlink_metadata(&path).expect("stat").is_symlink());
        assert_eq!(cache.load(&key).await, Some(Accel::Tcg));
        // Where nothing can be written: logged, no error.
        let cache = AccelCache::new(&host.file("vmlinuz/accel.json"));
        cache.store(&key, Accel::Kvm).await;
        assert_eq!(cache.load(&key).await, None);
    }

    #[test]
    fn programs_are_found_as_command_finds_them() {
        assert_eq!(
            find_program(Path::new("/opt/q/qemu")).expect("path"),
            Path::new("/opt/q/qemu")
        );
        assert_eq!(
            find_program(Path::new("./qemu")).expect("path"),
            Path::new("./qemu")
        );
        let sh = find_program(Path::new("sh")).expect("sh in PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert!(find_program(Path::new("no-such-program-here")).is_err());
    }
}
