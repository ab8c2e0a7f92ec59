//! Hot-plugged disks: what to attach ([`DiskConfig`]), what is attached ([`AttachedDisk`]),
//! where it lands on the PCI tree (slots, Kata's PCI path) and what can go wrong
//! ([`DiskError`]). The QMP side is `qemu/disks.rs`; the boot-time root ports are in
//! [`crate::cmdline`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Disk slots a new [`crate::HypervisorConfig`] gets.
pub const DEFAULT_DISK_SLOTS: u32 = 4;

/// Root-bus slot of the first disk root port on q35 (`rp0`; `rpN` sits at this + N). Fixed, so
/// that a template and its clones have the same devices at the same addresses; high, so that
/// the devices QEMU places itself (lowest free slot first) never reach it.
pub const FIRST_DISK_PORT_SLOT: u32 = 0x10;

/// Most disk slots: q35 root-bus slots `0x10..=0x1e` (`0x1f` is the ICH9 LPC/SATA/SMBus).
pub const MAX_DISK_SLOTS: u32 = 0x1f - FIRST_DISK_PORT_SLOT;

/// How long [`crate::Hypervisor::detach_disk`] waits for the guest to release a disk.
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

/// The image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image (or block device).
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl DiskFormat {
    /// The QEMU block driver name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

/// A disk to hot-plug as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DiskConfig {
    /// The image file (or block device); an absolute, UTF-8 path (QEMU takes it as a string).
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Open it read-only: the guest cannot write, and many VMs can share the image (QEMU takes
    /// a shared lock on it instead of an exclusive one).
    #[serde(default)]
    pub read_only: bool,
}

impl DiskConfig {
    /// A read-write disk of `format` at `path`.
    pub fn new(path: impl Into<PathBuf>, format: DiskFormat) -> Self {
        Self {
            path: path.into(),
            format,
            read_only: false,
        }
    }

    /// This disk opened read-only (`read_only`) or read-write.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The path as QEMU is given it, or why it cannot be given (no file system access).
    pub fn qemu_path(&self) -> Result<&str, DiskError> {
        let invalid = |reason| DiskError::InvalidPath {
            path: self.path.clone(),
            reason,
        };
        let s = self.path.to_str().ok_or_else(|| invalid("is not UTF-8"))?;
        if !self.path.is_absolute() {
            return Err(invalid("is not absolute"));
        }
        Ok(s)
    }
}

/// A disk attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachedDisk {
    /// The QMP id of the device and of the format node (`diskN`; the file node under it is
    /// `diskN-file`, see [`file_node`]).
    pub id: String,
    /// Where the guest finds it, as Kata's PCI path: each slot from the root bus down, two hex
    /// digits, separated by `/` (q35: `10/00`, slot 0 behind the root port at slot 0x10; pc:
    /// `05`).
    pub pci_path: String,
    /// What was attached.
    pub config: DiskConfig,
}

/// The id of hot-plugged disk `n`. The boot image's drive is `disk0` (a node name may not
/// repeat a drive's name), so hot-plugged ones count from 1.
pub(crate) fn disk_id(n: u32) -> String {
    format!("disk{n}")
}

/// The first hot-plugged disk number (see [`disk_id`]).
pub(crate) const FIRST_DISK_NUMBER: u32 = 1;

/// The protocol (`file`) node under the format node `id`.
pub fn file_node(id: &str) -> String {
    format!("{id}-file")
}

/// The id of disk root port `i` on q35.
pub fn root_port_id(i: u32) -> String {
    format!("rp{i}")
}

/// The root-bus slot of disk root port `i` on q35.
pub fn root_port_slot(i: u32) -> u32 {
    FIRST_DISK_PORT_SLOT + i
}

/// Kata's PCI path of the device reached through `slots`, root bus first.
pub fn pci_path(slots: &[u32]) -> String {
    slots
        .iter()
        .map(|s| format!("{s:02x}"))
        .collect::<Vec<_>>()
        .join("/")
}

/// A disk that cannot be attached or detached. QMP failures are [`crate::Error::Qmp`]; a
/// machine without PCI hotplug is [`crate::Error::Unsupported`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// The image path cannot be handed to QEMU.
    #[error("Disk image path {path} {reason}")]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The image is missing or cannot be opened for reading.
    #[error("Disk image {path} is not readable")]
    ImageUnreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A read-write disk's image cannot be written.
    #[error("Disk image {path} is not writable")]
    ImageNotWritable {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every disk slot is taken (or the VM has none).
    #[error("VM {id} has no free disk slot ({slots} configured)")]
    NoFreeSlot {
        /// VM id.
        id: String,
        /// The configured disk slots.
        slots: u32,
    },
    /// No disk with this id is attached.
    #[error("VM {id} has no disk {disk}")]
    UnknownDisk {
        /// VM id.
        id: String,
        /// The disk id asked for.
        disk: String,
    },
    /// The guest did not release the disk in time; it stays attached.
    #[error("Disk {disk} of VM {id} not released by the guest after {timeout:?}")]
    DetachTimeout {
        /// VM id.
        id: String,
        /// The disk id.
        disk: String,
        /// The deadline that passed.
        timeout: Duration,
    },
}

/// Checks that the image can be opened as `disk` asks (readable, and writable unless
/// read-only), so a missing file fails with its path before QEMU is asked. Blocking.
pub(crate) fn check_image(disk: &DiskConfig) -> Result<(), DiskError> {
    let path = Path::new(disk.qemu_path()?);
    crate::files::open_regular(path, crate::files::Symlinks::Follow, true).map_err(|source| {
        DiskError::ImageUnreadable {
            path: disk.path.clone(),
            source,
        }
    })?;
    if !disk.read_only {
        nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).map_err(|e| {
            DiskError::ImageNotWritable {
                path: disk.path.clone(),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths() {
        assert_eq!(disk_id(FIRST_DISK_NUMBER), "disk1");
        assert_eq!(file_node("disk1"), "disk1-file");
        assert_eq!(root_port_id(3), "rp3");
        assert_eq!(pci_path(&[root_port_slot(0), 0]), "10/00");
        assert_eq!(pci_path(&[root_port_slot(14)]), "1e");
        assert_eq!(root_port_slot(MAX_DISK_SLOTS - 1), 0x1e);
    }

    #[test]
    fn wire_form() {
        let d = AttachedDisk {
            id: "disk1".into(),
            pci_path: "10/00".into(),
            config: DiskConfig::new("/i/a.qcow2", DiskFormat::Qcow2),
        };
        let json = serde_json::to_value(&d).expect("ser");
        assert_eq!(
            json,
            serde_json::json!({"id": "disk1", "pci_path": "10/00",
                "config": {"path": "/i/a.qcow2", "format": "qcow2", "read_only": false}})
        );
        assert_eq!(serde_json::from_value::<AttachedDisk>(json).expect("de"), d);
    }

    #[test]
    fn paths_qemu_cannot_take_are_refused() {
        let rel = DiskConfig::new("img.raw", DiskFormat::Raw);
        assert!(matches!(
            rel.qemu_path(),
            Err(DiskError::InvalidPath {
                reason: "is not absolute",
                ..
            })
        ));
        use std::os::unix::ffi::OsStrExt;
        let bad = DiskConfig::new(std::ffi::OsStr::from_bytes(b"/i/\xff.raw"), DiskFormat::Raw);
        assert!(matches!(
            bad.qemu_path(),
            Err(DiskError::InvalidPath {
                reason: "is not UTF-8",
                ..
            })
        ));
    }

    #[test]
    fn missing_and_read_only_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = DiskConfig::new(dir.path().join("none.raw"), DiskFormat::Raw);
        let err = check_image(&missing).expect_err("missing");
        assert_eq!(
            err.to_string(),
            format!("Disk image {} is not readable", missing.path.display())
        );
        assert!(matches!(err, DiskError::ImageUnreadable { .. }));
        let dirpath = DiskConfig::new(dir.path(), DiskFormat::Raw);
        assert!(matches!(
            check_image(&dirpath),
            Err(DiskError::ImageUnreadable { .. })
        ));
        let img = dir.path().join("a.raw");
        std::fs::write(&img, [0u8; 512]).expect("write");
        let mut d = DiskConfig::new(&img, DiskFormat::Raw);
        check_image(&d).expect("read-write");
        d.read_only = true;
        check_image(&d).expect("read-only");
    }
}
