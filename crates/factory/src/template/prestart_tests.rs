//! Pre-started clones with fakes: each handed out once, refilled, replaced when their QEMU
//! dies, dropped when the template changes, stopped by `close`, and every failure of a new
//! step undone.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use vmfactory_hypervisor::{FakeCall, FakeStep, Hypervisor as _};
use vmfactory_vm::{FakeBackends, NewStep};

use super::error::TemplateError;
use super::factory::TemplateFactory;
use super::metadata::MEMORY_FILE;
use crate::base::{BaseError, FactoryBase};
use crate::testing::FakeHost;

async fn factory(b: &Arc<FakeBackends>, want: usize) -> TemplateFactory {
    let host = Arc::new(FakeHost::default());
    let t = TemplateFactory::new_with(&b.config(), b.template_path(), b.clone(), host)
        .await
        .expect("template");
    t.prestart(want).await;
    t
}

/// Waits (at most 5 s) until `n` pre-started clones wait.
async fn until_waiting(t: &TemplateFactory, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while t.prestarted().waiting != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} waiting, not {n}",
            t.prestarted().waiting
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The ids of the clones made so far (the template VM excluded).
fn clone_ids(b: &FakeBackends) -> Vec<String> {
    b.ids_where(|c| c.clones_template())
}

#[tokio::test]
async fn each_prestarted_clone_is_handed_out_once_and_refilled() {
    let b = Arc::new(FakeBackends::new());
    let t = factory(&b, 2).await;
    until_waiting(&t, 2).await;
    let waiting = clone_ids(&b);
    assert_eq!(waiting.len(), 2);
    let cfg = b.config();
    let (a, c) = tokio::join!(t.get_base_vm(&cfg), t.get_base_vm(&cfg));
    let (a, c) = (a.expect("first"), c.expect("second"));
    assert_ne!(a.id(), c.id(), "one process per clone");
    for vm in [&a, &c] {
        assert!(waiting.contains(&vm.id().to_owned()), "a pre-started one");
        assert_eq!(
            b.hv(vm.id()).calls()[..2],
            [FakeCall::Prestart, FakeCall::Start],
            "pre-started, then loaded"
        );
    }
    until_waiting(&t, 2).await;
    assert_eq!(clone_ids(&b).len(), 4, "two new ones wait");
    a.stop().await.expect("stop");
    c.stop().await.expect("stop");
    t.close().await.expect("close");
    assert_eq!(t.prestarted().waiting, 0);
    b.assert_nothing_left().await;
}

#[tokio::test]
async fn a_prestarted_qemu_that_dies_is_replaced_and_never_handed_out() {
    let b = Arc::new(FakeBackends::new());
    let t = factory(&b, 1).await;
    until_waiting(&t, 1).await;
    let dead = clone_ids(&b)[0].clone();
    b.hv(&dead).exit(ExitStatus::from_raw(9), "killed");
    // Its watcher sees the exit; the refill discards it and starts another.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while clone_ids(&b).len() < 2 || t.prestarted().waiting != 1 {
        assert!(tokio::time::Instant::now() < deadline, "not replaced");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let vm = t.get_base_vm(&b.config()).await.expect("clone");
    assert_ne!(vm.id(), dead);
    assert!(!b.root().join("vm").join(&dead).exists(), "its dir is gone");

    // Killed just before a get: whether the watcher or the get's own look sees it first,
    // the get does not hand it out.
    until_waiting(&t, 1).await;
    let doomed = clone_ids(&b).last().cloned().expect("one waits");
    b.hv(&doomed).exit(ExitStatus::from_raw(9), "killed");
    let other = t.get_base_vm(&b.config()).await.expect("a fresh clone");
    assert_ne!(other.id(), doomed);
    vm.stop().await.expect("stop");
    other.stop().await.expect("stop");
    t.close().await.expect("close");
    b.assert_nothing_left().await;
}

#[tokio::test]
async fn a_changed_template_drops_the_waiting_clones() {
    let b = Arc::new(FakeBackends::new());
    let t = factory(&b, 1).await;
    until_waiting(&t, 1).await;
    let memory = b.template_path().join(MEMORY_FILE);
    let bytes = std::fs::read(&memory).expect("memory");
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&memory, &bytes).expect("rewrite");
    let err = t.get_base_vm(&b.config()).await.expect_err("changed");
    assert!(
        matches!(err, BaseError::Template(TemplateError::Modified { .. })),
        "{err:?}"
    );
    assert_eq!(t.prestarted().waiting, 0, "dropped");
    // None is pre-started from the changed files.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(t.prestarted().waiting, 0);
    assert_eq!(b.live().await, 0);
    t.close().await.expect("close");
    b.assert_nothing_left().await;
}

#[tokio::test]
async fn close_stops_a_prestart_in_flight() {
    let b = Arc::new(FakeBackends::new());
    let t = factory(&b, 0).await;
    b.set_boot_delay(Duration::from_millis(300));
    t.prestart(1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!clone_ids(&b).is_empty(), "one is being pre-started");
    t.close().await.expect("close");
    assert_eq!(t.prestarted().waiting, 0);
    b.assert_nothing_left().await;
}

#[tokio::test]
async fn failures_of_the_new_steps_are_undone() {
    // Pre-start failing: the refill retries (backoff), clones come from scratch meanwhile.
    for (hv_fail, abort) in [
        (Some(FakeStep::Prestart), None),
        (None, Some(NewStep::PrestartHypervisor)),
    ] {
        let b = Arc::new(FakeBackends::new());
        let t = factory(&b, 0).await;
        b.fail_hv_at(hv_fail);
        b.abort_at(abort);
        t.prestart(1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(t.prestarted().waiting, 0);
        b.fail_hv_at(None);
        b.abort_at(None);
        let vm = t.get_base_vm(&b.config()).await.expect("a clone anyway");
        vm.stop().await.expect("stop");
        t.close().await.expect("close");
        b.assert_nothing_left().await;
    }
    // The load of a pre-started clone failing: the error, and nothing of it left.
    let b = Arc::new(FakeBackends::new());
    let t = factory(&b, 1).await;
    until_waiting(&t, 1).await;
    let waiting = clone_ids(&b)[0].clone();
    b.hv(&waiting).fail_at(Some(FakeStep::Start));
    let err = t.get_base_vm(&b.config()).await.expect_err("load fails");
    assert!(
        matches!(err, BaseError::Template(TemplateError::Vm { .. })),
        "{err:?}"
    );
    assert!(!b.root().join("vm").join(&waiting).exists());
    assert!(matches!(
        b.hv(&waiting).status().await,
        Ok(vmfactory_hypervisor::VmStatus::Stopped)
    ));
    t.close().await.expect("close");
    b.assert_nothing_left().await;
}
