//! The `vmfactory-factory` crate on real QEMU: a template factory (tmpfs under the run root)
//! handing out clones through `get_vm` with RNG reseed, time sync and hotplug verified inside
//! the guest; the template and its clones pinned to the accelerator and CPU model `auto`
//! resolved to; `fetch` refusing a template made for another memory size; a cache of 2 over a
//! template handing out 3 VMs; `close` leaving no process, mount or directory.

use std::time::{Duration, Instant};

use vmfactory_agent::HealthStatus;
use vmfactory_e2e::{guest_env, mounts_under, vm, GuestEnv, RunRoot};
use vmfactory_factory::{
    BaseKind, Factory, FactoryConfig, TemplateError, TemplateFactory, TemplateMetadata,
};
use vmfactory_hypervisor::{resolve_accel, VmStatus};
use vmfactory_vm::Vm;

/// The command line of process `pid`, one argument per item.
fn qemu_cmdline(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU runs");
    raw.split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn factory_config(env: &GuestEnv, root: &RunRoot) -> FactoryConfig {
    vm::template_factory_config(env, root.path())
}

async fn clock_skew(v: &Vm) -> Duration {
    vm::clock_skew(v).await.expect("guest time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_get_vm_reseed_time_hotplug_fetch_and_close() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let cfg = factory_config(&env, &root);

    let t0 = Instant::now();
    let factory = Factory::new(&cfg).await.unwrap();
    eprintln!("template factory created in {:?}", t0.elapsed());
    assert_eq!(factory.kind(), BaseKind::Template, "no fallback to direct");
    let tpl_path = cfg.template_path.to_string_lossy().into_owned();
    assert_eq!(
        mounts_under(&tpl_path).len(),
        1,
        "one tmpfs at the template path"
    );

    // The template records what `auto` resolved to (this process's answer), and the CPU
    // model that implies; its clones' QEMU runs with both.
    let accel = resolve_accel(&cfg.vm.hypervisor).await;
    let cpu = cfg.vm.hypervisor.cpu_model_for(accel).map(str::to_owned);
    let meta = TemplateMetadata::load(&cfg.template_path).await.unwrap();
    assert_eq!((meta.key.accel, &meta.key.cpu_model), (accel, &cpu));
    eprintln!("template pinned to {accel}, cpu model {cpu:?}");

    // Two clones: different randomness after the reseed, clocks set.
    let mut vms = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        let v = factory.get_vm(&cfg.vm).await.unwrap();
        eprintln!("get_vm (template clone) to ready: {:?}", t.elapsed());
        assert_eq!(v.agent().check().await.unwrap(), HealthStatus::Serving);
        assert_eq!(v.status().await.unwrap().state, VmStatus::Running);
        let pid = v.hypervisor().pid().unwrap();
        let args = qemu_cmdline(pid);
        let after = |flag: &str| {
            let at = args.iter().position(|a| a == flag)?;
            args.get(at + 1).cloned()
        };
        assert_eq!(after("-accel").as_deref(), Some(accel.as_str()), "{args:?}");
        assert_eq!(after("-cpu"), cpu, "{args:?}");
        vms.push(v);
    }
    let r0 = vms[0].agent().random(32).await.unwrap();
    let r1 = vms[1].agent().random(32).await.unwrap();
    assert_eq!(r0.len(), 32);
    assert_ne!(r0, r1, "clones must not share RNG output after the reseed");
    for v in &vms {
        let skew = clock_skew(v).await;
        assert!(skew < Duration::from_secs(1), "guest clock off by {skew:?}");
    }

    // 2 vCPUs and +256 MiB over the 1-vCPU / 256 MiB base.
    let mut big = cfg.vm.clone();
    big.hypervisor.vcpus = 2;
    big.hypervisor.memory_mib = 512;
    let t = Instant::now();
    let v = factory.get_vm(&big).await.unwrap();
    eprintln!(
        "get_vm (clone + 1 vCPU + 256 MiB) to ready: {:?}",
        t.elapsed()
    );
    let res = v.agent().resources().await.unwrap();
    assert_eq!(res.online_cpu_count(), 2, "{res:?}");
    assert!(res.offline_cpus.is_empty(), "{res:?}");
    assert!(res.mem_total_kb > 400 * 1024, "{res:?}");
    let st = v.status().await.unwrap();
    assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (2, 512, 0));
    let size = v.hypervisor().size().await.unwrap();
    assert_eq!((size.vcpus, size.memory_mib), (2, 512));
    vms.push(v);

    // A template made for 256 MiB refuses a 512 MiB config, naming the field.
    match TemplateFactory::fetch(&big, &cfg.template_path).await {
        Err(TemplateError::Mismatch {
            field,
            template,
            config,
        }) => {
            assert_eq!(
                (field.as_str(), template.as_str(), config.as_str()),
                ("memory_mib", "256", "512")
            );
        }
        other => panic!("expected a memory_mib mismatch, got {other:?}"),
    }
    // The matching config fetches it.
    TemplateFactory::fetch(&cfg.vm, &cfg.template_path)
        .await
        .unwrap();

    for v in &vms {
        let console = std::fs::read_to_string(v.hypervisor().console_log_path()).unwrap();
        for bad in vm::KERNEL_TROUBLE {
            assert!(
                !console.contains(bad),
                "guest console shows {bad:?}:\n{console}"
            );
        }
        v.stop().await.unwrap();
    }
    factory.close().await.unwrap();
    factory.close().await.expect("close is idempotent");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_of_two_over_a_template_hands_out_three() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut cfg = factory_config(&env, &root);
    cfg.cache = 2;
    let factory = Factory::new(&cfg).await.unwrap();
    assert_eq!(
        (factory.kind(), factory.is_cached()),
        (BaseKind::Template, true)
    );
    let deadline = Instant::now() + vmfactory_e2e::scaled(Duration::from_secs(60));
    while factory.status().await.len() < 2 {
        assert!(Instant::now() < deadline, "the cache never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Cached clones are kept ready: resumed, their agent answering.
    let cached = factory.status().await;
    assert!(
        cached.iter().all(|i| i.state == VmStatus::Running),
        "{cached:?}"
    );

    let mut vms = Vec::new();
    for i in 0..3 {
        let t = Instant::now();
        let v = factory.get_vm(&cfg.vm).await.unwrap();
        eprintln!("cache get_vm #{i} to ready: {:?}", t.elapsed());
        assert_eq!(v.agent().check().await.unwrap(), HealthStatus::Serving);
        vms.push(v);
    }
    let ids: std::collections::HashSet<&str> = vms.iter().map(Vm::id).collect();
    assert_eq!(ids.len(), 3);
    for v in &vms {
        v.stop().await.unwrap();
    }
    // Close while workers may still be refilling: nothing may leak.
    factory.close().await.unwrap();
    root.assert_no_leaks();
}
