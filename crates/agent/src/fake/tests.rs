//! Tests of [`FakeAgent`](super::FakeAgent).

use super::*;

#[tokio::test]
async fn records_and_fails_on_demand() {
    let a = FakeAgent::new();
    assert_eq!(a.check().await.expect("check"), HealthStatus::Serving);
    a.fail("online_cpu_mem");
    assert!(matches!(
        a.online_cpu_mem(true, 1, false).await,
        Err(Error::Injected {
            method: "online_cpu_mem"
        })
    ));
    a.heal("online_cpu_mem");
    a.online_cpu_mem(true, 2, false).await.expect("online");
    assert_eq!(a.resources().await.expect("res").online_cpus, vec![0, 1, 2]);
    assert_eq!(a.count("online_cpu_mem"), 2);
    assert_eq!(a.calls()[0], FakeCall::Check);
    a.disconnect().await.expect("disconnect");
    assert!(!a.is_connected());
    a.hang("check");
    let hung = tokio::time::timeout(Duration::from_millis(20), a.check()).await;
    assert!(hung.is_err(), "a hanging call does not answer");
    assert_eq!(a.count("check"), 2, "but is recorded");
    a.heal("check");
    a.check().await.expect("healed");
}

#[tokio::test]
async fn usable_as_dyn_agent() {
    let a: std::sync::Arc<dyn Agent> = std::sync::Arc::new(FakeAgent::new());
    let b = FakeAgent::new();
    a.check().await.expect("check");
    b.reuse_agent(a.as_ref()).await.expect("reuse");
    assert!(b.is_connected());
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
    a.set_guest_date_time(t).await.expect("set");
    assert_eq!(a.guest_time().await.expect("time"), t);
    assert_eq!(a.random(4).await.expect("random").len(), 4);
}

#[tokio::test]
async fn fake_processes_stream_and_exit() {
    let a = FakeAgent::new();
    a.exec_process("c", &ProcessSpec::new(["cat"]))
        .await
        .expect("exec");
    a.write_stdin("", "c", b"hello").await.expect("write");
    assert_eq!(a.read_stdout("", "c", 3).await.expect("read"), b"hel");
    a.close_stdin("", "c").await.expect("close");
    assert_eq!(a.read_stdout("", "c", 10).await.expect("read"), b"lo");
    assert!(a.read_stdout("", "c", 10).await.expect("eof").is_empty());
    assert_eq!(
        a.wait_process("", "c").await.expect("wait"),
        ExitStatus::Code(0)
    );
    a.exec_process("s", &ProcessSpec::new(["sleep"]))
        .await
        .expect("exec");
    let waiter = a.wait_process("", "s");
    let (status, sent) = tokio::join!(waiter, a.signal_process("", "s", 9));
    sent.expect("signal");
    assert_eq!(status.expect("wait"), ExitStatus::Signal(9));
    assert!(a.processes().is_empty());
    a.exec_process("n", &ProcessSpec::new(["nope"]))
        .await
        .expect("exec");
    assert_eq!(
        a.read_stderr("", "n", 100).await.expect("stderr"),
        b"nope: not found\n"
    );
}

#[tokio::test]
async fn fake_containers_keep_their_processes_apart() {
    let a = FakeAgent::new();
    let root = Storage {
        driver: Storage::BLK.into(),
        source: "05/00".into(),
        fstype: "erofs".into(),
        options: vec!["ro".into()],
        mount_point: "/run/c1".into(),
    };
    let spec = ContainerSpec {
        process: ProcessSpec::new(["sleep"]),
        ..Default::default()
    };
    let bad = ContainerSpec::default();
    assert!(a
        .create_container("c1", std::slice::from_ref(&root), &bad)
        .await
        .is_err());
    assert!(
        a.containers().is_empty() && a.storages().is_empty(),
        "nothing left"
    );
    a.create_container("c1", std::slice::from_ref(&root), &spec)
        .await
        .expect("create");
    assert!(a
        .create_container("c1", std::slice::from_ref(&root), &spec)
        .await
        .is_err());
    a.start_container("c1").await.expect("start");
    let mut echo = ProcessSpec::new(["echo", "hi"]);
    echo.container_id = "c1".into();
    a.exec_process("e", &echo).await.expect("exec in");
    assert_eq!(a.read_stdout("c1", "e", 10).await.expect("out"), b"hi\n");
    assert!(
        a.read_stdout("", "e", 10).await.is_err(),
        "not in the VM root"
    );
    assert_eq!(a.container_pids("c1").await.expect("pids"), [1]);
    a.signal_process("c1", "", 9).await.expect("kill all");
    assert_eq!(
        a.wait_process("c1", "c1").await.expect("wait"),
        ExitStatus::Signal(9)
    );
    assert_eq!(a.stats_container("c1").await.expect("stats").pids, 0);
    a.remove_container("c1", Duration::ZERO).await.expect("rm");
    assert!(a.containers().is_empty() && a.storages().is_empty() && a.processes().is_empty());
    assert!(a.remove_container("c1", Duration::ZERO).await.is_err());
}

#[tokio::test]
async fn fake_files_and_storages() {
    let a = FakeAgent::new();
    let mut c = CopyFileChunk {
        path: "/f".into(),
        file_size: 4,
        file_mode: 0o600,
        data: b"ab".to_vec(),
        ..Default::default()
    };
    a.copy_file(&c).await.expect("first chunk");
    assert!(a.files().is_empty(), "not renamed before its full size");
    c.offset = 2;
    c.data = b"cd".to_vec();
    a.copy_file(&c).await.expect("second chunk");
    assert_eq!(a.read_file("/f", 1, 2).await.expect("read").data, b"bc");
    c.path = "/a/../etc".into();
    assert!(a.copy_file(&c).await.is_err());
    let s = Storage {
        mount_point: "/mnt".into(),
        ..Default::default()
    };
    a.add_storage(&s).await.expect("add");
    assert!(a.add_storage(&s).await.is_err(), "mounted twice");
    a.remove_storage("/mnt").await.expect("remove");
    assert!(a.storages().is_empty());
}

#[tokio::test]
async fn fake_network_keeps_what_was_set() {
    use crate::net::{IpAddress, IpFamily};
    let a = FakeAgent::new();
    a.add_link("ens3", [2, 0, 0, 0, 0, 1]);
    let want = Interface {
        name: "eth0".into(),
        hw_addr: "02:00:00:00:00:01".into(),
        mtu: 1400,
        ip_addresses: vec![IpAddress::new([172, 16, 0, 2].into(), 30)],
        ..Default::default()
    };
    let got = a.update_interface(&want).await.expect("update");
    assert_eq!((got.device.as_str(), got.mtu), ("eth0", 1400));
    assert_eq!(got.ip_addresses, want.ip_addresses);
    let ifaces = a.list_interfaces().await.expect("list");
    assert_eq!(ifaces.len(), 2, "lo and eth0");
    assert_eq!(ifaces[1], got);
    let default = Route {
        gateway: "172.16.0.1".into(),
        device: "eth0".into(),
        ..Default::default()
    };
    let routes = a
        .update_routes(std::slice::from_ref(&default))
        .await
        .expect("routes");
    assert_eq!(routes, vec![default.clone()]);
    // Replacing eth0's routes drops the old ones.
    let v6 = Route {
        dest: "fd00::/64".into(),
        device: "eth0".into(),
        scope: crate::net::SCOPE_LINK,
        family: IpFamily::V6,
        ..Default::default()
    };
    a.update_routes(std::slice::from_ref(&v6))
        .await
        .expect("routes");
    assert_eq!(a.list_routes().await.expect("list"), vec![v6.clone()]);
    assert_eq!(
        a.calls(),
        [
            FakeCall::UpdateInterface(want.clone()),
            FakeCall::ListInterfaces,
            FakeCall::UpdateRoutes(vec![default.clone()]),
            FakeCall::UpdateRoutes(vec![v6.clone()]),
            FakeCall::ListRoutes,
        ]
    );
}

#[tokio::test]
async fn fake_network_refuses_as_the_guest_does() {
    let a = FakeAgent::new();
    a.add_link("eth0", [2, 0, 0, 0, 0, 1]);
    let code = |e: Error| match e {
        Error::Rpc {
            source: ttrpc::Error::RpcStatus(st),
            ..
        } => st.code(),
        other => panic!("not a status: {other}"),
    };
    let wrong_mac = Interface {
        hw_addr: "02:00:00:00:00:09".into(),
        ..Default::default()
    };
    let err = a.update_interface(&wrong_mac).await.expect_err("no link");
    assert_eq!(code(err), ttrpc::Code::NOT_FOUND);
    let bad_addr = Interface {
        hw_addr: "02:00:00:00:00:01".into(),
        ip_addresses: vec![crate::net::IpAddress {
            address: "300.1.1.1".into(),
            mask: "24".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = a
        .update_interface(&bad_addr)
        .await
        .expect_err("bad address");
    assert_eq!(code(err), ttrpc::Code::INVALID_ARGUMENT);
    let no_dev = Route {
        device: "eth9".into(),
        ..Default::default()
    };
    let err = a.update_routes(&[no_dev]).await.expect_err("no link");
    assert_eq!(code(err), ttrpc::Code::NOT_FOUND);
    assert_eq!(
        a.list_interfaces().await.expect("list")[1].mtu,
        1500,
        "unchanged"
    );
    a.fail("list_routes");
    assert!(matches!(
        a.list_routes().await,
        Err(Error::Injected {
            method: "list_routes"
        })
    ));
}
