//! The QEMU command line, built from a validated [`HypervisorConfig`] by pure functions.
//!
//! QEMU parses `-object`, `-chardev`, `-drive` and `-qmp` values as comma-separated option lists,
//! so a comma inside a path is written `,,` ([`escape_opt`]). `-kernel`, `-initrd` and `-append`
//! take their value verbatim and are not escaped.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::config::{
    Accel, AgentChannel, HypervisorConfig, MachineType, TemplateRole, AGENT_VSOCK_PORT,
};
use crate::disk::{root_port_id, root_port_slot};
use crate::endpoint::AgentEndpoint;

/// The files and sockets a VM keeps in its run directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunPaths {
    /// The run directory itself.
    pub dir: PathBuf,
    /// QMP socket (`qmp.sock`).
    pub qmp: PathBuf,
    /// Serial console socket (`console.sock`).
    pub console: PathBuf,
    /// Serial console log (`console.log`), written by the console proxy, not QEMU.
    pub console_log: PathBuf,
    /// Virtio-serial agent socket (`agent.sock`).
    pub agent: PathBuf,
    /// vhost-user socket between QEMU and `vhost-device-vsock` (`vhost-user-vsock.sock`).
    pub vhost_user_vsock: PathBuf,
    /// Hybrid-vsock socket the host dials (`vm.vsock`).
    pub hvsock: PathBuf,
    /// QEMU's standard error (`qemu.stderr`).
    pub qemu_stderr: PathBuf,
    /// The vsock backend's standard error (`vsock-backend.stderr`).
    pub backend_stderr: PathBuf,
}

impl RunPaths {
    /// The paths under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        Self {
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
            console_log: dir.join("console.log"),
            agent: dir.join("agent.sock"),
            vhost_user_vsock: dir.join("vhost-user-vsock.sock"),
            hvsock: dir.join("vm.vsock"),
            qemu_stderr: dir.join("qemu.stderr"),
            backend_stderr: dir.join("vsock-backend.stderr"),
            dir,
        }
    }

    /// Every file this crate may create in the run directory (removed on stop).
    pub fn all_files(&self) -> [&Path; 8] {
        [
            &self.qmp,
            &self.console,
            &self.console_log,
            &self.agent,
            &self.vhost_user_vsock,
            &self.hvsock,
            &self.qemu_stderr,
            &self.backend_stderr,
        ]
    }
}

/// The kind of memory backend a VM boots with; hot-added memory uses the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendKind {
    /// `memory-backend-ram`.
    Ram,
    /// `memory-backend-file` with the given `share` flag.
    File {
        /// `share=on` (template) or `share=off` (clone).
        share: bool,
    },
    /// `memory-backend-memfd,share=on` (vhost-user needs shared memory).
    Memfd,
}

impl BackendKind {
    /// The boot memory kind for `cfg`.
    pub(crate) fn for_config(cfg: &HypervisorConfig) -> Self {
        match cfg.template {
            Some(TemplateRole::SaveTo(_)) => Self::File { share: true },
            Some(TemplateRole::CloneFrom(_)) => Self::File { share: false },
            None if matches!(cfg.agent_channel, AgentChannel::HybridVsock { .. }) => Self::Memfd,
            None => Self::Ram,
        }
    }
}

/// Doubles every comma so `path` can sit inside a QEMU option list.
pub fn escape_opt(path: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(path.len());
    for &b in path.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Quotes `path` for `/bin/sh` (used in `exec:` migration URIs).
pub fn shell_quote(path: &Path) -> String {
    let s = path.to_string_lossy();
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// First QEMU with the `file:` migration transport.
pub const FILE_MIGRATION_SINCE: (u64, u64, u64) = (8, 2, 0);

/// The migration URI that writes device state to `path`: `file:PATH` on QEMU >= 8.2 (QEMU
/// writes the file itself), else `exec:cat > PATH`, which costs a `/bin/sh`, a `cat` and a
/// fork of the QEMU that maps the guest RAM. A path `file:` cannot carry (a comma starts its
/// options) keeps `exec:`.
pub fn save_uri(path: &Path, qemu: Option<(u64, u64, u64)>) -> String {
    match path.to_str() {
        Some(p) if qemu >= Some(FILE_MIGRATION_SINCE) && !p.contains(',') => format!("file:{p}"),
        _ => format!("exec:cat > {}", shell_quote(path)),
    }
}

/// The migration URI that reads device state from descriptor `fd`, which QEMU inherited (a
/// number is taken as an inherited descriptor, not a `getfd` name). Reading the file directly
/// spares a `/bin/sh` and a `cat` per clone, and the fork of a QEMU that maps the guest RAM.
pub fn load_uri(fd: std::os::fd::RawFd) -> String {
    format!("fd:{fd}")
}

/// Where the host reaches the agent over `channel`: the sockets this command line creates in
/// `paths`, or the guest's vsock address at `vsock_cid` (the CID its QEMU holds) or the
/// pinned one. `None` for a vsock channel with neither: the CID is allocated at start.
pub fn agent_endpoint(
    channel: &AgentChannel,
    paths: &RunPaths,
    vsock_cid: Option<u32>,
) -> Option<AgentEndpoint> {
    Some(match channel {
        AgentChannel::VirtioSerial => AgentEndpoint::VirtioSerial {
            path: paths.agent.clone(),
        },
        AgentChannel::Vsock { guest_cid } => AgentEndpoint::Vsock {
            cid: vsock_cid.or(*guest_cid)?,
            port: AGENT_VSOCK_PORT,
        },
        AgentChannel::HybridVsock { .. } => AgentEndpoint::HybridVsock {
            path: paths.hvsock.clone(),
            port: AGENT_VSOCK_PORT,
        },
    })
}

/// The vhost-vsock device QEMU is handed: its descriptor (inherited under this number) with
/// the guest CID reserved on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhostVsockFd {
    /// The descriptor number in QEMU.
    pub fd: std::os::fd::RawFd,
    /// The CID reserved on it.
    pub cid: u32,
}

/// Concatenates option fragments into one argument.
fn opt(parts: &[&OsStr]) -> OsString {
    let mut s = OsString::new();
    for p in parts {
        s.push(p);
    }
    s
}

/// A device name for the machine's transport (`-pci` on q35/pc, `-device` on microvm).
fn virtio(machine: MachineType, base: &str) -> String {
    match machine {
        MachineType::Microvm => format!("{base}-device"),
        MachineType::Q35 | MachineType::Pc => format!("{base}-pci"),
    }
}

/// The `-object` value of the boot memory backend.
fn memory_object(cfg: &HypervisorConfig) -> OsString {
    let size = format!("size={}M", cfg.memory_mib);
    match BackendKind::for_config(cfg) {
        BackendKind::Ram => format!("memory-backend-ram,id=mem0,{size}").into(),
        BackendKind::Memfd => format!("memory-backend-memfd,id=mem0,{size},share=on").into(),
        BackendKind::File { share } => {
            // A file backend is chosen only for a template role, which carries the path.
            let path = cfg
                .template
                .as_ref()
                .map_or(Path::new("memory"), |t| t.paths().memory.as_path());
            let share = if share { "on" } else { "off" };
            opt(&[
                OsStr::new(&format!("memory-backend-file,id=mem0,{size},mem-path=")),
                &escape_opt(path.as_os_str()),
                OsStr::new(&format!(",share={share}")),
            ])
        }
    }
}

/// The `-M` value: the machine type, its boot memory backend, then
/// [`HypervisorConfig::effective_machine_options`] (the same for a template and its clones,
/// which must build the same machine).
fn machine_arg(cfg: &HypervisorConfig) -> String {
    match cfg.effective_machine_options() {
        "" => format!("{},memory-backend=mem0", cfg.machine),
        options => format!("{},memory-backend=mem0,{options}", cfg.machine),
    }
}

/// The argument vector of `vhost-device-vsock` for a hybrid-vsock VM.
pub fn vsock_backend_args(guest_cid: u32, paths: &RunPaths) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        guest_cid.to_string().into(),
        "--socket".into(),
        paths.vhost_user_vsock.clone().into(),
        "--uds-path".into(),
        paths.hvsock.clone().into(),
    ]
}

/// The QEMU argument vector (without the binary) for VM `id`.
///
/// `accel` must be resolved (`kvm` or `tcg`); `auto` is treated as `tcg`. The CPU model is
/// [`HypervisorConfig::cpu_model_for`] `accel`. `vsock` is the reserved vhost-vsock device of
/// a vsock channel; without it the device gets only the pinned CID, if any, and QEMU opens
/// `/dev/vhost-vsock` itself (and refuses a missing CID).
pub fn qemu_args(
    id: &str,
    cfg: &HypervisorConfig,
    paths: &RunPaths,
    accel: Accel,
    vsock: Option<VhostVsockFd>,
    nic: Option<NicFds>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(48);
    let mut push = |items: &[&OsStr]| a.extend(items.iter().map(|s| s.to_os_string()));
    let e = |p: &Path| escape_opt(p.as_os_str());

    push(&["-name".as_ref(), escape_opt(OsStr::new(id)).as_os_str()]);
    push(&["-M".as_ref(), machine_arg(cfg).as_ref()]);
    let accel_opt = match (accel, cfg.tcg_tb_size_mib) {
        (Accel::Kvm, _) => "kvm".to_owned(),
        (_, Some(tb)) => format!("tcg,tb-size={tb}"),
        (_, None) => "tcg".to_owned(),
    };
    push(&["-accel".as_ref(), accel_opt.as_ref()]);
    if let Some(model) = cfg.cpu_model_for(accel) {
        push(&["-cpu".as_ref(), model.as_ref()]);
    }
    let mem = if cfg.memory_slots > 0 {
        format!(
            "{}M,slots={},maxmem={}M",
            cfg.memory_mib, cfg.memory_slots, cfg.max_memory_mib
        )
    } else {
        format!("{}M", cfg.memory_mib)
    };
    push(&["-m".as_ref(), mem.as_ref()]);
    let smp = if cfg.max_vcpus > cfg.vcpus {
        format!("{},maxcpus={}", cfg.vcpus, cfg.max_vcpus)
    } else {
        cfg.vcpus.to_string()
    };
    push(&["-smp".as_ref(), smp.as_ref()]);
    push(&[
        "-nographic".as_ref(),
        "-no-reboot".as_ref(),
        "-nodefaults".as_ref(),
        "-no-user-config".as_ref(),
    ]);
    push(&["-object".as_ref(), memory_object(cfg).as_os_str()]);
    // A clone does not boot: its kernel and initrd are in the template's memory already, so
    // QEMU need not read them into fw_cfg again (~10-15 ms of every clone's start, measured).
    // The config still names them: they are part of the template's identity (its metadata),
    // and the RAM blocks a clone restores are the same without them.
    if !cfg.clones_template() {
        push(&["-kernel".as_ref(), cfg.kernel.as_os_str()]);
        if let Some(initrd) = &cfg.initrd {
            push(&["-initrd".as_ref(), initrd.as_os_str()]);
        }
        push(&["-append".as_ref(), cfg.full_kernel_params().as_ref()]);
    }
    if let Some(image) = &cfg.image {
        let drive = opt(&[
            "file=".as_ref(),
            &e(image),
            ",format=raw,if=none,id=disk0".as_ref(),
        ]);
        let dev = format!("{},drive=disk0", virtio(cfg.machine, "virtio-blk"));
        push(&["-drive".as_ref(), &drive, "-device".as_ref(), dev.as_ref()]);
    }
    let qmp = opt(&[
        "unix:".as_ref(),
        &e(&paths.qmp),
        ",server=on,wait=off".as_ref(),
    ]);
    push(&["-qmp".as_ref(), &qmp]);
    let console = opt(&[
        "socket,id=console0,path=".as_ref(),
        &e(&paths.console),
        // No `logfile=`: the console proxy writes `console.log`, bounded, as one writer
        // (QEMU's log would grow without limit on the run root's tmpfs).
        ",server=on,wait=off".as_ref(),
    ]);
    push(&[
        "-chardev".as_ref(),
        &console,
        "-serial".as_ref(),
        "chardev:console0".as_ref(),
    ]);
    match &cfg.agent_channel {
        AgentChannel::VirtioSerial => {
            let bus = format!("{},id=serial0", virtio(cfg.machine, "virtio-serial"));
            let chardev = opt(&[
                "socket,id=agent0,path=".as_ref(),
                &e(&paths.agent),
                ",server=on,wait=off".as_ref(),
            ]);
            push(&[
                "-device".as_ref(),
                bus.as_ref(),
                "-chardev".as_ref(),
                &chardev,
                "-device".as_ref(),
                "virtserialport,chardev=agent0,name=agent.channel.0".as_ref(),
            ]);
        }
        AgentChannel::Vsock { guest_cid } => {
            let mut dev = virtio(cfg.machine, "vhost-vsock");
            match (vsock, guest_cid) {
                (Some(v), _) => dev.push_str(&format!(",vhostfd={},guest-cid={}", v.fd, v.cid)),
                (None, Some(cid)) => dev.push_str(&format!(",guest-cid={cid}")),
                (None, None) => {}
            }
            push(&["-device".as_ref(), dev.as_ref()]);
        }
        AgentChannel::HybridVsock { .. } => {
            let chardev = opt(&["socket,id=vs0,path=".as_ref(), &e(&paths.vhost_user_vsock)]);
            let dev = format!("{},chardev=vs0", virtio(cfg.machine, "vhost-user-vsock"));
            push(&[
                "-chardev".as_ref(),
                &chardev,
                "-device".as_ref(),
                dev.as_ref(),
            ]);
        }
    }
    for port in disk_root_ports(cfg) {
        push(&["-device".as_ref(), port.as_ref()]);
    }
    if cfg.has_vmgenid() {
        // `auto`: a fresh random id per QEMU process, so each clone's differs from its
        // template's and from every other clone's (QEMU notifies the guest after the load).
        push(&["-device".as_ref(), "vmgenid,guid=auto".as_ref()]);
    }
    if let (Some(nic), Some(fds)) = (&cfg.nic, nic) {
        let mut netdev = format!("tap,id=net0,fd={}", fds.tap);
        if let Some(vhost) = fds.vhost {
            netdev.push_str(&format!(",vhost=on,vhostfd={vhost}"));
        }
        // No option ROM: the guest boots its kernel directly, never from the network, and
        // QEMU would read and map the ROM file at every start.
        let mut dev = format!(
            "{},netdev=net0,mac={}",
            virtio(cfg.machine, "virtio-net"),
            nic.mac
        );
        if cfg.machine != MachineType::Microvm {
            dev.push_str(",romfile=");
        }
        push(&[
            "-netdev".as_ref(),
            netdev.as_ref(),
            "-device".as_ref(),
            dev.as_ref(),
        ]);
    }
    if cfg.clones_template() {
        push(&["-S".as_ref(), "-incoming".as_ref(), "defer".as_ref()]);
    }
    a
}

/// The descriptors of a NIC that QEMU inherits: the tap, and vhost-net's when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NicFds {
    /// The tap (`-netdev tap,fd=`).
    pub tap: std::os::fd::RawFd,
    /// `/dev/vhost-net` (`vhostfd=`), if used.
    pub vhost: Option<std::os::fd::RawFd>,
}

/// The `-device` values of the disk hotplug root ports (q35 only, see
/// [`HypervisorConfig::disk_root_ports`]). Ids, chassis numbers and addresses are fixed by the
/// port's index, so a template's clones get the very devices the template saved (a
/// `pcie-root-port` needs a chassis/slot pair of its own: each gets chassis `i + 1`, slot 0).
pub fn disk_root_ports(cfg: &HypervisorConfig) -> Vec<String> {
    (0..cfg.disk_root_ports())
        .map(|i| {
            format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={},addr={:#x}",
                root_port_id(i),
                i + 1,
                root_port_slot(i)
            )
        })
        .collect()
}

#[cfg(test)]
#[path = "cmdline_tests.rs"]
mod tests;
