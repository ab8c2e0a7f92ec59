//! What is kept of a VM that failed to come up: the last console lines (in the error,
//! [`Error::NotUp`]) and its console log and hypervisor stderr, moved out of its run directory
//! (which the undo removes) to `<run_root>/failed/<id>/`, where they stay until `vmfactory
//! destroy` ([`remove_failed`]); only the newest [`KEEP_FAILED`] are kept.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use tracing::{debug, warn};
use vmfactory_persist::Store;

use crate::error::Error;

/// Directory under the run root holding the logs of VMs that failed to come up.
pub const FAILED_DIR: &str = "failed";

/// How many failed VMs' logs are kept; older ones are removed when a new one is kept.
pub const KEEP_FAILED: usize = 10;

/// The files of a VM's run directory worth keeping after a failed boot: the console log
/// (and its previous chunk), and the stderr of QEMU and of its vsock backend.
const KEPT_FILES: [&str; 4] = [
    "console.log",
    "console.log.1",
    "qemu.stderr",
    "vsock-backend.stderr",
];

/// How many of the last console lines the one-line error message shows.
const SHORT_TAIL: usize = 3;

/// Longest console line, in characters, the one-line message quotes whole (a console line
/// can be 4 KiB; `-v` and the log have it all).
const SHORT_LINE: usize = 160;

/// What is known of a VM that failed to come up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Postmortem {
    /// The last console lines read, oldest first (empty without a console proxy).
    pub console_tail: Vec<String>,
    /// The console log, moved to `<run_root>/failed/<id>/console.log`, if there was one.
    pub console_log: Option<PathBuf>,
    /// `<run_root>/failed/<id>`, if any log was kept (a clone whose state failed to load has
    /// QEMU's stderr but no console log yet).
    pub kept_in: Option<PathBuf>,
}

impl Postmortem {
    /// Whether there is anything to show.
    pub fn is_empty(&self) -> bool {
        self.console_tail.is_empty() && self.kept_in.is_none()
    }

    /// The last few console lines and where the log is, for a one-line message: `` (console:
    /// "a" | "b"; log kept at /run/vc/failed/<id>/console.log)``, or nothing.
    pub(crate) fn summary(&self) -> String {
        let mut parts = Vec::new();
        let skip = self.console_tail.len().saturating_sub(SHORT_TAIL);
        let short: Vec<String> = self.console_tail[skip..]
            .iter()
            .map(|l| match l.char_indices().nth(SHORT_LINE) {
                Some((cut, _)) => format!("{:?}", format!("{}…", &l[..cut])),
                None => format!("{l:?}"),
            })
            .collect();
        if !short.is_empty() {
            parts.push(format!("console: {}", short.join(" | ")));
        }
        match (&self.console_log, &self.kept_in) {
            (Some(log), _) => parts.push(format!("log kept at {}", log.display())),
            (None, Some(dir)) => parts.push(format!("logs kept in {}", dir.display())),
            (None, None) => {}
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join("; "))
        }
    }
}

/// `<run_root>/failed`.
pub fn failed_root(run_root: &Path) -> PathBuf {
    run_root.join(FAILED_DIR)
}

/// A failed VM whose logs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedVm {
    /// The VM id.
    pub id: String,
    /// `<run_root>/failed/<id>`.
    pub dir: PathBuf,
    /// When its logs were kept (the directory's modification time).
    pub when: Option<SystemTime>,
}

/// The failed VMs whose logs are kept under `run_root`, newest first. Nothing if there is no
/// `failed` directory.
pub async fn list_failed(run_root: &Path) -> std::io::Result<Vec<FailedVm>> {
    let root = failed_root(run_root);
    let mut entries = match tokio::fs::read_dir(&root).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    while let Some(entry) = entries.next_entry().await? {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        found.push(FailedVm {
            id: entry.file_name().to_string_lossy().into_owned(),
            dir: entry.path(),
            when: meta.modified().ok(),
        });
    }
    found.sort_by(|a, b| b.when.cmp(&a.when).then_with(|| a.id.cmp(&b.id)));
    Ok(found)
}

/// Removes `<run_root>/failed` and everything in it; returns how many failed VMs' logs were
/// there. Nothing to remove is fine.
pub async fn remove_failed(run_root: &Path) -> std::io::Result<usize> {
    let count = list_failed(run_root).await?.len();
    match tokio::fs::remove_dir_all(failed_root(run_root)).await {
        Ok(()) => Ok(count),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Moves the logs of VM `id` (stopped, about to be removed) to `<run_root>/failed/<id>/` and
/// prunes the older ones; returns where the console log went (if it existed) and the
/// directory (if anything was kept). Best effort: a failure is logged, and the error the
/// caller reports is what matters.
pub(crate) async fn keep_logs(store: &Store, id: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let Ok(vm_dir) = store.vm_dir(id) else {
        return (None, None);
    };
    let mut present = Vec::new();
    for name in KEPT_FILES {
        // An empty file (QEMU's stderr when it never ran) tells nothing.
        if tokio::fs::metadata(vm_dir.join(name))
            .await
            .is_ok_and(|m| m.len() > 0)
        {
            present.push(name);
        }
    }
    if present.is_empty() {
        return (None, None);
    }
    let failed = failed_root(store.root()).join(id);
    if let Err(e) = tokio::fs::create_dir_all(&failed).await {
        warn!(error = %e, dir = %failed.display(), "cannot keep the failed VM's logs");
        return (None, None);
    }
    let mut console_log = None;
    for name in present {
        let to = failed.join(name);
        match tokio::fs::rename(vm_dir.join(name), &to).await {
            Ok(()) if name == "console.log" => console_log = Some(to),
            Ok(()) => {}
            Err(e) => warn!(error = %e, file = name, "cannot keep a failed VM's log"),
        }
    }
    prune(store.root()).await;
    (console_log, Some(failed))
}

/// Removes all but the newest [`KEEP_FAILED`] failed VMs' logs.
async fn prune(run_root: &Path) {
    let Ok(failed) = list_failed(run_root).await else {
        return;
    };
    for old in failed.into_iter().skip(KEEP_FAILED) {
        debug!(dir = %old.dir.display(), "removing an old failed VM's logs");
        if let Err(e) = tokio::fs::remove_dir_all(&old.dir).await {
            warn!(error = %e, dir = %old.dir.display(), "cannot remove an old failed VM's logs");
        }
    }
}

/// `error`, of VM `id` that failed to come up, with its post-mortem attached
/// ([`Error::NotUp`]) when there is one.
pub(crate) fn attach(id: &str, error: Error, postmortem: Postmortem) -> Error {
    if postmortem.is_empty() {
        return error;
    }
    Error::NotUp {
        id: id.to_owned(),
        postmortem: Box::new(postmortem),
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_shows_the_last_lines_and_the_log() {
        let pm = Postmortem {
            console_tail: (1..=5).map(|i| format!("line {i}")).collect(),
            console_log: Some("/r/failed/x/console.log".into()),
            kept_in: Some("/r/failed/x".into()),
        };
        assert_eq!(
            pm.summary(),
            " (console: \"line 3\" | \"line 4\" | \"line 5\"; log kept at /r/failed/x/console.log)"
        );
        assert_eq!(Postmortem::default().summary(), "");
        let long = Postmortem {
            console_tail: vec!["é".repeat(SHORT_LINE + 10)],
            console_log: None,
            kept_in: None,
        };
        let stderr_only = Postmortem {
            console_tail: Vec::new(),
            console_log: None,
            kept_in: Some("/r/failed/x".into()),
        };
        assert!(!stderr_only.is_empty());
        assert_eq!(stderr_only.summary(), " (logs kept in /r/failed/x)");
        assert_eq!(
            long.summary(),
            format!(" (console: \"{}…\")", "é".repeat(SHORT_LINE))
        );
        assert!(Postmortem::default().is_empty());
        let e = attach(
            "x",
            Error::NotOwned {
                id: "x".into(),
                state: "stopped",
            },
            Postmortem::default(),
        );
        assert!(matches!(e, Error::NotOwned { .. }), "nothing to attach");
    }

    #[tokio::test]
    async fn keeps_the_newest_failed_vms_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path());
        assert!(list_failed(dir.path()).await.expect("list").is_empty());
        let mut ids = Vec::new();
        for i in 0..KEEP_FAILED + 2 {
            let id = format!("vm{i:02}");
            let vm_dir = store.vm_dir(&id).expect("dir");
            std::fs::create_dir_all(&vm_dir).expect("mkdir");
            std::fs::write(vm_dir.join("console.log"), format!("{id}\n")).expect("log");
            std::fs::write(vm_dir.join("state.json"), "{}").expect("state");
            let (kept, kept_in) = keep_logs(&store, &id).await;
            assert_eq!(kept_in, Some(failed_root(dir.path()).join(&id)));
            assert_eq!(
                kept,
                Some(failed_root(dir.path()).join(&id).join("console.log"))
            );
            assert!(!vm_dir.join("console.log").exists(), "moved, not copied");
            // Distinct modification times, so "newest" is well defined.
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64);
            std::fs::File::open(failed_root(dir.path()).join(&id))
                .and_then(|f| f.set_modified(t))
                .expect("mtime");
            ids.push(id);
        }
        let listed: Vec<String> = list_failed(dir.path())
            .await
            .expect("list")
            .into_iter()
            .map(|f| f.id)
            .collect();
        // The last one kept pruned down to KEEP_FAILED before its own mtime was set.
        assert_eq!(listed.len(), KEEP_FAILED);
        assert_eq!(listed[0], ids[ids.len() - 1]);
        assert!(!listed.contains(&ids[0]));
        // A VM without logs (or with empty ones) keeps nothing.
        let bare = store.vm_dir("bare").expect("dir");
        std::fs::create_dir_all(&bare).expect("mkdir");
        std::fs::write(bare.join("qemu.stderr"), "").expect("empty stderr");
        assert_eq!(keep_logs(&store, "bare").await, (None, None));
        assert_eq!(
            remove_failed(dir.path()).await.expect("remove"),
            KEEP_FAILED
        );
        assert!(!failed_root(dir.path()).exists());
        assert_eq!(remove_failed(dir.path()).await.expect("again"), 0);
    }
}
