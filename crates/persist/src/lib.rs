//! Run-directory storage for vmfactory VMs.
//!
//! Owns the on-disk layout under a run directory (default [`DEFAULT_ROOT`], `/run/vc`, as in
//! Kata Containers 1.x; tests pass a temporary one):
//!
//! ```text
//! <root>/vm/<id>/            0700, one per VM, created and destroyed (idempotently) by [`Store`]
//! <root>/vm/<id>/state.json  0600, {"version": N, "id": "<id>", "state": <caller's type>}
//! <root>/vm/<id>/lock        flock(2) target: one owner per VM ([`Store::lock`])
//! <root>/vm/.new-<id>/       a VM directory being created ([`Store::stage_vm_dir`])
//! ```
//!
//! A VM's owner creates its directory under the hidden staging name, locks it there and only
//! then renames it into place ([`StagedVmDir::publish`]), so a VM directory is never seen
//! without its owner's lock: whoever can take a VM's lock knows its owner is gone.
//!
//! State files are written atomically (temporary file in the same directory, `fsync`, rename,
//! `fsync` of the directory), so a crash or concurrent writers leave either the old or a new
//! state, never a torn file. Loading checks the size limit, the JSON, the envelope version and
//! that the recorded id matches the directory; every failure is a typed [`Error`], never a panic.
//! VM ids are validated ([`validate_id`]) before they touch a path. [`write_atomic`] and
//! [`read_limited`] are exported for other files with the same needs (template metadata, the
//! CLI's config file and wire forms).
//!
//! Every file read here or through [`read_limited`] / [`open_regular`] is opened without
//! following a symlink and without blocking, and must be a regular file (checked on the open
//! descriptor) within a size limit: a FIFO, `/dev/zero` or a link to `/etc/shadow` in a run
//! root or template directory is refused at once ([`Error::NotRegular`], [`Error::Symlink`],
//! [`Error::TooLarge`]).
//! [`OpLock`] is the cross-process lock of a whole operation on a path (a template, a run
//! root): shared or exclusive, its holders named when it is busy.
//!
//! This crate does not know what a VM's state contains (the `vm` crate defines it), does not
//! manage sockets, processes or mounts, and does not migrate old state layouts: a state file of
//! another version is refused with [`Error::VersionTooOld`] / [`Error::VersionTooNew`].
//!
//! # Examples
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> vmfactory_persist::Result<()> {
//! use vmfactory_persist::Store;
//! # let tmp = tempfile::tempdir().unwrap();
//! let store = Store::new(tmp.path());
//! store.create_vm_dir("vm0").await?;
//! let _owner = store.lock("vm0").await?;
//! store.save_state("vm0", &vec![1, 2, 3]).await?;
//! let state: Vec<u32> = store.load_state("vm0").await?;
//! assert_eq!(state, [1, 2, 3]);
//! store.destroy_vm_dir("vm0").await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod error;
mod fs;
mod id;
mod lock;
mod oplock;
mod staged;
mod store;

pub use error::{Error, FileKind, Result};
pub use fs::{
    open_regular, open_regular_blocking, read_limited, read_limited_blocking, write_atomic,
    write_atomic_blocking,
};
pub use id::{validate_id, MAX_ID_LEN};
pub use lock::VmLock;
pub use oplock::{Holder, LockError, LockMode, OpLock};
pub use staged::StagedVmDir;
pub use store::{Store, DEFAULT_MAX_STATE_SIZE, DEFAULT_ROOT, OLDEST_STATE_VERSION, STATE_VERSION};
