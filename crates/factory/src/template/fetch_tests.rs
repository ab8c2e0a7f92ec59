//! Fetching a template: refused when it does not match the config, its files or this host's
//! accelerator; and the accelerator and CPU model resolved once and pinned for its clones.

use std::sync::Arc;

use vmfactory_hypervisor::{Accel, Hypervisor as _};
use vmfactory_proxy::ProxyKind;
use vmfactory_vm::{FakeBackends, VmConfig};

use super::error::TemplateError;
use super::factory::TemplateFactory;
use super::metadata::{MEMORY_FILE, METADATA_FILE, STATE_FILE};
use crate::base::{BaseError, FactoryBase};
use crate::testing::FakeHost;

type Result<T> = std::result::Result<T, TemplateError>;

async fn new_template(b: &Arc<FakeBackends>, host: &Arc<FakeHost>) -> Result<TemplateFactory> {
    TemplateFactory::new_with(&b.config(), b.template_path(), b.clone(), host.clone()).await
}

fn mismatch(r: Result<TemplateFactory>) -> (String, String, String) {
    match r {
        Err(TemplateError::Mismatch {
            field,
            template,
            config,
        }) => (field, template, config),
        other => panic!("{other:?}"),
    }
}

/// Writes `bytes` to `path` and gives it modification time `saved`: the file as it was saved.
fn rewrite_as_saved(path: &std::path::Path, bytes: &[u8], saved: std::time::SystemTime) {
    std::fs::write(path, bytes).expect("write");
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(saved))
        .expect("set mtime");
}

/// A data file written after the save, even with the same bytes, is refused by `fetch` and
/// before each clone of a live factory, which starts no VM for it.
#[tokio::test]
async fn files_written_after_the_save_are_refused_before_a_clone() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let t = new_template(&b, &host).await.expect("template");
    let path = b.template_path();
    let vm = t.get_base_vm(&b.config()).await.expect("a clone");
    vm.stop().await.expect("stop");
    for file in [MEMORY_FILE, STATE_FILE] {
        let bytes = std::fs::read(path.join(file)).expect("read");
        let saved = std::fs::metadata(path.join(file))
            .and_then(|m| m.modified())
            .expect("mtime");
        // File times tick with the kernel's coarse clock (a few ms).
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        std::fs::write(path.join(file), &bytes).expect("rewrite");
        let boots = b.boots();
        let err = t.get_base_vm(&b.config()).await.expect_err("modified");
        assert!(
            matches!(&err, BaseError::Template(TemplateError::Modified { path, .. }) if path.ends_with(file)),
            "{err:?}"
        );
        assert!(err.to_string().contains("re-create"), "{err}");
        assert_eq!(b.boots(), boots, "no VM started for it");
        assert!(matches!(
            TemplateFactory::fetch_with(&b.config(), &path, b.clone(), host.clone()).await,
            Err(TemplateError::Modified { .. })
        ));
        std::fs::File::options()
            .write(true)
            .open(path.join(file))
            .and_then(|f| f.set_modified(saved))
            .expect("set mtime");
        let vm = t.get_base_vm(&b.config()).await.expect("as saved again");
        vm.stop().await.expect("stop");
    }
    t.close().await.expect("close");
    b.assert_nothing_left().await;
}

#[tokio::test]
async fn fetch_refuses_mismatches_and_missing_files() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let t = new_template(&b, &host).await.expect("template");
    let path = b.template_path();
    let fetch = |cfg: VmConfig, host: Arc<FakeHost>| {
        let b = b.clone();
        let path = path.clone();
        async move { TemplateFactory::fetch_with(&cfg, path, b, host).await }
    };
    let f = fetch(b.config(), host.clone()).await.expect("fetch");
    assert!(!f.owns_template());
    f.close().await.expect("close leaves the template");
    assert!(path.join(METADATA_FILE).is_file());

    let field = |r: Result<TemplateFactory>| match r {
        Err(TemplateError::Mismatch { field, .. }) => field,
        other => panic!("{other:?}"),
    };
    let mut cfg = b.config();
    cfg.hypervisor.memory_mib = 512;
    assert_eq!(field(fetch(cfg, host.clone()).await), "memory_mib");
    let mut cfg = b.config();
    cfg.hypervisor.vcpus = 2;
    assert_eq!(field(fetch(cfg, host.clone()).await), "vcpus");
    let mut cfg = b.config();
    cfg.hypervisor.max_vcpus = 2;
    assert_eq!(field(fetch(cfg, host.clone()).await), "max_vcpus");
    let mut cfg = b.config();
    cfg.hypervisor.kernel_params = "debug".into();
    assert_eq!(field(fetch(cfg, host.clone()).await), "kernel_params");
    let other_qemu = Arc::new(FakeHost::default());
    *other_qemu.qemu_version.lock().expect("lock") = "QEMU 9".into();
    assert_eq!(field(fetch(b.config(), other_qemu).await), "qemu_version");
    // Proxy and agent timeouts are no part of a template.
    let mut cfg = b.config();
    cfg.proxy = ProxyKind::None;
    fetch(cfg, host.clone())
        .await
        .expect("proxy does not matter");

    // The metadata records the state's size: a truncated state is refused up front.
    let state = std::fs::read(path.join(STATE_FILE)).expect("state");
    let saved = std::fs::metadata(path.join(STATE_FILE))
        .and_then(|m| m.modified())
        .expect("mtime");
    let full = state.len() as u64;
    assert!(full > 1, "the fake saves a real state");
    std::fs::write(path.join(STATE_FILE), &state[..state.len() / 2]).expect("truncate");
    assert!(matches!(
        fetch(b.config(), host.clone()).await,
        Err(TemplateError::FileSize { expected, found, .. })
            if expected == full && found == full / 2
    ));
    rewrite_as_saved(&path.join(STATE_FILE), &state, saved);
    fetch(b.config(), host.clone()).await.expect("whole again");

    std::fs::remove_file(path.join(STATE_FILE)).expect("rm");
    assert!(matches!(
        fetch(b.config(), host.clone()).await,
        Err(TemplateError::Missing { path }) if path.ends_with(STATE_FILE)
    ));
    std::fs::File::create(path.join(MEMORY_FILE)).expect("truncate");
    assert!(matches!(
        fetch(b.config(), host.clone()).await,
        Err(TemplateError::FileSize { found: 0, .. })
    ));
    std::fs::write(path.join(METADATA_FILE), b"garbage").expect("corrupt");
    assert!(matches!(
        fetch(b.config(), host.clone()).await,
        Err(TemplateError::Corrupt { .. })
    ));
    t.close().await.expect("close");
    assert!(matches!(
        fetch(b.config(), host.clone()).await,
        Err(TemplateError::Missing { .. })
    ));
}

#[tokio::test]
async fn auto_is_resolved_once_and_pinned_for_the_template_and_its_clones() {
    let b = Arc::new(FakeBackends::new());
    let kvm_host = Arc::new(FakeHost::default());
    *kvm_host.auto_accel.lock().expect("lock") = Accel::Kvm;
    assert_eq!(b.config().hypervisor.accel, Accel::Auto);
    let t = new_template(&b, &kvm_host).await.expect("template");
    // Asked with the factory's run root, where the answer is kept for the host.
    assert!(kvm_host
        .accel_roots
        .lock()
        .expect("lock")
        .iter()
        .all(|r| r == b.root()));
    let meta = t.metadata().await.expect("metadata");
    assert_eq!(
        meta.key.accel,
        Accel::Kvm,
        "the resolved accelerator, not auto"
    );
    assert_eq!(meta.key.cpu_model.as_deref(), Some("host"));
    let tpl_vm = b
        .ids_where(|c| c.saves_template())
        .pop()
        .expect("template VM");
    let hv = b.hv(&tpl_vm).config().clone();
    assert_eq!(
        (hv.accel, hv.cpu_model.as_deref()),
        (Accel::Kvm, Some("host"))
    );
    // The base config stays as configured, so requests (also `auto`) still match it.
    assert_eq!(t.config().hypervisor.accel, Accel::Auto);
    assert_eq!(crate::config_difference(t.config(), &b.config()), None);

    // Fetched on a host where auto now resolves to TCG (e.g. /dev/kvm gone): refused.
    let tcg_host = Arc::new(FakeHost::default());
    let fetch = |cfg: VmConfig, host: &Arc<FakeHost>| {
        let (b, host) = (b.clone(), host.clone());
        async move { TemplateFactory::fetch_with(&cfg, b.template_path(), b, host).await }
    };
    assert_eq!(
        mismatch(fetch(b.config(), &tcg_host).await),
        ("accel".into(), "kvm".into(), "tcg".into())
    );
    let mut tcg = b.config();
    tcg.hypervisor.accel = Accel::Tcg;
    assert_eq!(mismatch(fetch(tcg, &kvm_host).await).0, "accel");
    let mut max = b.config();
    max.hypervisor.cpu_model = Some("max".into());
    assert_eq!(
        mismatch(fetch(max, &kvm_host).await),
        ("cpu_model".into(), "host".into(), "max".into())
    );

    // A fetched factory keeps what it matched: its clones start under the template's
    // accelerator and CPU model, whatever `auto` would say later.
    let f = fetch(b.config(), &kvm_host).await.expect("fetch");
    *kvm_host.auto_accel.lock().expect("lock") = Accel::Tcg;
    for base in [&t, &f] {
        let clone = base.get_base_vm(base.config()).await.expect("clone");
        let hv = b.hv(clone.id()).config().clone();
        assert!(hv.clones_template());
        assert_eq!(
            (hv.accel, hv.cpu_model.as_deref()),
            (Accel::Kvm, Some("host"))
        );
        clone.stop().await.expect("stop");
    }
    f.close().await.expect("close");
    t.close().await.expect("close");
}

#[tokio::test]
async fn tcg_keeps_qemus_default_cpu_and_host_cpu_needs_kvm() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let t = new_template(&b, &host).await.expect("template");
    let meta = t.metadata().await.expect("metadata");
    assert_eq!((meta.key.accel, meta.key.cpu_model), (Accel::Tcg, None));
    t.close().await.expect("close");
    // `host` asked for explicitly, and `auto` resolving to TCG: refused before anything runs.
    let mut cfg = b.config();
    cfg.hypervisor.cpu_model = Some("host".into());
    let err = TemplateFactory::new_with(&cfg, b.template_path(), b.clone(), host.clone())
        .await
        .expect_err("host CPU under TCG");
    assert!(
        matches!(
            err,
            TemplateError::Config(vmfactory_vm::ConfigError::Hypervisor(
                vmfactory_hypervisor::ConfigError::HostCpuWithoutKvm
            ))
        ),
        "{err:?}"
    );
    assert!(!b.template_path().exists());
    assert_eq!(
        b.ids_where(|c| c.saves_template()).len(),
        1,
        "only the first template VM"
    );
}
