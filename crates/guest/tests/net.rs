//! The networking calls through the real client and server: against a fake network (the
//! service's checks), and against the kernel in a fresh network namespace (root only, as
//! these tests run here and in CI).

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{agent, url, FakeGuest};
use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::LinkVeth;
use vmfactory_agent::net::{InterfaceConfig, RouteConfig, SCOPE_LINK};
use vmfactory_agent::{Agent, Error, Interface, IpAddress, IpFamily, Route};
use vmfactory_guest::server::{AgentServer, GuestAgent, GuestNetwork, NetError};

const T: Duration = Duration::from_secs(5);
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The status code and message of a failed call.
fn status(e: Error) -> (ttrpc::Code, String) {
    match e {
        Error::Rpc {
            source: ttrpc::Error::RpcStatus(st),
            ..
        } => (st.code(), st.message().to_owned()),
        other => panic!("not a status: {other}"),
    }
}

fn v4(a: [u8; 4], prefix: u8) -> IpAddress {
    IpAddress::new(a.into(), prefix)
}

fn eth0(mtu: u64, addresses: Vec<IpAddress>) -> Interface {
    Interface {
        name: "eth0".into(),
        hw_addr: "02:00:00:00:00:01".into(),
        mtu,
        ip_addresses: addresses,
        ..Default::default()
    }
}

fn default_via(gw: &str) -> Route {
    Route {
        gateway: gw.into(),
        device: "eth0".into(),
        ..Default::default()
    }
}

/// Records what reaches it: the service must hand it checked input only.
#[derive(Debug, Default)]
struct RecordingNetwork {
    interfaces: Mutex<Vec<InterfaceConfig>>,
    routes: Mutex<Vec<Vec<RouteConfig>>>,
}

#[async_trait]
impl GuestNetwork for RecordingNetwork {
    async fn update_interface(&self, cfg: &InterfaceConfig) -> Result<Interface, NetError> {
        self.interfaces.lock().expect("lock").push(cfg.clone());
        Ok(Interface {
            device: "eth0".into(),
            ..eth0(1400, Vec::new())
        })
    }

    async fn update_routes(&self, routes: &[RouteConfig]) -> Result<Vec<Route>, NetError> {
        self.routes.lock().expect("lock").push(routes.to_vec());
        Err(NetError::NoLinkNamed("eth9".into()))
    }

    async fn list_interfaces(&self) -> Result<Vec<Interface>, NetError> {
        Ok(Vec::new())
    }

    async fn list_routes(&self) -> Result<Vec<Route>, NetError> {
        Ok(vec![default_via("172.16.0.1")])
    }
}

#[tokio::test]
async fn the_service_checks_requests_before_the_network_sees_them() {
    let guest = FakeGuest::new();
    let net = Arc::new(RecordingNetwork::default());
    let mut cfg = guest.config();
    cfg.net = net.clone();
    let path = guest.sock("agent.sock");
    let _server = AgentServer::bind_unix(Arc::new(GuestAgent::new(cfg)), &path)
        .await
        .expect("bind");
    let a = agent(url("unix", &path), T);

    let got = a
        .update_interface(&eth0(1400, vec![v4([172, 16, 0, 2], 30)]))
        .await
        .expect("update");
    assert_eq!(got.device, "eth0");
    let bad = eth0(1400, vec![v4([172, 16, 0, 2], 30), v4([10, 0, 0, 1], 33)]);
    let (code, msg) = status(a.update_interface(&bad).await.expect_err("bad prefix"));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(msg, "Invalid address 10.0.0.1/33: prefix too long");
    let no_mac = Interface {
        hw_addr: String::new(),
        ..eth0(0, Vec::new())
    };
    let (code, _) = status(a.update_interface(&no_mac).await.expect_err("no MAC"));
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert_eq!(
        net.interfaces.lock().expect("lock").len(),
        1,
        "only the valid one"
    );

    let bad_route = Route {
        dest: "10.0.0.1/8".into(),
        ..default_via("172.16.0.1")
    };
    let (code, msg) = status(
        a.update_routes(&[default_via("172.16.0.1"), bad_route])
            .await
            .expect_err("host bits"),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("host bits"), "{msg}");
    assert!(net.routes.lock().expect("lock").is_empty());
    let (code, msg) = status(
        a.update_routes(&[default_via("172.16.0.1")])
            .await
            .expect_err("the network's own error"),
    );
    assert_eq!(
        (code, msg.as_str()),
        (ttrpc::Code::NOT_FOUND, "No link named eth9")
    );
    assert_eq!(
        a.list_routes().await.expect("list"),
        vec![default_via("172.16.0.1")]
    );
}

/// Runs `test` on a thread of its own in a new network namespace (with only a down `lo`),
/// on a current-thread runtime there, so that the server's netlink sockets see that
/// namespace. Panics propagate.
fn in_new_netns<F, Fut>(test: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    std::thread::spawn(move || {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(test());
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
}

/// What the kernel says about link `name`: (up, MTU, MAC).
async fn kernel_link(h: &rtnetlink::Handle, name: &str) -> (bool, u32, Vec<u8>) {
    let links: Vec<_> = h
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_collect()
        .await
        .expect("link by name");
    let l = links.first().expect("one link");
    let mtu = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    });
    let mac = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.clone()),
        _ => None,
    });
    (
        l.header.flags.contains(LinkFlags::Up),
        mtu.expect("mtu"),
        mac.expect("mac"),
    )
}

fn v4_addresses(i: &Interface) -> Vec<IpAddress> {
    let mut a: Vec<IpAddress> = i
        .ip_addresses
        .iter()
        .filter(|a| a.family == IpFamily::V4)
        .cloned()
        .collect();
    a.sort_by(|x, y| x.address.cmp(&y.address));
    a
}

fn v4_routes(mut r: Vec<Route>) -> Vec<Route> {
    r.retain(|r| r.family == IpFamily::V4);
    r.sort_by(|a, b| a.dest.cmp(&b.dest));
    r
}

#[test]
fn configures_a_nic_in_a_network_namespace() {
    in_new_netns(|| async {
        let (conn, h, _) = rtnetlink::new_connection().expect("netlink");
        let conn = tokio::spawn(conn);
        // A veth end stands in for the virtio-net NIC: this host's kernel has no dummy driver.
        h.link()
            .add(LinkVeth::new("nic0", "peer0").address(MAC.to_vec()).build())
            .execute()
            .await
            .expect("create veth");
        assert!(
            !kernel_link(&h, "lo").await.0,
            "a new namespace's lo is down"
        );

        let guest = FakeGuest::new();
        let (_server, path) = guest.serve_unix().await;
        let a = agent(url("unix", &path), T);

        let want = eth0(1400, vec![v4([172, 16, 0, 2], 30)]);
        let got = a.update_interface(&want).await.expect("update_interface");
        assert_eq!((got.name.as_str(), got.device.as_str()), ("eth0", "eth0"));
        assert_eq!((got.mtu, got.hw_addr.as_str()), (1400, "02:00:00:00:00:01"));
        assert_eq!(v4_addresses(&got), want.ip_addresses);
        assert_eq!(kernel_link(&h, "eth0").await, (true, 1400, MAC.to_vec()));
        assert!(kernel_link(&h, "lo").await.0, "lo brought up");

        let routes = a
            .update_routes(&[default_via("172.16.0.1")])
            .await
            .expect("update_routes");
        let link_route = Route {
            dest: "172.16.0.0/30".into(),
            device: "eth0".into(),
            source: "172.16.0.2".into(),
            scope: SCOPE_LINK,
            ..Default::default()
        };
        let expected = vec![default_via("172.16.0.1"), link_route.clone()];
        assert_eq!(v4_routes(routes), expected);
        assert_eq!(
            v4_routes(a.list_routes().await.expect("list_routes")),
            expected
        );
        let listed = a.list_interfaces().await.expect("list_interfaces");
        let names: Vec<&str> = listed.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["lo", "peer0", "eth0"]);
        assert_eq!(listed[2], got);

        // A wrong MAC and an invalid address: errors, and nothing changed.
        let wrong_mac = Interface {
            hw_addr: "02:00:00:00:00:09".into(),
            ..eth0(1300, Vec::new())
        };
        let (code, msg) = status(a.update_interface(&wrong_mac).await.expect_err("wrong MAC"));
        assert_eq!(code, ttrpc::Code::NOT_FOUND);
        assert_eq!(msg, "No link with MAC 02:00:00:00:00:09");
        let bad = IpAddress {
            address: "300.1.1.1".into(),
            mask: "24".into(),
            ..Default::default()
        };
        let invalid = eth0(1280, vec![v4([172, 16, 0, 6], 30), bad]);
        let (code, msg) = status(a.update_interface(&invalid).await.expect_err("bad address"));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
        assert_eq!(
            msg,
            "Invalid address 300.1.1.1/24: not an IPv4 or IPv6 address"
        );
        let taken = Interface {
            name: "peer0".into(),
            ..eth0(1280, Vec::new())
        };
        let (code, _) = status(a.update_interface(&taken).await.expect_err("name taken"));
        assert_eq!(code, ttrpc::Code::ALREADY_EXISTS);
        let no_link = Route {
            device: "eth9".into(),
            ..default_via("172.16.0.1")
        };
        let (code, _) = status(a.update_routes(&[no_link]).await.expect_err("no eth9"));
        assert_eq!(code, ttrpc::Code::NOT_FOUND);
        assert_eq!(a.list_interfaces().await.expect("list"), listed);
        assert_eq!(v4_routes(a.list_routes().await.expect("list")), expected);
        assert_eq!(kernel_link(&h, "eth0").await, (true, 1400, MAC.to_vec()));

        // A gateway the kernel cannot reach fails half-way: the old routes come back.
        let unreachable = Route {
            dest: "10.0.0.0/8".into(),
            ..default_via("172.16.9.1")
        };
        let (code, msg) = status(
            a.update_routes(&[default_via("172.16.0.1"), unreachable])
                .await
                .expect_err("unreachable gateway"),
        );
        assert_eq!(code, ttrpc::Code::INTERNAL, "{msg}");
        assert_eq!(v4_routes(a.list_routes().await.expect("list")), expected);

        // The same request again changes nothing; a second address is added alongside.
        let two = eth0(1400, vec![v4([172, 16, 0, 2], 30), v4([172, 16, 1, 2], 24)]);
        let got = a.update_interface(&two).await.expect("second address");
        assert_eq!(v4_addresses(&got), two.ip_addresses);
        let got = a.update_interface(&want).await.expect("back to one");
        assert_eq!(v4_addresses(&got), want.ip_addresses);
        conn.abort();
    });
}
