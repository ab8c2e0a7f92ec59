//! A running VM for the QMP-level tests: QEMU is `sleep`, and the QMP peer is a scripted fake
//! over `tokio::io::duplex` that records each command's name and arguments.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Inner, Running, VmState};
use crate::config::HypervisorConfig;
use crate::disk::FIRST_DISK_NUMBER;
use crate::qmp::QmpClient;

/// The commands the fake received, in order.
pub(super) type Log = Arc<Mutex<Vec<Value>>>;

/// A running VM whose QMP peer answers each command with `script(command)`: one reply, or an
/// array of lines to send in order (events, and the reply, which gets the command's `id`).
pub(super) async fn fake_vm<F>(
    cfg: HypervisorConfig,
    script: F,
) -> (tempfile::TempDir, Inner, Running, Log)
where
    F: Fn(&Value) -> Value + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Log::default();
    let (client, server) = tokio::io::duplex(1 << 16);
    let seen = log.clone();
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        let greeting = r#"{"QMP": {"version": {}, "capabilities": []}}"#;
        w.write_all(format!("{greeting}\n").as_bytes()).await.ok();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&line).expect("json");
            seen.lock().expect("log").push(cmd.clone());
            let lines = match script(&cmd) {
                Value::Array(lines) => lines,
                reply => vec![reply],
            };
            for mut line in lines {
                if line.get("return").is_some() || line.get("error").is_some() {
                    line["id"] = cmd["id"].clone();
                }
                w.write_all(format!("{line}\n").as_bytes()).await.ok();
            }
        }
    });
    let qmp = QmpClient::connect(client, std::time::Duration::from_secs(2))
        .await
        .expect("connect");
    let qemu = crate::process::Proc::spawn(
        "QEMU",
        Path::new("sleep"),
        &["30".into()],
        &dir.path().join("stderr"),
        crate::record::RecordTarget::new(dir.path(), crate::record::ProcessKind::Qemu)
            .expect("record target"),
    )
    .await
    .expect("sleep");
    let paths = crate::cmdline::RunPaths::new(dir.path());
    let inner = Inner {
        id: "t".into(),
        pid: std::sync::atomic::AtomicU32::new(0),
        vsock_cid: std::sync::atomic::AtomicU32::new(0),
        cid_kernel: Arc::new(crate::vsock::VhostVsock::default()),
        exit: tokio::sync::watch::Sender::new(None),
        state: tokio::sync::Mutex::new(VmState::Created),
        paths,
        config: cfg.clone(),
    };
    let running = Running {
        qmp,
        qemu,
        backend: None,
        accel: crate::config::Accel::Tcg,
        vsock_cid: None,
        created_run_dir: false,
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        next_cpu_id: cfg.vcpus,
        next_mem_id: 1,
        disks: Vec::new(),
        next_disk_id: FIRST_DISK_NUMBER,
        pending_state: None,
    };
    (dir, inner, running, log)
}

/// The names of the commands in `log`.
pub(super) fn names(log: &Mutex<Vec<Value>>) -> Vec<String> {
    log.lock()
        .expect("log")
        .iter()
        .map(|c| c["execute"].as_str().unwrap_or_default().to_owned())
        .collect()
}
