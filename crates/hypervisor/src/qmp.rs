//! A small async QMP client.
//!
//! It speaks QMP over any `AsyncRead + AsyncWrite` (a unix socket to QEMU, or
//! `tokio::io::duplex` in tests) and uses qapi's generated command types for typed calls
//! ([`QmpClient::execute`]), with [`QmpClient::execute_raw`] for what those types cannot express.
//!
//! Why not qapi's own stream: it fails on an event it does not know, and qapi 0.15 knows QEMU
//! 9.1's events, not necessarily those of the QEMU in use. Here a reader task owns the read half
//! and keeps events as raw JSON in a bounded ring buffer and a broadcast channel; an unknown or
//! malformed line is logged and skipped, never fatal. Replies are matched by `id`. Commands are
//! serialised (one in flight), each bounded by a timeout; a late reply to a timed-out command is
//! dropped. QMP error replies keep their class ([`QmpError::Qmp`]); a connection that closes
//! while a command waits yields [`QmpError::Disconnected`].

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot, Mutex};
use tokio::task::JoinHandle;
use tracing::{debug, instrument, trace, warn};

use crate::error::{QmpError, QmpErrorClass};

/// Default bound on every QMP command.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Events kept for [`QmpClient::recent_events`].
const RECENT_EVENTS: usize = 128;

/// Capacity of the event broadcast channel (slow subscribers lose the oldest).
const EVENT_CHANNEL: usize = 64;

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// State shared between the client and its reader task.
#[derive(Debug, Default)]
struct Pending {
    /// Reply slots by command id.
    waiting: HashMap<u64, oneshot::Sender<Value>>,
    /// Set once the reader saw EOF or an I/O error.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    pending: StdMutex<Pending>,
    events: broadcast::Sender<Value>,
    recent: StdMutex<VecDeque<Value>>,
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A poisoned lock only means a panic elsewhere; the map itself stays consistent.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_event(&self, event: Value) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_EVENTS {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        // No subscriber is fine.
        let _ = self.events.send(event);
    }
}

/// A negotiated QMP connection.
pub struct QmpClient {
    writer: Mutex<Writer>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    timeout: Duration,
    greeting: Value,
    reader: JoinHandle<()>,
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("timeout", &self.timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl QmpClient {
    /// Reads the greeting from `stream` and negotiates capabilities (`qmp_capabilities`).
    ///
    /// `timeout` bounds the greeting and, later, every command.
    pub async fn connect<S>(stream: S, timeout: Duration) -> Result<Self, QmpError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let (events, _) = broadcast::channel(EVENT_CHANNEL);
        let shared = Arc::new(Shared {
            pending: StdMutex::new(Pending::default()),
            events,
            recent: StdMutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
        });
        let (greet_tx, greet_rx) = oneshot::channel();
        let reader = tokio::spawn(read_loop(read, Arc::clone(&shared), greet_tx));
        let greeting = match tokio::time::timeout(timeout, greet_rx).await {
            Ok(Ok(g)) => g,
            Ok(Err(_)) => {
                reader.abort();
                return Err(QmpError::Disconnected {
                    command: "greeting".into(),
                });
            }
            Err(_) => {
                reader.abort();
                return Err(QmpError::Timeout {
                    command: "greeting".into(),
                    timeout,
                });
            }
        };
        let client = Self {
            writer: Mutex::new(Box::new(write)),
            shared,
            next_id: AtomicU64::new(1),
            timeout,
            greeting,
            reader,
        };
        client
            .execute(qapi::qmp::qmp_capabilities { enable: None })
            .await?;
        Ok(client)
    }

    /// The greeting QEMU sent (`{"QMP": {"version": …, "capabilities": …}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// The QEMU version from the greeting, as `(major, minor, micro)`.
    pub fn qemu_version(&self) -> Option<(u64, u64, u64)> {
        let v = self.greeting.get("QMP")?.get("version")?.get("qemu")?;
        Some((
            v.get("major")?.as_u64()?,
            v.get("minor")?.as_u64()?,
            v.get("micro")?.as_u64()?,
        ))
    }

    /// The bound on each command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.lock_pending().closed
    }

    /// Subscribes to events (raw JSON objects with `event`, `data`, `timestamp`).
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.shared.events.subscribe()
    }

    /// The last events received (at most 128), oldest first.
    pub fn recent_events(&self) -> Vec<Value> {
        let recent = self.shared.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Runs a typed qapi command with the client's timeout.
    #[instrument(level = "debug", skip_all, fields(command = C::NAME))]
    pub async fn execute<C: qapi::Command>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_with_timeout(cmd, self.timeout).await
    }

    /// Runs a typed qapi command with an explicit timeout.
    pub async fn execute_with_timeout<C: qapi::Command>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&cmd).map_err(|source| QmpError::Encode {
            command: C::NAME.into(),
            source,
        })?;
        let ret = self.call(C::NAME, Some(args), timeout).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode {
            command: C::NAME.into(),
            source,
        })
    }

    /// Runs a command by name with raw JSON arguments (`Value::Null` for none) and returns the
    /// raw `return` value.
    #[instrument(level = "debug", skip(self, args))]
    pub async fn execute_raw(&self, command: &str, args: Value) -> Result<Value, QmpError> {
        let args = (!args.is_null()).then_some(args);
        self.call(command, args, self.timeout).await
    }

    async fn call(
        &self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|source| QmpError::Encode {
            command: command.into(),
            source,
        })?;
        line.push(b'\n');

        let fut = async {
            // Holding the writer until the reply arrives serialises commands.
            let mut writer = self.writer.lock().await;
            let rx = {
                let mut pending = self.shared.lock_pending();
                if pending.closed {
                    return Err(QmpError::Disconnected {
                        command: command.into(),
                    });
                }
                let (tx, rx) = oneshot::channel();
                pending.waiting.insert(id, tx);
                rx
            };
            trace!(line = %String::from_utf8_lossy(&line).trim_end(), "qmp ->");
            let sent = async {
                writer.write_all(&line).await?;
                writer.flush().await
            }
            .await;
            if let Err(source) = sent {
                return Err(if source.kind() == std::io::ErrorKind::BrokenPipe {
                    QmpError::Disconnected {
                        command: command.into(),
                    }
                } else {
                    QmpError::Send {
                        command: command.into(),
                        source,
                    }
                });
            }
            rx.await.map_err(|_| QmpError::Disconnected {
                command: command.into(),
            })
        };
        let reply = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                command: command.into(),
                timeout,
            }),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                self.shared.lock_pending().waiting.remove(&id);
                return Err(e);
            }
        };
        if let Some(err) = reply.get("error") {
            let class = err.get("class").and_then(Value::as_str).unwrap_or("");
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
            debug!(command, class, desc, "qmp error reply");
            return Err(QmpError::Qmp {
                command: command.into(),
                class: QmpErrorClass::from_wire(class),
                desc: desc.into(),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }
}

/// Owns the read half: routes the greeting, replies (by id) and events.
async fn read_loop<R: AsyncRead + Send + Unpin>(
    read: R,
    shared: Arc<Shared>,
    greeting: oneshot::Sender<Value>,
) {
    let mut greeting = Some(greeting);
    let mut lines = BufReader::new(read).lines();
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => {
                debug!("qmp connection closed");
                break;
            }
            // QEMU exiting (after `quit`, or killed) resets the socket: the connection is
            // over either way, and a command still waiting gets `Disconnected`, which is
            // where a failure is reported.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                debug!(error = %e, "qmp connection reset");
                break;
            }
            Err(e) => {
                warn!(error = %e, "qmp read failed");
                break;
            }
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        trace!(line, "qmp <-");
        let msg: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, line, "skipping malformed qmp line");
                continue;
            }
        };
        if msg.get("QMP").is_some() {
            match greeting.take() {
                Some(tx) => {
                    let _ = tx.send(msg);
                }
                None => warn!("ignoring a second qmp greeting"),
            }
        } else if msg.get("event").is_some() {
            shared.push_event(msg);
        } else if msg.get("return").is_some() || msg.get("error").is_some() {
            let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                warn!(line, "ignoring qmp reply without our id");
                continue;
            };
            let slot = shared.lock_pending().waiting.remove(&id);
            match slot {
                Some(tx) => {
                    let _ = tx.send(msg);
                }
                None => debug!(id, "dropping late qmp reply"),
            }
        } else {
            warn!(line, "ignoring unknown qmp message");
        }
    }
    let mut pending = shared.lock_pending();
    pending.closed = true;
    // Dropping the senders wakes every waiting command with `Disconnected`.
    pending.waiting.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A fake QEMU on the other end of a duplex pipe; `script` gets each parsed command and
    /// returns the lines to send back (use `{id}` for the command id).
    fn fake(script: impl Fn(&Value) -> Vec<String> + Send + 'static) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(server);
            w.write_all(format!("{GREETING}\n").as_bytes()).await.ok();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let cmd: Value = serde_json::from_str(&line).expect("client sends JSON");
                let id = cmd["id"].to_string();
                for out in script(&cmd) {
                    if out == "CLOSE" {
                        return;
                    }
                    w.write_all(format!("{}\n", out.replace("{id}", &id)).as_bytes())
                        .await
                        .ok();
                }
            }
        });
        client
    }

    fn ok() -> Vec<String> {
        vec![r#"{"return": {}, "id": {id}}"#.into()]
    }

    #[tokio::test]
    async fn negotiates_and_runs_typed_command() {
        let stream = fake(|cmd| match cmd["execute"].as_str() {
            Some("query-status") => {
                vec![r#"{"return": {"status": "paused", "singlestep": false, "running": false}, "id": {id}}"#.into()]
            }
            _ => ok(),
        });
        let qmp = QmpClient::connect(stream, Duration::from_secs(2))
            .await
            .expect("connect");
        assert_eq!(qmp.qemu_version(), Some((7, 2, 22)));
        let st = qmp
            .execute(qapi::qmp::query_status {})
            .await
            .expect("status");
        assert!(!st.running);
        assert!(matches!(st.status, qapi::qmp::RunState::paused));
    }

    #[tokio::test]
    async fn raw_command_sends_arguments() {
        let stream = fake(|cmd| {
            if cmd["execute"] == "device_add" {
                assert_eq!(cmd["arguments"]["driver"], "pc-dimm");
                vec![r#"{"return": {"echo": true}, "id": {id}}"#.into()]
            } else {
                ok()
            }
        });
        let qmp = QmpClient::connect(stream, Duration::from_secs(2))
            .await
            .expect("connect");
        let r = qmp
            .execute_raw("device_add", json!({"driver": "pc-dimm"}))
            .await
            .expect("raw");
        assert_eq!(r["echo"], true);
    }
}
