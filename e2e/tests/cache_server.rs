//! The VM-cache server on real QEMU: a server whose base is a cache over a template factory
//! serves concurrent clients (each a `Factory` with `cache_endpoint`) distinct VMs, which they
//! re-attach to, resume and find answering; none is handed out twice; `Status` lists the rest;
//! `Quit` stops the server and leaves no process, mount or socket. Issue 5 asks for 8 clients
//! over a pool of 4; the load scenario (issue 7) for 16 at once, most of them cache misses.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmfactory_agent::HealthStatus;
use vmfactory_e2e::{guest_env, vm, RunRoot};
use vmfactory_factory::{
    BaseKind, CacheClient, CacheFactory, CacheServer, Factory, FactoryBase, FactoryConfig,
    TemplateFactory,
};
use vmfactory_hypervisor::VmStatus;

/// Bound on the pool filling up (clones are ready in ~0.2 s each under TCG).
const FILL_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls the server's `Status` until it lists `n` VMs.
async fn wait_for_pool(client: &CacheClient, n: usize) -> Vec<vmfactory_vm::VmInfo> {
    let deadline = Instant::now() + vmfactory_e2e::scaled(FILL_TIMEOUT);
    loop {
        let st = client.server_status().await.expect("Status");
        if st.vms.len() >= n {
            return st.vms;
        }
        assert!(
            Instant::now() < deadline,
            "pool has {} of {n} VMs after {FILL_TIMEOUT:?}",
            st.vms.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_backed_server_serves_concurrent_clients_and_quits_clean() {
    serve_concurrent_clients(4, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_get_vm_through_the_server() {
    serve_concurrent_clients(2, 16).await;
}

/// A server with a pool of `pool` over a template serves `clients` concurrent `get_vm`s.
async fn serve_concurrent_clients(pool: usize, clients: usize) {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut vm_cfg = vm::vm_config(vm::config(&env));
    vm_cfg.run_root = root.path().to_owned();
    let socket = root.path().join("cache.sock");

    let t0 = Instant::now();
    let template = TemplateFactory::new(&vm_cfg, root.path().join("template"))
        .await
        .expect("template factory");
    eprintln!("template made in {:?}", t0.elapsed());
    let base: Arc<dyn FactoryBase> = Arc::new(CacheFactory::new(
        u32::try_from(pool).expect("pool size"),
        Arc::new(template),
    ));
    let server = CacheServer::start(base, &socket).await.expect("server");

    let admin = CacheClient::connect(&socket).await.expect("admin client");
    assert_eq!(
        admin.server_status().await.expect("Status").pid,
        std::process::id()
    );
    let t = Instant::now();
    wait_for_pool(&admin, pool).await;
    eprintln!("pool of {pool} ready in {:?}", t.elapsed());

    // All clients at once, each its own connection and its own `Factory`.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut cfg = FactoryConfig::new(vm_cfg.clone());
        cfg.cache_endpoint = Some(socket.clone());
        let want = vm_cfg.clone();
        tasks.push(tokio::spawn(async move {
            let factory = Factory::new(&cfg).await.expect("client factory");
            assert_eq!(factory.kind(), BaseKind::CacheClient);
            let v = factory.get_vm(&want).await.expect("get_vm via the server");
            assert_eq!(
                v.agent().check().await.expect("Check"),
                HealthStatus::Serving
            );
            let st = v.status().await.expect("status");
            assert_eq!(st.state, VmStatus::Running);
            factory.close().await.expect("client close");
            (v, st.pid.expect("QEMU pid"))
        }));
    }
    let mut vms = Vec::new();
    for task in tasks {
        vms.push(task.await.expect("client task"));
    }
    eprintln!("{clients} clients served in {:?}", t.elapsed());
    let ids: HashSet<String> = vms.iter().map(|(v, _)| v.id().to_owned()).collect();
    let pids: HashSet<u32> = vms.iter().map(|(_, p)| *p).collect();
    assert_eq!(ids.len(), clients, "distinct VMs");
    assert_eq!(pids.len(), clients, "distinct QEMU processes");

    // The server still holds the rest: a refilled pool, none of them handed out.
    let rest = wait_for_pool(&admin, pool).await;
    assert_eq!(rest.len(), pool);
    for info in &rest {
        assert!(!ids.contains(&info.id), "{} was handed out", info.id);
        let pid = info.pid.expect("cached VM pid");
        assert!(!pids.contains(&pid));
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(
            matches!(info.state, VmStatus::Running | VmStatus::Paused),
            "cached VM {} is {:?}",
            info.id,
            info.state
        );
    }

    for (v, _) in &vms {
        v.stop().await.expect("stop a handed-out VM");
    }
    admin.quit().await.expect("Quit");
    server.wait().await.expect("server stopped cleanly");
    assert!(!socket.exists(), "socket removed");
    assert!(matches!(
        CacheClient::connect(&socket).await,
        Err(vmfactory_factory::CacheServiceError::Connect { .. })
    ));
    root.assert_no_leaks();
}
