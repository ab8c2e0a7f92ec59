//! The operations on a running [`Vm`]: pause, resume, save, hotplug with bookkeeping,
//! onlining, RNG reseed, time sync and status.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tracing::{debug, info, instrument, warn};
use vmfactory_agent::ForkReseed;
use vmfactory_hypervisor::VmStatus;

use crate::error::{Error, Result};
use crate::vm::Vm;

/// Bytes of host entropy [`Vm::reseed_rng`] feeds the guest (as the seed).
pub const RESEED_BYTES: usize = 512;

/// A clock call slower than this is made again by [`Vm::sync_time`]: the guest clock may lag
/// by up to the round trip.
pub const CLOCK_SYNC_TOLERANCE: Duration = Duration::from_millis(50);

/// How many clock calls [`Vm::sync_time`] makes at most.
pub const CLOCK_SYNC_ATTEMPTS: u32 = 3;

/// Where [`Vm::reseed_rng`] reads host entropy.
pub const ENTROPY_SOURCE: &str = "/dev/urandom";

/// A VM's status as [`Vm::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM id.
    pub id: String,
    /// The hypervisor's pid, while this handle drives a running VM.
    pub pid: Option<u32>,
    /// Recorded vCPUs (boot + hot-added).
    pub vcpus: u32,
    /// Recorded memory in MiB (boot + hot-added).
    pub memory_mib: u64,
    /// vCPUs hot-added but not yet onlined.
    pub cpu_delta: u32,
    /// The hypervisor's run state.
    pub state: VmStatus,
}

impl Vm {
    /// Pauses the guest.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn pause(&self) -> Result<()> {
        let _inner = self.owned().await?;
        self.hypervisor
            .pause()
            .await
            .map_err(|e| Error::hv(&self.id, "pause", e))
    }

    /// Resumes the guest (also: starts a clone's guest, which boots paused).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn resume(&self) -> Result<()> {
        let _inner = self.owned().await?;
        self.hypervisor
            .resume()
            .await
            .map_err(|e| Error::hv(&self.id, "resume", e))
    }

    /// Waits until the guest agent answers `Check` (at most the config's `ready_timeout`):
    /// after [`Vm::resume`] of a clone, whose agent was not checked when it was made.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn wait_ready(&self) -> Result<()> {
        let _inner = self.owned().await?;
        crate::vm::wait_ready(
            &self.id,
            self.agent.as_ref(),
            self.hypervisor.as_ref(),
            self.config.agent.ready_timeout,
        )
        .await
    }

    /// Saves the VM as a template (the seed's `Save`): needs a config with
    /// `boot_to_be_template`; the VM is left saved (`postmigrate`), to be stopped.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn save(&self) -> Result<()> {
        let _inner = self.owned().await?;
        self.hypervisor
            .save_template()
            .await
            .map_err(|e| Error::hv(&self.id, "save", e))
    }

    /// Closes the agent connection (the next agent call dials again). Unlike the seed's
    /// `Disconnect`, the proxy keeps running, so the console still shows the guest agent
    /// re-listening (what a template waits for before saving).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn disconnect(&self) -> Result<()> {
        let _inner = self.owned().await?;
        self.agent
            .disconnect()
            .await
            .map_err(|e| Error::agent(&self.id, "disconnect", e))
    }

    /// Hot-adds up to `n` vCPUs and returns how many were added (fewer when fewer slots are
    /// free). The recorded vCPUs and the count to online grow by that many, and the state is
    /// saved; a failure to save is returned after the recorded numbers were updated.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn add_cpus(&self, n: u32) -> Result<u32> {
        let mut inner = self.owned().await?;
        if n == 0 {
            return Ok(0);
        }
        let added = self
            .hypervisor
            .add_vcpus(n)
            .await
            .map_err(|e| Error::hv(&self.id, "add_vcpus", e))?;
        inner.vcpus += added;
        inner.cpu_delta += added;
        info!(added, vcpus = inner.vcpus, "vCPUs hot-added");
        self.save_state(&inner).await?;
        Ok(added)
    }

    /// Hot-adds `mib` MiB of memory and returns the MiB added. The recorded memory grows by
    /// that much (the seed forgot to) and the state is saved.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn add_memory(&self, mib: u64) -> Result<u64> {
        let mut inner = self.owned().await?;
        if mib == 0 {
            return Ok(0);
        }
        let added = self
            .hypervisor
            .add_memory(mib)
            .await
            .map_err(|e| Error::hv(&self.id, "add_memory", e))?;
        inner.memory_mib += added;
        info!(added, memory_mib = inner.memory_mib, "memory hot-added");
        self.save_state(&inner).await?;
        Ok(added)
    }

    /// Asks the agent to online the vCPUs hot-added since the last call, and all hot-added
    /// memory, and waits until it has (`OnlineCPUMem` with `wait`).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn online_cpu_memory(&self) -> Result<()> {
        let mut inner = self.owned().await?;
        let cpus = inner.cpu_delta;
        self.agent_call(
            "online_cpu_mem",
            self.agent.online_cpu_mem(true, cpus, false),
        )
        .await?;
        inner.cpu_delta = 0;
        info!(cpus, "hot-added resources onlined");
        self.save_state(&inner).await
    }

    /// Feeds the guest RNG [`RESEED_BYTES`] bytes of host entropy and reseeds it (clones of one
    /// template share RNG state).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn reseed_rng(&self) -> Result<()> {
        // Only the ownership check needs the lock: agent calls may run side by side (get_vm
        // reseeds and sets the clock concurrently).
        drop(self.owned().await?);
        let data = host_entropy(Path::new(ENTROPY_SOURCE)).await?;
        self.agent_call("reseed_random_dev", self.agent.reseed_random_dev(&data))
            .await
    }

    /// Asks the guest agent to get ready for this VM to be saved as a template: whether its
    /// clones will reseed their CRNG themselves (VMGenID), so that they need no
    /// [`Vm::reseed_rng`]. Where they will, the agent of each clone holds its clock call
    /// ([`Vm::sync_time`]) until its kernel has reseeded.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn prepare_template(&self) -> Result<ForkReseed> {
        drop(self.owned().await?);
        self.agent_call("prepare_template", self.agent.prepare_template())
            .await
    }

    /// Sets the guest clock to the host's (the guest's stood still while it was paused).
    ///
    /// The guest lags by up to the call's round trip. A clone's first call can be slow (its
    /// pages fault in from the template; a VMGenID guest holds it until its reseed), so a
    /// call slower than [`CLOCK_SYNC_TOLERANCE`] is made again, up to
    /// [`CLOCK_SYNC_ATTEMPTS`] times in all.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn sync_time(&self) -> Result<()> {
        drop(self.owned().await?);
        let mut round_trip = Duration::ZERO;
        for attempt in 1..=CLOCK_SYNC_ATTEMPTS {
            round_trip = self
                .agent_call("set_guest_date_time", self.agent.sync_guest_clock())
                .await?;
            if round_trip <= CLOCK_SYNC_TOLERANCE {
                return Ok(());
            }
            debug!(?round_trip, attempt, "slow clock call");
        }
        warn!(
            ?round_trip,
            "guest clock set by {CLOCK_SYNC_ATTEMPTS} slow calls; it may lag by the last"
        );
        Ok(())
    }

    /// The recorded size, `(vCPUs, MiB)`: boot size plus what was hot-added. Asks nothing of
    /// the hypervisor.
    pub async fn recorded_size(&self) -> (u32, u64) {
        let inner = self.inner.lock().await;
        (inner.vcpus, inner.memory_mib)
    }

    /// Checks the recorded size against the one the hypervisor reports (two QMP queries):
    /// [`Error::SizeMismatch`] if they differ.
    pub async fn verify_size(&self) -> Result<()> {
        let actual = self
            .hypervisor
            .size()
            .await
            .map_err(|e| Error::hv(&self.id, "size", e))?;
        let (vcpus, mib) = self.recorded_size().await;
        if (vcpus, mib) != (actual.vcpus, actual.memory_mib) {
            return Err(Error::SizeMismatch {
                id: self.id.clone(),
                recorded_vcpus: vcpus,
                recorded_mib: mib,
                vcpus: actual.vcpus,
                mib: actual.memory_mib,
            });
        }
        Ok(())
    }

    /// The VM's pid, recorded size and run state. Works on a stopped or detached handle too
    /// (the run state is then `Stopped`).
    pub async fn status(&self) -> Result<VmInfo> {
        let inner = self.inner.lock().await;
        let state = self
            .hypervisor
            .status()
            .await
            .map_err(|e| Error::hv(&self.id, "status", e))?;
        Ok(VmInfo {
            id: self.id.clone(),
            pid: self.hypervisor.pid(),
            vcpus: inner.vcpus,
            memory_mib: inner.memory_mib,
            cpu_delta: inner.cpu_delta,
            state,
        })
    }
}

/// Reads [`RESEED_BYTES`] bytes from `source` (on tokio's blocking pool, via `tokio::fs`).
pub(crate) async fn host_entropy(source: &Path) -> Result<Vec<u8>> {
    let err = |source_err| Error::Entropy {
        path: source.to_owned(),
        source: source_err,
    };
    let mut file = tokio::fs::File::open(source).await.map_err(err)?;
    let mut data = vec![0; RESEED_BYTES];
    file.read_exact(&mut data).await.map_err(err)?;
    Ok(data)
}

/// Waits on the VM that end when its hypervisor exits.
impl Vm {
    /// Runs `fut` unless the VM's hypervisor exits first: then returns at once
    /// [`Error::HypervisorExited`] (QEMU's exit status and last stderr lines), with `op` naming
    /// what was waited for, instead of waiting for `fut`'s own timeout. For waits on the VM
    /// this crate does not make itself: a console line, a call through [`Vm::agent`].
    pub async fn unless_exited<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = T>,
    ) -> Result<T> {
        crate::exit::unless_exited(&self.id, self.hypervisor.as_ref(), op, fut).await
    }

    /// [`crate::exit::agent_call`] on this VM's agent and hypervisor.
    pub(crate) async fn agent_call<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = vmfactory_agent::Result<T>>,
    ) -> Result<T> {
        crate::exit::agent_call(&self.id, Some(self.hypervisor.as_ref()), op, call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeBackends;
    use std::time::SystemTime;
    use vmfactory_agent::{Agent, FakeCall as AgentCall};
    use vmfactory_hypervisor::{FakeCall, FakeStep};

    #[tokio::test]
    async fn a_slow_clock_call_is_made_again() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let sets = |h: &FakeBackends| h.last_agent().count("set_guest_date_time");
        let slow = CLOCK_SYNC_TOLERANCE * 4;
        // The first call was slow (a clone's first); the second, quick, sets the clock.
        h.last_agent().set_clock_round_trips([slow]);
        vm.sync_time().await.expect("sync");
        assert_eq!(sets(&h), 2);
        // A guest that stays slow gets the bounded number of calls, and no error.
        h.last_agent()
            .set_clock_round_trips([slow; CLOCK_SYNC_ATTEMPTS as usize]);
        vm.sync_time().await.expect("sync on a slow guest");
        assert_eq!(sets(&h), 2 + CLOCK_SYNC_ATTEMPTS as usize);
        // A quick guest gets one call.
        vm.sync_time().await.expect("sync");
        assert_eq!(sets(&h), 3 + CLOCK_SYNC_ATTEMPTS as usize);
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn verify_size_asks_the_hypervisor() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        vm.add_cpus(1).await.expect("cpus");
        vm.verify_size().await.expect("recorded size is the VM's");
        h.last_hv().fail_at(Some(FakeStep::Size));
        assert!(matches!(
            vm.verify_size().await,
            Err(Error::Hypervisor { op: "size", .. })
        ));
        h.last_hv().fail_at(None);
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn hotplug_bookkeeping_and_online() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        assert_eq!(vm.add_cpus(0).await.expect("none"), 0);
        assert_eq!(vm.add_cpus(2).await.expect("cpus"), 2);
        // max_vcpus is 4: only one more slot.
        assert_eq!(vm.add_cpus(5).await.expect("cpus"), 1);
        assert_eq!(vm.add_memory(256).await.expect("mem"), 256);
        assert_eq!(vm.add_memory(0).await.expect("none"), 0);
        let st = vm.status().await.expect("status");
        assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (4, 512, 3));
        assert_eq!(st.state, VmStatus::Running);
        assert_eq!(
            h.last_hv().size(),
            (4, 512),
            "recorded size matches the VM's"
        );

        // Saved state follows.
        let saved: crate::VmState = h.store().load_state(vm.id()).await.expect("load");
        assert_eq!(
            (saved.vcpus, saved.memory_mib, saved.cpu_delta),
            (4, 512, 3)
        );

        vm.online_cpu_memory().await.expect("online");
        assert_eq!(
            h.last_agent().calls().last(),
            Some(&AgentCall::OnlineCpuMem {
                wait: true,
                nb_cpus: 3,
                cpu_only: false
            })
        );
        assert_eq!(vm.status().await.expect("status").cpu_delta, 0);
        assert_eq!(
            h.last_agent()
                .resources()
                .await
                .expect("res")
                .online_cpu_count(),
            4
        );
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn failed_hotplug_changes_nothing() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        h.last_hv().fail_at(Some(FakeStep::AddVcpus));
        assert!(matches!(
            vm.add_cpus(1).await,
            Err(Error::Hypervisor {
                op: "add_vcpus",
                ..
            })
        ));
        h.last_hv().fail_at(None);
        // Memory beyond max_memory_mib (1024) is refused by the hypervisor.
        assert!(matches!(
            vm.add_memory(2048).await,
            Err(Error::Hypervisor {
                op: "add_memory",
                ..
            })
        ));
        h.last_agent().fail("online_cpu_mem");
        assert_eq!(vm.add_cpus(1).await.expect("cpu"), 1);
        assert!(vm.online_cpu_memory().await.is_err());
        let st = vm.status().await.expect("status");
        assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (2, 256, 1));
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn pause_resume_save_reseed_time_disconnect() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        vm.pause().await.expect("pause");
        assert_eq!(vm.status().await.expect("s").state, VmStatus::Paused);
        vm.resume().await.expect("resume");
        // Not a template VM: saving is unsupported.
        assert!(matches!(
            vm.save().await,
            Err(Error::Hypervisor { op: "save", .. })
        ));
        vm.reseed_rng().await.expect("reseed");
        let before = SystemTime::now();
        vm.sync_time().await.expect("time");
        vm.disconnect().await.expect("disconnect");
        assert!(!h.last_agent().is_connected());
        let calls = h.last_agent().calls();
        let seed = calls.iter().find_map(|c| match c {
            AgentCall::ReseedRandomDev(d) => Some(d.clone()),
            _ => None,
        });
        assert_eq!(seed.map(|d| d.len()), Some(RESEED_BYTES));
        let t = calls.iter().find_map(|c| match c {
            AgentCall::SetGuestDateTime(t) => Some(*t),
            _ => None,
        });
        assert!(t.is_some_and(|t| t >= before));
        assert!(h.last_hv().calls().contains(&FakeCall::SaveTemplate));
        vm.stop().await.expect("stop");
        assert!(matches!(
            vm.pause().await,
            Err(Error::NotOwned {
                state: "stopped",
                ..
            })
        ));
        assert_eq!(vm.status().await.expect("s").state, VmStatus::Stopped);
    }

    #[tokio::test]
    async fn entropy_is_read_and_errors_are_typed() {
        let data = host_entropy(Path::new(ENTROPY_SOURCE)).await.expect("read");
        assert_eq!(data.len(), RESEED_BYTES);
        assert!(data.iter().any(|b| *b != 0));
        let dir = tempfile::tempdir().expect("tempdir");
        let short = dir.path().join("short");
        std::fs::write(&short, [1u8; 10]).expect("write");
        assert!(matches!(
            host_entropy(&short).await,
            Err(Error::Entropy { .. })
        ));
        assert!(matches!(
            host_entropy(&dir.path().join("missing")).await,
            Err(Error::Entropy { .. })
        ));
    }
}
