//! [`FakeProxy`]: an in-memory [`Proxy`] for other crates' unit tests (feature `test-utils`).
//! It reads no socket: the test shows console lines ([`FakeProxy::push_line`], lines every
//! new subscriber gets at once, such as the agent's `listening` line, or lines shown on each
//! start), and the proxy records its starts and stops and fails `start` on demand. Shown
//! lines go to the tail and, when `start` was given a log path, to that file, as the builtin
//! proxy's do.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::kind::ProxyKind;
use crate::log::Tail;
use crate::Proxy;

/// Lines buffered per subscriber.
const LINE_CAPACITY: usize = 64;

/// A call recorded by a [`FakeProxy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeProxyCall {
    /// [`Proxy::start`] with its arguments.
    Start {
        /// The VM id.
        vm_id: String,
        /// The console address.
        console: PathBuf,
        /// The console log path.
        log: Option<PathBuf>,
    },
    /// [`Proxy::stop`].
    Stop,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<FakeProxyCall>,
    running: bool,
    fail_start: bool,
    greeting: Vec<String>,
    boot_lines: Vec<String>,
    log: Option<PathBuf>,
    lines: Option<broadcast::Sender<String>>,
}

/// A console proxy that behaves like the real one of its kind without a console: a
/// [`ProxyKind::Builtin`] one hands out subscriptions (closed on [`stop`](Proxy::stop)), a
/// [`ProxyKind::None`] one does not.
#[derive(Debug)]
pub struct FakeProxy {
    kind: ProxyKind,
    state: Mutex<State>,
    tail: Tail,
}

impl Default for FakeProxy {
    fn default() -> Self {
        Self::new(ProxyKind::Builtin)
    }
}

impl FakeProxy {
    /// A stopped proxy of `kind` that shows nothing.
    pub fn new(kind: ProxyKind) -> Self {
        Self {
            kind,
            state: Mutex::default(),
            tail: Tail::new(crate::DEFAULT_TAIL_LINES),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every later [`start`](Proxy::start) fail with [`Error::Injected`] (`false` heals).
    pub fn fail_start(&self, fail: bool) {
        self.lock().fail_start = fail;
    }

    /// Lines every later subscriber receives at once, as if the guest printed them just after
    /// it subscribed (replaces the earlier ones).
    pub fn greet_subscribers<S: Into<String>>(&self, lines: impl IntoIterator<Item = S>) {
        self.lock().greeting = lines.into_iter().map(Into::into).collect();
    }

    /// Lines the console shows on every later successful [`start`](Proxy::start), as a
    /// guest's boot would (replaces the earlier ones).
    pub fn show_on_start<S: Into<String>>(&self, lines: impl IntoIterator<Item = S>) {
        self.lock().boot_lines = lines.into_iter().map(Into::into).collect();
    }

    /// Shows `line` on the console: every current subscriber receives it, the tail keeps it
    /// and the log (if any) gets it. Returns how many subscribers received it.
    pub fn push_line(&self, line: impl Into<String>) -> usize {
        let g = self.lock();
        self.show(&g, line.into())
    }

    fn show(&self, g: &State, line: String) -> usize {
        if self.kind == ProxyKind::None {
            return 0;
        }
        self.tail.push(&line);
        if let Some(path) = &g.log {
            // Test-only and small: a plain blocking append.
            let appended = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(e) = appended {
                tracing::warn!(error = %e, path = %path.display(), "fake console log write failed");
            }
        }
        g.lines
            .as_ref()
            .and_then(|tx| tx.send(line).ok())
            .unwrap_or(0)
    }

    /// Whether the proxy was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.lock().running
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<FakeProxyCall> {
        self.lock().calls.clone()
    }

    /// How many times [`start`](Proxy::start) was called (failed calls too).
    pub fn starts(&self) -> usize {
        let g = self.lock();
        g.calls
            .iter()
            .filter(|c| matches!(c, FakeProxyCall::Start { .. }))
            .count()
    }
}

#[async_trait]
impl Proxy for FakeProxy {
    async fn start(&self, vm_id: &str, console_address: &Path, log: Option<&Path>) -> Result<()> {
        let mut g = self.lock();
        g.calls.push(FakeProxyCall::Start {
            vm_id: vm_id.to_owned(),
            console: console_address.to_owned(),
            log: log.map(Path::to_owned),
        });
        if g.fail_start {
            return Err(Error::Injected { method: "start" });
        }
        g.running = true;
        g.log = log.map(Path::to_owned);
        self.tail.clear();
        for line in g.boot_lines.clone() {
            self.show(&g, line);
        }
        Ok(())
    }

    async fn stop(&self) {
        let mut g = self.lock();
        g.calls.push(FakeProxyCall::Stop);
        g.running = false;
        g.log = None;
        // As the builtin proxy does: every subscription ends.
        g.lines = None;
    }

    fn kind(&self) -> ProxyKind {
        self.kind
    }

    fn console_tail(&self) -> Vec<String> {
        self.tail.lines()
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        if self.kind == ProxyKind::None {
            return None;
        }
        let mut g = self.lock();
        let tx = g
            .lines
            .get_or_insert_with(|| broadcast::channel(LINE_CAPACITY).0)
            .clone();
        let rx = tx.subscribe();
        for line in &g.greeting {
            // `rx` is subscribed: the send cannot fail.
            let _ = tx.send(line.clone());
        }
        Some(rx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wait_for_line;

    #[tokio::test]
    async fn records_calls_and_fails_on_demand() {
        let proxy = FakeProxy::new(ProxyKind::None);
        assert_eq!(proxy.kind(), ProxyKind::None);
        assert!(proxy.subscribe().is_none(), "a `none` proxy has no console");
        proxy.fail_start(true);
        assert!(matches!(
            proxy.start("vm1", Path::new("/c"), None).await,
            Err(Error::Injected { method: "start" })
        ));
        assert!(!proxy.is_running());
        proxy.fail_start(false);
        proxy
            .start("vm1", Path::new("/c"), None)
            .await
            .expect("start");
        assert!(proxy.is_running());
        proxy.stop().await;
        assert!(!proxy.is_running());
        assert_eq!(proxy.starts(), 2);
        let start = FakeProxyCall::Start {
            vm_id: "vm1".into(),
            console: "/c".into(),
            log: None,
        };
        assert_eq!(
            proxy.calls(),
            [start.clone(), start, FakeProxyCall::Stop],
            "failed starts are recorded too"
        );
    }

    #[tokio::test]
    async fn shown_lines_reach_the_tail_and_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("console.log");
        let proxy = FakeProxy::default();
        proxy.show_on_start(["boot 1", "boot 2"]);
        proxy
            .start("vm1", Path::new("/c"), Some(&log))
            .await
            .expect("start");
        proxy.push_line("later");
        proxy.stop().await;
        proxy.push_line("after stop: tail only");
        assert_eq!(
            proxy.console_tail(),
            ["boot 1", "boot 2", "later", "after stop: tail only"]
        );
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "boot 1\nboot 2\nlater\n"
        );
    }

    #[tokio::test]
    async fn subscribers_see_greeting_and_pushed_lines_until_stop() {
        let proxy = FakeProxy::default();
        assert_eq!(proxy.push_line("nobody listens"), 0);
        proxy.greet_subscribers(["vmfactory-agent: listening on agent.channel.0"]);
        let mut rx = proxy.subscribe().expect("builtin has a console");
        let line = wait_for_line(&mut rx, Duration::from_secs(5), |l| l.contains("listening"))
            .await
            .expect("greeted");
        assert_eq!(line, "vmfactory-agent: listening on agent.channel.0");
        assert_eq!(proxy.push_line("b"), 1);
        assert_eq!(rx.recv().await.expect("pushed"), "b");
        proxy.stop().await;
        assert!(matches!(
            wait_for_line(&mut rx, Duration::from_secs(5), |_| true).await,
            Err(Error::ConsoleClosed)
        ));
    }
}
