//! A VM's network on this host's kernel (root and `nft` needed): what it makes, what removing
//! it leaves (nothing), and what a failure at each step leaves (nothing).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use vmfactory_net::{host_links, netns, NetStep, NetworkConfig, VmNetwork, GUEST_GATEWAY, TAP};

/// The tests compare the host's links before and after: one at a time.
static HOST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ip_in(ns: &Path, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn links() -> BTreeSet<String> {
    host_links().await.expect("links").into_iter().collect()
}

#[tokio::test]
async fn a_network_is_made_and_removed_whole() {
    let _host = HOST.lock().await;
    let before = links().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = NetworkConfig::default();
    let a = VmNetwork::create(&cfg, &dir.path().join("a"))
        .await
        .expect("a");
    let b = VmNetwork::create(&cfg, &dir.path().join("b"))
        .await
        .expect("b");
    assert_ne!(a.address, b.address, "each VM its own address");
    assert_ne!(a.host_link, b.host_link);
    assert!(cfg.subnet.contains(&a.address) && cfg.subnet.contains(&b.host_address));
    let now = links().await;
    assert!(now.contains(&a.host_link) && now.contains(&b.host_link));
    // The host's table is in place, and stays while VMs have links.
    let table = Command::new("nft")
        .args(["list", "table", "inet", vmfactory_net::HOST_TABLE])
        .output()
        .expect("nft");
    assert!(table.status.success(), "no host table");
    assert!(!vmfactory_net::remove_host_rules_if_unused()
        .await
        .expect("remove if unused"));
    // Inside: the tap with the guest's gateway, the uplink with the VM's address, a default
    // route; the same guest-side addresses in both.
    for net in [&a, &b] {
        let addrs = ip_in(&net.netns, &["-br", "addr"]);
        assert!(
            addrs.contains(TAP) && addrs.contains(&GUEST_GATEWAY.to_string()),
            "{addrs}"
        );
        assert!(addrs.contains(&net.address.to_string()), "{addrs}");
        assert!(
            ip_in(&net.netns, &["route"]).contains(&format!("default via {}", net.host_address))
        );
    }
    // The host reaches the VM's address through its link.
    let route = Command::new("ip")
        .args(["route", "get", &a.address.to_string()])
        .output()
        .expect("ip");
    assert!(String::from_utf8_lossy(&route.stdout).contains(&a.host_link));
    for net in [a, b] {
        net.remove().await.expect("remove");
        net.remove().await.expect("twice");
        assert!(!net.netns.exists() && !netns::is_pinned(&net.netns));
    }
    assert_eq!(links().await, before, "links left behind");
}

#[tokio::test]
async fn a_failure_at_any_step_leaves_nothing() {
    let _host = HOST.lock().await;
    let before = links().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = NetworkConfig::default();
    for step in [
        NetStep::Namespace,
        NetStep::Tap,
        NetStep::Link,
        NetStep::Addresses,
        NetStep::Rules,
        NetStep::HostRules,
    ] {
        let path = dir.path().join(format!("{step:?}"));
        let err = VmNetwork::create_failing_at(&cfg, &path, step)
            .await
            .expect_err("injected");
        assert!(err.to_string().contains("injected"), "{err}");
        assert!(
            !path.exists() && !netns::is_pinned(&path),
            "{step:?} left its pin"
        );
        assert_eq!(links().await, before, "{step:?} left a link");
    }
    // A taken pin path fails before anything is made, and is left alone.
    let taken = dir.path().join("taken");
    std::fs::write(&taken, b"").expect("file");
    assert!(VmNetwork::create(&cfg, &taken).await.is_err());
    assert!(taken.exists());
    assert_eq!(links().await, before);
}

#[test]
fn bad_subnets_are_refused_with_a_hint() {
    let mut cfg = NetworkConfig::new("10.201.0.0/31".parse().expect("net"));
    assert!(cfg
        .validate()
        .expect_err("/31")
        .to_string()
        .contains("prefix of 30 or less"));
    cfg.subnet = "10.201.3.0/16".parse().expect("net");
    assert!(cfg
        .validate()
        .expect_err("host bits")
        .to_string()
        .contains("10.201.0.0/16"));
    cfg.subnet = "10.201.0.0/28".parse().expect("net");
    assert_eq!(cfg.capacity(), 4);
}
