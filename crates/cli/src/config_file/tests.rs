//! The configuration file: parsing, defaults, checks, and the key and line each error names.

use super::*;

#[test]
fn embedded_default_parses_and_validates() {
    let s = parse("embedded default", DEFAULT_TOML, Path::new("/guest")).expect("default");
    assert!(s.template);
    assert_eq!(s.cache_number, 0);
    assert_eq!(s.vm.hypervisor.kernel, Path::new("/guest/vmlinuz"));
    assert_eq!(
        s.vm.hypervisor.initrd.as_deref(),
        Some(Path::new("/guest/initramfs.cpio"))
    );
    assert_eq!(s.vm.hypervisor.qemu_path, Path::new("qemu-system-x86_64"));
    assert_eq!(s.vm.run_root, Path::new("/run/vc"));
    assert_eq!(s.template_path, Path::new(DEFAULT_TEMPLATE_PATH));
    assert_eq!(s.endpoint, Path::new(DEFAULT_CACHE_ENDPOINT));
    assert_eq!((s.vm.hypervisor.vcpus, s.vm.hypervisor.max_vcpus), (1, 4));
    assert_eq!(s.vm.hypervisor.cpu_model, None, "chosen per accelerator");
    s.factory_config().validate().expect("factory config");
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ncpu_model = \"max,-la57\"\n";
    let s = parse("f.toml", text, Path::new("/")).expect("ok");
    assert_eq!(s.vm.hypervisor.cpu_model.as_deref(), Some("max,-la57"));
    assert_eq!(
        s.vm.hypervisor.disk_slots, 4,
        "unset: the library's default"
    );
}

#[test]
fn disk_slots_are_read_and_checked() {
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ndisk_slots = 2\n";
    let s = parse("f.toml", text, Path::new("/")).expect("ok");
    assert_eq!(s.vm.hypervisor.disk_slots, 2);
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ndisk_slots = 16\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("over 15");
    assert!(e.to_string().contains("16 disk slots"), "{e}");
}

#[test]
fn machine_accelerators_and_clone_thp_are_read_and_checked() {
    let hv = |extra: &str| {
        let text = format!("[hypervisor.qemu]\nkernel = \"k\"\n{extra}");
        let hv = parse("f.toml", &text, Path::new("/")).map(|s| s.vm.hypervisor);
        hv.map(|h| (h.effective_machine_options().to_owned(), h.clone_thp))
    };
    assert_eq!(hv("").expect("ok"), ("sata=off".into(), false));
    let off = hv("machine_accelerators = \"\"\nclone_thp = true\n").expect("ok");
    assert_eq!(off, (String::new(), true));
    let e = hv("machine_accelerators = \"nosata\"\n").expect_err("not key=value");
    assert!(
        e.to_string().contains("line 3") && e.to_string().contains("nosata"),
        "{e}"
    );
}

#[test]
fn vmgenid_is_off_unless_turned_on() {
    let vmgenid = |extra: &str| {
        let text = format!("[hypervisor.qemu]\nkernel = \"k\"\n{extra}");
        parse("f.toml", &text, Path::new("/")).map(|s| s.vm.hypervisor.vmgenid)
    };
    assert!(!vmgenid("").expect("ok"));
    assert!(vmgenid("vmgenid = true\n").expect("ok"));
    assert!(vmgenid("vmgenid = \"auto\"\n").is_err(), "a bool");
}

#[test]
fn compile_time_guest_dir_is_normalized() {
    let d = normalize(Path::new("/a/crates/factory/../../target/guest"));
    assert_eq!(d, Path::new("/a/target/guest"));
}

#[test]
fn unknown_key_names_key_and_line() {
    let text = "[hypervisor.qemu]\nkernel = \"k\"\nkernal_params = \"x\"\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("unknown key");
    let msg = e.to_string();
    assert!(msg.contains("line 3"), "{msg}");
    assert!(msg.contains("kernal_params"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn semantic_errors_find_their_line() {
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ndefault_vcpus = 0\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("zero vcpus");
    assert_eq!(
        e.to_string(),
        "f.toml line 3: default_vcpus must be at least 1"
    );
}

#[test]
fn vsock_allocates_unless_guest_cid_pins_one() {
    let base = "[hypervisor.qemu]\nkernel = \"k\"\ninitrd = \"i\"\n";
    let channel = |extra: &str| {
        let text = format!("{base}{extra}");
        parse("f.toml", &text, Path::new("/")).map(|s| s.vm.hypervisor.agent_channel)
    };
    let ok = |extra: &str| channel(extra).expect("valid");
    assert_eq!(
        ok("agent_channel = \"vsock\"\n"),
        AgentChannel::Vsock { guest_cid: None }
    );
    assert_eq!(
        ok("agent_channel = \"vsock\"\nguest_cid = 7\n"),
        AgentChannel::Vsock { guest_cid: Some(7) }
    );
    assert!(matches!(
        ok("agent_channel = \"hybrid-vsock\"\n"),
        AgentChannel::HybridVsock { guest_cid: 3, .. }
    ));
    let err = |extra: &str| channel(extra).expect_err("invalid").to_string();
    assert_eq!(
        err("agent_channel = \"vsock\"\nguest_cid = 2\n"),
        "f.toml line 5: guest_cid = 2 is reserved: use 3 to 4294967294"
    );
    let pinned =
        err("agent_channel = \"vsock\"\nguest_cid = 7\n[factory]\nenable_template = true\n");
    assert!(
        pinned.starts_with("f.toml line 5: enable_template"),
        "{pinned}"
    );
    // Templates with an allocated CID are fine.
    let text = format!("{base}agent_channel = \"vsock\"\n[factory]\nenable_template = true\n");
    parse("f.toml", &text, Path::new("/")).expect("vsock templates");
}

#[test]
fn relative_paths_resolve_against_the_base() {
    let text = "[hypervisor.qemu]\nkernel = \"g/k\"\npath = \"bin/qemu\"\n";
    let s = parse("f.toml", text, Path::new("/etc/x")).expect("ok");
    assert_eq!(s.vm.hypervisor.kernel, Path::new("/etc/x/g/k"));
    assert_eq!(s.vm.hypervisor.qemu_path, Path::new("/etc/x/bin/qemu"));
    assert!(!s.template, "Kata's default: no template");
    assert_eq!(s.vm.hypervisor.max_memory_mib, 256);
}

#[test]
fn key_line_respects_sections() {
    let text = "[a]\nx = 1\n[b]\n x = 2\n";
    assert_eq!(key_line(text, "b", "x"), Some(4));
    assert_eq!(key_line(text, "c", "x"), None);
}

#[test]
fn metrics_address_is_off_by_default_and_checked_with_its_line() {
    let base = "[hypervisor.qemu]\nkernel = \"k\"\n[factory]\n";
    let off = parse("f.toml", base, Path::new("/")).expect("no metrics");
    assert_eq!(off.metrics_address().expect("ok"), None);
    for (value, want) in [
        (
            "127.0.0.1:9464",
            MetricsAddress::Tcp(([127, 0, 0, 1], 9464).into()),
        ),
        (
            "unix:/run/vc/metrics.sock",
            MetricsAddress::Unix("/run/vc/metrics.sock".into()),
        ),
    ] {
        let text = format!("{base}metrics_address = \"{value}\"\n");
        let s = parse("f.toml", &text, Path::new("/")).expect("valid");
        assert_eq!(s.metrics_address().expect("ok"), Some(want));
    }
    for value in ["localhost:9464", "unix:metrics.sock", ""] {
        let text = format!("{base}metrics_address = \"{value}\"\n");
        let e = parse("f.toml", &text, Path::new("/")).expect_err(value);
        assert_eq!(
            e.to_string(),
            format!(
                "f.toml line 4: metrics_address must be IP:PORT (e.g. 127.0.0.1:9464) or \
                 unix:/ABSOLUTE/PATH, not {value:?}"
            )
        );
    }
    let long = format!("{base}metrics_address = \"unix:/{}\"\n", "x".repeat(200));
    let e = parse("f.toml", &long, Path::new("/")).expect_err("too long");
    assert!(
        e.to_string()
            .starts_with("f.toml line 4: metrics_address: the socket path is longer than"),
        "{e}"
    );
}
