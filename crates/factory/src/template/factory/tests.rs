//! Template factory lifecycle with fakes: make, adopt, close, destroy, and the checks on the way.

use super::*;
use crate::testing::FakeHost;
use vmfactory_hypervisor::{FakeStep, Hypervisor as _, VmStatus};
use vmfactory_vm::FakeBackends;

async fn new_template(b: &Arc<FakeBackends>, host: &Arc<FakeHost>) -> Result<TemplateFactory> {
    TemplateFactory::new_with(&b.config(), b.template_path(), b.clone(), host.clone()).await
}

#[tokio::test]
async fn new_mounts_saves_writes_metadata_and_close_removes() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let t = new_template(&b, &host).await.expect("template");
    let path = b.template_path();
    assert_eq!(host.depth(&path), 1, "one tmpfs");
    let meta = t.metadata().await.expect("metadata");
    assert_eq!(meta.memory_mib, 256);
    assert_eq!(meta.key.vcpus, 1);
    assert!(path.join(MEMORY_FILE).is_file() && path.join(STATE_FILE).is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("dir").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // The template VM: booted with the flags, waited for, paused, saved, stopped.
    let tpl_ids = b.ids_where(|c| c.saves_template());
    assert_eq!(tpl_ids.len(), 1);
    let hv = b.hv(&tpl_ids[0]);
    use vmfactory_hypervisor::FakeCall as H;
    assert_eq!(hv.calls()[1..4], [H::Pause, H::SaveTemplate, H::Stop]);
    let agent = b.agent(&tpl_ids[0]);
    assert_eq!(agent.count("disconnect"), 2, "disconnect, then stop");
    // Warmed up before the save: clones resume with the guest side of get_vm done once.
    let names: Vec<&str> = agent.calls().iter().map(|c| c.method()).collect();
    let disconnect = names.iter().position(|n| *n == "disconnect");
    for warm in ["reseed_random_dev", "set_guest_date_time"] {
        let at = names.iter().position(|n| *n == warm);
        assert!(
            at.is_some() && at < disconnect,
            "{warm} before the save: {names:?}"
        );
    }
    assert_eq!(b.live().await, 0);
    assert_eq!(b.vm_dir_count(), 0);

    // Clones boot paused from the template files.
    let clone = t.get_base_vm(t.config()).await.expect("clone");
    assert_eq!(clone.status().await.expect("s").state, VmStatus::Paused);
    let hc = &b.hv(clone.id()).config().clone();
    assert!(hc.clones_template() && !hc.saves_template());
    assert_eq!(
        hc.template.as_ref().map(|t| t.paths().memory.as_path()),
        Some(path.join(MEMORY_FILE).as_path())
    );
    clone.stop().await.expect("stop");

    t.close().await.expect("close");
    assert_eq!(host.depth(&path), 0);
    assert!(!path.exists());
    t.close().await.expect("close is idempotent");
    assert!(matches!(
        t.get_base_vm(t.config()).await,
        Err(BaseError::Closed { what: "template" })
    ));
}

#[tokio::test]
async fn new_twice_never_stacks_mounts() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    let t1 = new_template(&b, &host).await.expect("template");
    let t2 = new_template(&b, &host)
        .await
        .expect("adopts the existing template");
    assert_eq!(host.depth(&b.template_path()), 1);
    assert_eq!(host.mount_calls.load(Ordering::SeqCst), 1);
    assert_eq!(b.ids_where(|c| c.saves_template()).len(), 1, "booted once");

    // Another config on the same path: refused, the mount left alone.
    let mut other = b.config();
    other.hypervisor.memory_mib = 512;
    let err = TemplateFactory::new_with(&other, b.template_path(), b.clone(), host.clone())
        .await
        .expect_err("occupied");
    match err {
        TemplateError::Occupied { reason, .. } => assert!(
            matches!(*reason, TemplateError::Mismatch { ref field, .. } if field == "memory_mib")
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(host.depth(&b.template_path()), 1);
    t2.close().await.expect("close");
    t1.close().await.expect("close again");
    assert_eq!(host.depth(&b.template_path()), 0);
    assert!(!b.template_path().exists());
}

#[tokio::test]
async fn plain_directory_when_mounting_is_not_permitted() {
    let b = Arc::new(FakeBackends::new());
    let host = Arc::new(FakeHost::default());
    host.not_permitted.store(true, Ordering::SeqCst);
    let t = new_template(&b, &host).await.expect("template");
    assert_eq!(host.depth(&b.template_path()), 0);
    assert!(b.template_path().join(METADATA_FILE).is_file());
    t.close().await.expect("close");
    assert!(!b.template_path().exists());
}

#[tokio::test]
async fn failures_clean_up_everything() {
    for step in [FakeStep::Start, FakeStep::Pause, FakeStep::SaveTemplate] {
        let b = Arc::new(FakeBackends::new());
        let host = Arc::new(FakeHost::default());
        b.fail_template_at(Some(step));
        let err = new_template(&b, &host).await.expect_err("fails");
        assert!(matches!(err, TemplateError::Vm { .. }), "{step:?}: {err:?}");
        assert_eq!(host.depth(&b.template_path()), 0, "{step:?}");
        assert!(!b.template_path().exists(), "{step:?}");
        assert_eq!(b.live().await, 0, "{step:?}");
        assert_eq!(b.vm_dir_count(), 0, "{step:?}");
    }
    // The warm-up fails: nothing is saved and everything is cleaned up.
    for method in ["reseed_random_dev", "set_guest_date_time"] {
        let b = Arc::new(FakeBackends::new());
        b.fail_agent_methods([method]);
        let host = Arc::new(FakeHost::default());
        let err = new_template(&b, &host).await.expect_err("fails");
        assert!(matches!(err, TemplateError::Vm { .. }), "{method}: {err:?}");
        assert!(err.to_string().contains("warm-up"), "{method}: {err}");
        assert_eq!(host.depth(&b.template_path()), 0, "{method}");
        assert!(!b.template_path().exists(), "{method}");
        assert_eq!(b.live().await, 0, "{method}");
        assert_eq!(b.vm_dir_count(), 0, "{method}");
    }
    // The agent never re-listens: bounded wait, then cleanup.
    let b = Arc::new(FakeBackends::new());
    b.set_relisten(false);
    let host = Arc::new(FakeHost::default());
    let err = new_template(&b, &host).await.expect_err("fails");
    assert!(matches!(err, TemplateError::Relisten { .. }), "{err:?}");
    assert!(!b.template_path().exists());
    assert_eq!(b.live().await, 0);
    // A non-empty directory that is no template is refused and left alone.
    let b = Arc::new(FakeBackends::new());
    std::fs::create_dir(b.template_path()).expect("dir");
    std::fs::write(b.template_path().join("other"), b"x").expect("file");
    let err = new_template(&b, &host).await.expect_err("occupied");
    assert!(matches!(
        err,
        TemplateError::Occupied { ref reason, .. }
            if matches!(**reason, TemplateError::Missing { .. })
    ));
    assert!(b.template_path().join("other").is_file());
}

#[tokio::test]
async fn the_relisten_wait_ends_when_the_template_vm_dies() {
    use std::os::unix::process::ExitStatusExt;
    let b = Arc::new(FakeBackends::new());
    b.set_relisten(false);
    let host = Arc::new(FakeHost::default());
    let mut cfg = b.config();
    // Far beyond the test's patience: only the exit can end the wait in time.
    cfg.agent.ready_timeout = std::time::Duration::from_secs(3600);
    // QEMU dies once the host has let go of the agent, while the factory waits for the
    // console line.
    let killer = {
        let b = b.clone();
        tokio::spawn(async move {
            loop {
                let id = b.ids_where(|c| c.saves_template()).pop();
                if let Some(id) = id {
                    if b.agent_of(&id).is_some_and(|a| a.count("disconnect") > 0) {
                        let abort = nix::sys::signal::Signal::SIGABRT as i32;
                        let status = std::process::ExitStatus::from_raw(abort);
                        b.hv(&id).exit(status, "qemu: fatal: boom");
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
    };
    let err = TemplateFactory::new_with(&cfg, b.template_path(), b.clone(), host.clone())
        .await
        .expect_err("the template VM died");
    killer.await.expect("killer");
    assert!(
        matches!(
            err,
            TemplateError::Vm {
                step: TemplateStep::Relisten,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        matches!(err.hypervisor_exit(), Some(vmfactory_vm::HypervisorError::Exited { stderr_tail, .. })
            if stderr_tail == "qemu: fatal: boom"),
        "{err:?}"
    );
    assert_eq!(host.depth(&b.template_path()), 0);
    assert!(!b.template_path().exists());
    assert_eq!(b.live().await, 0);
    assert_eq!(b.vm_dir_count(), 0);
}

#[tokio::test]
async fn destroy_takes_off_stacked_mounts() {
    let b = Arc::new(FakeBackends::new());
    let host = FakeHost::default();
    let path = b.template_path();
    std::fs::create_dir(&path).expect("dir");
    // As left behind by Kata's stacking `init`, in a directory vmfactory made.
    host.mounts.lock().expect("lock").insert(path.clone(), 3);
    for f in crate::testing::template_files(&path) {
        std::fs::write(f, b"x").expect("file");
    }
    // Not provably vmfactory's: nothing is touched.
    assert!(matches!(
        TemplateFactory::destroy(&path, &host).await,
        Err(TemplateError::NotOurs { .. })
    ));
    assert_eq!(host.depth(&path), 3);
    assert!(crate::testing::template_files(&path)
        .iter()
        .all(|f| f.exists()));
    Marker::new(true, true).write(&path).await.expect("marker");
    TemplateFactory::destroy(&path, &host)
        .await
        .expect("destroy");
    assert_eq!(host.depth(&path), 0);
    assert!(!path.exists());
    TemplateFactory::destroy(&path, &host)
        .await
        .expect("idempotent");
}
