//! The proxy that does nothing.

use std::path::Path;

use async_trait::async_trait;

use crate::error::Result;
use crate::kind::ProxyKind;
use crate::Proxy;

/// A proxy that does nothing: the agent is dialed directly and the console is not read.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProxy;

#[async_trait]
impl Proxy for NoProxy {
    async fn start(
        &self,
        _vm_id: &str,
        _console_address: &Path,
        _log: Option<&Path>,
    ) -> Result<()> {
        Ok(())
    }

    async fn stop(&self) {}

    fn kind(&self) -> ProxyKind {
        ProxyKind::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_without_a_console() {
        let proxy = NoProxy;
        proxy
            .start("vm1", Path::new("/does/not/exist"), None)
            .await
            .unwrap();
        assert_eq!(proxy.kind(), ProxyKind::None);
        assert!(proxy.subscribe().is_none());
        assert!(proxy.console_tail().is_empty());
        proxy.stop().await;
        proxy.stop().await;
    }
}
