//! [`Vm::assign_sandbox`]: the seed's `assignSandbox` links, which make a sandbox's share path
//! and socket directory lead to this VM's.

use std::io::ErrorKind;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::{info, instrument};

use crate::error::{Error, Result};
use crate::links::{make_link, remove_links};
use crate::vm::Vm;

/// Name of the VM's share directory inside its storage directory (the seed's
/// `/run/vc/vm/<id>/shared`).
pub const SHARED_DIR: &str = "shared";

/// Where a sandbox expects its share path and socket directory (the seed's
/// `agent.getSharePath(sandbox)` and `agent.getVMPath(sandbox)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxLinks {
    /// The sandbox's share path; becomes a symlink to the VM's `shared/` directory.
    pub share_path: PathBuf,
    /// The sandbox's socket directory; becomes a symlink to the VM's storage directory (where
    /// its sockets are).
    pub sock_dir: PathBuf,
}

impl Vm {
    /// The VM's share directory, `<run_root>/vm/<id>/shared` (created by
    /// [`Vm::assign_sandbox`]).
    pub fn share_dir(&self) -> PathBuf {
        self.dir.join(SHARED_DIR)
    }

    /// Hands the VM to sandbox `sandbox_id`: creates the VM's share directory and the symlinks
    /// `links.share_path` → that directory and `links.sock_dir` → the VM's storage directory.
    ///
    /// A symlink already at either path is replaced (as the seed does); anything else there is
    /// [`Error::LinkExists`] (the seed removed it recursively). The parents must exist. If the
    /// second link fails, the first is removed again. [`Vm::stop`] removes the links.
    #[instrument(skip(self, links), fields(vm = %self.id))]
    pub async fn assign_sandbox(&self, sandbox_id: &str, links: &SandboxLinks) -> Result<()> {
        let mut inner = self.owned().await?;
        let share = self.share_dir();
        let created_share = match tokio::fs::create_dir(&share).await {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => false,
            Err(source) => {
                return Err(Error::Link {
                    op: "Creating",
                    path: share,
                    source,
                })
            }
        };
        let pairs = [(&share, &links.share_path), (&self.dir, &links.sock_dir)];
        let mut made = Vec::new();
        for (target, link) in pairs {
            if let Err(e) = make_link(target, link).await {
                remove_links(&made, &self.dir).await;
                if created_share {
                    let _ = tokio::fs::remove_dir(&share).await;
                }
                return Err(e);
            }
            made.push(link.clone());
        }
        info!(
            sandbox = sandbox_id,
            share = %links.share_path.display(),
            sock_dir = %links.sock_dir.display(),
            "VM assigned to sandbox"
        );
        inner.links.extend(made);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeBackends;

    #[tokio::test]
    async fn links_are_made_replaced_and_removed_on_stop() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let sb = h.root().join("sandbox");
        std::fs::create_dir(&sb).expect("mkdir");
        let links = SandboxLinks {
            share_path: sb.join("shared"),
            sock_dir: sb.join("sock"),
        };
        // A stale symlink is replaced.
        std::os::unix::fs::symlink("/nonexistent", &links.sock_dir).expect("symlink");
        vm.assign_sandbox("sb1", &links).await.expect("assign");
        assert_eq!(
            std::fs::read_link(&links.share_path).expect("link"),
            vm.share_dir()
        );
        assert_eq!(std::fs::read_link(&links.sock_dir).expect("link"), vm.dir());
        assert!(links.share_path.join(".").is_dir(), "leads to a directory");
        // Assigning again (same links) works.
        vm.assign_sandbox("sb1", &links).await.expect("again");
        vm.stop().await.expect("stop");
        assert!(std::fs::symlink_metadata(&links.share_path).is_err());
        assert!(std::fs::symlink_metadata(&links.sock_dir).is_err());
        assert!(!vm.dir().exists());
    }

    #[tokio::test]
    async fn second_link_failure_rolls_back_the_first() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let sb = h.root().join("sandbox");
        std::fs::create_dir_all(sb.join("sock")).expect("mkdir");
        let links = SandboxLinks {
            share_path: sb.join("shared"),
            sock_dir: sb.join("sock"),
        };
        assert!(matches!(
            vm.assign_sandbox("sb1", &links).await,
            Err(Error::LinkExists { path }) if path == links.sock_dir
        ));
        assert!(std::fs::symlink_metadata(&links.share_path).is_err());
        assert!(!vm.share_dir().exists());
        assert!(sb.join("sock").is_dir(), "a real directory is left alone");

        // A missing parent fails the first link; nothing is left either.
        let links = SandboxLinks {
            share_path: sb.join("missing/shared"),
            sock_dir: sb.join("sock2"),
        };
        assert!(matches!(
            vm.assign_sandbox("sb1", &links).await,
            Err(Error::Link { op: "Creating", .. })
        ));
        assert!(std::fs::symlink_metadata(&links.sock_dir).is_err());
        vm.stop().await.expect("stop");
    }
}
