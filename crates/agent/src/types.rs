//! The crate's own request and response types, independent of the generated protobuf code.
//! The private `convert` module is the only place that maps them to and from the wire types.

use std::time::{Duration, SystemTime};

/// Serving status reported by `grpc.Health.Check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// The agent did not say (`UNKNOWN`).
    Unknown,
    /// The agent serves requests (`SERVING`).
    Serving,
    /// The agent is up but not serving (`NOT_SERVING`).
    NotServing,
}

/// Versions reported by `grpc.Health.Version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Version of the protocol/ttRPC layer.
    pub grpc_version: String,
    /// Version of the agent.
    pub agent_version: String,
}

/// Request to online hot-plugged CPUs and memory (`OnlineCPUMem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnlineCpuMem {
    /// Wait until all resources are online before answering.
    pub wait: bool,
    /// Number of newly hot-plugged CPUs to online.
    pub nb_cpus: u32,
    /// Online only CPUs, not memory blocks.
    pub cpu_only: bool,
}

/// Details about the agent (`AgentDetails`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentDetails {
    /// Agent version.
    pub version: String,
    /// True when the agent runs as the guest's init (PID 1).
    pub init_daemon: bool,
    /// Device handlers the agent supports.
    pub device_handlers: Vec<String>,
    /// Storage handlers the agent supports.
    pub storage_handlers: Vec<String>,
    /// True when the agent supports seccomp.
    pub supports_seccomp: bool,
}

/// Answer to `GetGuestDetails`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestDetails {
    /// Size of a hot-pluggable memory block, in bytes (0 if not asked or unknown).
    pub mem_block_size_bytes: u64,
    /// Details about the agent, if it sent them.
    pub agent_details: Option<AgentDetails>,
    /// True when the guest supports memory hotplug by probe.
    pub support_mem_hotplug_probe: bool,
}

/// Online CPUs and memory of a guest, from the diagnostics service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    /// Online CPU ids, ascending.
    pub online_cpus: Vec<u32>,
    /// Present but offline CPU ids, ascending.
    pub offline_cpus: Vec<u32>,
    /// `MemTotal` of `/proc/meminfo`, in KiB.
    pub mem_total_kb: u64,
    /// Number of online memory blocks.
    pub online_memory_blocks: u32,
    /// Number of offline memory blocks.
    pub offline_memory_blocks: u32,
    /// Memory block size in bytes (0 when the guest has no memory hotplug support).
    pub memory_block_size_bytes: u64,
}

impl Resources {
    /// Number of online CPUs.
    pub fn online_cpu_count(&self) -> usize {
        self.online_cpus.len()
    }
}

/// Uptimes reported by the diagnostics service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Uptime {
    /// Time since the agent process started.
    pub agent: Duration,
    /// The guest's `/proc/uptime`.
    pub system: Duration,
}

/// Whether a template's clones reseed their CRNG themselves: the answer to `PrepareTemplate`
/// (ours), asked of the template VM just before it is saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkReseed {
    /// The guest kernel reseeds on the new VM generation id each clone resumes with, and the
    /// agent of each clone holds `SetGuestDateTime`, `ExecProcess` and `GetRandom` until it
    /// has: the host may leave out `ReseedRandomDev` for clones.
    Active,
    /// It does not; the reason, as the guest (or the host, for an agent without the call)
    /// gave it. Clones need `ReseedRandomDev`.
    Inactive(String),
}

impl ForkReseed {
    /// Whether clones reseed themselves.
    pub fn is_active(&self) -> bool {
        matches!(self, Self::Active)
    }
}

/// Converts a time to (seconds, microseconds) since the epoch, as `SetGuestDateTime` wants.
/// Times before the epoch are negative.
pub fn to_sec_usec(t: SystemTime) -> (i64, i64) {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            i64::from(d.subsec_micros()),
        ),
        Err(e) => {
            let d = e.duration();
            let micros = i64::from(d.subsec_micros());
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            if micros == 0 {
                (-secs, 0)
            } else {
                (-secs - 1, 1_000_000 - micros)
            }
        }
    }
}

/// Converts (seconds, nanoseconds) since the epoch to a time; `None` if out of range.
pub fn from_sec_nsec(sec: i64, nsec: u32) -> Option<SystemTime> {
    if nsec >= 1_000_000_000 {
        return None;
    }
    if sec >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(sec.unsigned_abs(), nsec))
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(sec.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nsec)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sec_usec_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000);
        assert_eq!(to_sec_usec(t), (1_700_000_000, 123_456));
        assert_eq!(from_sec_nsec(1_700_000_000, 123_456_000), Some(t));
    }

    #[test]
    fn before_epoch() {
        let t = SystemTime::UNIX_EPOCH - Duration::new(1, 250_000_000);
        assert_eq!(to_sec_usec(t), (-2, 750_000));
        assert_eq!(from_sec_nsec(-2, 750_000_000), Some(t));
    }

    #[test]
    fn bad_nsec_rejected() {
        assert_eq!(from_sec_nsec(0, 1_000_000_000), None);
    }
}
