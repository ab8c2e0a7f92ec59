//! The configuration file: parsing, defaults, checks, and the key and line each error names.

use super::*;

/// [`parse_on`] this host.
fn parse(origin: &str, text: &str, base: &Path) -> Result<Settings, ConfigFileError> {
    parse_on(origin, text, base, &Host::current())
}

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
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ndefault_vcpus = 3\ndefault_maxvcpus = 2\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("vcpus over max");
    assert_eq!(
        e.to_string(),
        "f.toml line 4: default_vcpus (3) exceeds default_maxvcpus (2)"
    );
}

#[test]
fn errors_find_dotted_and_inline_keys() {
    let text = "hypervisor.qemu = { kernel = \"k\" }\n\n[agent]\nready_timeout_ms = 0\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("zero");
    assert_eq!(
        e.to_string(),
        "f.toml line 4: ready_timeout_ms must not be 0"
    );
    let text =
        "[hypervisor]\nqemu.kernel = \"k\"\nqemu.default_vcpus = 2\nqemu.default_maxvcpus = 1\n";
    let e = parse("f.toml", text, Path::new("/")).expect_err("over max");
    assert!(
        e.to_string()
            .starts_with("f.toml line 4: default_vcpus (2)"),
        "{e}"
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

/// A Kata 2.x `configuration.toml` excerpt: two typos, a wrong type and a key of another
/// section (errors), and Kata keys we do not read (warnings), all found in one pass.
const KATA_EXCERPT: &str = r#"[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel = "/usr/share/kata-containers/vmlinux.container"
initrd = "/usr/share/kata-containers/kata-containers-initrd.img"
machine_type = "q35"
kernal_params = ""
firmware = ""
default_vcpus = 1
default_maxvcpus = 0
default_bridges = 1
default_memory = "2048"
use_vsock = true
enable_debug = false

[factory]
enable_template = true
vm_cache_numbr = 0

[agent.kata]
kernel_modules = []
dial_timeout = 45

[netmon]
path = "/usr/libexec/kata-containers/kata-netmon"

[runtime]
internetworking_model = "tcfilter"
run_roots = "/run/vc"
"#;

fn host() -> Host {
    Host {
        cpus: 6,
        memory_mib: Some(8192),
    }
}

#[test]
fn a_kata_file_gets_every_problem_in_one_pass() {
    let e = parse_on("kata.toml", KATA_EXCERPT, Path::new("/"), &host()).expect_err("bad");
    let ConfigFileError::Problems { origin, problems } = &e else {
        panic!("not a list: {e}");
    };
    assert_eq!(origin, "kata.toml");
    let lines: Vec<Option<usize>> = problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(6), Some(11), Some(17), Some(28)], "{e}");
    let text = e.to_string();
    let mut shown = text.lines();
    assert_eq!(shown.next(), Some("4 problems in kata.toml"));
    assert_eq!(
        shown.next(),
        Some("kata.toml line 6: unknown key `kernal_params` in [hypervisor.qemu] (did you mean `kernel_params`?)")
    );
    assert!(
        shown.next().is_some_and(|l| l.starts_with(
            "kata.toml line 11: `default_memory` in [hypervisor.qemu]: invalid type: string \"2048\""
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "line 17: unknown key `vm_cache_numbr` in [factory] (did you mean `vm_cache_number`?)"
        ),
        "{text}"
    );
    assert!(
        text.contains("line 28: unknown key `run_roots` in [runtime] (did you mean `run_root`?)"),
        "{text}"
    );
}

#[test]
fn kata_keys_we_do_not_read_are_warnings_with_their_line() {
    let text = KATA_EXCERPT
        .replace("kernal_params", "kernel_params")
        .replace("\"2048\"", "2048")
        .replace("vm_cache_numbr", "vm_cache_number")
        .replace("run_roots = \"/run/vc\"", "run_root = \"/run/vc\"");
    let s = parse_on("kata.toml", &text, Path::new("/"), &host()).expect("warnings only");
    let w = &s.warnings;
    assert_eq!(w.len(), 7, "{w:#?}");
    let at = |line: usize| {
        w.iter()
            .find(|l| l.starts_with(&format!("kata.toml line {line}: ")))
            .unwrap_or_else(|| panic!("no warning at line {line}: {w:#?}"))
    };
    assert!(at(7).contains("Kata's `firmware` in [hypervisor.qemu] is ignored: no equivalent: "));
    assert!(at(10).contains("`default_bridges`"));
    assert!(at(12).ends_with(
        "`use_vsock` in [hypervisor.qemu] is not supported, ignored: use agent_channel = \"vsock\""
    ));
    assert!(at(13).contains("`enable_debug`") && at(13).contains("RUST_LOG=debug"));
    assert!(at(20).contains("`kernel_modules` in [agent.kata]"));
    assert!(at(24).contains("`path` in [netmon]"));
    assert!(
        at(27).contains("`internetworking_model` in [runtime]") && at(27).contains("[network]")
    );
    // What it does read, in Kata's units and meanings.
    assert_eq!(s.vm.agent.dial_timeout, Duration::from_secs(45));
    assert_eq!((s.vm.hypervisor.vcpus, s.vm.hypervisor.max_vcpus), (1, 6));
    assert_eq!(s.vm.hypervisor.memory_mib, 2048);
    assert!(s.template);
}

#[test]
fn agent_kata_is_our_agent_section_under_kata_names_and_units() {
    let agent = |extra: &str| {
        let text = format!("[hypervisor.qemu]\nkernel = \"k\"\n{extra}");
        parse_on("f.toml", &text, Path::new("/"), &host()).map(|s| s.vm.agent)
    };
    let a = agent("[agent.kata]\ndial_timeout = 30\ncall_timeout_ms = 1500\n").expect("ok");
    assert_eq!(a.dial_timeout, Duration::from_secs(30));
    assert_eq!(a.call_timeout, Duration::from_millis(1500));
    assert_eq!(a.ready_timeout, vmfactory_vm::DEFAULT_READY_TIMEOUT);
    // `[agent]` and `[agent.kata]` together, each key set once, in either order.
    let a =
        agent("[agent.kata]\ndial_timeout = 2\n[agent]\nready_timeout_ms = 5000\n").expect("ok");
    assert_eq!(
        (a.dial_timeout, a.ready_timeout),
        (Duration::from_secs(2), Duration::from_secs(5))
    );
    let e = agent("[agent]\ndial_timeout_ms = 100\n[agent.kata]\ndial_timeout = 1\n")
        .expect_err("twice")
        .to_string();
    assert_eq!(
        e,
        "f.toml line 6: `dial_timeout_ms` is set twice: in [agent] line 4 and in [agent.kata]"
    );
    let e = agent("[agent.kata]\ndial_timeout = 0.5\n").expect_err("seconds are whole");
    assert!(
        e.to_string()
            .starts_with("f.toml line 4: `dial_timeout` in [agent.kata]"),
        "{e}"
    );
    let e = agent("[agent.kata]\ndial_timeout = 0\n").expect_err("zero");
    assert!(
        e.to_string().contains("dial_timeout_ms must not be 0"),
        "{e}"
    );
    // Kata's seconds only in Kata's section: our [agent] has milliseconds.
    let e = agent("[agent]\ndial_timeout = 3\n").expect_err("not ours");
    assert!(
        e.to_string().contains("(did you mean `dial_timeout_ms`?)"),
        "{e}"
    );
}

#[test]
fn zero_and_negative_sizes_mean_the_hosts_as_in_kata() {
    let hv = |extra: &str, host: &Host| {
        let text = format!("[hypervisor.qemu]\nkernel = \"k\"\n{extra}");
        parse_on("f.toml", &text, Path::new("/"), host).map(|s| {
            let h = s.vm.hypervisor;
            (h.vcpus, h.max_vcpus, h.memory_mib, h.max_memory_mib)
        })
    };
    let h = host();
    assert_eq!(
        hv("", &h).expect("ok"),
        (1, 1, 256, 256),
        "unset: no hotplug room"
    );
    assert_eq!(hv("default_vcpus = 0\n", &h).expect("ok"), (1, 1, 256, 256));
    assert_eq!(
        hv("default_vcpus = -1\n", &h).expect("ok"),
        (6, 6, 256, 256)
    );
    let zero = "default_vcpus = 2\ndefault_maxvcpus = 0\ndefault_maxmemory = 0\nmemory_slots = 1\n";
    assert_eq!(hv(zero, &h).expect("ok"), (2, 6, 256, 8192));
    let big = Host {
        cpus: 448,
        memory_mib: Some(1 << 20),
    };
    assert_eq!(
        hv(zero, &big).expect("ok"),
        (2, KATA_MAX_VCPUS, 256, 1 << 20)
    );
    let blind = Host {
        memory_mib: None,
        ..h
    };
    let e = hv(zero, &blind).expect_err("no host memory");
    assert!(
        e.to_string()
            .starts_with("f.toml line 5: default_maxmemory = 0"),
        "{e}"
    );
    // Explicit values are kept as written.
    assert_eq!(
        hv("default_vcpus = 8\ndefault_maxvcpus = 16\n", &h)
            .expect("ok")
            .1,
        16
    );
}

#[test]
fn unknown_sections_are_named_with_a_hint() {
    let bad = |extra: &str| {
        let text = format!("[hypervisor.qemu]\nkernel = \"k\"\n{extra}");
        parse_on("f.toml", &text, Path::new("/"), &host())
            .expect_err("bad")
            .to_string()
    };
    assert_eq!(
        bad("[hypervisor.firecracker]\npath = \"fc\"\n"),
        "f.toml line 3: unknown section [hypervisor.firecracker]: vmfactory runs QEMU only, configured in [hypervisor.qemu]"
    );
    assert_eq!(
        bad("[factroy]\nprestart = 1\n"),
        "f.toml line 3: unknown section [factroy] (did you mean [factory]?)"
    );
    assert_eq!(
        bad("[shim]\npath = \"x\"\nx = 1\n"),
        "f.toml line 3: unknown section [shim]"
    );
    assert!(bad("[proxy.kata]\nbogus = 1\n").contains("unknown key `bogus` in [proxy.kata]"));
    let e = parse_on("f.toml", "kernel = \"k\"\n", Path::new("/"), &host()).expect_err("top");
    assert_eq!(
        e.to_string(),
        "2 problems in f.toml\nf.toml line 1: `kernel` is outside any section: put it under its \
         [section]\nf.toml: `kernel` in [hypervisor.qemu] is required"
    );
    // A kernel of the wrong type is that, not also missing.
    let e = parse_on(
        "f.toml",
        "[hypervisor.qemu]\nkernel = 1\n",
        Path::new("/"),
        &host(),
    );
    let e = e.expect_err("bad kernel").to_string();
    assert!(
        e.starts_with("f.toml line 2: `kernel` in [hypervisor.qemu]: invalid type"),
        "{e}"
    );
}

#[test]
fn every_kata_key_is_in_the_docs_table() {
    let docs = include_str!("../../../docs/configuration.md");
    let mut n = 0;
    for section in keys::SECTIONS {
        for (key, kind) in section.keys.iter().flat_map(|k| k.iter()) {
            if matches!(
                kind,
                keys::Kind::Use(_) | keys::Kind::Ignored(_) | keys::Kind::Scaled { .. }
            ) {
                n += 1;
                let row = format!("| `[{}] {key}` |", section.name);
                assert!(
                    docs.contains(&row),
                    "{row} missing from docs/configuration.md"
                );
            }
        }
    }
    assert!(n >= 100, "{n} Kata keys");
}

#[test]
fn a_broken_rule_is_reported_beside_unknown_keys() {
    let text = "[hypervisor.qemu]\nkernel = \"k\"\ndefault_vcpus = 4\ndefault_maxvcpus = 2\n\
                [factory]\nvm_cache_numbr = 1\n";
    let e = parse_on("f.toml", text, Path::new("/"), &host()).expect_err("two problems");
    assert_eq!(
        e.to_string(),
        "2 problems in f.toml\n\
         f.toml line 4: default_vcpus (4) exceeds default_maxvcpus (2)\n\
         f.toml line 6: unknown key `vm_cache_numbr` in [factory] (did you mean `vm_cache_number`?)"
    );
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
