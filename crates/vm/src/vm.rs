//! [`Vm`]: creation with undo on failure ([`Vm::new`]) and the end of a VM's life
//! ([`Vm::stop`]). Handing a VM over is in `handover.rs`, the other operations in `ops.rs` and
//! `sandbox.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio::time::Instant;
use tracing::{debug, info, info_span, warn, Instrument};
use vmfactory_agent::{Agent, AgentUrl, HealthStatus};
use vmfactory_hypervisor::Hypervisor;
use vmfactory_net::VmNetwork;
use vmfactory_persist::{StagedVmDir, Store, VmLock};
use vmfactory_proxy::Proxy;

use crate::backends::{Backends, NewStep, QemuBackends};
use crate::config::VmConfig;
use crate::endpoint::running_agent_url;
use crate::error::{Error, Result};
use crate::exit::{unless_exited, watched};
use crate::links::remove_links;
use crate::network;
use crate::postmortem::{self, Postmortem};
use crate::wire::VmState;

/// Pause between two `Check`s that failed at once (no agent connection yet, say).
const CHECK_RETRY: Duration = Duration::from_millis(4);

/// Whether this handle owns the VM.
#[derive(Debug)]
pub(crate) enum Ownership {
    /// This handle owns the VM and holds its storage lock (released on drop).
    Owned {
        /// The lock, held for its `Drop`.
        _lock: VmLock,
    },
    /// Stopped through this handle (storage destroyed).
    Stopped,
    /// Handed over with [`Vm::detach`].
    Detached,
}

/// What the handle tracks besides its parts.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) ownership: Ownership,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u64,
    pub(crate) cpu_delta: u32,
    /// Mount points in the guest of hot-plugged disks, by disk id.
    pub(crate) mounts: BTreeMap<String, String>,
    /// Sandbox links created by [`Vm::assign_sandbox`], removed on stop.
    pub(crate) links: Vec<PathBuf>,
    /// Containers by id, with their image's disk id (empty while being created). Not
    /// persisted: a container lives as long as the handle that made it.
    pub(crate) containers: BTreeMap<String, String>,
}

/// A VM: a hypervisor, a guest agent, a console proxy and its storage directory
/// `<run_root>/vm/<id>/` (which also holds its sockets and logs), owned through a lock.
///
/// Methods take `&self`; share a `Vm` in an `Arc`. Hotplug bookkeeping is serialised by an
/// internal lock. A `Vm` ends with [`Vm::stop`] (the VM is gone) or [`Vm::detach`] (another
/// handle takes over from the wire form). Dropping a `Vm` that was neither stopped nor detached
/// leaves the VM running and its directory in place, and logs a warning.
#[derive(Debug)]
pub struct Vm {
    pub(crate) id: String,
    pub(crate) config: VmConfig,
    pub(crate) store: Store,
    pub(crate) dir: PathBuf,
    pub(crate) hypervisor: Arc<dyn Hypervisor>,
    pub(crate) agent: Arc<dyn Agent>,
    /// Where `agent` dials (a vsock CID is the VM's for its QEMU's life, so this holds).
    pub(crate) agent_url: AgentUrl,
    pub(crate) proxy: Arc<dyn Proxy>,
    pub(crate) network: Option<VmNetwork>,
    pub(crate) inner: Mutex<Inner>,
}

/// What a failed `new` / `from_wire` has created so far, undone in reverse.
pub(crate) struct Partial {
    pub(crate) id: String,
    pub(crate) store: Store,
    /// The storage directory while it is being created (hidden, not yet locked).
    pub(crate) staged: Option<StagedVmDir>,
    /// The storage directory, if this call created it.
    pub(crate) created_dir: bool,
    pub(crate) lock: Option<VmLock>,
    pub(crate) hypervisor: Option<Arc<dyn Hypervisor>>,
    pub(crate) proxy: Option<Arc<dyn Proxy>>,
    pub(crate) agent: Option<Arc<dyn Agent>>,
    /// The VM's network, once made (or, re-attaching, as saved).
    pub(crate) network: Option<VmNetwork>,
    /// Re-attaching: release the VM (detach) instead of stopping it.
    pub(crate) attached: bool,
    /// The hypervisor's start was tried: a failure from here on is a VM that failed to come
    /// up, whose console tail and logs are kept.
    pub(crate) booted: bool,
}

impl Partial {
    pub(crate) fn new(id: &str, store: Store, attached: bool) -> Self {
        Self {
            id: id.to_owned(),
            store,
            staged: None,
            created_dir: false,
            lock: None,
            hypervisor: None,
            proxy: None,
            agent: None,
            network: None,
            attached,
            booted: false,
        }
    }

    /// Undoes every step taken: stop the proxy, disconnect the agent, stop (or, re-attaching,
    /// release) the hypervisor, destroy the directory if created here, release the lock.
    /// Returns `result`'s VM, logging `done`; on an error logs `failed`, undoes every step
    /// this partial recorded and returns the error.
    pub(crate) async fn finish(
        self,
        result: Result<Vm>,
        done: &'static str,
        failed: &'static str,
    ) -> Result<Vm> {
        match result {
            Ok(vm) => {
                info!(pid = ?vm.hypervisor.pid(), "{done}");
                Ok(vm)
            }
            Err(e) => {
                warn!(error = %e, "{failed}");
                let e = self.keep_postmortem(e).await;
                self.undo().await;
                Err(e)
            }
        }
    }

    /// For a VM that failed to come up: stops the proxy (so every line read is in its tail
    /// and log), moves the logs out of the run directory the undo removes, and attaches the
    /// post-mortem to `error`. A re-attach keeps the VM and its directory: nothing to do.
    async fn keep_postmortem(&self, error: Error) -> Error {
        if !self.booted || self.attached {
            return error;
        }
        let console_tail = match &self.proxy {
            Some(proxy) => {
                proxy.stop().await;
                proxy.console_tail()
            }
            None => Vec::new(),
        };
        let (console_log, kept_in) = postmortem::keep_logs(&self.store, &self.id).await;
        if let Some(dir) = &kept_in {
            warn!(dir = %dir.display(), "logs of the failed VM kept");
        }
        postmortem::attach(
            &self.id,
            error,
            Postmortem {
                console_tail,
                console_log,
                kept_in,
            },
        )
    }

    pub(crate) async fn undo(self) {
        if let Some(proxy) = self.proxy {
            proxy.stop().await;
        }
        if let Some(agent) = self.agent {
            if let Err(e) = agent.disconnect().await {
                debug!(error = %e, "agent disconnect during undo");
            }
        }
        if let Some(hv) = self.hypervisor {
            let res = if self.attached {
                hv.detach().await.map(drop)
            } else {
                hv.stop().await
            };
            if let Err(e) = res {
                warn!(error = %e, "hypervisor cleanup during undo failed");
            }
        }
        // After the hypervisor: its QEMU holds the tap. A re-attach leaves the VM's running.
        if let Some(net) = &self.network {
            if !self.attached {
                network::remove(&self.id, net).await;
            }
        }
        if let Some(staged) = self.staged {
            let parent = staged.path().parent().map(Path::to_owned);
            if let Err(e) = staged.discard().await {
                warn!(error = %e, "removing staged VM storage during undo failed");
            }
            if let Some(parent) = parent {
                // As in `destroy_dir`: fails harmlessly while other VMs live there.
                let _ = tokio::fs::remove_dir(parent).await;
            }
        }
        if self.created_dir {
            if let Err(e) = destroy_dir(&self.store, &self.id).await {
                warn!(error = %e, "destroying VM storage during undo failed");
            }
        }
        drop(self.lock);
    }
}

impl Vm {
    /// Creates and boots a VM with QEMU, the Kata agent and the configured proxy; see
    /// [`Vm::new_with`].
    pub async fn new(config: VmConfig) -> Result<Self> {
        Self::new_with(config, &QemuBackends).await
    }

    /// Creates and boots a VM with parts from `backends` (the seed's `NewVM`), in the order of
    /// [`NewStep`]: validate the config; create `<run_root>/vm/<id>/` under a new UUID (hidden
    /// until locked, so no one ever sees it unowned) and lock it; create the hypervisor with
    /// that directory as its run directory and start it (each process it spawns records its
    /// pid and start time there before it execs, so if this process dies at any moment what
    /// it started is known: [`Vm::reap_orphans`]); a template clone starts paused; start the
    /// proxy on the console; create the agent client for the hypervisor's agent endpoint; wait
    /// for the agent's `Check` (skipped for a paused clone, whose guest cannot answer until
    /// resumed); save the state.
    ///
    /// A failing step undoes all earlier ones: the proxy is stopped, the agent disconnected,
    /// the hypervisor stopped (QEMU killed, sockets removed), the directory destroyed.
    pub async fn new_with(config: VmConfig, backends: &dyn Backends) -> Result<Self> {
        let id = uuid::Uuid::new_v4().to_string();
        let span = info_span!("vm", vm = %id);
        async move {
            info!("creating VM");
            let mut partial = Partial::new(&id, Store::new(&config.run_root), false);
            let created = Self::create(&mut partial, config, backends).await;
            partial
                .finish(created, "VM created", "creating VM failed, undoing")
                .await
        }
        .instrument(span)
        .await
    }

    async fn create(p: &mut Partial, config: VmConfig, backends: &dyn Backends) -> Result<Self> {
        let (dir, hv) = Self::prepare_parts(p, &config, backends, false).await?;
        Self::start_parts(p, config, dir, hv, backends).await
    }

    /// The steps up to the hypervisor's handle (`prestart`: and its pre-start): the storage
    /// directory, locked, and the hypervisor.
    pub(crate) async fn prepare_parts(
        p: &mut Partial,
        config: &VmConfig,
        backends: &dyn Backends,
        prestart: bool,
    ) -> Result<(PathBuf, Arc<dyn Hypervisor>)> {
        let id = p.id.clone();
        let step = |s| backends.before(&id, s);
        step(NewStep::Validate).await?;
        config.validate_async().await?;

        step(NewStep::CreateDir).await?;
        p.staged = Some(stage_dir(&p.store, &id).await?);

        // Published only once locked: a VM directory is never seen without its owner.
        step(NewStep::Lock).await?;
        let Some(staged) = p.staged.take() else {
            // Unreachable: `CreateDir` staged it.
            return Err(Error::Aborted {
                id,
                step: NewStep::Lock,
            });
        };
        let (dir, lock) = staged
            .publish()
            .await
            .map_err(|e| Error::storage(&id, "lock", e))?;
        p.created_dir = true;
        p.lock = Some(lock);

        step(NewStep::CreateNetwork).await?;
        p.network = network::create(&id, config, &dir).await?;

        step(NewStep::CreateHypervisor).await?;
        let hv = backends.hypervisor(&id, &config.hypervisor, &dir)?;
        p.hypervisor = Some(hv.clone());

        if prestart {
            step(NewStep::PrestartHypervisor).await?;
            hv.prestart()
                .await
                .map_err(|e| Error::hv(&id, "pre-start", e))?;
        }
        Ok((dir, hv))
    }

    /// The steps from the hypervisor's start (which finishes a pre-start) to the saved state.
    pub(crate) async fn start_parts(
        p: &mut Partial,
        config: VmConfig,
        dir: PathBuf,
        hv: Arc<dyn Hypervisor>,
        backends: &dyn Backends,
    ) -> Result<Self> {
        let id = p.id.clone();
        let step = |s| backends.before(&id, s);
        p.booted = true;
        step(NewStep::StartHypervisor).await?;
        hv.start().await.map_err(|e| Error::hv(&id, "start", e))?;

        step(NewStep::StartProxy).await?;
        let proxy = backends.proxy(config.proxy);
        p.proxy = Some(proxy.clone());
        start_proxy(&id, hv.as_ref(), proxy.as_ref()).await?;

        step(NewStep::CreateAgent).await?;
        let url = running_agent_url(&id, hv.as_ref())?;
        let agent = backends.agent(&id, &url, &config.agent)?;
        p.agent = Some(agent.clone());

        step(NewStep::CheckAgent).await?;
        if config.hypervisor.clones_template() {
            debug!("paused clone: agent check skipped");
        } else {
            wait_ready(&id, agent.as_ref(), hv.as_ref(), config.agent.ready_timeout).await?;
        }

        step(NewStep::ConfigureNetwork).await?;
        if config.network.is_some() && !config.hypervisor.clones_template() {
            unless_exited(
                &id,
                hv.as_ref(),
                "network setup",
                network::configure_guest(&id, agent.as_ref()),
            )
            .await??;
        }

        step(NewStep::SaveState).await?;
        let inner = Inner {
            ownership: Ownership::Stopped,
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            cpu_delta: 0,
            mounts: BTreeMap::new(),
            links: Vec::new(),
            containers: BTreeMap::new(),
        };
        let vm = Self::assemble(p, config, dir, url, inner)?;
        vm.save_state(&*vm.inner.lock().await).await?;
        Ok(vm)
    }

    /// Moves the parts out of `p` into a `Vm` that owns the VM, whose agent dials `agent_url`.
    pub(crate) fn assemble(
        p: &mut Partial,
        config: VmConfig,
        dir: PathBuf,
        agent_url: AgentUrl,
        mut inner: Inner,
    ) -> Result<Self> {
        let (Some(hypervisor), Some(agent), Some(proxy), Some(lock)) = (
            p.hypervisor.clone(),
            p.agent.clone(),
            p.proxy.clone(),
            p.lock.take(),
        ) else {
            // Unreachable: every step above filled its part.
            return Err(Error::Aborted {
                id: p.id.clone(),
                step: NewStep::SaveState,
            });
        };
        inner.ownership = Ownership::Owned { _lock: lock };
        Ok(Self {
            agent_url,
            id: p.id.clone(),
            store: p.store.clone(),
            config,
            dir,
            hypervisor,
            agent,
            proxy,
            network: p.network.take(),
            inner: Mutex::new(inner),
        })
    }

    /// The VM id (a UUID).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The config the VM was created with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM's storage directory `<run_root>/vm/<id>/` (also its sockets and logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hypervisor.
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hypervisor
    }

    /// The VM's network: its namespace and the address the host reaches it at. `None` for a
    /// VM without one.
    pub fn network(&self) -> Option<&VmNetwork> {
        self.network.as_ref()
    }

    /// The agent client.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    /// The console proxy (subscribe to it for the guest's console lines).
    pub fn proxy(&self) -> &Arc<dyn Proxy> {
        &self.proxy
    }

    /// The URL the agent client dials: the hypervisor's agent endpoint when the VM was
    /// created or taken over.
    pub fn agent_url(&self) -> AgentUrl {
        self.agent_url.clone()
    }

    /// Locks the bookkeeping and checks that this handle owns the VM.
    pub(crate) async fn owned(&self) -> Result<MutexGuard<'_, Inner>> {
        let inner = self.inner.lock().await;
        let state = match inner.ownership {
            Ownership::Owned { .. } => return Ok(inner),
            Ownership::Stopped => "stopped",
            Ownership::Detached => "detached",
        };
        Err(Error::NotOwned {
            id: self.id.clone(),
            state,
        })
    }

    /// The wire form of the VM's current state.
    pub(crate) async fn state(&self, inner: &Inner) -> VmState {
        VmState {
            id: self.id.clone(),
            config: self.config.clone(),
            hypervisor: self.hypervisor.state().await,
            vcpus: inner.vcpus,
            memory_mib: inner.memory_mib,
            cpu_delta: inner.cpu_delta,
            mounts: inner.mounts.clone(),
            network: self.network.clone(),
        }
    }

    /// Saves the VM's state in its storage directory.
    pub(crate) async fn save_state(&self, inner: &Inner) -> Result<()> {
        let state = self.state(inner).await;
        self.store
            .save_state(&self.id, &state)
            .await
            .map_err(|e| Error::storage(&self.id, "save", e))
    }

    /// Stops the VM and destroys its storage (the seed's `Stop`, plus the storage): stops the
    /// proxy, unmounts hot-plugged disks in the guest (so their data reach the images),
    /// disconnects the agent, stops the hypervisor (QEMU gets `quit`, then SIGKILL),
    /// removes sandbox links, destroys `<run_root>/vm/<id>/` and releases the lock.
    ///
    /// Idempotent. If the hypervisor cannot be stopped, the error is returned and the storage
    /// kept, so `stop` can be retried. Fails with [`Error::NotOwned`] after [`Vm::detach`].
    pub async fn stop(&self) -> Result<()> {
        let mut inner = self.inner.lock().await;
        match inner.ownership {
            Ownership::Owned { .. } => {}
            Ownership::Stopped => return Ok(()),
            Ownership::Detached => {
                return Err(Error::NotOwned {
                    id: self.id.clone(),
                    state: "detached",
                })
            }
        }
        let span = info_span!("vm", vm = %self.id);
        async {
            // With disks to flush, containers first: a container's mount namespace would keep
            // a disk mounted past its unmount below. Without, there is nothing to save (images
            // are read-only, writable layers are guest memory) and QEMU's exit takes them all.
            // Best effort, bounded like the unmounts below.
            let containers = std::mem::take(&mut inner.containers);
            let flush = !inner.mounts.is_empty();
            for id in containers.into_keys().filter(|_| flush) {
                let remove = self
                    .agent
                    .remove_container(&id, crate::containers::REMOVE_TIMEOUT);
                let bound = crate::containers::REMOVE_TIMEOUT + self.config.agent.call_timeout;
                match tokio::time::timeout(bound, remove).await {
                    Ok(Ok(())) => debug!(container = %id, "container removed before stop"),
                    Ok(Err(e)) => {
                        warn!(container = %id, error = %e, "cannot remove a container before stop")
                    }
                    Err(_) => warn!(container = %id, "removing a container before stop timed out"),
                }
            }
            // Unmounting flushes what the guest wrote to its disks; QEMU's quit would not.
            // Best effort, bounded by the call timeout: a dead guest loses only its cache.
            for mount_point in inner.mounts.values() {
                let unmount = self.agent.remove_storage(mount_point);
                let bound = self.config.agent.call_timeout;
                match tokio::time::timeout(bound, unmount).await {
                    Ok(Ok(())) => debug!(mount_point, "disk unmounted before stop"),
                    Ok(Err(e)) => {
                        warn!(mount_point, error = %e, "cannot unmount a disk before stop")
                    }
                    Err(_) => warn!(mount_point, "unmounting a disk before stop timed out"),
                }
            }
            inner.mounts.clear();
            self.proxy.stop().await;
            if let Err(e) = self.agent.disconnect().await {
                debug!(error = %e, "agent disconnect during stop");
            }
            self.hypervisor
                .stop()
                .await
                .map_err(|e| Error::hv(&self.id, "stop", e))?;
            if let Some(net) = &self.network {
                network::remove(&self.id, net).await;
            }
            let links = std::mem::take(&mut inner.links);
            remove_links(&links, &self.dir).await;
            let destroyed = destroy_dir(&self.store, &self.id).await;
            inner.ownership = Ownership::Stopped;
            info!(ok = destroyed.is_ok(), "VM stopped");
            destroyed
        }
        .instrument(span)
        .await
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ownership::Owned { .. } = self.inner.get_mut().ownership {
            warn!(vm = %self.id, "VM handle dropped while owning the VM; the VM keeps running");
        }
    }
}

/// How often [`stage_dir`] retries when another VM's [`destroy_dir`] removed `<root>/vm`
/// between the store creating it and creating the VM's directory in it.
const CREATE_DIR_ATTEMPTS: usize = 3;

/// Starts creating the VM's storage directory (`<root>/vm/<id>/`, hidden until published).
async fn stage_dir(store: &Store, id: &str) -> Result<StagedVmDir> {
    let mut attempt = 1;
    loop {
        match store.stage_vm_dir(id).await {
            Ok(staged) => return Ok(staged),
            Err(vmfactory_persist::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound
                    && attempt < CREATE_DIR_ATTEMPTS =>
            {
                debug!(attempt, "VM parent directory vanished, retrying");
                attempt += 1;
            }
            Err(e) => return Err(Error::storage(id, "create", e)),
        }
    }
}

/// Destroys the VM's storage directory, then `<root>/vm` if that is now empty (so a run root
/// holds nothing once its VMs are gone; the store recreates it on demand).
async fn destroy_dir(store: &Store, id: &str) -> Result<()> {
    if let Ok(dir) = store.vm_dir(id) {
        network::unpin(&dir).await;
    }
    store
        .destroy_vm_dir(id)
        .await
        .map_err(|e| Error::storage(id, "destroy", e))?;
    if let Some(parent) = store.vm_dir(id).ok().as_deref().and_then(Path::parent) {
        // Fails harmlessly while other VMs live there.
        let _ = tokio::fs::remove_dir(parent).await;
    }
    Ok(())
}

/// Starts `proxy` on the hypervisor's console (ended at once if the hypervisor exits).
pub(crate) async fn start_proxy(id: &str, hv: &dyn Hypervisor, proxy: &dyn Proxy) -> Result<()> {
    unless_exited(
        id,
        hv,
        "proxy start",
        proxy.start(id, &hv.console_address(), Some(&hv.console_log_path())),
    )
    .await?
    .map_err(|source| Error::Proxy {
        id: id.to_owned(),
        source,
    })
}

/// Calls `Check` until the agent answers `SERVING`, for at most `timeout`; a VM whose
/// hypervisor exits fails at once with [`Error::HypervisorExited`] instead of after the whole
/// timeout.
pub(crate) async fn wait_ready(
    id: &str,
    agent: &dyn Agent,
    hv: &dyn Hypervisor,
    timeout: Duration,
) -> Result<()> {
    watched(
        id,
        hv,
        "wait for the agent",
        check_until(id, agent, timeout),
    )
    .await
}

/// Calls `Check` until the agent answers `SERVING`, for at most `timeout`.
async fn check_until(id: &str, agent: &dyn Agent, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let started = Instant::now();
        match tokio::time::timeout(left, agent.check()).await {
            Ok(Ok(HealthStatus::Serving)) => return Ok(()),
            Ok(Ok(status)) => {
                debug!(?status, "agent not serving yet");
                last = None;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "agent check failed");
                last = Some(Box::new(e));
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::AgentNotReady {
                id: id.to_owned(),
                timeout,
                last,
            });
        }
        if started.elapsed() < CHECK_RETRY {
            tokio::time::sleep(CHECK_RETRY).await;
        }
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
