//! Orphans: VMs under a run root that no process owns any more (their owner died without
//! stopping or handing them over, e.g. a killed VM-cache server). A live owner holds the VM's
//! storage lock, and the kernel drops that lock when the owner dies, so a VM whose lock can be
//! taken has no owner. [`Vm::reap_orphans`] stops such VMs and removes their storage.

use std::path::Path;

use tracing::{info, warn};
use vmfactory_hypervisor::{Hypervisor, Qemu};
use vmfactory_persist::{Error as PersistError, Store};

use crate::error::{Error, Result};
use crate::vm::Vm;
use crate::wire::VmState;

impl Vm {
    /// Stops every VM under `run_root` that no process owns and removes its storage; returns
    /// their ids. VMs owned by a live handle (this process or another) are left alone. A VM
    /// whose creator died before saving its state is ended by killing the processes whose
    /// command lines name its run directory. Only the hypervisor is needed: the guest agent is
    /// not contacted. Meant for shutdown and crash recovery (`vmfactory destroy`).
    pub async fn reap_orphans(run_root: &Path) -> Result<Vec<String>> {
        let store = Store::new(run_root);
        let ids = store
            .list_vms()
            .await
            .map_err(|e| Error::storage("", "list", e))?;
        let mut reaped = Vec::new();
        for id in ids {
            // Only directories a VM owner ever locked are VMs: Kata's default layout keeps the
            // template (a tmpfs mount) at `<run_root>/vm/template`, among the VMs.
            let lock_path = store
                .lock_path(&id)
                .map_err(|e| Error::storage(&id, "lock", e))?;
            if !tokio::fs::try_exists(&lock_path).await.unwrap_or(false) {
                continue;
            }
            let lock = match store.lock(&id).await {
                Ok(lock) => lock,
                // Owned by a live handle, or gone in the meantime.
                Err(PersistError::Locked { .. } | PersistError::VmNotFound { .. }) => continue,
                Err(e) => return Err(Error::storage(&id, "lock", e)),
            };
            let state: VmState = match store.load_state(&id).await {
                Ok(state) => state,
                Err(e) => {
                    // Its creator died before it saved the state (or, for a moment, is
                    // between making the directory and locking it: reaping is for shutdown).
                    // Its processes are known only by the run dir their command lines name.
                    let dir = store
                        .vm_dir(&id)
                        .map_err(|e| Error::storage(&id, "dir", e))?;
                    let killed = vmfactory_hypervisor::kill_processes_naming(&dir).await;
                    warn!(vm = %id, error = %e, ?killed, "unowned VM without a state: killed its processes");
                    store
                        .destroy_vm_dir(&id)
                        .await
                        .map_err(|e| Error::storage(&id, "destroy", e))?;
                    drop(lock);
                    reaped.push(id);
                    continue;
                }
            };
            match Qemu::attach(state.hypervisor).await {
                Ok(qemu) => {
                    if let Err(e) = qemu.stop().await {
                        warn!(vm = %id, error = %e, "cannot stop an orphaned VM, left alone");
                        continue;
                    }
                }
                // Its QEMU is gone already (the pid is dead or belongs to another process).
                Err(vmfactory_hypervisor::Error::ProcessGone { .. }) => {}
                Err(e) => {
                    warn!(vm = %id, error = %e, "cannot re-attach to an orphaned VM, left alone");
                    continue;
                }
            }
            store
                .destroy_vm_dir(&id)
                .await
                .map_err(|e| Error::storage(&id, "destroy", e))?;
            drop(lock);
            info!(vm = %id, "orphaned VM stopped and removed");
            reaped.push(id);
        }
        if !reaped.is_empty() {
            // Like `Vm::stop`: the `vm/` directory goes once it is empty (fails harmlessly if not).
            let _ = tokio::fs::remove_dir(run_root.join("vm")).await;
        }
        Ok(reaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
