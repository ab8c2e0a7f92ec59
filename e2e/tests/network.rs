//! Networking on real QEMU: 8 template clones at once, each with its own address on the
//! host, each fetching bytes from a server on the host (the guest's gateway, 10.0.2.2, stands
//! for the host) and answering the host on its own address; clone-to-clone traffic and the
//! host's other addresses refused; QEMU killed, an orphan reaped and a failure at every step
//! of a networked VM's creation leave no namespace, link or process. Needs root and `nft`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmfactory_e2e::vm::ok_in;
use vmfactory_e2e::{guest_env, scaled, vm, RunRoot};
use vmfactory_factory::Factory;
use vmfactory_net::{host_links, NetworkConfig, GUEST_GATEWAY};
use vmfactory_vm::{Backends, NewStep, QemuBackends, Vm};

/// The tests compare the host's VM links before and after: one at a time.
static HOST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn links() -> BTreeSet<String> {
    host_links()
        .await
        .expect("host links")
        .into_iter()
        .collect()
}

/// Waits (bounded) until the host's VM links are `want`: a namespace whose QEMU was killed
/// ends a moment after.
async fn links_become(want: &BTreeSet<String>) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = links().await;
        if &now == want || tokio::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `payload` over HTTP/1.0 to every request on `0.0.0.0:port`.
async fn serve(payload: Arc<Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let p = payload.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", p.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&p).await;
            });
        }
    });
    port
}

/// GETs `/` from the guest's HTTP server at `addr`, retrying until it listens: the body.
async fn get(addr: std::net::SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + scaled(Duration::from_secs(20));
    loop {
        let attempt = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
        };
        if let Ok(Some(body)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clones_each_reach_the_host_and_only_the_host() {
    let Some(env) = guest_env() else { return };
    let _host = HOST.lock().await;
    let before = links().await;
    let root = RunRoot::new();
    let mut cfg = vm::template_factory_config(&env, root.path());
    cfg.vm = cfg.vm.with_network(NetworkConfig::default());
    let factory = Factory::new(&cfg).await.expect("template factory");
    // Two at a time: in the nested KVM CI host (an L1 emulated by TCG, beside another L1),
    // eight QEMUs started at once once took longer than the 20 s QEMU has to open its QMP
    // socket. The network is what this tests; concurrent takes are the cache tests' and the
    // concurrency bench's.
    let mut clones: Vec<Vm> = Vec::new();
    for _ in 0..4 {
        let pair = futures::future::try_join_all((0..2).map(|_| factory.get_vm(&cfg.vm)))
            .await
            .expect("2 clones");
        clones.extend(pair);
    }
    let nets: Vec<_> = clones
        .iter()
        .map(|v| v.network().expect("network").clone())
        .collect();
    let addresses: BTreeSet<_> = nets.iter().map(|n| n.address).collect();
    assert_eq!(addresses.len(), 8, "one address each: {addresses:?}");
    // The nested KVM host has vhost-net: the kernel must move the packets there.
    if std::env::var_os("VMFACTORY_E2E_REQUIRE_VHOST_NET").is_some() {
        for v in &clones {
            let pid = v.hypervisor().pid().expect("pid");
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
            let cmdline = String::from_utf8_lossy(&cmdline);
            assert!(cmdline.contains("vhost=on"), "no vhost-net: {cmdline}");
        }
    }

    // Each fetches 1 MiB from the host at its gateway, bytes checked.
    let payload: Arc<Vec<u8>> = Arc::new((0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect());
    let want = format!("{:x}", Sha256::digest(payload.as_slice()));
    let port = serve(payload).await;
    let fetch = format!("wget -q -O - http://{GUEST_GATEWAY}:{port}/ | sha256sum");
    let fetches = clones.iter().map(|v| ok_in(v, &fetch));
    for out in futures::future::join_all(fetches).await {
        assert!(out.starts_with(&want), "fetched {out}");
    }

    // Each serves its id to the host on its own address; clone 0 cannot reach clone 1's
    // server, nor the host at clone 1's host address.
    for v in &clones {
        let script = format!(
            "mkdir -p /tmp/www && echo {} > /tmp/www/index.html && httpd -p 7000 -h /tmp/www",
            v.id()
        );
        ok_in(v, &script).await;
    }
    for (v, net) in clones.iter().zip(&nets) {
        let got = get((net.address, 7000).into()).await;
        assert_eq!(
            got.trim(),
            v.id(),
            "{} answered for another VM",
            net.address
        );
    }
    let refused = ok_in(
        &clones[0],
        &format!(
            "for u in http://{}:7000/ http://{}:{port}/; do wget -q -T 2 -O /dev/null $u && echo reached || echo refused; done",
            nets[1].address, nets[1].host_address
        ),
    )
    .await;
    assert_eq!(
        refused, "refused\nrefused\n",
        "clone 0 reached clone 1 or its host address"
    );
    for v in clones {
        v.stop().await.expect("stop");
    }
    factory.close().await.expect("close");
    assert_eq!(
        links_become(&before).await,
        before,
        "VM links left on the host"
    );
    root.assert_no_leaks();
}

/// Real QEMU parts, failing before `step`.
#[derive(Debug)]
struct FailAt(NewStep);

#[async_trait]
impl Backends for FailAt {
    fn hypervisor(
        &self,
        id: &str,
        config: &vmfactory_hypervisor::HypervisorConfig,
        run_dir: &std::path::Path,
    ) -> vmfactory_vm::Result<Arc<dyn vmfactory_hypervisor::Hypervisor>> {
        QemuBackends.hypervisor(id, config, run_dir)
    }

    async fn attach_hypervisor(
        &self,
        state: vmfactory_hypervisor::QemuState,
    ) -> vmfactory_vm::Result<Arc<dyn vmfactory_hypervisor::Hypervisor>> {
        QemuBackends.attach_hypervisor(state).await
    }

    fn agent(
        &self,
        id: &str,
        url: &vmfactory_agent::AgentUrl,
        config: &vmfactory_vm::VmAgentConfig,
    ) -> vmfactory_vm::Result<Arc<dyn vmfactory_agent::Agent>> {
        QemuBackends.agent(id, url, config)
    }

    fn proxy(&self, kind: vmfactory_vm::ProxyKind) -> Arc<dyn vmfactory_vm::Proxy> {
        QemuBackends.proxy(kind)
    }

    async fn before(&self, id: &str, step: NewStep) -> vmfactory_vm::Result<()> {
        if step == self.0 {
            return Err(vmfactory_vm::Error::Aborted {
                id: id.to_owned(),
                step,
            });
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_qemu_and_failed_steps_leave_no_network() {
    let Some(env) = guest_env() else { return };
    let _host = HOST.lock().await;
    let before = links().await;
    let root = RunRoot::new();
    let mut cfg = vm::vm_config(vm::config(&env)).with_network(NetworkConfig::default());
    cfg.run_root = root.path().to_owned();

    // QEMU killed under a running VM: stop still removes the namespace and the link.
    let v = Vm::new(cfg.clone()).await.expect("networked VM");
    let net = v.network().expect("network").clone();
    assert!(links().await.contains(&net.host_link));
    let pid = v.hypervisor().pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    v.stop().await.expect("stop after kill");
    assert!(!net.netns.exists(), "pin left");
    assert_eq!(
        links_become(&before).await,
        before,
        "link left after a kill"
    );

    // An orphan (its owner gone without stopping it): reaping removes its network too.
    let v = Vm::new(cfg.clone()).await.expect("networked VM");
    let net = v.network().expect("network").clone();
    drop(v);
    let reaped = Vm::reap_orphans(root.path()).await.expect("reap");
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert!(!net.netns.exists(), "orphan's pin left");
    assert_eq!(links_become(&before).await, before, "orphan's link left");

    for step in [
        NewStep::CreateNetwork,
        NewStep::CreateHypervisor,
        NewStep::StartHypervisor,
        NewStep::StartProxy,
        NewStep::CreateAgent,
        NewStep::CheckAgent,
        NewStep::ConfigureNetwork,
        NewStep::SaveState,
    ] {
        let err = Vm::new_with(cfg.clone(), &FailAt(step))
            .await
            .expect_err("aborted");
        // After QEMU started, the abort comes wrapped with the VM's console (`NotUp`).
        assert!(
            matches!(err.failure(), vmfactory_vm::Error::Aborted { .. }),
            "{step:?}: {err}"
        );
        assert_eq!(links_become(&before).await, before, "{step:?} left a link");
        root.assert_no_leaks();
    }
}
