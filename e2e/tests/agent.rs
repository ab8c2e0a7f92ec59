//! The agent channel on real QEMU: virtio-serial (with reconnects) and hybrid vsock, and the
//! calls that change the guest (reseed, date/time, onlining).

use std::time::{Duration, Instant, SystemTime};

use vmfactory_agent::{Agent, HealthStatus, KataAgent};
use vmfactory_e2e::vm::{self, TestVm, LISTENING_LINE};
use vmfactory_e2e::{guest_env, guest_env_with_vsock_backend, RunRoot};
use vmfactory_hypervisor::{AgentEndpoint, Hypervisor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_check_survives_three_reconnects() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (t, boot) = TestVm::boot(root.path(), "vm", vm::config(&env))
        .await
        .unwrap();
    eprintln!("virtio-serial: Check answered {boot:?} after QEMU start");
    // Every host hang-up makes the guest re-listen once. Count before each hang-up: the
    // re-listen line of a hang-up may be printed before the next round starts.
    let mut listening = t.console_count(LISTENING_LINE);
    t.agent.disconnect().await.unwrap();
    for round in 1..=3 {
        listening += 1;
        t.wait_console(LISTENING_LINE, listening).await.unwrap();
        // A fresh client, as another process would dial.
        let fresh = KataAgent::with_config(t.agent.url().clone(), t.agent.config());
        let t0 = Instant::now();
        assert_eq!(fresh.check().await.unwrap(), HealthStatus::Serving);
        eprintln!("reconnect {round}: Check answered in {:?}", t0.elapsed());
        fresh.disconnect().await.unwrap();
    }
    assert_eq!(t.agent.check().await.unwrap(), HealthStatus::Serving);
    let version = t.agent.version().await.unwrap();
    assert_eq!(version.agent_version, vmfactory_agent::VERSION);
    t.stop().await.unwrap();
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_vsock_serves_check_and_diagnostics() {
    let Some(env) = guest_env_with_vsock_backend() else {
        return;
    };
    let root = RunRoot::new();
    let backend = env.vhost_device_vsock.clone().unwrap();
    let cfg = vm::hybrid_vsock_config(vm::config(&env), backend);
    let (t, boot) = TestVm::boot(root.path(), "vm", cfg).await.unwrap();
    assert!(
        matches!(
            t.vm.agent_endpoint(),
            Some(AgentEndpoint::HybridVsock { .. })
        ),
        "{:?}",
        t.vm.agent_endpoint()
    );
    eprintln!("hybrid vsock: Check answered {boot:?} after QEMU start");
    let resources = t.agent.resources().await.unwrap();
    assert_eq!(resources.online_cpu_count(), 1);
    assert!(resources.mem_total_kb > 100 * 1024);
    assert_eq!(t.agent.random(64).await.unwrap().len(), 64);
    assert!(t.agent.uptime().await.unwrap().system > Duration::ZERO);
    let details = t.agent.get_guest_details().await.unwrap();
    assert!(
        details.mem_block_size_bytes.is_power_of_two(),
        "{details:?}"
    );
    t.stop().await.unwrap();
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_guest_date_time_moves_the_clock() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (t, _) = TestVm::boot(root.path(), "vm", vm::config(&env))
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    let target = SystemTime::now() + day;
    t.agent.set_guest_date_time(target).await.unwrap();
    let guest = t.agent.guest_time().await.unwrap();
    let skew = guest.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        skew > day - Duration::from_secs(5) && skew < day + Duration::from_secs(5),
        "{skew:?}"
    );
    t.agent
        .set_guest_date_time(SystemTime::now())
        .await
        .unwrap();
    let guest = t.agent.guest_time().await.unwrap();
    let skew = match guest.duration_since(SystemTime::now()) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(
        skew < Duration::from_secs(1),
        "guest clock off by {skew:?} after sync"
    );
    t.stop().await.unwrap();
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseed_makes_clones_diverge() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let (tpl_dir, tpl) = vm::template_in(&env, root.path());
    vm::make_template(root.path(), tpl.clone()).await.unwrap();
    let mut clones = Vec::new();
    for id in ["a", "b"] {
        let c = TestVm::start(root.path(), id, vm::clone_config(&tpl))
            .await
            .unwrap();
        c.vm.resume().await.unwrap();
        c.wait_ready().await.unwrap();
        clones.push(c);
    }
    // Clones start from one RNG state; print whether it shows (it is what reseeding is for).
    let before = [
        clones[0].agent.random(32).await.unwrap(),
        clones[1].agent.random(32).await.unwrap(),
    ];
    eprintln!(
        "clone randomness identical before reseed: {}",
        before[0] == before[1]
    );
    for (i, c) in clones.iter().enumerate() {
        let seed: Vec<u8> = (0..512).map(|b| (b as u8) ^ (i as u8 * 0x5a)).collect();
        c.agent.reseed_random_dev(&seed).await.unwrap();
    }
    let after = [
        clones[0].agent.random(32).await.unwrap(),
        clones[1].agent.random(32).await.unwrap(),
    ];
    assert_ne!(after[0], after[1]);
    assert_ne!(after[0], before[0]);
    for c in clones {
        c.stop().await.unwrap();
    }
    std::fs::remove_dir_all(&tpl_dir).unwrap();
    root.assert_no_leaks();
}
