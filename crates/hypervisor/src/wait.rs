//! The one polling helper: [`wait_until`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// First poll interval; it doubles up to [`MAX_INTERVAL`].
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Longest pause between two polls. Kept short: what is polled here (a socket appearing, a
/// process exiting) is cheap to check and sits on the clone's critical path, where a 50 ms
/// cap cost up to 50 ms per wait.
const MAX_INTERVAL: Duration = Duration::from_millis(4);

/// Polls `cond` until it yields `Some`, or `timeout` passes (then `None`).
///
/// The interval starts at 1 ms and doubles up to 4 ms, so fast conditions (a socket that
/// appears within milliseconds) cost little latency and slow ones little CPU. `cond` is polled
/// at least once, even with a zero timeout.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut cond: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut interval = MIN_INTERVAL;
    loop {
        if let Some(v) = cond().await {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(MAX_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_value_once_ready() {
        let n = AtomicU32::new(0);
        let v = wait_until(Duration::from_secs(1), || async {
            (n.fetch_add(1, Ordering::SeqCst) >= 3).then_some(42)
        })
        .await;
        assert_eq!(v, Some(42));
    }

    #[tokio::test]
    async fn times_out_with_none() {
        let v: Option<()> = wait_until(Duration::from_millis(20), || async { None }).await;
        assert!(v.is_none());
        let v = wait_until(Duration::ZERO, || async { Some(1) }).await;
        assert_eq!(v, Some(1));
    }
}
