//! [`AgentEndpoint`]: where the host reaches the guest agent, as the command line set it up.

use std::path::PathBuf;

/// Where the guest agent listens, on the host side of the VM's agent channel. Derived from the
/// config's [`crate::AgentChannel`] and the run directory ([`crate::cmdline::agent_endpoint`]);
/// the `agent` crate's own URL type is built from it by the `vm` crate, so this crate does not
/// depend on the agent's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentEndpoint {
    /// The unix socket of the virtio-serial port's chardev (QEMU listens on it).
    VirtioSerial {
        /// The chardev's socket.
        path: PathBuf,
    },
    /// A vhost-vsock guest address.
    Vsock {
        /// The guest context id.
        cid: u32,
        /// The vsock port the agent listens on.
        port: u32,
    },
    /// The `vhost-device-vsock` backend's unix socket, which forwards a connection to a guest
    /// port after `CONNECT <port>\n`.
    HybridVsock {
        /// The backend's socket.
        path: PathBuf,
        /// The vsock port the agent listens on.
        port: u32,
    },
}
