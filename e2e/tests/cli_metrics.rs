//! The metrics endpoint of a real `vmfactory init` on QEMU: a template and a VM-cache server
//! of 2 VMs with `metrics_address` on a unix socket; one `get`; a scrape over HTTP counts it
//! as a `cache` hand-out, shows the pool's target and size, the VMs alive and the template's
//! age; `destroy` stops the server and the metrics socket is gone.

use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmfactory_e2e::cli::{ok, run, Server, Setup};
use vmfactory_e2e::scaled;

/// Bound on `init` having made the template and filled the pool (TCG: ~3 s + ~0.5 s).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on the server exiting after `destroy`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET /metrics` over the unix socket: the body of a 200 response, or `None` while nothing
/// listens yet.
fn scrape(socket: &Path) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    Some(body.to_owned())
}

/// The value of the sample named exactly `name` (labels included).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
}

/// Scrapes until `ready` holds, failing after [`READY_TIMEOUT`] or if `init` exits first.
fn scrape_until(socket: &Path, init: &mut Server, ready: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(exit)) = init.0.try_wait() {
            panic!("init exited early ({exit})");
        }
        if let Some(text) = scrape(socket) {
            if ready(&text) {
                return text;
            }
        }
        assert!(
            t0.elapsed() < scaled(READY_TIMEOUT),
            "not ready after {:?}: {:?}",
            scaled(READY_TIMEOUT),
            scrape(socket)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn init_serves_metrics_that_count_a_get_and_destroy_removes_the_socket() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(2)
    else {
        return;
    };
    let socket = scratch.path().join("metrics.sock");
    let text = fs::read_to_string(&cfg).expect("config").replace(
        "vm_cache_number = 2",
        &format!(
            "vm_cache_number = 2\nmetrics_address = \"unix:{}\"",
            socket.display()
        ),
    );
    fs::write(&cfg, text).expect("config");
    let err_log = scratch.path().join("init.err");
    let out_log = scratch.path().join("init.out");
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("init")
        .stdout(fs::File::create(&out_log).expect("log"))
        .stderr(fs::File::create(&err_log).expect("log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmfactory init");
    let mut server = Server(child);

    let pool = |t: &str| sample(t, "vmfactory_pool_size");
    let ready = scrape_until(&socket, &mut server, |t| pool(t) == Some(2.0));
    let mode = fs::metadata(&socket).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the metrics socket is 0600");
    assert_eq!(
        sample(&ready, "vmfactory_pool_target"),
        Some(2.0),
        "{ready}"
    );
    assert_eq!(
        sample(&ready, "vmfactory_get_vm_total{source=\"cache\"}"),
        Some(0.0)
    );

    let got: serde_json::Value =
        serde_json::from_str(&ok(&run(&bin, &cfg, &["get"]), "get")).expect("get JSON");
    assert_eq!(got["source"], "cache");
    // The worker refills the slot the `get` freed.
    let after = scrape_until(&socket, &mut server, |t| pool(t) == Some(2.0));
    eprintln!("scrape after one get:\n{after}");
    let count = |source: &str| {
        sample(
            &after,
            &format!("vmfactory_get_vm_total{{source=\"{source}\"}}"),
        )
    };
    assert_eq!(count("cache"), Some(1.0), "{after}");
    for other in ["template", "direct", "fallback"] {
        assert_eq!(count(other), Some(0.0), "{other}: {after}");
    }
    assert_eq!(
        sample(
            &after,
            "vmfactory_get_vm_duration_seconds_count{source=\"cache\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&after, "vmfactory_pool_target"), Some(2.0));
    let alive = sample(&after, "vmfactory_vms_alive").expect("vms alive");
    assert!(alive >= 2.0, "{after}");
    let age = sample(&after, "vmfactory_template_age_seconds").expect("template age");
    assert!((0.0..3600.0).contains(&age), "{after}");

    let out = ok(&run(&bin, &cfg, &["destroy"]), "destroy");
    assert!(out.contains("stopped the VM-cache server"), "{out}");
    let deadline = Instant::now() + scaled(EXIT_TIMEOUT);
    let exit = loop {
        if let Some(exit) = server.0.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "init did not exit after destroy");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        exit.success(),
        "init exited with {exit}: {}",
        fs::read_to_string(&err_log).unwrap_or_default()
    );
    assert!(!socket.exists(), "the metrics socket was removed");
    let printed = fs::read_to_string(&out_log).unwrap_or_default();
    assert!(
        printed.contains(&format!(
            "metrics: unix:{} (GET /metrics)",
            socket.display()
        )),
        "{printed}"
    );
    root.assert_no_leaks();
}
