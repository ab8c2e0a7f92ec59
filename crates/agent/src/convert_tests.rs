//! Tests of `convert`: the wire forms both ways, Kata's tags, the OCI spec subset.
use super::*;
use protobuf::Message;

#[test]
fn health_status_round_trip() {
    for s in [
        HealthStatus::Unknown,
        HealthStatus::Serving,
        HealthStatus::NotServing,
    ] {
        let wire: health::HealthCheckResponse = s.into();
        assert_eq!(HealthStatus::from(wire.status), s);
    }
    assert_eq!(
        HealthStatus::from(EnumOrUnknown::<ServingStatus>::from_i32(7)),
        HealthStatus::Unknown
    );
}

#[test]
fn guest_details_round_trip() {
    let d = GuestDetails {
        mem_block_size_bytes: 128 << 20,
        agent_details: Some(AgentDetails {
            version: "1.2.3".into(),
            init_daemon: true,
            ..Default::default()
        }),
        support_mem_hotplug_probe: false,
    };
    let wire: pb::GuestDetailsResponse = d.clone().into();
    assert_eq!(GuestDetails::from(wire), d);
}

#[test]
fn resources_round_trip() {
    let r = Resources {
        online_cpus: vec![0, 1],
        offline_cpus: vec![2],
        mem_total_kb: 1000,
        online_memory_blocks: 3,
        offline_memory_blocks: 1,
        memory_block_size_bytes: 1 << 27,
    };
    let wire: diag::ResourcesResponse = r.clone().into();
    assert_eq!(wire.online_cpu_count, 2);
    assert_eq!(Resources::from(wire), r);
}

/// Field numbers must match Kata's agent.proto: `ReseedRandomDevRequest.data` is tag 2
/// (wire key 0x12), `SetGuestDateTimeRequest.Sec/Usec` tags 1 and 2.
#[test]
fn wire_tags_match_kata() {
    let bytes = reseed_request(&[0xaa]).write_to_bytes().expect("encode");
    assert_eq!(bytes, vec![0x12, 0x01, 0xaa]);
    let bytes = set_time_request(1, 2).write_to_bytes().expect("encode");
    assert_eq!(bytes, vec![0x08, 0x01, 0x10, 0x02]);
    let req: pb::OnlineCPUMemRequest = OnlineCpuMem {
        wait: true,
        nb_cpus: 3,
        cpu_only: true,
    }
    .into();
    let bytes = req.write_to_bytes().expect("encode");
    assert_eq!(bytes, vec![0x08, 0x01, 0x10, 0x03, 0x18, 0x01]);
}

#[test]
fn container_types_round_trip_with_katas_tags() {
    let spec = ContainerSpec {
        version: "1.0.2".into(),
        process: ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["FOO=bar".into()],
            cwd: "/".into(),
            terminal: true,
            console_size: Some((24, 80)),
            ..Default::default()
        },
        rlimits: vec![Rlimit {
            kind: "RLIMIT_NOFILE".into(),
            hard: 1024,
            soft: 512,
        }],
        no_new_privileges: true,
        root_path: "/rootfs".into(),
        root_readonly: false,
        hostname: "box".into(),
        mounts: vec![Mount {
            destination: "/proc".into(),
            source: "proc".into(),
            kind: "proc".into(),
            options: vec!["nosuid".into()],
        }],
        annotations: [("a".to_owned(), "b".to_owned())].into(),
        namespaces: vec![Namespace {
            kind: "pid".into(),
            path: String::new(),
        }],
        masked_paths: vec!["/proc/kcore".into()],
        readonly_paths: vec!["/proc/sys".into()],
        sysctl: [("net.ipv4.ip_forward".to_owned(), "1".to_owned())].into(),
    };
    let storage = Storage {
        driver: Storage::BLK.into(),
        source: "05/00".into(),
        fstype: "erofs".into(),
        options: vec!["ro".into()],
        mount_point: "/run/x".into(),
    };
    let req = create_container_request("c1", std::slice::from_ref(&storage), &spec);
    assert_eq!(req.exec_id, "c1", "the init's exec id is the container's");
    let back = ContainerSpec::from(req.OCI.clone().into_option().expect("spec"));
    assert_eq!(back, spec);
    // Kata's tags: container_id 1, exec_id 2, storages 5, OCI 6; Spec.Hostname 4.
    let bytes = req.write_to_bytes().expect("encode");
    assert_eq!(&bytes[..4], &[0x0a, 0x02, b'c', b'1']);
    assert_eq!(&bytes[4..8], &[0x12, 0x02, b'c', b'1']);
    assert_eq!(bytes[8], 0x2a, "storages = 5");
    let oci_bytes = oci::Spec {
        Hostname: "h".into(),
        ..Default::default()
    }
    .write_to_bytes()
    .expect("encode");
    assert_eq!(oci_bytes, vec![0x22, 0x01, b'h']);
    let stats = ContainerStats {
        cpu_usage_ns: 5,
        memory_usage_bytes: 6,
        memory_limit_bytes: u64::MAX,
        pids: 2,
    };
    assert_eq!(
        ContainerStats::from(pb::StatsContainerResponse::from(&stats)),
        stats
    );
}

#[test]
fn workload_types_round_trip() {
    let spec = ProcessSpec {
        container_id: String::new(),
        args: vec!["sh".into(), "-c".into(), "id".into()],
        env: vec!["A=1".into()],
        cwd: "/tmp".into(),
        uid: 1000,
        gid: 100,
        additional_gids: vec![5],
        terminal: true,
        console_size: Some((24, 80)),
    };
    let req = exec_request("e1", &spec);
    assert_eq!(req.container_id, "", "the VM's own root");
    assert_eq!(
        ProcessSpec::from(req.process.into_option().expect("process")),
        spec
    );
    let chunk = CopyFileChunk {
        path: "/x".into(),
        file_size: 3,
        file_mode: 0o644,
        dir_mode: 0o755,
        uid: u32::MAX,
        gid: 7,
        offset: 1,
        data: vec![1, 2],
    };
    let back = CopyFileChunk::try_from(pb::CopyFileRequest::from(&chunk)).expect("valid");
    assert_eq!(back, chunk);
    let mut neg = pb::CopyFileRequest::from(&chunk);
    neg.offset = -1;
    assert!(CopyFileChunk::try_from(neg).is_err());
    let st = Storage {
        driver: Storage::BLK.into(),
        source: "05/00".into(),
        fstype: "ext4".into(),
        options: vec!["ro".into()],
        mount_point: "/mnt/d".into(),
    };
    assert_eq!(Storage::from(pb::Storage::from(&st)), st);
}

#[test]
fn network_types_round_trip() {
    let iface = Interface {
        device: "eth0".into(),
        name: "eth0".into(),
        ip_addresses: vec![
            IpAddress::new("172.16.0.2".parse().expect("ip"), 30),
            IpAddress::new("fd00::2".parse().expect("ip"), 64),
        ],
        mtu: 1400,
        hw_addr: "02:00:00:00:00:01".into(),
    };
    let wire = tpb::Interface::from(&iface);
    assert_eq!(
        wire.IPAddresses[1].family.enum_value(),
        Ok(tpb::IPFamily::v6)
    );
    assert_eq!(Interface::try_from(wire).expect("back"), iface);
    let routes = vec![
        Route {
            gateway: "172.16.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        },
        Route {
            dest: "fd00::/64".into(),
            device: "eth0".into(),
            scope: crate::net::SCOPE_LINK,
            family: IpFamily::V6,
            ..Default::default()
        },
    ];
    let wire = pb::Routes::from(routes.as_slice());
    assert_eq!(Vec::<Route>::try_from(wire).expect("back"), routes);
    let ifaces = pb::Interfaces::from(std::slice::from_ref(&iface));
    assert_eq!(
        Vec::<Interface>::try_from(ifaces).expect("back"),
        vec![iface]
    );
    let mut unknown = tpb::Route::from(&routes[0]);
    unknown.family = EnumOrUnknown::from_i32(7);
    assert!(Route::try_from(unknown).is_err());
}

/// Kata's tags: `Interface.hwAddr` is 5, `IPAddress.mask` 3, `Route.family` 6, and
/// `UpdateInterfaceRequest.interface` 1.
#[test]
fn network_wire_tags_match_kata() {
    let iface = Interface {
        mtu: 1,
        hw_addr: "m".into(),
        ..Default::default()
    };
    let bytes = tpb::Interface::from(&iface)
        .write_to_bytes()
        .expect("encode");
    assert_eq!(bytes, vec![0x20, 0x01, 0x2a, 0x01, b'm']);
    let a = IpAddress {
        family: IpFamily::V6,
        address: String::new(),
        mask: "8".into(),
    };
    let bytes = tpb::IPAddress::from(&a).write_to_bytes().expect("encode");
    assert_eq!(bytes, vec![0x08, 0x01, 0x1a, 0x01, b'8']);
    let r = Route {
        scope: 253,
        family: IpFamily::V6,
        ..Default::default()
    };
    let bytes = tpb::Route::from(&r).write_to_bytes().expect("encode");
    assert_eq!(bytes, vec![0x28, 0xfd, 0x01, 0x30, 0x01]);
    let req = pb::UpdateInterfaceRequest {
        interface: MessageField::some(tpb::Interface::from(&iface)),
        ..Default::default()
    };
    let bytes = req.write_to_bytes().expect("encode");
    assert_eq!(&bytes[..2], &[0x0a, 0x05]);
}
