//! Task events for containerd: the topics, the messages, and where they are sent.

use std::fmt::Debug;

use async_trait::async_trait;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim::protos::protobuf::{well_known_types::timestamp::Timestamp, MessageDyn};
use containerd_shim::protos::topics;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::Context;
use tracing::warn;

use crate::service::CreateParams;

/// `/tasks/create`.
pub const TASK_CREATE: &str = topics::TASK_CREATE_EVENT_TOPIC;
/// `/tasks/start`.
pub const TASK_START: &str = topics::TASK_START_EVENT_TOPIC;
/// `/tasks/exit`.
pub const TASK_EXIT: &str = topics::TASK_EXIT_EVENT_TOPIC;
/// `/tasks/delete`.
pub const TASK_DELETE: &str = topics::TASK_DELETE_EVENT_TOPIC;
/// `/tasks/exec-added`.
pub const TASK_EXEC_ADDED: &str = topics::TASK_EXEC_ADDED_EVENT_TOPIC;
/// `/tasks/exec-started`.
pub const TASK_EXEC_STARTED: &str = topics::TASK_EXEC_STARTED_EVENT_TOPIC;

/// Where events go: containerd's publisher in the shim, a recorder in tests.
#[async_trait]
pub trait EventSink: Send + Sync + Debug {
    /// Sends one event; a failure is logged, never returned (an event is not the task).
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// containerd's ttRPC publisher for one namespace.
pub struct Publisher {
    remote: RemotePublisher,
    namespace: String,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("address", &self.remote.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Publisher {
    /// Publishes through `remote` in `namespace`.
    pub fn new(remote: RemotePublisher, namespace: String) -> Self {
        Publisher { remote, namespace }
    }
}

#[async_trait]
impl EventSink for Publisher {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .remote
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            warn!(topic, error = %e, "cannot publish event");
        }
    }
}

/// Now, as a protobuf timestamp.
pub fn now() -> Timestamp {
    Timestamp::now()
}

pub(crate) fn task_create(p: &CreateParams, pid: u32) -> Box<dyn MessageDyn> {
    let mut io = TaskIO::new();
    io.stdin = p.stdio.stdin.clone();
    io.stdout = p.stdio.stdout.clone();
    io.stderr = p.stdio.stderr.clone();
    io.terminal = p.stdio.terminal;
    let mut e = TaskCreate::new();
    e.container_id = p.id.clone();
    e.bundle = p.bundle.clone();
    e.io = Some(io).into();
    e.pid = pid;
    Box::new(e)
}

pub(crate) fn task_start(id: &str, pid: u32) -> Box<dyn MessageDyn> {
    let mut e = TaskStart::new();
    e.container_id = id.to_owned();
    e.pid = pid;
    Box::new(e)
}

pub(crate) fn task_exit(
    id: &str,
    process_id: &str,
    pid: u32,
    status: u32,
    at: Timestamp,
) -> Box<dyn MessageDyn> {
    let mut e = TaskExit::new();
    e.container_id = id.to_owned();
    e.id = process_id.to_owned();
    e.pid = pid;
    e.exit_status = status;
    e.exited_at = Some(at).into();
    Box::new(e)
}

pub(crate) fn task_delete(id: &str, pid: u32, status: u32, at: Timestamp) -> Box<dyn MessageDyn> {
    let mut e = TaskDelete::new();
    e.container_id = id.to_owned();
    e.id = id.to_owned();
    e.pid = pid;
    e.exit_status = status;
    e.exited_at = Some(at).into();
    Box::new(e)
}

pub(crate) fn task_exec_added(id: &str, exec_id: &str) -> Box<dyn MessageDyn> {
    let mut e = TaskExecAdded::new();
    e.container_id = id.to_owned();
    e.exec_id = exec_id.to_owned();
    Box::new(e)
}

pub(crate) fn task_exec_started(id: &str, exec_id: &str, pid: u32) -> Box<dyn MessageDyn> {
    let mut e = TaskExecStarted::new();
    e.container_id = id.to_owned();
    e.exec_id = exec_id.to_owned();
    e.pid = pid;
    Box::new(e)
}

/// Keeps every event, for tests.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// (topic, event) in order.
    pub events: std::sync::Mutex<Vec<(String, Box<dyn MessageDyn>)>>,
}

#[cfg(any(test, feature = "test-utils"))]
impl RecordingSink {
    /// The topics so far.
    pub fn topics(&self) -> Vec<String> {
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        ev.iter().map(|(t, _)| t.clone()).collect()
    }
}

#[cfg(any(test, feature = "test-utils"))]
#[async_trait]
impl EventSink for RecordingSink {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        ev.push((topic.to_owned(), event));
    }
}
