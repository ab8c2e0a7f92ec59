//! Guest consoles through the `vmfactory` binary on real QEMU: a VM that cannot come up (its
//! initramfs has no such init, so the kernel panics) fails `get` with its last console lines
//! in the one-line error (more with `-v`) and its console log kept under
//! `<run_root>/failed/<id>/` until `destroy`; `logs ID` prints a held VM's boot lines and `-f`
//! shows a line the guest prints later and ends when the VM stops.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vmfactory_e2e::cli::{ok, run, Held, Setup};
use vmfactory_e2e::scaled;

/// A `Setup` booting each VM directly (no template, no server), with `extra` kernel params.
fn direct_boot(kernel_params: Option<&str>) -> Option<Setup> {
    let s = Setup::new(0)?;
    let mut text = std::fs::read_to_string(&s.cfg).expect("config");
    text = text.replace("enable_template = true", "enable_template = false");
    if let Some(params) = kernel_params {
        text = text.replace(
            "default_vcpus = 1",
            &format!("kernel_params = \"{params}\"\ndefault_vcpus = 1"),
        );
    }
    std::fs::write(&s.cfg, text).expect("config");
    Some(s)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_vm_that_cannot_boot_reports_its_console_and_keeps_its_log() {
    let Some(s) = direct_boot(Some("rdinit=/nonexistent")) else {
        return;
    };
    let (bin, cfg, root) = (&s.bin, &s.cfg, s.root.path());
    let o = run(bin, cfg, &["get"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("vmfactory: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    let line = lines[0];
    assert!(line.contains("failed to come up (console: \""), "{line}");
    let failed = root.join("failed");
    let kept = line
        .split("log kept at ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .expect("the kept log's path");
    let kept = Path::new(kept);
    assert!(kept.starts_with(&failed), "{line}");
    let log = std::fs::read_to_string(kept).expect("kept log");
    assert!(log.contains("Kernel panic"), "{log}");
    // The error quotes the guest's last console line (the end of the panic's trace).
    let last = log.lines().last().expect("a console line");
    assert!(
        line.contains(&format!("{last:?}")),
        "{last:?} not in {line}"
    );
    let id = kept
        .parent()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str())
        .expect("id")
        .to_owned();
    assert!(!root.join("vm").join(&id).exists(), "run dir removed");

    // `logs ID` prints the kept log.
    let printed = ok(&run(bin, cfg, &["logs", &id]), "logs of a failed VM");
    assert_eq!(printed, log);

    // `-v`: the causes one per line and the last 20 console lines.
    let o = run(bin, cfg, &["-v", "get"]);
    let verbose = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{verbose}");
    assert!(verbose.contains("  console (last "), "{verbose}");
    let console_lines = verbose.lines().filter(|l| l.starts_with("    | ")).count();
    assert!(console_lines > 3, "more than the one-line form: {verbose}");
    assert_eq!(
        std::fs::read_dir(&failed).expect("failed dir").count(),
        2,
        "one kept log per failed VM"
    );

    let out = ok(&run(bin, cfg, &["destroy"]), "destroy");
    assert!(out.contains("failed to come up"), "{out}");
    assert!(!failed.exists());
    s.root.assert_no_leaks();
}

#[test]
fn logs_prints_a_held_vms_console_and_follows_it_until_it_stops() {
    let Some(s) = direct_boot(None) else { return };
    let (bin, cfg) = (&s.bin, &s.cfg);
    let (holder, got) = Held::start(bin, cfg);
    let id = got["id"].as_str().expect("id").to_owned();

    // Its boot: the agent announcing itself on the console.
    let printed = ok(&run(bin, cfg, &["logs", &id]), "logs");
    assert!(printed.contains("vmfactory-agent"), "{printed}");

    // `-f`, then a line the guest prints now (at a level `quiet` still shows).
    let mut follower = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .args(["logs", "-f", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn logs -f");
    let (tx, rx) = mpsc::channel();
    let follow_out = follower.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(follow_out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let marker = format!("postmortem-marker-{}", std::process::id());
    let o = run(
        bin,
        cfg,
        &[
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            &format!("echo '<2>{marker}' > /dev/kmsg"),
        ],
    );
    ok(&o, "exec");
    let deadline = std::time::Instant::now() + scaled(Duration::from_secs(20));
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains(&marker)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("logs -f did not show {marker}: {seen:#?}"),
        }
    }
    assert!(
        seen.iter().any(|l| l.contains("vmfactory-agent")),
        "-f prints the log so far first: {seen:#?}"
    );

    // The VM stops: `logs -f` ends by itself, successfully.
    holder.stop();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(follower.wait());
    });
    let status = done_rx
        .recv_timeout(scaled(Duration::from_secs(10)))
        .expect("logs -f ends when the VM stops")
        .expect("wait");
    assert!(status.success(), "{status}");
    ok(&run(bin, cfg, &["destroy"]), "destroy");
    s.root.assert_no_leaks();
}
