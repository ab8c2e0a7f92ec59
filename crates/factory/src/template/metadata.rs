//! Template metadata (`<template>/metadata.json`): what a template was made from, so a later
//! `fetch` can refuse a stale or mismatched one with an error naming the field. The seed left
//! this as a TODO.
//!
//! # What a clone must match ([`CloneKey`])
//! A clone maps the template's RAM and loads its device state, so QEMU must build the same
//! machine from the same guest: every field of the hypervisor config except the template role
//! (its files) and the image (templates have none). That includes boot vCPUs and
//! memory, `max_vcpus`, memory slots and `max_memory_mib` (they shape the machine), machine
//! type and its `-machine` options (`sata=off`), disk slots (root ports on q35), the VM
//! generation id device, kernel, initrd, kernel parameters, the agent channel, the QEMU binary
//! and its version, and the identity of the kernel and initrd files (path, size and mtime:
//! cheap, and enough to notice a rebuilt guest; not a content hash). The accelerator and CPU model are
//! the *resolved* ones ([`HypervisorConfig::pinned`]): a template made under KVM with
//! `-cpu host` cannot be loaded under TCG (version 1 recorded `auto`, so it could be).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use vmfactory_hypervisor::{Accel, AgentChannel, HypervisorConfig, MachineType};

use super::error::TemplateError;
use super::host::TemplateHost;

/// The metadata format version this build writes and reads.
pub const TEMPLATE_METADATA_VERSION: u32 = 2;
/// The metadata file in a template directory.
pub const METADATA_FILE: &str = "metadata.json";
/// The template memory file in a template directory.
pub const MEMORY_FILE: &str = "memory";
/// The template device-state file in a template directory.
pub const STATE_FILE: &str = "state";
/// Longest metadata file [`TemplateMetadata::load`] reads, in bytes (a real one is about 1 KiB).
pub const MAX_METADATA_SIZE: u64 = 64 * 1024;

/// Which file, how large, last modified when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileIdentity {
    /// The path as configured.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime_secs: u64,
    /// Modification time, nanoseconds within the second.
    pub mtime_nanos: u32,
}

impl FileIdentity {
    /// Stats `path`.
    pub async fn of(path: &Path) -> Result<Self, TemplateError> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| TemplateError::io("stat", path, e))?;
        Self::from_metadata(path, &meta)
    }

    /// The identity of `path` from its already-read `meta`.
    pub fn from_metadata(path: &Path, meta: &std::fs::Metadata) -> Result<Self, TemplateError> {
        let mtime = meta
            .modified()
            .map_err(|e| TemplateError::io("stat", path, e))?
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Self {
            path: path.to_owned(),
            size: meta.len(),
            mtime_secs: mtime.as_secs(),
            mtime_nanos: mtime.subsec_nanos(),
        })
    }

    /// The modification time as `seconds.nanoseconds`.
    pub fn mtime(&self) -> String {
        format!("{}.{:09}", self.mtime_secs, self.mtime_nanos)
    }
}

/// The template's data files as the save left them: nothing writes them afterwards (clones map
/// the memory privately), so a later size or modification time means they were tampered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedFiles {
    /// The guest memory file.
    pub memory: FileIdentity,
    /// The device state file.
    pub state: FileIdentity,
}

/// Everything a clone must share with its template (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneKey {
    /// The QEMU binary.
    pub qemu_path: PathBuf,
    /// `<qemu> --version`, first line.
    pub qemu_version: String,
    /// The kernel path.
    pub kernel: PathBuf,
    /// The kernel file's identity.
    pub kernel_file: FileIdentity,
    /// The initrd path.
    pub initrd: Option<PathBuf>,
    /// The initrd file's identity.
    pub initrd_file: Option<FileIdentity>,
    /// Extra kernel parameters.
    pub kernel_params: String,
    /// Boot vCPUs.
    pub vcpus: u32,
    /// Hotplug limit of vCPUs.
    pub max_vcpus: u32,
    /// Boot memory in MiB.
    pub memory_mib: u64,
    /// Memory hotplug slots.
    pub memory_slots: u32,
    /// Hotplug limit of memory in MiB.
    pub max_memory_mib: u64,
    /// Machine type.
    pub machine: MachineType,
    /// The accelerator the template ran under (`kvm` or `tcg`, never `auto`).
    pub accel: Accel,
    /// The CPU model it ran with (`-cpu`); `None`: QEMU's default.
    pub cpu_model: Option<String>,
    /// Agent channel.
    pub agent_channel: AgentChannel,
    /// TCG translation-block cache size.
    pub tcg_tb_size_mib: Option<u32>,
    /// Disk hotplug slots: on q35 they are root ports in the machine, so a clone must have as
    /// many. Left out when 0, so metadata written before the field hashes as it did (its
    /// templates had none) and a config with slots is refused by name.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_slots: u32,
    /// The `-machine` options it ran with
    /// ([`HypervisorConfig::effective_machine_options`]): a clone with other devices cannot
    /// load its state. Left out when empty, so metadata written before the field hashes as it
    /// did (its templates had none) and a config with options is refused by name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub machine_options: String,
    /// Whether the machine has a VM generation id device
    /// ([`HypervisorConfig::has_vmgenid`]): its state is in the template's. Left out when
    /// off, as `disk_slots` is when 0, so metadata written before the field hashes as it did.
    #[serde(default, skip_serializing_if = "is_false")]
    pub vmgenid: bool,
    /// The MAC of the machine's NIC, if it has one ([`HypervisorConfig::nic`]): the device
    /// and its state are in the template's (vhost-net or not is the host's business). Left
    /// out when there is none, so metadata written before the field hashes as it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<String>,
}

/// Whether `n` is 0 (serde's `skip_serializing_if` of [`CloneKey::disk_slots`]).
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Whether `b` is false (serde's `skip_serializing_if` of [`CloneKey::vmgenid`]).
fn is_false(b: &bool) -> bool {
    !*b
}

impl CloneKey {
    /// The key of `cfg` on this host: stats the kernel and initrd, asks QEMU its version.
    /// `cfg` is the config as the template runs it, accelerator resolved
    /// ([`HypervisorConfig::pinned`]); its accelerator and CPU model are taken as they are.
    pub async fn gather(
        cfg: &HypervisorConfig,
        host: &dyn TemplateHost,
    ) -> Result<Self, TemplateError> {
        let kernel_file = FileIdentity::of(&cfg.kernel).await?;
        let initrd_file = match &cfg.initrd {
            Some(p) => Some(FileIdentity::of(p).await?),
            None => None,
        };
        Ok(Self {
            qemu_path: cfg.qemu_path.clone(),
            qemu_version: host.qemu_version(&cfg.qemu_path).await?,
            kernel: cfg.kernel.clone(),
            kernel_file,
            initrd: cfg.initrd.clone(),
            initrd_file,
            kernel_params: cfg.kernel_params.clone(),
            vcpus: cfg.vcpus,
            max_vcpus: cfg.max_vcpus,
            memory_mib: cfg.memory_mib,
            memory_slots: cfg.memory_slots,
            max_memory_mib: cfg.max_memory_mib,
            machine: cfg.machine,
            accel: cfg.accel,
            cpu_model: cfg.cpu_model_for(cfg.accel).map(str::to_owned),
            agent_channel: cfg.agent_channel.clone(),
            tcg_tb_size_mib: cfg.tcg_tb_size_mib,
            disk_slots: cfg.disk_slots,
            machine_options: cfg.effective_machine_options().to_owned(),
            vmgenid: cfg.has_vmgenid(),
            nic: cfg.nic.as_ref().map(|n| n.mac.clone()),
        })
    }

    /// SHA-256 of the key's canonical JSON (keys sorted), hex.
    pub fn hash(&self) -> String {
        let json = serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_default();
        Sha256::digest(json.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The first top-level field in which two JSON objects differ, with both values rendered
/// (strings without quotes): `(field, a, b)`.
pub(crate) fn first_difference(a: &Value, b: &Value) -> Option<(String, String, String)> {
    let render = |v: Option<&Value>| match v {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => "nothing".to_owned(),
    };
    let (Value::Object(a), Value::Object(b)) = (a, b) else {
        return (a != b).then(|| ("value".to_owned(), render(Some(a)), render(Some(b))));
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .find(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), render(a.get(k)), render(b.get(k))))
}

/// `<template>/metadata.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateMetadata {
    /// Format version ([`TEMPLATE_METADATA_VERSION`]).
    pub version: u32,
    /// [`CloneKey::hash`] of `key`.
    pub config_hash: String,
    /// What a clone must match.
    pub key: CloneKey,
    /// The template's memory in MiB (the memory file's size).
    pub memory_mib: u64,
    /// When the template was made, seconds since the epoch.
    pub created_at_secs: u64,
    /// The device state file's size in bytes, so that a truncated one is refused before a
    /// clone tries to load it (absent in metadata written before it was recorded: then the
    /// state file need only be non-empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
    /// The memory and state files as saved, checked before every clone (absent in metadata
    /// written before it was recorded: then only their sizes are checked, when opened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<SavedFiles>,
    /// Whether the template VM's agent said its clones reseed their CRNG themselves
    /// (VMGenID; `PrepareTemplate`), so that `get_vm` leaves out the host's reseed. A
    /// property of the guest, not of the config, so not in the key; absent (false) in
    /// metadata written before it was asked, whose clones are reseeded by the host.
    #[serde(default, skip_serializing_if = "is_false")]
    pub clones_reseed_themselves: bool,
}

impl TemplateMetadata {
    /// Metadata for a template made now with `key`.
    pub fn new(key: CloneKey) -> Self {
        Self {
            version: TEMPLATE_METADATA_VERSION,
            config_hash: key.hash(),
            memory_mib: key.memory_mib,
            key,
            created_at_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            state_bytes: None,
            files: None,
            clones_reseed_themselves: false,
        }
    }

    /// Writes `<dir>/metadata.json` atomically, mode 0600.
    pub async fn write(&self, dir: &Path) -> Result<(), TemplateError> {
        write_json(&dir.join(METADATA_FILE), self).await
    }

    /// Loads and checks `<dir>/metadata.json`: present, a regular file (no symlink followed,
    /// no FIFO waited on) within [`MAX_METADATA_SIZE`], valid JSON, a version this build reads,
    /// and a hash that matches its key.
    pub async fn load(dir: &Path) -> Result<Self, TemplateError> {
        let path = dir.join(METADATA_FILE);
        let bytes = match vmfactory_persist::read_limited(&path, MAX_METADATA_SIZE).await {
            Ok(b) => b,
            Err(vmfactory_persist::Error::NotFound { .. }) => {
                return Err(TemplateError::Missing { path })
            }
            Err(source) => {
                return Err(TemplateError::Persist {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        // The version first, so a future format is reported as such, not as corrupt.
        let version = serde_json::from_slice::<Value>(&bytes)
            .map_err(|source| TemplateError::Corrupt {
                path: path.clone(),
                source,
            })?
            .get("version")
            .and_then(Value::as_u64);
        if let Some(found) = version.filter(|v| *v != u64::from(TEMPLATE_METADATA_VERSION)) {
            return Err(TemplateError::UnsupportedVersion {
                path,
                found: u32::try_from(found).unwrap_or(u32::MAX),
                supported: TEMPLATE_METADATA_VERSION,
            });
        }
        let meta: Self =
            serde_json::from_slice(&bytes).map_err(|source| TemplateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if meta.config_hash != meta.key.hash() || meta.memory_mib != meta.key.memory_mib {
            return Err(TemplateError::HashMismatch { path });
        }
        Ok(meta)
    }

    /// Checks that a clone with `key` can use this template; the error names the first
    /// differing field.
    pub fn check(&self, key: &CloneKey) -> Result<(), TemplateError> {
        if self.config_hash == key.hash() {
            return Ok(());
        }
        let (a, b) = (
            serde_json::to_value(&self.key).unwrap_or_default(),
            serde_json::to_value(key).unwrap_or_default(),
        );
        let (field, template, config) = first_difference(&a, &b)
            .unwrap_or_else(|| ("config_hash".into(), self.config_hash.clone(), key.hash()));
        Err(TemplateError::Mismatch {
            field,
            template,
            config,
        })
    }
}

/// Writes `value` as JSON to `path` atomically, mode 0600 (template files vmfactory writes).
pub(super) async fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), TemplateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|source| TemplateError::Corrupt {
        path: path.to_owned(),
        source,
    })?;
    vmfactory_persist::write_atomic(path, bytes, 0o600)
        .await
        .map_err(|source| TemplateError::Persist {
            op: "written",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field, template value and config value of a mismatch; panics on anything else.
    fn mismatch(checked: Result<(), TemplateError>) -> [String; 3] {
        match checked {
            Err(TemplateError::Mismatch {
                field,
                template,
                config,
            }) => [field, template, config],
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }
    use crate::testing::FakeHost;

    fn cfg(dir: &Path) -> HypervisorConfig {
        HypervisorConfig::new(dir.join("k"), Some(dir.join("i")))
    }

    async fn key(dir: &Path) -> CloneKey {
        std::fs::write(dir.join("k"), b"kernel").expect("k");
        std::fs::write(dir.join("i"), b"initrd").expect("i");
        CloneKey::gather(&cfg(dir).pinned(Accel::Tcg), &FakeHost::default())
            .await
            .expect("key")
    }

    #[tokio::test]
    async fn round_trip_and_per_field_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key(dir.path()).await;
        assert_eq!(k.kernel_file.size, 6);
        assert_eq!(k.qemu_version, "QEMU emulator version 7.2.0 (fake)");
        let meta = TemplateMetadata::new(k.clone());
        meta.write(dir.path()).await.expect("write");
        let loaded = TemplateMetadata::load(dir.path()).await.expect("load");
        assert_eq!(loaded, meta);
        loaded.check(&k).expect("same key");

        let mut other = k.clone();
        other.memory_mib = 512;
        assert_eq!(mismatch(loaded.check(&other)), ["memory_mib", "256", "512"]);
        let mut other = k.clone();
        other.kernel_params = "x=1".into();
        assert!(
            matches!(loaded.check(&other), Err(TemplateError::Mismatch { field, .. }) if field == "kernel_params")
        );
        let mut other = k.clone();
        other.qemu_version = "QEMU 8".into();
        assert!(
            matches!(loaded.check(&other), Err(TemplateError::Mismatch { field, template, .. }) if field == "qemu_version" && template.contains("7.2.0"))
        );
        // Made under KVM with the host's CPU; the host now resolves to TCG, or another model
        // is configured.
        let kvm = CloneKey::gather(&cfg(dir.path()).pinned(Accel::Kvm), &FakeHost::default())
            .await
            .expect("key");
        assert_eq!(
            (kvm.accel, kvm.cpu_model.as_deref()),
            (Accel::Kvm, Some("host"))
        );
        let made_under_kvm = TemplateMetadata::new(kvm.clone());
        let tcg = CloneKey::gather(&cfg(dir.path()).pinned(Accel::Tcg), &FakeHost::default())
            .await
            .expect("key");
        assert_eq!(
            mismatch(made_under_kvm.check(&tcg)),
            ["accel", "kvm", "tcg"]
        );
        let mut max = cfg(dir.path());
        max.cpu_model = Some("max".into());
        let max = CloneKey::gather(&max.pinned(Accel::Kvm), &FakeHost::default())
            .await
            .expect("key");
        assert_eq!(
            mismatch(made_under_kvm.check(&max)),
            ["cpu_model", "host", "max"]
        );
        assert_eq!(
            mismatch(TemplateMetadata::new(tcg.clone()).check(&kvm)),
            ["accel", "tcg", "kvm"]
        );
        // A rebuilt kernel (new size / mtime).
        std::fs::write(dir.path().join("k"), b"kernel2").expect("k");
        let rebuilt = CloneKey::gather(&cfg(dir.path()).pinned(Accel::Tcg), &FakeHost::default())
            .await
            .expect("key");
        assert!(
            matches!(loaded.check(&rebuilt), Err(TemplateError::Mismatch { field, .. }) if field == "kernel_file")
        );
    }

    #[tokio::test]
    async fn metadata_from_before_disk_slots_loads_and_mismatches_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key(dir.path()).await;
        assert_eq!(k.disk_slots, 4, "the default");
        // Written before the field: no `disk_slots` in the key, hashed without it.
        let old_key = CloneKey {
            disk_slots: 0,
            ..k.clone()
        };
        let old = TemplateMetadata::new(old_key.clone());
        let json = serde_json::to_value(&old).expect("json");
        assert!(json["key"].get("disk_slots").is_none(), "{json}");
        old.write(dir.path()).await.expect("write");
        let loaded = TemplateMetadata::load(dir.path())
            .await
            .expect("hash unchanged");
        loaded
            .check(&old_key)
            .expect("a config without slots still fits");
        assert_eq!(mismatch(loaded.check(&k)), ["disk_slots", "nothing", "4"]);
        let two = CloneKey {
            disk_slots: 2,
            ..k.clone()
        };
        assert_eq!(
            mismatch(TemplateMetadata::new(two).check(&k)),
            ["disk_slots", "2", "4"]
        );
    }

    #[tokio::test]
    async fn metadata_from_before_machine_options_mismatches_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = key(dir.path()).await;
        assert_eq!(k.machine_options, "sata=off", "q35's lean default");
        // Written before the field: no `machine_options` in the key, hashed without it.
        let old_key = CloneKey {
            machine_options: String::new(),
            ..k.clone()
        };
        let old = TemplateMetadata::new(old_key.clone());
        let json = serde_json::to_value(&old).expect("json");
        assert!(json["key"].get("machine_options").is_none(), "{json}");
        old.write(dir.path()).await.expect("write");
        let loaded = TemplateMetadata::load(dir.path())
            .await
            .expect("hash unchanged");
        loaded
            .check(&old_key)
            .expect("a config without options fits");
        assert_eq!(
            mismatch(loaded.check(&k)),
            ["machine_options", "nothing", "sata=off"]
        );
        let mut other = cfg(dir.path());
        other.machine_options = Some("sata=off,smbus=off".into());
        let other = CloneKey::gather(&other.pinned(Accel::Tcg), &FakeHost::default())
            .await
            .expect("key");
        assert_eq!(
            mismatch(TemplateMetadata::new(k).check(&other)),
            ["machine_options", "sata=off", "sata=off,smbus=off"]
        );
    }

    #[tokio::test]
    async fn metadata_from_before_vmgenid_loads_and_mismatches_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old_key = key(dir.path()).await;
        assert!(!old_key.vmgenid, "the default");
        let k = CloneKey {
            vmgenid: true,
            ..old_key.clone()
        };
        // Off (the default, or written before the device existed): no `vmgenid` in the key,
        // hashed as before.
        let old = TemplateMetadata::new(old_key.clone());
        let json = serde_json::to_value(&old).expect("json");
        assert!(json["key"].get("vmgenid").is_none(), "{json}");
        old.write(dir.path()).await.expect("write");
        let loaded = TemplateMetadata::load(dir.path())
            .await
            .expect("hash unchanged");
        loaded
            .check(&old_key)
            .expect("a config without it still fits");
        assert_eq!(mismatch(loaded.check(&k)), ["vmgenid", "nothing", "true"]);
    }

    #[tokio::test]
    async fn missing_corrupt_tampered_and_future_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::Missing { path }) if path.ends_with(METADATA_FILE)
        ));
        let path = dir.path().join(METADATA_FILE);
        std::fs::write(&path, b"{not json").expect("write");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::Corrupt { .. })
        ));
        std::fs::write(&path, b"{\"version\":2}").expect("write");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::Corrupt { .. })
        ));
        std::fs::write(&path, b"{\"version\":7,\"new\":true}").expect("write");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::UnsupportedVersion { found: 7, .. })
        ));
        let mut meta = TemplateMetadata::new(key(dir.path()).await);
        meta.key.vcpus = 2; // edited without updating the hash
        meta.write(dir.path()).await.expect("write");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::HashMismatch { .. })
        ));
        std::fs::write(&path, vec![b' '; 100 * 1024]).expect("write");
        assert!(matches!(
            TemplateMetadata::load(dir.path()).await,
            Err(TemplateError::Persist { op: "read", .. })
        ));
    }

    #[tokio::test]
    async fn fifo_and_symlinked_metadata_are_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let load = || async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                TemplateMetadata::load(dir.path()),
            )
            .await
            .expect("load returns at once")
        };
        let path = dir.path().join(METADATA_FILE);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        assert!(matches!(
            load().await,
            Err(TemplateError::Persist {
                source: vmfactory_persist::Error::NotRegular { .. },
                ..
            })
        ));
        // Valid metadata elsewhere: a followed link would load it.
        std::fs::remove_file(&path).expect("rm");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        TemplateMetadata::new(key(dir.path()).await)
            .write(elsewhere.path())
            .await
            .expect("write");
        std::os::unix::fs::symlink(elsewhere.path().join(METADATA_FILE), &path).expect("ln");
        assert!(matches!(
            load().await,
            Err(TemplateError::Persist {
                source: vmfactory_persist::Error::Symlink { .. },
                ..
            })
        ));
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = serde_json::json!({"a": 1, "b": "x", "c": [1]});
        let b = serde_json::json!({"a": 1, "b": "y", "d": 2});
        assert_eq!(
            first_difference(&a, &b),
            Some(("b".into(), "x".into(), "y".into()))
        );
        assert_eq!(first_difference(&a, &a), None);
        let c = serde_json::json!({"a": 1, "b": "x"});
        assert_eq!(
            first_difference(&a, &c),
            Some(("c".into(), "[1]".into(), "nothing".into()))
        );
    }
}
