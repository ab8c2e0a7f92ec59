//! The `vmfactory` binary on real QEMU: `init` (a template and a VM-cache server keeping 2
//! VMs, run in the background as a child of the test) → `status --json` (the template's
//! metadata, the server's pid and VMs) → `get --vcpus 2 --memory 512` (a VM grown by hotplug,
//! printed as JSON and stopped when `get` exits) → `destroy` (the server quits, the template
//! goes) → nothing left under the run root: no process, mount, socket or directory. And what
//! a `kill -9` of `init` or `get` leaves: `status` shows it, `init` and `destroy` end exactly
//! the recorded processes (an operator's `tail -f` of a VM's file survives).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vmfactory_e2e::cli::{ok, run, status_out, Held, Server, Setup};
use vmfactory_e2e::scaled;

/// Bound on `init` having made the template and filled the pool (TCG: ~3 s + ~0.5 s).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on the server exiting after `destroy`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

fn alive(pid: u64) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

#[test]
fn init_status_get_destroy_leaves_nothing() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(2)
    else {
        return;
    };
    let out_log = scratch.path().join("init.out");
    let err_log = scratch.path().join("init.err");

    let t0 = Instant::now();
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
    let server_pid = u64::from(server.0.id());

    // status --json until the template is there and the server holds 2 VMs.
    let status = loop {
        if let Ok(Some(exit)) = server.0.try_wait() {
            panic!(
                "init exited early ({exit}): {}",
                fs::read_to_string(&err_log).unwrap_or_default()
            );
        }
        let o = run(&bin, &cfg, &["status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&status_out(&o, "status --json")).expect("status JSON");
        let vms = v["cache_server"]["vms"].as_array().map_or(0, Vec::len);
        if v["template"]["present"] == true && v["cache_server"]["running"] == true && vms == 2 {
            break v;
        }
        assert!(
            t0.elapsed() < scaled(READY_TIMEOUT),
            "not ready after {:?}: {v}",
            scaled(READY_TIMEOUT)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("init → template + 2 cached VMs in {:?}", t0.elapsed());
    assert_eq!(status["factory"], "on");
    assert_eq!(status["health"], "ok", "{status}");
    let meta = &status["template"]["metadata"];
    assert_eq!(meta["memory_mib"], 256, "{status}");
    assert!(meta["config_hash"].as_str().is_some_and(|h| !h.is_empty()));
    // `accel = "auto"` in the file; the template records what it resolved to.
    let accel = meta["key"]["accel"].as_str();
    assert!(matches!(accel, Some("kvm" | "tcg")), "{status}");
    assert_eq!(status["cache_server"]["pid"], server_pid);
    for vm in status["cache_server"]["vms"].as_array().expect("vms") {
        let pid = vm["pid"].as_u64().expect("cached VM pid");
        assert!(alive(pid), "cached VM {pid} runs");
    }
    // Healthy: exit 0.
    let table = ok(&run(&bin, &cfg, &["status"]), "status");
    assert!(table.starts_with("factory:       on"), "{table}");
    assert!(table.contains("health:        ok"), "{table}");

    // get: a VM from the server, grown to 2 vCPUs / 512 MiB, stopped when `get` exits.
    let t = Instant::now();
    let o = run(&bin, &cfg, &["get", "--vcpus", "2", "--memory", "512"]);
    let got: serde_json::Value = serde_json::from_str(&ok(&o, "get")).expect("get JSON");
    eprintln!("get (2 vCPUs, 512 MiB) in {:?}: {got}", t.elapsed());
    let pid = got["pid"].as_u64().expect("pid");
    assert_eq!(got["vcpus"], 2);
    assert_eq!(got["memory_mib"], 512);
    assert_eq!(got["source"], "cache");
    assert!(got["agent_url"]
        .as_str()
        .is_some_and(|u| u.starts_with("serial://")));
    let run_dir = PathBuf::from(got["run_dir"].as_str().expect("run_dir"));
    assert!(run_dir.starts_with(root.path()));
    assert!(!alive(pid), "the VM {pid} was stopped when get exited");
    assert!(!run_dir.exists(), "its run dir is gone");

    // destroy: the server quits (stopping its VMs, removing the template it made).
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
    let printed = fs::read_to_string(&out_log).unwrap_or_default();
    assert!(
        printed.contains("template:") && printed.contains("VM-cache server: pid"),
        "{printed}"
    );
    let again = ok(&run(&bin, &cfg, &["destroy"]), "second destroy");
    assert_eq!(again.trim(), "nothing to destroy");
    // Configured but gone: degraded, exit 1.
    let o = run(&bin, &cfg, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(1), "status after destroy");
    let status = status_out(&o, "status after destroy");
    assert!(status.contains("\"factory\": \"off\""), "{status}");
    assert!(status.contains("\"health\": \"degraded\""), "{status}");
    root.assert_no_leaks();
}

/// The VM-cache server SIGKILLed while clients wait: every client gets a VM or an error (none
/// hangs), and `destroy` afterwards stops the server's orphaned VMs, removes its stale socket
/// and its template: nothing is left.
#[test]
fn killed_server_leaves_nothing_after_destroy() {
    let Some(Setup {
        bin,
        root,
        cfg,
        scratch: _scratch,
    }) = Setup::new(2)
    else {
        return;
    };
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("init")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmfactory init");
    let mut server = Server(child);
    let t0 = Instant::now();
    loop {
        let o = run(&bin, &cfg, &["status", "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&status_out(&o, "status --json")).expect("status JSON");
        if v["cache_server"]["vms"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(t0.elapsed() < scaled(READY_TIMEOUT), "not ready: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Four clients at once (two more than the pool holds), then the server dies.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&bin)
                .arg("--config")
                .arg(&cfg)
                .arg("get")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn get")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    server.0.kill().expect("SIGKILL the server");
    server.0.wait().expect("reap the server");
    let (mut got, mut failed) = (0, 0);
    for c in clients {
        let out = c.wait_with_output().expect("client exits");
        match out.status.code() {
            Some(0) => got += 1,
            Some(1) => {
                failed += 1;
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(err.trim_end().lines().count(), 1, "one-line error: {err}");
            }
            other => panic!(
                "client exit {other:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    eprintln!("after the kill: {got} clients got a VM, {failed} got an error");

    let out = ok(&run(&bin, &cfg, &["destroy"]), "destroy after the kill");
    assert!(out.contains("stale socket"), "{out}");
    assert!(out.contains("orphaned VM"), "{out}");
    root.assert_no_leaks();
}

/// Exit 2 and one line, naming the file.
fn bad_input(o: &Output, what: &str, names: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
    assert!(err.contains(names), "{what}: {err}");
}

#[test]
fn template_only_get_and_damaged_template_files() {
    let Some(Setup {
        bin,
        root,
        cfg,
        scratch: _scratch,
    }) = Setup::new(0)
    else {
        return;
    };

    // Without a cache, `init` makes the template and exits.
    ok(&run(&bin, &cfg, &["init"]), "init");
    let o = run(&bin, &cfg, &["get"]);
    let got: serde_json::Value = serde_json::from_str(&ok(&o, "get")).expect("get JSON");
    assert_eq!(got["source"], "template", "{got}");

    // The largest size `--help` and the docs promise (default_maxmemory) is served: one DIMM
    // of 768 MiB hot-added to the clone's 256.
    let o = run(&bin, &cfg, &["get", "--memory", "1024"]);
    let got: serde_json::Value = serde_json::from_str(&ok(&o, "get --memory 1024")).expect("JSON");
    assert_eq!(got["memory_mib"], 1024, "{got}");

    // Damaged stored files: bad input (2), one line naming the file, the template kept as it
    // is (get changes nothing) and no VM left running.
    let tpl = root.path().join("template");
    let (meta, state) = (tpl.join("metadata.json"), tpl.join("state"));
    let (meta_ok, state_ok) = (
        fs::read(&meta).expect("meta"),
        fs::read(&state).expect("state"),
    );
    let state_saved = fs::metadata(&state)
        .and_then(|m| m.modified())
        .expect("mtime");
    let half = &state_ok[..state_ok.len() / 2];
    for (what, file, bytes, names) in [
        (
            "corrupt metadata",
            &meta,
            &b"{\"version\": "[..],
            "metadata.json",
        ),
        ("truncated state", &state, half, "state"),
        ("empty state", &state, &b""[..], "state"),
        (
            "state rewritten after the save",
            &state,
            &state_ok[..],
            "state",
        ),
    ] {
        fs::write(file, bytes).expect("damage");
        bad_input(&run(&bin, &cfg, &["get"]), what, names);
        assert_eq!(
            fs::read(file).expect("read"),
            bytes,
            "{what}: left as it was"
        );
        fs::write(&meta, &meta_ok).expect("restore");
        fs::write(&state, &state_ok).expect("restore");
        // As saved: the template checks the state file's modification time too.
        fs::File::options()
            .write(true)
            .open(&state)
            .and_then(|f| f.set_modified(state_saved))
            .expect("restore mtime");
    }
    assert_eq!(
        vmfactory_e2e::processes_mentioning(&root.path().join("vm").to_string_lossy()).len(),
        0,
        "no VM left by the failed gets"
    );
    let o = run(&bin, &cfg, &["get"]);
    ok(&o, "get after the files were restored");

    ok(&run(&bin, &cfg, &["destroy"]), "destroy");
    root.assert_no_leaks();
}

/// Issue 13's stress: 4 `init`s, 8 `get`s and a `destroy` started together, for
/// `VMFACTORY_STRESS_ROUNDS` rounds (20). Whoever wins, after each round every command has
/// exited 0, or 1 with one line; there is a usable template (a `get` works) or none; no QEMU
/// runs; nothing is mounted but the template's tmpfs; nothing is under the run root but the
/// template. A final `destroy` leaves nothing.
#[test]
fn concurrent_inits_gets_and_destroy_leave_a_template_or_none() {
    let Some(Setup {
        bin,
        root,
        cfg,
        scratch: _scratch,
    }) = Setup::new(0)
    else {
        return;
    };
    let rounds: usize = std::env::var("VMFACTORY_STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let tpl = root.path().join("template");
    let root_text = root.path().to_string_lossy().into_owned();
    let mut tally = std::collections::BTreeMap::<(&str, i32), usize>::new();
    let (mut with_template, mut without) = (0, 0);
    for round in 0..rounds {
        let mut cmds: Vec<&str> = [["init"; 4].as_slice(), ["get"; 8].as_slice()].concat();
        // The destroy starts first, in the middle or last, in turn.
        cmds.insert([0, 6, 12][round % 3], "destroy");
        let children: Vec<(&str, Child)> = cmds
            .into_iter()
            .map(|cmd| {
                let child = Command::new(&bin)
                    .arg("--config")
                    .arg(&cfg)
                    .arg(cmd)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn vmfactory");
                (cmd, child)
            })
            .collect();
        for (cmd, child) in children {
            let out = child.wait_with_output().expect("command exits");
            let code = out.status.code().unwrap_or(-1);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                code == 0 || code == 1,
                "round {round}: {cmd} exited {code}: {err}"
            );
            if code == 1 {
                assert_eq!(
                    err.trim_end().lines().count(),
                    1,
                    "round {round}: {cmd}: one line: {err}"
                );
            }
            *tally.entry((cmd, code)).or_default() += 1;
        }

        let procs = vmfactory_e2e::processes_mentioning(&root_text);
        assert!(procs.is_empty(), "round {round}: still running: {procs:?}");
        let mounts = vmfactory_e2e::mounts_under(&root_text);
        let entries = vmfactory_e2e::entries_under(root.path());
        let outside: Vec<&String> = entries
            .iter()
            .filter(|e| !e.starts_with(&format!("entry {}", tpl.display())))
            .collect();
        assert!(outside.is_empty(), "round {round}: left: {outside:?}");
        if tpl.exists() {
            with_template += 1;
            assert_eq!(
                mounts,
                [format!("mount {}", tpl.display())],
                "round {round}: only the template is mounted"
            );
            ok(&run(&bin, &cfg, &["get"]), "the template left is usable");
        } else {
            without += 1;
            assert!(mounts.is_empty(), "round {round}: {mounts:?}");
        }
    }
    eprintln!(
        "{rounds} rounds: {with_template} ended with a template, {without} without; exits {tally:?}"
    );
    ok(&run(&bin, &cfg, &["destroy"]), "final destroy");
    root.assert_no_leaks();
}

/// `destroy` while a clone of the template runs: refused with one line naming what runs,
/// before anything is removed (the template stays whole and usable); once the clone is gone,
/// `destroy` removes everything.
#[test]
fn destroy_with_a_live_clone_refuses_and_changes_nothing() {
    let Some(Setup {
        bin,
        root,
        cfg,
        scratch: _scratch,
    }) = Setup::new(0)
    else {
        return;
    };
    ok(&run(&bin, &cfg, &["init"]), "init");
    let (held, vm) = Held::start(&bin, &cfg);
    assert_eq!(vm["source"], "template", "{vm}");
    let tpl = root.path().join("template");
    let before = vmfactory_e2e::entries_under(&tpl);

    let o = run(&bin, &cfg, &["destroy"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains("in use by pid"), "{err}");
    assert_eq!(
        vmfactory_e2e::entries_under(&tpl),
        before,
        "nothing removed"
    );
    assert!(
        alive(vm["pid"].as_u64().expect("pid")),
        "the clone still runs"
    );
    ok(&run(&bin, &cfg, &["get"]), "the template is still usable");

    held.stop();
    ok(
        &run(&bin, &cfg, &["destroy"]),
        "destroy once the clone is gone",
    );
    root.assert_no_leaks();
}

/// A VM-cache server that handed a VM out shuts down cleanly on SIGTERM (exit 0, its pool
/// stopped) although the VM still maps the template; the template stays whole until `destroy`
/// after the VM is gone.
#[test]
fn server_sigterm_with_a_handed_out_vm_succeeds() {
    let Some(Setup {
        bin,
        root,
        cfg,
        scratch: _scratch,
    }) = Setup::new(1)
    else {
        return;
    };
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("init")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmfactory init");
    let mut server = Server(child);
    let t0 = Instant::now();
    loop {
        let v: serde_json::Value = serde_json::from_str(&status_out(
            &run(&bin, &cfg, &["status", "--json"]),
            "status --json",
        ))
        .expect("status JSON");
        if v["cache_server"]["vms"].as_array().map_or(0, Vec::len) == 1 {
            break;
        }
        assert!(t0.elapsed() < scaled(READY_TIMEOUT), "not ready: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (held, vm) = Held::start(&bin, &cfg);
    assert_eq!(vm["source"], "cache", "{vm}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.0.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + scaled(EXIT_TIMEOUT);
    let exit = loop {
        if let Some(exit) = server.0.try_wait().expect("try_wait") {
            break exit;
        }
        assert!(Instant::now() < deadline, "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = server.0.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("stderr");
    }
    assert!(exit.success(), "server exited {exit}: {err}");
    let tpl = root.path().join("template");
    assert!(tpl.join("metadata.json").exists(), "kept whole for the VM");
    assert!(
        alive(vm["pid"].as_u64().expect("pid")),
        "the handed-out VM runs"
    );

    held.stop();
    ok(
        &run(&bin, &cfg, &["destroy"]),
        "destroy once the VM is gone",
    );
    root.assert_no_leaks();
}

/// `status --json`, parsed.
fn status_json(bin: &Path, cfg: &Path) -> serde_json::Value {
    let o = run(bin, cfg, &["status", "--json"]);
    serde_json::from_str(&status_out(&o, "status --json")).expect("status JSON")
}

/// Polls `status --json` until `ready` holds, failing after [`READY_TIMEOUT`] or if `init`
/// exits first.
fn wait_status(
    bin: &Path,
    cfg: &Path,
    init: &mut Server,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(exit)) = init.0.try_wait() {
            panic!("init exited early ({exit})");
        }
        let v = status_json(bin, cfg);
        if ready(&v) {
            return v;
        }
        assert!(t0.elapsed() < scaled(READY_TIMEOUT), "not ready: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `init` in the background, its output in `scratch/<name>.out`.
fn spawn_init(bin: &Path, cfg: &Path, scratch: &Path, name: &str) -> Server {
    let child = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .arg("init")
        .stdout(fs::File::create(scratch.join(format!("{name}.out"))).expect("log"))
        .stderr(fs::File::create(scratch.join(format!("{name}.err"))).expect("log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn vmfactory init");
    Server(child)
}

/// A process the test started, killed when the test ends.
struct Bystander(Child);

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tail -f FILE`: an operator's process whose command line names a VM's run directory.
fn tail_f(file: &Path) -> Bystander {
    Bystander(
        Command::new("tail")
            .arg("-f")
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tail"),
    )
}

/// `(id, QEMU pid)` of each orphaned VM `status` lists, all with a live recorded QEMU.
fn live_orphans(status: &serde_json::Value) -> Vec<(String, u64)> {
    let vms = status["leftovers"]["orphaned_vms"]
        .as_array()
        .expect("orphans");
    vms.iter()
        .map(|vm| {
            let qemu = vm["processes"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["kind"] == "qemu"))
                .unwrap_or_else(|| panic!("a recorded QEMU: {vm}"));
            assert_eq!(qemu["alive"], true, "{vm}");
            let id = vm["id"].as_str().expect("id").to_owned();
            (id, qemu["pid"].as_u64().expect("pid"))
        })
        .collect()
}

/// Waits until a VM under the run root has QEMU's own record (`qemu.pid`, written before
/// QEMU execs), while `owner` runs; returns the VM's directory.
fn first_record(root: &Path, owner: &mut Child) -> PathBuf {
    let t0 = Instant::now();
    loop {
        let found = fs::read_dir(root.join("vm")).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.join("qemu.pid").exists())
        });
        if let Some(dir) = found {
            return dir;
        }
        assert!(t0.elapsed() < scaled(READY_TIMEOUT), "no QEMU recorded");
        assert!(matches!(owner.try_wait(), Ok(None)), "exited early");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `init` (with a VM cache) SIGKILLed once its pool is full and its pre-started QEMU waits
/// leaves three QEMUs running (two cloned VMs, one pre-started), its template tmpfs and a stale
/// socket. `status` lists the orphans and the mount; the next `init` ends exactly the recorded
/// QEMUs (an operator's `tail -f` of one VM's file lives on), adopts the template and serves
/// again; `destroy` then leaves nothing.
#[test]
fn killed_init_leaves_what_status_shows_and_init_recovers() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(2)
    else {
        return;
    };
    let full = |v: &serde_json::Value| {
        v["cache_server"]["running"] == true
            && v["cache_server"]["vms"].as_array().map_or(0, Vec::len) == 2
    };
    // The pool's two and the pre-started one (`[factory] prestart`, default 1).
    let recorded = || {
        fs::read_dir(root.path().join("vm")).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.path().join("qemu.pid").exists())
                .count()
        })
    };
    let mut first = spawn_init(&bin, &cfg, scratch.path(), "init1");
    wait_status(&bin, &cfg, &mut first, full);
    let t0 = Instant::now();
    while recorded() < 3 {
        assert!(t0.elapsed() < scaled(READY_TIMEOUT), "no pre-started QEMU");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.0.kill().expect("SIGKILL init");
    first.0.wait().expect("reap init");

    let status = status_json(&bin, &cfg);
    let orphans = live_orphans(&status);
    assert_eq!(orphans.len(), 3, "{status}");
    let stale = &status["leftovers"]["stale_mount"];
    assert_eq!(
        stale["path"],
        root.path().join("template").to_str().expect("utf-8")
    );
    assert_eq!(stale["reason"], "server-gone", "{status}");
    assert!(status["leftovers"]["remedy"]
        .as_str()
        .is_some_and(|r| r.ends_with("destroy")));
    // The server is gone: degraded.
    let o = run(&bin, &cfg, &["status"]);
    assert_eq!(o.status.code(), Some(1));
    let table = status_out(&o, "status");
    assert!(
        table.contains("orphaned VMs:  3 with no live owner"),
        "{table}"
    );
    assert!(table.contains("stale mount:"), "{table}");
    eprintln!("after kill -9 of init:\n{table}");
    let vm_dir = root.path().join("vm").join(&orphans[0].0);
    let mut tail = tail_f(&vm_dir.join("qemu.stderr"));

    let mut second = spawn_init(&bin, &cfg, scratch.path(), "init2");
    let status = wait_status(&bin, &cfg, &mut second, full);
    let printed = fs::read_to_string(scratch.path().join("init2.out")).unwrap_or_default();
    assert!(printed.contains("reaped 3 orphaned VM(s)"), "{printed}");
    assert!(printed.contains("adopting the template"), "{printed}");
    for (id, pid) in &orphans {
        assert!(!alive(*pid), "orphan {id}'s QEMU {pid} was ended");
    }
    assert!(!vm_dir.exists(), "its directory removed");
    assert!(
        matches!(tail.0.try_wait(), Ok(None)),
        "the tail naming its directory survives"
    );
    assert_eq!(status["leftovers"]["orphaned_vms"], serde_json::json!([]));
    assert_eq!(status["leftovers"]["stale_mount"], serde_json::Value::Null);

    ok(&run(&bin, &cfg, &["destroy"]), "destroy");
    let deadline = Instant::now() + scaled(EXIT_TIMEOUT);
    while matches!(second.0.try_wait(), Ok(None)) {
        assert!(Instant::now() < deadline, "init did not exit after destroy");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(tail);
    root.assert_no_leaks();
}

/// `init` SIGKILLed as its template VM's QEMU starts (recorded, no template written yet):
/// `status` shows the orphaned template VM and a tmpfs with no usable template; the next
/// `init` ends the VM, refuses to build over the mount and names the command that removes it;
/// after that command, `init` works.
#[test]
fn init_killed_mid_template_names_the_command_that_recovers() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(0)
    else {
        return;
    };
    let mut first = spawn_init(&bin, &cfg, scratch.path(), "init1");
    let t0 = Instant::now();
    first_record(root.path(), &mut first.0);
    first.0.kill().expect("SIGKILL init");
    first.0.wait().expect("reap init");
    eprintln!(
        "init killed {:?} after start, at its first record",
        t0.elapsed()
    );

    let status = status_json(&bin, &cfg);
    let orphans = live_orphans(&status);
    assert_eq!(orphans.len(), 1, "the template VM: {status}");
    assert_eq!(
        status["leftovers"]["stale_mount"]["reason"], "no-usable-template",
        "{status}"
    );
    let o = run(&bin, &cfg, &["init"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    let command = format!("vmfactory --config {} destroy", cfg.display());
    assert!(err.contains(&command), "names `{command}`: {err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("reaped 1 orphaned VM(s)"));
    assert!(!alive(orphans[0].1), "the template VM's QEMU was ended");

    ok(&run(&bin, &cfg, &["destroy"]), "the named command");
    ok(&run(&bin, &cfg, &["init"]), "init after it");
    ok(&run(&bin, &cfg, &["destroy"]), "destroy");
    root.assert_no_leaks();
}

/// `get` SIGKILLed the moment its VM's QEMU is recorded (long before the guest answers): the
/// QEMU runs on as an orphan that `status` shows with its pid, and `destroy` ends exactly
/// that process (found by its record, not by its command line).
#[test]
fn get_killed_right_after_spawn_leaves_a_record_destroy_uses() {
    let Some(Setup {
        bin,
        root,
        scratch,
        cfg,
    }) = Setup::new(0)
    else {
        return;
    };
    // Direct VMs: no template.
    let text = fs::read_to_string(&cfg).expect("config");
    fs::write(
        &cfg,
        text.replace("enable_template = true", "enable_template = false"),
    )
    .expect("config");
    let mut get = Bystander(
        Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .arg("get")
            .stdout(fs::File::create(scratch.path().join("get.out")).expect("log"))
            .stderr(fs::File::create(scratch.path().join("get.err")).expect("log"))
            .spawn()
            .expect("spawn get"),
    );
    let t0 = Instant::now();
    let dir = first_record(root.path(), &mut get.0);
    get.0.kill().expect("SIGKILL get");
    get.0.wait().expect("reap get");
    eprintln!(
        "get killed {:?} after start, at its first record",
        t0.elapsed()
    );
    let mut tail = tail_f(&dir.join("qemu.stderr"));

    let status = status_json(&bin, &cfg);
    let orphans = live_orphans(&status);
    assert_eq!(orphans.len(), 1, "{status}");
    let qemu = orphans[0].1;
    let out = ok(&run(&bin, &cfg, &["destroy"]), "destroy");
    assert!(out.contains("stopped 1 orphaned VM(s)"), "{out}");
    assert!(!alive(qemu), "the recorded QEMU {qemu} was ended");
    assert!(matches!(tail.0.try_wait(), Ok(None)), "the tail survives");
    assert!(!dir.exists());
    drop(tail);
    root.assert_no_leaks();
}
