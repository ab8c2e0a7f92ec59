//! The builtin proxy: reads a VM's console socket and turns its lines into `tracing` events,
//! lines of a bounded log file and a tail kept in memory.

use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::instrument::WithSubscriber;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::console::{clean_line, LineSplitter};
use crate::error::{Error, Result};
use crate::kind::ProxyKind;
use crate::log::{ConsoleLog, Tail};
use crate::Proxy;

/// `tracing` target of the events carrying guest console lines.
pub const CONSOLE_TARGET: &str = "vmfactory::console";

/// Default [`BuiltinProxyConfig::log_max_bytes`]: 1 MiB, about 10,000 lines of a kernel's
/// boot output, so a guest flooding its console keeps at most 2 MiB of a tmpfs run root.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 1 << 20;

/// Default [`BuiltinProxyConfig::tail_lines`].
pub const DEFAULT_TAIL_LINES: usize = 20;

/// First pause between connection attempts; doubled up to [`BuiltinProxyConfig::max_backoff`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(5);

/// Tuning of a [`BuiltinProxy`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BuiltinProxyConfig {
    /// How long [`Proxy::start`] retries while the console socket is missing or refuses.
    pub connect_timeout: Duration,
    /// Longest pause between connection attempts (also while reconnecting after EOF).
    pub max_backoff: Duration,
    /// Lines buffered per subscriber before a slow one starts missing lines.
    pub line_capacity: usize,
    /// Longest line, in bytes; longer ones are cut into several lines.
    pub max_line_len: usize,
    /// Largest console log chunk, in bytes: past it the log moves to `<log>.1` (replacing the
    /// older chunk) and a new one begins, so a VM keeps at most twice this on disk.
    pub log_max_bytes: u64,
    /// How many of the last console lines [`Proxy::console_tail`] returns.
    pub tail_lines: usize,
}

impl Default for BuiltinProxyConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_millis(200),
            line_capacity: 1024,
            max_line_len: 4096,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            tail_lines: DEFAULT_TAIL_LINES,
        }
    }
}

/// Reads a VM's console socket in a background task and logs each guest console line.
///
/// Each non-empty line (with `\r`, ANSI escapes and other control characters removed) becomes
/// a `debug` event with target [`CONSOLE_TARGET`] and the fields `vm_id` and `line` (so
/// `RUST_LOG=info` does not show the guest), is sent to every [`subscribe`](Proxy::subscribe)r,
/// is kept among the last [`BuiltinProxyConfig::tail_lines`] ([`Proxy::console_tail`]) and,
/// when `start` was given a log path, is appended to that file (bounded by
/// [`BuiltinProxyConfig::log_max_bytes`]; a write error is logged once and ends only the log). When the console connection ends (the VM stopped,
/// or it was saved and a clone now serves a new console at the same path), the proxy reconnects
/// until it is stopped. Calling [`start`](Proxy::start) again points it at a new VM or console
/// path; subscriptions survive that. [`stop`](Proxy::stop), or dropping the proxy, ends the task
/// and closes all subscriptions.
#[derive(Debug)]
pub struct BuiltinProxy {
    config: BuiltinProxyConfig,
    lines: Mutex<Option<broadcast::Sender<String>>>,
    tail: Arc<Tail>,
    task: tokio::sync::Mutex<Option<ConsoleTask>>,
}

/// The running reader task.
#[derive(Debug)]
struct ConsoleTask {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl ConsoleTask {
    /// Asks the task to end and waits until it has.
    async fn shutdown(self) {
        // The task also ends if this sender is dropped, so a send error changes nothing.
        let _ = self.stop.send(true);
        if let Err(err) = self.handle.await {
            if err.is_panic() {
                error!(error = %err, "console proxy task panicked");
            }
        }
    }
}

impl Default for BuiltinProxy {
    fn default() -> Self {
        Self::new(BuiltinProxyConfig::default())
    }
}

impl BuiltinProxy {
    /// A stopped proxy.
    pub fn new(config: BuiltinProxyConfig) -> Self {
        Self {
            tail: Arc::new(Tail::new(config.tail_lines)),
            config,
            lines: Mutex::new(None),
            task: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the reader task is running (started and not stopped).
    pub async fn is_running(&self) -> bool {
        self.task
            .lock()
            .await
            .as_ref()
            .is_some_and(|t| !t.handle.is_finished())
    }

    /// The line channel, created on first use.
    fn sender(&self) -> broadcast::Sender<String> {
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .get_or_insert_with(|| broadcast::channel(self.config.line_capacity.max(1)).0)
            .clone()
    }
}

#[async_trait]
impl Proxy for BuiltinProxy {
    async fn start(&self, vm_id: &str, console_address: &Path, log: Option<&Path>) -> Result<()> {
        let mut task = self.task.lock().await;
        if let Some(old) = task.take() {
            old.shutdown().await;
        }
        // A retargeted proxy serves another VM (a clone): its tail starts empty.
        self.tail.clear();
        let log = match log {
            Some(path) => Some(
                ConsoleLog::open(path, self.config.log_max_bytes)
                    .await
                    .map_err(|source| Error::Log {
                        path: path.to_owned(),
                        source,
                    })?,
            ),
            None => None,
        };
        let stream = connect_until(console_address, &self.config).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let span = info_span!("console_proxy", vm_id = %vm_id);
        let reader = ConsoleReader {
            vm_id: vm_id.to_owned(),
            path: console_address.to_owned(),
            lines: self.sender(),
            tail: self.tail.clone(),
            config: self.config.clone(),
        };
        let handle = tokio::spawn(
            reader
                .run(stream, log, stop_rx)
                .instrument(span)
                .with_current_subscriber(),
        );
        *task = Some(ConsoleTask {
            stop: stop_tx,
            handle,
        });
        info!(vm_id, console = %console_address.display(), "console proxy started");
        Ok(())
    }

    async fn stop(&self) {
        if let Some(task) = self.task.lock().await.take() {
            task.shutdown().await;
            debug!("console proxy stopped");
        }
        // Closes every subscription (the task's clone of the sender is gone too).
        self.lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn kind(&self) -> ProxyKind {
        ProxyKind::Builtin
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.sender().subscribe())
    }

    fn console_tail(&self) -> Vec<String> {
        self.tail.lines()
    }
}

/// What the background task needs.
struct ConsoleReader {
    vm_id: String,
    path: PathBuf,
    lines: broadcast::Sender<String>,
    tail: Arc<Tail>,
    config: BuiltinProxyConfig,
}

impl ConsoleReader {
    /// Reads `stream`, then reconnects and reads again, until `stop` says so (or its sender
    /// is dropped).
    async fn run(
        self,
        mut stream: UnixStream,
        mut log: Option<ConsoleLog>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let mut splitter = LineSplitter::new(self.config.max_line_len);
            match self
                .pump(&mut stream, &mut splitter, &mut log, &mut stop)
                .await
            {
                Ok(Pumped::Stopped) => {
                    self.drain(&mut stream, &mut splitter, &mut log).await;
                    return;
                }
                Ok(Pumped::Closed) => debug!("console closed, reconnecting"),
                Err(err) => warn!(error = %err, "console read failed, reconnecting"),
            }
            stream = tokio::select! {
                biased;
                () = stopped(&mut stop) => return,
                stream = self.reconnect() => stream,
            };
            info!(console = %self.path.display(), "console reconnected");
        }
    }

    /// Emits every line of `stream` until EOF or a stop, writing each chunk's lines to `log`.
    /// The stop is seen only while waiting to read: a chunk's lines, once sent to the
    /// subscribers, always reach the log too (a stop that cancelled the write lost them).
    async fn pump(
        &self,
        stream: &mut UnixStream,
        splitter: &mut LineSplitter,
        log: &mut Option<ConsoleLog>,
        stop: &mut watch::Receiver<bool>,
    ) -> io::Result<Pumped> {
        let mut buf = vec![0u8; 4096];
        loop {
            // Reading is cancel-safe: a stop here loses no bytes.
            let n = tokio::select! {
                biased;
                () = stopped(stop) => return Ok(Pumped::Stopped),
                read = stream.read(&mut buf) => read?,
            };
            let raw = if n == 0 {
                splitter.finish().into_iter().collect()
            } else {
                splitter.push(&buf[..n])
            };
            self.record(&raw, log).await;
            if n == 0 {
                return Ok(Pumped::Closed);
            }
        }
    }

    /// On stop: emits what the console has already sent without waiting for more (a VM that
    /// failed to come up is stopped right after its last lines, the ones a post-mortem
    /// needs), and the unterminated rest.
    async fn drain(
        &self,
        stream: &mut UnixStream,
        splitter: &mut LineSplitter,
        log: &mut Option<ConsoleLog>,
    ) {
        let mut buf = vec![0u8; 4096];
        let mut raw = Vec::new();
        // Bounded: the console socket's buffer, not a guest that keeps printing.
        for _ in 0..64 {
            match stream.try_read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend(splitter.push(&buf[..n])),
            }
        }
        raw.extend(splitter.finish());
        self.record(&raw, log).await;
    }

    /// Emits the raw lines and appends the non-empty ones to `log`.
    async fn record(&self, raw: &[Vec<u8>], log: &mut Option<ConsoleLog>) {
        let lines: Vec<String> = raw.iter().filter_map(|l| self.emit(l)).collect();
        if let Some(file) = log {
            if let Err(err) = file.write_lines(&lines).await {
                warn!(error = %err, "writing the console log failed; no longer logging to it");
                *log = None;
            }
        }
    }

    /// Logs one console line, keeps it in the tail and hands it to the subscribers; returns
    /// it unless it is empty once cleaned.
    fn emit(&self, raw: &[u8]) -> Option<String> {
        let line = clean_line(raw);
        if line.is_empty() {
            return None;
        }
        debug!(target: CONSOLE_TARGET, vm_id = %self.vm_id, line = %line, "guest console");
        self.tail.push(&line);
        // No subscribers is fine.
        let _ = self.lines.send(line.clone());
        Some(line)
    }

    /// Connects to the console path, retrying with backoff for as long as it takes.
    async fn reconnect(&self) -> UnixStream {
        let mut backoff = INITIAL_BACKOFF;
        let mut warned = false;
        loop {
            match UnixStream::connect(&self.path).await {
                Ok(stream) => return stream,
                Err(err) if is_retriable(&err) => {
                    debug!(error = %err, "console not available yet");
                }
                Err(err) => {
                    if !warned {
                        warn!(error = %err, console = %self.path.display(), "cannot reconnect to console, retrying");
                        warned = true;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.max_backoff);
        }
    }
}

/// How [`ConsoleReader::pump`] ended without an error.
enum Pumped {
    /// The console reached EOF.
    Closed,
    /// A stop was requested.
    Stopped,
}

/// Resolves once a stop has been requested (or the requester is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Errors meaning "the console is not there yet": the socket does not exist, or nothing
/// listens on it, or its backlog is full.
fn is_retriable(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::WouldBlock
    )
}

/// Connects to `path`, retrying with backoff while the console is not there yet, until
/// `config.connect_timeout` has passed.
async fn connect_until(path: &Path, config: &BuiltinProxyConfig) -> Result<UnixStream> {
    let deadline = Instant::now() + config.connect_timeout;
    let mut backoff = INITIAL_BACKOFF;
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return Ok(stream),
            Err(last) if is_retriable(&last) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::ConnectTimeout {
                        path: path.to_owned(),
                        timeout: config.connect_timeout,
                        last,
                    });
                }
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(config.max_backoff);
            }
            Err(source) => {
                return Err(Error::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wait_for_line;
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    const WAIT: Duration = Duration::from_secs(10);

    fn quick() -> BuiltinProxyConfig {
        BuiltinProxyConfig {
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_millis(20),
            ..BuiltinProxyConfig::default()
        }
    }

    /// Accepts one connection on `listener`, writes `data`, and closes it.
    async fn serve_once(listener: &UnixListener, data: &[u8]) {
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(data).await.unwrap();
        conn.shutdown().await.unwrap();
    }

    async fn next_line(rx: &mut broadcast::Receiver<String>) -> String {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn subscriber_sees_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            conn.write_all(b"first\r\nsec").await.unwrap();
            conn.write_all(b"ond\r\n\r\n\x1b[1mthird\x1b[0m\n")
                .await
                .unwrap();
            for i in 0..100 {
                conn.write_all(format!("n{i}\n").as_bytes()).await.unwrap();
            }
            // Keep the connection open until the test is done.
            let mut sink = Vec::new();
            let _ = conn.read_to_end(&mut sink).await;
        });

        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        proxy.start("vm1", &path, None).await.unwrap();
        assert!(proxy.is_running().await);
        assert_eq!(next_line(&mut rx).await, "first");
        assert_eq!(next_line(&mut rx).await, "second");
        assert_eq!(next_line(&mut rx).await, "third");
        for i in 0..100 {
            assert_eq!(next_line(&mut rx).await, format!("n{i}"));
        }
        proxy.stop().await;
        server.await.unwrap();
    }

    #[tokio::test]
    async fn reconnects_to_a_new_console_at_the_same_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();

        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        let (started, ()) = tokio::join!(
            proxy.start("vm1", &path, None),
            serve_once(&listener, b"template 1\ntemplate 2\nunterminated")
        );
        started.unwrap();
        assert_eq!(next_line(&mut rx).await, "template 1");
        assert_eq!(next_line(&mut rx).await, "template 2");
        // The rest of a line is flushed at EOF.
        assert_eq!(next_line(&mut rx).await, "unterminated");

        // The template VM is gone: no socket for a while, then the clone's console.
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listener = UnixListener::bind(&path).unwrap();
        serve_once(&listener, b"clone 1\n").await;
        assert_eq!(next_line(&mut rx).await, "clone 1");

        // And once more with a stale socket file left by a killed QEMU: connecting is refused
        // until the next QEMU replaces it.
        drop(listener);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            UnixStream::connect(&path).await.unwrap_err().kind(),
            ErrorKind::ConnectionRefused
        );
        std::fs::remove_file(&path).unwrap();
        let listener = UnixListener::bind(&path).unwrap();
        serve_once(&listener, b"clone 2\n").await;
        assert_eq!(next_line(&mut rx).await, "clone 2");
        assert!(proxy.is_running().await);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn start_again_retargets_to_another_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let (la, lb) = (
            UnixListener::bind(&a).unwrap(),
            UnixListener::bind(&b).unwrap(),
        );
        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();

        let (started, ()) =
            tokio::join!(proxy.start("tpl", &a, None), serve_once(&la, b"from a\n"));
        started.unwrap();
        assert_eq!(next_line(&mut rx).await, "from a");
        let (started, ()) =
            tokio::join!(proxy.start("clone", &b, None), serve_once(&lb, b"from b\n"));
        started.unwrap();
        // The same subscription carries on.
        assert_eq!(next_line(&mut rx).await, "from b");
        // The tail is the new VM's only.
        assert_eq!(proxy.console_tail(), ["from b"]);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn start_waits_for_the_socket_to_appear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let server_path = path.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let listener = UnixListener::bind(&server_path).unwrap();
            serve_once(&listener, b"late\n").await;
        });
        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        proxy.start("vm1", &path, None).await.unwrap();
        assert_eq!(next_line(&mut rx).await, "late");
        server.await.unwrap();
        proxy.stop().await;
    }

    #[tokio::test]
    async fn start_fails_typed_when_no_console() {
        let dir = tempfile::tempdir().unwrap();
        let proxy = BuiltinProxy::new(BuiltinProxyConfig {
            connect_timeout: Duration::from_millis(100),
            ..quick()
        });
        let missing = dir.path().join("missing.sock");
        match proxy.start("vm1", &missing, None).await {
            Err(Error::ConnectTimeout { path, last, .. }) => {
                assert_eq!(path, missing);
                assert_eq!(last.kind(), ErrorKind::NotFound);
            }
            other => panic!("expected ConnectTimeout, got {other:?}"),
        }
        assert!(!proxy.is_running().await);

        // A path too long for a unix socket cannot become valid by waiting.
        let long = dir.path().join("x".repeat(200));
        assert!(matches!(
            proxy.start("vm1", &long, None).await,
            Err(Error::Connect { .. })
        ));
    }

    #[tokio::test]
    async fn stop_is_idempotent_and_ends_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let proxy = BuiltinProxy::new(quick());
        proxy.stop().await; // Never started.

        let mut rx = proxy.subscribe().unwrap();
        proxy.start("vm1", &path, None).await.unwrap();
        let (_conn, _) = listener.accept().await.unwrap();
        proxy.stop().await;
        assert!(!proxy.is_running().await);
        // The subscription closes only once every sender is gone, including the task's:
        // this proves the task has ended.
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
        proxy.stop().await;
        proxy.stop().await;
    }

    #[tokio::test]
    async fn stop_ends_a_task_that_is_reconnecting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        let (started, ()) = tokio::join!(
            proxy.start("vm1", &path, None),
            serve_once(&listener, b"bye\n")
        );
        started.unwrap();
        assert_eq!(next_line(&mut rx).await, "bye");
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::time::timeout(WAIT, proxy.stop()).await.unwrap();
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Closed)
        ));
    }

    #[tokio::test]
    async fn stop_keeps_the_unterminated_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let log = dir.path().join("console.log");
        let listener = UnixListener::bind(&path).unwrap();
        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        proxy.start("vm1", &path, Some(&log)).await.unwrap();
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(b"panic\n---[ end trace").await.unwrap();
        assert_eq!(next_line(&mut rx).await, "panic");
        proxy.stop().await;
        assert_eq!(proxy.console_tail(), ["panic", "---[ end trace"]);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "panic\n---[ end trace\n"
        );
    }

    #[tokio::test]
    async fn dropping_the_proxy_ends_the_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let proxy = BuiltinProxy::new(quick());
        let mut rx = proxy.subscribe().unwrap();
        proxy.start("vm1", &path, None).await.unwrap();
        let (_conn, _) = listener.accept().await.unwrap();
        drop(proxy);
        let closed = tokio::time::timeout(WAIT, rx.recv()).await.unwrap();
        assert!(matches!(closed, Err(broadcast::error::RecvError::Closed)));
    }

    #[tokio::test]
    async fn wait_for_the_agent_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let proxy: Arc<dyn Proxy> = Arc::new(BuiltinProxy::new(quick()));
        let mut rx = proxy.subscribe().unwrap();
        let (started, ()) = tokio::join!(
            proxy.start("vm1", &path, None),
            serve_once(
                &listener,
                b"[    0.5] Run /init\r\nvmfactory-agent: listening on agent.channel.0\r\n"
            )
        );
        started.unwrap();
        let line = wait_for_line(&mut rx, WAIT, |l| {
            l == "vmfactory-agent: listening on agent.channel.0"
        })
        .await
        .unwrap();
        assert_eq!(line, "vmfactory-agent: listening on agent.channel.0");
        proxy.stop().await;
        assert!(matches!(
            wait_for_line(&mut rx, WAIT, |_| true).await,
            Err(Error::ConsoleClosed)
        ));
    }
}
