//! The client against the real server over a unix socket and a socketpair.

mod common;

use std::time::{Duration, SystemTime};

use common::{agent, url, FakeGuest};
use vmfactory_agent::{Agent, Error, HealthStatus, KataAgent};
use vmfactory_guest::server::{AgentServer, GuestAgent};

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn all_calls_over_unix_socket() {
    let guest = FakeGuest::new();
    let (_server, path) = guest.serve_unix().await;
    let a = KataAgent::new(format!("unix://{}", path.display()).as_str(), T).expect("new");
    assert!(!a.is_connected().await);

    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
    assert!(a.is_connected().await);
    let v = a.version().await.expect("version");
    assert_eq!(v.agent_version, vmfactory_agent::VERSION);

    let d = a.get_guest_details().await.expect("details");
    assert_eq!(d.mem_block_size_bytes, 128 << 20);
    assert_eq!(
        d.agent_details.expect("agent details").version,
        vmfactory_agent::VERSION
    );

    let r = a.resources().await.expect("resources");
    assert_eq!(r.online_cpus, vec![0, 1]);
    assert_eq!(r.offline_cpus, vec![2, 3]);
    assert_eq!(r.mem_total_kb, 262_144);
    assert_eq!((r.online_memory_blocks, r.offline_memory_blocks), (1, 1));

    a.online_cpu_mem(true, 1, false).await.expect("online");
    let r = a.resources().await.expect("resources");
    assert_eq!(r.online_cpus, vec![0, 1, 2]);
    assert_eq!(r.online_memory_blocks, 2);
    assert_eq!(guest.cpu_online(2), "1");

    assert_eq!(a.random(32).await.expect("random"), vec![7u8; 32]);

    let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000);
    a.set_guest_date_time(t).await.expect("set time");
    assert_eq!(a.guest_time().await.expect("time"), t);

    let up = a.uptime().await.expect("uptime");
    assert_eq!(up.system, Duration::from_millis(42_250));
    assert!(up.agent < Duration::from_secs(60));
}

#[tokio::test]
async fn guest_errors_come_back_as_rpc_errors() {
    let guest = FakeGuest::new();
    let (_server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), T);

    // Only two offline CPUs exist: asking for three waits online_timeout, then fails.
    let start = std::time::Instant::now();
    match a.online_cpu_mem(true, 3, true).await {
        Err(Error::Rpc { method, source }) => {
            assert_eq!(method, "OnlineCPUMem");
            match source {
                ttrpc::Error::RpcStatus(s) => assert_eq!(s.code(), ttrpc::Code::DEADLINE_EXCEEDED),
                other => panic!("expected a status, got {other:?}"),
            }
        }
        other => panic!("expected Rpc error, got {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(3));

    match a.online_cpu_mem(true, 0, true).await {
        Err(Error::Rpc {
            source: ttrpc::Error::RpcStatus(s),
            ..
        }) => assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT),
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    // The fake /dev/random is a plain file: the entropy ioctl fails.
    match a.reseed_random_dev(&[1, 2, 3]).await {
        Err(Error::Rpc {
            method: "ReseedRandomDev",
            source: ttrpc::Error::RpcStatus(s),
        }) => assert_eq!(s.code(), ttrpc::Code::INTERNAL),
        other => panic!("expected INTERNAL, got {other:?}"),
    }

    // The connection survives failed calls.
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
}

#[tokio::test]
async fn online_without_wait_returns_at_once() {
    let guest = FakeGuest::new();
    let (_server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), T);
    a.online_cpu_mem(false, 2, true).await.expect("online");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = a.resources().await.expect("resources");
        if r.online_cpus == vec![0, 1, 2, 3] {
            // cpu_only: memory untouched.
            assert_eq!(r.offline_memory_blocks, 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "cpus not onlined");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn disconnect_then_lazy_reconnect_and_reuse() {
    let guest = FakeGuest::new();
    let (_server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), T);
    a.connect().await.expect("connect");
    a.disconnect().await.expect("disconnect");
    assert!(!a.is_connected().await);
    a.disconnect().await.expect("second disconnect is a no-op");
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);

    let b = agent(
        url("unix", &guest.sock("nowhere")),
        Duration::from_millis(50),
    );
    b.reuse_agent(&a).await.expect("reuse");
    assert!(b.is_connected().await);
    assert_eq!(
        b.check().await.expect("check via reused"),
        HealthStatus::Serving
    );

    let fake = vmfactory_agent::FakeAgent::new();
    assert!(matches!(
        b.reuse_agent(&fake).await,
        Err(Error::Unsupported(_))
    ));
}

#[tokio::test]
async fn server_gone_then_back() {
    let guest = FakeGuest::new();
    let (server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), Duration::from_millis(500));
    a.check().await.expect("check");
    server.shutdown().await;
    std::fs::remove_file(&path).expect("rm socket");
    // The dead connection fails and is dropped; the next call redials.
    assert!(a.check().await.is_err());
    assert!(!a.is_connected().await);
    let _server = AgentServer::bind_unix(guest.agent(), &path)
        .await
        .expect("rebind");
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
}

#[tokio::test]
async fn over_a_socketpair() {
    let guest = FakeGuest::new();
    let (client_end, server_end) = tokio::net::UnixStream::pair().expect("socketpair");
    let listener = ttrpc::asynchronous::transport::Listener::new(futures::stream::iter([Ok::<
        _,
        std::io::Error,
    >(
        server_end,
    )]));
    let _server = AgentServer::start(
        std::sync::Arc::new(GuestAgent::new(guest.config())),
        listener,
    )
    .await
    .expect("start");
    let a = KataAgent::with_stream(
        url("unix", &guest.sock("unused")),
        vmfactory_agent::AgentConfig::default(),
        client_end,
    );
    assert!(a.is_connected().await);
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
    assert_eq!(a.random(3).await.expect("random"), vec![7, 7, 7]);
}
