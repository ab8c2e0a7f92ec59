//! `logs ID [-f]` on console logs laid out as a running VM's and a failed VM's are, without
//! QEMU; and `destroy` removing the failed VMs' logs. Uses the helpers of `cli.rs`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{assert_one_line_error, stderr, stdout, Scratch, BIN};

const RUNNING: &str = "3f9e5c74-6d2a-4c79-8a9f-7abc5e4f3a03";
const FAILED: &str = "4a0f6d85-7e3b-4d8a-9b0a-8bcd6f5a4b04";

#[test]
fn logs_prints_running_and_failed_vms_and_refuses_unknown_ids() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let root = s.path().join("run");
    let vm = root.join("vm").join(RUNNING);
    std::fs::create_dir_all(&vm).expect("vm dir");
    // The previous chunk first, then the current one.
    std::fs::write(vm.join("console.log.1"), "old 1\nold 2\n").expect("old log");
    std::fs::write(vm.join("console.log"), "new 1\n").expect("log");
    let o = s.run(&cfg, &["logs", RUNNING]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "old 1\nold 2\nnew 1\n");

    let failed = root.join("failed").join(FAILED);
    std::fs::create_dir_all(&failed).expect("failed dir");
    std::fs::write(failed.join("console.log"), "Kernel panic\n").expect("failed log");
    let o = s.run(&cfg, &["logs", FAILED]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "Kernel panic\n");
    // `status` lists it with its log (it does not make the factory degraded).
    let o = s.run(&cfg, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status JSON");
    assert_eq!(v["failed_vms"][0]["id"], FAILED, "{v}");
    assert_eq!(
        v["failed_vms"][0]["console_log"],
        failed.join("console.log").display().to_string()
    );
    let table = stdout(&s.run(&cfg, &["status"]));
    assert!(
        table.contains("failed VMs:    1 kept for a post-mortem"),
        "{table}"
    );
    // `-f` on a failed VM: nothing to follow, it ends.
    let o = s.run(&cfg, &["logs", "-f", FAILED]);
    assert_eq!(stdout(&o), "Kernel panic\n");

    // As `exec`: an id that names no VM (or is no id at all) is a usage error.
    for id in [
        "5b1a7e96-0000-4e9b-8c1b-9cde7a6b5c05",
        "../failed",
        "a/b",
        "",
    ] {
        let o = s.run(&cfg, &["logs", id]);
        assert_one_line_error(&o, 2, &["No VM", "under"]);
        assert!(stdout(&o).is_empty());
    }

    // A VM directory without a log yet (a `none` proxy writes none): one line, exit 1.
    std::fs::remove_file(vm.join("console.log")).expect("rm");
    std::fs::remove_file(vm.join("console.log.1")).expect("rm");
    let o = s.run(&cfg, &["logs", RUNNING]);
    assert_one_line_error(&o, 1, &["no console log", RUNNING]);

    // `destroy` removes the failed VMs' logs (the running VM's directory is not its to end
    // here: no lock was ever taken on it, so it is left to the orphan reaper's rules).
    std::fs::remove_dir_all(&vm).expect("rm vm");
    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("failed to come up"), "{}", stdout(&o));
    assert!(!root.join("failed").exists());
    let o = s.run(&cfg, &["logs", FAILED]);
    assert_one_line_error(&o, 2, &["No VM"]);
}

#[test]
fn logs_follow_prints_new_lines_across_a_rotation_and_ends_when_the_vm_goes() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let vm = s.path().join("run").join("vm").join(RUNNING);
    std::fs::create_dir_all(&vm).expect("vm dir");
    let log = vm.join("console.log");
    std::fs::write(&log, "boot\n").expect("log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .args(["logs", "-f", RUNNING])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let append = |text: &str| {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .expect("open");
        f.write_all(text.as_bytes()).expect("append");
    };
    std::thread::sleep(Duration::from_millis(500));
    append("later\n");
    std::thread::sleep(Duration::from_millis(500));
    // The proxy's rotation: the full chunk moves to console.log.1, a new file begins.
    std::fs::rename(&log, vm.join("console.log.1")).expect("rotate");
    append("after rotation\n");
    std::thread::sleep(Duration::from_millis(500));
    // The VM stops: its directory goes, and `logs -f` ends by itself.
    let t0 = Instant::now();
    std::fs::remove_dir_all(&vm).expect("rm vm");
    let o = child.wait_with_output().expect("wait");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "boot\nlater\nafter rotation\n");
}
