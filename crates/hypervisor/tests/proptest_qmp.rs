//! Property tests of the QMP client: whatever a peer sends — garbage, invalid UTF-8, JSON of
//! any shape, replies with foreign ids, error replies of any class, second greetings, events —
//! the client never panics and never hangs: every call ends in a value or a typed
//! [`QmpError`].

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use vmfactory_hypervisor::{QmpClient, QmpError};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

/// The client's bound on each command; the peer always answers or closes well before it.
const T: Duration = Duration::from_secs(5);
/// Bound on one whole case (a hang fails the case).
const CASE: Duration = Duration::from_secs(20);

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::hash_map("[a-z_-]{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One line a hostile or broken QEMU might send (without the newline).
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Bytes of any kind, including invalid UTF-8.
        prop::collection::vec(
            any::<u8>().prop_filter("no newline", |b| *b != b'\n'),
            0..64
        ),
        // Text that is almost JSON.
        "[{}\\[\\]\":,a-z0-9 ]{0,40}".prop_map(String::into_bytes),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        // Replies: any id (ours, others, wrong types), any return value.
        (json_value(), json_value())
            .prop_map(|(id, ret)| json!({"return": ret, "id": id}).to_string().into_bytes()),
        (json_value(), ".{0,10}", json_value()).prop_map(|(id, class, desc)| json!({
            "error": {"class": class, "desc": desc},
            "id": id
        })
        .to_string()
        .into_bytes()),
        (".{0,10}", json_value()).prop_map(|(event, data)| json!({
            "event": event,
            "data": data,
            "timestamp": {"seconds": 1, "microseconds": 2}
        })
        .to_string()
        .into_bytes()),
        Just(GREETING.as_bytes().to_vec()),
    ]
}

/// How the peer ends its answer to the command under test.
#[derive(Debug, Clone)]
enum End {
    /// A reply with our id and this return value.
    Reply(Value),
    /// An error reply with our id.
    Error(String, Value),
    /// Close the connection.
    Close,
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        json_value().prop_map(End::Reply),
        (".{0,10}", json_value()).prop_map(|(c, d)| End::Error(c, d)),
        Just(End::Close),
    ]
}

/// A fake QEMU on a duplex pipe: greets, accepts `qmp_capabilities`, then answers the next
/// command with `noise` followed by `end`.
fn peer(noise: Vec<Vec<u8>>, end: End) -> tokio::io::DuplexStream {
    let (client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(async move {
        let (r, mut w) = tokio::io::split(server);
        let mut lines = BufReader::new(r).lines();
        if w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        while let Ok(Some(l)) = lines.next_line().await {
            let Ok(cmd) = serde_json::from_str::<Value>(&l) else {
                return;
            };
            let id = cmd["id"].clone();
            if cmd["execute"] == "qmp_capabilities" {
                let ok = json!({"return": {}, "id": id}).to_string();
                if w.write_all(format!("{ok}\n").as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            for n in &noise {
                let mut n = n.clone();
                n.push(b'\n');
                if w.write_all(&n).await.is_err() {
                    return;
                }
            }
            let last = match &end {
                End::Reply(v) => json!({"return": v, "id": id}),
                End::Error(class, desc) => {
                    json!({"error": {"class": class, "desc": desc}, "id": id})
                }
                End::Close => return,
            };
            if w.write_all(format!("{last}\n").as_bytes()).await.is_err() {
                return;
            }
        }
    });
    client
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Whether noise can stop the reader: a line that is not UTF-8 ends the line reader.
fn has_invalid_utf8(noise: &[Vec<u8>]) -> bool {
    noise.iter().any(|l| std::str::from_utf8(l).is_err())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Noise, then the end: raw and typed calls return a value or a typed error.
    #[test]
    fn any_reply_stream_gives_a_value_or_a_typed_error(
        noise in prop::collection::vec(line(), 0..8),
        end in end(),
        typed in any::<bool>(),
    ) {
        let broken = has_invalid_utf8(&noise);
        let end2 = end.clone();
        let res = runtime().block_on(async move {
            tokio::time::timeout(CASE, async move {
                let qmp = QmpClient::connect(peer(noise, end2), T).await?;
                if typed {
                    qmp.execute(qapi::qmp::query_status {}).await.map(|s| json!(s.running))
                } else {
                    qmp.execute_raw("query-status", Value::Null).await
                }
            })
            .await
        });
        let res = res.map_err(|_| TestCaseError::fail("the client hung"))?;
        match (&end, &res) {
            (_, Err(QmpError::Qmp { .. } | QmpError::Disconnected { .. } | QmpError::Decode { .. })) => {}
            (_, Ok(_)) => {}
            (_, Err(other)) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
        if matches!(end, End::Close) && broken {
            prop_assert!(res.is_err());
        }
        // Every message is one line.
        if let Err(e) = &res {
            let text = e.to_string();
            prop_assert!(!text.contains('\n'), "multi-line error: {text:?}");
        }
    }

    /// Any bytes instead of a greeting: connect fails with a typed error, or (if the bytes
    /// happen to hold a greeting) negotiation fails because the peer then closes.
    #[test]
    fn any_greeting_stream_fails_typed(
        lines in prop::collection::vec(line(), 0..6),
    ) {
        let res = runtime().block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            tokio::spawn(async move {
                let (_r, mut w) = tokio::io::split(server);
                for mut l in lines {
                    l.push(b'\n');
                    if w.write_all(&l).await.is_err() {
                        return;
                    }
                }
            });
            tokio::time::timeout(CASE, QmpClient::connect(client, T)).await
        });
        let res = res.map_err(|_| TestCaseError::fail("connect hung"))?;
        prop_assert!(
            matches!(res, Err(QmpError::Disconnected { .. } | QmpError::Qmp { .. } | QmpError::BadGreeting(_))),
            "{res:?}"
        );
    }
}
