//! Orphans: VMs under a run root that no process owns any more (their owner died without
//! stopping or handing them over: a killed VM-cache server, `init` or `get`). A live owner
//! holds the VM's storage lock from before its directory is visible, and the kernel drops that
//! lock when the owner dies, so a VM whose lock is free has no owner. Its processes are known
//! from the records each wrote into the VM's directory before it exec'd
//! ([`ProcessRecord`]): [`Vm::reap_orphans`] ends exactly those (pid and start time checked)
//! and removes the storage; [`Vm::orphans`] only looks.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tracing::{info, warn};
use vmfactory_hypervisor::{Error as HypervisorError, ProcessRecord};
use vmfactory_persist::{Error as PersistError, Store};

use crate::error::{Error, Result};
use crate::vm::Vm;

/// A VM no live process owns, as [`Vm::orphans`] finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Orphan {
    /// The VM id (the name of its directory).
    pub id: String,
    /// Its directory, `<run_root>/vm/<id>`.
    pub dir: PathBuf,
    /// The processes it recorded, each checked alive by pid and start time. None: its
    /// creator died before spawning anything, and only the directory is left.
    pub processes: Vec<RecordedProcess>,
    /// Why its records cannot be read: then nothing about its processes can be proved, and
    /// [`Vm::reap_orphans`] leaves it alone.
    pub error: Option<String>,
}

/// A recorded process of an orphan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedProcess {
    /// The record.
    #[serde(flatten)]
    pub record: ProcessRecord,
    /// Whether it still runs (same pid and start time).
    pub alive: bool,
}

impl Orphan {
    /// The recorded QEMU that still runs, if any.
    pub fn live_qemu(&self) -> Option<u32> {
        self.processes
            .iter()
            .find(|p| p.alive && p.record.kind == vmfactory_hypervisor::ProcessKind::Qemu)
            .map(|p| p.record.pid)
    }
}

impl Vm {
    /// The VMs under `run_root` that no process owns, without touching them: no lock is taken
    /// (ownership is read from `/proc/locks`) and nothing is signalled or removed, so looking
    /// never gets in an owner's way. A VM being handed over between two processes shows here
    /// for the instant between them.
    pub async fn orphans(run_root: &Path) -> Result<Vec<Orphan>> {
        let store = Store::new(run_root);
        let ids = store
            .list_vms()
            .await
            .map_err(|e| Error::storage("", "list", e))?;
        let mut orphans = Vec::new();
        for id in ids {
            match store.is_locked(&id).await {
                Ok(false) => {}
                // Owned; or never locked (not a VM, e.g. the template in Kata's layout).
                Ok(true) | Err(PersistError::NotFound { .. } | PersistError::VmNotFound { .. }) => {
                    continue
                }
                Err(e) => return Err(Error::storage(&id, "lock", e)),
            }
            let dir = store
                .vm_dir(&id)
                .map_err(|e| Error::storage(&id, "dir", e))?;
            let (processes, error) = match ProcessRecord::read_all(&dir).await {
                Ok(records) => {
                    let mut processes = Vec::new();
                    for record in records {
                        let alive = record.alive().await;
                        processes.push(RecordedProcess { record, alive });
                    }
                    (processes, None)
                }
                Err(e) => (Vec::new(), Some(e.to_string())),
            };
            orphans.push(Orphan {
                id,
                dir,
                processes,
                error,
            });
        }
        Ok(orphans)
    }

    /// Ends every VM under `run_root` that no process owns and removes its storage; returns
    /// their ids. VMs owned by a live handle (this process or another) are left alone, and so
    /// is an orphan whose records cannot be read (nothing about it can be proved). Only the
    /// processes an orphan's records name are killed, each checked by pid and start time; one
    /// without records never ran a process, and only its directory is removed. Hidden
    /// directories of creations abandoned before they were locked are removed too. Only the
    /// hypervisor's records are used: the guest agent is not contacted. Meant for shutdown
    /// and crash recovery (`vmfactory destroy` and `init`).
    pub async fn reap_orphans(run_root: &Path) -> Result<Vec<String>> {
        let store = Store::new(run_root);
        let abandoned = store
            .remove_abandoned_staging()
            .await
            .map_err(|e| Error::storage("", "list", e))?;
        if !abandoned.is_empty() {
            info!(?abandoned, "removed abandoned VM creations");
        }
        let ids = store
            .list_vms()
            .await
            .map_err(|e| Error::storage("", "list", e))?;
        let mut reaped = Vec::new();
        for id in ids {
            if reap(&store, &id).await? {
                reaped.push(id);
            }
        }
        if !reaped.is_empty() || !abandoned.is_empty() {
            // Like `Vm::stop`: the `vm/` directory goes once it is empty (fails harmlessly if not).
            let _ = tokio::fs::remove_dir(run_root.join("vm")).await;
        }
        Ok(reaped)
    }
}

impl Vm {
    /// Ends VM `id` under `run_root` if no process owns it, as [`Vm::reap_orphans`] would, and
    /// removes its storage: `Ok(true)` if it did, `Ok(false)` if a live process owns it (or it
    /// is not a VM, or it is gone). Backs `vmfactory stop` of an orphan.
    pub async fn reap_orphan(run_root: &Path, id: &str) -> Result<bool> {
        let store = Store::new(run_root);
        let reaped = reap(&store, id).await?;
        if reaped {
            let _ = tokio::fs::remove_dir(run_root.join("vm")).await;
        }
        Ok(reaped)
    }
}

/// Ends and removes VM `id` if it is an orphan (see [`Vm::reap_orphans`]); whether it did.
async fn reap(store: &Store, id: &str) -> Result<bool> {
    // Only directories a VM owner ever locked are VMs: Kata's default layout keeps the
    // template (a tmpfs mount) at `<run_root>/vm/template`, among the VMs.
    let lock_path = store
        .lock_path(id)
        .map_err(|e| Error::storage(id, "lock", e))?;
    if !tokio::fs::try_exists(&lock_path).await.unwrap_or(false) {
        return Ok(false);
    }
    let lock = match store.lock(id).await {
        Ok(lock) => lock,
        // Owned by a live handle, or gone in the meantime.
        Err(PersistError::Locked { .. } | PersistError::VmNotFound { .. }) => return Ok(false),
        Err(e) => return Err(Error::storage(id, "lock", e)),
    };
    let dir = store.vm_dir(id).map_err(|e| Error::storage(id, "dir", e))?;
    if let Err(e) = end_recorded(id, &dir).await {
        warn!(vm = %id, error = %e, "cannot end an orphaned VM, left alone");
        return Ok(false);
    }
    // The recorded network goes at once (its host link too); a pin without a record (a crash
    // mid-setup) is unpinned, and its link ends with the namespace.
    if let Ok(state) = store.load_state::<crate::VmState>(id).await {
        if let Some(net) = &state.network {
            crate::network::remove(id, net).await;
        }
    }
    crate::network::unpin(&dir).await;
    store
        .destroy_vm_dir(id)
        .await
        .map_err(|e| Error::storage(id, "destroy", e))?;
    drop(lock);
    info!(vm = %id, "orphaned VM removed");
    Ok(true)
}

/// Ends the processes VM `id` recorded in `dir` that still run.
async fn end_recorded(id: &str, dir: &Path) -> std::result::Result<(), HypervisorError> {
    let records = ProcessRecord::read_all(dir).await?;
    if records.is_empty() {
        info!(vm = %id, "unowned VM that never ran a process");
    }
    for record in records {
        if record.kill(id).await? {
            let (pid, what) = (record.pid, record.kind.label());
            info!(vm = %id, pid, what, "orphan's recorded process ended");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_hypervisor::ProcessKind;

    #[tokio::test]
    async fn directories_never_locked_are_not_vms() {
        let root = tempfile::tempdir().unwrap();
        // Kata's default layout: the template lives among the VMs, without a lock file.
        let tpl = root.path().join("vm/template");
        std::fs::create_dir_all(&tpl).unwrap();
        std::fs::write(tpl.join("memory"), b"guest ram").unwrap();
        std::fs::write(tpl.join("metadata.json"), b"{}").unwrap();
        assert!(Vm::reap_orphans(root.path()).await.unwrap().is_empty());
        assert!(tpl.join("memory").exists(), "the template was left alone");
        assert!(!tpl.join("lock").exists(), "no lock file was created in it");
    }

    #[tokio::test]
    async fn an_unowned_vm_without_state_is_removed() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        store.create_vm_dir("abandoned").await.unwrap();
        drop(store.lock("abandoned").await.unwrap());
        let reaped = Vm::reap_orphans(root.path()).await.unwrap();
        assert_eq!(reaped, vec!["abandoned".to_owned()]);
        assert!(!root.path().join("vm").exists());
    }

    #[tokio::test]
    async fn a_locked_vm_is_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        store.create_vm_dir("owned").await.unwrap();
        let _lock = store.lock("owned").await.unwrap();
        assert!(Vm::reap_orphans(root.path()).await.unwrap().is_empty());
        assert!(root.path().join("vm/owned").exists());
    }

    fn alive(child: &mut std::process::Child) -> bool {
        child.try_wait().expect("try_wait").is_none()
    }

    fn sleep() -> std::process::Child {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep")
    }

    #[tokio::test]
    async fn only_the_recorded_process_is_killed() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let dir = store.create_vm_dir("orphan").await.unwrap();
        drop(store.lock("orphan").await.unwrap());
        let log = dir.join("console.log");
        std::fs::write(&log, b"").unwrap();
        // The recorded "QEMU", and an operator's `tail -f` of the VM's console log.
        let mut qemu = sleep();
        let mut tail = std::process::Command::new("tail")
            .arg("-f")
            .arg(&log)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until `tail` has the log open, removing the run dir makes it exit ("no files
        // remaining"): on a loaded machine the reap below once came first.
        let opened = |pid: u32| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == log))
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !opened(tail.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "tail never opened the log"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        ProcessRecord::save(ProcessKind::Qemu, qemu.id(), &dir)
            .await
            .unwrap();

        let listed = Vm::orphans(root.path()).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].live_qemu(), Some(qemu.id()));
        assert!(alive(&mut qemu), "listing touched nothing");
        let reaped = Vm::reap_orphans(root.path()).await.unwrap();
        assert_eq!(reaped, ["orphan"]);
        qemu.wait().unwrap();
        assert!(alive(&mut tail), "a process naming the run dir survives");
        assert!(!root.path().join("vm").exists());
        tail.kill().unwrap();
        tail.wait().unwrap();
    }

    #[tokio::test]
    async fn a_reused_pid_is_not_the_recorded_process() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let dir = store.create_vm_dir("orphan").await.unwrap();
        drop(store.lock("orphan").await.unwrap());
        let mut other = sleep();
        let saved = ProcessRecord::save(ProcessKind::Qemu, other.id(), &dir)
            .await
            .unwrap();
        // The same pid, started at another time: another process.
        let text = format!("v1 {} {}\n", saved.pid, saved.start_time + 1);
        std::fs::write(dir.join(ProcessKind::Qemu.file_name()), text).unwrap();
        let listed = Vm::orphans(root.path()).await.unwrap();
        assert_eq!(listed[0].live_qemu(), None);
        assert!(!listed[0].processes[0].alive);
        assert_eq!(Vm::reap_orphans(root.path()).await.unwrap(), ["orphan"]);
        assert!(alive(&mut other), "never signalled");
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[tokio::test]
    async fn orphans_are_listed_without_being_touched() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        for id in ["none", "owned", "unreadable"] {
            store.create_vm_dir(id).await.unwrap();
            drop(store.lock(id).await.unwrap());
        }
        let _owner = store.lock("owned").await.unwrap();
        let bad = store
            .vm_dir("unreadable")
            .unwrap()
            .join(ProcessKind::Qemu.file_name());
        std::fs::write(bad, b"not a record").unwrap();
        let listed = Vm::orphans(root.path()).await.unwrap();
        let ids: Vec<_> = listed.iter().map(|o| o.id.as_str()).collect();
        assert_eq!(ids, ["none", "unreadable"]);
        assert!(listed[0].processes.is_empty() && listed[0].error.is_none());
        assert_eq!(listed[0].dir, store.vm_dir("none").unwrap());
        assert!(listed[1].error.is_some());
        // Listing took no lock: each can be taken now.
        for id in ["none", "unreadable"] {
            drop(store.lock(id).await.unwrap());
        }
        // Reaping removes the one that never ran a process and leaves what nothing proves.
        assert_eq!(Vm::reap_orphans(root.path()).await.unwrap(), ["none"]);
        assert!(store.vm_dir("unreadable").unwrap().is_dir());
        assert!(store.vm_dir("owned").unwrap().is_dir());
    }

    #[tokio::test]
    async fn creations_are_hidden_until_locked() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let staged = store.stage_vm_dir("new").await.unwrap();
        assert!(Vm::orphans(root.path()).await.unwrap().is_empty());
        // A hidden directory without a lock is an abandoned creation (or one microseconds
        // old): the reaper removes it, and the creator's publish then fails instead of
        // running a VM in a removed directory.
        assert!(Vm::reap_orphans(root.path()).await.unwrap().is_empty());
        assert!(!staged.path().exists());
        assert!(staged.publish().await.is_err());
        let staged = store.stage_vm_dir("new").await.unwrap();
        let (_dir, lock) = staged.publish().await.unwrap();
        assert!(Vm::orphans(root.path()).await.unwrap().is_empty());
        assert!(Vm::reap_orphans(root.path()).await.unwrap().is_empty());
        assert!(store.vm_dir("new").unwrap().is_dir());
        drop(lock);
    }
}
