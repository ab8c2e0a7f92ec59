//! Processes, files and their errors through the real server and client, over a unix socket;
//! the processes are the host's own programs (`sh`, `cat`, `stty`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::FakeGuest;
use vmfactory_agent::{Agent, CopyFileChunk, Error, ExitStatus, KataAgent, ProcessSpec};

const T: Duration = Duration::from_secs(10);

async fn connect(guest: &FakeGuest) -> (vmfactory_guest::server::AgentServer, Arc<KataAgent>) {
    let (server, path) = guest.serve_unix().await;
    let a = KataAgent::new(format!("unix://{}", path.display()).as_str(), T).expect("new");
    (server, Arc::new(a))
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new(["sh", "-c", script])
}

/// Reads a stream to its end.
async fn drain(a: &KataAgent, id: &str, stderr: bool) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let chunk = if stderr {
            a.read_stderr("", id, 65536).await
        } else {
            a.read_stdout("", id, 65536).await
        }
        .expect("read");
        if chunk.is_empty() {
            return out;
        }
        out.extend(chunk);
    }
}

/// Runs `spec` to its end: (status, stdout, stderr).
async fn run(a: &KataAgent, id: &str, spec: &ProcessSpec) -> (ExitStatus, String, String) {
    a.exec_process(id, spec).await.expect("exec");
    a.close_stdin("", id).await.expect("close stdin");
    let (out, err, st) = tokio::join!(
        drain(a, id, false),
        drain(a, id, true),
        a.wait_process("", id)
    );
    (
        st.expect("wait"),
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn rpc_code(e: &Error) -> Option<ttrpc::Code> {
    match e {
        Error::Rpc {
            source: ttrpc::Error::RpcStatus(s),
            ..
        } => s.code.enum_value().ok(),
        _ => None,
    }
}

#[tokio::test]
async fn exit_codes_signals_env_cwd_and_output_after_exit() {
    let guest = FakeGuest::new();
    let (_server, a) = connect(&guest).await;
    let (st, out, err) = run(&a, "p0", &sh("echo out; echo err >&2; exit 42")).await;
    assert_eq!(
        (st, out.as_str(), err.as_str()),
        (ExitStatus::Code(42), "out\n", "err\n")
    );
    assert_eq!(run(&a, "p1", &sh("true")).await.0, ExitStatus::Code(0));
    assert_eq!(run(&a, "p2", &sh("exit 1")).await.0, ExitStatus::Code(1));
    assert_eq!(
        run(&a, "p3", &sh("kill -9 $$")).await.0,
        ExitStatus::Signal(9)
    );

    let mut spec = sh("echo $FOO; pwd; echo ${PATH:+has-path}");
    spec.env = vec!["FOO=bar".into()];
    spec.cwd = "/".into();
    std::fs::create_dir(guest.dir.path().join("work")).expect("mkdir");
    spec.cwd = "/work".into();
    let (st, out, _) = run(&a, "p4", &spec).await;
    assert_eq!(st, ExitStatus::Code(0));
    let work = guest.dir.path().join("work");
    assert_eq!(out, format!("bar\n{}\nhas-path\n", work.display()));

    // Output written just before exit is all there, read after the wait answered (less than
    // a pipe holds: more would hold the writer until read, which is the flow control).
    a.exec_process("late", &sh("head -c 60000 /dev/zero"))
        .await
        .expect("exec");
    assert_eq!(
        a.wait_process("", "late").await.expect("wait"),
        ExitStatus::Code(0)
    );
    assert_eq!(drain(&a, "late", false).await.len(), 60_000);
    assert!(drain(&a, "late", true).await.is_empty());
    // Waited and drained: forgotten.
    let e = a.read_stdout("", "late", 10).await.expect_err("forgotten");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::NOT_FOUND), "{e}");
}

#[tokio::test]
async fn signal_stdin_and_errors() {
    let guest = FakeGuest::new();
    let (_server, a) = connect(&guest).await;
    a.exec_process("s", &ProcessSpec::new(["sleep", "30"]))
        .await
        .expect("exec");
    a.signal_process("", "s", 15).await.expect("signal");
    assert_eq!(
        a.wait_process("", "s").await.expect("wait"),
        ExitStatus::Signal(15)
    );
    a.signal_process("", "s", 9)
        .await
        .expect("signal after exit is a no-op");

    let e = a
        .exec_process("x", &ProcessSpec::new(["/no/such/program"]))
        .await
        .expect_err("missing");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::NOT_FOUND), "{e}");
    let e = a.exec_process("", &sh("true")).await.expect_err("empty id");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::INVALID_ARGUMENT), "{e}");
    a.exec_process("dup", &ProcessSpec::new(["cat"]))
        .await
        .expect("exec");
    let e = a
        .exec_process("dup", &sh("true"))
        .await
        .expect_err("same id");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::ALREADY_EXISTS), "{e}");
    let e = a
        .tty_win_resize("", "dup", 10, 10)
        .await
        .expect_err("no tty");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::FAILED_PRECONDITION), "{e}");
    a.write_stdin("", "dup", b"hi\n").await.expect("write");
    a.close_stdin("", "dup").await.expect("close");
    let e = a.write_stdin("", "dup", b"more").await.expect_err("closed");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::FAILED_PRECONDITION), "{e}");
    assert_eq!(drain(&a, "dup", false).await, b"hi\n");
    assert_eq!(
        a.wait_process("", "dup").await.expect("wait"),
        ExitStatus::Code(0)
    );
    let e = a.wait_process("", "nope").await.expect_err("unknown");
    assert_eq!(rpc_code(&e), Some(ttrpc::Code::NOT_FOUND), "{e}");
}

#[tokio::test]
async fn many_concurrent_processes_and_a_large_stream_through_cat() {
    let guest = FakeGuest::new();
    let (_server, a) = connect(&guest).await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("c{i}");
            run(&a, &id, &sh(&format!("sleep 0.2; echo {i}"))).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (st, out, _) = t.await.expect("task");
        assert_eq!((st, out), (ExitStatus::Code(0), format!("{i}\n")));
    }

    // 8 MiB through cat with back-pressure both ways.
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    a.exec_process("cat", &ProcessSpec::new(["cat"]))
        .await
        .expect("exec");
    let writer = {
        let a = a.clone();
        let data = data.clone();
        tokio::spawn(async move {
            for c in data.chunks(256 << 10) {
                a.write_stdin("", "cat", c).await.expect("write");
            }
            a.close_stdin("", "cat").await.expect("close");
        })
    };
    let out = drain(&a, "cat", false).await;
    writer.await.expect("writer");
    assert_eq!(
        a.wait_process("", "cat").await.expect("wait"),
        ExitStatus::Code(0)
    );
    assert!(out == data, "{} bytes back of {}", out.len(), data.len());
}

#[tokio::test]
async fn terminal_takes_its_size_and_merges_output() {
    let guest = FakeGuest::new();
    let (_server, a) = connect(&guest).await;
    let mut spec = sh("stty size; read x; stty size; echo err >&2");
    spec.terminal = true;
    spec.console_size = Some((24, 80));
    a.exec_process("t", &spec).await.expect("exec");
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("24 80") {
        out.extend(a.read_stdout("", "t", 1024).await.expect("read"));
    }
    a.tty_win_resize("", "t", 30, 100).await.expect("resize");
    a.write_stdin("", "t", b"go\n").await.expect("write");
    let rest = drain(&a, "t", false).await;
    out.extend(rest);
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("30 100"), "{text:?}");
    assert!(text.contains("err"), "stderr on the terminal: {text:?}");
    assert!(drain(&a, "t", true).await.is_empty());
    assert_eq!(
        a.wait_process("", "t").await.expect("wait"),
        ExitStatus::Code(0)
    );
}

#[tokio::test]
async fn copy_in_and_out_and_refusals() {
    let guest = FakeGuest::new();
    let (_server, a) = connect(&guest).await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
    let mut offset = 0;
    for part in body.chunks(1 << 20) {
        a.copy_file(&CopyFileChunk {
            path: "/in/dir/file".into(),
            file_size: body.len() as u64,
            file_mode: 0o600,
            dir_mode: 0o700,
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            offset,
            data: part.to_vec(),
        })
        .await
        .expect("copy");
        offset += part.len() as u64;
    }
    let on_disk = std::fs::read(guest.dir.path().join("in/dir/file")).expect("read");
    assert!(on_disk == body);
    let (st, out, _) = run(
        &a,
        "wc",
        &sh(&format!(
            "wc -c < {}/in/dir/file",
            guest.dir.path().display()
        )),
    )
    .await;
    assert_eq!((st, out.trim()), (ExitStatus::Code(0), "3000000"));
    let chunk = a
        .read_file("/in/dir/file", 1_000_000, 16)
        .await
        .expect("read back");
    assert_eq!(chunk.data, &body[1_000_000..1_000_016]);
    assert_eq!((chunk.file_size, chunk.file_mode), (3_000_000, 0o600));
    std::os::unix::fs::symlink("/etc", guest.dir.path().join("out")).expect("symlink");
    for p in [
        "/out/passwd",
        "/in/../in/dir/file",
        "/proc/self/environ",
        "/dev/urandom",
    ] {
        let e = a.read_file(p, 0, 10).await.expect_err(p);
        assert_eq!(
            rpc_code(&e),
            Some(ttrpc::Code::PERMISSION_DENIED),
            "{p}: {e}"
        );
    }
}
