//! Protocol tests: the QMP client against a scripted fake QEMU over a real unix socket pair.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmfactory_hypervisor::{QmpClient, QmpError, QmpErrorClass};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

/// What the fake does with one command.
enum Act {
    /// Send these lines (`{id}` replaced by the command id).
    Send(Vec<String>),
    /// Send nothing (the client should time out).
    Silent,
    /// Close the connection.
    Close,
}

/// Spawns a fake QEMU; `script` maps each received command to an action.
fn fake_qemu(script: impl Fn(&Value) -> Act + Send + 'static) -> UnixStream {
    let (client, server) = UnixStream::pair().expect("socketpair");
    tokio::spawn(async move {
        let (r, mut w) = server.into_split();
        w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .expect("greeting");
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&line).expect("client sends JSON");
            let id = cmd["id"].to_string();
            match script(&cmd) {
                Act::Send(out) => {
                    for l in out {
                        let l = format!("{}\n", l.replace("{id}", &id));
                        if w.write_all(l.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                Act::Silent => {}
                Act::Close => return,
            }
        }
    });
    client
}

fn ok() -> Act {
    Act::Send(vec![r#"{"return": {}, "id": {id}}"#.into()])
}

const T: Duration = Duration::from_secs(2);

#[tokio::test]
async fn unknown_events_are_kept_and_not_fatal() {
    let stream = fake_qemu(|cmd| {
        match cmd["execute"].as_str() {
        Some("query-status") => Act::Send(vec![
            r#"{"event": "X_FUTURE_EVENT", "data": {"n": 1}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.into(),
            "this is not json".into(),
            r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 3}}"#.into(),
            r#"{"return": {"status": "running", "running": true}, "id": {id}}"#.into(),
        ]),
        _ => ok(),
    }
    });
    let qmp = QmpClient::connect(stream, T).await.expect("connect");
    let mut events = qmp.subscribe();
    let st = qmp
        .execute(qapi::qmp::query_status {})
        .await
        .expect("status despite unknown event");
    assert!(st.running);
    let first = events.recv().await.expect("event");
    assert_eq!(first["event"], "X_FUTURE_EVENT");
    assert_eq!(first["data"]["n"], 1);
    let names: Vec<Value> = qmp
        .recent_events()
        .iter()
        .map(|e| e["event"].clone())
        .collect();
    assert_eq!(names, [json!("X_FUTURE_EVENT"), json!("STOP")]);
    // The connection still works.
    qmp.execute(qapi::qmp::cont {}).await.expect("cont");
}

#[tokio::test]
async fn error_reply_keeps_class() {
    let stream = fake_qemu(|cmd| match cmd["execute"].as_str() {
        Some("device_add") => Act::Send(vec![
            r#"{"error": {"class": "DeviceNotFound", "desc": "no such slot"}, "id": {id}}"#.into(),
        ]),
        Some("x-new") => Act::Send(vec![
            r#"{"error": {"class": "BrandNewClass", "desc": "later QEMU"}, "id": {id}}"#.into(),
        ]),
        _ => ok(),
    });
    let qmp = QmpClient::connect(stream, T).await.expect("connect");
    let err = qmp
        .execute(qapi::qmp::device_add::new(
            "qemu64-x86_64-cpu",
            Some("cpu-1".to_owned()),
            None,
            [],
        ))
        .await
        .expect_err("error reply");
    match &err {
        QmpError::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "device_add");
            assert_eq!(*class, QmpErrorClass::DeviceNotFound);
            assert_eq!(desc, "no such slot");
        }
        other => panic!("unexpected {other:?}"),
    }
    let err = qmp
        .execute_raw("x-new", Value::Null)
        .await
        .expect_err("error reply");
    assert_eq!(
        err.class(),
        Some(&QmpErrorClass::Other("BrandNewClass".into()))
    );
    qmp.execute(qapi::qmp::stop {}).await.expect("still usable");
}

#[tokio::test]
async fn disconnect_mid_command() {
    let stream = fake_qemu(|cmd| match cmd["execute"].as_str() {
        Some("query-hotpluggable-cpus") => Act::Close,
        _ => ok(),
    });
    let qmp = QmpClient::connect(stream, T).await.expect("connect");
    let err = qmp
        .execute(qapi::qmp::query_hotpluggable_cpus {})
        .await
        .expect_err("disconnect");
    assert!(
        matches!(&err, QmpError::Disconnected { command } if command == "query-hotpluggable-cpus"),
        "{err:?}"
    );
    assert!(qmp.is_closed());
    let err = qmp.execute(qapi::qmp::stop {}).await.expect_err("closed");
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
}

#[tokio::test]
async fn timeout_then_late_reply_is_dropped() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let first = AtomicBool::new(true);
    let stream = fake_qemu(move |cmd| match cmd["execute"].as_str() {
        Some("query-migrate") if first.swap(false, Ordering::SeqCst) => Act::Silent,
        Some("query-migrate") => Act::Send(vec![
            // The late reply to the timed-out command arrives first, then the real one.
            r#"{"return": {"status": "active"}, "id": 2}"#.into(),
            r#"{"return": {"status": "completed"}, "id": {id}}"#.into(),
        ]),
        _ => ok(),
    });
    let qmp = QmpClient::connect(stream, Duration::from_millis(200))
        .await
        .expect("connect");
    let err = qmp
        .execute_raw("query-migrate", Value::Null)
        .await
        .expect_err("timeout");
    assert!(
        matches!(&err, QmpError::Timeout { command, .. } if command == "query-migrate"),
        "{err:?}"
    );
    let r = qmp
        .execute_raw("query-migrate", Value::Null)
        .await
        .expect("second");
    assert_eq!(r["status"], "completed");
}

#[tokio::test]
async fn greeting_timeout_and_bad_stream() {
    let (client, _server) = UnixStream::pair().expect("socketpair");
    let err = QmpClient::connect(client, Duration::from_millis(100))
        .await
        .expect_err("no greeting");
    assert!(matches!(&err, QmpError::Timeout { command, .. } if command == "greeting"));

    let (client, server) = UnixStream::pair().expect("socketpair");
    drop(server);
    let err = QmpClient::connect(client, T).await.expect_err("closed");
    assert!(matches!(&err, QmpError::Disconnected { command } if command == "greeting"));
}

#[tokio::test]
async fn concurrent_commands_are_matched_by_id() {
    let stream = fake_qemu(|cmd| {
        let name = cmd["execute"].as_str().unwrap_or_default().to_owned();
        Act::Send(vec![format!(
            r#"{{"return": {{"name": "{name}"}}, "id": {{id}}}}"#
        )])
    });
    let qmp = std::sync::Arc::new(QmpClient::connect(stream, T).await.expect("connect"));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let qmp = qmp.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("cmd-{i}");
            let r = qmp.execute_raw(&name, Value::Null).await.expect("reply");
            assert_eq!(r["name"], name.as_str());
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}
