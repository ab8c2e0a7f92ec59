//! `Vm::new`'s steps, undo and stop, with fakes.

use super::*;
use crate::endpoint::agent_url;
use crate::error::ConfigError;
use crate::fake::FakeBackends;
use vmfactory_agent::FakeCall as AgentCall;
use vmfactory_hypervisor::{FakeCall, FakeStep, TemplatePaths, TemplateRole, VmStatus};

const ALL_STEPS: [NewStep; 11] = [
    NewStep::Validate,
    NewStep::CreateDir,
    NewStep::Lock,
    NewStep::CreateNetwork,
    NewStep::CreateHypervisor,
    NewStep::StartHypervisor,
    NewStep::StartProxy,
    NewStep::CreateAgent,
    NewStep::CheckAgent,
    NewStep::ConfigureNetwork,
    NewStep::SaveState,
];

#[tokio::test]
async fn new_runs_every_step_then_stop_removes_everything() {
    let h = FakeBackends::new();
    let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
    assert_eq!(h.steps(), ALL_STEPS);
    assert_eq!(vm.dir(), h.root().join("vm").join(vm.id()));
    assert_eq!(
        vm.hypervisor().run_dir(),
        vm.dir(),
        "sockets live in the VM dir"
    );
    assert!(vm.dir().join("state.json").is_file());
    assert!(uuid::Uuid::parse_str(vm.id()).is_ok());
    let endpoint = vm.hypervisor().agent_endpoint().expect("endpoint");
    assert_eq!(vm.agent_url(), agent_url(&endpoint));
    assert_eq!(h.agent_urls(), [vm.agent_url()]);
    assert_eq!(h.last_hv().calls(), [FakeCall::Start]);
    assert_eq!(h.last_agent().calls(), [AgentCall::Check]);
    assert!(h.proxy_running());
    let saved: VmState = h.store().load_state(vm.id()).await.expect("state");
    assert_eq!(saved.id, vm.id());
    assert_eq!((saved.vcpus, saved.memory_mib), (1, 256));
    // The storage lock is held.
    assert!(matches!(
        h.store().lock(vm.id()).await,
        Err(vmfactory_persist::Error::Locked { .. })
    ));

    vm.stop().await.expect("stop");
    h.assert_nothing_left().await;
    vm.stop().await.expect("stop is idempotent");
    assert_eq!(
        h.last_hv().calls(),
        [FakeCall::Start, FakeCall::Stop, FakeCall::Status]
    );
}

#[tokio::test]
async fn failing_at_each_step_undoes_the_earlier_ones() {
    for (i, step) in ALL_STEPS.into_iter().enumerate() {
        let h = FakeBackends::new();
        h.abort_at(Some(step));
        let err = Vm::new_with(h.config(), &h).await.expect_err("aborted");
        assert!(
            matches!(err, Error::Aborted { step: s, .. } if s == step),
            "{step:?}: {err:?}"
        );
        assert_eq!(h.steps(), ALL_STEPS[..=i]);
        if i > index_of(NewStep::StartHypervisor) {
            assert_eq!(
                h.last_hv().calls(),
                [FakeCall::Start, FakeCall::Stop],
                "{step:?}"
            );
        }
        h.assert_nothing_left().await;
    }
}

fn index_of(step: NewStep) -> usize {
    ALL_STEPS.iter().position(|s| *s == step).expect("a step")
}

#[tokio::test]
async fn invalid_config_creates_nothing() {
    let h = FakeBackends::new();
    let mut cfg = h.config();
    cfg.hypervisor.vcpus = 0;
    assert!(matches!(
        Vm::new_with(cfg, &h).await,
        Err(Error::Config(ConfigError::Hypervisor(_)))
    ));
    let mut cfg = h.config();
    cfg.hypervisor.kernel = h.root().join("no-kernel");
    assert!(matches!(
        Vm::new_with(cfg, &h).await,
        Err(Error::Config(ConfigError::Hypervisor(
            vmfactory_hypervisor::ConfigError::KernelUnreadable { .. }
        )))
    ));
    assert!(!h.hv_created());
    assert!(!h.root().join("vm").exists());
}

#[tokio::test]
async fn storage_failure_creates_nothing() {
    let h = FakeBackends::new();
    let mut cfg = h.config();
    cfg.run_root = h.root().join("kernel"); // a file: no directory can go under it
    assert!(matches!(
        Vm::new_with(cfg, &h).await,
        Err(Error::Storage { op: "create", .. })
    ));
    assert!(!h.hv_created());
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn hypervisor_create_and_start_failures() {
    let h = FakeBackends::new();
    h.fail_hv_create(true);
    assert!(matches!(
        Vm::new_with(h.config(), &h).await,
        Err(Error::Hypervisor { op: "create", .. })
    ));
    h.assert_nothing_left().await;

    let h = FakeBackends::new();
    h.fail_hv_at(Some(FakeStep::Start));
    assert!(matches!(
        Vm::new_with(h.config(), &h).await,
        Err(Error::Hypervisor { op: "start", .. })
    ));
    assert_eq!(h.last_hv().calls(), [FakeCall::Start, FakeCall::Stop]);
    assert_eq!(h.proxy_starts(), 0);
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn proxy_and_agent_failures() {
    let h = FakeBackends::new();
    h.fail_proxy_start(true);
    assert!(matches!(
        Vm::new_with(h.config(), &h).await,
        Err(Error::Proxy { .. })
    ));
    assert_eq!(h.last_hv().calls(), [FakeCall::Start, FakeCall::Stop]);
    h.assert_nothing_left().await;

    let h = FakeBackends::new();
    h.fail_agent_create(true);
    assert!(matches!(
        Vm::new_with(h.config(), &h).await,
        Err(Error::Agent { op: "create", .. })
    ));
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn agent_never_ready() {
    let h = FakeBackends::new();
    h.fail_agent_methods(["check"]);
    let t0 = std::time::Instant::now();
    let err = Vm::new_with(h.config(), &h).await.expect_err("not ready");
    assert!(
        matches!(err, Error::AgentNotReady { last: Some(_), .. }),
        "{err:?}"
    );
    assert!(t0.elapsed() >= Duration::from_millis(100));
    assert!(h.last_agent().count("check") > 1, "check is retried");
    assert_eq!(h.last_agent().calls().last(), Some(&AgentCall::Disconnect));
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn a_vm_that_fails_to_come_up_reports_its_console_and_keeps_its_log() {
    let h = FakeBackends::new();
    h.fail_agent_methods(["check"]);
    let boot: Vec<String> = (1..=25).map(|i| format!("boot line {i}")).collect();
    h.set_console(boot.clone());
    let err = Vm::new_with(h.config(), &h).await.expect_err("not ready");
    let Error::NotUp { id, .. } = &err else {
        panic!("expected NotUp, got {err:?}");
    };
    assert!(
        matches!(err.failure(), Error::AgentNotReady { .. }),
        "{err:?}"
    );
    let pm = err.postmortem().expect("a post-mortem");
    assert_eq!(pm.console_tail, boot[5..], "the last 20 lines");
    let kept = h.root().join("failed").join(id).join("console.log");
    assert_eq!(pm.console_log.as_deref(), Some(kept.as_path()));
    assert_eq!(
        std::fs::read_to_string(&kept).expect("kept log"),
        boot.join("\n") + "\n"
    );
    // One line: the failure, the last three console lines and where the log is.
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("\"boot line 23\" | \"boot line 24\" | \"boot line 25\"")
            && !text.contains("boot line 22")
            && text.contains(&kept.display().to_string()),
        "{text}"
    );
    assert!(err.hypervisor_exit().is_none());
    h.assert_nothing_left().await;

    // With nothing to show (no console output, no log), the failure comes as it is.
    let h = FakeBackends::new();
    h.fail_agent_methods(["check"]);
    let err = Vm::new_with(h.config(), &h).await.expect_err("not ready");
    assert!(matches!(err, Error::AgentNotReady { .. }), "{err:?}");
    assert!(!h.root().join("failed").exists());
}

#[tokio::test]
async fn paused_clone_skips_the_agent_check() {
    let h = FakeBackends::new();
    std::fs::write(h.root().join("initrd"), b"i").expect("initrd");
    let mut cfg = h.config();
    cfg.hypervisor.initrd = Some(h.root().join("initrd"));
    cfg.hypervisor.template = Some(TemplateRole::CloneFrom(TemplatePaths {
        memory: h.root().join("memory"),
        state: h.root().join("state"),
    }));
    h.fail_agent_methods(["check"]);
    let vm = Vm::new_with(cfg, &h).await.expect("clone");
    assert_eq!(h.last_agent().count("check"), 0);
    assert_eq!(vm.status().await.expect("s").state, VmStatus::Paused);
    vm.resume().await.expect("resume");
    vm.stop().await.expect("stop");
    h.assert_nothing_left().await;
}

#[tokio::test]
async fn undo_goes_on_when_a_cleanup_step_fails() {
    let h = FakeBackends::new();
    h.fail_hv_at(Some(FakeStep::Stop));
    h.abort_at(Some(NewStep::SaveState));
    assert!(Vm::new_with(h.config(), &h).await.is_err());
    assert!(h.vm_dirs().is_empty(), "directory removed anyway");
    assert!(!h.proxy_running());
}

#[tokio::test]
async fn failed_hypervisor_stop_keeps_storage_for_a_retry() {
    let h = FakeBackends::new();
    let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
    h.last_hv().fail_at(Some(FakeStep::Stop));
    assert!(matches!(
        vm.stop().await,
        Err(Error::Hypervisor { op: "stop", .. })
    ));
    assert!(vm.dir().is_dir());
    h.last_hv().fail_at(None);
    vm.stop().await.expect("retry");
    h.assert_nothing_left().await;
}
