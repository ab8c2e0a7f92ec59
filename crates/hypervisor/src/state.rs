//! The wire form of a running VM ([`QemuState`]) and its run state ([`VmStatus`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cmdline::{agent_endpoint, RunPaths};
use crate::config::{Accel, HypervisorConfig};
use crate::disk::{AttachedDisk, FIRST_DISK_NUMBER};
use crate::endpoint::AgentEndpoint;
use crate::process::is_same;

/// Version of the [`QemuState`] layout; bumped on incompatible changes (2: the config's template
/// role is one typed field instead of two flags and two paths; 3: `vsock_cid`, and a vsock
/// channel's CID is optional in the config).
pub const QEMU_STATE_VERSION: u32 = 3;

/// Everything another process needs to re-attach to a running VM
/// (see [`crate::Qemu::attach`]). Produced by [`crate::Hypervisor::state`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuState {
    /// Layout version ([`QEMU_STATE_VERSION`]).
    pub version: u32,
    /// VM id.
    pub id: String,
    /// The config the VM was started with.
    pub config: HypervisorConfig,
    /// The accelerator it runs with (resolved: `kvm` or `tcg`).
    pub accel: Accel,
    /// Run directory and the sockets and files in it.
    pub paths: RunPaths,
    /// QEMU's pid, while running.
    pub pid: Option<u32>,
    /// QEMU's start time (`/proc/PID/stat` field 22), to detect pid reuse.
    pub pid_start_time: Option<u64>,
    /// The `vhost-device-vsock` backend's pid and start time (hybrid vsock only).
    pub backend: Option<(u32, u64)>,
    /// The guest CID QEMU's vhost-vsock device holds (vsock channel, while running): the
    /// kernel keeps it reserved as long as that QEMU runs.
    pub vsock_cid: Option<u32>,
    /// Whether the run directory was created by this crate (then `stop` removes it if empty).
    pub created_run_dir: bool,
    /// Current vCPUs (boot + hot-added).
    pub vcpus: u32,
    /// Current guest memory in MiB (boot + hot-added).
    pub memory_mib: u64,
    /// Next `cpu-N` device id.
    pub next_cpu_id: u32,
    /// Next `memN` / `dimmN` id.
    pub next_mem_id: u32,
    /// Hot-plugged disks, in the order they were attached.
    ///
    /// This and `next_disk_id` came without a version bump: they are additive and default
    /// to what a state written before them describes (no disks, and no root ports either:
    /// its config reads `disk_slots = 0`); an older build reading a newer state ignores them
    /// (no field here denies unknown ones). The bumps above were for changes an old reader
    /// would misread.
    #[serde(default)]
    pub disks: Vec<AttachedDisk>,
    /// Next `diskN` id.
    #[serde(default = "first_disk_number")]
    pub next_disk_id: u32,
}

/// The serde default of [`QemuState::next_disk_id`].
fn first_disk_number() -> u32 {
    FIRST_DISK_NUMBER
}

impl QemuState {
    /// The run directory.
    pub fn run_dir(&self) -> &std::path::Path {
        &self.paths.dir
    }

    /// The console socket.
    pub fn console_address(&self) -> PathBuf {
        self.paths.console.clone()
    }

    /// Where the agent listens (derived from the config, paths and CID, so it is not stored);
    /// `None` for a vsock VM that holds no CID (not running).
    pub fn agent_endpoint(&self) -> Option<AgentEndpoint> {
        agent_endpoint(&self.config.agent_channel, &self.paths, self.vsock_cid)
    }

    /// Whether the QEMU recorded here still runs: a pid and start time are recorded, and that
    /// pid is alive (not a zombie) and started at that time, so a reused pid does not count.
    /// The same test [`crate::Qemu::attach`] applies; reads `/proc` only, signals nothing.
    pub async fn qemu_alive(&self) -> bool {
        match (self.pid, self.pid_start_time) {
            (Some(pid), Some(start)) => is_same(pid, start).await,
            _ => false,
        }
    }
}

/// A VM's run state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmStatus {
    /// Created, not started.
    NotStarted,
    /// The guest runs.
    Running,
    /// Paused (`stop`, or a clone after incoming migration).
    Paused,
    /// Waiting for incoming migration (a clone before `migrate-incoming` completes).
    InMigrate,
    /// Saved (outgoing migration completed).
    PostMigrate,
    /// Started with `-S`, never run.
    Prelaunch,
    /// The guest shut down.
    Shutdown,
    /// Another QEMU run state, by its QMP name.
    Other(String),
    /// Stopped (or detached) through this handle.
    Stopped,
}

impl VmStatus {
    /// Maps a QMP `RunState` name.
    pub fn from_qmp(name: &str) -> Self {
        match name {
            "running" => Self::Running,
            "paused" => Self::Paused,
            "inmigrate" => Self::InMigrate,
            "postmigrate" => Self::PostMigrate,
            "prelaunch" => Self::Prelaunch,
            "shutdown" => Self::Shutdown,
            other => Self::Other(other.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(VmStatus::from_qmp("running"), VmStatus::Running);
        assert_eq!(VmStatus::from_qmp("paused"), VmStatus::Paused);
        assert_eq!(VmStatus::from_qmp("inmigrate"), VmStatus::InMigrate);
        assert_eq!(
            VmStatus::from_qmp("guest-panicked"),
            VmStatus::Other("guest-panicked".into())
        );
    }

    /// A running VM's state with `config`, `accel` and `vsock_cid`.
    fn state(config: HypervisorConfig, accel: Accel, vsock_cid: Option<u32>) -> QemuState {
        QemuState {
            version: QEMU_STATE_VERSION,
            id: "vm".into(),
            config,
            accel,
            paths: RunPaths::new("/r"),
            pid: Some(42),
            pid_start_time: Some(7),
            backend: None,
            vsock_cid,
            created_run_dir: true,
            vcpus: 1,
            memory_mib: 256,
            next_cpu_id: 1,
            next_mem_id: 1,
            disks: Vec::new(),
            next_disk_id: 1,
        }
    }

    #[test]
    fn state_round_trips() {
        let st = state(HypervisorConfig::new("/k", None), Accel::Tcg, None);
        let json = serde_json::to_string(&st).expect("serialize");
        let back: QemuState = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, st);
        assert_eq!(
            back.agent_endpoint(),
            Some(AgentEndpoint::VirtioSerial {
                path: "/r/agent.sock".into()
            })
        );
        // A state saved while the URL was still stored as well reads the same.
        let mut old: serde_json::Value = serde_json::from_str(&json).expect("json");
        old["agent_url"] = "serial:///r/agent.sock".into();
        let back: QemuState = serde_json::from_value(old).expect("deserialize");
        assert_eq!(back, st);
    }

    #[test]
    fn disks_round_trip_and_old_states_have_none() {
        use crate::disk::{DiskConfig, DiskFormat};
        let mut st = state(HypervisorConfig::new("/k", None), Accel::Tcg, None);
        st.disks.push(AttachedDisk {
            id: "disk1".into(),
            pci_path: "10/00".into(),
            config: DiskConfig::new("/i/a.raw", DiskFormat::Raw),
        });
        st.next_disk_id = 2;
        let json = serde_json::to_value(&st).expect("serialize");
        assert_eq!(
            serde_json::from_value::<QemuState>(json.clone()).expect("de"),
            st
        );
        // A state written before disks: no disks, ids from 1, and a VM without root ports.
        let mut old = json;
        let obj = old.as_object_mut().expect("object");
        obj.remove("disks");
        obj.remove("next_disk_id");
        obj["config"]
            .as_object_mut()
            .expect("config")
            .remove("disk_slots");
        let back: QemuState = serde_json::from_value(old).expect("old state");
        assert!(back.disks.is_empty());
        assert_eq!((back.next_disk_id, back.config.disk_slots), (1, 0));
    }

    #[test]
    fn vsock_state_round_trips_with_its_cid() {
        let mut config = HypervisorConfig::new("/k", None);
        config.agent_channel = crate::AgentChannel::Vsock { guest_cid: None };
        let st = state(config, Accel::Kvm, Some(123_456));
        let json = serde_json::to_string(&st).expect("serialize");
        assert!(
            json.contains(r#""agent_channel":{"kind":"vsock"}"#),
            "{json}"
        );
        assert!(json.contains(r#""vsock_cid":123456"#), "{json}");
        let back: QemuState = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, st);
        assert_eq!(
            back.agent_endpoint(),
            Some(AgentEndpoint::Vsock {
                cid: 123_456,
                port: 1024
            })
        );
        // Not running: no CID held, no endpoint.
        let stopped = QemuState {
            vsock_cid: None,
            ..st
        };
        assert_eq!(stopped.agent_endpoint(), None);
    }

    #[tokio::test]
    async fn qemu_alive_needs_the_same_pid_and_start_time() {
        use crate::process::{proc_stat, ProcStat};
        let me = std::process::id();
        let ProcStat::Alive(start) = proc_stat(me).await else {
            panic!("this process must be alive");
        };
        let mut st = QemuState {
            version: QEMU_STATE_VERSION,
            id: "vm".into(),
            config: HypervisorConfig::new("/k", None),
            accel: Accel::Tcg,
            paths: RunPaths::new("/r"),
            pid: Some(me),
            pid_start_time: Some(start),
            backend: None,
            vsock_cid: None,
            created_run_dir: false,
            vcpus: 1,
            memory_mib: 256,
            next_cpu_id: 1,
            next_mem_id: 1,
            disks: Vec::new(),
            next_disk_id: 1,
        };
        assert!(st.qemu_alive().await);
        // A reused pid (another start time) is not the recorded QEMU.
        st.pid_start_time = Some(start + 1);
        assert!(!st.qemu_alive().await);
        st.pid_start_time = None;
        assert!(!st.qemu_alive().await);
        st.pid = None;
        st.pid_start_time = Some(start);
        assert!(!st.qemu_alive().await);
    }
}
