//! [`Metrics`]: the factory's Prometheus metrics, and [`MetricsServer`], the HTTP endpoint that
//! serves them (`GET /metrics`) on a TCP address or a unix socket ([`MetricsAddress`]).
//!
//! The values are recorded where the events happen: a [`crate::CacheFactory`] built with
//! [`crate::CacheFactory::with_metrics`] counts its hand-outs (a pool hit is `cache`, a miss is
//! its base's source), its pool size and target, and its refill failures; a [`crate::Factory`]
//! given [`crate::Factory::with_metrics`] counts the VMs it boots directly because a request
//! differed from the base config (`fallback`) and the VMs of an uncached base. Gauges that are
//! a state, not an event (template age, VMs alive), are computed when scraped.

mod endpoint;

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::base::FactoryBase;

pub use endpoint::{MetricsAddress, MetricsAddressError, MetricsError, MetricsServer};

/// Where a handed-out VM came from: the `source` label of the `get_vm` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GetVmSource {
    /// Taken from a cache's ready pool.
    Cache,
    /// Cloned from a template (an uncached template base, or a cache miss over one).
    Template,
    /// Booted new (an uncached direct base, or a cache miss over one).
    Direct,
    /// Booted directly because the request differed from the factory's base config
    /// (Kata's "fallback to direct factory").
    Fallback,
}

impl GetVmSource {
    /// Every source.
    pub const ALL: [Self; 4] = [Self::Cache, Self::Template, Self::Direct, Self::Fallback];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Template => "template",
            Self::Direct => "direct",
            Self::Fallback => "fallback",
        }
    }
}

impl fmt::Display for GetVmSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for GetVmSource {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> fmt::Result {
        encoder.write_str(self.as_str())
    }
}

/// The label set of the `get_vm` families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SourceLabels {
    source: GetVmSource,
}

/// The latency buckets of `get_vm`, in seconds: from 0.5 ms (a pool hit is a pop) by factors
/// of 4 to 33 s (a TCG boot or clone on a loaded host).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 4.0, 9)
}

/// The factory's metrics and their registry. Share it as an `Arc`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    get_vm: Family<SourceLabels, Counter>,
    get_vm_seconds: Family<SourceLabels, Histogram>,
    pool_size: Gauge,
    pool_target: Gauge,
    refill_failures: Counter,
    template_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    vms_alive: Gauge,
    /// VMs a cache's workers or misses are making now (their QEMUs run already).
    making: AtomicI64,
    /// When the template was made, if there is one.
    template_created: Mutex<Option<SystemTime>>,
    /// The base whose pre-started clones count as alive; weak, since the base may hold this.
    base: Mutex<Option<Weak<dyn FactoryBase>>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("pool_size", &self.pool_size.get())
            .field("pool_target", &self.pool_target.get())
            .field("refill_failures", &self.refill_failures.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family, named `vmfactory_*`, all zero.
    pub fn new() -> Self {
        let get_vm = Family::<SourceLabels, Counter>::default();
        let get_vm_seconds = Family::<SourceLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        let pool_size = Gauge::default();
        let pool_target = Gauge::default();
        let refill_failures = Counter::default();
        let template_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let vms_alive = Gauge::default();
        let mut registry = Registry::with_prefix("vmfactory");
        registry.register(
            "get_vm",
            "VMs handed out, by where they came from",
            get_vm.clone(),
        );
        registry.register_with_unit(
            "get_vm_duration",
            "Time to hand out a VM, by where it came from",
            Unit::Seconds,
            get_vm_seconds.clone(),
        );
        registry.register(
            "pool_size",
            "VMs ready in the cache's pool",
            pool_size.clone(),
        );
        registry.register(
            "pool_target",
            "VMs the cache keeps ready (vm_cache_number)",
            pool_target.clone(),
        );
        registry.register(
            "refill_failures",
            "Times a cache worker failed to make a VM for the pool",
            refill_failures.clone(),
        );
        registry.register_with_unit(
            "template_age",
            "Time since the template was made",
            Unit::Seconds,
            template_age.clone(),
        );
        registry.register(
            "vms_alive",
            "VMs this process runs: pooled, being made for the pool, and pre-started clones",
            vms_alive.clone(),
        );
        // Every source from the start: a series that appears only once used hides a zero
        // from `rate()` and from alerts on its absence.
        for source in GetVmSource::ALL {
            let labels = SourceLabels { source };
            drop(get_vm.get_or_create(&labels));
            drop(get_vm_seconds.get_or_create(&labels));
        }
        Self {
            registry,
            get_vm,
            get_vm_seconds,
            pool_size,
            pool_target,
            refill_failures,
            template_age,
            vms_alive,
            making: AtomicI64::new(0),
            template_created: Mutex::new(None),
            base: Mutex::new(None),
        }
    }

    /// Counts one VM handed out from `source` after `took`.
    pub fn record_get_vm(&self, source: GetVmSource, took: Duration) {
        let labels = SourceLabels { source };
        self.get_vm.get_or_create(&labels).inc();
        self.get_vm_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Sets how many VMs the pool holds now.
    pub(crate) fn set_pool_size(&self, n: usize) {
        self.pool_size.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets how many VMs the pool keeps.
    pub(crate) fn set_pool_target(&self, n: usize) {
        self.pool_target.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a worker's failure to make a VM for the pool.
    pub(crate) fn refill_failed(&self) {
        self.refill_failures.inc();
    }

    /// Marks the start (`+1`) or end (`-1`) of making a VM for the cache.
    pub(crate) fn making(&self, delta: i64) {
        self.making.fetch_add(delta, Ordering::Relaxed);
    }

    /// Records when the template was made (its metadata's `created_at_secs`); the age is
    /// computed at each scrape. Without it, `template_age_seconds` stays 0.
    pub fn set_template_created(&self, created_at_secs: u64) {
        let at = UNIX_EPOCH + Duration::from_secs(created_at_secs);
        *self
            .template_created
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// Counts `base`'s pre-started clones as alive at each scrape (held weakly).
    pub fn watch_base(&self, base: &Arc<dyn FactoryBase>) {
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(base));
    }

    /// Updates the computed gauges and returns the registry in the Prometheus text exposition
    /// format (version 0.0.4).
    pub fn encode(&self) -> String {
        let created = *self
            .template_created
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(at) = created {
            // A clock set back before the template's making reads as age 0.
            let age = SystemTime::now().duration_since(at).unwrap_or_default();
            self.template_age.set(age.as_secs_f64());
        }
        let prestarted = self
            .base
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
            .map_or(0, |b| b.prestarted().waiting);
        let prestarted = i64::try_from(prestarted).unwrap_or(i64::MAX);
        self.vms_alive.set(
            self.pool_size
                .get()
                .saturating_add(self.making.load(Ordering::Relaxed).max(0))
                .saturating_add(prestarted),
        );
        let mut out = String::new();
        // Writing to a String cannot fail; the encoder only passes on the writer's errors.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Parsed samples of a Prometheus text exposition, for tests: `(name{labels}, value)`.
#[cfg(test)]
pub(crate) fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("sample line");
            (name.to_owned(), value.parse().expect("sample value"))
        })
        .collect()
}

/// The value of the sample named exactly `name` (with its labels), for tests.
#[cfg(test)]
pub(crate) fn sample(text: &str, name: &str) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests;
