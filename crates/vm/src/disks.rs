//! Disks hot-plugged into a running VM (clones included) and mounted by its agent.
//!
//! Attach: the hypervisor adds the image (`blockdev-add` + `virtio-blk-pci` on a free hotplug
//! slot) and reports the device's PCI path; the agent finds the block device behind that path
//! and mounts it (Kata's `Storage`, driver `blk`). Detach unmounts, then unplugs. A failed
//! step undoes the ones before it. Stopping the VM takes its disks with it.

use tracing::{info, instrument, warn};
use vmfactory_agent::Storage;
use vmfactory_hypervisor::{AttachedDisk, DiskConfig};

use crate::error::{Error, Result};
use crate::vm::Vm;

/// Where and how the guest mounts a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMount {
    /// Absolute mount point in the guest (created if missing).
    pub mount_point: String,
    /// The file system on the disk (`ext4`).
    pub fstype: String,
    /// Extra mount options; `ro` is added for a read-only disk.
    pub options: Vec<String>,
}

impl DiskMount {
    /// An `ext4` file system mounted at `mount_point`.
    pub fn ext4(mount_point: impl Into<String>) -> Self {
        DiskMount {
            mount_point: mount_point.into(),
            fstype: "ext4".into(),
            options: Vec::new(),
        }
    }
}

impl Vm {
    /// Hot-plugs `disk` and mounts it in the guest at `mount.mount_point`; returns the
    /// attached disk (its id is what [`Vm::detach_disk`] takes).
    ///
    /// ```no_run
    /// # async fn example(vm: &vmfactory_vm::Vm) -> vmfactory_vm::Result<()> {
    /// use vmfactory_vm::{DiskConfig, DiskFormat, DiskMount};
    ///
    /// let mut disk = DiskConfig::new("/srv/datasets.img", DiskFormat::Raw);
    /// disk.read_only = true; // one read-only image can serve many clones at once
    /// let attached = vm.attach_disk(&disk, &DiskMount::ext4("/data")).await?;
    /// // ... run work that reads /data ...
    /// vm.detach_disk(&attached.id).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[instrument(skip_all, fields(vm = %self.id, path = %disk.path.display(), mount = %mount.mount_point))]
    pub async fn attach_disk(&self, disk: &DiskConfig, mount: &DiskMount) -> Result<AttachedDisk> {
        let mut inner = self.owned().await?;
        if inner.mounts.values().any(|m| *m == mount.mount_point) {
            return Err(Error::MountPointTaken {
                id: self.id.clone(),
                mount_point: mount.mount_point.clone(),
            });
        }
        let attached = self
            .hypervisor
            .attach_disk(disk)
            .await
            .map_err(|e| Error::hv(&self.id, "attach_disk", e))?;
        let mut options = mount.options.clone();
        if disk.read_only && !options.iter().any(|o| o == "ro") {
            options.push("ro".into());
        }
        let storage = Storage {
            driver: Storage::BLK.into(),
            source: attached.pci_path.clone(),
            fstype: mount.fstype.clone(),
            options,
            mount_point: mount.mount_point.clone(),
        };
        if let Err(e) = self
            .agent_call("add_storage", self.agent.add_storage(&storage))
            .await
        {
            if let Err(undo) = self.hypervisor.detach_disk(&attached.id).await {
                warn!(disk = %attached.id, error = %undo, "undoing a disk the guest could not mount");
            }
            return Err(e);
        }
        inner
            .mounts
            .insert(attached.id.clone(), mount.mount_point.clone());
        info!(disk = %attached.id, pci_path = %attached.pci_path, "disk attached and mounted");
        self.save_state(&inner).await?;
        Ok(attached)
    }

    /// Unmounts the disk `id` in the guest and unplugs it.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn detach_disk(&self, id: &str) -> Result<()> {
        let mut inner = self.owned().await?;
        let mount_point = inner
            .mounts
            .get(id)
            .cloned()
            .ok_or_else(|| Error::UnknownDisk {
                id: self.id.clone(),
                disk: id.to_owned(),
            })?;
        self.agent_call("remove_storage", self.agent.remove_storage(&mount_point))
            .await?;
        self.hypervisor
            .detach_disk(id)
            .await
            .map_err(|e| Error::hv(&self.id, "detach_disk", e))?;
        inner.mounts.remove(id);
        info!(disk = id, "disk unmounted and detached");
        self.save_state(&inner).await
    }

    /// The disks attached to the VM with their guest mount points.
    pub async fn disks(&self) -> Vec<(AttachedDisk, String)> {
        let inner = self.inner.lock().await;
        self.hypervisor
            .disks()
            .await
            .into_iter()
            .filter_map(|d| inner.mounts.get(&d.id).cloned().map(|m| (d, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use vmfactory_agent::FakeCall as AgentCall;
    use vmfactory_hypervisor::{DiskFormat, FakeStep};

    use super::*;
    use crate::fake::FakeBackends;

    #[tokio::test]
    async fn attach_mounts_detach_unmounts_and_state_keeps_them() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let img = h.root().join("disk.img");
        std::fs::write(&img, vec![0; 4096]).expect("image");
        let mut disk = DiskConfig::new(&img, DiskFormat::Raw);
        disk.read_only = true;
        let d = vm
            .attach_disk(&disk, &DiskMount::ext4("/data"))
            .await
            .expect("attach");
        let agent = h.last_agent();
        let mounted = agent.storages();
        let st = &mounted["/data"];
        assert_eq!(
            (st.driver.as_str(), st.source.as_str()),
            ("blk", d.pci_path.as_str())
        );
        assert_eq!(st.options, ["ro"]);
        let e = vm
            .attach_disk(&disk, &DiskMount::ext4("/data"))
            .await
            .expect_err("taken");
        assert!(matches!(e, Error::MountPointTaken { .. }), "{e}");
        let saved = vm
            .store
            .load_state::<crate::VmState>(vm.id())
            .await
            .expect("state");
        assert_eq!(saved.mounts.get(&d.id).map(String::as_str), Some("/data"));
        assert_eq!(vm.disks().await.len(), 1);
        vm.detach_disk(&d.id).await.expect("detach");
        assert!(agent.storages().is_empty());
        assert!(vm.disks().await.is_empty());
        let e = vm.detach_disk(&d.id).await.expect_err("gone");
        assert!(matches!(e, Error::UnknownDisk { .. }), "{e}");
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_mount_failure_unplugs_the_disk() {
        let h = FakeBackends::new();
        h.fail_agent_methods(["add_storage"]);
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let img = h.root().join("disk.img");
        std::fs::write(&img, vec![0; 4096]).expect("image");
        let disk = DiskConfig::new(&img, DiskFormat::Raw);
        let e = vm
            .attach_disk(&disk, &DiskMount::ext4("/data"))
            .await
            .expect_err("mount fails");
        assert!(
            matches!(
                e,
                Error::Agent {
                    op: "add_storage",
                    ..
                }
            ),
            "{e}"
        );
        assert!(vm.hypervisor().disks().await.is_empty(), "unplugged again");
        assert_eq!(
            h.last_agent()
                .count(AgentCall::RemoveStorage(String::new()).method()),
            0
        );
        h.last_hv().fail_at(Some(FakeStep::AttachDisk));
        let e = vm
            .attach_disk(&disk, &DiskMount::ext4("/data"))
            .await
            .expect_err("hotplug fails");
        assert!(
            matches!(
                e,
                Error::Hypervisor {
                    op: "attach_disk",
                    ..
                }
            ),
            "{e}"
        );
        vm.stop().await.expect("stop");
    }
}
