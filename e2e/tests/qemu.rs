//! The QEMU backend on real QEMU: boot, pause/resume, CPU and memory hotplug, templates and
//! clones, and stop leaving nothing behind.

use std::time::Duration;

use vmfactory_agent::Agent;
use vmfactory_e2e::vm::{self, TestVm};
use vmfactory_e2e::{guest_env, RunRoot};
use vmfactory_hypervisor::{Hypervisor, VmStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_pause_resume_stop() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (t, boot) = TestVm::boot(root.path(), "vm", vm::config(&env))
        .await
        .unwrap();
    eprintln!("cold boot to agent Check: {boot:?}");
    assert!(t.vm.pid().is_some());
    assert_eq!(t.vm.status().await.unwrap(), VmStatus::Running);
    t.vm.pause().await.unwrap();
    assert_eq!(t.vm.status().await.unwrap(), VmStatus::Paused);
    t.vm.resume().await.unwrap();
    assert_eq!(t.vm.status().await.unwrap(), VmStatus::Running);
    t.wait_ready().await.unwrap();
    t.assert_healthy_console();
    let vm = t.vm.clone();
    t.stop().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Stopped);
    vm.stop().await.expect("stop is idempotent");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_hotplug_are_onlined() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (t, _) = TestVm::boot(root.path(), "vm", vm::config(&env))
        .await
        .unwrap();
    let before = t.agent.resources().await.unwrap();
    assert_eq!(before.online_cpu_count(), 1);

    assert_eq!(t.vm.add_vcpus(1).await.unwrap(), 1);
    assert_eq!(t.vm.add_memory(256).await.unwrap(), 256);
    t.agent.online_cpu_mem(true, 1, false).await.unwrap();
    let after = t.agent.resources().await.unwrap();
    assert_eq!(after.online_cpu_count(), 2, "{after:?}");
    assert_eq!(after.offline_memory_blocks, 0, "{after:?}");
    let grown_kib = after.mem_total_kb - before.mem_total_kb;
    assert!(
        grown_kib >= 255 * 1024,
        "MemTotal grew by {grown_kib} KiB only"
    );

    // A second vCPU, then keep the guest busy on both for a while: the watchdog must stay quiet.
    assert_eq!(t.vm.add_vcpus(1).await.unwrap(), 1);
    t.agent.online_cpu_mem(true, 1, true).await.unwrap();
    assert_eq!(t.agent.resources().await.unwrap().online_cpu_count(), 3);
    for _ in 0..50 {
        t.agent.random(4096).await.unwrap();
        t.agent.resources().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.assert_healthy_console();
    t.stop().await.unwrap();
    root.assert_no_leaks();
}

/// A configured CPU model reaches QEMU, and vCPU hotplug still works: QEMU refuses a CPU of
/// another type than `-cpu`'s, so this passes only because hotplug plugs the type
/// `query-hotpluggable-cpus` reports (`max-x86_64-cpu` here, not the default's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_cpu_model_boots_and_hotplugs() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut cfg = vm::config(&env);
    cfg.cpu_model = Some("max".into());
    let (t, boot) = TestVm::boot(root.path(), "vm", cfg).await.unwrap();
    eprintln!("cold boot with -cpu max to agent Check: {boot:?}");
    let pid = t.vm.pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.windows(9).any(|w| w == b"-cpu\0max\0"),
        "{}",
        String::from_utf8_lossy(&cmdline)
    );
    assert_eq!(t.vm.add_vcpus(1).await.unwrap(), 1);
    t.agent.online_cpu_mem(true, 1, false).await.unwrap();
    let res = t.agent.resources().await.unwrap();
    assert_eq!(res.online_cpu_count(), 2, "{res:?}");
    assert_eq!(t.vm.size().await.unwrap().vcpus, 2);
    t.assert_healthy_console();
    t.stop().await.unwrap();
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_save_and_two_clones() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (tpl_dir, tpl) = vm::template_in(&env, root.path());
    let made = vm::make_template(root.path(), tpl.clone()).await.unwrap();
    eprintln!("template made in {made:?}");
    assert!(tpl_dir.join("state").metadata().unwrap().len() > 0);

    let mut clones = Vec::new();
    for id in ["clone-a", "clone-b"] {
        let t0 = std::time::Instant::now();
        let c = TestVm::start(root.path(), id, vm::clone_config(&tpl))
            .await
            .unwrap();
        assert_eq!(c.vm.status().await.unwrap(), VmStatus::Paused);
        c.vm.resume().await.unwrap();
        c.wait_ready().await.unwrap();
        eprintln!("{id}: clone to agent Check: {:?}", t0.elapsed());
        clones.push(c);
    }
    assert_ne!(clones[0].vm.pid(), clones[1].vm.pid());
    // The clones run independently: pausing one leaves the other serving.
    clones[0].vm.pause().await.unwrap();
    clones[1].wait_ready().await.unwrap();
    clones[0].vm.resume().await.unwrap();
    for c in &clones {
        assert_eq!(c.agent.resources().await.unwrap().online_cpu_count(), 1);
        c.assert_healthy_console();
    }
    for c in clones {
        c.stop().await.unwrap();
    }
    std::fs::remove_dir_all(&tpl_dir).unwrap();
    root.assert_no_leaks();
}

/// The `get_vm` path: a clone is resumed, grown by hotplug and onlined; its guest must stay
/// healthy (no soft lockup) while it works on both vCPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_grows_by_hotplug_and_stays_healthy() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (tpl_dir, tpl) = vm::template_in(&env, root.path());
    vm::make_template(root.path(), tpl.clone()).await.unwrap();
    let (c, _, _) = vm::boot_clone(root.path(), "clone", &tpl).await.unwrap();
    let before = c.agent.resources().await.unwrap();
    assert_eq!(c.vm.add_vcpus(1).await.unwrap(), 1);
    assert_eq!(c.vm.add_memory(256).await.unwrap(), 256);
    c.agent.online_cpu_mem(true, 1, false).await.unwrap();
    let after = c.agent.resources().await.unwrap();
    assert_eq!(after.online_cpu_count(), 2, "{after:?}");
    assert!(
        after.mem_total_kb >= before.mem_total_kb + 255 * 1024,
        "{before:?} -> {after:?}"
    );
    for _ in 0..50 {
        c.agent.random(4096).await.unwrap();
        c.agent.resources().await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.assert_healthy_console();
    c.stop().await.unwrap();
    std::fs::remove_dir_all(&tpl_dir).unwrap();
    root.assert_no_leaks();
}
