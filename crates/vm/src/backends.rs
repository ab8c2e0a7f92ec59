//! [`Backends`]: how a [`crate::Vm`] gets its hypervisor, agent and proxy. [`QemuBackends`]
//! builds the real ones (QEMU, the Kata agent over ttRPC, [`vmfactory_proxy::new_proxy`]);
//! tests inject fakes and faults through the same trait.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use vmfactory_agent::{Agent, AgentUrl, KataAgent};
use vmfactory_hypervisor::{Hypervisor, HypervisorConfig, Qemu, QemuState};
use vmfactory_proxy::{Proxy, ProxyKind};

use crate::config::VmAgentConfig;
use crate::error::{Error, Result};

/// A step of [`crate::Vm::new`] (and of [`crate::Vm::from_wire`], which runs the steps marked
/// so), in order. [`Backends::before`] is called with each one before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewStep {
    /// Validating the config (also `from_wire`, as decoding).
    Validate,
    /// Creating the storage directory `<run_root>/vm/<id>/`, under a hidden name until locked.
    CreateDir,
    /// Taking the VM's storage lock (also `from_wire`); `new` then moves the directory into
    /// place, so it is never seen unlocked.
    Lock,
    /// Making the VM's network, when its config has one: a namespace pinned in the VM's
    /// directory, with the tap QEMU will use.
    CreateNetwork,
    /// Creating the hypervisor handle (`from_wire`: attaching to the running VM).
    CreateHypervisor,
    /// Pre-starting the hypervisor ([`Vm::prepare_with`](crate::Vm::prepare_with) only).
    PrestartHypervisor,
    /// Starting the hypervisor (each process it spawns records itself in the VM's directory
    /// before it execs).
    StartHypervisor,
    /// Starting the console proxy on the console address (also `from_wire`).
    StartProxy,
    /// Creating the agent client for the hypervisor's agent endpoint (also `from_wire`).
    CreateAgent,
    /// Waiting for the agent's `Check` (skipped for a paused clone; also `from_wire` when the
    /// VM runs).
    CheckAgent,
    /// Addressing the guest's NIC through the agent, when the VM has a network (a template's
    /// clones have the template's address already).
    ConfigureNetwork,
    /// Saving the VM's state in its storage directory (also `from_wire`).
    SaveState,
}

/// Builds a VM's parts. Object safe; [`QemuBackends`] is the real implementation.
#[async_trait]
pub trait Backends: Send + Sync + fmt::Debug {
    /// A stopped hypervisor for VM `id` with `config`, keeping its sockets in `run_dir`.
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> Result<Arc<dyn Hypervisor>>;

    /// A hypervisor re-attached to the running VM `state` describes.
    async fn attach_hypervisor(&self, state: QemuState) -> Result<Arc<dyn Hypervisor>>;

    /// A (not yet connected) agent client of VM `id` dialing `url`.
    fn agent(&self, id: &str, url: &AgentUrl, config: &VmAgentConfig) -> Result<Arc<dyn Agent>>;

    /// A stopped console proxy of `kind`.
    fn proxy(&self, kind: ProxyKind) -> Arc<dyn Proxy>;

    /// Called before each step of `Vm::new` / `Vm::from_wire` for VM `id`; an error aborts the
    /// creation there (and undoes the earlier steps). The default does nothing. Fault-injection
    /// tests use it to fail, or to kill QEMU, at each stage.
    async fn before(&self, id: &str, step: NewStep) -> Result<()> {
        let _ = (id, step);
        Ok(())
    }
}

/// The real parts: [`Qemu`], [`KataAgent`] and [`vmfactory_proxy::new_proxy`].
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuBackends;

#[async_trait]
impl Backends for QemuBackends {
    fn hypervisor(
        &self,
        id: &str,
        config: &HypervisorConfig,
        run_dir: &Path,
    ) -> Result<Arc<dyn Hypervisor>> {
        let qemu =
            Qemu::new(id, config.clone(), run_dir).map_err(|e| Error::hv(id, "create", e))?;
        Ok(Arc::new(qemu))
    }

    async fn attach_hypervisor(&self, state: QemuState) -> Result<Arc<dyn Hypervisor>> {
        let id = state.id.clone();
        let qemu = Qemu::attach(state)
            .await
            .map_err(|e| Error::hv(&id, "attach", e))?;
        Ok(Arc::new(qemu))
    }

    fn agent(&self, _id: &str, url: &AgentUrl, config: &VmAgentConfig) -> Result<Arc<dyn Agent>> {
        Ok(Arc::new(KataAgent::with_config(
            url.clone(),
            config.client_config(),
        )))
    }

    fn proxy(&self, kind: ProxyKind) -> Arc<dyn Proxy> {
        vmfactory_proxy::new_proxy(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn real_backends_build_stopped_parts() {
        let b = QemuBackends;
        let hv = b
            .hypervisor("v", &HypervisorConfig::new("/k", None), Path::new("/r/v"))
            .expect("qemu");
        assert_eq!(hv.pid(), None);
        let url = crate::agent_url(&hv.agent_endpoint().expect("a serial endpoint"));
        assert_eq!(url.to_string(), "serial:///r/v/agent.sock");
        let mut bad = HypervisorConfig::new("/k", None);
        bad.vcpus = 0;
        assert!(matches!(
            b.hypervisor("v", &bad, Path::new("/r/v")),
            Err(Error::Hypervisor { op: "create", .. })
        ));
        let agent = b
            .agent("v", &url, &VmAgentConfig::default())
            .expect("agent");
        let kata = agent
            .as_any()
            .downcast_ref::<KataAgent>()
            .expect("a KataAgent");
        assert_eq!(kata.url(), &url);
        // `agent` takes a typed URL, so one that does not parse cannot reach it.
        assert!(AgentUrl::parse("tcp://x").is_err());
        assert_eq!(b.proxy(ProxyKind::None).kind(), ProxyKind::None);
        b.before("v", NewStep::Lock).await.expect("no-op hook");
    }
}
