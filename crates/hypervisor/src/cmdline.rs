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
    /// Serial console log (`console.log`).
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
        ",server=on,wait=off,logfile=".as_ref(),
        &e(&paths.console_log),
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
mod tests {
    use super::*;
    use crate::config::TemplatePaths;

    fn args_string(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The value following `flag` (all of them, in order).
    fn values<'a>(args: &'a [OsString], flag: &str) -> Vec<&'a OsStr> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_os_str())
            .collect()
    }

    fn base() -> HypervisorConfig {
        let mut c = HypervisorConfig::new("/g/vmlinux", Some("/g/initrd.cpio.gz".into()));
        c.accel = Accel::Tcg;
        c
    }

    #[test]
    fn a_nic_is_a_virtio_net_device_on_the_inherited_tap() {
        let paths = RunPaths::new("/r");
        let mut c = base();
        c.nic = Some(crate::NicConfig {
            mac: "02:76:6d:66:00:0f".into(),
            vhost: None,
        });
        let tap = NicFds {
            tap: 7,
            vhost: None,
        };
        let s = args_string(&qemu_args("x", &c, &paths, Accel::Tcg, None, Some(tap)));
        assert!(s.contains("-netdev tap,id=net0,fd=7 "), "{s}");
        assert!(s.contains("-device virtio-net-pci,netdev=net0,mac=02:76:6d:66:00:0f,romfile="));
        let vhost = NicFds {
            tap: 7,
            vhost: Some(8),
        };
        let s = args_string(&qemu_args("x", &c, &paths, Accel::Kvm, None, Some(vhost)));
        assert!(
            s.contains("-netdev tap,id=net0,fd=7,vhost=on,vhostfd=8"),
            "{s}"
        );
        // No descriptors, no NIC (a config without one has none either).
        let s = args_string(&qemu_args("x", &c, &paths, Accel::Tcg, None, None));
        assert!(!s.contains("netdev"), "{s}");
        c.nic = Some(crate::NicConfig {
            mac: "03:00:00:00:00:01".into(),
            vhost: None,
        });
        assert!(matches!(
            c.validate_shape(),
            Err(crate::ConfigError::BadMac { .. })
        ));
    }

    #[test]
    fn escape_doubles_commas() {
        assert_eq!(
            escape_opt(OsStr::new("/a,b,,c")),
            OsString::from("/a,,b,,,,c")
        );
        assert_eq!(escape_opt(OsStr::new("/plain")), OsString::from("/plain"));
        assert_eq!(shell_quote(Path::new("/t/it's here")), r"'/t/it'\''s here'");
        let state = Path::new("/t/state");
        assert_eq!(save_uri(state, Some((7, 2, 22))), "exec:cat > '/t/state'");
        assert_eq!(save_uri(state, None), "exec:cat > '/t/state'");
        assert_eq!(save_uri(state, Some((8, 2, 0))), "file:/t/state");
        assert_eq!(save_uri(state, Some((10, 0, 2))), "file:/t/state");
        assert_eq!(
            save_uri(Path::new("/t/a,b"), Some((10, 0, 2))),
            "exec:cat > '/t/a,b'"
        );
        assert_eq!(load_uri(7), "fd:7");
    }

    #[test]
    fn direct_vm_line() {
        let paths = RunPaths::new("/run/vm1");
        let args = qemu_args("vm1", &base(), &paths, Accel::Tcg, None, None);
        let s = args_string(&args);
        assert!(s.starts_with(
            "-name vm1 -M q35,memory-backend=mem0,sata=off -accel tcg -m 256M -smp 1 "
        ));
        assert!(s.contains("-nographic -no-reboot -nodefaults -no-user-config"));
        assert!(s.contains("-object memory-backend-ram,id=mem0,size=256M"));
        assert!(s.contains("-kernel /g/vmlinux -initrd /g/initrd.cpio.gz"));
        assert_eq!(
            values(&args, "-append"),
            [OsStr::new("console=ttyS0 panic=-1 quiet")]
        );
        assert!(s.contains("-qmp unix:/run/vm1/qmp.sock,server=on,wait=off"));
        assert!(s.contains(
            "-chardev socket,id=console0,path=/run/vm1/console.sock,server=on,wait=off,\
             logfile=/run/vm1/console.log -serial chardev:console0"
        ));
        assert!(s.contains(
            "-device virtio-serial-pci,id=serial0 -chardev socket,id=agent0,\
             path=/run/vm1/agent.sock,server=on,wait=off \
             -device virtserialport,chardev=agent0,name=agent.channel.0"
        ));
        assert!(!s.contains("-incoming"));
        assert_eq!(
            agent_endpoint(&base().agent_channel, &paths, None),
            Some(AgentEndpoint::VirtioSerial {
                path: "/run/vm1/agent.sock".into()
            })
        );
    }

    #[test]
    fn vmgenid_device_on_q35_and_pc_only() {
        let paths = RunPaths::new("/r");
        let devices = |c: &HypervisorConfig| {
            values(
                &qemu_args("x", c, &paths, Accel::Tcg, None, None),
                "-device",
            )
            .into_iter()
            .filter(|d| d.to_string_lossy().starts_with("vmgenid"))
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
        };
        let mut c = base();
        assert!(devices(&c).is_empty(), "off by default");
        c.vmgenid = true;
        assert_eq!(devices(&c), ["vmgenid,guid=auto"]);
        // A clone gets its own `auto` id too: the device is in the template's machine.
        c.template = Some(TemplateRole::CloneFrom(TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        }));
        assert_eq!(devices(&c), ["vmgenid,guid=auto"]);
        c.template = None;
        c.machine = MachineType::Pc;
        assert_eq!(devices(&c).len(), 1);
        c.machine = MachineType::Microvm;
        assert!(devices(&c).is_empty(), "no ACPI table for it on microvm");
        c.machine = MachineType::Q35;
        c.vmgenid = false;
        assert!(devices(&c).is_empty());
    }

    #[test]
    fn hotplug_room_and_kvm() {
        let mut c = base();
        c.max_vcpus = 4;
        c.memory_slots = 4;
        c.max_memory_mib = 2048;
        c.machine = MachineType::Pc;
        c.tcg_tb_size_mib = Some(64);
        let paths = RunPaths::new("/r");
        let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
        assert_eq!(
            values(&args, "-m"),
            [OsStr::new("256M,slots=4,maxmem=2048M")]
        );
        assert_eq!(values(&args, "-smp"), [OsStr::new("1,maxcpus=4")]);
        assert_eq!(values(&args, "-M"), [OsStr::new("pc,memory-backend=mem0")]);
        assert_eq!(values(&args, "-accel"), [OsStr::new("tcg,tb-size=64")]);
        let args = qemu_args("x", &c, &paths, Accel::Kvm, None, None);
        assert_eq!(values(&args, "-accel"), [OsStr::new("kvm")]);
    }

    #[test]
    fn cpu_model_follows_the_accelerator_unless_configured() {
        let paths = RunPaths::new("/r");
        let mut c = base();
        // TCG keeps QEMU's default model: no -cpu at all.
        assert!(values(&qemu_args("x", &c, &paths, Accel::Tcg, None, None), "-cpu").is_empty());
        let kvm = qemu_args("x", &c, &paths, Accel::Kvm, None, None);
        assert_eq!(values(&kvm, "-cpu"), [OsStr::new("host")]);
        assert!(args_string(&kvm)
            .starts_with("-name x -M q35,memory-backend=mem0,sata=off -accel kvm -cpu host -m "));
        c.cpu_model = Some("Skylake-Client,-hle".into());
        for accel in [Accel::Tcg, Accel::Kvm] {
            let args = qemu_args("x", &c, &paths, accel, None, None);
            assert_eq!(values(&args, "-cpu"), [OsStr::new("Skylake-Client,-hle")]);
        }
        // A pinned clone config carries its template's model whatever it is given.
        let clone = base().pinned(Accel::Kvm);
        assert_eq!(
            values(
                &qemu_args("x", &clone, &paths, clone.accel, None, None),
                "-cpu"
            ),
            [OsStr::new("host")]
        );
    }

    #[test]
    fn template_and_clone_lines() {
        let mut c = base();
        let files = TemplatePaths {
            memory: "/tpl,x/memory".into(),
            state: "/tpl,x/state".into(),
        };
        c.template = Some(TemplateRole::SaveTo(files.clone()));
        let paths = RunPaths::new("/run/a,b");
        let args = qemu_args("tpl", &c, &paths, Accel::Tcg, None, None);
        assert_eq!(
            values(&args, "-object"),
            [OsStr::new(
                "memory-backend-file,id=mem0,size=256M,mem-path=/tpl,,x/memory,share=on"
            )]
        );
        assert_eq!(
            values(&args, "-qmp"),
            [OsStr::new("unix:/run/a,,b/qmp.sock,server=on,wait=off")]
        );
        assert!(values(&args, "-chardev")
            .iter()
            .all(|v| v.to_string_lossy().contains("/run/a,,b/")));
        assert!(!args_string(&args).contains("-incoming"));

        c.template = Some(TemplateRole::CloneFrom(files));
        let args = qemu_args("clone", &c, &paths, Accel::Tcg, None, None);
        assert_eq!(
            values(&args, "-object"),
            [OsStr::new(
                "memory-backend-file,id=mem0,size=256M,mem-path=/tpl,,x/memory,share=off"
            )]
        );
        assert!(args_string(&args).ends_with("-S -incoming defer"));
        for booting in ["-kernel", "-initrd", "-append"] {
            assert!(
                values(&args, booting).is_empty(),
                "a clone has no {booting}"
            );
        }
    }

    #[test]
    fn kernel_and_initrd_are_not_escaped() {
        let mut c = base();
        c.kernel = "/k,1/vmlinux".into();
        c.image = Some("/d,1/disk.img".into());
        let args = qemu_args("x", &c, &RunPaths::new("/r"), Accel::Tcg, None, None);
        assert_eq!(values(&args, "-kernel"), [OsStr::new("/k,1/vmlinux")]);
        assert_eq!(
            values(&args, "-drive"),
            [OsStr::new(
                "file=/d,,1/disk.img,format=raw,if=none,id=disk0"
            )]
        );
        assert!(args_string(&args).contains("-device virtio-blk-pci,drive=disk0"));
    }

    #[test]
    fn vsock_channels() {
        let paths = RunPaths::new("/r");
        let mut c = base();
        c.disk_slots = 0; // its only device is the vsock one
        c.agent_channel = AgentChannel::Vsock { guest_cid: None };
        let held = VhostVsockFd { fd: 9, cid: 70001 };
        let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(held), None);
        assert_eq!(
            values(&args, "-device"),
            [OsStr::new("vhost-vsock-pci,vhostfd=9,guest-cid=70001")]
        );
        // The CID the VM holds, once it holds one.
        assert_eq!(agent_endpoint(&c.agent_channel, &paths, None), None);
        assert_eq!(
            agent_endpoint(&c.agent_channel, &paths, Some(70001)),
            Some(AgentEndpoint::Vsock {
                cid: 70001,
                port: 1024
            })
        );
        // A clone gets its own device and CID, and still waits for the template's state.
        let mut clone = c.clone();
        clone.template = Some(TemplateRole::CloneFrom(TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        }));
        let args = qemu_args("x", &clone, &paths, Accel::Kvm, Some(held), None);
        let s = args_string(&args);
        assert!(s.contains("-device vhost-vsock-pci,vhostfd=9,guest-cid=70001"));
        assert!(s.ends_with("-S -incoming defer"));
        c.machine = MachineType::Microvm;
        let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(held), None);
        assert_eq!(
            values(&args, "-device"),
            [OsStr::new("vhost-vsock-device,vhostfd=9,guest-cid=70001")]
        );
        // A pinned CID.
        c.machine = MachineType::Q35;
        c.agent_channel = AgentChannel::Vsock { guest_cid: Some(5) };
        let pinned = VhostVsockFd { fd: 9, cid: 5 };
        let args = qemu_args("x", &c, &paths, Accel::Tcg, Some(pinned), None);
        assert!(args_string(&args).contains("-device vhost-vsock-pci,vhostfd=9,guest-cid=5"));
        let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
        assert!(args_string(&args).contains("-device vhost-vsock-pci,guest-cid=5"));
        assert_eq!(
            agent_endpoint(&c.agent_channel, &paths, None),
            Some(AgentEndpoint::Vsock { cid: 5, port: 1024 })
        );

        c.agent_channel = AgentChannel::HybridVsock {
            backend: "/bin/vhost-device-vsock".into(),
            guest_cid: 3,
        };
        let args = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
        let s = args_string(&args);
        assert!(s.contains("-object memory-backend-memfd,id=mem0,size=256M,share=on"));
        assert!(s.contains(
            "-chardev socket,id=vs0,path=/r/vhost-user-vsock.sock \
             -device vhost-user-vsock-pci,chardev=vs0"
        ));
        assert_eq!(
            agent_endpoint(&c.agent_channel, &paths, None),
            Some(AgentEndpoint::HybridVsock {
                path: "/r/vm.vsock".into(),
                port: 1024
            })
        );
        assert_eq!(
            args_string(&vsock_backend_args(3, &paths)),
            "--guest-cid 3 --socket /r/vhost-user-vsock.sock --uds-path /r/vm.vsock"
        );
    }

    #[test]
    fn disk_root_ports_on_q35_only_and_the_same_for_clones() {
        let paths = RunPaths::new("/r");
        let mut c = base();
        c.disk_slots = 2;
        let ports = [
            OsStr::new("pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x10"),
            OsStr::new("pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x11"),
        ];
        let devices = |c: &HypervisorConfig| {
            let args = qemu_args("x", c, &paths, Accel::Tcg, None, None);
            values(&args, "-device")
                .into_iter()
                .map(OsStr::to_os_string)
                .filter(|d| d.to_string_lossy().starts_with("pcie-root-port"))
                .collect::<Vec<_>>()
        };
        assert_eq!(devices(&c), ports);
        let files = TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        };
        c.template = Some(TemplateRole::SaveTo(files.clone()));
        let template = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
        c.template = Some(TemplateRole::CloneFrom(files));
        let clone = qemu_args("x", &c, &paths, Accel::Tcg, None, None);
        assert_eq!(devices(&c), ports);
        assert_eq!(values(&template, "-device"), values(&clone, "-device"));
        assert!(args_string(&clone).ends_with("-S -incoming defer"));
        c.disk_slots = 0;
        assert!(devices(&c).is_empty());
        c.disk_slots = 4;
        for machine in [MachineType::Pc, MachineType::Microvm] {
            c.machine = machine;
            assert!(devices(&c).is_empty(), "{machine}");
        }
        // The default: four ports, the last at 0x13.
        let args = qemu_args("x", &base(), &paths, Accel::Tcg, None, None);
        assert!(args_string(&args)
            .contains("-device pcie-root-port,id=rp3,bus=pcie.0,chassis=4,addr=0x13"));
    }

    #[test]
    fn machine_options_follow_the_config_and_match_for_clones() {
        let paths = RunPaths::new("/r");
        let machine = |c: &HypervisorConfig| {
            let args = qemu_args("x", c, &paths, Accel::Tcg, None, None);
            values(&args, "-M")[0].to_string_lossy().into_owned()
        };
        let mut c = base();
        assert_eq!(machine(&c), "q35,memory-backend=mem0,sata=off");
        c.machine_options = Some(String::new());
        assert_eq!(machine(&c), "q35,memory-backend=mem0");
        c.machine_options = Some("sata=off,smbus=off".into());
        assert_eq!(machine(&c), "q35,memory-backend=mem0,sata=off,smbus=off");
        let files = TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        };
        c.template = Some(TemplateRole::SaveTo(files.clone()));
        let template = machine(&c);
        c.template = Some(TemplateRole::CloneFrom(files));
        assert_eq!(machine(&c), template);
        c = base();
        c.machine = MachineType::Pc;
        assert_eq!(machine(&c), "pc,memory-backend=mem0");
    }

    #[test]
    fn microvm_uses_mmio_devices() {
        let mut c = base();
        c.machine = MachineType::Microvm;
        let s = args_string(&qemu_args(
            "x",
            &c,
            &RunPaths::new("/r"),
            Accel::Tcg,
            None,
            None,
        ));
        assert!(s.contains("-M microvm,memory-backend=mem0"));
        assert!(s.contains("-device virtio-serial-device,id=serial0"));
    }
}
