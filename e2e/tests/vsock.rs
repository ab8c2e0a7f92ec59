//! vhost-vsock on real QEMU, with a guest CID the kernel reserves per VM: a direct VM handed
//! over between handles, a template saved on vsock and its clones each on a CID of its own
//! (also 8 at once), and every CID free again once its QEMU is gone.
//!
//! Needs `/dev/vhost-vsock` (the `vhost_vsock` module): skipped without it, unless
//! `VMFACTORY_E2E_REQUIRE_VSOCK=1` (the nested KVM host sets it).

use std::collections::HashSet;
use std::sync::Arc;

use vmfactory_agent::HealthStatus;
use vmfactory_e2e::{guest_env_with_vhost_vsock, vm, GuestEnv, RunRoot};
use vmfactory_factory::{BaseKind, Factory, FactoryConfig};
use vmfactory_hypervisor::{CidReservation, VsockError};
use vmfactory_vm::{AgentUrl, Vm, VmConfig, VmState, VmStatus};

/// The CID a VM's agent is reached at.
fn cid(v: &Vm) -> u32 {
    match v.agent_url() {
        AgentUrl::Vsock { cid, port: 1024 } => cid,
        other => panic!("VM {} is not on vsock: {other}", v.id()),
    }
}

/// Whether the kernel holds `cid` for some VM (pinning it fails as in use).
fn held(cid: u32) -> bool {
    match CidReservation::pin(cid) {
        Ok(_) => false,
        Err(VsockError::CidInUse { .. }) => true,
        Err(e) => panic!("pinning CID {cid}: {e}"),
    }
}

fn vsock_factory_config(env: &GuestEnv, root: &RunRoot) -> FactoryConfig {
    let mut cfg = vm::template_factory_config(env, root.path());
    cfg.vm.hypervisor = vm::vsock_config(cfg.vm.hypervisor);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_vm_answers_on_its_cid_across_a_handover_and_frees_it_on_stop() {
    let Some(env) = guest_env_with_vhost_vsock() else {
        return;
    };
    let root = RunRoot::new();
    let mut cfg = VmConfig::new(vm::vsock_config(vm::config(&env)));
    cfg.run_root = root.path().to_owned();
    let v1 = Vm::new(cfg).await.unwrap();
    assert_eq!(v1.agent().check().await.unwrap(), HealthStatus::Serving);
    let c = cid(&v1);
    assert!(held(c), "QEMU holds CID {c}");

    // The wire form records the CID; the second handle reaches the agent there.
    let wire = v1.detach().await.unwrap();
    let state = VmState::from_wire(&wire).unwrap();
    assert_eq!(state.hypervisor.vsock_cid, Some(c));
    let v2 = Vm::from_wire(&wire).await.unwrap();
    assert_eq!(cid(&v2), c);
    assert_eq!(v2.agent().check().await.unwrap(), HealthStatus::Serving);
    assert!(held(c), "still held after the handover");

    v2.stop().await.unwrap();
    assert!(!held(c), "CID {c} is free once QEMU is gone");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_reaped_frees_its_cid() {
    let Some(env) = guest_env_with_vhost_vsock() else {
        return;
    };
    let root = RunRoot::new();
    let mut cfg = VmConfig::new(vm::vsock_config(vm::config(&env)));
    cfg.run_root = root.path().to_owned();
    let v = Vm::new(cfg).await.unwrap();
    let c = cid(&v);
    // The owner goes away without stopping it, as a killed factory would: its QEMU keeps the
    // CID until `vmfactory destroy` (reap_orphans) kills it.
    drop(v);
    assert!(held(c));
    let reaped = Vm::reap_orphans(root.path()).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert!(!held(c), "CID {c} is free once the orphan's QEMU is killed");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vsock_template_and_two_clones_on_their_own_cids() {
    let Some(env) = guest_env_with_vhost_vsock() else {
        return;
    };
    let root = RunRoot::new();
    let cfg = vsock_factory_config(&env, &root);
    let factory = Factory::new(&cfg).await.unwrap();
    assert_eq!(factory.kind(), BaseKind::Template, "no fallback to direct");

    let mut clones = Vec::new();
    for _ in 0..2 {
        let v = factory.get_vm(&cfg.vm).await.unwrap();
        assert_eq!(v.status().await.unwrap().state, VmStatus::Running);
        // An answer at the new CID: the guest re-read its CID after the transport reset (its
        // replies from the template's CID would be dropped by vhost-vsock).
        assert_eq!(v.agent().check().await.unwrap(), HealthStatus::Serving);
        clones.push(v);
    }
    let cids: Vec<u32> = clones.iter().map(cid).collect();
    assert_ne!(cids[0], cids[1], "each clone has its own CID");
    assert!(cids.iter().all(|c| held(*c)));
    // Different randomness after the reseed: the clones are not one VM reached twice.
    let r0 = clones[0].agent().random(32).await.unwrap();
    let r1 = clones[1].agent().random(32).await.unwrap();
    assert_ne!(r0, r1);
    for v in &clones {
        v.stop().await.unwrap();
    }
    assert!(cids.iter().all(|c| !held(*c)), "{cids:?} free after stop");
    factory.close().await.unwrap();
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_clones_on_distinct_cids() {
    let Some(env) = guest_env_with_vhost_vsock() else {
        return;
    };
    let root = RunRoot::new();
    let cfg = vsock_factory_config(&env, &root);
    let factory = Arc::new(Factory::new(&cfg).await.unwrap());
    assert_eq!(factory.kind(), BaseKind::Template);

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (factory, vm_cfg) = (factory.clone(), cfg.vm.clone());
        tasks.spawn(async move {
            let v = factory.get_vm(&vm_cfg).await?;
            let check = v.agent().check().await;
            anyhow::Ok((v, check))
        });
    }
    let mut vms = Vec::new();
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            Ok((v, Ok(HealthStatus::Serving))) => vms.push(v),
            Ok((v, other)) => {
                failures.push(format!("{} at {}: {other:?}", v.id(), v.agent_url()));
                vms.push(v);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let cids: HashSet<u32> = vms.iter().map(cid).collect();
    for v in &vms {
        v.stop().await.unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(cids.len(), 8, "all CIDs distinct: {cids:?}");
    assert!(cids.iter().all(|c| !held(*c)), "{cids:?} free after stop");
    factory.close().await.unwrap();
    root.assert_no_leaks();
}
