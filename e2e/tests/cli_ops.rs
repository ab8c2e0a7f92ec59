//! The `vmfactory` binary as an operator runs it, on real QEMU: `init` under a stand-in
//! systemd (a `NOTIFY_SOCKET` the test reads: READY=1 once the pool is full, STOPPING=1 on
//! SIGTERM); `status` as a health probe (0 healthy; 1 when the server is down, or the template
//! is stale for the config: the check `get_vm` makes); `list` of the server's VMs and of a held
//! one; `stop` of a held VM, refused for the server's pool. Nothing is left afterwards.

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmfactory_e2e::cli::{ok, run, status_out, Held, Server, Setup};
use vmfactory_e2e::scaled;

/// Bound on `init` having made the template and filled the pool (TCG: a few seconds).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Reads notifications until one contains `want`; all that came, in order.
fn wait_for(sock: &UnixDatagram, want: &str, init: &mut Server) -> Vec<String> {
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(Some(exit)) = init.0.try_wait() {
            panic!("init exited ({exit}) before {want}: {seen:?}");
        }
        assert!(
            t0.elapsed() < scaled(READY_TIMEOUT),
            "no {want} after {:?}: {seen:?}",
            scaled(READY_TIMEOUT)
        );
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = msg.lines().any(|l| l == want);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }
}

fn list(bin: &Path, cfg: &Path) -> Vec<serde_json::Value> {
    let out = ok(&run(bin, cfg, &["list", "--json"]), "list --json");
    serde_json::from_str::<serde_json::Value>(&out)
        .expect("list JSON")
        .as_array()
        .expect("array")
        .clone()
}

#[test]
fn init_notifies_systemd_status_probes_list_and_stop() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(1)
    else {
        return;
    };
    let notify_path = scratch.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify_path).expect("bind NOTIFY_SOCKET");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut init = Server(
        Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .arg("init")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(fs::File::create(scratch.path().join("init.err")).expect("log"))
            .spawn()
            .expect("spawn init"),
    );
    let seen = wait_for(&sock, "READY=1", &mut init);
    eprintln!("notifications: {seen:?}");
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=creating the template")),
        "{seen:?}"
    );
    // READY only once the pool is full: `status` says so right away.
    let o = run(&bin, &cfg, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o, "healthy status")).expect("JSON");
    assert_eq!(v["health"], "ok", "{v}");
    assert_eq!(
        v["cache_server"]["vms"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );
    let server = u64::from(init.0.id());

    // The pool's VM and the QEMU pre-started for the next clone, both the server's.
    let vms = list(&bin, &cfg);
    let mut sources: Vec<&str> = vms.iter().filter_map(|v| v["source"].as_str()).collect();
    sources.sort_unstable();
    assert_eq!(sources, ["cache", "cache-prestart"], "{vms:?}");
    for vm in &vms {
        assert_eq!(vm["owner_pid"], server, "{vm}");
        assert!(vm["pid"].is_u64(), "a live QEMU: {vm}");
    }
    let pooled = vms
        .iter()
        .find(|vm| vm["pid"].is_u64() && vm["vcpus"].is_u64())
        .expect("a pooled VM with a QEMU")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let o = run(&bin, &cfg, &["stop", &pooled]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("VM-cache server's pool"),
        "{o:?}"
    );

    // A held VM: listed with its holder as owner; `stop` asks the holder, which stops it.
    let (mut held, vm) = Held::start(&bin, &cfg);
    let id = vm["id"].as_str().expect("id").to_owned();
    let listed = list(&bin, &cfg);
    let mine = listed
        .iter()
        .find(|v| v["id"] == id.as_str())
        .expect("held VM listed");
    assert_eq!(mine["owner_pid"], u64::from(held.0.id()), "{mine}");
    assert_eq!(mine["source"], "template", "a clone, handed out: {mine}");
    assert_eq!(mine["pid"], vm["pid"], "{mine}");
    assert!(
        mine["age_secs"].as_u64().is_some_and(|a| a < 3600),
        "{mine}"
    );
    let table = ok(&run(&bin, &cfg, &["ps"]), "ps");
    assert!(
        table.contains(&id) && table.contains("get --hold"),
        "{table}"
    );
    let out = ok(&run(&bin, &cfg, &["stop", &id]), "stop");
    assert!(out.contains("stopped (by its owner"), "{out}");
    let exit = held.0.wait().expect("get --hold exits");
    assert!(
        exit.success(),
        "the holder stopped its VM and exited 0: {exit}"
    );
    assert!(
        !root.path().join("vm").join(&id).exists(),
        "its run dir is gone"
    );

    // As `systemctl stop` does: SIGTERM; STOPPING=1, then a clean exit.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(init.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    wait_for(&sock, "STOPPING=1", &mut init);
    let exit = init.0.wait().expect("init exits");
    assert!(exit.success(), "init exited {exit}");
    // Configured but not there: degraded, exit 1, both reasons.
    let o = run(&bin, &cfg, &["status"]);
    assert_eq!(o.status.code(), Some(1));
    let table = status_out(&o, "degraded status");
    assert!(table.contains("health:        degraded"), "{table}");
    assert!(
        table.contains("no template at") && table.contains("not running"),
        "{table}"
    );

    // A template kept by `init` without a cache, then the config changes under it: stale.
    let text = fs::read_to_string(&cfg).expect("config");
    let template_only = scratch.path().join("template-only.toml");
    fs::write(
        &template_only,
        text.replace("vm_cache_number = 1", "vm_cache_number = 0"),
    )
    .expect("write");
    ok(&run(&bin, &template_only, &["init"]), "template-only init");
    let o = run(&bin, &template_only, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o, "status")).expect("JSON");
    assert_eq!(v["health"], "ok", "{v}");
    let changed = scratch.path().join("changed.toml");
    fs::write(
        &changed,
        fs::read_to_string(&template_only)
            .expect("config")
            .replace("default_memory = 256", "default_memory = 384"),
    )
    .expect("write");
    let o = run(&bin, &changed, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(1), "stale is degraded");
    let v: serde_json::Value = serde_json::from_str(&status_out(&o, "stale")).expect("JSON");
    let stale = v["template"]["stale"].as_str().expect("stale reason");
    assert!(stale.contains("memory_mib"), "{v}");
    assert!(
        v["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains("template stale")),
        "{v}"
    );
    ok(&run(&bin, &template_only, &["destroy"]), "destroy");
    root.assert_no_leaks();
}
