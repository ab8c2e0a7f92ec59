//! Handing a VM over between handles, in this or another process: [`Vm::detach`] gives it up
//! and returns its wire form, [`Vm::from_wire`] takes it over (the seed's `ToGrpc` /
//! `NewVMFromGrpc`).

use tracing::{debug, info, info_span, warn, Instrument};
use vmfactory_hypervisor::VmStatus;
use vmfactory_persist::Store;

use crate::backends::{Backends, NewStep, QemuBackends};
use crate::endpoint::running_agent_url;
use crate::error::{Error, Result};
use crate::vm::{start_proxy, wait_ready, Inner, Ownership, Partial, Vm};
use crate::wire::VmState;

impl Vm {
    /// Re-attaches to a running VM from its wire form ([`Vm::detach`] of another handle, in
    /// this or another process); see [`Vm::from_wire_with`].
    pub async fn from_wire(bytes: &[u8]) -> Result<Self> {
        Self::from_wire_with(bytes, &QemuBackends).await
    }

    /// Re-attaches to a running VM from its wire form with parts from `backends` (the seed's
    /// `NewVMFromGrpc`): decode and check the bytes, take the VM's storage lock, re-attach the
    /// hypervisor (QEMU's pid and start time checked, QMP reconnected), restart the proxy,
    /// create a new agent client and, if the guest runs, wait for its `Check`, then save the
    /// state.
    ///
    /// The VM must have been detached first: QEMU serves one QMP client at a time, and the
    /// storage lock has one owner. A failure after attaching releases the VM again without
    /// stopping it, so the same bytes can be tried again.
    pub async fn from_wire_with(bytes: &[u8], backends: &dyn Backends) -> Result<Self> {
        backends.before("", NewStep::Validate).await?;
        let state = VmState::from_wire(bytes)?;
        let id = state.id.clone();
        let span = info_span!("vm", vm = %id);
        async move {
            let mut partial = Partial::new(&id, Store::new(&state.config.run_root), true);
            let attached = Self::attach(&mut partial, state, backends).await;
            partial
                .finish(attached, "VM re-attached", "re-attaching failed, releasing")
                .await
        }
        .instrument(span)
        .await
    }

    async fn attach(p: &mut Partial, state: VmState, backends: &dyn Backends) -> Result<Self> {
        let id = p.id.clone();
        let step = |s| backends.before(&id, s);
        step(NewStep::Lock).await?;
        let lock = p
            .store
            .lock(&id)
            .await
            .map_err(|e| Error::storage(&id, "lock", e))?;
        p.lock = Some(lock);

        step(NewStep::CreateHypervisor).await?;
        let hv = backends.attach_hypervisor(state.hypervisor).await?;
        p.hypervisor = Some(hv.clone());

        step(NewStep::StartProxy).await?;
        let proxy = backends.proxy(state.config.proxy);
        p.proxy = Some(proxy.clone());
        start_proxy(&id, hv.as_ref(), proxy.as_ref()).await?;

        step(NewStep::CreateAgent).await?;
        let url = running_agent_url(&id, hv.as_ref())?;
        let agent = backends.agent(&id, &url, &state.config.agent)?;
        p.agent = Some(agent.clone());

        step(NewStep::CheckAgent).await?;
        let status = hv.status().await.map_err(|e| Error::hv(&id, "status", e))?;
        if status == VmStatus::Running {
            wait_ready(
                &id,
                agent.as_ref(),
                hv.as_ref(),
                state.config.agent.ready_timeout,
            )
            .await?;
        } else {
            debug!(?status, "guest not running: agent check skipped");
        }

        step(NewStep::SaveState).await?;
        let dir = state.config.vm_dir(&id);
        let inner = Inner {
            ownership: Ownership::Stopped,
            vcpus: state.vcpus,
            memory_mib: state.memory_mib,
            cpu_delta: state.cpu_delta,
            mounts: state.mounts.clone(),
            links: Vec::new(),
            containers: std::collections::BTreeMap::new(),
        };
        p.network = state.network.clone();
        let vm = Self::assemble(p, state.config, dir, url, inner)?;
        vm.save_state(&*vm.inner.lock().await).await?;
        Ok(vm)
    }

    /// The wire form of the running VM, without giving it up. Another handle can only attach
    /// once this one has [`detach`](Vm::detach)ed; prefer `detach`, which returns the same.
    pub async fn to_wire(&self) -> Result<Vec<u8>> {
        let inner = self.owned().await?;
        self.state(&inner).await.to_wire()
    }

    /// Hands the VM over: stops the proxy, disconnects the agent, releases the hypervisor
    /// without stopping it, saves the state, releases the storage lock, and returns the wire
    /// form for [`Vm::from_wire`]. This handle is unusable afterwards.
    pub async fn detach(&self) -> Result<Vec<u8>> {
        let mut inner = self.owned().await?;
        let span = info_span!("vm", vm = %self.id);
        async {
            self.proxy.stop().await;
            if let Err(e) = self.agent.disconnect().await {
                debug!(error = %e, "agent disconnect during detach");
            }
            let hv = self
                .hypervisor
                .detach()
                .await
                .map_err(|e| Error::hv(&self.id, "detach", e))?;
            let state = VmState {
                hypervisor: hv,
                ..self.state(&inner).await
            };
            // The hypervisor is released: from here on the wire form must reach the caller.
            if let Err(e) = self.store.save_state(&self.id, &state).await {
                warn!(error = %e, "saving state on detach failed");
            }
            inner.ownership = Ownership::Detached;
            info!("VM detached");
            state.to_wire()
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeBackends;
    use vmfactory_hypervisor::FakeCall;

    #[tokio::test]
    async fn detach_and_reattach_from_the_wire_form() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        assert_eq!(vm.add_cpus(1).await.expect("cpu"), 1);
        assert_eq!(vm.add_memory(128).await.expect("mem"), 128);
        let snapshot = VmState::from_wire(&vm.to_wire().await.expect("wire")).expect("decode");
        assert_eq!(snapshot.id, vm.id());

        // The owner still holds the lock: attaching fails and leaves the VM alone.
        assert!(matches!(
            Vm::from_wire_with(&vm.to_wire().await.expect("wire"), &h).await,
            Err(Error::Storage { op: "lock", .. })
        ));
        let bytes = vm.detach().await.expect("detach");
        assert!(h.last_hv().calls().contains(&FakeCall::Detach));
        assert!(!h.proxy_running());
        assert!(matches!(
            vm.add_cpus(1).await,
            Err(Error::NotOwned {
                state: "detached",
                ..
            })
        ));
        assert!(matches!(vm.stop().await, Err(Error::NotOwned { .. })));
        assert!(vm.dir().is_dir(), "detaching keeps the storage");

        let vm2 = Vm::from_wire_with(&bytes, &h).await.expect("attach");
        assert_eq!(vm2.id(), vm.id());
        assert_eq!(vm2.dir(), vm.dir());
        let st = vm2.status().await.expect("status");
        assert_eq!((st.vcpus, st.memory_mib, st.cpu_delta), (2, 384, 1));
        assert!(h.proxy_running());
        vm2.online_cpu_memory().await.expect("online");
        vm2.stop().await.expect("stop");
        h.assert_nothing_left().await;
    }

    #[tokio::test]
    async fn failed_reattach_releases_the_vm_for_another_try() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let bytes = vm.detach().await.expect("detach");
        h.last_agent().fail("check");
        assert!(matches!(
            Vm::from_wire_with(&bytes, &h).await,
            Err(Error::AgentNotReady { .. })
        ));
        let calls = h.last_hv().calls();
        assert!(calls.contains(&FakeCall::Detach) && !calls.contains(&FakeCall::Stop));
        assert!(!h.proxy_running());
        assert!(vm.dir().is_dir());
        h.last_agent().heal("check");
        let vm2 = Vm::from_wire_with(&bytes, &h).await.expect("second try");
        vm2.stop().await.expect("stop");
        h.assert_nothing_left().await;

        // Its storage is gone now: the old bytes are refused.
        assert!(matches!(
            Vm::from_wire_with(&bytes, &h).await,
            Err(Error::Storage { op: "lock", .. })
        ));
        assert!(matches!(
            Vm::from_wire_with(b"{", &h).await,
            Err(Error::Wire(_))
        ));
    }
}
