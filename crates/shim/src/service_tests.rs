use std::fs;
use std::path::Path;

use containerd_shim::protos::events::task::{TaskDelete, TaskExit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use super::*;
use crate::events::RecordingSink;
use crate::fake::FakeSandbox;
use crate::rootfs::RootfsConfig;
use crate::status::Code;

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    fake: FakeSandbox,
    sink: Arc<RecordingSink>,
    exit: Arc<ExitSignal>,
    svc: TaskService,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().expect("tmp");
    let root = tmp.path().to_path_buf();
    let fake = FakeSandbox::new();
    let sink = Arc::new(RecordingSink::default());
    let exit = Arc::new(ExitSignal::default());
    let svc = TaskService::new(
        Arc::new(fake.clone()),
        sink.clone(),
        RootfsCache::new(RootfsConfig::new(&root.join("run"))),
        exit.clone(),
    );
    Env {
        _tmp: tmp,
        root,
        fake,
        sink,
        exit,
        svc,
    }
}

/// A bundle whose process runs `args`, with a prepared rootfs, and stdio FIFOs.
fn bundle(root: &Path, id: &str, args: &[&str], terminal: bool) -> CreateParams {
    let b = root.join("bundles").join(id);
    fs::create_dir_all(b.join("rootfs/etc")).expect("bundle");
    fs::write(b.join("rootfs/etc/hostname"), id).expect("rootfs file");
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": args, "cwd": "/", "terminal": terminal,
                    "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    });
    fs::write(b.join("config.json"), spec.to_string()).expect("config");
    CreateParams {
        id: id.into(),
        bundle: b.to_string_lossy().into_owned(),
        rootfs: Vec::new(),
        stdio: fifos(&b, "init", terminal),
    }
}

fn fifos(dir: &Path, name: &str, terminal: bool) -> StdioPaths {
    let mk = |s: &str| {
        let p = dir.join(format!("{name}-{s}"));
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("fifo");
        p.to_string_lossy().into_owned()
    };
    StdioPaths {
        stdin: mk("stdin"),
        stdout: mk("stdout"),
        stderr: if terminal {
            String::new()
        } else {
            mk("stderr")
        },
        terminal,
    }
}

/// Reads a FIFO the shim writes to, to its end. Opened at once, as containerd does before the
/// process runs (the shim has its end open from Create or Start).
fn read_fifo(path: &str) -> tokio::task::JoinHandle<String> {
    let mut rx = pipe::OpenOptions::new()
        .open_receiver(path)
        .expect("open fifo");
    tokio::spawn(async move {
        let mut out = String::new();
        rx.read_to_string(&mut out).await.expect("read fifo");
        out
    })
}

fn code<T: std::fmt::Debug>(r: Result<T, TaskError>) -> Code {
    r.expect_err("an error").code
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let d = dir.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*d))
}

#[tokio::test]
async fn a_container_runs_prints_exits_and_is_deleted_with_its_vm() {
    let e = env();
    let p = bundle(&e.root, "c1", &["echo", "hello"], false);
    let stdout = p.stdio.stdout.clone();
    let pid = e.svc.create(p.clone()).await.expect("create");
    assert!(pid > 0);
    assert_eq!(
        e.svc.state("c1", "").await.expect("state").state,
        ProcState::Created
    );
    let reader = read_fifo(&stdout);
    assert_eq!(e.svc.start("c1", "").await.expect("start"), pid);
    let exited = e.svc.wait("c1", "").await.expect("wait");
    assert_eq!(exited.status, 0);
    assert_eq!(reader.await.expect("join"), "hello\n");
    let s = e.svc.state("c1", "").await.expect("state");
    assert_eq!((s.state, s.pid), (ProcState::Stopped, pid));
    assert_eq!(s.exited.expect("exit").status, 0);
    assert!(Path::new(&p.bundle).join(VM_RECORD_FILE).exists());

    let d = e.svc.delete("c1", "").await.expect("delete");
    assert_eq!(d.pid, pid);
    assert_eq!(d.exited.expect("exit").status, 0);
    assert!(!Path::new(&p.bundle).join(VM_RECORD_FILE).exists());
    e.fake.with(|s| {
        assert_eq!(s.vms, ["c1"]);
        assert_eq!(s.stopped, ["c1"], "the last delete stops the VM");
        assert!(s.containers.is_empty());
    });
    assert_eq!(
        e.sink.topics(),
        [
            events::TASK_CREATE,
            events::TASK_START,
            events::TASK_EXIT,
            events::TASK_DELETE
        ]
    );
    {
        let ev = e.sink.events.lock().expect("events");
        let exit = ev[2].1.downcast_ref::<TaskExit>().expect("TaskExit");
        assert_eq!(
            (exit.container_id.as_str(), exit.id.as_str(), exit.pid),
            ("c1", "c1", pid)
        );
        let del = ev[3].1.downcast_ref::<TaskDelete>().expect("TaskDelete");
        assert_eq!(del.exit_status, 0);
    }
    assert!(e.svc.shutdown().await, "nothing left: the shim exits");
    e.exit.wait().await;
}

#[tokio::test]
async fn exit_codes_and_signals_reach_every_waiter() {
    let e = env();
    e.svc
        .create(bundle(&e.root, "c", &["exit", "3"], false))
        .await
        .expect("create");
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let svc = e.svc.clone();
            tokio::spawn(async move { svc.wait("c", "").await })
        })
        .collect();
    e.svc.start("c", "").await.expect("start");
    for w in waiters {
        assert_eq!(w.await.expect("join").expect("wait").status, 3);
    }

    e.svc
        .create(bundle(&e.root, "s", &["sleep"], false))
        .await
        .expect("create");
    e.svc.start("s", "").await.expect("start");
    assert_eq!(code(e.svc.delete("s", "").await), Code::FailedPrecondition);
    e.svc.kill("s", "", 9, false).await.expect("kill");
    assert_eq!(e.svc.wait("s", "").await.expect("wait").status, 137);
    assert_eq!(code(e.svc.kill("s", "", 15, false).await), Code::NotFound);
    e.svc.delete("s", "").await.expect("delete");
    e.fake
        .with(|s| assert!(s.stopped.is_empty(), "c is still there"));
    assert!(!e.svc.shutdown().await, "a container is left");
}

#[tokio::test]
async fn wrong_ids_and_states_are_refused_with_their_codes() {
    let e = env();
    assert_eq!(code(e.svc.start("nope", "").await), Code::NotFound);
    assert_eq!(code(e.svc.state("nope", "").await), Code::NotFound);
    assert_eq!(code(e.svc.kill("nope", "", 9, false).await), Code::NotFound);
    assert_eq!(code(e.svc.wait("nope", "").await), Code::NotFound);
    assert_eq!(code(e.svc.delete("nope", "").await), Code::NotFound);
    assert_eq!(code(e.svc.pids("nope").await), Code::NotFound);
    assert_eq!(code(e.svc.stats("nope").await), Code::NotFound);

    let p = bundle(&e.root, "c", &["sleep"], false);
    e.svc.create(p.clone()).await.expect("create");
    assert_eq!(code(e.svc.create(p).await), Code::AlreadyExists);
    assert_eq!(code(e.svc.state("c", "x").await), Code::NotFound);
    assert_eq!(
        code(e.svc.kill("c", "", 999, false).await),
        Code::InvalidArgument
    );
    let sleep: oci_spec::runtime::Process =
        serde_json::from_value(serde_json::json!({"args": ["sleep"], "cwd": "/",
            "user": {"uid": 0, "gid": 0}}))
        .expect("process");
    let stdio = StdioPaths::default();
    e.svc
        .exec("c", "e1", sleep.clone(), stdio.clone())
        .await
        .expect("exec");
    assert_eq!(
        code(e.svc.start("c", "e1").await),
        Code::FailedPrecondition,
        "an exec needs its container running"
    );
    e.svc.start("c", "").await.expect("start");
    assert_eq!(code(e.svc.start("c", "").await), Code::FailedPrecondition);
    e.svc.start("c", "e1").await.expect("start exec");
    assert_eq!(code(e.svc.start("c", "e1").await), Code::FailedPrecondition);
    assert_eq!(
        code(e.svc.exec("c", "e1", sleep, stdio).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(e.svc.delete("c", "e1").await),
        Code::FailedPrecondition
    );
    e.svc.kill("c", "", 9, true).await.expect("kill all");
    assert_eq!(e.svc.wait("c", "e1").await.expect("exec").status, 137);
    assert_eq!(e.svc.wait("c", "").await.expect("init").status, 137);
}

#[tokio::test]
async fn bad_bundles_are_invalid_and_leave_nothing_mounted() {
    let e = env();
    let mut p = bundle(&e.root, "c", &["true"], false);
    let b = PathBuf::from(&p.bundle);
    let layer = e.root.join("layer");
    fs::create_dir_all(&layer).expect("layer");
    p.rootfs = vec![RootfsMount {
        kind: "bind".into(),
        source: layer.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "ro".into()],
    }];
    fs::write(b.join("config.json"), "{not json").expect("config");
    assert_eq!(code(e.svc.create(p.clone()).await), Code::InvalidArgument);
    fs::remove_file(b.join("config.json")).expect("rm");
    let err = e.svc.create(p.clone()).await.expect_err("no config");
    assert_eq!(err.code, Code::InvalidArgument);
    assert!(
        err.message.starts_with("Bad bundle config.json"),
        "{}",
        err.message
    );
    assert!(!err.message.contains('\n'));
    let mut rel = p.clone();
    rel.bundle = "relative/bundle".into();
    assert_eq!(code(e.svc.create(rel).await), Code::InvalidArgument);
    for bad in ["", "a/b", ".."] {
        let mut q = p.clone();
        q.id = bad.into();
        assert_eq!(
            code(e.svc.create(q).await),
            Code::InvalidArgument,
            "{bad:?}"
        );
    }
    let mut unsupported = bundle(&e.root, "u", &["true"], false);
    unsupported.rootfs = vec![RootfsMount {
        kind: "ext4".into(),
        source: "/dev/null".into(),
        options: vec![],
    }];
    assert_eq!(code(e.svc.create(unsupported).await), Code::InvalidArgument);
    assert!(!is_mounted(&b.join("rootfs")));
    e.fake
        .with(|s| assert!(s.vms.is_empty() && s.containers.is_empty()));
    assert!(e.sink.topics().is_empty());
}

#[tokio::test]
async fn a_snapshot_mount_is_mounted_for_the_container_and_unmounted_on_delete() {
    let e = env();
    let mut p = bundle(&e.root, "c", &["true"], false);
    let layer = e.root.join("snapshot");
    fs::create_dir_all(layer.join("bin")).expect("layer");
    fs::write(layer.join("bin/sh"), "sh").expect("file");
    p.rootfs = vec![RootfsMount {
        kind: "bind".into(),
        source: layer.to_string_lossy().into_owned(),
        options: vec!["rbind".into(), "rw".into()],
    }];
    let rootfs = PathBuf::from(&p.bundle).join("rootfs");
    e.svc.create(p).await.expect("create");
    assert!(is_mounted(&rootfs));
    assert!(rootfs.join("bin/sh").exists());
    e.svc.start("c", "").await.expect("start");
    e.svc.wait("c", "").await.expect("wait");
    e.svc.delete("c", "").await.expect("delete");
    assert!(!is_mounted(&rootfs));
}

#[tokio::test]
async fn a_failed_create_in_the_vm_unmounts_and_stops_the_new_vm() {
    let e = env();
    let mut p = bundle(&e.root, "c", &["true"], false);
    let layer = e.root.join("snapshot");
    fs::create_dir_all(&layer).expect("layer");
    p.rootfs = vec![RootfsMount {
        kind: "bind".into(),
        source: layer.to_string_lossy().into_owned(),
        options: vec!["rbind".into()],
    }];
    e.fake.with(|s| s.fail_create = true);
    assert_eq!(code(e.svc.create(p.clone()).await), Code::Internal);
    assert!(!is_mounted(&PathBuf::from(&p.bundle).join("rootfs")));
    e.fake.with(|s| assert_eq!(s.stopped, ["c"]));
    assert_eq!(code(e.svc.state("c", "").await), Code::NotFound);
}

#[tokio::test]
async fn execs_run_in_the_container_with_their_own_stdio() {
    let e = env();
    let p = bundle(&e.root, "c", &["sleep"], false);
    let dir = PathBuf::from(&p.bundle);
    e.svc.create(p).await.expect("create");
    e.svc.start("c", "").await.expect("start");
    let spec: oci_spec::runtime::Process = serde_json::from_value(serde_json::json!({
        "args": ["cat"], "cwd": "/", "user": {"uid": 0, "gid": 0}}))
    .expect("process");
    let stdio = fifos(&dir, "e1", false);
    e.svc
        .exec("c", "e1", spec, stdio.clone())
        .await
        .expect("exec");
    let pid = e.svc.start("c", "e1").await.expect("start exec");
    assert!(pid > 0);
    let mut tx = pipe::OpenOptions::new()
        .open_sender(&stdio.stdin)
        .expect("stdin");
    tx.write_all(b"typed\n").await.expect("write");
    drop(tx);
    let out = read_fifo(&stdio.stdout);
    e.svc.close_stdin("c", "e1").await.expect("close io");
    assert_eq!(e.svc.wait("c", "e1").await.expect("wait").status, 0);
    assert_eq!(out.await.expect("join"), "typed\n");
    assert_eq!(
        e.svc.state("c", "").await.expect("init").state,
        ProcState::Running
    );
    let d = e.svc.delete("c", "e1").await.expect("delete exec");
    assert_eq!(d.pid, pid);
    assert_eq!(code(e.svc.state("c", "e1").await), Code::NotFound);
    let topics = e.sink.topics();
    assert!(topics.contains(&events::TASK_EXEC_ADDED.to_owned()));
    assert!(topics.contains(&events::TASK_EXEC_STARTED.to_owned()));
    assert_eq!(e.svc.pids("c").await.expect("pids"), [1]);
    let st = e.svc.stats("c").await.expect("stats");
    assert!(st.pids >= 1 && st.memory_limit_bytes > 0);
}

#[tokio::test]
async fn a_terminal_has_one_stream_and_resizes() {
    let e = env();
    let p = bundle(&e.root, "t", &["echo", "on a tty"], true);
    assert!(p.stdio.stderr.is_empty());
    let stdout = p.stdio.stdout.clone();
    e.svc.create(p).await.expect("create");
    e.svc.resize("t", "", 40, 120).await.expect("resize");
    let out = read_fifo(&stdout);
    e.svc.start("t", "").await.expect("start");
    e.svc.wait("t", "").await.expect("wait");
    assert_eq!(out.await.expect("join"), "on a tty\n");
    e.fake
        .with(|s| assert_eq!(s.resizes, [("t".to_owned(), 40, 120)]));
}

#[tokio::test]
async fn a_second_container_shares_the_sandbox_vm() {
    let e = env();
    e.svc
        .create(bundle(&e.root, "a", &["true"], false))
        .await
        .expect("a");
    e.svc
        .create(bundle(&e.root, "b", &["true"], false))
        .await
        .expect("b");
    e.fake.with(|s| assert_eq!(s.vms, ["a"], "one VM per shim"));
    e.svc
        .delete("a", "")
        .await
        .expect("delete a (never started)");
    e.fake.with(|s| assert!(s.stopped.is_empty()));
    e.svc.delete("b", "").await.expect("delete b");
    e.fake.with(|s| assert_eq!(s.stopped, ["a"]));
}

#[tokio::test]
async fn a_node_without_vms_mounts_and_builds_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let run = tmp.path().join("run");
    let svc = TaskService::new(
        Arc::new(crate::sandbox::Refused(crate::SandboxError::Unsupported(
            "no VMs here".into(),
        ))),
        Arc::new(RecordingSink::default()),
        RootfsCache::new(RootfsConfig::new(&run)),
        Arc::new(ExitSignal::default()),
    );
    let mut p = bundle(tmp.path(), "c", &["true"], false);
    let layer = tmp.path().join("snapshot");
    fs::create_dir_all(&layer).expect("layer");
    p.rootfs = vec![RootfsMount {
        kind: "bind".into(),
        source: layer.to_string_lossy().into_owned(),
        options: vec!["rbind".into()],
    }];
    let e = svc.create(p.clone()).await.expect_err("refused");
    assert_eq!(e.code, Code::Unimplemented);
    assert!(e.message.contains("no VMs here"), "{}", e.message);
    assert!(!is_mounted(&PathBuf::from(&p.bundle).join("rootfs")));
    assert!(!run.join("rootfs").exists(), "no image was built");
}
