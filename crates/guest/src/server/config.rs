//! What the guest server serves on and over: [`GuestConfig`] and the injectable [`GuestClock`]
//! (the network's counterpart, [`GuestNetwork`], is in `net.rs`).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::sys::time::TimeSpec;
use nix::time::{clock_settime, ClockId};
use vmfactory_agent::channel::{AGENT_PORT_NAME, AGENT_VSOCK_PORT};

use super::net::{GuestNetwork, Netlink};
use super::sysfs::GuestPaths;
use crate::error::{Error, Result};

/// The guest wall clock, injectable so tests never set the host's clock.
pub trait GuestClock: Send + Sync + fmt::Debug {
    /// Reads the wall clock.
    fn now(&self) -> SystemTime;
    /// Sets the wall clock.
    fn set(&self, t: SystemTime) -> Result<()>;
}

/// The real `CLOCK_REALTIME`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl GuestClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn set(&self, t: SystemTime) -> Result<()> {
        let d = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| Error::Unsupported("setting the clock before 1970"))?;
        clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::from_duration(d))
            .map_err(|e| Error::sys("set", "CLOCK_REALTIME", e))
    }
}

/// Configuration of the guest server.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GuestConfig {
    /// Roots of sysfs, procfs and devtmpfs.
    pub paths: GuestPaths,
    /// The wall clock `SetGuestDateTime` sets and `GetTime` reads.
    pub clock: Arc<dyn GuestClock>,
    /// The links and routes the networking calls configure.
    pub net: Arc<dyn GuestNetwork>,
    /// Name of the virtio-serial port to serve on.
    pub port_name: String,
    /// vsock port to serve on when the guest has vsock (`None`: do not).
    pub vsock_port: Option<u32>,
    /// How long `OnlineCPUMem` waits for hot-plugged CPUs to appear.
    pub online_timeout: Duration,
    /// How long `serve_guest` waits for the virtio port to appear.
    pub port_timeout: Duration,
    /// Reported as `AgentDetails.init_daemon`.
    pub init_daemon: bool,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            paths: GuestPaths::default(),
            clock: Arc::new(SystemClock),
            net: Arc::new(Netlink),
            port_name: AGENT_PORT_NAME.to_owned(),
            vsock_port: Some(AGENT_VSOCK_PORT),
            online_timeout: Duration::from_secs(5),
            port_timeout: Duration::from_secs(10),
            init_daemon: std::process::id() == 1,
        }
    }
}
