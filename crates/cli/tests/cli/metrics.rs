//! `init` with a metrics address that something else holds: it fails at once with one line,
//! before any VM or template is made, and leaves the other listener alone. No QEMU needed: the
//! endpoint starts before anything boots. Uses the helpers of `cli.rs`.

use std::path::Path;

use super::{assert_one_line_error, Scratch};

/// Nothing of a VM-cache server is left under the scratch directory.
fn nothing_made(s: &Scratch) {
    assert!(!s.path().join("cache.sock").exists(), "no server socket");
    assert!(!s.path().join("tpl").exists(), "no template");
    let vms = s.path().join("run/vm");
    let count = std::fs::read_dir(&vms).map_or(0, |d| d.count());
    assert_eq!(count, 0, "no VM directories in {}", vms.display());
}

fn with_metrics(s: &Scratch, address: &str) -> std::path::PathBuf {
    let text = s.config(false, 1).replace(
        "vm_cache_number = 1",
        &format!("vm_cache_number = 1\nmetrics_address = \"{address}\""),
    );
    s.write(&text)
}

#[test]
fn init_refuses_a_taken_tcp_port_and_makes_nothing() {
    let s = Scratch::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let o = s.run(&with_metrics(&s, &address), &["init"]);
    assert_one_line_error(
        &o,
        1,
        &[
            &format!("Cannot serve metrics on {address}"),
            &format!("Metrics address {address} is in use"),
        ],
    );
    nothing_made(&s);
}

#[test]
fn init_refuses_a_live_metrics_socket_and_leaves_it() {
    let s = Scratch::new();
    let path = s.path().join("metrics.sock");
    let _live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let address = format!("unix:{}", path.display());
    let o = s.run(&with_metrics(&s, &address), &["init"]);
    assert_one_line_error(&o, 1, &[&format!("Metrics address {address} is in use")]);
    assert!(
        Path::new(&path).exists(),
        "the other listener's socket is kept"
    );
    nothing_made(&s);
}

#[test]
fn destroy_removes_a_stale_metrics_socket_and_nothing_else() {
    let s = Scratch::new();
    let path = s.path().join("metrics.sock");
    let cfg = with_metrics(&s, &format!("unix:{}", path.display()));
    // What a killed `init` leaves: the socket file, nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
    assert!(
        super::stdout(&o).contains("removed the stale metrics socket"),
        "{}",
        super::stdout(&o)
    );
    assert!(!path.exists());
    // A live listener, or a file that is not a socket, is left alone.
    let live = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
    assert!(path.exists(), "a live endpoint stays");
    drop(live);
    std::fs::remove_file(&path).expect("rm");
    std::fs::write(&path, b"not a socket").expect("file");
    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
    assert!(path.exists(), "a regular file stays");
}
