//! Disk hotplug against the scripted fake QMP peer: the exact commands, undo on failure, the
//! wait for `DEVICE_DELETED`, and the failures that must not reach QEMU.

use std::time::Duration;

use serde_json::{json, Value};

use super::super::fake_qmp::{fake_vm, names, Log};
use super::*;
use crate::disk::FIRST_DISK_NUMBER;

/// A `query-pci` device at `slot` with id `qdev_id`, with `behind` on its bus if a bridge.
fn dev(slot: u32, qdev_id: &str, behind: Option<Vec<Value>>) -> Value {
    let mut d = json!({"bus": 0, "slot": slot, "function": 0, "qdev_id": qdev_id});
    if let Some(devices) = behind {
        d["pci_bridge"] = json!({"bus": {"number": 1}, "devices": devices});
    }
    d
}

/// q35's root bus: the host bridge, `rp0` holding a disk, `rp1` empty, and ICH9 at 0x1f.
fn q35_pci() -> Value {
    json!([{"bus": 0, "devices": [
        dev(0, "", None),
        dev(0x10, "rp0", Some(vec![dev(0, "disk7", None)])),
        dev(0x11, "rp1", Some(Vec::new())),
        dev(0x1f, "", None),
    ]}])
}

/// Answers `query-pci` with `pci`, fails `failing`, and returns `{}` to everything else.
fn script(pci: Value, failing: Option<&'static str>) -> impl Fn(&Value) -> Value + Send + 'static {
    move |cmd| match cmd["execute"].as_str() {
        Some("query-pci") => json!({"return": pci}),
        Some(c) if Some(c) == failing => {
            json!({"error": {"class": "GenericError", "desc": "boom"}})
        }
        _ => json!({"return": {}}),
    }
}

/// An image file in `dir`.
fn image(dir: &tempfile::TempDir, name: &str, format: DiskFormat) -> DiskConfig {
    let path = dir.path().join(name);
    std::fs::write(&path, [0u8; 4096]).expect("image");
    DiskConfig::new(path, format)
}

fn args(log: &Log, i: usize) -> Value {
    log.lock().expect("log")[i]["arguments"].clone()
}

async fn done(mut r: Running) {
    r.qemu.terminate("t", Duration::ZERO).await.expect("kill");
}

#[tokio::test]
async fn attach_adds_a_file_node_a_format_node_and_a_device_on_a_free_port() {
    let (dir, inner, mut r, log) =
        fake_vm(HypervisorConfig::new("/k", None), script(q35_pci(), None)).await;
    let raw = image(&dir, "a,b.raw", DiskFormat::Raw);
    let attached = attach_disk(&inner, &mut r, &raw).await.expect("attach");
    assert_eq!(
        attached,
        AttachedDisk {
            id: "disk1".into(),
            pci_path: "11/00".into(),
            config: raw.clone(),
        }
    );
    assert_eq!(
        names(&log),
        [
            "qmp_capabilities",
            "query-pci",
            "blockdev-add",
            "blockdev-add",
            "device_add"
        ]
    );
    let filename = raw.path.to_str().expect("utf-8");
    assert_eq!(
        args(&log, 2),
        json!({"driver": "file", "node-name": "disk1-file", "filename": filename})
    );
    assert_eq!(
        args(&log, 3),
        json!({"driver": "raw", "node-name": "disk1", "file": "disk1-file"})
    );
    assert_eq!(
        args(&log, 4),
        json!({"driver": "virtio-blk-pci", "id": "disk1", "bus": "rp1", "drive": "disk1"})
    );

    let mut qcow2 = image(&dir, "b.qcow2", DiskFormat::Qcow2);
    qcow2.read_only = true;
    let second = attach_disk(&inner, &mut r, &qcow2).await.expect("attach");
    assert_eq!(second.id, "disk2");
    assert_eq!(
        args(&log, 6)["read-only"],
        true,
        "the file node is read-only"
    );
    assert_eq!(
        args(&log, 7),
        json!({"driver": "qcow2", "node-name": "disk2", "file": "disk2-file", "read-only": true})
    );
    assert_eq!(r.disks, [attached, second]);
    done(r).await;
}

#[tokio::test]
async fn pc_plugs_into_a_free_root_bus_slot_up_to_disk_slots() {
    let mut cfg = HypervisorConfig::new("/k", None);
    cfg.machine = MachineType::Pc;
    cfg.disk_slots = 1;
    let pci = json!([{"bus": 0, "devices": [dev(0, "", None), dev(1, "", None), dev(2, "serial0", None)]}]);
    let (dir, inner, mut r, log) = fake_vm(cfg, script(pci, None)).await;
    let d = attach_disk(&inner, &mut r, &image(&dir, "a.raw", DiskFormat::Raw))
        .await
        .expect("attach");
    assert_eq!(d.pci_path, "03");
    assert_eq!(
        args(&log, 4),
        json!({"driver": "virtio-blk-pci", "id": "disk1", "bus": "pci.0", "drive": "disk1",
               "addr": "0x3"})
    );
    let err = attach_disk(&inner, &mut r, &image(&dir, "b.raw", DiskFormat::Raw))
        .await
        .expect_err("one slot");
    assert!(
        matches!(err, Error::Disk(DiskError::NoFreeSlot { slots: 1, .. })),
        "{err:?}"
    );
    assert_eq!(names(&log).len(), 6, "nothing added after the query");
    done(r).await;
}

#[tokio::test]
async fn a_failed_attach_deletes_the_nodes_it_added() {
    for (failing, undone) in [
        ("device_add", &["disk1", "disk1-file"][..]),
        ("blockdev-add", &[][..]),
    ] {
        let (dir, inner, mut r, log) = fake_vm(
            HypervisorConfig::new("/k", None),
            script(q35_pci(), Some(failing)),
        )
        .await;
        let err = attach_disk(&inner, &mut r, &image(&dir, "a.raw", DiskFormat::Raw))
            .await
            .expect_err("fails");
        assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
        let log = log.lock().expect("log").clone();
        let deleted: Vec<&Value> = log
            .iter()
            .filter(|c| c["execute"] == "blockdev-del")
            .map(|c| &c["arguments"]["node-name"])
            .collect();
        assert_eq!(deleted, undone, "{failing}");
        assert!(r.disks.is_empty());
        done(r).await;
    }
    // The format node fails: only the file node under it is removed.
    let script = |cmd: &Value| match cmd["execute"].as_str() {
        Some("query-pci") => json!({"return": q35_pci()}),
        Some("blockdev-add") if cmd["arguments"]["driver"] == "raw" => {
            json!({"error": {"class": "GenericError", "desc": "not raw"}})
        }
        _ => json!({"return": {}}),
    };
    let (dir, inner, mut r, log) = fake_vm(HypervisorConfig::new("/k", None), script).await;
    attach_disk(&inner, &mut r, &image(&dir, "a.raw", DiskFormat::Raw))
        .await
        .expect_err("fails");
    assert_eq!(names(&log).last().map(String::as_str), Some("blockdev-del"));
    assert_eq!(args(&log, 4), json!({"node-name": "disk1-file"}));
    done(r).await;
}

#[tokio::test]
async fn refusals_reach_no_qemu() {
    // A missing image, every port taken, and microvm.
    let full = json!([{"bus": 0, "devices": [
        dev(0x10, "rp0", Some(vec![dev(0, "disk7", None)])),
    ]}]);
    let (dir, inner, mut r, log) =
        fake_vm(HypervisorConfig::new("/k", None), script(full, None)).await;
    let missing = DiskConfig::new(dir.path().join("missing.raw"), DiskFormat::Raw);
    let err = attach_disk(&inner, &mut r, &missing)
        .await
        .expect_err("missing");
    assert_eq!(
        err.to_string(),
        format!("Disk image {} is not readable", missing.path.display())
    );
    assert_eq!(names(&log), ["qmp_capabilities"]);
    let err = attach_disk(&inner, &mut r, &image(&dir, "a.raw", DiskFormat::Raw))
        .await
        .expect_err("full");
    assert!(
        matches!(err, Error::Disk(DiskError::NoFreeSlot { slots: 4, .. })),
        "{err:?}"
    );
    assert_eq!(names(&log), ["qmp_capabilities", "query-pci"]);
    let err = detach_disk(&inner, &mut r, "disk7", Duration::from_secs(1))
        .await
        .expect_err("not ours");
    assert!(
        matches!(&err, Error::Disk(DiskError::UnknownDisk { disk, .. }) if disk == "disk7"),
        "{err:?}"
    );
    assert_eq!(names(&log).len(), 2);
    done(r).await;

    let mut cfg = HypervisorConfig::new("/k", None);
    cfg.machine = MachineType::Microvm;
    let (dir, inner, mut r, log) = fake_vm(cfg, script(json!([]), None)).await;
    let err = attach_disk(&inner, &mut r, &image(&dir, "a.raw", DiskFormat::Raw))
        .await
        .expect_err("microvm");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_eq!(names(&log), ["qmp_capabilities"]);
    done(r).await;
}

/// `r` with `disk1` recorded behind `rp0`.
fn with_disk1(r: &mut Running) {
    r.disks.push(AttachedDisk {
        id: "disk1".into(),
        pci_path: "10/00".into(),
        config: DiskConfig::new("/i/a.raw", DiskFormat::Raw),
    });
    r.next_disk_id = FIRST_DISK_NUMBER + 1;
}

/// `query-pci` with `disk1` still behind `rp0`.
fn plugged() -> Value {
    json!([{"bus": 0, "devices": [dev(0x10, "rp0", Some(vec![dev(0, "disk1", None)]))]}])
}

#[tokio::test]
async fn detach_waits_for_device_deleted_then_deletes_both_nodes() {
    // The guest lets go after the reply: first the virtio backend's event, then the device's.
    let script = |cmd: &Value| match cmd["execute"].as_str() {
        Some("query-pci") => json!({"return": plugged()}),
        Some("device_del") => json!([
            {"return": {}},
            {"event": "DEVICE_DELETED", "data": {"path": "/machine/peripheral/disk1/virtio-backend"}},
            {"event": "DEVICE_DELETED", "data": {"device": "disk1", "path": "/machine/peripheral/disk1"}},
        ]),
        _ => json!({"return": {}}),
    };
    let (_d, inner, mut r, log) = fake_vm(HypervisorConfig::new("/k", None), script).await;
    with_disk1(&mut r);
    detach_disk(&inner, &mut r, "disk1", Duration::from_secs(5))
        .await
        .expect("detach");
    assert_eq!(
        names(&log),
        [
            "qmp_capabilities",
            "device_del",
            "query-pci",
            "blockdev-del",
            "blockdev-del"
        ]
    );
    assert_eq!(args(&log, 1), json!({"id": "disk1"}));
    assert_eq!(args(&log, 3), json!({"node-name": "disk1"}));
    assert_eq!(args(&log, 4), json!({"node-name": "disk1-file"}));
    assert!(r.disks.is_empty());
    done(r).await;
}

#[tokio::test]
async fn detach_of_a_device_already_gone_goes_straight_to_the_nodes() {
    let script = |cmd: &Value| match cmd["execute"].as_str() {
        Some("query-pci") => json!({"return": [{"bus": 0, "devices": []}]}),
        Some("device_del") => json!({"error": {"class": "DeviceNotFound", "desc": "gone"}}),
        _ => json!({"return": {}}),
    };
    let (_d, inner, mut r, log) = fake_vm(HypervisorConfig::new("/k", None), script).await;
    with_disk1(&mut r);
    detach_disk(&inner, &mut r, "disk1", Duration::from_secs(5))
        .await
        .expect("detach");
    assert_eq!(
        names(&log)[2..],
        ["query-pci", "blockdev-del", "blockdev-del"]
    );
    done(r).await;
}

#[tokio::test]
async fn a_guest_that_keeps_the_disk_times_out_and_the_disk_stays() {
    let script = |cmd: &Value| match cmd["execute"].as_str() {
        Some("query-pci") => json!({"return": plugged()}),
        _ => json!({"return": {}}),
    };
    let (_d, inner, mut r, log) = fake_vm(HypervisorConfig::new("/k", None), script).await;
    with_disk1(&mut r);
    let timeout = Duration::from_millis(100);
    let t0 = std::time::Instant::now();
    let err = detach_disk(&inner, &mut r, "disk1", timeout)
        .await
        .expect_err("times out");
    assert!(t0.elapsed() >= timeout);
    assert!(
        matches!(&err, Error::Disk(DiskError::DetachTimeout { disk, .. }) if disk == "disk1"),
        "{err:?}"
    );
    assert_eq!(r.disks.len(), 1, "still plugged");
    assert!(!names(&log).iter().any(|n| n == "blockdev-del"));
    done(r).await;
}

#[tokio::test]
async fn a_template_with_disks_is_not_saved() {
    let mut cfg = HypervisorConfig::new("/k", Some("/i".into()));
    cfg.template = Some(crate::config::TemplateRole::SaveTo(
        crate::config::TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        },
    ));
    let (_d, inner, mut r, log) = fake_vm(cfg, script(json!([]), None)).await;
    with_disk1(&mut r);
    let err = super::super::ops::save_template(&inner, &mut r)
        .await
        .expect_err("refused");
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    assert_eq!(names(&log), ["qmp_capabilities"], "not even stopped");
    done(r).await;
}
