//! A VM's network in its lifecycle: made before the hypervisor starts (QEMU's tap lives in
//! it), the guest's NIC addressed once its agent answers (a template's clones keep what the
//! template had), removed after the hypervisor stops, and unpinned wherever a VM's directory
//! is destroyed (orphans too).

use std::net::IpAddr;
use std::path::Path;

use tracing::{debug, warn};
use vmfactory_agent::{Agent, Interface, IpAddress, IpFamily, Route};
use vmfactory_hypervisor::NIC_NETNS;
use vmfactory_net::{mac_string, VmNetwork, GUEST_ADDRESS, GUEST_GATEWAY, GUEST_MAC, GUEST_PREFIX};

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// The guest's NIC, as the agent names it.
pub const GUEST_NIC: &str = "eth0";

fn net_error(id: &str, op: &'static str, source: vmfactory_net::NetError) -> Error {
    Error::Network {
        id: id.to_owned(),
        op,
        source,
    }
}

/// Makes VM `id`'s network, pinned in its directory `dir`, if the config has one.
pub(crate) async fn create(id: &str, config: &VmConfig, dir: &Path) -> Result<Option<VmNetwork>> {
    let Some(cfg) = &config.network else {
        return Ok(None);
    };
    VmNetwork::create(cfg, &dir.join(NIC_NETNS))
        .await
        .map(Some)
        .map_err(|e| net_error(id, "setup", e))
}

/// Gives the guest's NIC its address and default route (Kata's `UpdateInterface` and
/// `UpdateRoutes`); the same in every VM, each in its own namespace.
pub(crate) async fn configure_guest(id: &str, agent: &dyn Agent) -> Result<()> {
    let nic = Interface {
        device: String::new(),
        name: GUEST_NIC.into(),
        ip_addresses: vec![IpAddress::new(IpAddr::V4(GUEST_ADDRESS), GUEST_PREFIX)],
        mtu: 0,
        hw_addr: mac_string(&GUEST_MAC),
    };
    agent
        .update_interface(&nic)
        .await
        .map_err(|e| Error::agent(id, "update_interface", e))?;
    let default = Route {
        dest: String::new(),
        gateway: GUEST_GATEWAY.to_string(),
        device: GUEST_NIC.into(),
        source: String::new(),
        scope: vmfactory_agent::net::SCOPE_UNIVERSE,
        family: IpFamily::V4,
    };
    agent
        .update_routes(&[default])
        .await
        .map_err(|e| Error::agent(id, "update_routes", e))?;
    Ok(())
}

/// Removes VM `id`'s network (its hypervisor has stopped). Failures are logged: the pin is
/// tried again by [`unpin`] when the directory goes.
pub(crate) async fn remove(id: &str, net: &VmNetwork) {
    if let Err(e) = net.remove().await {
        warn!(vm = %id, error = %e, "removing the VM's network failed");
    }
}

/// Unpins whatever network namespace is pinned in VM directory `dir` (before the directory is
/// removed: a mount point cannot be). Nothing there is fine.
pub(crate) async fn unpin(dir: &Path) {
    let pin = dir.join(NIC_NETNS);
    if !tokio::fs::try_exists(&pin).await.unwrap_or(false) {
        return;
    }
    match VmNetwork::remove_pin(&pin).await {
        Ok(()) => debug!(pin = %pin.display(), "network namespace unpinned"),
        Err(e) => warn!(pin = %pin.display(), error = %e, "cannot unpin a network namespace"),
    }
}
