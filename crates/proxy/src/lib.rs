//! Console proxies of vmfactory VMs.
//!
//! A [`Proxy`] is started for each VM with the VM id and the path of the unix socket of QEMU's
//! console chardev (QEMU is the server side). Two kinds exist ([`ProxyKind`]):
//!
//! - [`BuiltinProxy`] (`builtin`) reads the console socket in a background task and emits each
//!   guest console line as a `debug` `tracing` event (target [`CONSOLE_TARGET`], fields `vm_id`
//!   and `line`), appends it to the VM's console log (a file bounded to two chunks, the older
//!   one at [`rotated_path`]) and keeps the last lines in memory ([`Proxy::console_tail`], for
//!   the report of a VM that fails to come up); it reconnects when the console goes away and comes back (a template clone serves
//!   its console on a new socket). Callers can [`subscribe`](Proxy::subscribe) to the lines and
//!   [`wait_for_line`] for one, e.g. the agent's `vmfactory-agent: listening on agent.channel.0`,
//!   instead of sleeping.
//! - [`NoProxy`] (`none`) does nothing.
//!
//! With the `test-utils` feature, `FakeProxy` stands in for either kind in other crates' tests:
//! the test shows the console lines and can make `start` fail.
//!
//! Neither stands between the host and the agent, so a proxy is not told the agent's address.
//! Kata Containers 1.x ran a separate `kata-proxy` process per sandbox that multiplexed several
//! gRPC streams over the single virtio-serial port with yamux, because gRPC wanted one HTTP/2
//! connection per client and the serial port offers one byte stream. That is no longer needed:
//! ttRPC carries every call of a client over a single connection, and vsock / hybrid vsock
//! multiplex connections natively, so the host dials the agent directly and a proxy's only
//! remaining job is the console.
//!
//! This crate does not choose or dial the agent channel (the `vm` and `agent` crates do), does
//! not configure QEMU's console device (the `hypervisor` crate does), and does not choose where
//! the console log lives (the `vm` crate passes its path to [`Proxy::start`]).
#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

mod builtin;
mod console;
mod error;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod kind;
mod log;
mod none;

pub use builtin::{
    BuiltinProxy, BuiltinProxyConfig, CONSOLE_TARGET, DEFAULT_LOG_MAX_BYTES, DEFAULT_TAIL_LINES,
};
pub use error::{Error, Result};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{FakeProxy, FakeProxyCall};
pub use kind::ProxyKind;
pub use log::{rotated_path, ROTATED_SUFFIX};
pub use none::NoProxy;

/// A VM's console proxy. Object safe; handed out as `Arc<dyn Proxy>` by [`new_proxy`].
#[async_trait]
pub trait Proxy: Send + Sync + Debug {
    /// Starts proxying for VM `vm_id`, whose console is the unix socket `console_address`
    /// (QEMU listens on it), appending its lines to the file `log` if given (created if
    /// missing, so a VM handed from one process to another keeps one log; only the process
    /// running the proxy writes it). Starting a started proxy retargets it.
    async fn start(&self, vm_id: &str, console_address: &Path, log: Option<&Path>) -> Result<()>;

    /// Stops proxying and waits until the proxy's task has ended. Idempotent.
    async fn stop(&self);

    /// Which kind of proxy this is.
    fn kind(&self) -> ProxyKind;

    /// A receiver of the guest's console lines from now on, or `None` if this proxy does not
    /// read the console. Subscribe before the awaited output can appear (even before
    /// [`start`](Proxy::start)); the receiver reports `Closed` once the proxy is stopped.
    fn subscribe(&self) -> Option<broadcast::Receiver<String>> {
        None
    }

    /// The last console lines read since the last [`start`](Proxy::start), oldest first
    /// (still there after [`stop`](Proxy::stop)); empty if this proxy does not read the
    /// console.
    fn console_tail(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Creates a stopped proxy of the given kind, with default settings.
pub fn new_proxy(kind: ProxyKind) -> Arc<dyn Proxy> {
    match kind {
        ProxyKind::Builtin => Arc::new(BuiltinProxy::default()),
        ProxyKind::None => Arc::new(NoProxy),
    }
}

/// Waits up to `timeout` for a console line on `lines` for which `matches` is true and returns
/// it. Lines that arrived before `lines` was subscribed are not seen.
///
/// Errors: [`Error::WaitTimeout`], or [`Error::ConsoleClosed`] if the proxy was stopped.
pub async fn wait_for_line(
    lines: &mut broadcast::Receiver<String>,
    timeout: Duration,
    mut matches: impl FnMut(&str) -> bool + Send,
) -> Result<String> {
    let wait = async {
        loop {
            match lines.recv().await {
                Ok(line) if matches(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    warn!(
                        skipped,
                        "console subscriber fell behind, lines were skipped"
                    );
                }
                Err(RecvError::Closed) => return Err(Error::ConsoleClosed),
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or(Err(Error::WaitTimeout { timeout }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_proxy_makes_each_kind() {
        for kind in [ProxyKind::Builtin, ProxyKind::None] {
            assert_eq!(new_proxy(kind).kind(), kind);
        }
        assert!(new_proxy(ProxyKind::Builtin).subscribe().is_some());
        assert!(new_proxy(ProxyKind::None).subscribe().is_none());
    }

    #[tokio::test]
    async fn wait_for_line_matches_times_out_and_sees_close() {
        let (tx, mut rx) = broadcast::channel(16);
        for line in ["a", "vmfactory-agent: listening on agent.channel.0", "b"] {
            tx.send(line.to_owned()).unwrap();
        }
        let line = wait_for_line(&mut rx, Duration::from_secs(5), |l| {
            l.contains("listening on agent.channel.0")
        })
        .await
        .unwrap();
        assert_eq!(line, "vmfactory-agent: listening on agent.channel.0");

        // "b" does not match; nothing else comes.
        assert!(matches!(
            wait_for_line(&mut rx, Duration::from_millis(50), |l| l == "c").await,
            Err(Error::WaitTimeout { .. })
        ));

        drop(tx);
        assert!(matches!(
            wait_for_line(&mut rx, Duration::from_secs(5), |_| true).await,
            Err(Error::ConsoleClosed)
        ));
    }

    #[tokio::test]
    async fn wait_for_line_survives_lagging() {
        let (tx, mut rx) = broadcast::channel(2);
        for i in 0..10 {
            tx.send(format!("line {i}")).unwrap();
        }
        let line = wait_for_line(&mut rx, Duration::from_secs(5), |l| l == "line 9")
            .await
            .unwrap();
        assert_eq!(line, "line 9");
    }
}
