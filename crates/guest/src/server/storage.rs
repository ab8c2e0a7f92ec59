//! Storages (Kata's `Storage` message) outside any container: a hot-plugged virtio-blk disk,
//! found by its PCI path and mounted where the host asks.
//!
//! A PCI path (`"05/00"`) lists the slots from the root bus down: the bridge or root port at
//! slot 5 of bus 0, then the device at slot 0 behind it. The device appears in sysfs some time
//! after the host's `device_add` and nothing here signals it (no udev): the agent polls, up to
//! a bound.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tracing::info;

use vmfactory_agent::Storage;

use super::sysfs::GuestPaths;
use crate::error::{Error, Result};

/// How long a storage's device may take to appear.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a wait for a device goes before the PCI bus is rescanned (and again after each).
const RESCAN_AFTER: Duration = Duration::from_secs(2);

/// What the agent has mounted, by mount point.
#[derive(Debug, Default)]
pub struct Storages {
    mounted: Mutex<HashMap<PathBuf, PathBuf>>,
}

/// The slots of a PCI path, root bus first.
fn pci_slots(path: &str) -> Result<Vec<u8>> {
    let slots: Option<Vec<u8>> = path
        .split('/')
        .map(|s| {
            (s.len() == 2)
                .then(|| u8::from_str_radix(s, 16).ok())
                .flatten()
        })
        .collect();
    match slots {
        Some(s) if !s.is_empty() && s.iter().all(|n| *n < 32) => Ok(s),
        _ => Err(Error::Invalid(format!(
            "PCI path {path:?} is not slots of two hex digits joined by /"
        ))),
    }
}

/// The sysfs directory of the device at `slots`, if it is there yet.
fn pci_device_dir(paths: &GuestPaths, slots: &[u8]) -> Option<PathBuf> {
    let mut dir = paths.sys.join("devices/pci0000:00");
    let mut bus = "0000:00".to_owned();
    for slot in slots {
        let name = format!("{bus}:{slot:02x}.0");
        dir = dir.join(&name);
        if !dir.is_dir() {
            return None;
        }
        // The bus behind a bridge: the one child directory named like a device on it.
        bus = fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|n| n.len() == 12 && n.starts_with("0000:") && n.ends_with(":00.0"))
            .map(|n| n[..7].to_owned())
            .unwrap_or_default();
    }
    Some(dir)
}

/// The block device name (`vda`) of a virtio-blk PCI device directory.
fn block_name(dev_dir: &Path) -> Option<String> {
    for entry in fs::read_dir(dev_dir).ok()?.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("virtio") {
            let block = entry.path().join("block");
            if let Some(b) = fs::read_dir(block).ok()?.flatten().next() {
                return b.file_name().into_string().ok();
            }
        }
    }
    None
}

/// Splits mount options into flags and file-system data.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

fn mount_point(paths: &GuestPaths, mp: &str) -> Result<PathBuf> {
    if !mp.starts_with('/') || mp.split('/').any(|c| c == "..") || mp.trim_matches('/').is_empty() {
        return Err(Error::Invalid(format!(
            "mount point {mp:?} must be an absolute path below /"
        )));
    }
    Ok(paths.root.join(mp.trim_start_matches('/')))
}

impl Storages {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, PathBuf>> {
        self.mounted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds the storage's device (waiting for it to appear) and mounts it.
    pub async fn add(&self, paths: &GuestPaths, s: Storage, timeout: Duration) -> Result<()> {
        if s.driver != Storage::BLK {
            return Err(Error::Invalid(format!(
                "storage driver {:?} (this agent mounts {:?})",
                s.driver,
                Storage::BLK
            )));
        }
        let slots = pci_slots(&s.source)?;
        let target = mount_point(paths, &s.mount_point)?;
        if self.lock().contains_key(&target) {
            return Err(Error::Invalid(format!(
                "{} is already mounted",
                s.mount_point
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next_rescan = tokio::time::Instant::now() + RESCAN_AFTER;
        let name = loop {
            let p = paths.clone();
            let sl = slots.clone();
            // The sysfs entry comes first; devtmpfs makes the node a moment later.
            let found = tokio::task::spawn_blocking(move || {
                pci_device_dir(&p, &sl)
                    .and_then(|d| block_name(&d))
                    .filter(|n| p.dev.join(n).exists())
            })
            .await
            .map_err(|e| Error::io("scan", "PCI devices", std::io::Error::other(e)))?;
            if let Some(n) = found {
                break n;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::WaitTimeout {
                    what: format!("a block device at PCI path {}", s.source),
                    timeout,
                });
            }
            if tokio::time::Instant::now() >= next_rescan {
                // A hot-plug whose presence event the guest missed (seen with many VMs
                // hot-plugging at once on a busy host) is found by a rescan, as Kata's agent
                // does before it waits.
                let rescan = paths.sys.join("bus/pci/rescan");
                let _ = tokio::task::spawn_blocking(move || {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(&rescan)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, b"1"))
                })
                .await;
                tracing::debug!(source = %s.source, "rescanned the PCI bus for a late device");
                next_rescan = tokio::time::Instant::now() + RESCAN_AFTER;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let device = paths.dev.join(&name);
        let (flags, data) = mount_options(&s.options);
        let (dev, tgt, fstype) = (device.clone(), target.clone(), s.fstype.clone());
        tokio::task::spawn_blocking(move || {
            fs::create_dir_all(&tgt).map_err(|e| Error::io("create", tgt.display(), e))?;
            mount(
                Some(&dev),
                &tgt,
                Some(fstype.as_str()),
                flags,
                (!data.is_empty()).then_some(data.as_str()),
            )
            .map_err(|e| {
                Error::sys(
                    "mount",
                    format!("{} on {}", dev.display(), tgt.display()),
                    e,
                )
            })
        })
        .await
        .map_err(|e| Error::io("run", "mount task", std::io::Error::other(e)))??;
        info!(device = %device.display(), target = %target.display(), "storage mounted");
        self.lock().insert(target, device);
        Ok(())
    }

    /// Unmounts a storage the agent mounted.
    pub async fn remove(&self, paths: &GuestPaths, mp: &str) -> Result<()> {
        let target = mount_point(paths, mp)?;
        if !self.lock().contains_key(&target) {
            return Err(Error::Invalid(format!("no storage is mounted at {mp}")));
        }
        let tgt = target.clone();
        tokio::task::spawn_blocking(move || {
            umount2(&tgt, MntFlags::empty()).map_err(|e| Error::sys("unmount", tgt.display(), e))
        })
        .await
        .map_err(|e| Error::io("run", "unmount task", std::io::Error::other(e)))??;
        self.lock().remove(&target);
        info!(target = %target.display(), "storage unmounted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_paths_parse() {
        assert_eq!(pci_slots("05/00").expect("ok"), [5, 0]);
        assert_eq!(pci_slots("1f").expect("ok"), [0x1f]);
        for bad in ["", "5/0", "05/", "zz/00", "40/00", "05//00"] {
            assert!(pci_slots(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn finds_the_block_device_behind_a_root_port() {
        let root = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(root.path());
        let port = paths.sys.join("devices/pci0000:00/0000:00:05.0");
        assert_eq!(pci_device_dir(&paths, &[5, 0]), None, "not there yet");
        let dev = port.join("0000:02:00.0");
        fs::create_dir_all(dev.join("virtio3/block/vdb")).expect("tree");
        fs::create_dir_all(port.join("power")).expect("noise");
        let dir = pci_device_dir(&paths, &[5, 0]).expect("found");
        assert_eq!(dir, dev);
        assert_eq!(block_name(&dir).as_deref(), Some("vdb"));
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = ["ro", "noexec", "errors=remount-ro", "discard"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = mount_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC);
        assert_eq!(data, "errors=remount-ro,discard");
    }

    #[tokio::test]
    async fn bad_storages_are_refused_before_any_wait() {
        let root = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(root.path());
        let s = Storages::default();
        let mut st = Storage {
            driver: "9p".into(),
            source: "05/00".into(),
            mount_point: "/mnt".into(),
            ..Default::default()
        };
        assert!(matches!(
            s.add(&paths, st.clone(), DEVICE_TIMEOUT).await,
            Err(Error::Invalid(_))
        ));
        st.driver = Storage::BLK.into();
        st.mount_point = "/a/../b".into();
        assert!(matches!(
            s.add(&paths, st.clone(), DEVICE_TIMEOUT).await,
            Err(Error::Invalid(_))
        ));
        st.mount_point = "/mnt".into();
        let e = s
            .add(&paths, st, Duration::from_millis(50))
            .await
            .expect_err("no device");
        assert!(matches!(e, Error::WaitTimeout { .. }), "{e}");
        assert!(matches!(
            s.remove(&paths, "/mnt").await,
            Err(Error::Invalid(_))
        ));
    }
}
