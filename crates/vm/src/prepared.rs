//! [`PreparedVm`]: a VM made ahead of need, up to its hypervisor's pre-start (for a template
//! clone: QEMU spawned, QMP negotiated, waiting for the state load), then started when wanted
//! ([`PreparedVm::start`]) or discarded. [`Vm::new_with`] is the same two halves run at once.

use std::path::PathBuf;
use std::sync::Arc;

use futures::FutureExt;
use tracing::{info, info_span, warn, Instrument};
use vmfactory_hypervisor::Hypervisor;
use vmfactory_persist::Store;
use vmfactory_proxy::ProxyKind;

use crate::backends::Backends;
use crate::config::VmConfig;
use crate::error::Result;
use crate::vm::{Partial, Vm};

/// A VM whose storage directory exists and is locked, and whose hypervisor is pre-started.
/// End it with [`PreparedVm::start`] or [`PreparedVm::discard`]; dropping it otherwise leaves
/// its QEMU running (logged), as dropping an owned [`Vm`] does.
pub struct PreparedVm {
    /// `None` once started or discarded.
    partial: Option<Partial>,
    config: VmConfig,
    dir: PathBuf,
    hypervisor: Arc<dyn Hypervisor>,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedVm")
            .field("id", &self.hypervisor.id())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Makes a VM of `config` up to its hypervisor's pre-start ([`Hypervisor::prestart`]):
    /// the steps of [`Vm::new_with`] to the hypervisor's start, with the same undo on failure.
    /// Its processes record themselves in its locked directory, so if this process dies they
    /// are reaped as orphans ([`Vm::reap_orphans`]).
    pub async fn prepare_with(config: VmConfig, backends: &dyn Backends) -> Result<PreparedVm> {
        let id = uuid::Uuid::new_v4().to_string();
        let span = info_span!("vm", vm = %id);
        async move {
            let mut partial = Partial::new(&id, Store::new(&config.run_root), false);
            match Vm::prepare_parts(&mut partial, &config, backends, true).await {
                Ok((dir, hypervisor)) => {
                    info!(pid = ?hypervisor.pid(), "VM pre-started");
                    Ok(PreparedVm {
                        partial: Some(partial),
                        config,
                        dir,
                        hypervisor,
                    })
                }
                Err(e) => {
                    warn!(error = %e, "pre-starting VM failed, undoing");
                    partial.undo().await;
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }
}

impl PreparedVm {
    /// The VM id it will have.
    pub fn id(&self) -> &str {
        self.hypervisor.id()
    }

    /// Its hypervisor (for its pid, say).
    pub fn hypervisor(&self) -> &Arc<dyn Hypervisor> {
        &self.hypervisor
    }

    /// Whether its hypervisor process has exited while it waited (killed, say): such a VM is
    /// only good for [`PreparedVm::discard`].
    pub fn has_exited(&self) -> bool {
        // One poll: an exit already seen resolves at once, a live process stays pending.
        self.hypervisor.exited().now_or_never().is_some()
    }

    /// Resolves when its hypervisor process exits while it waits.
    pub async fn exited(&self) {
        self.hypervisor.exited().await;
    }

    /// Finishes the VM as [`Vm::new_with`] would have, with `proxy` as its console proxy:
    /// starts the hypervisor (for a clone, loads the template state; it stays paused), the
    /// proxy and the agent client, and saves its state. A failure undoes everything, the
    /// pre-started part included.
    pub async fn start(mut self, backends: &dyn Backends, proxy: ProxyKind) -> Result<Vm> {
        let Some(mut partial) = self.partial.take() else {
            // Unreachable: `start` and `discard` consume the value.
            return Err(crate::error::Error::NotOwned {
                id: self.id().to_owned(),
                state: "stopped",
            });
        };
        let mut config = self.config.clone();
        config.proxy = proxy;
        let span = info_span!("vm", vm = %partial.id);
        let dir = self.dir.clone();
        let hv = self.hypervisor.clone();
        async move {
            let started = Vm::start_parts(&mut partial, config, dir, hv, backends).await;
            partial
                .finish(started, "VM created", "creating VM failed, undoing")
                .await
        }
        .instrument(span)
        .await
    }

    /// Stops its hypervisor and removes its directory.
    pub async fn discard(mut self) {
        if let Some(partial) = self.partial.take() {
            partial
                .undo()
                .instrument(info_span!("vm", vm = %self.hypervisor.id()))
                .await;
        }
    }
}

impl Drop for PreparedVm {
    fn drop(&mut self) {
        if self.partial.is_some() {
            warn!(vm = %self.hypervisor.id(), "pre-started VM dropped; its QEMU keeps running");
        }
    }
}
