//! Every section and key the configuration file may hold, ours and Kata's: one list per
//! section, so a new key is one line here (and one field in the section's struct). Kata's keys
//! come from its `configuration-qemu.toml.in` (1.x `cli/config/`, 2.x and 3.x
//! `src/runtime/config/`); docs/configuration.md has the same table for people.

use std::path::PathBuf;

use serde::de::DeserializeOwned;
use vmfactory_hypervisor::{Accel, MachineType};
use vmfactory_proxy::ProxyKind;

use super::ChannelName;

/// Whether a value has the type its field deserializes from (the field's own type, so the
/// two cannot drift).
pub(super) type Check = fn(toml::Value) -> Result<(), toml::de::Error>;

fn ty<T: DeserializeOwned>(v: toml::Value) -> Result<(), toml::de::Error> {
    T::deserialize(v).map(drop)
}

/// What a key is to us.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// Read (ours, or Kata's under the same name and meaning).
    Read(Check),
    /// Kata's key in Kata's unit: read as our key `ours`, its value times `factor`.
    Scaled { ours: &'static str, factor: u64 },
    /// Kata's key, not supported: ignored with a warning naming what does the job here.
    Use(&'static str),
    /// Kata's key, ignored with a warning: why it has no equivalent here.
    Ignored(&'static str),
}

/// A section: its name as written, the section of ours its keys go to (`None`: Kata's only,
/// every key ignored) and its keys.
#[derive(Debug)]
pub(super) struct Section {
    pub name: &'static str,
    pub into: Option<&'static str>,
    pub keys: &'static [&'static [(&'static str, Kind)]],
}

impl Section {
    /// What `key` is here, if anything, with the key's name as listed.
    pub fn kind(&self, key: &str) -> Option<(&'static str, Kind)> {
        self.keys
            .iter()
            .flat_map(|k| k.iter())
            .find(|(name, _)| *name == key)
            .copied()
    }

    /// Every key name, for "did you mean".
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.keys
            .iter()
            .flat_map(|k| k.iter())
            .map(|(name, _)| *name)
    }
}

/// The section called `name`.
pub(super) fn section(name: &str) -> Option<&'static Section> {
    SECTIONS.iter().find(|s| s.name == name)
}

/// Whether `name` is the first part of a section's dotted name (`hypervisor`, `shim`).
pub(super) fn is_prefix(name: &str) -> bool {
    SECTIONS.iter().any(|s| {
        s.name
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The keys a file must set: (section, key).
pub(super) const REQUIRED: &[(&str, &str)] = &[("hypervisor.qemu", "kernel")];

pub(super) const SECTIONS: &[Section] = &[
    Section {
        name: "hypervisor.qemu",
        into: Some("hypervisor.qemu"),
        keys: &[QEMU, KATA_QEMU],
    },
    Section {
        name: "agent",
        into: Some("agent"),
        keys: &[AGENT],
    },
    // Kata's name of the agent section: ours, plus Kata's keys.
    Section {
        name: "agent.kata",
        into: Some("agent"),
        keys: &[AGENT, KATA_AGENT],
    },
    Section {
        name: "proxy",
        into: Some("proxy"),
        keys: &[&[("kind", Kind::Read(ty::<ProxyKind>))]],
    },
    Section {
        name: "proxy.kata",
        into: None,
        keys: &[KATA_PROXY],
    },
    Section {
        name: "shim.kata",
        into: None,
        keys: &[KATA_SHIM],
    },
    Section {
        name: "netmon",
        into: None,
        keys: &[KATA_NETMON],
    },
    Section {
        name: "factory",
        into: Some("factory"),
        keys: &[FACTORY],
    },
    Section {
        name: "runtime",
        into: Some("runtime"),
        keys: &[&[("run_root", Kind::Read(ty::<PathBuf>))], KATA_RUNTIME],
    },
    Section {
        name: "network",
        into: Some("network"),
        keys: &[&[
            ("enable", Kind::Read(ty::<bool>)),
            ("subnet", Kind::Read(ty::<vmfactory_net::ipnet::Ipv4Net>)),
            ("egress", Kind::Read(ty::<bool>)),
        ]],
    },
];

/// `[hypervisor.qemu]`: ours, Kata's names where they overlap. `default_vcpus` is signed and
/// `default_maxvcpus`/`default_maxmemory` take 0, as in Kata (see `resolve`).
const QEMU: &[(&str, Kind)] = &[
    ("path", Kind::Read(ty::<PathBuf>)),
    ("kernel", Kind::Read(ty::<PathBuf>)),
    ("initrd", Kind::Read(ty::<PathBuf>)),
    ("image", Kind::Read(ty::<PathBuf>)),
    ("kernel_params", Kind::Read(ty::<String>)),
    ("default_vcpus", Kind::Read(ty::<i32>)),
    ("default_maxvcpus", Kind::Read(ty::<u32>)),
    ("default_memory", Kind::Read(ty::<u64>)),
    ("memory_slots", Kind::Read(ty::<u32>)),
    ("default_maxmemory", Kind::Read(ty::<u64>)),
    ("machine_type", Kind::Read(ty::<MachineType>)),
    ("accel", Kind::Read(ty::<Accel>)),
    ("cpu_model", Kind::Read(ty::<String>)),
    ("agent_channel", Kind::Read(ty::<ChannelName>)),
    ("guest_cid", Kind::Read(ty::<u32>)),
    ("vhost_device_vsock", Kind::Read(ty::<PathBuf>)),
    ("tcg_tb_size", Kind::Read(ty::<u32>)),
    ("disk_slots", Kind::Read(ty::<u32>)),
    ("machine_accelerators", Kind::Read(ty::<String>)),
    ("clone_thp", Kind::Read(ty::<bool>)),
    ("disable_vhost_net", Kind::Read(ty::<bool>)),
    ("vmgenid", Kind::Read(ty::<bool>)),
];

const NO_ROOTFS: &str = "no container rootfs or volume is handed to the VM (`run --disk` \
                         hot-plugs virtio-blk disks)";
const NO_SHARED_FS: &str = "no host directory is shared with the guest (`run --copy` copies \
                            files in)";
const NO_ANNOTATIONS: &str = "vmfactory reads no OCI annotations";
const NO_VFIO: &str = "no device pass-through";
const PLAIN_RAM: &str = "guest RAM is plain anonymous memory, grown by hot-plugged DIMMs \
                         (memory_slots)";

/// Kata's `[hypervisor.qemu]` keys we do not read (1.x to 3.x).
const KATA_QEMU: &[(&str, Kind)] = &[
    ("use_vsock", Kind::Use("agent_channel = \"vsock\"")),
    (
        "cpu_features",
        Kind::Use("cpu_model, with `,feature` parts (\"host,pmu=off\")"),
    ),
    (
        "pcie_root_port",
        Kind::Use("disk_slots (one pcie-root-port per hot-pluggable disk)"),
    ),
    ("enable_template", Kind::Use("[factory] enable_template")),
    (
        "disable_nesting_checks",
        Kind::Use("accel (`auto` probes KVM with a boot)"),
    ),
    (
        "enable_debug",
        Kind::Use("RUST_LOG=debug; the guest console is logged by [proxy] kind = \"builtin\""),
    ),
    (
        "extra_monitor_socket",
        Kind::Use("each VM's QMP socket, <run_root>/vm/<id>/qmp.sock"),
    ),
    (
        "enable_hugepages",
        Kind::Use("clone_thp (transparent huge pages for clones' QEMUs)"),
    ),
    (
        "firmware",
        Kind::Ignored("guests boot with -kernel on QEMU's own firmware"),
    ),
    (
        "firmware_volume",
        Kind::Ignored("guests boot with -kernel on QEMU's own firmware"),
    ),
    (
        "pflashes",
        Kind::Ignored("guests boot with -kernel on QEMU's own firmware"),
    ),
    (
        "rootfs_type",
        Kind::Ignored("the guest runs from its initrd or image as built"),
    ),
    (
        "confidential_guest",
        Kind::Ignored("no confidential guests"),
    ),
    ("sev_snp_guest", Kind::Ignored("no confidential guests")),
    (
        "rootless",
        Kind::Ignored("QEMU runs as the user running vmfactory"),
    ),
    ("enable_annotations", Kind::Ignored(NO_ANNOTATIONS)),
    ("valid_hypervisor_paths", Kind::Ignored(NO_ANNOTATIONS)),
    (
        "valid_virtio_fs_daemon_paths",
        Kind::Ignored(NO_ANNOTATIONS),
    ),
    (
        "valid_vhost_user_store_paths",
        Kind::Ignored(NO_ANNOTATIONS),
    ),
    ("valid_file_mem_backends", Kind::Ignored(NO_ANNOTATIONS)),
    ("valid_entropy_sources", Kind::Ignored(NO_ANNOTATIONS)),
    (
        "seccompsandbox",
        Kind::Ignored("QEMU runs without -sandbox"),
    ),
    (
        "default_bridges",
        Kind::Ignored("q35 hot-plugs into pcie-root-ports (disk_slots), not PCI bridges"),
    ),
    ("memory_offset", Kind::Ignored("no NVDIMM devices")),
    ("enable_virtio_mem", Kind::Ignored(PLAIN_RAM)),
    ("enable_mem_prealloc", Kind::Ignored(PLAIN_RAM)),
    ("enable_swap", Kind::Ignored(PLAIN_RAM)),
    ("enable_guest_swap", Kind::Ignored(PLAIN_RAM)),
    ("reclaim_guest_freed_memory", Kind::Ignored(PLAIN_RAM)),
    (
        "file_mem_backend",
        Kind::Ignored("a template's clones map its memory file; other VMs use anonymous memory"),
    ),
    ("disable_block_device_use", Kind::Ignored(NO_ROOTFS)),
    ("block_device_driver", Kind::Ignored(NO_ROOTFS)),
    ("block_device_aio", Kind::Ignored(NO_ROOTFS)),
    ("block_device_cache_set", Kind::Ignored(NO_ROOTFS)),
    ("block_device_cache_direct", Kind::Ignored(NO_ROOTFS)),
    ("block_device_cache_noflush", Kind::Ignored(NO_ROOTFS)),
    ("enable_iothreads", Kind::Ignored(NO_ROOTFS)),
    (
        "disable_image_nvdimm",
        Kind::Ignored("`image` is always virtio-blk /dev/vda"),
    ),
    ("enable_vhost_user_store", Kind::Ignored(NO_ROOTFS)),
    ("vhost_user_store_path", Kind::Ignored(NO_ROOTFS)),
    ("vhost_user_reconnect_timeout_sec", Kind::Ignored(NO_ROOTFS)),
    ("shared_fs", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_daemon", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_cache_size", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_queue_size", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_extra_args", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_cache", Kind::Ignored(NO_SHARED_FS)),
    ("virtio_fs_inode_file_handles", Kind::Ignored(NO_SHARED_FS)),
    ("msize_9p", Kind::Ignored(NO_SHARED_FS)),
    ("enable_iommu", Kind::Ignored("no vIOMMU")),
    ("enable_iommu_platform", Kind::Ignored("no vIOMMU")),
    ("hotplug_vfio_on_root_bus", Kind::Ignored(NO_VFIO)),
    ("hot_plug_vfio", Kind::Ignored(NO_VFIO)),
    ("cold_plug_vfio", Kind::Ignored(NO_VFIO)),
    (
        "entropy_source",
        Kind::Ignored("the guest has no virtio-rng; `get` reseeds each clone's CRNG"),
    ),
    (
        "guest_hook_path",
        Kind::Ignored("no OCI hooks run in the guest"),
    ),
    (
        "rx_rate_limiter_max_rate",
        Kind::Ignored("no rate limit on a VM's NIC"),
    ),
    (
        "tx_rate_limiter_max_rate",
        Kind::Ignored("no rate limit on a VM's NIC"),
    ),
    (
        "guest_memory_dump_path",
        Kind::Ignored("no guest memory dump on a guest panic"),
    ),
    (
        "guest_memory_dump_paging",
        Kind::Ignored("no guest memory dump on a guest panic"),
    ),
    (
        "use_legacy_serial",
        Kind::Ignored("the guest console is always the serial port ttyS0"),
    ),
    (
        "disable_selinux",
        Kind::Ignored("vmfactory applies no SELinux labels"),
    ),
    (
        "disable_guest_selinux",
        Kind::Ignored("vmfactory applies no SELinux labels"),
    ),
];

/// `[agent]` (also read in `[agent.kata]`).
const AGENT: &[(&str, Kind)] = &[
    ("dial_timeout_ms", Kind::Read(ty::<u64>)),
    ("call_timeout_ms", Kind::Read(ty::<u64>)),
    ("ready_timeout_ms", Kind::Read(ty::<u64>)),
];

/// Kata's `[agent.kata]` keys.
const KATA_AGENT: &[(&str, Kind)] = &[
    // Kata: "Agent connection dialing timeout value in seconds".
    (
        "dial_timeout",
        Kind::Scaled {
            ours: "dial_timeout_ms",
            factor: 1000,
        },
    ),
    (
        "enable_debug",
        Kind::Use("RUST_LOG=debug (the guest agent logs to the console)"),
    ),
    (
        "enable_tracing",
        Kind::Use("RUST_LOG and --log-format json (tracing spans per VM)"),
    ),
    ("trace_mode", Kind::Ignored("the guest agent is not traced")),
    ("trace_type", Kind::Ignored("the guest agent is not traced")),
    (
        "kernel_modules",
        Kind::Ignored("the guest agent loads no kernel modules"),
    ),
    (
        "debug_console_enabled",
        Kind::Use("`vmfactory run` and `exec` run commands in a VM"),
    ),
    (
        "container_pipe_size",
        Kind::Ignored(
            "the guest agent reads a container's output only when asked (no pipe to size)",
        ),
    ),
    ("cdh_api_timeout", Kind::Ignored("no confidential data hub")),
];

const NO_PROXY: &str = "no separate proxy process; [proxy] kind picks the console logger";
const KATA_PROXY: &[(&str, Kind)] = &[
    ("path", Kind::Ignored(NO_PROXY)),
    ("enable_debug", Kind::Ignored(NO_PROXY)),
];

const NO_SHIM: &str =
    "containerd finds containerd-shim-vmfactory-v2 on its PATH (`vmfactory containerd install`)";
const KATA_SHIM: &[(&str, Kind)] = &[
    ("path", Kind::Ignored(NO_SHIM)),
    ("enable_debug", Kind::Ignored(NO_SHIM)),
    ("enable_tracing", Kind::Ignored(NO_SHIM)),
];

const NO_NETMON: &str = "no netmon: [network] gives each VM its own namespace and address";
const KATA_NETMON: &[(&str, Kind)] = &[
    ("enable_netmon", Kind::Ignored(NO_NETMON)),
    ("path", Kind::Ignored(NO_NETMON)),
    ("enable_debug", Kind::Ignored(NO_NETMON)),
];

/// `[factory]`: Kata's four keys plus ours.
const FACTORY: &[(&str, Kind)] = &[
    ("enable_template", Kind::Read(ty::<bool>)),
    ("template_path", Kind::Read(ty::<PathBuf>)),
    ("vm_cache_number", Kind::Read(ty::<u32>)),
    ("vm_cache_endpoint", Kind::Read(ty::<PathBuf>)),
    ("prestart", Kind::Read(ty::<u32>)),
    ("metrics_address", Kind::Read(ty::<String>)),
];

const NO_CONTAINERS: &str = "containers run with no seccomp, empty-dir or network plugin options";
/// Kata's `[runtime]` keys (vmfactory's only one is `run_root`).
const KATA_RUNTIME: &[(&str, Kind)] = &[
    ("enable_debug", Kind::Use("RUST_LOG=debug")),
    (
        "enable_tracing",
        Kind::Use("RUST_LOG and --log-format json"),
    ),
    (
        "jaeger_endpoint",
        Kind::Ignored("no OpenTelemetry export; logs are tracing events on stderr"),
    ),
    (
        "jaeger_user",
        Kind::Ignored("no OpenTelemetry export; logs are tracing events on stderr"),
    ),
    (
        "jaeger_password",
        Kind::Ignored("no OpenTelemetry export; logs are tracing events on stderr"),
    ),
    (
        "internetworking_model",
        Kind::Use("[network] enable (a namespace, tap and NAT per VM)"),
    ),
    (
        "disable_new_netns",
        Kind::Use("[network] enable = false (no NIC, no namespace)"),
    ),
    ("disable_guest_seccomp", Kind::Ignored(NO_CONTAINERS)),
    (
        "sandbox_cgroup_only",
        Kind::Ignored("vmfactory makes no cgroups"),
    ),
    (
        "static_sandbox_resource_mgmt",
        Kind::Use("`get --vcpus/--memory` hot-plug at hand-out"),
    ),
    (
        "enable_cpu_memory_hotplug",
        Kind::Use("default_maxvcpus, memory_slots and default_maxmemory"),
    ),
    (
        "enable_vcpus_pinning",
        Kind::Ignored("vCPU threads are not pinned"),
    ),
    (
        "guest_selinux_label",
        Kind::Ignored("vmfactory applies no SELinux labels"),
    ),
    ("sandbox_bind_mounts", Kind::Ignored(NO_SHARED_FS)),
    ("vfio_mode", Kind::Ignored(NO_VFIO)),
    ("disable_guest_empty_dir", Kind::Ignored(NO_CONTAINERS)),
    (
        "experimental",
        Kind::Ignored("no experimental features to turn on"),
    ),
    ("enable_pprof", Kind::Ignored("no pprof endpoint")),
    (
        "create_container_timeout",
        Kind::Use("[agent] call_timeout_ms"),
    ),
    ("dan_conf", Kind::Ignored(NO_CONTAINERS)),
];
