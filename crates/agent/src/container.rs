//! Request and answer types of the container calls (Kata's `CreateContainer` family): an OCI
//! container in the guest, its root an overlay of a hot-plugged read-only image and a tmpfs.
//!
//! [`ContainerSpec`] is the part of an OCI runtime spec the guest agent acts on; the host
//! converts its `oci_spec` value into one (in `vmfactory-vm`), the wire form is Kata's
//! `oci.Spec` subset (`protos/oci.proto`).

use std::collections::BTreeMap;

use crate::workload::ProcessSpec;

/// The OCI spec of a container, as far as the guest agent acts on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    /// The OCI runtime spec version (`1.0.2`).
    pub version: String,
    /// The init process; its `container_id` is ignored (the request names the container).
    pub process: ProcessSpec,
    /// Resource limits of the init process (and what it starts).
    pub rlimits: Vec<Rlimit>,
    /// Sets `PR_SET_NO_NEW_PRIVS` before exec.
    pub no_new_privileges: bool,
    /// The root's path as the bundle names it; must be absolute or empty (the guest mounts
    /// the root itself, so the value is only checked).
    pub root_path: String,
    /// Remount the root read-only before the process runs.
    pub root_readonly: bool,
    /// The container's host name (its own UTS namespace); empty keeps the VM's.
    pub hostname: String,
    /// Mounts made inside the root, in order.
    pub mounts: Vec<Mount>,
    /// Annotations (kept, not acted on).
    pub annotations: BTreeMap<String, String>,
    /// Namespaces to create: `pid`, `mount`, `uts`, `ipc` are created; `network` and
    /// `cgroup` are accepted and shared with the VM; others are refused.
    pub namespaces: Vec<Namespace>,
    /// Paths hidden from the container (a read-only empty mount over them).
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
    /// Kernel parameters set in the container's namespaces (`/proc/sys` names, dotted).
    pub sysctl: BTreeMap<String, String>,
}

/// One OCI `rlimits` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, …
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// One OCI `mounts` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Mount {
    /// Absolute path in the container.
    pub destination: String,
    /// A file system's source (`proc`, `tmpfs`) or, for a bind mount, a guest path.
    pub source: String,
    /// File system type; `bind` (or a `bind`/`rbind` option) for bind mounts.
    pub kind: String,
    /// Mount options (`nosuid`, `ro`, `mode=755`, `rbind`, …).
    pub options: Vec<String>,
}

/// One OCI `linux.namespaces` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    /// `pid`, `mount`, `uts`, `ipc`, `network`, `cgroup`, `user`.
    pub kind: String,
    /// A namespace to join instead; joining is not supported (must be empty).
    pub path: String,
}

/// What `StatsContainer` reports of a container's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContainerStats {
    /// CPU time used, in nanoseconds (`cpu.stat` `usage_usec`).
    pub cpu_usage_ns: u64,
    /// Memory in use now (`memory.current`).
    pub memory_usage_bytes: u64,
    /// Memory limit (`memory.max`); `u64::MAX` when unlimited.
    pub memory_limit_bytes: u64,
    /// Processes (`pids.current`).
    pub pids: u64,
}
