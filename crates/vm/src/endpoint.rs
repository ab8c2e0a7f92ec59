//! The one conversion between the hypervisor's and the agent's view of the agent's address
//! (neither leaf crate knows the other's type).

use vmfactory_agent::AgentUrl;
use vmfactory_hypervisor::AgentEndpoint;

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
            (AgentChannel::Vsock { guest_cid: 5 }, "vsock://5:1024"),
            (
                AgentChannel::HybridVsock {
                    backend: "/bin/vhost-device-vsock".into(),
                    guest_cid: 3,
                },
                "hvsock:///run/vc/vm/a:b/vm.vsock:1024",
            ),
        ] {
            let url = agent_url(&agent_endpoint(&channel, &paths));
            assert_eq!(url.to_string(), text);
            assert_eq!(AgentUrl::parse(text).ok(), Some(url));
        }
    }
}
