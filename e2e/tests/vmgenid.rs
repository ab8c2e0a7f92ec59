//! VMGenID on real QEMU: template clones read different random bytes as soon as they are
//! handed out. With a guest kernel that has a VMGenID driver (the 6.12 image) the template
//! records that clones reseed themselves, `get_vm` leaves out the host's reseed, and the
//! kernel's VM-fork reseed is already logged when the first process runs; with one that has
//! none (6.1) the host's reseed stays. Also the hardest order: a process started as the very
//! first call after the resume, before any clock call, still finds the reseed done.

use std::path::Path;

use tokio::io::AsyncReadExt;
use vmfactory_e2e::{guest_env, vm, GuestEnv, RunRoot};
use vmfactory_factory::{Factory, FactoryBase, TemplateFactory, TemplateMetadata};
use vmfactory_vm::{ExitStatus, ProcessSpec, Vm};

/// What random.c logs after the reseed a new generation id causes.
const FORK_LINE: &str = "crng reseeded due to virtual machine fork";

/// Whether the image's manifest says its kernel has VMGenID (`None`: no manifest to say).
fn image_has_vmgenid(env: &GuestEnv) -> Option<bool> {
    let manifest = env
        .kernel
        .parent()
        .unwrap_or(Path::new("."))
        .join("manifest.json");
    let text = std::fs::read_to_string(manifest).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("kernel")?.as_str().map(|k| k != "6.1")
}

/// Reads the kernel log, then 32 random bytes, in `vm`: (fork lines logged before the read,
/// the bytes as hex).
async fn probe(vm: &Vm) -> (usize, String) {
    let script = format!("dmesg | grep -c '{FORK_LINE}'; head -c32 /dev/urandom | od -An -tx1");
    let mut p = vm
        .exec(ProcessSpec::new(["sh", "-c", script.as_str()]))
        .await
        .expect("exec");
    drop(p.stdin());
    let mut out = String::new();
    p.stdout()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("read");
    assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(0), "{out}");
    let mut lines = out.lines();
    let forks = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("a count first: {out:?}"));
    let bytes: String = lines.flat_map(str::split_whitespace).collect();
    assert_eq!(bytes.len(), 64, "{out:?}");
    (forks, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_read_different_bytes_right_after_get_vm() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut cfg = vm::template_factory_config(&env, root.path());
    cfg.vm.hypervisor.vmgenid = true;
    let factory = Factory::new(&cfg).await.expect("template factory");
    let meta = TemplateMetadata::load(&cfg.template_path)
        .await
        .expect("metadata");
    let expected = image_has_vmgenid(&env);
    if let Some(expected) = expected {
        assert_eq!(meta.clones_reseed_themselves, expected, "{meta:?}");
    }
    let itself = meta.clones_reseed_themselves;
    eprintln!("clones reseed themselves: {itself} (image has VMGenID: {expected:?})");

    let mut seen = Vec::new();
    for _ in 0..2 {
        let v = factory.get_vm(&cfg.vm).await.expect("clone");
        // The first thing after get_vm returns.
        let (forks, bytes) = probe(&v).await;
        // With VMGenID the kernel reseeded before get_vm returned (the clock call waited for
        // it), and so before this process ran; without, there is no such reseed to log.
        assert_eq!(forks, usize::from(itself), "{bytes}");
        seen.push(bytes);
        v.stop().await.expect("stop");
    }
    assert_ne!(seen[0], seen[1], "two clones read the same random bytes");
    factory.close().await.expect("close");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_started_first_after_the_resume_finds_the_reseed_done() {
    let Some(env) = guest_env() else { return };
    if image_has_vmgenid(&env) == Some(false) {
        eprintln!("SKIPPED: the image's kernel has no VMGenID driver");
        return;
    }
    let root = RunRoot::new();
    let mut cfg = vm::template_factory_config(&env, root.path());
    cfg.vm.hypervisor.vmgenid = true;
    let t = TemplateFactory::new(&cfg.vm, &cfg.template_path)
        .await
        .expect("template");
    assert!(t.clones_reseed_themselves(), "a VMGenID guest");
    let mut seen = Vec::new();
    for _ in 0..3 {
        // Not get_vm: no clock call, no reseed, only the resume and then the process, as
        // early as the host can send it. The agent holds it until the kernel reseeded.
        let clone = t.get_base_vm(&cfg.vm).await.expect("clone");
        clone.resume().await.expect("resume");
        let (forks, bytes) = probe(&clone).await;
        assert_eq!(forks, 1, "the process ran before the kernel's reseed");
        let console =
            std::fs::read_to_string(clone.hypervisor().console_log_path()).expect("console");
        assert!(!console.contains("Kernel panic"), "{console}");
        seen.push(bytes);
        clone.stop().await.expect("stop");
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3, "clones read the same random bytes: {seen:?}");
    t.close().await.expect("close");
    root.assert_no_leaks();
}
