//! [`Factory::get_vm`]: turns a base VM into the VM a caller asked for (the seed's `GetVM`).
//!
//! Sizing: a base VM has the base config's size; `get_vm` hot-adds the vCPUs and memory a
//! request asks for beyond that, and onlines them. It never shrinks (neither QEMU's hot-unplug
//! nor the Kata agent's offlining is reliable, and Kata does not either): a request for less
//! than the base gets a VM of the base size, and the VM's recorded size says so. After sizing,
//! the recorded size is checked against what the hypervisor reports (`Hypervisor::size`).

use std::fmt;
use std::time::Instant;

use serde_json::Value;
use tracing::{debug, info, info_span, warn, Instrument};
use vmfactory_hypervisor::{VmSize, VmStatus};
use vmfactory_vm::{ConfigError, Vm, VmConfig};

use crate::base::BaseError;
use crate::factory::Factory;
use crate::metrics::GetVmSource;
use crate::template::first_difference;

/// A step of [`Factory::get_vm`] after the base VM was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetVmStep {
    /// Reading the VM's status.
    Status,
    /// Resuming a paused base VM.
    Resume,
    /// Reseeding the guest RNG.
    ReseedRng,
    /// Setting the guest clock.
    SyncTime,
    /// Hot-adding vCPUs.
    AddCpus,
    /// Hot-adding memory.
    AddMemory,
    /// Onlining what was hot-added.
    Online,
    /// Reading the size the hypervisor reports.
    Size,
}

impl fmt::Display for GetVmStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Status => "status",
            Self::Resume => "resume",
            Self::ReseedRng => "RNG reseed",
            Self::SyncTime => "time sync",
            Self::AddCpus => "vCPU hotplug",
            Self::AddMemory => "memory hotplug",
            Self::Online => "onlining",
            Self::Size => "size query",
        })
    }
}

/// Why [`Factory::get_vm`] failed. Whatever VM it had taken or booted was stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GetVmError {
    /// The requested config is invalid (or its guest files are unreadable).
    #[error("Invalid VM request")]
    Request(#[from] vmfactory_vm::ConfigError),
    /// The request differs from the base config, and booting a direct VM for it failed.
    #[error("Booting a direct VM for the request failed")]
    Direct(#[source] Box<vmfactory_vm::Error>),
    /// The base could not hand out a VM.
    #[error(transparent)]
    Base(#[from] BaseError),
    /// A step failed.
    #[error("The {step} of VM {id} failed")]
    Step {
        /// The VM id.
        id: String,
        /// The step.
        step: GetVmStep,
        /// The VM error (boxed: it is large).
        #[source]
        source: Box<vmfactory_vm::Error>,
    },
    /// Hotplug added less than asked for.
    #[error("VM {id} got {added} of the {wanted} {what} asked for")]
    ShortHotplug {
        /// The VM id.
        id: String,
        /// `vCPUs` or `MiB`.
        what: &'static str,
        /// How much was asked for.
        wanted: u64,
        /// How much was added.
        added: u64,
    },
}

impl GetVmError {
    /// The hypervisor's `Exited` error (exit status, QEMU's last stderr lines) if the VM died
    /// during `get_vm`, at whichever step: see [`vmfactory_vm::Error::hypervisor_exit`].
    pub fn hypervisor_exit(&self) -> Option<&vmfactory_vm::HypervisorError> {
        match self {
            Self::Direct(e) | Self::Step { source: e, .. } => e.hypervisor_exit(),
            Self::Base(e) => e.hypervisor_exit(),
            Self::Request(_) | Self::ShortHotplug { .. } => None,
        }
    }

    /// The post-mortem (last console lines, kept log) if the VM failed to come up: see
    /// [`vmfactory_vm::Error::postmortem`].
    pub fn postmortem(&self) -> Option<&vmfactory_vm::Postmortem> {
        match self {
            Self::Direct(e) | Self::Step { source: e, .. } => e.postmortem(),
            Self::Base(e) => e.postmortem(),
            Self::Request(_) | Self::ShortHotplug { .. } => None,
        }
    }
}

/// The first field in which `request` differs from `base` in something a base VM cannot be
/// adapted to: anything but boot vCPUs, boot memory, the template flags and paths, and the
/// proxy. Returns `(field, base value, requested value)`.
pub fn config_difference(base: &VmConfig, request: &VmConfig) -> Option<(String, String, String)> {
    let mut req = request.without_template();
    req.hypervisor.vcpus = base.hypervisor.vcpus;
    req.hypervisor.memory_mib = base.hypervisor.memory_mib;
    req.proxy = base.proxy;
    let base = base.without_template();
    if req == base {
        return None;
    }
    let as_flat = |c: &VmConfig| -> Value {
        let mut v = serde_json::to_value(c).unwrap_or_default();
        // Compare hypervisor fields by their own names.
        if let Some(Value::Object(hv)) = v.as_object_mut().and_then(|o| o.remove("hypervisor")) {
            if let Some(o) = v.as_object_mut() {
                o.extend(hv);
            }
        }
        v
    };
    first_difference(&as_flat(&base), &as_flat(&req))
        .or_else(|| Some(("config".into(), String::new(), String::new())))
}

impl Factory {
    /// A VM for `config` (Kata's `GetVM`): if it differs from the base config in anything but
    /// vCPUs, memory, template paths and flags, and proxy, validates it (including that the
    /// guest files are readable) and boots a direct VM for it (logged). Otherwise checks its
    /// size, raised to at least the base size (it never shrinks, see the module docs), with
    /// the base config's [`vmfactory_hypervisor::HypervisorConfig::check_size`] and its guest
    /// files, takes a base VM, resumes it if paused, reseeds the guest RNG, sets the guest
    /// clock, hot-adds the vCPUs and memory `config` asks for beyond the base VM's size,
    /// onlines them, and checks the recorded size against the hypervisor's. Any failure stops
    /// the VM and returns the error.
    pub async fn get_vm(&self, config: &VmConfig) -> Result<Vm, GetVmError> {
        let started = Instant::now();
        let base_cfg = self.config();
        if let Some((field, base, requested)) = config_difference(base_cfg, config) {
            // Booted as asked: its size is a boot size.
            config.validate_async().await?;
            info!(%field, %base, %requested, "request differs from the factory's base config, booting a direct VM");
            let vm = Vm::new_with(config.clone(), self.backends())
                .await
                .map_err(|e| GetVmError::Direct(Box::new(e)))?;
            self.record_get_vm(GetVmSource::Fallback, started.elapsed());
            return Ok(vm);
        }
        // Only the size differs: it is a size to grow a base VM to, not a boot size (a request
        // for the maximum memory is no boot config when memory slots need room above it).
        let boot = &base_cfg.hypervisor;
        let size = VmSize {
            vcpus: config.hypervisor.vcpus.max(boot.vcpus),
            memory_mib: config.hypervisor.memory_mib.max(boot.memory_mib),
        };
        boot.check_size(size).map_err(ConfigError::Hypervisor)?;
        let mut at_boot = config.clone();
        at_boot.hypervisor.vcpus = boot.vcpus;
        at_boot.hypervisor.memory_mib = boot.memory_mib;
        at_boot.validate_async().await?;
        let vm = self.base().get_base_vm(base_cfg).await?;
        let span = info_span!("get_vm", vm = %vm.id());
        let fresh = self.base().hands_out_fresh();
        let reseeds_itself = self.base().clones_reseed_themselves();
        match adapt(&vm, config, fresh, reseeds_itself)
            .instrument(span)
            .await
        {
            Ok(()) => {
                if let Some(source) = self.uncounted_source() {
                    self.record_get_vm(source, started.elapsed());
                }
                Ok(vm)
            }
            Err(e) => {
                warn!(vm = %vm.id(), error = %e, "get_vm failed, stopping the VM");
                if let Err(stop) = vm.stop().await {
                    warn!(vm = %vm.id(), error = %stop, "stopping the VM after a failed get_vm failed");
                }
                Err(e)
            }
        }
    }
}

/// Resume, reseed, set time (all three skipped for a `fresh` running VM; the reseed also for a
/// clone that `reseeds_itself`), hot-add, online, check the size (except for a `fresh` VM that
/// needed no hotplug: checked in its pool).
async fn adapt(
    vm: &Vm,
    config: &VmConfig,
    fresh: bool,
    reseeds_itself: bool,
) -> Result<(), GetVmError> {
    let id = vm.id().to_owned();
    let step = |step| {
        let id = id.clone();
        move |source| GetVmError::Step {
            id,
            step,
            source: Box::new(source),
        }
    };
    let st = vm.status().await.map_err(step(GetVmStep::Status))?;
    let paused = matches!(st.state, VmStatus::Paused | VmStatus::Prelaunch);
    if paused {
        vm.resume().await.map_err(step(GetVmStep::Resume))?;
    }
    let want_cpus = config.hypervisor.vcpus.saturating_sub(st.vcpus);
    let want_mib = config.hypervisor.memory_mib.saturating_sub(st.memory_mib);
    let hotplug = want_cpus > 0 || want_mib > 0;
    // A fresh VM from a cache had its size checked when it entered the pool; anything else is
    // checked here: after the hotplug if there is one, else beside the agent calls (the size
    // comes from QMP alone).
    let size_now = !hotplug && !fresh;
    let agent_calls = async {
        if (paused || !fresh) && reseeds_itself {
            // The guest's own VM-fork reseed replaces the host's; its agent answers the clock
            // call only once that happened, so nothing after `get_vm` sees the template's
            // CRNG (docs/guest.md, "VMGenID").
            vm.sync_time().await.map_err(step(GetVmStep::SyncTime))?;
        } else if paused || !fresh {
            // Independent agent calls: one round trip's wait instead of two. The first failure
            // ends both (the other would dial a dead agent for its own full timeout).
            tokio::try_join!(
                async { vm.reseed_rng().await.map_err(step(GetVmStep::ReseedRng)) },
                async { vm.sync_time().await.map_err(step(GetVmStep::SyncTime)) },
            )?;
        }
        Ok::<(), GetVmError>(())
    };
    let size = async {
        if size_now {
            vm.verify_size().await.map_err(step(GetVmStep::Size))?;
        }
        Ok::<(), GetVmError>(())
    };
    // The first failure ends both: a clone whose agent is gone may also have a QEMU whose
    // monitor hangs, and the size query would then wait out QMP's 30 s timeout.
    tokio::try_join!(agent_calls, size)?;

    if want_cpus > 0 {
        let added = vm
            .add_cpus(want_cpus)
            .await
            .map_err(step(GetVmStep::AddCpus))?;
        if added < want_cpus {
            return Err(GetVmError::ShortHotplug {
                id,
                what: "vCPUs",
                wanted: want_cpus.into(),
                added: added.into(),
            });
        }
    }
    if want_mib > 0 {
        let added = vm
            .add_memory(want_mib)
            .await
            .map_err(step(GetVmStep::AddMemory))?;
        if added < want_mib {
            return Err(GetVmError::ShortHotplug {
                id,
                what: "MiB",
                wanted: want_mib,
                added,
            });
        }
    }
    if hotplug {
        vm.online_cpu_memory()
            .await
            .map_err(step(GetVmStep::Online))?;
        vm.verify_size().await.map_err(step(GetVmStep::Size))?;
    }
    let (vcpus, memory_mib) = vm.recorded_size().await;
    debug!(vcpus, memory_mib, "VM ready");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::FactoryBase as _;
    use crate::factory::BaseKind;
    use crate::testing::FakeHost;
    use crate::FactoryConfig;
    use std::sync::Arc;
    use vmfactory_agent::FakeCall as A;
    use vmfactory_hypervisor::{FakeCall as H, FakeStep, Hypervisor as _};
    use vmfactory_vm::FakeBackends;

    async fn template_factory(b: &Arc<FakeBackends>) -> Factory {
        let mut c = FactoryConfig::new(b.config());
        c.template = true;
        c.template_path = b.template_path();
        // These tests count live VMs; pre-started clones have their own tests.
        c.prestart = 0;
        let f = Factory::new_with(&c, b.clone(), Arc::new(FakeHost::default()))
            .await
            .expect("factory");
        assert_eq!(f.kind(), BaseKind::Template);
        f
    }

    #[tokio::test]
    async fn clone_is_resumed_reseeded_timed_and_grown() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        let mut req = b.config();
        req.hypervisor.vcpus = 2;
        req.hypervisor.memory_mib = 512;
        let vm = f.get_vm(&req).await.expect("vm");
        let st = vm.status().await.expect("status");
        assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (2, 512, 0));
        assert_eq!(st.state, VmStatus::Running);
        let hv = b.hv(vm.id());
        assert!(hv.config().clones_template());
        assert_eq!(hv.size(), (2, 512));
        let calls = hv.calls();
        let pos = |c: &H| calls.iter().position(|x| x == c).expect("called");
        assert!(pos(&H::Resume) < pos(&H::AddVcpus(1)));
        assert!(pos(&H::AddVcpus(1)) < pos(&H::AddMemory(256)));
        let agent = b.agent(vm.id());
        let methods: Vec<&str> = agent.calls().iter().map(A::method).collect();
        let p = |m: &str| methods.iter().position(|x| *x == m).expect("called");
        // Reseed and clock set run concurrently; both come before onlining.
        assert!(p("reseed_random_dev") < p("online_cpu_mem"));
        assert!(p("set_guest_date_time") < p("online_cpu_mem"));
        vm.stop().await.expect("stop");

        // Asking for less than the base: base size, nothing hot-added, nothing onlined.
        let mut small = b.config();
        small.hypervisor.memory_mib = 128;
        let vm = f.get_vm(&small).await.expect("vm");
        assert_eq!(vm.status().await.expect("s").memory_mib, 256);
        assert_eq!(b.agent(vm.id()).count("online_cpu_mem"), 0);
        vm.stop().await.expect("stop");
        f.close().await.expect("close");
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn clones_that_reseed_themselves_get_only_the_clock_call() {
        for active in [true, false] {
            let b = Arc::new(FakeBackends::new());
            b.set_fork_reseed(active);
            let f = template_factory(&b).await;
            // The template VM was asked, after its warm-up and before the save.
            let tpl = b.ids_where(|c| c.saves_template());
            let names: Vec<&str> = b.agent(&tpl[0]).calls().iter().map(A::method).collect();
            let at = |m: &str| names.iter().position(|n| *n == m).expect(m);
            assert!(
                at("reseed_random_dev") < at("prepare_template"),
                "{names:?}"
            );
            assert!(at("prepare_template") < at("disconnect"), "{names:?}");
            assert_eq!(f.base().clones_reseed_themselves(), active);
            let meta = crate::TemplateMetadata::load(&b.template_path())
                .await
                .expect("metadata");
            assert_eq!(meta.clones_reseed_themselves, active);

            let mut req = b.config();
            req.hypervisor.vcpus = 2;
            let vm = f.get_vm(&req).await.expect("vm");
            let agent = b.agent(vm.id());
            assert_eq!(agent.count("reseed_random_dev"), usize::from(!active));
            assert_eq!(agent.count("set_guest_date_time"), 1);
            // The clock call (the guest's wait for its own reseed) still precedes the rest.
            let methods: Vec<&str> = agent.calls().iter().map(A::method).collect();
            let p = |m: &str| methods.iter().position(|x| *x == m).expect(m);
            assert!(
                p("set_guest_date_time") < p("online_cpu_mem"),
                "{methods:?}"
            );
            vm.stop().await.expect("stop");

            // A factory fetching the template reads the answer from its metadata.
            let fetched = crate::TemplateFactory::fetch_with(
                &b.config(),
                b.template_path(),
                b.clone(),
                Arc::new(FakeHost::default()),
            )
            .await
            .expect("fetch");
            assert_eq!(fetched.clones_reseed_themselves(), active);
            fetched.close().await.expect("close");
            f.close().await.expect("close");
            assert_eq!(b.live().await, 0);
        }
    }

    #[tokio::test]
    async fn a_clock_call_that_never_sees_the_reseed_fails_get_vm() {
        // The guest's bound on its wait ran out (no VM-fork reseed logged): the clock call
        // fails, and the clone is stopped rather than handed out.
        let b = Arc::new(FakeBackends::new());
        b.set_fork_reseed(true);
        let f = template_factory(&b).await;
        b.fail_agent_methods(["set_guest_date_time"]);
        let err = f.get_vm(&b.config()).await.expect_err("fails");
        assert!(
            matches!(
                err,
                GetVmError::Step {
                    step: GetVmStep::SyncTime,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(b.live().await, 0);
        assert_eq!(b.vm_dir_count(), 0);
        f.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_cache_over_such_a_template_fills_its_pool_without_the_reseed() {
        let b = Arc::new(FakeBackends::new());
        b.set_fork_reseed(true);
        let mut c = FactoryConfig::new(b.config());
        c.template = true;
        c.cache = 1;
        c.template_path = b.template_path();
        let f = Factory::new_with(&c, b.clone(), Arc::new(FakeHost::default()))
            .await
            .expect("factory");
        let vm = f.get_vm(&b.config()).await.expect("vm");
        let agent = b.agent(vm.id());
        assert_eq!(agent.count("reseed_random_dev"), 0);
        assert_eq!(agent.count("set_guest_date_time"), 1, "set in the pool");
        vm.stop().await.expect("stop");
        f.close().await.expect("close");
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn the_largest_size_the_config_allows_is_served() {
        // Memory at `max_memory_mib` with memory slots is no boot config (QEMU wants room
        // above the boot memory for them), but it is a size a base VM grows to.
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        let mut req = b.config();
        req.hypervisor.vcpus = 4;
        req.hypervisor.memory_mib = 1024;
        assert!(req.validate_shape().is_err(), "not a boot config");
        let vm = f.get_vm(&req).await.expect("vm at the maximum");
        assert_eq!(b.hv(vm.id()).size(), (4, 1024));
        vm.stop().await.expect("stop");
        // One past it is refused by the same rule, before any VM is taken.
        req.hypervisor.memory_mib = 1025;
        let err = f.get_vm(&req).await.expect_err("too much");
        assert!(
            matches!(
                err,
                GetVmError::Request(ConfigError::Hypervisor(
                    vmfactory_hypervisor::ConfigError::MemoryOutOfRange { .. }
                ))
            ),
            "{err:?}"
        );
        f.close().await.expect("close");
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn a_different_config_gets_a_direct_vm() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        let mut req = b.config();
        req.hypervisor.kernel_params = "debug".into();
        assert_eq!(
            config_difference(f.config(), &req).map(|d| d.0).as_deref(),
            Some("kernel_params")
        );
        let vm = f.get_vm(&req).await.expect("direct vm");
        let hv = b.hv(vm.id());
        assert!(!hv.config().clones_template(), "not a clone");
        assert_eq!(hv.config().kernel_params, "debug");
        vm.stop().await.expect("stop");
        let mut req = b.config();
        req.agent.call_timeout = std::time::Duration::from_secs(3);
        assert_eq!(
            config_difference(f.config(), &req).map(|d| d.0).as_deref(),
            Some("agent")
        );
        // What a base VM adapts to is no difference.
        let mut req = b.config();
        req.hypervisor.vcpus = 3;
        req.hypervisor.memory_mib = 768;
        req.proxy = vmfactory_proxy::ProxyKind::None;
        assert_eq!(config_difference(f.config(), &req), None);
        f.close().await.expect("close");
    }

    /// One failed agent call of a clone ends `get_vm` at once: the other, hanging on the same
    /// dead guest, is not waited for.
    #[tokio::test]
    async fn the_first_failed_call_ends_get_vm() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        b.fail_agent_methods(["reseed_random_dev"]);
        b.hang_agent_methods(["set_guest_date_time"]);
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), f.get_vm(&b.config()))
            .await
            .expect("not held up by the hanging call");
        assert!(
            matches!(
                got,
                Err(GetVmError::Step {
                    step: GetVmStep::ReseedRng,
                    ..
                })
            ),
            "{got:?}"
        );
        assert_eq!(b.live().await, 0, "the VM was stopped");
        f.close().await.expect("close");
    }

    #[tokio::test]
    async fn failures_mid_get_vm_stop_the_vm() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        let mut req = b.config();
        req.hypervisor.vcpus = 2;
        req.hypervisor.memory_mib = 512;
        let cases: [(&str, Option<FakeStep>, GetVmStep); 5] = [
            ("reseed_random_dev", None, GetVmStep::ReseedRng),
            ("set_guest_date_time", None, GetVmStep::SyncTime),
            ("online_cpu_mem", None, GetVmStep::Online),
            ("", Some(FakeStep::AddVcpus), GetVmStep::AddCpus),
            ("", Some(FakeStep::AddMemory), GetVmStep::AddMemory),
        ];
        for (agent_fail, hv_fail, want) in cases {
            b.fail_agent_methods(Some(agent_fail).filter(|m| !m.is_empty()));
            b.fail_hv_at(hv_fail);
            let err = f.get_vm(&req).await.expect_err("fails");
            assert!(
                matches!(err, GetVmError::Step { step, .. } if step == want),
                "{want:?}: {err:?}"
            );
            assert_eq!(b.live().await, 0, "{want:?}: the VM was stopped");
            assert_eq!(b.vm_dir_count(), 0, "{want:?}");
        }
        b.fail_agent_methods([]);
        b.fail_hv_at(Some(FakeStep::Resume));
        assert!(matches!(
            f.get_vm(&req).await,
            Err(GetVmError::Step {
                step: GetVmStep::Resume,
                ..
            })
        ));
        b.fail_hv_at(Some(FakeStep::Size));
        assert!(matches!(
            f.get_vm(&req).await,
            Err(GetVmError::Step {
                step: GetVmStep::Size,
                ..
            })
        ));
        assert_eq!(b.live().await, 0);
        // An invalid request is refused before any VM exists.
        let mut bad = b.config();
        bad.hypervisor.vcpus = 9;
        assert!(matches!(f.get_vm(&bad).await, Err(GetVmError::Request(_))));
        f.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_clone_that_dies_after_resume_fails_at_once_with_its_exit() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        // As with a corrupt template memory file: the resume succeeds, QEMU dies right after,
        // and the guest never answers (without the exit, the calls would hang for good).
        b.exit_hv_after(Some(FakeStep::Resume));
        b.hang_agent_methods(["reseed_random_dev", "set_guest_date_time"]);
        let t0 = std::time::Instant::now();
        let err = f.get_vm(&b.config()).await.expect_err("the clone died");
        assert!(t0.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            matches!(
                err,
                GetVmError::Step {
                    step: GetVmStep::ReseedRng | GetVmStep::SyncTime | GetVmStep::Size,
                    ..
                }
            ),
            "{err:?}"
        );
        let exit = err.hypervisor_exit().expect("the exit is in the error");
        assert!(
            matches!(exit, vmfactory_vm::HypervisorError::Exited { stderr_tail, .. }
                if stderr_tail == "fake QEMU: exited after resume"),
            "{exit:?}"
        );
        assert!(crate::error_chain(&err).contains("fake QEMU: exited after resume"));
        assert_eq!(b.live().await, 0, "the dead clone was stopped");
        assert_eq!(b.vm_dir_count(), 0);

        // Dead as it starts: making the clone fails, and carries the exit too.
        b.exit_hv_after(Some(FakeStep::Start));
        let err = f.get_vm(&b.config()).await.expect_err("dead clone");
        assert!(
            matches!(
                err,
                GetVmError::Base(BaseError::Template(crate::TemplateError::Vm {
                    step: crate::TemplateStep::Clone,
                    ..
                }))
            ),
            "{err:?}"
        );
        assert!(err.hypervisor_exit().is_some(), "{err:?}");
        assert_eq!(b.live().await, 0);
        assert_eq!(b.vm_dir_count(), 0);
        f.close().await.expect("close");
    }

    #[tokio::test]
    async fn cached_direct_vms_are_grown_too() {
        let b = Arc::new(FakeBackends::new());
        let mut c = FactoryConfig::new(b.config());
        c.cache = 1;
        c.template_path = b.template_path();
        let f = Factory::new_with(&c, b.clone(), Arc::new(FakeHost::default()))
            .await
            .expect("factory");
        let mut req = b.config();
        req.hypervisor.vcpus = 4;
        let vm = f.get_vm(&req).await.expect("vm");
        assert_eq!(vm.status().await.expect("s").vcpus, 4);
        assert!(
            !b.hv(vm.id()).calls().contains(&H::Resume),
            "a running VM is not resumed"
        );
        let sizes = |vm: &Vm| {
            b.hv(vm.id())
                .calls()
                .iter()
                .filter(|c| **c == H::Size)
                .count()
        };
        assert_eq!(
            sizes(&vm),
            2,
            "checked in the pool, and again after the hotplug"
        );
        vm.stop().await.expect("stop");
        // A hit that needs no hotplug asks the hypervisor nothing more: its size was checked
        // when it entered the pool.
        let vm = f.get_vm(&b.config()).await.expect("vm");
        assert_eq!(sizes(&vm), 1, "checked once, in the pool");
        assert_eq!(vm.recorded_size().await, (1, 256));
        vm.stop().await.expect("stop");
        f.close().await.expect("close");
        assert_eq!(b.live().await, 0);
    }

    #[tokio::test]
    async fn template_clones_are_size_checked_in_get_vm() {
        let b = Arc::new(FakeBackends::new());
        let f = template_factory(&b).await;
        let vm = f.get_vm(&b.config()).await.expect("vm");
        let sizes = b
            .hv(vm.id())
            .calls()
            .iter()
            .filter(|c| **c == H::Size)
            .count();
        assert_eq!(sizes, 1);
        vm.stop().await.expect("stop");
        // Checked beside the reseed and clock set: a failure there still stops the VM.
        b.fail_hv_at(Some(FakeStep::Size));
        assert!(matches!(
            f.get_vm(&b.config()).await,
            Err(GetVmError::Step {
                step: GetVmStep::Size,
                ..
            })
        ));
        assert_eq!(b.live().await, 0);
        assert_eq!(b.vm_dir_count(), 0);
        f.close().await.expect("close");
    }
}
