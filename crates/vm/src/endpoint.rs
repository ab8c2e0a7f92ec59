//! The one conversion between the hypervisor's and the agent's view of the agent's address
//! (neither leaf crate knows the other's type).

use vmfactory_agent::AgentUrl;
use vmfactory_hypervisor::{AgentEndpoint, Hypervisor};

use crate::error::{Error, Result};

/// The URL the agent client dials to reach the agent at `endpoint`.
pub fn agent_url(endpoint: &AgentEndpoint) -> AgentUrl {
    match endpoint {
        AgentEndpoint::VirtioSerial { path } => AgentUrl::Serial { path: path.clone() },
        AgentEndpoint::Vsock { cid, port } => AgentUrl::Vsock {
            cid: *cid,
            port: *port,
        },
        AgentEndpoint::HybridVsock { path, port } => AgentUrl::Hvsock {
            path: path.clone(),
            port: *port,
        },
    }
}

/// The URL of the agent of VM `id`, whose hypervisor `hv` runs: a started or re-attached
/// hypervisor always has an endpoint (a vsock VM's CID is reserved by its start).
pub(crate) fn running_agent_url(id: &str, hv: &dyn Hypervisor) -> Result<AgentUrl> {
    let endpoint = hv.agent_endpoint().ok_or_else(|| {
        let not_running = vmfactory_hypervisor::Error::NotRunning { id: id.to_owned() };
        Error::hv(id, "agent endpoint", not_running)
    })?;
    Ok(agent_url(&endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_hypervisor::cmdline::agent_endpoint;
    use vmfactory_hypervisor::{AgentChannel, RunPaths};

    #[test]
    fn each_channel_maps_to_its_url_and_the_text_round_trips() {
        let paths = RunPaths::new("/run/vc/vm/a:b");
        for (channel, text) in [
            (
                AgentChannel::VirtioSerial,
                "serial:///run/vc/vm/a:b/agent.sock",
            ),
            (AgentChannel::Vsock { guest_cid: Some(5) }, "vsock://5:1024"),
            (
                AgentChannel::HybridVsock {
                    backend: "/bin/vhost-device-vsock".into(),
                    guest_cid: 3,
                },
                "hvsock:///run/vc/vm/a:b/vm.vsock:1024",
            ),
        ] {
            let endpoint = agent_endpoint(&channel, &paths, None).expect("known endpoint");
            let url = agent_url(&endpoint);
            assert_eq!(url.to_string(), text);
            assert_eq!(AgentUrl::parse(text).ok(), Some(url));
        }
        // An allocated CID: known once the VM holds one.
        let allocate = AgentChannel::Vsock { guest_cid: None };
        assert_eq!(agent_endpoint(&allocate, &paths, None), None);
        let held = agent_endpoint(&allocate, &paths, Some(81234)).expect("held");
        assert_eq!(agent_url(&held).to_string(), "vsock://81234:1024");
    }
}
