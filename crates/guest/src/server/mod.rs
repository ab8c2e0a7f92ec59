//! The guest agent's ttRPC server: `grpc.Health`, `grpc.AgentService` and
//! `vmfactory.diag.Diagnostics`, served on the virtio-serial port `agent.channel.0`, on vsock
//! port 1024, or on any [`Listener`] (tests use unix sockets, socketpairs and ptys).
//!
//! The services only touch the guest through [`GuestPaths`], [`GuestClock`] and
//! [`GuestNetwork`], so tests run them in-process against a fake sysfs tree, a fake clock and
//! a fake (or namespaced) network.

mod accept;
mod cgroup;
mod config;
pub mod containers;
mod files;
pub mod fork;
pub mod net;
mod netlink;
mod nsexec;
mod ocispec;
pub mod process;
pub mod reaper;
mod rpc_status;
mod serial;
mod service;
pub mod storage;
pub mod sysfs;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use ttrpc::asynchronous::transport::Listener;
use ttrpc::r#async::{Server, Service};
use vmfactory_agent::channel::listening_line;
use vmfactory_agent::protocols::{
    agent_ttrpc, diag_ttrpc, health_ttrpc, template_ttrpc, workload_ttrpc,
};

use crate::console::console_line;
use crate::error::{Error, Result};

pub use config::{GuestClock, GuestConfig, SystemClock};
pub use net::{GuestNetwork, NetError, Netlink};
pub use serial::{serial_listener, FdStream, PortOpener, SerialConn};
pub use service::GuestAgent;
pub use sysfs::GuestPaths;

/// The ttRPC service map of all five services, ready for [`Server::register_service`].
pub fn services(agent: Arc<GuestAgent>) -> HashMap<String, Service> {
    let mut map = health_ttrpc::create_health(agent.clone());
    map.extend(agent_ttrpc::create_agent_service(agent.clone()));
    map.extend(diag_ttrpc::create_diagnostics(agent.clone()));
    map.extend(workload_ttrpc::create_workload(agent.clone()));
    map.extend(template_ttrpc::create_template(agent));
    map
}

/// A running ttRPC server; dropping it stops accepting and closes its connections.
pub struct AgentServer {
    server: Server,
}

impl fmt::Debug for AgentServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentServer").finish_non_exhaustive()
    }
}

impl AgentServer {
    /// Starts serving all three services on `listener` (in background tasks).
    pub async fn start(agent: Arc<GuestAgent>, listener: Listener) -> Result<Self> {
        let mut server = Server::new()
            .add_listener(listener)
            .register_service(services(agent));
        server
            .start()
            .await
            .map_err(|source| Error::Start { source })?;
        Ok(AgentServer { server })
    }

    /// Starts serving on a new unix socket at `path`.
    pub async fn bind_unix(agent: Arc<GuestAgent>, path: &Path) -> Result<Self> {
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(|e| Error::io("bind", path.display(), e))?;
        Self::start(agent, accept::keep_accepting(listener, "unix")).await
    }

    /// Stops accepting and closes all connections.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown().await;
    }
}

/// Serves on a unix socket at `path` until the task is dropped (host testing).
pub async fn serve_unix(cfg: GuestConfig, path: &Path) -> Result<()> {
    let _server = AgentServer::bind_unix(Arc::new(GuestAgent::new(cfg)), path).await?;
    info!(path = %path.display(), "serving on unix socket");
    std::future::pending::<()>().await;
    Ok(())
}

/// Serves inside the guest: on vsock (if the guest has it) and on the virtio-serial port, and
/// never returns unless neither can be served.
pub async fn serve_guest(cfg: GuestConfig) -> Result<()> {
    let agent = Arc::new(GuestAgent::new(cfg.clone()));
    let vsock = match cfg.vsock_port {
        Some(port) => match vsock_listener(port) {
            Ok(l) => {
                let server = AgentServer::start(agent.clone(), l).await?;
                console_line(&listening_line(&format!("vsock port {port}")));
                Some(server)
            }
            Err(e) => {
                info!(error = %e, "no vsock");
                None
            }
        },
        None => None,
    };
    let port = match wait_for_port(&cfg).await {
        Ok(p) => p,
        Err(e) if vsock.is_some() => {
            warn!(error = %e, "serving on vsock only");
            std::future::pending::<()>().await;
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    info!(device = %port.display(), "found agent port");
    let label = cfg.port_name.clone();
    let listener = serial_listener(PortOpener::device(port), label);
    let _serial = AgentServer::start(agent, Listener::new(listener)).await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// A listener on vsock `port` of any CID: a clone of a template takes a new CID (the guest
/// driver re-reads it on the transport reset) and this listener, bound to none, serves on.
fn vsock_listener(port: u32) -> std::io::Result<Listener> {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    let listener = tokio_vsock::VsockListener::bind(addr)?;
    Ok(accept::keep_accepting(listener, "vsock"))
}

/// Polls sysfs for the agent port: the port's name arrives from the host some time after the
/// virtio_console driver probed, and there is no udev here to tell us.
async fn wait_for_port(cfg: &GuestConfig) -> Result<PathBuf> {
    let deadline = tokio::time::Instant::now() + cfg.port_timeout;
    loop {
        let paths = cfg.paths.clone();
        let name = cfg.port_name.clone();
        let found = tokio::task::spawn_blocking(move || sysfs::find_virtio_port(&paths, &name))
            .await
            .map_err(|e| Error::io("scan", "virtio ports", std::io::Error::other(e)))?;
        match found {
            Ok(p) => return Ok(p),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
