//! Config checks, serde forms and CPU models.

use super::*;

fn files() -> (tempfile::TempDir, HypervisorConfig) {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("vmlinux");
    let initrd = dir.path().join("initrd");
    std::fs::write(&kernel, b"k").expect("write");
    std::fs::write(&initrd, b"i").expect("write");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let cfg = HypervisorConfig::new(kernel, Some(initrd));
    (dir, cfg)
}

fn paths() -> TemplatePaths {
    TemplatePaths {
        memory: "/tpl/memory".into(),
        state: "/tpl/state".into(),
    }
}

fn template(mut c: HypervisorConfig) -> HypervisorConfig {
    c.template = Some(TemplateRole::SaveTo(paths()));
    c
}

#[test]
fn validation_table() {
    let (dir, base) = files();
    type Case = (
        &'static str,
        fn(&mut HypervisorConfig),
        fn(&ConfigError) -> bool,
    );
    let cases: Vec<Case> = vec![
        ("ok", |_| {}, |_| false),
        (
            "missing kernel",
            |c| c.kernel = "/nonexistent/vmlinux".into(),
            |e| matches!(e, ConfigError::KernelUnreadable { .. }),
        ),
        (
            "kernel is a dir",
            |c| c.kernel = "/".into(),
            |e| matches!(e, ConfigError::KernelUnreadable { .. }),
        ),
        (
            "kernel is a FIFO (refused without waiting for a writer)",
            |c| c.kernel = c.kernel.with_file_name("fifo"),
            |e| matches!(e, ConfigError::KernelUnreadable { .. }),
        ),
        (
            "initrd is a character device",
            |c| c.initrd = Some("/dev/zero".into()),
            |e| matches!(e, ConfigError::InitrdUnreadable { .. }),
        ),
        (
            "missing initrd",
            |c| c.initrd = Some("/nonexistent/initrd".into()),
            |e| matches!(e, ConfigError::InitrdUnreadable { .. }),
        ),
        (
            "missing image",
            |c| c.image = Some("/nonexistent/disk.img".into()),
            |e| matches!(e, ConfigError::ImageUnreadable { .. }),
        ),
        (
            "zero vcpus",
            |c| c.vcpus = 0,
            |e| matches!(e, ConfigError::ZeroVcpus),
        ),
        (
            "vcpus > max",
            |c| c.vcpus = 2,
            |e| {
                matches!(
                    e,
                    ConfigError::TooManyVcpus {
                        vcpus: 2,
                        max_vcpus: 1
                    }
                )
            },
        ),
        (
            "zero memory",
            |c| c.memory_mib = 0,
            |e| matches!(e, ConfigError::ZeroMemory),
        ),
        (
            "memory > max",
            |c| c.memory_mib = 512,
            |e| matches!(e, ConfigError::TooMuchMemory { .. }),
        ),
        (
            "slots without room",
            |c| c.memory_slots = 2,
            |e| matches!(e, ConfigError::SlotsWithoutMaxMemory),
        ),
        (
            "microvm hotplug",
            |c| {
                c.machine = MachineType::Microvm;
                c.max_vcpus = 2;
            },
            |e| matches!(e, ConfigError::HotplugUnsupported { .. }),
        ),
        (
            "too many disk slots",
            |c| c.disk_slots = 16,
            |e| matches!(e, ConfigError::TooManyDiskSlots { slots: 16, max: 15 }),
        ),
        (
            "template with image",
            |c| {
                *c = template(c.clone());
                c.image = Some(c.kernel.clone());
            },
            |e| matches!(e, ConfigError::TemplateWithImage),
        ),
        (
            "template without initrd",
            |c| {
                *c = template(c.clone());
                c.initrd = None;
            },
            |e| matches!(e, ConfigError::TemplateWithoutInitrd),
        ),
        (
            "hybrid vsock template",
            |c| {
                *c = template(c.clone());
                c.agent_channel = AgentChannel::HybridVsock {
                    backend: "vhost-device-vsock".into(),
                    guest_cid: 3,
                };
            },
            |e| matches!(e, ConfigError::HybridVsockWithTemplate),
        ),
        (
            "cpu model with a space",
            |c| c.cpu_model = Some("host -smp 8".into()),
            |e| matches!(e, ConfigError::InvalidCpuModel(m) if m == "host -smp 8"),
        ),
        (
            "empty cpu model",
            |c| c.cpu_model = Some(String::new()),
            |e| matches!(e, ConfigError::InvalidCpuModel(_)),
        ),
        (
            "host cpu under forced tcg",
            |c| {
                c.accel = Accel::Tcg;
                c.cpu_model = Some("host,-pmu".into());
            },
            |e| matches!(e, ConfigError::HostCpuWithoutKvm),
        ),
        (
            "reserved cid",
            |c| c.agent_channel = AgentChannel::Vsock { guest_cid: Some(2) },
            |e| matches!(e, ConfigError::ReservedCid { cid: 2 }),
        ),
        (
            "VMADDR_CID_ANY",
            |c| {
                c.agent_channel = AgentChannel::Vsock {
                    guest_cid: Some(u32::MAX),
                }
            },
            |e| matches!(e, ConfigError::ReservedCid { cid: u32::MAX }),
        ),
        (
            "pinned cid template",
            |c| {
                *c = template(c.clone());
                c.agent_channel = AgentChannel::Vsock { guest_cid: Some(9) };
            },
            |e| matches!(e, ConfigError::PinnedCidWithTemplate { cid: 9 }),
        ),
        (
            "machine option without a value",
            |c| c.machine_options = Some("sata".into()),
            |e| matches!(e, ConfigError::InvalidMachineOptions(o) if o == "sata"),
        ),
        (
            "machine option smuggling an argument",
            |c| c.machine_options = Some("sata=off -device x".into()),
            |e| matches!(e, ConfigError::InvalidMachineOptions(_)),
        ),
        (
            "machine option with an empty pair",
            |c| c.machine_options = Some("sata=off,,hpet=off".into()),
            |e| matches!(e, ConfigError::InvalidMachineOptions(_)),
        ),
        (
            "machine option replacing the memory backend",
            |c| c.machine_options = Some("memory-backend=other".into()),
            |e| matches!(e, ConfigError::InvalidMachineOptions(_)),
        ),
    ];
    for (name, tweak, expect) in cases {
        let mut cfg = base.clone();
        tweak(&mut cfg);
        match cfg.validate() {
            Ok(()) => assert_eq!(name, "ok", "{name}: expected an error"),
            Err(e) => {
                assert!(expect(&e), "{name}: unexpected error {e:?}");
                assert!(!e.to_string().contains('\n'), "{name}: multi-line message");
            }
        }
    }
    // Models with features, and `host` where KVM may be used.
    for (accel, model) in [
        (Accel::Tcg, "Skylake-Client-v4,+avx2,-hle"),
        (Accel::Tcg, "max"),
        (Accel::Auto, "host"),
        (Accel::Kvm, "host,pmu=off"),
    ] {
        let mut c = base.clone();
        (c.accel, c.cpu_model) = (accel, Some(model.into()));
        c.validate().expect(model);
    }
    // A valid template and a valid clone.
    assert!(template(base.clone()).validate().is_ok());
    let mut vsock = template(base.clone());
    vsock.agent_channel = AgentChannel::Vsock { guest_cid: None };
    assert!(
        vsock.validate().is_ok(),
        "allocated CIDs work with templates"
    );
    let mut clone = base;
    clone.template = Some(TemplateRole::CloneFrom(paths()));
    assert!(clone.validate().is_ok());
    assert!(clone.clones_template() && !clone.saves_template());
    assert_eq!(clone.without_template().template, None);
    drop(dir);
}

#[test]
fn accel_and_machine_parse() {
    assert_eq!("auto".parse::<Accel>().ok(), Some(Accel::Auto));
    assert_eq!("kvm".parse::<Accel>().ok(), Some(Accel::Kvm));
    assert_eq!("tcg".parse::<Accel>().ok(), Some(Accel::Tcg));
    assert!(matches!("hvf".parse::<Accel>(), Err(ConfigError::UnknownAccel(s)) if s == "hvf"));
    assert!(matches!(
        "KVM".parse::<Accel>(),
        Err(ConfigError::UnknownAccel(_))
    ));
    assert_eq!("q35".parse::<MachineType>().ok(), Some(MachineType::Q35));
    assert_eq!("pc".parse::<MachineType>().ok(), Some(MachineType::Pc));
    assert_eq!(
        "microvm".parse::<MachineType>().ok(),
        Some(MachineType::Microvm)
    );
    assert!(matches!(
        "virt".parse::<MachineType>(),
        Err(ConfigError::UnknownMachine(s)) if s == "virt"
    ));
}

#[test]
fn serde_round_trip_and_unknown_values() {
    let mut cfg = HypervisorConfig::new("/k", None);
    cfg.agent_channel = AgentChannel::HybridVsock {
        backend: "/usr/bin/vhost-device-vsock".into(),
        guest_cid: 7,
    };
    let json = serde_json::to_string(&cfg).expect("serialize");
    assert!(json.contains("\"machine\":\"q35\""));
    assert!(json.contains("\"accel\":\"auto\""));
    let back: HypervisorConfig = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, cfg);
    let bad = json.replace("\"q35\"", "\"virt\"");
    assert!(serde_json::from_str::<HypervisorConfig>(&bad).is_err());
    let bad = json.replace("\"auto\"", "\"hvf\"");
    assert!(serde_json::from_str::<HypervisorConfig>(&bad).is_err());
    // One template role, with both paths: anything else does not parse.
    let mut tpl = HypervisorConfig::new("/k", None);
    tpl.template = Some(TemplateRole::SaveTo(TemplatePaths {
        memory: "/t/memory".into(),
        state: "/t/state".into(),
    }));
    let json = serde_json::to_string(&tpl).expect("serialize");
    assert_eq!(
        serde_json::from_str::<HypervisorConfig>(&json).expect("deserialize"),
        tpl
    );
    for bad in [
        json.replace(",\"state\":\"/t/state\"", ""),
        json.replace("\"save_to\"", "\"save_and_clone\""),
        json.replace(
            "}}",
            "},\"clone_from\":{\"memory\":\"/m\",\"state\":\"/s\"}}",
        ),
    ] {
        assert!(
            serde_json::from_str::<HypervisorConfig>(&bad).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn disk_slots_default_to_four_and_old_configs_to_none() {
    let mut cfg = HypervisorConfig::new("/k", None);
    assert_eq!((cfg.disk_slots, cfg.disk_root_ports()), (4, 4));
    let mut old = serde_json::to_value(&cfg).expect("serialize");
    old.as_object_mut().expect("object").remove("disk_slots");
    let back: HypervisorConfig = serde_json::from_value(old).expect("deserialize");
    assert_eq!(
        back.disk_slots, 0,
        "what a VM booted before disk hotplug has"
    );
    // Root ports only where the root bus cannot take hot-plugged devices.
    cfg.machine = MachineType::Pc;
    assert_eq!(cfg.disk_root_ports(), 0);
    cfg.machine = MachineType::Microvm;
    assert_eq!(cfg.disk_root_ports(), 0);
    cfg.validate_shape().expect("microvm ignores disk slots");
}

#[test]
fn machine_options_default_to_lean_and_old_configs_to_none() {
    let mut cfg = HypervisorConfig::new("/k", None);
    assert_eq!(cfg.machine_options, None);
    assert_eq!(cfg.effective_machine_options(), "sata=off");
    cfg.machine = MachineType::Pc;
    assert_eq!(
        cfg.effective_machine_options(),
        "",
        "pc has no AHCI to drop"
    );
    cfg.machine = MachineType::Q35;
    cfg.machine_options = Some("smbus=off,hpet=off".into());
    assert_eq!(cfg.effective_machine_options(), "smbus=off,hpet=off");
    cfg.validate_shape().expect("valid options");
    cfg.machine_options = Some(String::new());
    assert_eq!(cfg.effective_machine_options(), "");
    cfg.validate_shape().expect("no options");

    let mut old = serde_json::to_value(HypervisorConfig::new("/k", None)).expect("serialize");
    old.as_object_mut()
        .expect("object")
        .remove("machine_options");
    let back: HypervisorConfig = serde_json::from_value(old).expect("deserialize");
    assert_eq!(
        back.effective_machine_options(),
        "",
        "what a VM booted before the field existed has"
    );
}

#[test]
fn vmgenid_off_by_default_and_in_old_configs() {
    let mut cfg = HypervisorConfig::new("/k", None);
    assert!(!cfg.vmgenid && !cfg.has_vmgenid());
    cfg.vmgenid = true;
    assert!(cfg.has_vmgenid());
    let mut old = serde_json::to_value(&cfg).expect("serialize");
    old.as_object_mut().expect("object").remove("vmgenid");
    let back: HypervisorConfig = serde_json::from_value(old).expect("deserialize");
    assert!(
        !back.vmgenid,
        "what a VM booted before the device existed has"
    );
    cfg.machine = MachineType::Microvm;
    assert!(!cfg.has_vmgenid(), "no ACPI table for it on microvm");
    cfg.validate_shape().expect("microvm ignores it");
}

#[test]
fn vsock_channel_serde_allocates_unless_pinned() {
    let allocate = AgentChannel::Vsock { guest_cid: None };
    let json = serde_json::to_string(&allocate).expect("serialize");
    assert_eq!(json, r#"{"kind":"vsock"}"#);
    assert_eq!(
        serde_json::from_str::<AgentChannel>(&json).expect("deserialize"),
        allocate
    );
    // A config written when the CID was required still reads, as a pinned one.
    let pinned: AgentChannel =
        serde_json::from_str(r#"{"kind":"vsock","guest_cid":5}"#).expect("deserialize");
    assert_eq!(pinned, AgentChannel::Vsock { guest_cid: Some(5) });
}

#[test]
fn kernel_params_are_appended() {
    let mut cfg = HypervisorConfig::new("/k", None);
    assert_eq!(cfg.full_kernel_params(), DEFAULT_KERNEL_PARAMS);
    cfg.kernel_params = " memhp_default_state=online ".into();
    assert_eq!(
        cfg.full_kernel_params(),
        format!("{DEFAULT_KERNEL_PARAMS} memhp_default_state=online")
    );
}

#[test]
fn sizes_a_vm_can_grow_to() {
    let mut c = HypervisorConfig::new("/k", None);
    c.vcpus = 1;
    c.max_vcpus = 4;
    c.memory_mib = 256;
    c.memory_slots = 2;
    c.max_memory_mib = 1024;
    c.validate_shape().expect("valid");
    let size = |vcpus, memory_mib| VmSize { vcpus, memory_mib };
    for ok in [size(1, 256), size(4, 1024), size(2, 512), size(1, 1024)] {
        c.check_size(ok).expect("in range");
    }
    // A request at the maximum is no boot config (no room left for the slots), but a VM
    // booted with `c` grows to it: the rule for sizes is not the rule for boot configs.
    let mut at_max = c.clone();
    at_max.memory_mib = 1024;
    assert!(matches!(
        at_max.validate_shape(),
        Err(ConfigError::SlotsWithoutMaxMemory)
    ));
    assert!(matches!(
        c.check_size(size(5, 256)),
        Err(ConfigError::VcpusOutOfRange {
            vcpus: 5,
            min: 1,
            max: 4
        })
    ));
    assert!(matches!(
        c.check_size(size(0, 256)),
        Err(ConfigError::VcpusOutOfRange { vcpus: 0, .. })
    ));
    assert!(matches!(
        c.check_size(size(1, 1025)),
        Err(ConfigError::MemoryOutOfRange {
            memory_mib: 1025,
            min: 256,
            max: 1024
        })
    ));
    assert!(matches!(
        c.check_size(size(1, 128)),
        Err(ConfigError::MemoryOutOfRange {
            memory_mib: 128,
            ..
        })
    ));
    c.memory_slots = 0;
    assert!(matches!(
        c.check_size(size(1, 512)),
        Err(ConfigError::NoMemoryHotplug {
            memory_mib: 512,
            boot_mib: 256
        })
    ));
    c.check_size(size(1, 256)).expect("no growth needs no slot");
}
