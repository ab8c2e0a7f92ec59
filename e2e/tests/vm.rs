//! The `vmfactory-vm` crate on real QEMU: `Vm::new` with its storage under the run root,
//! hotplug with bookkeeping and onlining, the wire-form round trip to a second handle, the
//! builtin proxy's console lines, templates and clones through `Vm`, undo of a failed `new`,
//! and `stop` leaving nothing behind.

use std::time::Duration;

use vmfactory_agent::HealthStatus;
use vmfactory_e2e::vm::{self, LISTENING_LINE};
use vmfactory_e2e::{guest_env, GuestEnv, RunRoot};
use vmfactory_hypervisor::{HypervisorConfig, VmStatus};
use vmfactory_proxy::wait_for_line;
use vmfactory_vm::{Error, Vm, VmConfig};

/// Bound on a console line showing up.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

fn vm_config(root: &RunRoot, hv: HypervisorConfig) -> VmConfig {
    let mut cfg = vm::vm_config(hv);
    cfg.run_root = root.path().to_owned();
    cfg
}

fn hotplug_config(env: &GuestEnv, root: &RunRoot) -> VmConfig {
    vm_config(root, vm::config(env))
}

/// Disconnects the agent and waits until the guest agent says, on the console as seen by the
/// builtin proxy, that it listens again.
async fn disconnect_and_see_relisten(v: &Vm) {
    let mut lines = v
        .proxy()
        .subscribe()
        .expect("builtin proxy reads the console");
    v.disconnect().await.expect("disconnect");
    let line = wait_for_line(&mut lines, vmfactory_e2e::scaled(LINE_TIMEOUT), |l| {
        l.contains(LISTENING_LINE)
    })
    .await
    .expect("the guest agent re-listens on the console");
    assert!(line.contains(LISTENING_LINE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_hotplug_wire_round_trip_stop() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let t0 = std::time::Instant::now();
    let vm1 = Vm::new(hotplug_config(&env, &root)).await.unwrap();
    eprintln!("Vm::new to agent Check: {:?}", t0.elapsed());
    assert_eq!(vm1.dir(), root.path().join("vm").join(vm1.id()));
    assert!(vm1.dir().join("state.json").is_file());
    assert!(
        vm1.dir().join("qmp.sock").exists(),
        "sockets live in the VM dir"
    );
    assert_eq!(vm1.agent().check().await.unwrap(), HealthStatus::Serving);

    let before = vm1.agent().resources().await.unwrap();
    assert_eq!(before.online_cpu_count(), 1);
    assert_eq!(vm1.add_cpus(1).await.unwrap(), 1);
    assert_eq!(vm1.add_memory(256).await.unwrap(), 256);
    vm1.online_cpu_memory().await.unwrap();
    let after = vm1.agent().resources().await.unwrap();
    assert_eq!(after.online_cpu_count(), 2, "{after:?}");
    assert!(
        after.mem_total_kb >= before.mem_total_kb + 255 * 1024,
        "{before:?} -> {after:?}"
    );
    let st = vm1.status().await.unwrap();
    assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (2, 512, 0));
    assert_eq!(st.state, VmStatus::Running);
    let pid = st.pid.expect("QEMU pid");

    vm1.reseed_rng().await.unwrap();
    vm1.sync_time().await.unwrap();
    disconnect_and_see_relisten(&vm1).await;

    // Hand over to a second handle.
    let wire = vm1.detach().await.unwrap();
    assert!(matches!(vm1.pause().await, Err(Error::NotOwned { .. })));
    let vm2 = Vm::from_wire(&wire).await.unwrap();
    assert_eq!(vm2.id(), vm1.id());
    let st2 = vm2.status().await.unwrap();
    assert_eq!(st2.pid, Some(pid), "the same QEMU");
    assert_eq!((st2.vcpus, st2.memory_mib), (2, 512));
    assert_eq!(st2.state, VmStatus::Running);
    let res = vm2.agent().resources().await.unwrap();
    assert_eq!(res.online_cpu_count(), 2, "{res:?}");
    assert_eq!(res.mem_total_kb, after.mem_total_kb);
    // The second handle's proxy reads the console too.
    disconnect_and_see_relisten(&vm2).await;
    vm2.pause().await.unwrap();
    assert_eq!(vm2.status().await.unwrap().state, VmStatus::Paused);
    vm2.resume().await.unwrap();
    assert_eq!(vm2.agent().check().await.unwrap(), HealthStatus::Serving);

    let console = std::fs::read_to_string(vm2.hypervisor().console_log_path()).unwrap();
    for bad in vm::KERNEL_TROUBLE {
        assert!(
            !console.contains(bad),
            "guest console shows {bad:?}:\n{console}"
        );
    }
    vm2.stop().await.unwrap();
    vm2.stop().await.expect("stop is idempotent");
    // Gone, or a zombie the detached first handle's runtime has not reaped yet.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
        "QEMU {pid} still runs: {stat}"
    );
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_new_leaves_nothing() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    // QEMU starts, but the guest cannot answer within 1 ms: `new` must kill it and clean up.
    let mut cfg = hotplug_config(&env, &root);
    cfg.agent.ready_timeout = Duration::from_millis(1);
    let err = Vm::new(cfg).await.expect_err("not ready in 1 ms");
    assert!(
        matches!(err.failure(), Error::AgentNotReady { .. }),
        "{err:?}"
    );
    root.assert_no_leaks();

    // QEMU itself fails to start (a missing binary).
    let mut cfg = hotplug_config(&env, &root);
    cfg.hypervisor.qemu_path = root.path().join("no-such-qemu");
    assert!(matches!(
        Vm::new(cfg).await,
        Err(Error::Hypervisor { op: "start", .. })
    ));
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_and_clone_through_vm() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (tpl_dir, tpl) = vm::template_in(&env, root.path());

    let template = Vm::new(vm_config(&root, tpl.clone())).await.unwrap();
    // The guest agent re-listens once the host lets go: only then is the state clean to save.
    disconnect_and_see_relisten(&template).await;
    template.save().await.unwrap();
    template.stop().await.unwrap();

    let t0 = std::time::Instant::now();
    let clone = Vm::new(vm_config(&root, vm::clone_config(&tpl)))
        .await
        .unwrap();
    assert_eq!(clone.status().await.unwrap().state, VmStatus::Paused);
    clone.resume().await.unwrap();
    assert_eq!(clone.agent().check().await.unwrap(), HealthStatus::Serving);
    eprintln!("clone through Vm::new to agent Check: {:?}", t0.elapsed());
    clone.reseed_rng().await.unwrap();
    clone.sync_time().await.unwrap();
    assert_eq!(clone.add_cpus(1).await.unwrap(), 1);
    clone.online_cpu_memory().await.unwrap();
    assert_eq!(
        clone.agent().resources().await.unwrap().online_cpu_count(),
        2
    );
    clone.stop().await.unwrap();
    std::fs::remove_dir_all(&tpl_dir).unwrap();
    root.assert_no_leaks();
}
