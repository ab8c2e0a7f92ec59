//! The builtin proxy logs each guest console line as a `debug` `tracing` event tagged with the
//! VM id, and to the VM's console log file.
//!
//! This is its own test binary, with a single test and a global subscriber: a thread-local
//! subscriber (`set_default`) loses events when other tests register tracing callsites on
//! other threads at the same time (tracing-core caches callsite interest process-wide).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;
use vmfactory_proxy::{BuiltinProxy, BuiltinProxyConfig, Proxy, CONSOLE_TARGET};

/// One captured event: its target and its fields, formatted.
#[derive(Debug, Clone)]
struct Captured {
    target: String,
    level: tracing::Level,
    fields: HashMap<String, String>,
}

/// A layer recording every event.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

struct FieldVisitor<'a>(&'a mut HashMap<String, String>);

impl Visit for FieldVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        // `%value` fields arrive here through their Display form.
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut FieldVisitor(&mut fields));
        let mut events = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        events.push(Captured {
            target: event.metadata().target().to_owned(),
            level: *event.metadata().level(),
            fields,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_events_carry_the_vm_id() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(capture.clone()))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("console.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let proxy = BuiltinProxy::new(BuiltinProxyConfig::default());
    let mut rx = proxy.subscribe().unwrap();
    let serve = async {
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(b"hello\r\n\x1b[32mworld\x1b[0m\n")
            .await
            .unwrap();
        conn.shutdown().await.unwrap();
    };
    let log = dir.path().join("console.log");
    let (started, ()) = tokio::join!(proxy.start("vm-42", &path, Some(&log)), serve);
    started.unwrap();
    for expected in ["hello", "world"] {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(line, expected);
    }
    proxy.stop().await;
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nworld\n");
    assert_eq!(proxy.console_tail(), ["hello", "world"]);

    let events = capture.0.lock().unwrap().clone();
    let console: Vec<_> = events
        .iter()
        .filter(|e| e.target == CONSOLE_TARGET)
        .collect();
    assert_eq!(console.len(), 2, "{events:?}");
    for (event, line) in console.iter().zip(["hello", "world"]) {
        assert_eq!(event.fields["vm_id"], "vm-42");
        // Below `info`: a service at `RUST_LOG=info` does not log its guests' consoles.
        assert_eq!(event.level, tracing::Level::DEBUG);
        assert_eq!(event.fields["line"], line);
    }
}
