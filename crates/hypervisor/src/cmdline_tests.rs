//! The QEMU command line each config gives.

use super::*;
use crate::config::TemplatePaths;

fn args_string(args: &[OsString]) -> String {
    args.iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The value following `flag` (all of them, in order).
fn values<'a>(args: &'a [OsString], flag: &str) -> Vec<&'a OsStr> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_os_str())
        .collect()
}

fn base() -> HypervisorConfig {
    let mut c = HypervisorConfig::new("/g/vmlinux", Some("/g/initrd.cpio.gz".into()));
    c.accel = Accel::Tcg;
    c
}

#[test]
fn a_nic_is_a_virtio_net_device_on_the_inherited_tap() {
    let paths = RunPaths::new("/r");
    let mut c = base();
    c.nic = Some(crate::NicConfig {
        mac: "02:76:6d:66:00:0f".into(),
        vhost: None,
    });
    let tap = NicFds {
        tap: 7,
        vhost: None,
    };
    let s = args_string(&qemu_args("x", &c, &paths, Accel::Tcg, None, Some(tap)));
    assert!(s.contains("-netdev tap,id=net0,fd=7 "), "{s}");
    assert!(s.contains("-device virtio-net-pci,netdev=net0,mac=02:76:6d:66:00:0f,romfile="));
    let vhost = NicFds {
        tap: 7,
        vhost: Some(8),
    };
    let s = args_string(&qemu_args("x", &c, &paths, Accel::Kvm, None, Some(vhost)));
    assert!(
        s.contains("-netdev tap,id=net0,fd=7,vhost=on,vhostfd=8"),
        "{s}"
    );
    // No descriptors, no NIC (a config without one has none either).
    let s = args_string(&qemu_args("x", &c, &paths, Accel::Tcg, None, None));
    assert!(!s.contains("netdev"), "{s}");
    c.nic = Some(crate::NicConfig {
        mac: "03:00:00:00:00:01".into(),
        vhost: None,
    });
    assert!(matches!(
        c.validate_shape(),
        Err(crate::ConfigError::BadMac { .. })
    ));
}

#[test]
fn escape_doubles_commas() {
    assert_eq!(
        escape_opt(OsStr::new("/a,b,,c")),
        OsString::from("/a,,b,,,,c")
    );
    assert_eq!(escape_opt(OsStr::new("/plain")), OsString::from("/plain"));
    assert_eq!(shell_quote(Path::new("/t/it's here")), r"'/t/it'\''s here'");
    let state = Path::new("/t/state");
    assert_eq!(save_uri(state, Some((7, 2, 22))), "exec:cat > '/t/state'");
    assert_eq!(save_uri(state, None), "exec:cat > '/t/state'");
    assert_eq!(save_uri(state, Some((8, 2, 0))), "file:/t/state");
    assert_eq!(save_uri(state, Some((10, 0, 2))), "file:/t/state");
    assert_eq!(
        save_uri(Path::new("/t/a,b"), Some((10, 0, 2))),
        "exec:cat > '/t/a,b'"
    );
    assert_eq!(load_uri(7), "fd:7");
}

#[test]
fn direct_vm_line() {
    let paths = RunPaths::new("/run/vm1");
    let args = qemu_args("vm1", &base(), &paths, Accel::Tcg, None, None);
    let s = args_string(&args);
    assert!(
        s.starts_with("-name vm1 -M q35,memory-backend=mem0,sata=off -accel tcg -m 256M -smp 1 ")
    );
    assert!(s.contains("-nographic -no-reboot -nodefaults -no-user-config"));
    assert!(s.contains("-object memory-backend-ram,id=mem0,size=256M"));
    assert!(s.contains("-kernel /g/vmlinux -initrd /g/initrd.cpio.gz"));
    assert_eq!(
        values(&args, "-append"),
        [OsStr::new("console=ttyS0 panic=-1 quiet")]
    );
    assert!(s.contains("-qmp unix:/run/vm1/qmp.sock,server=on,wait=off"));
    assert!(s.contains(
        "-chardev socket,id=console0,path=/run/vm1/console.sock,server=on,wait=off \
         -serial chardev:console0"
    ));
    assert!(s.contains(
        "-device virtio-serial-pci,id=serial0 -chardev socket,id=agent0,\
         path=/run/vm1/agent.sock,server=on,wait=off \
         -device virtserialport,chardev=agent0,name=agent.channel.0"
    ));
    assert!(!s.contains("-incoming"));
    assert_eq!(
        agent_endpoint(&base().agent_channel, &paths, None),
        Some(AgentEndpoint::VirtioSerial {
            path: "/run/vm1/agent.sock".into()
        })
    );
}

#[test]
fn vmgenid_device_on_q35_and_pc_only() {
    let paths = RunPaths::new("/r");
    let devices = |c: &HypervisorConfig| {
        values(
            &qemu_args("x", c, &paths, Accel::Tcg, None, None),
            "-device",
        )
        .into_iter()
        .filter(|d| d.to_string_lossy().starts_with("vmgenid"))
        .map(|d| d.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
    };
    let mut c = base();
    assert!(devices(&c).is_empty(), "off by default");
    c.vmgenid = true;
    assert_eq!(devices(&c), ["vmgenid,guid=auto"]);
    // A clone gets its own `auto` id too: the device is in the template's machine.
    c.template = Some(TemplateRole::CloneFrom(TemplatePaths {
        memory: "/t/memory".into(),
        state: "/t/state".into(),
    }));
    assert_eq!(devices(&c), ["vmgenid,guid=auto"]);
    c.template = None;
    c.machine = MachineType::Pc;
    assert_eq!(devices(&c).len(), 1);
    c.machine = MachineType::Microvm;
    assert!(devices(&c).is_empty(), "no ACPI table for it on microvm");
    c.machine = MachineType::Q35;
    c.vmgenid = false;
    assert!(devices(&c).is_empty());
}

#[test]
fn hotplug_room_and_kvm() {
    let mut c = base();
    c.max_vcpus = 4;
    c.memory_slots = 4;
    c.max_memory_mib = 2048;
    c.machine = MachineType::Pc;
    c.tcg_tb_size_mib = Some(64);
    let paths = RunPaths::new("/r");
    let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
    assert_eq!(
        values(&args, "-m"),
        [OsStr::new("256M,slots=4,maxmem=2048M")]
    );
    assert_eq!(values(&args, "-smp"), [OsStr::new("1,maxcpus=4")]);
    assert_eq!(values(&args, "-M"), [OsStr::new("pc,memory-backend=mem0")]);
    assert_eq!(values(&args, "-accel"), [OsStr::new("tcg,tb-size=64")]);
    let args = qemu_args("x", &c, &paths, Accel::Kvm, None, None);
    assert_eq!(values(&args, "-accel"), [OsStr::new("kvm")]);
}

#[test]
fn cpu_model_follows_the_accelerator_unless_configured() {
    let paths = RunPaths::new("/r");
    let mut c = base();
    // TCG keeps QEMU's default model: no -cpu at all.
    assert!(values(&qemu_args("x", &c, &paths, Accel::Tcg, None, None), "-cpu").is_empty());
    let kvm = qemu_args("x", &c, &paths, Accel::Kvm, None, None);
    assert_eq!(values(&kvm, "-cpu"), [OsStr::new("host")]);
    assert!(args_string(&kvm)
        .starts_with("-name x -M q35,memory-backend=mem0,sata=off -accel kvm -cpu host -m "));
    c.cpu_model = Some("Skylake-Client,-hle".into());
    for accel in [Accel::Tcg, Accel::Kvm] {
        let args = qemu_args("x", &c, &paths, accel, None, None);
        assert_eq!(values(&args, "-cpu"), [OsStr::new("Skylake-Client,-hle")]);
    }
    // A pinned clone config carries its template's model whatever it is given.
    let clone = base().pinned(Accel::Kvm);
    assert_eq!(
        values(
            &qemu_args("x", &clone, &paths, clone.accel, None, None),
            "-cpu"
        ),
        [OsStr::new("host")]
    );
}

#[test]
fn template_and_clone_lines() {
    let mut c = base();
    let files = TemplatePaths {
        memory: "/tpl,x/memory".into(),
        state: "/tpl,x/state".into(),
    };
    c.template = Some(TemplateRole::SaveTo(files.clone()));
    let paths = RunPaths::new("/run/a,b");
    let args = qemu_args("tpl", &c, &paths, Accel::Tcg, None, None);
    assert_eq!(
        values(&args, "-object"),
        [OsStr::new(
            "memory-backend-file,id=mem0,size=256M,mem-path=/tpl,,x/memory,share=on"
        )]
    );
    assert_eq!(
        values(&args, "-qmp"),
        [OsStr::new("unix:/run/a,,b/qmp.sock,server=on,wait=off")]
    );
    assert!(values(&args, "-chardev")
        .iter()
        .all(|v| v.to_string_lossy().contains("/run/a,,b/")));
    assert!(!args_string(&args).contains("-incoming"));

    c.template = Some(TemplateRole::CloneFrom(files));
    let args = qemu_args("clone", &c, &paths, Accel::Tcg, None, None);
    assert_eq!(
        values(&args, "-object"),
        [OsStr::new(
            "memory-backend-file,id=mem0,size=256M,mem-path=/tpl,,x/memory,share=off"
        )]
    );
    assert!(args_string(&args).ends_with("-S -incoming defer"));
    for booting in ["-kernel", "-initrd", "-append"] {
        assert!(
            values(&args, booting).is_empty(),
            "a clone has no {booting}"
        );
    }
}

#[test]
fn kernel_and_initrd_are_not_escaped() {
    let mut c = base();
    c.kernel = "/k,1/vmlinux".into();
    c.image = Some("/d,1/disk.img".into());
    let args = qemu_args("x", &c, &RunPaths::new("/r"), Accel::Tcg, None, None);
    assert_eq!(values(&args, "-kernel"), [OsStr::new("/k,1/vmlinux")]);
    assert_eq!(
        values(&args, "-drive"),
        [OsStr::new(
            "file=/d,,1/disk.img,format=raw,if=none,id=disk0"
        )]
    );
    assert!(args_string(&args).contains("-device virtio-blk-pci,drive=disk0"));
}

#[test]
fn vsock_channels() {
    let paths = RunPaths::new("/r");
    let mut c = base();
    c.disk_slots = 0; // its only device is the vsock one
    c.agent_channel = AgentChannel::Vsock { guest_cid: None };
    let held = VhostVsockFd { fd: 9, cid: 70001 };
    let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(held), None);
    assert_eq!(
        values(&args, "-device"),
        [OsStr::new("vhost-vsock-pci,vhostfd=9,guest-cid=70001")]
    );
    // The CID the VM holds, once it holds one.
    assert_eq!(agent_endpoint(&c.agent_channel, &paths, None), None);
    assert_eq!(
        agent_endpoint(&c.agent_channel, &paths, Some(70001)),
        Some(AgentEndpoint::Vsock {
            cid: 70001,
            port: 1024
        })
    );
    // A clone gets its own device and CID, and still waits for the template's state.
    let mut clone = c.clone();
    clone.template = Some(TemplateRole::CloneFrom(TemplatePaths {
        memory: "/t/memory".into(),
        state: "/t/state".into(),
    }));
    let args = qemu_args("x", &clone, &paths, Accel::Kvm, Some(held), None);
    let s = args_string(&args);
    assert!(s.contains("-device vhost-vsock-pci,vhostfd=9,guest-cid=70001"));
    assert!(s.ends_with("-S -incoming defer"));
    c.machine = MachineType::Microvm;
    let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(held), None);
    assert_eq!(
        values(&args, "-device"),
        [OsStr::new("vhost-vsock-device,vhostfd=9,guest-cid=70001")]
    );
    // A pinned CID.
    c.machine = MachineType::Q35;
    c.agent_channel = AgentChannel::Vsock { guest_cid: Some(5) };
    let pinned = VhostVsockFd { fd: 9, cid: 5 };
    let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(pinned), None);
    assert!(args_string(&args).contains("-device vhost-vsock-pci,vhostfd=9,guest-cid=5"));
    let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
    assert!(args_string(&args).contains("-device vhost-vsock-pci,guest-cid=5"));
    assert_eq!(
        agent_endpoint(&c.agent_channel, &paths, None),
        Some(AgentEndpoint::Vsock { cid: 5, port: 1024 })
    );

    c.agent_channel = AgentChannel::HybridVsock {
        backend: "/bin/vhost-device-vsock".into(),
        guest_cid: 3,
    };
    let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
    let s = args_string(&args);
    assert!(s.contains("-object memory-backend-memfd,id=mem0,size=256M,share=on"));
    assert!(s.contains(
        "-chardev socket,id=vs0,path=/r/vhost-user-vsock.sock \
         -device vhost-user-vsock-pci,chardev=vs0"
    ));
    assert_eq!(
        agent_endpoint(&c.agent_channel, &paths, None),
        Some(AgentEndpoint::HybridVsock {
            path: "/r/vm.vsock".into(),
            port: 1024
        })
    );
    assert_eq!(
        args_string(&vsock_backend_args(3, &paths)),
        "--guest-cid 3 --socket /r/vhost-user-vsock.sock --uds-path /r/vm.vsock"
    );
}

#[test]
fn disk_root_ports_on_q35_only_and_the_same_for_clones() {
    let paths = RunPaths::new("/r");
    let mut c = base();
    c.disk_slots = 2;
    let ports = [
        OsStr::new("pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x10"),
        OsStr::new("pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x11"),
    ];
    let devices = |c: &HypervisorConfig| {
        let args = qemu_args("x", c, &paths, Accel::Tcg, None, None);
        values(&args, "-device")
            .into_iter()
            .map(OsStr::to_os_string)
            .filter(|d| d.to_string_lossy().starts_with("pcie-root-port"))
            .collect::<Vec<_>>()
    };
    assert_eq!(devices(&c), ports);
    let files = TemplatePaths {
        memory: "/t/memory".into(),
        state: "/t/state".into(),
    };
    c.template = Some(TemplateRole::SaveTo(files.clone()));
    let template = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
    c.template = Some(TemplateRole::CloneFrom(files));
    let clone = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
    assert_eq!(devices(&c), ports);
    assert_eq!(values(&template, "-device"), values(&clone, "-device"));
    assert!(args_string(&clone).ends_with("-S -incoming defer"));
    c.disk_slots = 0;
    assert!(devices(&c).is_empty());
    c.disk_slots = 4;
    for machine in [MachineType::Pc, MachineType::Microvm] {
        c.machine = machine;
        assert!(devices(&c).is_empty(), "{machine}");
    }
    // The default: four ports, the last at 0x13.
    let args = qemu_args("x", &base(), &paths, Accel::Tcg, None, None);
    assert!(
        args_string(&args).contains("-device pcie-root-port,id=rp3,bus=pcie.0,chassis=4,addr=0x13")
    );
}

#[test]
fn machine_options_follow_the_config_and_match_for_clones() {
    let paths = RunPaths::new("/r");
    let machine = |c: &HypervisorConfig| {
        let args = qemu_args("x", c, &paths, Accel::Tcg, None, None);
        values(&args, "-M")[0].to_string_lossy().into_owned()
    };
    let mut c = base();
    assert_eq!(machine(&c), "q35,memory-backend=mem0,sata=off");
    c.machine_options = Some(String::new());
    assert_eq!(machine(&c), "q35,memory-backend=mem0");
    c.machine_options = Some("sata=off,smbus=off".into());
    assert_eq!(machine(&c), "q35,memory-backend=mem0,sata=off,smbus=off");
    let files = TemplatePaths {
        memory: "/t/memory".into(),
        state: "/t/state".into(),
    };
    c.template = Some(TemplateRole::SaveTo(files.clone()));
    let template = machine(&c);
    c.template = Some(TemplateRole::CloneFrom(files));
    assert_eq!(machine(&c), template);
    c = base();
    c.machine = MachineType::Pc;
    assert_eq!(machine(&c), "pc,memory-backend=mem0");
}

#[test]
fn microvm_uses_mmio_devices() {
    let mut c = base();
    c.machine = MachineType::Microvm;
    let s = args_string(&qemu_args(
        "x",
        &c,
        &RunPaths::new("/r"),
        Accel::Tcg,
        None,
        None,
    ));
    assert!(s.contains("-M microvm,memory-backend=mem0"));
    assert!(s.contains("-device virtio-serial-device,id=serial0"));
}
