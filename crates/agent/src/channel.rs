//! Where the guest agent listens and what it prints on the console: the names the host and the
//! guest agent (`vmfactory-guest`) both rely on.
//!
//! The console lines are the host's only view of the guest before the agent channel is up; the
//! template flow waits for a [`listening_line`] before it saves a template.

/// Name of the virtio-serial port the guest agent serves on.
pub const AGENT_PORT_NAME: &str = "agent.channel.0";

/// vsock port the guest agent serves on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Console line the guest agent prints once its init duties are done.
pub const READY_LINE: &str = "vmfactory-agent: ready";

/// Start of the console line the guest agent prints each time it waits for a host.
pub const LISTENING_PREFIX: &str = "vmfactory-agent: listening on";

/// The console line announcing that the guest agent waits for a host on `endpoint` (a port
/// name, or `vsock port 1024`).
pub fn listening_line(endpoint: &str) -> String {
    format!("{LISTENING_PREFIX} {endpoint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_is_what_the_host_matches() {
        assert_eq!(
            listening_line(AGENT_PORT_NAME),
            "vmfactory-agent: listening on agent.channel.0"
        );
    }
}
