//! Disk hotplug over QMP. Attach: check the image, find a free slot (`query-pci`),
//! `blockdev-add` a `file` node and a `raw`/`qcow2` node on it, `device_add virtio-blk-pci`.
//! Detach: `device_del`, wait until the guest has let the device go (`DEVICE_DELETED`, or
//! `query-pci` no longer shows it), `blockdev-del` both nodes.

use std::collections::BTreeSet;
use std::time::Duration;

use qapi::qmp::{
    blockdev_add, blockdev_del, device_add, device_del, BlockdevOptions, BlockdevOptionsBase,
    BlockdevOptionsFile, BlockdevOptionsQcow2, BlockdevOptionsRaw, BlockdevRef,
};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::{info, instrument, warn};

use super::{Inner, Running};
use crate::config::{HypervisorConfig, MachineType};
use crate::disk::{
    check_image, disk_id, file_node, pci_path, root_port_id, AttachedDisk, DiskConfig, DiskError,
    DiskFormat,
};
use crate::error::{Error, QmpError, QmpErrorClass, Result};
use crate::qmp::QmpClient;

/// A device as `query-pci` reports it, the fields read here only. Read through this subset,
/// not qapi's `PciDeviceInfo`, which requires a dozen fields (regions, class, ids) nothing
/// here needs, and so would every scripted reply in the tests.
#[derive(Debug, Deserialize)]
struct PciDevice {
    slot: u32,
    #[serde(default)]
    qdev_id: String,
    #[serde(default)]
    pci_bridge: Option<PciBridge>,
}

/// The bus behind a bridge (a root port).
#[derive(Debug, Deserialize)]
struct PciBridge {
    #[serde(default)]
    devices: Vec<PciDevice>,
}

/// One bus of `query-pci`'s answer (the root bus is 0).
#[derive(Debug, Deserialize)]
struct PciBus {
    bus: u32,
    devices: Vec<PciDevice>,
}

async fn query_pci(id: &str, qmp: &QmpClient) -> Result<Vec<PciBus>> {
    let raw = qmp
        .execute_raw("query-pci", Value::Null)
        .await
        .map_err(|e| Error::qmp(id, e))?;
    serde_json::from_value(raw).map_err(|source| {
        let command = "query-pci".to_owned();
        Error::qmp(id, QmpError::Decode { command, source })
    })
}

/// Whether device `dev` is anywhere below `devices`.
fn has_device(devices: &[PciDevice], dev: &str) -> bool {
    devices.iter().any(|d| {
        d.qdev_id == dev
            || d.pci_bridge
                .as_ref()
                .is_some_and(|b| has_device(&b.devices, dev))
    })
}

/// Where a new disk goes: the bus `device_add` names, its `addr` if fixed, its PCI path.
#[derive(Debug, PartialEq, Eq)]
struct Slot {
    bus: String,
    addr: Option<String>,
    pci_path: String,
}

/// The first free slot. q35: the lowest disk root port with nothing behind it (a VM booted
/// before disk hotplug has none). pc: the lowest free slot of `pci.0`, while fewer than
/// `disk_slots` disks are plugged.
fn free_slot(cfg: &HypervisorConfig, plugged: usize, buses: &[PciBus]) -> Option<Slot> {
    let root = buses
        .iter()
        .find(|b| b.bus == 0)
        .map_or(&[][..], |b| &b.devices);
    match cfg.machine {
        MachineType::Q35 => (0..cfg.disk_slots).find_map(|i| {
            let port = root_port_id(i);
            let dev = root.iter().find(|d| d.qdev_id == port)?;
            let empty = dev
                .pci_bridge
                .as_ref()
                .map_or(true, |b| b.devices.is_empty());
            empty.then(|| Slot {
                bus: port,
                addr: None,
                pci_path: pci_path(&[dev.slot, 0]),
            })
        }),
        MachineType::Pc => {
            if plugged >= usize::try_from(cfg.disk_slots).unwrap_or(usize::MAX) {
                return None;
            }
            let used: BTreeSet<u32> = root.iter().map(|d| d.slot).collect();
            (1..32).find(|s| !used.contains(s)).map(|s| Slot {
                bus: "pci.0".into(),
                addr: Some(format!("{s:#x}")),
                pci_path: pci_path(&[s]),
            })
        }
        MachineType::Microvm => None,
    }
}

/// The common node options: its name, and read-only when the disk is.
fn node_base(node: &str, read_only: bool) -> BlockdevOptionsBase {
    BlockdevOptionsBase {
        auto_read_only: None,
        cache: None,
        detect_zeroes: None,
        discard: None,
        force_share: None,
        node_name: Some(node.to_owned()),
        read_only: read_only.then_some(true),
    }
}

/// `blockdev-add` of the protocol node: the image file. QEMU's defaults lock it (shared for
/// a read-only node, so many VMs can open one image read-only; exclusive for a writer).
fn file_node_options(node: &str, filename: &str, read_only: bool) -> blockdev_add {
    blockdev_add(BlockdevOptions::file {
        base: node_base(node, read_only),
        file: BlockdevOptionsFile {
            aio: None,
            aio_max_batch: None,
            drop_cache: None,
            locking: None,
            pr_manager: None,
            x_check_cache_dropped: None,
            filename: filename.to_owned(),
        },
    })
}

/// `blockdev-add` of the format node `node` on the protocol node `file`.
fn format_node_options(node: &str, file: &str, disk: &DiskConfig) -> blockdev_add {
    let base = node_base(node, disk.read_only);
    let file = BlockdevRef::reference(file.to_owned());
    blockdev_add(match disk.format {
        DiskFormat::Raw => BlockdevOptions::raw {
            base,
            raw: BlockdevOptionsRaw::from(file),
        },
        DiskFormat::Qcow2 => BlockdevOptions::qcow2 {
            base,
            qcow2: BlockdevOptionsQcow2::from(file),
        },
    })
}

/// Deletes `nodes` in order, logging failures (undo of a failed attach).
async fn delete_nodes(qmp: &QmpClient, nodes: &[&str]) {
    for node in nodes {
        let del = blockdev_del {
            node_name: (*node).to_owned(),
        };
        if let Err(e) = qmp.execute(del).await {
            warn!(error = %e, node, "undo blockdev-del failed");
        }
    }
}

/// Hot-plugs `disk` into the first free slot; a failure removes the nodes this call added.
#[instrument(skip_all, fields(vm = %inner.id, path = %disk.path.display()))]
pub(super) async fn attach_disk(
    inner: &Inner,
    r: &mut Running,
    disk: &DiskConfig,
) -> Result<AttachedDisk> {
    let id = &inner.id;
    let cfg = &inner.config;
    if cfg.machine == MachineType::Microvm {
        return Err(Error::Unsupported {
            id: id.clone(),
            what: "Disk hotplug (microvm has no PCI)",
        });
    }
    let checked = disk.clone();
    tokio::task::spawn_blocking(move || check_image(&checked))
        .await
        .map_err(|e| Error::io("Checking", &disk.path, std::io::Error::other(e)))??;
    let filename = disk.qemu_path()?;
    let buses = query_pci(id, &r.qmp).await?;
    let slot = free_slot(cfg, r.disks.len(), &buses).ok_or_else(|| DiskError::NoFreeSlot {
        id: id.clone(),
        slots: cfg.disk_slots,
    })?;
    let dev = disk_id(r.next_disk_id);
    r.next_disk_id += 1;
    let file = file_node(&dev);
    r.qmp
        .execute(file_node_options(&file, filename, disk.read_only))
        .await
        .map_err(|e| Error::qmp(id, e))?;
    if let Err(e) = r.qmp.execute(format_node_options(&dev, &file, disk)).await {
        delete_nodes(&r.qmp, &[&file]).await;
        return Err(Error::qmp(id, e));
    }
    let mut props = vec![("drive".to_owned(), json!(dev))];
    if let Some(addr) = &slot.addr {
        props.push(("addr".to_owned(), json!(addr)));
    }
    let add = device_add::new("virtio-blk-pci", dev.clone(), slot.bus.clone(), props);
    if let Err(e) = r.qmp.execute(add).await {
        warn!(error = %e, device = %dev, "disk hotplug failed, rolling back");
        delete_nodes(&r.qmp, &[&dev, &file]).await;
        return Err(Error::qmp(id, e));
    }
    let attached = AttachedDisk {
        id: dev,
        pci_path: slot.pci_path,
        config: disk.clone(),
    };
    info!(disk = %attached.id, pci_path = %attached.pci_path, read_only = disk.read_only, "disk attached");
    r.disks.push(attached.clone());
    Ok(attached)
}

/// Unplugs disk `disk`, waits up to `timeout` for the guest to release it, then deletes its
/// nodes. On a timeout the disk stays recorded (it is still plugged); a later call asks again.
#[instrument(skip(inner, r), fields(vm = %inner.id))]
pub(super) async fn detach_disk(
    inner: &Inner,
    r: &mut Running,
    disk: &str,
    timeout: Duration,
) -> Result<()> {
    let id = &inner.id;
    let Some(index) = r.disks.iter().position(|d| d.id == disk) else {
        return Err(DiskError::UnknownDisk {
            id: id.clone(),
            disk: disk.to_owned(),
        }
        .into());
    };
    let events = r.qmp.subscribe();
    match r
        .qmp
        .execute(device_del {
            id: disk.to_owned(),
        })
        .await
    {
        Ok(_) => {}
        // Gone already: an earlier detach timed out and the guest has let go since.
        Err(e) if e.class() == Some(&QmpErrorClass::DeviceNotFound) => {}
        Err(e) => return Err(Error::qmp(id, e)),
    }
    wait_device_gone(id, &r.qmp, disk, events, timeout).await?;
    r.disks.remove(index);
    let mut result = Ok(());
    for node in [disk.to_owned(), file_node(disk)] {
        let del = blockdev_del {
            node_name: node.clone(),
        };
        if let Err(e) = r.qmp.execute(del).await {
            warn!(error = %e, node, "blockdev-del failed");
            result = result.and(Err(Error::qmp(id, e)));
        }
    }
    info!(disk, ok = result.is_ok(), "disk detached");
    result
}

/// Whether `event` is the `DEVICE_DELETED` of device `dev` (QEMU also sends one for the
/// device's virtio backend, with a path and no device id).
fn is_deleted(event: &Value, dev: &str) -> bool {
    event.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
        && event.pointer("/data/device").and_then(Value::as_str) == Some(dev)
}

/// Waits until device `dev` is gone. Event-driven: `events` was subscribed before
/// `device_del`; `query-pci` is asked first and after a lagging receiver, so an event missed
/// costs nothing.
async fn wait_device_gone(
    id: &str,
    qmp: &QmpClient,
    dev: &str,
    mut events: broadcast::Receiver<Value>,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let buses = query_pci(id, qmp).await?;
        if !buses.iter().any(|b| has_device(&b.devices, dev)) {
            return Ok(());
        }
        let deleted = async {
            loop {
                match events.recv().await {
                    Ok(ev) if is_deleted(&ev, dev) => return true,
                    Ok(_) => {}
                    // Look again; if closed, the next query fails with the QMP error.
                    Err(RecvError::Lagged(_) | RecvError::Closed) => return false,
                }
            }
        };
        match tokio::time::timeout_at(deadline, deleted).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(_) => {
                return Err(DiskError::DetachTimeout {
                    id: id.to_owned(),
                    disk: dev.to_owned(),
                    timeout,
                }
                .into())
            }
        }
    }
}

#[cfg(test)]
#[path = "disks_tests.rs"]
mod tests;
