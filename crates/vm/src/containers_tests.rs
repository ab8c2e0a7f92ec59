use tokio::io::AsyncReadExt;
use vmfactory_agent::{ExitStatus, FakeCall as AgentCall};
use vmfactory_hypervisor::FakeStep;

use super::*;
use crate::fake::FakeBackends;

/// A bundle's config.json as containerd writes it (trimmed).
fn spec(args: &[&str]) -> Spec {
    let json = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0, "additionalGids": [10]},
            "args": args,
            "env": ["PATH=/bin", "FOO=bar"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]}
        ],
        "annotations": {"io.kubernetes.cri.container-type": "container"},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
            "sysctl": {"net.ipv4.ip_forward": "1"}
        }
    });
    serde_json::from_value(json).expect("spec")
}

async fn vm_and_image(h: &FakeBackends) -> (Vm, PathBuf) {
    let vm = Vm::new_with(h.config(), h).await.expect("new VM");
    let img = h.root().join("rootfs.erofs");
    std::fs::write(&img, vec![0; 4096]).expect("image");
    (vm, img)
}

#[test]
fn the_bundles_spec_becomes_the_agents_subset() {
    let c = container_spec("c1", &spec(&["sh", "-c", "echo hi"])).expect("converts");
    assert_eq!(c.process.args, ["sh", "-c", "echo hi"]);
    assert_eq!(c.process.container_id, "c1");
    assert_eq!(c.process.additional_gids, [10]);
    assert_eq!(c.rlimits[0].kind, "RLIMIT_NOFILE");
    assert!(c.no_new_privileges);
    assert_eq!(c.root_path, "", "the host's rootfs path is not the guest's");
    assert_eq!(c.hostname, "box");
    assert_eq!(c.mounts[0].kind, "proc");
    let kinds: Vec<&str> = c.namespaces.iter().map(|n| n.kind.as_str()).collect();
    assert_eq!(kinds, ["pid", "ipc", "uts", "mount", "network"]);
    assert_eq!(c.masked_paths, ["/proc/kcore"]);
    assert_eq!(c.sysctl["net.ipv4.ip_forward"], "1");
    let e = container_spec("c1", &spec(&[])).expect_err("no args");
    assert!(matches!(e, ContainerError::InvalidSpec { .. }), "{e}");
    let mut no_process = spec(&["sh"]);
    no_process.set_process(None);
    assert!(matches!(
        container_spec("c1", &no_process),
        Err(ContainerError::InvalidSpec { .. })
    ));
}

#[tokio::test]
async fn a_container_lives_in_its_image_and_goes_with_it() {
    let h = FakeBackends::new();
    let (vm, img) = vm_and_image(&h).await;
    let mut init = vm
        .create_container(&ContainerConfig::new("c1", spec(&["sleep"]), &img))
        .await
        .expect("create");
    assert_eq!((init.container_id(), init.exec_id()), ("c1", "c1"));
    let agent = h.last_agent();
    let disks = vm.hypervisor().disks().await;
    assert_eq!(disks.len(), 1, "the image is plugged");
    let created = agent.calls().into_iter().find_map(|c| match c {
        AgentCall::CreateContainer(id, st) => Some((id, st)),
        _ => None,
    });
    let (id, storages) = created.expect("CreateContainer sent");
    assert_eq!(id, "c1");
    assert_eq!(
        (storages[0].fstype.as_str(), storages[0].options.as_slice()),
        ("erofs", ["ro".to_owned()].as_slice())
    );
    assert_eq!(storages[0].source, disks[0].pci_path);
    let e = vm
        .create_container(&ContainerConfig::new("c1", spec(&["sleep"]), &img))
        .await
        .expect_err("taken");
    assert!(matches!(e, ContainerError::Exists { .. }), "{e}");
    vm.start_container("c1").await.expect("start");
    let mut echo = vm
        .exec_in("c1", "e1", ProcessSpec::new(["echo", "in", "there"]))
        .await
        .expect("exec in");
    let mut out = String::new();
    echo.stdout()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("read");
    assert_eq!(out, "in there\n");
    assert_eq!(vm.container_pids("c1").await.expect("pids").len(), 1);
    assert_eq!(vm.container_stats("c1").await.expect("stats").pids, 1);
    vm.signal_container("c1", 9).await.expect("kill all");
    assert_eq!(init.wait().await.expect("wait"), ExitStatus::Signal(9));
    drop(init.stdin());
    assert_eq!(vm.containers().await, ["c1"]);
    vm.remove_container("c1").await.expect("remove");
    assert!(vm.hypervisor().disks().await.is_empty(), "unplugged");
    assert!(agent.containers().is_empty());
    assert!(vm.containers().await.is_empty());
    vm.remove_container("c1").await.expect("idempotent");
    let e = vm.start_container("c1").await.expect_err("gone");
    assert!(matches!(e, ContainerError::NotFound { .. }), "{e}");
    vm.stop().await.expect("stop");
}

#[tokio::test]
async fn a_failed_create_unplugs_the_image_and_records_nothing() {
    let h = FakeBackends::new();
    h.fail_agent_methods(["create_container"]);
    let (vm, img) = vm_and_image(&h).await;
    let cfg = ContainerConfig::new("c1", spec(&["sleep"]), &img);
    let e = vm.create_container(&cfg).await.expect_err("agent fails");
    assert!(
        matches!(
            e,
            ContainerError::Vm {
                op: "create_container",
                ..
            }
        ),
        "{e}"
    );
    assert!(vm.hypervisor().disks().await.is_empty(), "unplugged again");
    assert!(vm.containers().await.is_empty());
    // The guest refuses the request: an invalid spec, the image unplugged too.
    h.last_agent().heal("create_container");
    let e = vm
        .create_container(&ContainerConfig::new("a/b", spec(&["sleep"]), &img))
        .await
        .expect_err("the guest refuses the id");
    assert!(matches!(e, ContainerError::InvalidSpec { .. }), "{e}");
    assert!(vm.hypervisor().disks().await.is_empty(), "unplugged again");
    let e = vm
        .create_container(&ContainerConfig::new("c1", spec(&[]), &img))
        .await
        .expect_err("no args");
    assert!(matches!(e, ContainerError::InvalidSpec { .. }), "{e}");
    let e = vm
        .create_container(&ContainerConfig::new("c1", spec(&["sleep"]), h.root()))
        .await
        .expect_err("a directory is no image");
    assert!(matches!(e, ContainerError::Image { .. }), "{e}");
    let e = vm
        .create_container(&ContainerConfig::new(
            "c1",
            spec(&["sleep"]),
            h.root().join("missing"),
        ))
        .await
        .expect_err("no image");
    assert!(matches!(e, ContainerError::Image { .. }), "{e}");
    h.last_hv().fail_at(Some(FakeStep::AttachDisk));
    let e = vm.create_container(&cfg).await.expect_err("hotplug fails");
    assert!(
        matches!(
            e,
            ContainerError::Vm {
                op: "attach_disk",
                ..
            }
        ),
        "{e}"
    );
    assert!(vm.containers().await.is_empty());
    assert_eq!(
        h.last_agent().count("create_container"),
        2,
        "no call for host refusals"
    );
    vm.stop().await.expect("stop");
}

/// With a disk mounted, stop removes the containers first (their mount namespaces would
/// keep it mounted past its unmount); without, QEMU's exit takes them and nothing is asked.
#[tokio::test]
async fn stop_removes_the_containers_first_only_to_flush_disks() {
    for with_disk in [false, true] {
        let h = FakeBackends::new();
        let (vm, img) = vm_and_image(&h).await;
        for id in ["a", "b"] {
            vm.create_container(&ContainerConfig::new(id, spec(&["sleep"]), &img))
                .await
                .expect("create");
        }
        if with_disk {
            let disk =
                vmfactory_hypervisor::DiskConfig::new(&img, vmfactory_hypervisor::DiskFormat::Raw);
            vm.attach_disk(&disk, &crate::DiskMount::ext4("/data"))
                .await
                .expect("attach");
        }
        let agent = h.last_agent();
        vm.stop().await.expect("stop");
        let removed = if with_disk { 2 } else { 0 };
        assert_eq!(
            agent.count("remove_container"),
            removed,
            "disk: {with_disk}"
        );
        assert!(vm.containers().await.is_empty());
    }
}
