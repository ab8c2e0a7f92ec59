//! Bad input through the library: a table of bad configurations, each given to the API that
//! checks it (`HypervisorConfig::validate`, `VmConfig::validate`, `FactoryConfig::validate`,
//! `Factory::new`, `Factory::get_vm`, `FromStr`, `AgentUrl::parse`, `Store`,
//! `TemplateMetadata::load`). Each case asserts a typed error variant (never its text), a
//! one-line message, and that nothing was created on disk. No QEMU is started: every case
//! fails before one would be.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmfactory_hypervisor::{
    Accel, AgentChannel, ConfigError as HvError, HypervisorConfig, MachineType, TemplatePaths,
    TemplateRole,
};
use vmfactory_vm::{AgentTimeout, ConfigError as VmError, VmConfig};

use vmfactory_factory::{
    CacheServiceError, Factory, FactoryConfig, FactoryConfigError, GetVmError, NewFactoryError,
    TemplateError, TemplateMetadata,
};

/// A scratch area: real guest files in `files/`, the run root `run/` and template path
/// `tpl/`, which no case may create.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmf-bad-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("files")).expect("files");
        for f in ["kernel", "initrd", "image"] {
            std::fs::write(dir.path().join("files").join(f), b"x").expect("file");
        }
        Self { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("files").join(name)
    }

    fn run(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    fn tpl(&self) -> PathBuf {
        self.dir.path().join("tpl")
    }

    /// A valid config: 1 of up to 4 vCPUs, 256 of up to 1024 MiB in 2 slots.
    fn hv(&self) -> HypervisorConfig {
        let mut h = HypervisorConfig::new(self.file("kernel"), Some(self.file("initrd")));
        h.max_vcpus = 4;
        h.memory_slots = 2;
        h.max_memory_mib = 1024;
        h
    }

    fn vm(&self) -> VmConfig {
        let mut v = VmConfig::new(self.hv());
        v.run_root = self.run();
        v
    }

    fn factory(&self) -> FactoryConfig {
        let mut f = FactoryConfig::new(self.vm());
        f.template_path = self.tpl();
        f
    }

    /// Panics if anything but the guest files exists.
    fn assert_untouched(&self, case: &str) {
        let entries: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("scratch")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(entries, ["files"], "{case}: created {entries:?}");
    }
}

/// A table row: a name, an edit of a valid config, and the error variant it must give.
type Case<C, E> = (&'static str, Box<dyn FnOnce(&mut C)>, fn(&E) -> bool);

/// Asserts the error and its sources print as one line each.
fn one_line(case: &str, e: &dyn std::error::Error) {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        assert!(!text.contains('\n'), "{case}: multi-line error {text:?}");
        assert!(!text.is_empty(), "{case}: empty error message");
        cur = err.source();
    }
}

fn hv_case(
    s: &Scratch,
    name: &str,
    edit: impl FnOnce(&mut HypervisorConfig),
    want: fn(&HvError) -> bool,
) {
    let mut h = s.hv();
    edit(&mut h);
    let err = h.validate().expect_err(name);
    assert!(want(&err), "{name}: got {err:?}");
    one_line(name, &err);
    // The same error through the VM config, wrapped.
    let mut v = s.vm();
    v.hypervisor = h;
    match v.validate() {
        Err(VmError::Hypervisor(inner)) => assert!(want(&inner), "{name}: {inner:?}"),
        other => panic!("{name}: VmConfig::validate gave {other:?}"),
    }
    s.assert_untouched(name);
}

#[test]
fn bad_hypervisor_configs() {
    let s = Scratch::new();
    let cases: Vec<Case<HypervisorConfig, HvError>> = vec![
        ("zero vCPUs", Box::new(|h| h.vcpus = 0), |e| {
            matches!(e, HvError::ZeroVcpus)
        }),
        ("vCPUs over max", Box::new(|h| h.vcpus = 5), |e| {
            matches!(
                e,
                HvError::TooManyVcpus {
                    vcpus: 5,
                    max_vcpus: 4
                }
            )
        }),
        ("huge vCPUs", Box::new(|h| h.vcpus = u32::MAX), |e| {
            matches!(e, HvError::TooManyVcpus { .. })
        }),
        ("zero memory", Box::new(|h| h.memory_mib = 0), |e| {
            matches!(e, HvError::ZeroMemory)
        }),
        ("memory over max", Box::new(|h| h.memory_mib = 2048), |e| {
            matches!(
                e,
                HvError::TooMuchMemory {
                    memory_mib: 2048,
                    max_memory_mib: 1024
                }
            )
        }),
        ("huge memory", Box::new(|h| h.memory_mib = u64::MAX), |e| {
            matches!(e, HvError::TooMuchMemory { .. })
        }),
        (
            "huge memory and max",
            Box::new(|h| {
                h.memory_mib = u64::MAX;
                h.max_memory_mib = u64::MAX;
            }),
            |e| matches!(e, HvError::MemoryOverLimit { .. }),
        ),
        (
            "memory whose size in bytes wraps",
            Box::new(|h| {
                h.memory_mib = 1 << 44;
                h.max_memory_mib = 1 << 44;
            }),
            |e| matches!(e, HvError::MemoryOverLimit { .. }),
        ),
        (
            "slots without max memory",
            Box::new(|h| h.max_memory_mib = 256),
            |e| matches!(e, HvError::SlotsWithoutMaxMemory),
        ),
        (
            "hotplug on microvm",
            Box::new(|h| h.machine = MachineType::Microvm),
            |e| matches!(e, HvError::HotplugUnsupported { .. }),
        ),
        // Both roles at once, or a role without its memory or state path, cannot be written
        // since the role is one typed value (`TemplateRole`); the hypervisor crate's serde test
        // shows such JSON does not parse.
        (
            "template with an image",
            Box::new(|h| {
                h.template = Some(TemplateRole::SaveTo(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.image = Some(h.kernel.with_file_name("image"));
            }),
            |e| matches!(e, HvError::TemplateWithImage),
        ),
        (
            "template without initrd",
            Box::new(|h| {
                h.template = Some(TemplateRole::SaveTo(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.initrd = None;
            }),
            |e| matches!(e, HvError::TemplateWithoutInitrd),
        ),
        (
            "hybrid vsock template",
            Box::new(|h| {
                h.template = Some(TemplateRole::SaveTo(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.agent_channel = AgentChannel::HybridVsock {
                    backend: "/b".into(),
                    guest_cid: 3,
                };
            }),
            |e| matches!(e, HvError::HybridVsockWithTemplate),
        ),
        // The same rules for the other role, a clone.
        (
            "clone with an image",
            Box::new(|h| {
                h.template = Some(TemplateRole::CloneFrom(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.image = Some(h.kernel.with_file_name("image"));
            }),
            |e| matches!(e, HvError::TemplateWithImage),
        ),
        (
            "clone without initrd",
            Box::new(|h| {
                h.template = Some(TemplateRole::CloneFrom(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.initrd = None;
            }),
            |e| matches!(e, HvError::TemplateWithoutInitrd),
        ),
        (
            "hybrid vsock clone",
            Box::new(|h| {
                h.template = Some(TemplateRole::CloneFrom(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.agent_channel = AgentChannel::HybridVsock {
                    backend: "/b".into(),
                    guest_cid: 3,
                };
            }),
            |e| matches!(e, HvError::HybridVsockWithTemplate),
        ),
        (
            "reserved vsock CID",
            Box::new(|h| h.agent_channel = AgentChannel::Vsock { guest_cid: Some(2) }),
            |e| matches!(e, HvError::ReservedCid { cid: 2 }),
        ),
        (
            "pinned vsock CID clone",
            Box::new(|h| {
                h.template = Some(TemplateRole::CloneFrom(TemplatePaths {
                    memory: "/m".into(),
                    state: "/s".into(),
                }));
                h.agent_channel = AgentChannel::Vsock { guest_cid: Some(5) };
            }),
            |e| matches!(e, HvError::PinnedCidWithTemplate { cid: 5 }),
        ),
        (
            "missing kernel",
            Box::new(|h| h.kernel = h.kernel.with_file_name("no-kernel")),
            |e| matches!(e, HvError::KernelUnreadable { .. }),
        ),
        (
            "kernel is a directory",
            Box::new(|h| h.kernel = h.kernel.parent().map(Path::to_owned).unwrap_or_default()),
            |e| matches!(e, HvError::KernelUnreadable { .. }),
        ),
        (
            "missing initrd",
            Box::new(|h| h.initrd = Some("/nonexistent/initrd".into())),
            |e| matches!(e, HvError::InitrdUnreadable { .. }),
        ),
        (
            "missing image",
            Box::new(|h| h.image = Some("/nonexistent/image".into())),
            |e| matches!(e, HvError::ImageUnreadable { .. }),
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, edit, want) in cases {
        hv_case(&s, name, edit, want);
    }
}

#[test]
fn unknown_machine_and_accel_strings() {
    for bad in ["q36", "", "Q35 ", "pc\n", "../q35"] {
        let err = bad.parse::<MachineType>().expect_err(bad);
        assert!(
            matches!(err, HvError::UnknownMachine(_)),
            "{bad:?}: {err:?}"
        );
    }
    for bad in ["xen", "", "KVM\n", "hvf"] {
        let err = bad.parse::<Accel>().expect_err(bad);
        assert!(matches!(err, HvError::UnknownAccel(_)), "{bad:?}: {err:?}");
    }
    // The messages quote the input, so even a newline in it stays on one line.
    one_line("machine", &"pc\n".parse::<MachineType>().expect_err("bad"));
    one_line("accel", &"KVM\n".parse::<Accel>().expect_err("bad"));
}

#[test]
fn bad_vm_configs() {
    let s = Scratch::new();
    let cases: Vec<Case<VmConfig, VmError>> = vec![
        (
            "zero call timeout",
            Box::new(|v| v.agent.call_timeout = Duration::ZERO),
            |e| {
                matches!(
                    e,
                    VmError::ZeroTimeout {
                        what: AgentTimeout::Call
                    }
                )
            },
        ),
        (
            "zero dial timeout",
            Box::new(|v| v.agent.dial_timeout = Duration::ZERO),
            |e| {
                matches!(
                    e,
                    VmError::ZeroTimeout {
                        what: AgentTimeout::Dial
                    }
                )
            },
        ),
        (
            "zero ready timeout",
            Box::new(|v| v.agent.ready_timeout = Duration::ZERO),
            |e| {
                matches!(
                    e,
                    VmError::ZeroTimeout {
                        what: AgentTimeout::Ready
                    }
                )
            },
        ),
        (
            "relative run root",
            Box::new(|v| v.run_root = "run/vc".into()),
            |e| matches!(e, VmError::RelativeRunRoot { .. }),
        ),
        (
            "run root too long for sockets",
            Box::new(|v| v.run_root = PathBuf::from(format!("/tmp/{}", "r".repeat(60)))),
            |e| matches!(e, VmError::RunRootTooLong { .. }),
        ),
    ];
    for (name, edit, want) in cases {
        let mut v = s.vm();
        edit(&mut v);
        let err = v.validate().expect_err(name);
        assert!(want(&err), "{name}: {err:?}");
        one_line(name, &err);
        let err = vmfactory_vm::Vm::new(v.clone()).now_or_never_err(name);
        assert!(
            matches!(&err, vmfactory_vm::Error::Config(e) if want(e)),
            "{name}: Vm::new gave {err:?}"
        );
        s.assert_untouched(name);
    }
}

/// Runs a future on a fresh runtime and returns its error.
trait RunErr<T> {
    fn now_or_never_err(self, case: &str) -> vmfactory_vm::Error;
}

impl<F, T: std::fmt::Debug> RunErr<T> for F
where
    F: std::future::Future<Output = vmfactory_vm::Result<T>>,
{
    fn now_or_never_err(self, case: &str) -> vmfactory_vm::Error {
        runtime().block_on(self).expect_err(case)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[tokio::test]
async fn bad_factory_configs() {
    let s = Scratch::new();
    let cases: Vec<Case<FactoryConfig, NewFactoryError>> = vec![
        (
            "fetch-only without template",
            Box::new(|f| f.fetch_only = true),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::FetchOnlyWithoutTemplate)
                )
            },
        ),
        (
            "cache with fetch-only",
            Box::new(|f| {
                f.template = true;
                f.fetch_only = true;
                f.cache = 2;
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::CacheOverFetchOnly)
                )
            },
        ),
        (
            "relative template path",
            Box::new(|f| f.template_path = "tpl".into()),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::RelativeTemplatePath { .. })
                )
            },
        ),
        (
            "template with an image instead of an initrd",
            Box::new(|f| {
                f.template = true;
                f.vm.hypervisor.image = f.vm.hypervisor.initrd.take();
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::NotTemplatable(
                        HvError::TemplateWithImage
                    ))
                )
            },
        ),
        (
            "template with an image besides the initrd",
            Box::new(|f| {
                f.template = true;
                f.vm.hypervisor.image = f.vm.hypervisor.initrd.clone();
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::NotTemplatable(
                        HvError::TemplateWithImage
                    ))
                )
            },
        ),
        (
            "cache client with a template",
            Box::new(|f| {
                f.template = true;
                f.cache_endpoint = Some("/nonexistent/cache.sock".into());
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::ClientWithLocalBase)
                )
            },
        ),
        (
            "cache client with a local cache",
            Box::new(|f| {
                f.cache = 1;
                f.cache_endpoint = Some("/nonexistent/cache.sock".into());
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::ClientWithLocalBase)
                )
            },
        ),
        (
            "cache endpoint nobody serves",
            Box::new(|f| f.cache_endpoint = Some("/nonexistent/cache.sock".into())),
            |e| {
                matches!(
                    e,
                    NewFactoryError::CacheService(CacheServiceError::Connect { .. })
                )
            },
        ),
        (
            "fetch-only with no template there",
            Box::new(|f| {
                f.template = true;
                f.fetch_only = true;
            }),
            |e| matches!(e, NewFactoryError::Template(TemplateError::Missing { .. })),
        ),
        ("zero vCPUs", Box::new(|f| f.vm.hypervisor.vcpus = 0), |e| {
            matches!(
                e,
                NewFactoryError::Config(FactoryConfigError::Vm(VmError::Hypervisor(
                    HvError::ZeroVcpus
                )))
            )
        }),
        (
            "huge template memory",
            Box::new(|f| {
                f.template = true;
                f.vm.hypervisor.memory_mib = u64::MAX;
                f.vm.hypervisor.max_memory_mib = u64::MAX;
            }),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::Vm(VmError::Hypervisor(
                        HvError::MemoryOverLimit { .. }
                    )))
                )
            },
        ),
        (
            "relative run root",
            Box::new(|f| f.vm.run_root = "run".into()),
            |e| {
                matches!(
                    e,
                    NewFactoryError::Config(FactoryConfigError::Vm(
                        VmError::RelativeRunRoot { .. }
                    ))
                )
            },
        ),
    ];
    for (name, edit, want) in cases {
        let mut f = s.factory();
        edit(&mut f);
        // `Factory::new` runs `validate` first; a case that passes it fails in `new`.
        let err = match f.validate() {
            Err(e) => NewFactoryError::from(e),
            Ok(()) => Factory::new(&f).await.expect_err(name),
        };
        assert!(want(&err), "{name}: {err:?}");
        one_line(name, &err);
        let err = Factory::new(&f).await.expect_err(name);
        assert!(want(&err), "{name}: Factory::new gave {err:?}");
        s.assert_untouched(name);
    }
}

/// A direct factory defers file checks to `get_vm`, which refuses a missing kernel or initrd
/// before booting anything.
#[tokio::test]
async fn get_vm_with_missing_guest_files() {
    let s = Scratch::new();
    let f = Factory::new(&s.factory()).await.expect("direct factory");
    for (name, edit) in [
        (
            "missing kernel",
            Box::new(|v: &mut VmConfig| v.hypervisor.kernel = "/nonexistent/k".into())
                as Box<dyn Fn(&mut VmConfig)>,
        ),
        (
            "missing initrd",
            Box::new(|v: &mut VmConfig| v.hypervisor.initrd = Some("/nonexistent/i".into())),
        ),
        (
            "vCPUs over max",
            Box::new(|v: &mut VmConfig| v.hypervisor.vcpus = 9),
        ),
        (
            "memory over max",
            Box::new(|v: &mut VmConfig| v.hypervisor.memory_mib = 4096),
        ),
    ] {
        let mut v = s.vm();
        edit(&mut v);
        let err = f.get_vm(&v).await.expect_err(name);
        assert!(
            matches!(err, GetVmError::Request(VmError::Hypervisor(_))),
            "{name}: {err:?}"
        );
        one_line(name, &err);
        s.assert_untouched(name);
    }
    f.close().await.expect("close");
    s.assert_untouched("close");
}

#[test]
fn bad_agent_urls() {
    use vmfactory_agent::{AgentUrl, Error as AgentError};
    for bad in [
        "",
        "tcp://10.0.0.1:1024",
        "vsock://",
        "vsock://3",
        "vsock://x:1024",
        "vsock://3:99999999999",
        "hvsock:///run/vm.sock",
        "hvsock://relative.sock:1024",
        "hvsock:///run/vm.sock:port",
        "serial://",
        "serial://relative/agent.sock",
        "serial:///run/a\0b",
        "unix://",
        "/run/agent.sock",
    ] {
        let err = AgentUrl::parse(bad).expect_err(bad);
        assert!(
            matches!(err, AgentError::InvalidUrl { .. }),
            "{bad:?}: {err:?}"
        );
        one_line(bad, &err);
    }
}

#[tokio::test]
async fn hostile_vm_ids() {
    use vmfactory_persist::{Error as PError, Store};
    let s = Scratch::new();
    let store = Store::new(s.run());
    let long = "a".repeat(129);
    for id in [
        "../x",
        "..",
        ".",
        "",
        "a/b",
        "/etc",
        ".hidden",
        "a\0b",
        "x y",
        "é",
        long.as_str(),
    ] {
        let err = store.create_vm_dir(id).await.expect_err(id);
        assert!(matches!(err, PError::InvalidId { .. }), "{id:?}: {err:?}");
        one_line(id, &err);
        assert!(matches!(
            store.load_state::<u32>(id).await,
            Err(PError::InvalidId { .. })
        ));
        assert!(matches!(
            store.lock(id).await,
            Err(PError::InvalidId { .. })
        ));
        assert!(matches!(
            store.destroy_vm_dir(id).await,
            Err(PError::InvalidId { .. })
        ));
        s.assert_untouched(id);
    }
}

#[tokio::test]
async fn bad_template_metadata() {
    let s = Scratch::new();
    let dir = s.dir.path().join("meta");
    std::fs::create_dir(&dir).expect("dir");
    let file = dir.join(vmfactory_factory::METADATA_FILE);
    let load = || TemplateMetadata::load(&dir);
    assert!(matches!(load().await, Err(TemplateError::Missing { .. })));
    type Row = (&'static str, Vec<u8>, fn(&TemplateError) -> bool);
    let cases: [Row; 7] = [
        ("empty", Vec::new(), |e| {
            matches!(e, TemplateError::Corrupt { .. })
        }),
        ("garbage", b"\xff\xfe not json".to_vec(), |e| {
            matches!(e, TemplateError::Corrupt { .. })
        }),
        (
            "truncated",
            br#"{"version": 1, "config_hash": "ab"#.to_vec(),
            |e| matches!(e, TemplateError::Corrupt { .. }),
        ),
        ("future version", br#"{"version": 7}"#.to_vec(), |e| {
            matches!(e, TemplateError::UnsupportedVersion { found: 7, .. })
        }),
        // Version 1 recorded `accel = auto`, not what it resolved to: not to be trusted.
        (
            "version 1",
            br#"{"version": 1, "key": {"accel": "auto"}}"#.to_vec(),
            |e| {
                matches!(
                    e,
                    TemplateError::UnsupportedVersion {
                        found: 1,
                        supported: 2,
                        ..
                    }
                )
            },
        ),
        (
            "wrong shape",
            br#"{"version": 2, "key": 3}"#.to_vec(),
            |e| matches!(e, TemplateError::Corrupt { .. }),
        ),
        ("oversized", vec![b' '; 1 << 20], |e| {
            matches!(e, TemplateError::Persist { .. })
        }),
    ];
    for (name, bytes, want) in cases {
        std::fs::write(&file, bytes).expect("write");
        let err = load().await.expect_err(name);
        assert!(want(&err), "{name}: {err:?}");
        one_line(name, &err);
    }
}
