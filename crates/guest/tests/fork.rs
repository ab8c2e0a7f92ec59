//! `PrepareTemplate` and the VM-fork barrier through the real client and server: a guest with
//! a bound VMGenID driver is armed, and then holds the clock call and random reads until its
//! (fake) kernel log shows the fork reseed; a guest without the driver, or an agent without
//! the call, says its clones need the host's reseed.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::{agent, url, FakeGuest};
use vmfactory_agent::{Agent, ForkReseed, KataAgent};
use vmfactory_guest::server::fork::FORK_RESEED_LOG;
use vmfactory_guest::server::{services, AgentServer};

const T: Duration = Duration::from_secs(5);

/// Gives the fake guest a bound vmgenid device and a FIFO for `/dev/kmsg`.
fn with_vmgenid(guest: &FakeGuest) {
    let drv = guest.paths.sys.join("bus/platform/drivers/vmgenid");
    std::fs::create_dir_all(&drv).expect("driver dir");
    std::os::unix::fs::symlink("../../../../devices/QEMUVGID:00", drv.join("QEMUVGID:00"))
        .expect("device link");
    nix::unistd::mkfifo(&guest.paths.dev.join("kmsg"), nix::sys::stat::Mode::S_IRWXU)
        .expect("fifo");
}

/// A guest with a bound VMGenID driver, served on a unix socket and armed by `PrepareTemplate`:
/// its server, socket path, a client, and the writer of its kernel log (opened after the agent
/// opened it, as a FIFO must be).
async fn armed(guest: &FakeGuest) -> (AgentServer, PathBuf, KataAgent, std::fs::File) {
    with_vmgenid(guest);
    let (server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), T);
    assert_eq!(
        a.prepare_template().await.expect("prepare"),
        ForkReseed::Active
    );
    let kmsg = std::fs::OpenOptions::new()
        .write(true)
        .open(guest.paths.dev.join("kmsg"))
        .expect("kmsg writer");
    (server, path, a, kmsg)
}

#[tokio::test]
async fn a_clone_answers_the_clock_call_only_after_the_fork_reseed() {
    let guest = FakeGuest::new();
    let (_server, path, a, mut kmsg) = armed(&guest).await;
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = tokio::spawn({
        let a = agent(url("unix", &path), T);
        async move { a.set_guest_date_time(t).await }
    });
    let random = tokio::spawn({
        let a = agent(url("unix", &path), T);
        async move { a.random(4).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!clock.is_finished() && !random.is_finished(), "held");
    // Calls that reveal nothing of the CRNG are not held.
    a.check().await.expect("check");
    writeln!(kmsg, "5,900,7412320,-;random: {FORK_RESEED_LOG}").expect("log");
    clock.await.expect("join").expect("clock set");
    assert_eq!(random.await.expect("join").expect("random").len(), 4);
    assert_eq!(a.guest_time().await.expect("time"), t);
}

/// A held clock call sets a time stale by the hold; the round trip it reports says so, which
/// is how `Vm::sync_time` knows to set the clock again.
#[tokio::test]
async fn a_held_clock_sync_reports_its_round_trip() {
    let guest = FakeGuest::new();
    let (_server, path, a, mut kmsg) = armed(&guest).await;
    let before = SystemTime::now();
    let sync = tokio::spawn({
        let a = agent(url("unix", &path), T);
        async move { a.sync_guest_clock().await }
    });
    let hold = Duration::from_millis(300);
    tokio::time::sleep(hold).await;
    writeln!(kmsg, "5,900,7412320,-;random: {FORK_RESEED_LOG}").expect("log");
    let round_trip = sync.await.expect("join").expect("clock set");
    assert!(round_trip >= hold, "round trip {round_trip:?}");
    let set = a.guest_time().await.expect("time");
    assert!(set >= before && set <= before + round_trip, "{set:?}");
    // Unheld now: the next call is quick.
    let again = a.sync_guest_clock().await.expect("again");
    assert!(again < hold, "round trip {again:?}");
}

#[tokio::test]
async fn without_a_vmgenid_driver_clones_need_the_hosts_reseed() {
    let guest = FakeGuest::new();
    let (_server, path) = guest.serve_unix().await;
    let a = agent(url("unix", &path), T);
    match a.prepare_template().await.expect("prepare") {
        ForkReseed::Inactive(reason) => assert!(reason.contains("VMGenID"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Nothing is held.
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(7);
    tokio::time::timeout(Duration::from_secs(2), a.set_guest_date_time(t))
        .await
        .expect("at once")
        .expect("set");
}

#[tokio::test]
async fn an_agent_without_the_call_is_inactive() {
    let guest = FakeGuest::new();
    with_vmgenid(&guest);
    let mut map = services(guest.agent());
    assert!(map.remove("vmfactory.template.Template").is_some());
    let path = guest.sock("old.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let accepted = futures::stream::unfold(listener, |l| async move {
        Some((l.accept().await.map(|(s, _)| s), l))
    });
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(ttrpc::asynchronous::transport::Listener::new(accepted))
        .register_service(map);
    server.start().await.expect("start");
    let a = agent(url("unix", &path), T);
    match a.prepare_template().await.expect("no error") {
        ForkReseed::Inactive(reason) => assert!(reason.contains("PrepareTemplate"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let _ = server.shutdown().await;
}
