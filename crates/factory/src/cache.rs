//! [`CacheFactory`]: a pool of ready VMs from another base (Kata's `factory/cache`).
//!
//! `n` worker tasks each hold one of `n` slots: a worker waits for a free slot, gets a VM from
//! the base, and puts it in the pool. [`FactoryBase::get_base_vm`] takes a VM from the pool
//! (a pop under a short lock: the fast path) and frees its slot, so a worker refills it. When
//! the pool is empty (a burst, or a base that keeps failing) the caller gets a VM straight from
//! the base rather than waiting for a worker: a miss costs one base VM, never a hang.
//!
//! Cached VMs are kept fresh (Kata cached paused clones): a clone, which its template base
//! hands out paused, is resumed and its agent checked, and every VM's RNG is reseeded from host
//! entropy and its clock set, before it enters the pool. A VM's RNG state is then its own, and
//! its clock runs with the guest; so a hit costs `get_vm` only a pop and a size check, instead
//! of a resume, an agent reconnect, a reseed and a clock set. An idle guest costs little CPU
//! while it waits.
//!
//! [`FactoryBase::close`] is cancellation-safe with respect to VMs: a worker is never
//! interrupted inside the base's `get_base_vm` (dropping `Vm::new` halfway would leak the
//! QEMU it started); it finishes, sees the factory closed and stops the VM. `close` waits for
//! the workers, stops every pooled VM, then closes the base.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};
use vmfactory_hypervisor::VmStatus;
use vmfactory_vm::{Vm, VmConfig, VmInfo};

use crate::base::{BaseError, FactoryBase};
use crate::metrics::{GetVmSource, Metrics};

type Result<T> = std::result::Result<T, BaseError>;

/// First pause of a worker after the base failed; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause of a worker after repeated base failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the workers and the factory share.
struct Shared {
    base: Arc<dyn FactoryBase>,
    pool: Mutex<VecDeque<Vm>>,
    /// Free slots: a worker takes one before it makes a VM; taking a VM frees one.
    slots: Semaphore,
    closed: watch::Sender<bool>,
    /// Where hand-outs, the pool size and refill failures are recorded, if anywhere.
    metrics: Option<Arc<Metrics>>,
    /// The `source` of a VM handed out on a miss: the base's kind.
    miss_source: GetVmSource,
}

impl Shared {
    /// Runs `f` on the metrics, if recorded.
    fn record(&self, f: impl FnOnce(&Metrics)) {
        if let Some(m) = &self.metrics {
            f(m);
        }
    }

    /// [`make_ready`], counted as a VM being made while it runs.
    async fn make_counted(&self, config: &VmConfig) -> Result<Vm> {
        self.record(|m| m.making(1));
        let res = make_ready(self.base.as_ref(), config).await;
        self.record(|m| m.making(-1));
        res
    }
}

/// A pool of `n` ready VMs kept full by `n` workers.
pub struct CacheFactory {
    shared: Arc<Shared>,
    size: usize,
    workers: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for CacheFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheFactory")
            .field("size", &self.size)
            .field("base", &self.shared.base)
            .finish_non_exhaustive()
    }
}

impl CacheFactory {
    /// Starts `n` workers filling a pool of `n` VMs from `base`. Must be called within a tokio
    /// runtime. `n` = 0 gives a pool that is always empty (every call goes to the base).
    pub fn new(n: u32, base: Arc<dyn FactoryBase>) -> Self {
        Self::start(n, base, None, GetVmSource::Direct)
    }

    /// Like [`CacheFactory::new`], recording in `metrics`: each VM handed out (`cache` from
    /// the pool, `miss` on a miss: the base's kind, `template` or `direct`), the pool's size
    /// and target, and the workers' failures.
    pub fn with_metrics(
        n: u32,
        base: Arc<dyn FactoryBase>,
        miss: GetVmSource,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::start(n, base, Some(metrics), miss)
    }

    fn start(
        n: u32,
        base: Arc<dyn FactoryBase>,
        metrics: Option<Arc<Metrics>>,
        miss_source: GetVmSource,
    ) -> Self {
        let size = usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            base,
            pool: Mutex::new(VecDeque::with_capacity(size)),
            slots: Semaphore::new(size),
            closed: watch::channel(false).0,
            metrics,
            miss_source,
        });
        shared.record(|m| {
            m.set_pool_target(size);
            m.set_pool_size(0);
        });
        let workers = (0..size)
            .map(|i| {
                let span = tracing::info_span!("cache_worker", worker = i);
                tokio::spawn(worker(shared.clone()).instrument(span))
            })
            .collect();
        info!(size, "VM cache started");
        Self {
            shared,
            size,
            workers: std::sync::Mutex::new(workers),
        }
    }

    /// The base the pool is filled from.
    pub fn base(&self) -> &Arc<dyn FactoryBase> {
        &self.shared.base
    }

    /// How many VMs the pool keeps.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How many VMs are in the pool now.
    pub async fn ready(&self) -> usize {
        self.shared.pool.lock().await.len()
    }

    fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }
}

/// A fresh VM from `base` (see [`FactoryBase::hands_out_fresh`]): resumed if it came paused,
/// its agent answering, its RNG reseeded, its clock set and its recorded size checked against
/// the hypervisor's (so that a hit needs none of this). A VM that fails to get there is
/// stopped.
async fn make_ready(base: &dyn FactoryBase, config: &VmConfig) -> Result<Vm> {
    let vm = base.get_base_vm(config).await?;
    let ready = async {
        if matches!(
            vm.status().await?.state,
            VmStatus::Paused | VmStatus::Prelaunch
        ) {
            vm.resume().await?;
            vm.wait_ready().await?;
        }
        if base.clones_reseed_themselves() {
            // The clock call returns once the guest has reseeded itself.
            vm.sync_time().await?;
        } else if !base.hands_out_fresh() {
            tokio::try_join!(vm.reseed_rng(), vm.sync_time())?;
        }
        vm.verify_size().await?;
        Result::<()>::Ok(())
    }
    .await;
    if let Err(e) = ready {
        if let Err(stop) = vm.stop().await {
            warn!(vm = %vm.id(), error = %stop, "stopping a VM that did not get ready failed");
        }
        return Err(e);
    }
    Ok(vm)
}

/// Fills one slot after another until the factory closes.
async fn worker(shared: Arc<Shared>) {
    let mut closed = shared.closed.subscribe();
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Waiting for a slot is cancellation-safe; making a VM is not, and is never cancelled.
        let permit = tokio::select! {
            _ = closed.wait_for(|c| *c) => return,
            p = shared.slots.acquire() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let config = shared.base.config().clone();
        match shared.make_counted(&config).await {
            Ok(vm) => {
                backoff = FIRST_BACKOFF;
                let mut pool = shared.pool.lock().await;
                if *shared.closed.borrow() {
                    drop(pool);
                    debug!(vm = %vm.id(), "cache closed while the VM was made, stopping it");
                    if let Err(e) = vm.stop().await {
                        warn!(error = %e, "stopping a VM made after close failed");
                    }
                    return;
                }
                debug!(vm = %vm.id(), "VM cached");
                pool.push_back(vm);
                shared.record(|m| m.set_pool_size(pool.len()));
                // The slot stays taken until the VM is taken.
                permit.forget();
            }
            Err(e) => {
                drop(permit);
                shared.record(Metrics::refill_failed);
                warn!(error = %e, ?backoff, "the cache's base failed to make a VM");
                tokio::select! {
                    _ = closed.wait_for(|c| *c) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[async_trait]
impl FactoryBase for CacheFactory {
    fn config(&self) -> &VmConfig {
        self.shared.base.config()
    }

    /// A pooled VM (freeing its slot for a worker), or on a miss one straight from the base.
    async fn get_base_vm(&self, config: &VmConfig) -> Result<Vm> {
        if self.is_closed() {
            return Err(BaseError::Closed { what: "cache" });
        }
        let started = Instant::now();
        let taken = {
            let mut pool = self.shared.pool.lock().await;
            let vm = pool.pop_front();
            self.shared.record(|m| m.set_pool_size(pool.len()));
            vm
        };
        if let Some(vm) = taken {
            self.shared.slots.add_permits(1);
            debug!(vm = %vm.id(), "cache hit");
            self.shared
                .record(|m| m.record_get_vm(GetVmSource::Cache, started.elapsed()));
            return Ok(vm);
        }
        debug!("cache miss, asking the base");
        let vm = self.shared.make_counted(config).await?;
        let source = self.shared.miss_source;
        self.shared
            .record(|m| m.record_get_vm(source, started.elapsed()));
        Ok(vm)
    }

    /// Pooled VMs were reseeded and had their clock set when they entered the pool, and have
    /// been running since; a miss is prepared the same way.
    fn hands_out_fresh(&self) -> bool {
        true
    }

    fn prestarted(&self) -> crate::base::Prestarted {
        self.shared.base.prestarted()
    }

    /// The pooled VMs' status.
    async fn status(&self) -> Vec<VmInfo> {
        let pool = self.shared.pool.lock().await;
        let mut out = Vec::with_capacity(pool.len());
        for vm in pool.iter() {
            match vm.status().await {
                Ok(info) => out.push(info),
                Err(e) => warn!(vm = %vm.id(), error = %e, "status of a cached VM failed"),
            }
        }
        out
    }

    /// Stops the workers (each finishes the VM it is making and stops it), stops every pooled
    /// VM, and closes the base. Idempotent; the first error is returned after everything was
    /// attempted.
    async fn close(&self) -> Result<()> {
        self.shared.closed.send_replace(true);
        self.shared.slots.close();
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in workers {
            if let Err(e) = w.await {
                warn!(error = %e, "a cache worker panicked");
            }
        }
        let vms: Vec<Vm> = {
            let mut pool = self.shared.pool.lock().await;
            self.shared.record(|m| m.set_pool_size(0));
            pool.drain(..).collect()
        };
        let mut first_err = None;
        for vm in vms {
            if let Err(e) = vm.stop().await {
                warn!(vm = %vm.id(), error = %e, "stopping a cached VM failed");
                first_err.get_or_insert(BaseError::from(e));
            }
        }
        if let Err(e) = self.shared.base.close().await {
            first_err.get_or_insert(e);
        }
        info!("VM cache closed");
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for CacheFactory {
    /// Without `close`, the workers are told to stop (they stop the VM they are making);
    /// pooled VMs keep running and their handles warn when dropped.
    fn drop(&mut self) {
        self.shared.closed.send_replace(true);
        self.shared.slots.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::direct::DirectFactory;
    use vmfactory_hypervisor::wait::wait_until;
    use vmfactory_hypervisor::FakeStep;
    use vmfactory_vm::FakeBackends;

    async fn wait_ready(c: &CacheFactory, n: usize) {
        wait_until(Duration::from_secs(5), || async {
            (c.ready().await >= n).then_some(())
        })
        .await
        .expect("pool filled");
    }

    #[tokio::test]
    async fn keeps_n_ready_hands_out_and_refills() {
        let b = Arc::new(FakeBackends::new());
        let c = CacheFactory::new(
            2,
            Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        );
        wait_ready(&c, 2).await;
        assert_eq!(c.status().await.len(), 2);
        let mut vms = Vec::new();
        for _ in 0..3 {
            vms.push(c.get_base_vm(c.config()).await.expect("vm"));
        }
        wait_ready(&c, 2).await;
        assert!(b.boots() >= 5, "refilled");
        assert_eq!(b.boots(), 5, "never more than n pooled");
        c.close().await.expect("close");
        c.close().await.expect("idempotent");
        assert!(matches!(
            c.get_base_vm(c.config()).await,
            Err(BaseError::Closed { what: "cache" })
        ));
        assert_eq!(b.live().await, 3, "only the handed-out VMs run");
        for vm in vms {
            vm.stop().await.expect("stop");
        }
        assert_eq!(b.live().await, 0);
        assert_eq!(b.vm_dir_count(), 0);
    }

    #[tokio::test]
    async fn a_vm_whose_size_is_wrong_never_enters_the_pool() {
        let b = Arc::new(FakeBackends::new());
        b.fail_hv_at(Some(FakeStep::Size));
        let c = CacheFactory::new(
            1,
            Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        );
        wait_until(Duration::from_secs(5), || async {
            (b.boots() >= 2).then_some(())
        })
        .await
        .expect("the worker retries");
        assert_eq!(c.ready().await, 0, "nothing pooled");
        b.fail_hv_at(None);
        wait_ready(&c, 1).await;
        c.close().await.expect("close");
        assert_eq!(b.live().await, 0, "the failed VMs were stopped");
        assert_eq!(b.vm_dir_count(), 0);
    }

    #[tokio::test]
    async fn close_while_workers_boot_leaks_nothing() {
        let b = Arc::new(FakeBackends::new());
        b.set_boot_delay(Duration::from_millis(150));
        let c = CacheFactory::new(
            3,
            Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(c.ready().await, 0, "all mid-boot");
        c.close().await.expect("close");
        assert_eq!(b.boots(), 3);
        assert_eq!(b.live().await, 0, "VMs finished after close were stopped");
        assert_eq!(b.vm_dir_count(), 0);
    }

    #[tokio::test]
    async fn a_miss_goes_to_the_base_and_failures_back_off() {
        let b = Arc::new(FakeBackends::new());
        b.fail_hv_at(Some(FakeStep::Start));
        let c = CacheFactory::new(
            1,
            Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        );
        // The base fails: the caller gets its error, not a hang.
        assert!(matches!(
            c.get_base_vm(c.config()).await,
            Err(BaseError::Vm(vmfactory_vm::Error::Hypervisor {
                op: "start",
                ..
            }))
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tries = b.boots();
        assert!(tries <= 3, "backing off, not spinning: {tries}");
        b.fail_hv_at(None);
        wait_ready(&c, 1).await;
        c.close().await.expect("close");
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn dropping_without_close_stops_the_workers() {
        let b = Arc::new(FakeBackends::new());
        b.set_boot_delay(Duration::from_millis(50));
        let c = CacheFactory::new(
            1,
            Arc::new(DirectFactory::with_backends(b.config(), b.clone())),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(c);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.boots(), 1);
        assert_eq!(b.live().await, 0, "the worker stopped the VM it made");
    }
}
