//! The network rows of `cargo xtask bench --net`: what a network adds to `get_vm` from a
//! template factory, side by side with the same factory without one (interleaved rounds, each
//! call after a 300 ms pause so that the previous VM's teardown is not counted), with and
//! without pre-started clones; a network's setup and removal alone; and host↔clone TCP
//! throughput both ways. Writes `target/bench/net.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vmfactory_e2e::{vm, GuestEnv};
use vmfactory_factory::Factory;
use vmfactory_net::{NetworkConfig, VmNetwork, GUEST_GATEWAY};

use crate::bench_factory::{factory_config, until_prestarted};
use crate::stat::Stat;

/// Pause before each timed `get_vm`.
const SETTLE: Duration = Duration::from_millis(300);

/// Bytes moved each way for the throughput rows.
const THROUGHPUT_MIB: usize = 64;

/// The network rows.
#[derive(Debug, Serialize)]
pub struct NetReport {
    /// `get_vm` from a template factory without networks (pre-started clones waiting).
    pub get_vm_template_ms: Stat,
    /// The same with a network per VM.
    pub get_vm_template_net_ms: Stat,
    /// Median difference: what the network adds to `get_vm` (target ≤ 10 ms).
    pub net_added_ms: f64,
    /// `get_vm` without pre-started clones, without and with networks.
    pub get_vm_no_prestart_ms: Stat,
    /// …with networks.
    pub get_vm_no_prestart_net_ms: Stat,
    /// Median difference without pre-started clones (the setup is then in `get_vm`).
    pub net_added_no_prestart_ms: f64,
    /// A pre-started clone's state load alone (`get_base_vm`: no resume, no agent call),
    /// without a NIC…
    pub clone_load_ms: Stat,
    /// …and with one: where the network's share of `get_vm` goes.
    pub clone_load_net_ms: Stat,
    /// `VmNetwork::create` alone (namespace, tap, veth, addresses, NAT rules).
    pub net_setup_ms: Stat,
    /// `VmNetwork::remove` alone.
    pub net_remove_ms: Stat,
    /// Host → clone over TCP (the guest's `wget` from the host), MiB/s.
    pub host_to_clone_mib_s: f64,
    /// Clone → host over TCP (the host's GET from the guest's `httpd`), MiB/s.
    pub clone_to_host_mib_s: f64,
    /// Whether the clones' NICs used vhost-net.
    pub vhost_net: bool,
}

/// Times one `get_vm` (`load`: only taking a pre-started clone with its state loaded, paused,
/// no agent call) after waiting for a pre-started clone when the factory keeps them.
async fn timed(
    f: &Factory,
    cfg: &vmfactory_vm::VmConfig,
    prestart: bool,
    load: bool,
) -> Result<Duration> {
    if prestart {
        until_prestarted(f).await?;
    }
    // Steady state: the previous VM's teardown (the kernel ends a namespace in the background)
    // and a refill's start are not this call's cost.
    tokio::time::sleep(SETTLE).await;
    let t0 = Instant::now();
    let vm = if load {
        f.base().get_base_vm(cfg).await?
    } else {
        f.get_vm(cfg).await?
    };
    let t = t0.elapsed();
    vm.stop().await?;
    Ok(t)
}

/// Serves `len` bytes over HTTP/1.0 on `0.0.0.0:0`; the port.
async fn serve(len: usize) -> Result<u16> {
    let listener = TcpListener::bind("0.0.0.0:0").await?;
    let port = listener.local_addr()?.port();
    let body = Arc::new(vec![0x5au8; len]);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    Ok(port)
}

/// Runs the network bench under `root`.
pub async fn run(env: &GuestEnv, root: &std::path::Path, runs: usize) -> Result<NetReport> {
    let mk = |dir: &str, net: bool, prestart: u32| {
        let mut cfg = factory_config(env, &root.join(dir), true, 0);
        cfg.prestart = prestart;
        if net {
            cfg.vm = cfg.vm.with_network(NetworkConfig::default());
        }
        cfg
    };
    let cfgs = [
        mk("p", false, 1),
        mk("pn", true, 1),
        mk("n", false, 0),
        mk("nn", true, 0),
    ];
    for c in &cfgs {
        std::fs::create_dir_all(&c.vm.run_root)?;
    }
    eprintln!("bench: template factories with and without networks ...");
    let mut factories = Vec::new();
    for c in &cfgs {
        factories.push(Factory::new(c).await.context("factory")?);
    }
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let mut loads: [Vec<Duration>; 2] = Default::default();
    let (mut setup, mut remove) = (Vec::new(), Vec::new());
    let timed = async {
        for i in 0..runs {
            eprintln!("bench: network get_vm round {}/{runs} ...", i + 1);
            for (k, (f, c)) in factories.iter().zip(&cfgs).enumerate() {
                samples[k].push(timed(f, &c.vm, c.prestart > 0, false).await?);
            }
            for (k, (f, c)) in factories.iter().zip(&cfgs).take(2).enumerate() {
                loads[k].push(timed(f, &c.vm, true, true).await?);
            }
            let pin = root.join(format!("pin{i}"));
            let t0 = Instant::now();
            let net = VmNetwork::create(&NetworkConfig::default(), &pin).await?;
            setup.push(t0.elapsed());
            let t0 = Instant::now();
            net.remove().await?;
            remove.push(t0.elapsed());
        }
        eprintln!("bench: host <-> clone throughput, {THROUGHPUT_MIB} MiB each way ...");
        let clone = factories[1].get_vm(&cfgs[1].vm).await?;
        let res = throughput(&clone).await;
        clone.stop().await?;
        res
    }
    .await;
    for f in &factories {
        f.close().await?;
    }
    let (host_to_clone_mib_s, clone_to_host_mib_s, vhost_net) = timed?;
    let [plain, net, plain_np, net_np] = samples.map(|s| Stat::of(&s));
    let [clone_load_ms, clone_load_net_ms] = loads.map(|s| Stat::of(&s));
    Ok(NetReport {
        net_added_ms: net.median - plain.median,
        net_added_no_prestart_ms: net_np.median - plain_np.median,
        get_vm_template_ms: plain,
        get_vm_template_net_ms: net,
        get_vm_no_prestart_ms: plain_np,
        get_vm_no_prestart_net_ms: net_np,
        clone_load_ms,
        clone_load_net_ms,
        net_setup_ms: Stat::of(&setup),
        net_remove_ms: Stat::of(&remove),
        host_to_clone_mib_s,
        clone_to_host_mib_s,
        vhost_net,
    })
}

/// (host → clone MiB/s, clone → host MiB/s, vhost-net in use).
async fn throughput(clone: &vmfactory_vm::Vm) -> Result<(f64, f64, bool)> {
    let bytes = THROUGHPUT_MIB << 20;
    let port = serve(bytes).await?;
    let t0 = Instant::now();
    let out = vm::ok_in(
        clone,
        &format!("wget -q -O - http://{GUEST_GATEWAY}:{port}/ | wc -c"),
    )
    .await;
    let down = t0.elapsed();
    anyhow::ensure!(out.trim() == bytes.to_string(), "fetched {out}");
    vm::ok_in(
        clone,
        &format!(
            "mkdir -p /tmp/w && head -c {bytes} /dev/zero > /tmp/w/f && httpd -p 8000 -h /tmp/w"
        ),
    )
    .await;
    let address = clone.network().context("network")?.address;
    let mut s = TcpStream::connect((address, 8000)).await?;
    s.write_all(b"GET /f HTTP/1.0\r\n\r\n").await?;
    let t0 = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let up = t0.elapsed();
    anyhow::ensure!(got >= bytes, "read {got} bytes");
    let pid = clone.hypervisor().pid().unwrap_or(0);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let vhost = String::from_utf8_lossy(&cmdline).contains("vhost=on");
    let mib_s = |d: Duration| THROUGHPUT_MIB as f64 / d.as_secs_f64();
    Ok((mib_s(down), mib_s(up), vhost))
}

/// Prints the rows.
pub fn report(r: &NetReport) {
    let row = crate::stat::print_row;
    let n = r.get_vm_template_ms.runs;
    row(&format!("get_vm, template (n={n})"), &r.get_vm_template_ms);
    row(
        &format!("get_vm, template, network (n={n})"),
        &r.get_vm_template_net_ms,
    );
    println!(
        "{:<40} {:>9.1} ms   (target <= 10)",
        "network adds to get_vm", r.net_added_ms
    );
    row("get_vm, no pre-start", &r.get_vm_no_prestart_ms);
    row(
        "get_vm, no pre-start, network",
        &r.get_vm_no_prestart_net_ms,
    );
    println!(
        "{:<40} {:>9.1} ms",
        "network adds, no pre-start", r.net_added_no_prestart_ms
    );
    row("clone state load", &r.clone_load_ms);
    row("clone state load, NIC", &r.clone_load_net_ms);
    row("network setup alone", &r.net_setup_ms);
    row("network removal alone", &r.net_remove_ms);
    println!(
        "{:<40} {:>9.1} MiB/s",
        "host -> clone (TCP)", r.host_to_clone_mib_s
    );
    println!(
        "{:<40} {:>9.1} MiB/s",
        "clone -> host (TCP)", r.clone_to_host_mib_s
    );
    println!(
        "{:<40} {:>12}",
        "vhost-net",
        if r.vhost_net { "yes" } else { "no" }
    );
}
