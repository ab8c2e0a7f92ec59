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

/// Takes the run root's lock in `mode`, creating the run root if it is missing.
pub async fn run_root(s: &Settings, mode: LockMode) -> anyhow::Result<OpLock> {
    let root = &s.vm.run_root;
    tokio::fs::create_dir_all(root)
        .await
        .with_context(|| format!("Cannot create the run root {}", root.display()))?;
    OpLock::acquire_at(root, &lock_file(s), mode, WAIT)
        .await
        .map_err(|e| match e {
            LockError::Busy { .. } if mode == LockMode::Exclusive => anyhow::Error::new(e).context(
                "Other vmfactory commands use the run root (stop them first, e.g. `vmfactory get --hold`)",
            ),
            _ => anyhow::Error::new(e),
        })
}

fn lock_file(s: &Settings) -> PathBuf {
    s.vm.run_root.join(LOCK_FILE)
}
