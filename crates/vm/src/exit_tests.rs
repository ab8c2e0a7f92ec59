//! A VM whose hypervisor dies ends every wait of this crate at once, with the exit.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use vmfactory_hypervisor::{Error as HypervisorError, TemplatePaths, TemplateRole};

use crate::error::Error;
use crate::exit::watched;
use crate::fake::FakeBackends;
use crate::vm::Vm;

/// Kills the harness's VM (as SIGKILL would, QEMU having written `qemu: boom`) once its
/// agent has been called `method`: run beside the call, the VM dies during that wait.
async fn kill_during(h: &FakeBackends, method: &str) {
    while !(h.hv_created() && h.agent_calls(method) > 0) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    h.last_hv().exit(ExitStatus::from_raw(9), "qemu: boom");
}

async fn new_vm(h: &FakeBackends) -> Vm {
    Vm::new_with(h.config(), h).await.expect("a VM")
}

/// Asserts that `err` is the fake QEMU's exit during `op`.
fn assert_exit(err: &Error, op: &str) {
    assert!(
        matches!(err, Error::HypervisorExited { op: o, .. } if *o == op),
        "{err:?}"
    );
    assert!(
        matches!(err.hypervisor_exit(), Some(HypervisorError::Exited { status: Some(s), stderr_tail, .. })
            if s.signal() == Some(9) && stderr_tail == "qemu: boom"),
        "{err:?}"
    );
    assert!(err.to_string().contains(op), "{err}");
}

#[tokio::test]
async fn each_agent_call_ends_when_the_vm_dies_under_it() {
    let cases: [(&str, &str); 3] = [
        ("reseed_random_dev", "reseed_random_dev"),
        ("set_guest_date_time", "set_guest_date_time"),
        ("online_cpu_mem", "online_cpu_mem"),
    ];
    for (method, op) in cases {
        let h = FakeBackends::new();
        let vm = new_vm(&h).await;
        h.last_agent().hang(method);
        let t0 = std::time::Instant::now();
        let call = async {
            match method {
                "reseed_random_dev" => vm.reseed_rng().await,
                "set_guest_date_time" => vm.sync_time().await,
                _ => vm.online_cpu_memory().await,
            }
        };
        let (res, ()) = tokio::join!(call, kill_during(&h, method));
        let err = res.expect_err("the VM died");
        assert!(t0.elapsed() < Duration::from_secs(5), "{method}");
        assert_exit(&err, op);
        vm.stop().await.expect("stop cleans up");
        h.assert_nothing_left().await;
    }
}

#[tokio::test]
async fn the_agent_wait_of_new_ends_when_the_vm_dies() {
    let h = FakeBackends::new();
    let mut cfg = h.config();
    // Far beyond the test's patience: only the exit can end the wait in time.
    cfg.agent.ready_timeout = Duration::from_secs(3600);
    h.hang_agent_methods(["check"]);
    let (res, ()) = tokio::join!(Vm::new_with(cfg, &h), kill_during(&h, "check"));
    let err = res.expect_err("the VM died");
    assert_exit(&err, "wait for the agent");
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn a_resumed_clone_that_dies_ends_the_next_wait() {
    let h = FakeBackends::new();
    std::fs::write(h.root().join("initrd"), b"i").expect("initrd");
    let mut cfg = h.config();
    cfg.hypervisor.initrd = Some(h.root().join("initrd"));
    cfg.hypervisor.template = Some(TemplateRole::CloneFrom(TemplatePaths {
        memory: h.root().join("memory"),
        state: h.root().join("state"),
    }));
    cfg.agent.ready_timeout = Duration::from_secs(3600);
    let vm = Vm::new_with(cfg, &h).await.expect("clone");
    vm.resume().await.expect("resume");
    // Dead before the wait starts (QEMU exits ~4 ms after resuming a corrupt memory file).
    h.last_hv().exit(ExitStatus::from_raw(9), "qemu: boom");
    h.last_agent().hang("check");
    assert_exit(
        &vm.wait_ready().await.expect_err("dead"),
        "wait for the agent",
    );
    assert_exit(&vm.resume().await.expect_err("dead"), "resume");
    vm.stop().await.expect("stop");
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn a_failure_as_the_vm_dies_is_reported_as_the_exit() {
    let h = FakeBackends::new();
    let vm = new_vm(&h).await;
    let hv = h.last_hv();
    // The call fails (its channel closed) in the same instant QEMU dies, before `exited`
    // has seen the exit: the failure is checked against the hypervisor.
    let failed = async {
        hv.exit(ExitStatus::from_raw(9), "qemu: boom");
        Err::<(), _>(Error::agent(vm.id(), "x", injected()))
    };
    let err = watched(
        vm.id(),
        vm.hypervisor().as_ref(),
        "reseed_random_dev",
        failed,
    )
    .await
    .expect_err("failed");
    assert_exit(&err, "reseed_random_dev");
    vm.stop().await.expect("stop");

    // A plain failure of a live VM stays what it was.
    let h = FakeBackends::new();
    let vm = new_vm(&h).await;
    let failed = async { Err::<(), _>(Error::agent(vm.id(), "x", injected())) };
    let err = watched(vm.id(), vm.hypervisor().as_ref(), "x", failed).await;
    assert!(matches!(err, Err(Error::Agent { .. })), "{err:?}");
    vm.stop().await.expect("stop");
    h.assert_nothing_left().await;
}

fn injected() -> vmfactory_agent::Error {
    vmfactory_agent::Error::Injected { method: "x" }
}

/// A failed agent call on a VM whose QEMU lives but whose monitor hangs (as on a clone of a
/// corrupt template) returns the call's own error after the bounded status check, instead of
/// waiting out QMP's command timeout.
#[tokio::test]
async fn a_hung_monitor_does_not_hold_up_a_failed_call() {
    let h = FakeBackends::new();
    let vm = new_vm(&h).await;
    h.last_agent().fail("reseed_random_dev");
    h.last_hv().hang_status(true);
    let t0 = std::time::Instant::now();
    let err = vm.reseed_rng().await.expect_err("injected");
    assert!(matches!(err, Error::Agent { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    h.last_hv().hang_status(false);
    vm.stop().await.expect("stop");
    h.assert_nothing_left().await;
}
