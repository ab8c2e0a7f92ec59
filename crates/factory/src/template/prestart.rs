//! Pre-started clones: a template factory keeps up to K QEMU processes waiting at `-incoming
//! defer` (QMP negotiated, migration capabilities set, the template memory mapped but
//! untouched), so a clone is the state load, `cont`, reseed and clock.
//!
//! One task refills the pool in the background, one VM at a time (each start is CPU-bound on
//! QEMU's side). A VM leaves the pool by a pop under a lock, so it is handed out once. A QEMU
//! that exits while it waits is noticed by its watcher, discarded and replaced; one found dead
//! when taken is discarded too. The pool is emptied when the template's files change and
//! stopped by the factory's `close`, before the template is removed (its QEMUs map it).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};
use vmfactory_vm::{Backends, PreparedVm, Vm, VmConfig};

use super::files::check_saved_files;
use super::metadata::SavedFiles;

/// First pause after a failed pre-start; doubled up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(500);
/// Longest pause between pre-start attempts that keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A waiting VM and the watcher that reports its exit.
struct Waiting {
    vm: PreparedVm,
    watcher: AbortHandle,
}

/// What the refill task and the factory share.
struct Shared {
    want: usize,
    /// The clone config (the factory's proxy kind; `start` sets the caller's).
    config: VmConfig,
    backends: Arc<dyn Backends>,
    template: PathBuf,
    saved: Option<SavedFiles>,
    ready: StdMutex<VecDeque<Waiting>>,
    /// Wakes the refill: a VM taken or exited, or closing.
    wake: Notify,
    closed: AtomicBool,
}

impl Shared {
    fn ready(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The template's files as saved (pre-starting from rewritten ones would only fail later).
    async fn template_intact(&self) -> bool {
        let Some(saved) = &self.saved else {
            return true;
        };
        match check_saved_files(&self.template, saved).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "not pre-starting clones of a changed template");
                false
            }
        }
    }
}

/// The pool of pre-started clones of one template factory (empty and idle when K is 0).
#[derive(Default)]
pub(super) struct Prestarter {
    shared: StdMutex<Option<Arc<Shared>>>,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Prestarter {
    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts keeping `want` clones of `config` pre-started (once; 0 does nothing).
    pub(super) async fn start(
        &self,
        want: usize,
        config: VmConfig,
        backends: Arc<dyn Backends>,
        template: PathBuf,
        saved: Option<SavedFiles>,
    ) {
        let mut task = self.task.lock().await;
        if want == 0 || task.is_some() {
            return;
        }
        let shared = Arc::new(Shared {
            want,
            config,
            backends,
            template,
            saved,
            ready: StdMutex::new(VecDeque::with_capacity(want)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone());
        *task = Some(tokio::spawn(refill(shared)));
        info!(want, "pre-starting clones");
    }

    /// A pre-started VM whose QEMU still runs, if one is waiting (dead ones met are discarded).
    pub(super) async fn take(&self) -> Option<PreparedVm> {
        let shared = self.shared()?;
        loop {
            let waiting = shared.ready().pop_front();
            shared.wake.notify_one();
            let Waiting { vm, watcher } = waiting?;
            watcher.abort();
            if !vm.has_exited() {
                return Some(vm);
            }
            warn!(vm = vm.id(), "a pre-started QEMU had exited; discarded");
            vm.discard().await;
        }
    }

    /// How many pre-started VMs wait.
    pub(super) fn waiting(&self) -> usize {
        self.shared().map_or(0, |s| s.ready().len())
    }

    /// The pids of the waiting VMs' QEMUs.
    pub(super) fn pids(&self) -> Vec<u32> {
        self.shared().map_or_else(Vec::new, |s| {
            s.ready()
                .iter()
                .filter_map(|w| w.vm.hypervisor().pid())
                .collect()
        })
    }

    /// Discards every waiting VM (the template changed); the refill goes on.
    pub(super) async fn flush(&self) {
        if let Some(shared) = self.shared() {
            discard_all(&shared).await;
            shared.wake.notify_one();
        }
    }

    /// Stops the refill and discards every waiting VM. Idempotent.
    pub(super) async fn close(&self) {
        let Some(shared) = self.shared() else {
            return;
        };
        shared.closed.store(true, Ordering::SeqCst);
        shared.wake.notify_one();
        if let Some(task) = self.task.lock().await.take() {
            // The task ends after the pre-start in flight, which it discards.
            if let Err(e) = task.await {
                warn!(error = %e, "the pre-start task failed");
            }
        }
        discard_all(&shared).await;
    }
}

async fn discard_all(shared: &Shared) {
    let all: Vec<Waiting> = shared.ready().drain(..).collect();
    for Waiting { vm, watcher } in all {
        watcher.abort();
        debug!(vm = vm.id(), "discarding a pre-started VM");
        vm.discard().await;
    }
}

/// Keeps `want` VMs waiting until closed.
async fn refill(shared: Arc<Shared>) {
    let mut backoff = INITIAL_BACKOFF;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let exited: VecDeque<Waiting> = {
            let mut ready = shared.ready();
            let (dead, live) = ready.drain(..).partition(|w| w.vm.has_exited());
            *ready = live;
            dead
        };
        for Waiting { vm, .. } in exited {
            warn!(
                vm = vm.id(),
                "a pre-started QEMU exited while waiting; replacing it"
            );
            vm.discard().await;
        }
        if shared.ready().len() >= shared.want {
            shared.wake.notified().await;
            continue;
        }
        let prepared = if shared.template_intact().await {
            Vm::prepare_with(shared.config.clone(), shared.backends.as_ref())
                .await
                .map_err(|e| warn!(error = %e, ?backoff, "pre-starting a clone failed"))
        } else {
            Err(())
        };
        match prepared {
            Ok(vm) if shared.closed.load(Ordering::SeqCst) => {
                vm.discard().await;
                return;
            }
            Ok(vm) => {
                backoff = INITIAL_BACKOFF;
                let hv = vm.hypervisor().clone();
                let wake = shared.clone();
                let watcher = tokio::spawn(async move {
                    hv.exited().await;
                    wake.wake.notify_one();
                })
                .abort_handle();
                shared.ready().push_back(Waiting { vm, watcher });
            }
            Err(()) => {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.wake.notified() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
