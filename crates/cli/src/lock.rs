//! The run root's lock: every command that makes or holds VMs under the run root holds it
//! shared for its whole run; `destroy` holds it exclusively, so it never reaps or removes under
//! a running `init`, `get` or VM-cache server, and says which one is in the way.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use vmfactory_persist::{LockError, LockMode, OpLock};

use crate::config_file::Settings;

/// The lock file, inside the run root.
const LOCK_FILE: &str = "vmfactory.lock";
/// How long a command waits while `destroy` holds the run root.
const WAIT: Duration = Duration::from_secs(120);

/// The run root's lock, held.
#[derive(Debug)]
pub struct RootLock {
    lock: OpLock,
    /// The run root did not exist before this command: remove it again if left empty.
    created: Option<PathBuf>,
}

impl RootLock {
    /// Takes the run root's lock in `mode`, creating the run root if it is missing.
    pub async fn acquire(s: &Settings, mode: LockMode) -> anyhow::Result<Self> {
        let root = &s.vm.run_root;
        let created = match tokio::fs::symlink_metadata(root).await {
            Ok(_) => None,
            Err(_) => {
                tokio::fs::create_dir_all(root)
                    .await
                    .with_context(|| format!("Cannot create the run root {}", root.display()))?;
                Some(root.clone())
            }
        };
        let lock = OpLock::acquire_at(root, &root.join(LOCK_FILE), mode, WAIT).await;
        let lock = match lock {
            Ok(lock) => lock,
            Err(e) => {
                if let Some(root) = &created {
                    let _ = tokio::fs::remove_dir_all(root).await;
                }
                return Err(match e {
                    LockError::Busy { .. } if mode == LockMode::Exclusive => {
                        anyhow::Error::new(e).context(
                            "Other vmfactory commands use the run root (stop them first, e.g. `vmfactory get --hold`)",
                        )
                    }
                    _ => anyhow::Error::new(e),
                });
            }
        };
        Ok(Self { lock, created })
    }

    /// Lets go of the run root: the lock file goes with the last holder out, and a run root
    /// this command created goes too if nothing else is in it.
    pub async fn release(self) {
        self.lock.release().await;
        if let Some(root) = self.created {
            let _ = tokio::fs::remove_dir(root).await;
        }
    }

    /// Removes the lock file (an exclusive holder at the end of `destroy`).
    pub async fn remove(self) -> anyhow::Result<()> {
        self.lock
            .remove()
            .await
            .context("Cannot remove the run root's lock file")
    }
}
