//! Disk hotplug on real QEMU: a raw and a qcow2 image attached to a booted VM, seen by QEMU
//! (`query-block`, `query-pci`), kept across a detach and re-attach of the handle, detached
//! with their nodes gone; one read-only image shared by three VMs at once. The guest side
//! (finding the disk by its PCI path, mounting it) is the guest crate's: only the console is
//! read here, and not relied on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::UnixStream;
use vmfactory_agent::Agent;
use vmfactory_e2e::vm::{self, TestVm};
use vmfactory_e2e::{guest_env, RunRoot};
use vmfactory_hypervisor::{
    AttachedDisk, DiskConfig, DiskFormat, Error, Hypervisor, Qemu, QemuState, QmpClient,
};

/// A sparse raw image of `mib` MiB.
fn raw_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(mib << 20).expect("size image");
    path
}

/// A qcow2 image of `mib` MiB made by `qemu-img`.
fn qcow2_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(format!("{mib}M"))
        .output()
        .expect("qemu-img (apt-get install qemu-utils; `cargo xtask test` does)");
    assert!(out.status.success(), "qemu-img: {out:?}");
    path
}

/// Runs `commands` on the VM's own QMP socket: QEMU serves one client, so the handle is
/// detached first and re-attached after, which also proves the disks survive that.
async fn with_qmp(vm: &Qemu, commands: &[&str]) -> (Qemu, Vec<Value>) {
    let state: QemuState = vm.detach().await.expect("detach");
    let stream = UnixStream::connect(&state.paths.qmp)
        .await
        .expect("qmp socket");
    let qmp = QmpClient::connect(stream, Duration::from_secs(10))
        .await
        .expect("qmp");
    let mut replies = Vec::new();
    for c in commands {
        replies.push(qmp.execute_raw(c, Value::Null).await.expect("query"));
    }
    drop(qmp);
    let vm = Qemu::attach(state).await.expect("re-attach");
    (vm, replies)
}

/// Node names of `query-named-block-nodes`.
fn node_names(reply: &Value) -> Vec<String> {
    reply
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .collect()
}

/// The `qdev_id`s behind root-bus device `port` in `query-pci`.
fn behind(pci: &Value, port: &str) -> Vec<String> {
    pci[0]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["qdev_id"] == port)
        .flat_map(|d| {
            d["pci_bridge"]["devices"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|d| d["qdev_id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_qcow2_disks_attach_survive_reattach_and_detach() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let images = tempfile::tempdir().expect("images dir");
    let raw = DiskConfig::new(raw_image(images.path(), "a.raw", 16), DiskFormat::Raw);
    let qcow2 = DiskConfig::new(qcow2_image(images.path(), "b.qcow2", 32), DiskFormat::Qcow2);
    let (t, _) = TestVm::boot(root.path(), "vm", vm::config(&env))
        .await
        .unwrap();

    let t0 = Instant::now();
    let a = t.vm.attach_disk(&raw).await.unwrap();
    let attach_time = t0.elapsed();
    let b = t.vm.attach_disk(&qcow2).await.unwrap();
    eprintln!("attach: {attach_time:?}; disks: {a:?} {b:?}");
    assert_eq!((a.id.as_str(), a.pci_path.as_str()), ("disk1", "10/00"));
    assert_eq!((b.id.as_str(), b.pci_path.as_str()), ("disk2", "11/00"));
    // A missing image is refused by name before QEMU is asked.
    let missing = DiskConfig::new(images.path().join("none.raw"), DiskFormat::Raw);
    let err = t.vm.attach_disk(&missing).await.unwrap_err();
    assert!(err.to_string().contains("none.raw"), "{err}");

    let (vm, replies) = with_qmp(&t.vm, &["query-block", "query-pci"]).await;
    let block = replies[0].as_array().cloned().unwrap_or_default();
    // QEMU 7.2 names the device `/machine/peripheral/diskN/virtio-backend` here.
    let by_device = |id: &str| {
        block
            .iter()
            .find(|b| b["qdev"] == format!("/machine/peripheral/{id}/virtio-backend"))
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in query-block: {block:?}"))
    };
    let (qa, qb) = (by_device("disk1"), by_device("disk2"));
    assert_eq!(qa["inserted"]["node-name"], "disk1");
    assert_eq!(qa["inserted"]["drv"], "raw");
    assert_eq!(qa["inserted"]["ro"], false);
    assert_eq!(qa["inserted"]["file"], raw.path.to_str().unwrap());
    assert_eq!(qb["inserted"]["drv"], "qcow2");
    assert_eq!(behind(&replies[1], "rp0"), ["disk1"]);
    assert_eq!(behind(&replies[1], "rp1"), ["disk2"]);
    assert!(behind(&replies[1], "rp2").is_empty());
    assert_eq!(
        vm.disks().await,
        [a.clone(), b.clone()],
        "kept across re-attach"
    );

    // The guest has a few seconds to bind the devices before they go.
    let seen = wait_console(&t, &["virtio_blk", "vda"], Duration::from_secs(3)).await;
    eprintln!("guest console mentions the disk: {seen}");

    let t0 = Instant::now();
    vm.detach_disk(&a.id).await.unwrap();
    let detach_time = t0.elapsed();
    vm.detach_disk(&b.id).await.unwrap();
    eprintln!("detach: {detach_time:?}");
    assert!(vm.disks().await.is_empty());
    assert!(matches!(
        vm.detach_disk(&a.id).await,
        Err(Error::Disk(
            vmfactory_hypervisor::DiskError::UnknownDisk { .. }
        ))
    ));
    let (vm, replies) = with_qmp(&vm, &["query-named-block-nodes", "query-pci"]).await;
    let nodes = node_names(&replies[0]);
    assert!(
        !nodes.iter().any(|n| n.starts_with("disk")),
        "nodes left: {nodes:?}"
    );
    assert!(behind(&replies[1], "rp0").is_empty());
    // The freed port takes the next disk.
    let c: AttachedDisk = vm.attach_disk(&raw).await.unwrap();
    assert_eq!((c.id.as_str(), c.pci_path.as_str()), ("disk3", "10/00"));
    t.agent.check().await.unwrap();
    t.assert_healthy_console();
    vm.stop().await.unwrap();
    let _ = t.agent.disconnect().await;
    root.assert_no_leaks();
}

/// Waits up to `bound` for a console line containing any of `needles`.
async fn wait_console(t: &TestVm, needles: &[&str], bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    loop {
        let console = t.console();
        if needles.iter().any(|n| console.contains(n)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_only_image_is_shared_by_three_vms() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let images = tempfile::tempdir().expect("images dir");
    let mut shared = DiskConfig::new(raw_image(images.path(), "shared.raw", 8), DiskFormat::Raw);
    shared.read_only = true;
    // QMP is all this needs: the guests need not be up.
    let mut vms = Vec::new();
    for i in 0..3 {
        let t = TestVm::start(root.path(), &format!("vm{i}"), vm::config(&env))
            .await
            .unwrap();
        vms.push(t);
    }
    for t in &vms {
        let d = t.vm.attach_disk(&shared).await.unwrap();
        assert_eq!(d.pci_path, "10/00");
    }
    // A writer is refused while they hold it: QEMU's image locking is on.
    let writer = shared.clone().with_read_only(false);
    let err = vms[0].vm.attach_disk(&writer).await.unwrap_err();
    assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
    assert_eq!(
        vms[0].vm.disks().await.len(),
        1,
        "the failed attach left nothing"
    );
    for t in vms {
        t.stop().await.unwrap();
    }
    root.assert_no_leaks();
}

/// On `pc` disks go on the root bus (`pci.0`) itself: no root ports, a one-slot PCI path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pc_hotplugs_on_the_root_bus() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let images = tempfile::tempdir().expect("images dir");
    let disk = DiskConfig::new(raw_image(images.path(), "a.raw", 8), DiskFormat::Raw);
    let mut cfg = vm::config(&env);
    cfg.machine = vmfactory_hypervisor::MachineType::Pc;
    let (t, _) = TestVm::boot(root.path(), "vm", cfg).await.unwrap();
    let d = t.vm.attach_disk(&disk).await.unwrap();
    eprintln!("pc disk: {d:?}");
    assert_eq!(d.pci_path.len(), 2, "{d:?}");
    let (vm, replies) = with_qmp(&t.vm, &["query-pci"]).await;
    let on_root: Vec<&Value> = replies[0][0]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|dev| dev["qdev_id"] == "disk1")
        .collect();
    assert_eq!(on_root.len(), 1, "{:?}", replies[0]);
    assert_eq!(
        format!("{:02x}", on_root[0]["slot"].as_u64().unwrap()),
        d.pci_path
    );
    vm.detach_disk(&d.id).await.unwrap();
    t.agent.check().await.unwrap();
    vm.stop().await.unwrap();
    let _ = t.agent.disconnect().await;
    root.assert_no_leaks();
}

/// The case disks are for: a clone of a template (whose root ports came with the template's
/// device state) takes a disk after it is resumed and lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_clone_takes_and_releases_a_disk() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let images = tempfile::tempdir().expect("images dir");
    let disk = DiskConfig::new(raw_image(images.path(), "a.raw", 8), DiskFormat::Raw);
    let (tpl_dir, tpl) = vm::template_in(&env, root.path());
    vm::make_template(root.path(), tpl.clone()).await.unwrap();
    let (clone, _, ready) = vm::boot_clone(root.path(), "clone", &tpl).await.unwrap();
    eprintln!("clone ready in {ready:?}");
    let d = clone.vm.attach_disk(&disk).await.unwrap();
    assert_eq!(d.pci_path, "10/00");
    clone.vm.detach_disk(&d.id).await.unwrap();
    clone.agent.check().await.unwrap();
    clone.assert_healthy_console();
    clone.stop().await.unwrap();
    std::fs::remove_dir_all(tpl_dir).unwrap();
    root.assert_no_leaks();
}

/// Cold boot to agent `Check` with and without the four disk root ports, alternating, to
/// price them (docs/hotplug.md). Run by hand: `cargo test -p vmfactory-e2e --test disks --
/// --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn root_ports_boot_cost() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let runs = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for run in 0..runs {
        for (k, slots) in [0, 4].into_iter().enumerate() {
            let mut cfg = vm::config(&env);
            cfg.disk_slots = slots;
            let (t, boot) = TestVm::boot(root.path(), &format!("vm{run}-{slots}"), cfg)
                .await
                .unwrap();
            t.stop().await.unwrap();
            times[k].push(boot);
        }
    }
    // Each 4-port boot right after a 0-port one: the difference of a pair is less exposed to
    // the load of other work on the host than either median.
    let mut diffs: Vec<f64> = (0..runs)
        .map(|i| times[1][i].as_secs_f64() - times[0][i].as_secs_f64())
        .collect();
    diffs.sort_by(f64::total_cmp);
    for (k, slots) in [0, 4].into_iter().enumerate() {
        times[k].sort();
        eprintln!(
            "disk_slots = {slots}: median {:?} over {runs} (all {:?})",
            times[k][runs / 2],
            times[k]
        );
    }
    eprintln!(
        "paired difference (4 - 0): median {:+.3} s (all {diffs:.3?})",
        diffs[runs / 2]
    );
}
