//! [`StagedVmDir`]: a VM directory being created, kept under a hidden name until it is locked,
//! so that no VM directory is ever seen without its owner's lock (a reaper of unowned VMs
//! would otherwise take one being created for an orphan).

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};
use tracing::debug;

use crate::error::{Error, Result};
use crate::fs::blocking;
use crate::lock::{lock_blocking, Open, VmLock};

/// A VM directory made under a hidden staging name (`<root>/vm/.new-<id>`, never listed as a
/// VM) by [`crate::Store::stage_vm_dir`]. [`StagedVmDir::publish`] locks it and renames it to
/// `<root>/vm/<id>`; [`StagedVmDir::discard`] removes it.
#[derive(Debug)]
#[must_use = "a staged directory is published or discarded"]
pub struct StagedVmDir {
    id: String,
    staging: PathBuf,
    target: PathBuf,
    lock_name: &'static str,
    lock_mode: u32,
}

impl StagedVmDir {
    pub(crate) fn new(
        id: String,
        staging: PathBuf,
        target: PathBuf,
        lock_name: &'static str,
        lock_mode: u32,
    ) -> Self {
        Self {
            id,
            staging,
            target,
            lock_name,
            lock_mode,
        }
    }

    /// The VM id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hidden directory as it is now.
    pub fn path(&self) -> &std::path::Path {
        &self.staging
    }

    /// Takes the VM's lock inside the staged directory, then renames the directory to
    /// `<root>/vm/<id>` (`RENAME_NOREPLACE`): the VM's directory appears already owned.
    /// Returns its path and the lock. On failure the staged directory is removed;
    /// [`Error::AlreadyExists`] if a directory of that id appeared meanwhile.
    pub async fn publish(self) -> Result<(PathBuf, VmLock)> {
        blocking(move || {
            let published = (|| {
                let lock = lock_blocking(
                    &self.id,
                    &self.staging.join(self.lock_name),
                    Open::New,
                    self.lock_mode,
                )?;
                match renameat2(
                    None,
                    &self.staging,
                    None,
                    &self.target,
                    RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) => Ok(lock),
                    Err(Errno::EEXIST | Errno::ENOTEMPTY) => Err(Error::AlreadyExists {
                        id: self.id.clone(),
                    }),
                    Err(errno) => Err(Error::io("rename into", &self.target, errno.into())),
                }
            })();
            match published {
                Ok(lock) => {
                    debug!(vm_id = %self.id, dir = %self.target.display(), "created VM storage");
                    Ok((self.target, lock))
                }
                Err(e) => {
                    // Best effort: a leftover is hidden and holds no process.
                    let _ = fs::remove_dir_all(&self.staging);
                    Err(e)
                }
            }
        })
        .await
    }

    /// Removes the staged directory (a creation undone before [`StagedVmDir::publish`]).
    pub async fn discard(self) -> Result<()> {
        blocking(move || match fs::remove_dir_all(&self.staging) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &self.staging, e)),
        })
        .await
    }
}
