//! [`TemplateFactory`]: base VMs cloned from a saved template VM (the seed's `template.go`).
//!
//! A template lives in one directory (default [`crate::DEFAULT_TEMPLATE_PATH`]):
//! `memory` (the guest RAM), `state` (QEMU's device state) and `metadata.json`
//! ([`TemplateMetadata`]). [`TemplateFactory::new`] makes one, [`TemplateFactory::fetch`]
//! opens an existing one, and each [`FactoryBase::get_base_vm`] boots a clone of it, paused.
//!
//! Mounts: `new` mounts a tmpfs there (`MS_NOSUID | MS_NODEV`, guest memory + 8 MiB, mode
//! 0700), or, where mounting is not permitted (`EPERM`), uses a plain 0700 directory and logs
//! a warning. It never mounts over a mount point or into a non-empty directory: if a usable
//! template for the same config is already there, `new` adopts it (so running `init` twice is
//! harmless — Kata stacked a second tmpfs), otherwise it refuses with
//! [`TemplateError::Occupied`].
//!
//! Accelerator: `new` and `fetch` resolve `accel = auto` once, with the host's answer kept in
//! the run root ([`TemplateHost::resolve_accel`]), and pin it and the CPU model it implies into
//! the template VM, the metadata and every clone; a template made under another accelerator
//! or CPU model is refused ([`TemplateError::Mismatch`] on `accel` or `cpu_model`).
//!
//! Ownership: a factory from `new` owns its template, and [`FactoryBase::close`] removes the
//! files, unmounts and removes the directory. A factory from `fetch` shares a template someone
//! else made; its `close` leaves the template alone ([`TemplateFactory::destroy`] removes it).
//!
//! One owner at a time, across processes: `new` holds the template's lock exclusively while it
//! makes (or adopts) the template, and every factory holds it shared for its lifetime, so a
//! second `new` waits for one being made and then adopts it, and removal waits for makers and
//! refuses while a factory uses the template ([`TemplateError::Busy`] names the processes).
//! Removal also refuses while processes map the template memory (live clones,
//! [`TemplateError::InUse`]) and touches only what the marker `new` wrote says it made
//! ([`TemplateError::NotOurs`] otherwise) — never half of a template.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::{debug, info, warn};
use vmfactory_hypervisor::{TemplatePaths, TemplateRole};
use vmfactory_persist::{LockMode, OpLock};
use vmfactory_proxy::ProxyKind;
use vmfactory_vm::{Backends, QemuBackends, Vm, VmConfig};

use super::error::{TemplateError, TemplateStep};
use super::files::{check_saved_files, check_size};
use super::host::{MountOutcome, SystemHost, TemplateHost};
use super::make::{create_dir, save_template_vm, Made};
use super::metadata::{
    CloneKey, FileIdentity, SavedFiles, TemplateMetadata, MEMORY_FILE, METADATA_FILE, STATE_FILE,
};
use super::owner::{lock_exclusive, remove_file, remove_locked, Marker, MARKER_FILE, REMOVE_WAIT};
use super::prestart::Prestarter;
use crate::base::{BaseError, FactoryBase, Prestarted};

/// Room on the template tmpfs beyond the guest memory (device state, metadata).
const TMPFS_EXTRA_BYTES: u64 = 8 << 20;

/// How long `new` and `fetch` wait for a template another process is making (a few seconds
/// under TCG; a nested KVM host is slower).
const MAKE_WAIT: Duration = Duration::from_secs(120);
/// How long a closing owner waits for the template's lock before leaving the template to
/// `destroy`.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

type Result<T> = std::result::Result<T, TemplateError>;

/// A factory of clones of one template.
pub struct TemplateFactory {
    config: VmConfig,
    /// `config` as the template VM and every clone run it: accelerator and CPU model resolved
    /// on this host ([`vmfactory_hypervisor::HypervisorConfig::pinned`]).
    run: VmConfig,
    path: PathBuf,
    backends: Arc<dyn Backends>,
    host: Arc<dyn TemplateHost>,
    owned: bool,
    closed: AtomicBool,
    /// What the template's metadata says of its clones' CRNG (see
    /// [`FactoryBase::clones_reseed_themselves`]); set when it is made or checked.
    reseed_themselves: AtomicBool,
    /// The template's lock, held shared while the factory is open.
    pub(super) lock: tokio::sync::Mutex<Option<OpLock>>,
    /// The data files as the save left them (from the metadata), checked before each clone.
    saved: std::sync::Mutex<Option<SavedFiles>>,
    /// Clones pre-started up to the state load ([`TemplateFactory::prestart`]).
    prestarted: Prestarter,
}

impl fmt::Debug for TemplateFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateFactory")
            .field("path", &self.path)
            .field("owned", &self.owned)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// The files of the template at `path`.
pub fn template_paths(path: &Path) -> TemplatePaths {
    TemplatePaths {
        memory: path.join(MEMORY_FILE),
        state: path.join(STATE_FILE),
    }
}

/// The config of the VM saved as the template at `path` (always with the builtin proxy, which
/// shows the agent re-listening).
pub fn template_vm_config(base: &VmConfig, path: &Path) -> VmConfig {
    let mut c = base.clone();
    c.hypervisor.template = Some(TemplateRole::SaveTo(template_paths(path)));
    c.proxy = ProxyKind::Builtin;
    c
}

/// The config a clone of the template at `path` boots with.
pub fn clone_vm_config(base: &VmConfig, path: &Path) -> VmConfig {
    let mut c = base.clone();
    c.hypervisor.template = Some(TemplateRole::CloneFrom(template_paths(path)));
    c
}

impl TemplateFactory {
    /// Makes a template of `config` at `path` with QEMU and the real host; see
    /// [`TemplateFactory::new_with`].
    pub async fn new(config: &VmConfig, path: impl Into<PathBuf>) -> Result<Self> {
        Self::new_with(config, path, Arc::new(QemuBackends), Arc::new(SystemHost)).await
    }

    /// Makes a template of `config` at `path`: creates the directory (0700), mounts a tmpfs
    /// (or falls back to the plain directory where mounting is not permitted), boots the
    /// template VM, warms it up (one RNG reseed and clock set, so clones resume with a ready
    /// CRNG and the agent's handler pages mapped), disconnects from its agent and waits until
    /// the agent has re-listened (its console line, not a sleep), pauses, saves and stops it,
    /// and writes the metadata. A failure cleans up what this call created (VM, files, mount,
    /// directory) and is returned.
    /// A usable template already at `path` is adopted; see the module docs.
    pub async fn new_with(
        config: &VmConfig,
        path: impl Into<PathBuf>,
        backends: Arc<dyn Backends>,
        host: Arc<dyn TemplateHost>,
    ) -> Result<Self> {
        let (this, tpl) = Self::open(config, path.into(), backends, host, true).await?;
        // The lock file lives beside the template: its parent must exist (`/run/vc/vm` on a
        // fresh host), as it must for the template itself.
        if let Some(parent) = this.path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| TemplateError::io("create", parent, e))?;
        }
        // Exclusive to make, replace or adopt; waits while another process makes it. When
        // others use the template (shared holders), it exists: share it too if it is usable.
        let lock = match lock_exclusive(&this.path, MAKE_WAIT).await {
            Ok(lock) => lock,
            Err(busy) => {
                let shared = OpLock::acquire(&this.path, LockMode::Shared, MAKE_WAIT)
                    .await
                    .map_err(|_| busy)?;
                return match this.check().await {
                    Ok(()) if Marker::load(&this.path).await?.is_some() => {
                        info!(path = %this.path.display(), "using the template another process made");
                        *this.lock.lock().await = Some(shared);
                        Ok(this)
                    }
                    res => {
                        shared.release().await;
                        Err(TemplateError::Occupied {
                            path: this.path.clone(),
                            reason: Box::new(res.err().unwrap_or(TemplateError::NotOurs {
                                path: this.path.clone(),
                                marker: MARKER_FILE,
                            })),
                        })
                    }
                };
            }
        };
        match this.adopt_or_make(&tpl, &lock).await {
            Ok(()) => this.hold(lock).await,
            Err(e) => {
                // Nothing of ours is left at the path: neither is the lock file.
                if let Err(e) = lock.remove().await {
                    warn!(error = %e, "removing the template's lock file failed");
                }
                Err(e)
            }
        }
    }

    /// Under the exclusive lock: adopts a usable template of ours, or replaces an unusable one
    /// of ours nobody uses, or makes one on a free path; refuses anything else.
    async fn adopt_or_make(&self, tpl: &VmConfig, lock: &OpLock) -> Result<()> {
        if self.usable().await? {
            info!(path = %self.path.display(), "reusing the template already there");
            return Ok(());
        }
        if self.is_occupied().await? {
            let reason = match self.check().await {
                Err(reason) => reason,
                Ok(()) => TemplateError::NotOurs {
                    path: self.path.clone(),
                    marker: MARKER_FILE,
                },
            };
            // Ours but unusable (its maker died half-way, or another config) and nobody uses
            // it: ours to replace. Anything else is left alone.
            if let Err(refused) = remove_locked(&self.path, self.host.as_ref(), lock).await {
                debug!(error = %refused, "the template path is occupied and not ours to replace");
                return Err(TemplateError::Occupied {
                    path: self.path.clone(),
                    reason: Box::new(reason),
                });
            }
            warn!(path = %self.path.display(), error = %reason, "replaced an unusable template vmfactory made earlier");
        }
        let t0 = std::time::Instant::now();
        let mut made = Made::default();
        match self.make(tpl, &mut made).await {
            Ok(()) => {
                info!(path = %self.path.display(), elapsed = ?t0.elapsed(), "template created");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, path = %self.path.display(), "creating the template failed, cleaning up");
                self.undo(made).await;
                Err(e)
            }
        }
    }

    /// Keeps the template's lock, shared, for the factory's lifetime.
    async fn hold(self, lock: OpLock) -> Result<Self> {
        let lock = lock
            .downgrade()
            .await
            .map_err(|source| TemplateError::Busy {
                path: self.path.clone(),
                source,
            })?;
        *self.lock.lock().await = Some(lock);
        Ok(self)
    }

    /// The factory handle for `config` at `path` (`owned`: its `close` removes the template),
    /// and the template VM's config, checked for shape. Resolves the accelerator here, once:
    /// the template VM, its metadata and every clone use the answer.
    async fn open(
        config: &VmConfig,
        path: PathBuf,
        backends: Arc<dyn Backends>,
        host: Arc<dyn TemplateHost>,
        owned: bool,
    ) -> Result<(Self, VmConfig)> {
        let base = config.without_template();
        let shape = |c: &VmConfig| {
            let tpl = template_vm_config(c, &path);
            tpl.validate_shape()
                .map_err(TemplateError::Config)
                .map(|()| tpl)
        };
        shape(&base)?;
        let accel = host.resolve_accel(&base.hypervisor, &base.run_root).await;
        let mut run = base.clone();
        run.hypervisor = base.hypervisor.pinned(accel);
        // Checked again pinned: `cpu_model = "host"` passes under `auto`, not once `auto`
        // resolved to TCG.
        let tpl = shape(&run)?;
        let this = Self {
            config: base,
            run,
            path,
            backends,
            host,
            owned,
            closed: AtomicBool::new(false),
            reseed_themselves: AtomicBool::new(false),
            lock: tokio::sync::Mutex::new(None),
            saved: std::sync::Mutex::new(None),
            prestarted: Prestarter::default(),
        };
        Ok((this, tpl))
    }

    /// Opens the existing template at `path` for `config`, with QEMU and the real host; see
    /// [`TemplateFactory::fetch_with`].
    pub async fn fetch(config: &VmConfig, path: impl Into<PathBuf>) -> Result<Self> {
        Self::fetch_with(config, path, Arc::new(QemuBackends), Arc::new(SystemHost)).await
    }

    /// Opens the existing template at `path` for `config` (Kata's fetch-only template). Refuses
    /// one whose metadata is missing, corrupt or of another version, whose metadata does not
    /// match `config` ([`TemplateError::Mismatch`] names the field), or whose memory or state
    /// file is missing or of the wrong size. The factory does not own the template.
    pub async fn fetch_with(
        config: &VmConfig,
        path: impl Into<PathBuf>,
        backends: Arc<dyn Backends>,
        host: Arc<dyn TemplateHost>,
    ) -> Result<Self> {
        let (this, _) = Self::open(config, path.into(), backends, host, false).await?;
        // Nothing there: say so without leaving a lock file beside nothing.
        if let Err(e) = tokio::fs::symlink_metadata(&this.path).await {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => TemplateError::Missing {
                    path: this.path.join(METADATA_FILE),
                },
                _ => TemplateError::io("stat", &this.path, e),
            });
        }
        let lock = OpLock::acquire(&this.path, LockMode::Shared, MAKE_WAIT)
            .await
            .map_err(|source| TemplateError::Busy {
                path: this.path.clone(),
                source,
            })?;
        if let Err(e) = this.check().await {
            lock.release().await;
            return Err(e);
        }
        *this.lock.lock().await = Some(lock);
        debug!(path = %this.path.display(), "template fetched");
        Ok(this)
    }

    /// Whether the template at `path` would serve `config` now: the check every
    /// [`TemplateFactory::fetch`] and clone makes (metadata, the config, QEMU's version, the
    /// files' sizes and stamps), read-only and without taking the template's lock, so a look
    /// never waits for a maker or gets in a user's way. For `vmfactory status`.
    pub async fn verify(config: &VmConfig, path: &Path) -> Result<()> {
        let (this, _) = Self::open(
            config,
            path.to_owned(),
            Arc::new(QemuBackends),
            Arc::new(SystemHost),
            false,
        )
        .await?;
        this.check().await
    }

    /// Removes the template at `path` that vmfactory made: its files, the tmpfs it mounted
    /// (every mount stacked there), the directory it created and the lock file. Waits for a
    /// template being made or removed by another process; refuses, before touching anything,
    /// a template a factory uses ([`TemplateError::Busy`]), one whose memory live clones map
    /// ([`TemplateError::InUse`]) and a path without vmfactory's marker
    /// ([`TemplateError::NotOurs`]). Other files in the directory are left, and then so is the
    /// directory. Idempotent.
    pub async fn destroy(path: &Path, host: &dyn TemplateHost) -> Result<()> {
        // Nothing there: nothing to lock or remove (and no lock file to leave behind).
        if tokio::fs::symlink_metadata(path).await.is_err()
            && tokio::fs::symlink_metadata(OpLock::file_for(path))
                .await
                .is_err()
        {
            return Ok(());
        }
        let lock = lock_exclusive(path, REMOVE_WAIT).await?;
        remove_locked(path, host, &lock).await?;
        lock.remove().await.map_err(|source| TemplateError::Busy {
            path: path.to_owned(),
            source,
        })
    }

    /// Lets go of the template without removing it, for a maker whose template outlives it
    /// (`vmfactory init` without a VM cache): `fetch` and `destroy` find it as it is, and no
    /// lock file is left beside it.
    pub async fn keep(self) {
        self.closed.store(true, Ordering::SeqCst);
        self.prestarted.close().await;
        if let Some(lock) = self.lock.lock().await.take() {
            lock.release().await;
        }
    }

    /// Keeps `want` clones pre-started from now on: QEMU spawned, QMP negotiated, the
    /// template memory mapped, waiting for the state load, refilled in the background. A
    /// `get_base_vm` takes one when one waits (else starts a clone from scratch); `close`
    /// stops them. Call once; later calls and 0 do nothing.
    pub async fn prestart(&self, want: usize) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let saved = self.saved_files();
        self.prestarted
            .start(
                want,
                clone_vm_config(&self.run, &self.path),
                self.backends.clone(),
                self.path.clone(),
                saved,
            )
            .await;
    }

    fn saved_files(&self) -> Option<SavedFiles> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The template directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `close` removes the template (made by this factory, not fetched).
    pub fn owns_template(&self) -> bool {
        self.owned
    }

    /// The loaded, checked metadata of the template.
    pub async fn metadata(&self) -> Result<TemplateMetadata> {
        TemplateMetadata::load(&self.path).await
    }

    /// Whether the path holds a template of ours that matches the config.
    async fn usable(&self) -> Result<bool> {
        if !self.is_occupied().await? || Marker::load(&self.path).await?.is_none() {
            return Ok(false);
        }
        Ok(self.check().await.is_ok())
    }

    /// Whether the path is a mount point or a non-empty directory.
    async fn is_occupied(&self) -> Result<bool> {
        if self.host.mount_type(&self.path).await?.is_some() {
            return Ok(true);
        }
        match tokio::fs::read_dir(&self.path).await {
            Ok(mut d) => Ok(d
                .next_entry()
                .await
                .map_err(|e| TemplateError::io("read", &self.path, e))?
                .is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(TemplateError::io("read", &self.path, e)),
        }
    }

    /// Checks the template at the path against the config: metadata, then files (as saved,
    /// where the metadata records them; remembered for the clones' checks).
    async fn check(&self) -> Result<()> {
        let meta = TemplateMetadata::load(&self.path).await?;
        let key = CloneKey::gather(&self.run.hypervisor, self.host.as_ref()).await?;
        meta.check(&key)?;
        self.reseed_themselves
            .store(meta.clones_reseed_themselves, Ordering::SeqCst);
        check_size(&self.path.join(MEMORY_FILE), Some(meta.memory_mib << 20)).await?;
        check_size(&self.path.join(STATE_FILE), meta.state_bytes).await?;
        if let Some(saved) = &meta.files {
            check_saved_files(&self.path, saved).await?;
        }
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = meta.files;
        Ok(())
    }

    /// The creation steps; `made` records what to undo.
    async fn make(&self, tpl: &VmConfig, made: &mut Made) -> Result<()> {
        made.dir = create_dir(&self.path).await?;
        let size = (self.config.hypervisor.memory_mib << 20) + TMPFS_EXTRA_BYTES;
        match self.host.mount_tmpfs(&self.path, size).await? {
            MountOutcome::Mounted => made.mounted = true,
            MountOutcome::NotPermitted => warn!(
                path = %self.path.display(),
                "mounting a tmpfs is not permitted here; the template uses a plain directory"
            ),
        }
        // First thing in it: what was made, so a later removal (or a new `init` after this
        // process died) can prove the template is vmfactory's and undo just that.
        made.files = true;
        Marker::new(made.dir, made.mounted)
            .write(&self.path)
            .await?;
        // The key before the boot: it stats the guest files and asks QEMU its version.
        let key = CloneKey::gather(&self.run.hypervisor, self.host.as_ref()).await?;
        let fork = save_template_vm(tpl, self.backends.as_ref()).await?;
        check_size(&self.path.join(MEMORY_FILE), Some(key.memory_mib << 20)).await?;
        let state_bytes = check_size(&self.path.join(STATE_FILE), None).await?;
        let mut meta = TemplateMetadata::new(key);
        meta.state_bytes = Some(state_bytes);
        meta.files = Some(SavedFiles {
            memory: FileIdentity::of(&self.path.join(MEMORY_FILE)).await?,
            state: FileIdentity::of(&self.path.join(STATE_FILE)).await?,
        });
        meta.clones_reseed_themselves = fork.is_active();
        meta.write(&self.path).await?;
        self.reseed_themselves
            .store(meta.clones_reseed_themselves, Ordering::SeqCst);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = meta.files;
        Ok(())
    }

    /// Undoes a failed creation: files, mount, directory (the VM was stopped already).
    async fn undo(&self, made: Made) {
        if made.files {
            for name in [MEMORY_FILE, STATE_FILE, METADATA_FILE, MARKER_FILE] {
                if let Err(e) = remove_file(&self.path.join(name)).await {
                    warn!(error = %e, "removing a template file during cleanup failed");
                }
            }
        }
        if made.mounted {
            if let Err(e) = self.host.unmount(&self.path).await {
                warn!(error = %e, "unmounting the template during cleanup failed");
            }
        }
        if made.dir {
            if let Err(e) = tokio::fs::remove_dir(&self.path).await {
                warn!(error = %e, "removing the template directory during cleanup failed");
            }
        }
    }
}

#[async_trait]
impl FactoryBase for TemplateFactory {
    fn config(&self) -> &VmConfig {
        &self.config
    }

    /// A clone of the template, paused (resume it). Its hypervisor config is the template's,
    /// with the accelerator and CPU model the template ran with; `config` contributes the proxy
    /// kind.
    fn prestarted(&self) -> Prestarted {
        Prestarted {
            waiting: self.prestarted.waiting(),
            pids: self.prestarted.pids(),
        }
    }

    async fn get_base_vm(&self, config: &VmConfig) -> std::result::Result<Vm, BaseError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(BaseError::Closed { what: "template" });
        }
        if let Some(saved) = self.saved_files() {
            if let Err(e) = check_saved_files(&self.path, &saved).await {
                // Waiting clones map what was saved: not what is there now.
                self.prestarted.flush().await;
                return Err(e.into());
            }
        }
        if let Some(waiting) = self.prestarted.take().await {
            let id = waiting.id().to_owned();
            match waiting.start(self.backends.as_ref(), config.proxy).await {
                Ok(vm) => return Ok(vm),
                // Died between the look and the load: never handed out; start afresh.
                Err(e) if e.hypervisor_exit().is_some() => {
                    warn!(vm = %id, error = %e, "a pre-started clone exited as it was started");
                }
                Err(e) => return Err(TemplateError::vm(TemplateStep::Clone, e).into()),
            }
        }
        let mut clone = clone_vm_config(&self.run, &self.path);
        clone.proxy = config.proxy;
        Vm::new_with(clone, self.backends.as_ref())
            .await
            .map_err(|e| TemplateError::vm(TemplateStep::Clone, e).into())
    }

    /// As the template's metadata says: its VM's agent was armed before the save.
    fn clones_reseed_themselves(&self) -> bool {
        self.reseed_themselves.load(Ordering::SeqCst)
    }

    /// Marks the factory closed and releases the template; if it owns the template, removes
    /// it ([`TemplateFactory::destroy`]) — unless another factory uses it or live clones map
    /// it: then the template stays (logged) for `destroy` to remove later, and closing still
    /// succeeds. Idempotent.
    async fn close(&self) -> std::result::Result<(), BaseError> {
        self.closed.store(true, Ordering::SeqCst);
        // First: their QEMUs map the template, which would then be kept as in use.
        self.prestarted.close().await;
        let Some(held) = self.lock.lock().await.take() else {
            return Ok(());
        };
        held.release().await;
        if !self.owned {
            return Ok(());
        }
        let lock = match lock_exclusive(&self.path, CLOSE_WAIT).await {
            Ok(lock) => lock,
            Err(e @ TemplateError::Busy { .. }) => {
                warn!(error = %crate::error_chain(&e), "template kept: another process uses it");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        match remove_locked(&self.path, self.host.as_ref(), &lock).await {
            Ok(()) => lock.remove().await.map_err(|source| {
                BaseError::from(TemplateError::Busy {
                    path: self.path.clone(),
                    source,
                })
            }),
            Err(e @ TemplateError::InUse { .. }) => {
                warn!(error = %e, "template kept: VMs cloned from it still run; `vmfactory destroy` removes it once they are gone");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests;
