//! [`HypervisorConfig`]: what a VM is made of, and its validation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::files::{open_regular, Symlinks};
use crate::vsock::{FIRST_GUEST_CID, LAST_GUEST_CID};

/// Kernel parameters every VM gets, before [`HypervisorConfig::kernel_params`].
pub const DEFAULT_KERNEL_PARAMS: &str = "console=ttyS0 panic=-1 quiet";

/// The vsock port the guest agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The QEMU machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MachineType {
    /// `q35`: PCIe, ACPI CPU and memory hotplug. The default.
    Q35,
    /// `pc` (i440fx): PCI, ACPI CPU and memory hotplug.
    Pc,
    /// `microvm`: virtio-mmio only, no hotplug; boots fastest but needs `tsc_early_khz=` in the
    /// kernel parameters on some hosts.
    Microvm,
}

impl MachineType {
    /// The name QEMU uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Q35 => "q35",
            Self::Pc => "pc",
            Self::Microvm => "microvm",
        }
    }

    /// Whether CPU and memory hotplug work on this machine.
    pub fn supports_hotplug(self) -> bool {
        !matches!(self, Self::Microvm)
    }
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineType {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "q35" => Ok(Self::Q35),
            "pc" => Ok(Self::Pc),
            "microvm" => Ok(Self::Microvm),
            other => Err(ConfigError::UnknownMachine(other.to_owned())),
        }
    }
}

impl TryFrom<String> for MachineType {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<MachineType> for String {
    fn from(m: MachineType) -> Self {
        m.as_str().to_owned()
    }
}

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Accel {
    /// KVM if a probe shows it can boot a stock kernel, else TCG (see [`crate::resolve_accel`]).
    Auto,
    /// KVM, unconditionally.
    Kvm,
    /// TCG (emulation), unconditionally.
    Tcg,
}

impl Accel {
    /// The name QEMU uses (`auto` is never passed to QEMU).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Accel {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(ConfigError::UnknownAccel(other.to_owned())),
        }
    }
}

impl TryFrom<String> for Accel {
    type Error = ConfigError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Accel> for String {
    fn from(a: Accel) -> Self {
        a.as_str().to_owned()
    }
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentChannel {
    /// A virtio-serial port named `agent.channel.0` on a unix-socket chardev
    /// (`serial://RUN/agent.sock`). Works under TCG and with templates.
    VirtioSerial,
    /// vhost-vsock (`vsock://CID:1024`); needs `/dev/vhost-vsock` on the host. Each start
    /// reserves the CID in the kernel and hands the reservation to QEMU (see `vsock.rs`), so
    /// it is held exactly as long as the VM's QEMU runs. Works with templates: every clone
    /// gets its own CID.
    Vsock {
        /// `None` (the default): a free CID is allocated at each start. `Some`: this CID,
        /// failing if it is in use; not allowed with templates (every clone needs its own).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        guest_cid: Option<u32>,
    },
    /// Hybrid vsock through a `vhost-device-vsock` backend (`hvsock://RUN/vm.vsock:1024`).
    /// Needs shared (memfd) guest memory and blocks migration, so no templates.
    HybridVsock {
        /// Path of the `vhost-device-vsock` binary.
        backend: PathBuf,
        /// The guest context id (3 or more).
        guest_cid: u32,
    },
}

/// The files of a template: its guest memory (on a tmpfs) and its device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatePaths {
    /// The guest memory file: written by the template VM, mapped privately by each clone.
    pub memory: PathBuf,
    /// The device state written by [`crate::Hypervisor::save_template`], loaded by each clone.
    pub state: PathBuf,
}

/// The part a VM plays in templating. One value, so a VM can neither be both nor lack a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateRole {
    /// Boot with RAM in a shared file at `memory`, so the VM can be saved as a template.
    SaveTo(TemplatePaths),
    /// Boot as a clone: map `memory` privately and load `state`. The VM stays paused after
    /// start.
    CloneFrom(TemplatePaths),
}

impl TemplateRole {
    /// The template's files.
    pub fn paths(&self) -> &TemplatePaths {
        match self {
            Self::SaveTo(p) | Self::CloneFrom(p) => p,
        }
    }
}

/// A VM's size as the hypervisor reports it (not as anyone recorded it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSize {
    /// vCPUs present (online or not in the guest).
    pub vcpus: u32,
    /// Boot memory plus hot-plugged DIMMs, in MiB.
    pub memory_mib: u64,
}

/// Largest memory a VM may have or grow to, in MiB (16 TiB): above any host this runs on, and
/// small enough that every size derived from it in bytes fits in a `u64`.
pub const MAX_MEMORY_MIB: u64 = 16 << 20;

/// Everything needed to build a VM's QEMU command line.
///
/// Build one with [`HypervisorConfig::new`] and adjust the public fields; call
/// [`HypervisorConfig::validate`] (the backend also validates on start).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorConfig {
    /// The QEMU binary (a bare name is looked up in `PATH`).
    pub qemu_path: PathBuf,
    /// The guest kernel (bzImage or PVH ELF vmlinux).
    pub kernel: PathBuf,
    /// The initramfs. Required for templates.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// A raw disk image attached as a virtio-blk disk (`/dev/vda`). Not allowed with templates.
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Extra kernel parameters, appended to [`DEFAULT_KERNEL_PARAMS`].
    #[serde(default)]
    pub kernel_params: String,
    /// vCPUs at boot.
    pub vcpus: u32,
    /// vCPUs the VM can grow to by hotplug (`-smp …,maxcpus=`).
    pub max_vcpus: u32,
    /// Boot memory in MiB.
    pub memory_mib: u64,
    /// Memory hotplug slots (`-m …,slots=`); 0 disables memory hotplug.
    #[serde(default)]
    pub memory_slots: u32,
    /// Memory the VM can grow to by hotplug, in MiB (`-m …,maxmem=`).
    pub max_memory_mib: u64,
    /// The machine type.
    pub machine: MachineType,
    /// The accelerator.
    pub accel: Accel,
    /// The guest CPU model (`-cpu`, e.g. `host`, `max`, `Skylake-Client`, with `,feature`
    /// suffixes allowed). `None`: `host` under KVM, QEMU's default under TCG (see
    /// [`HypervisorConfig::cpu_model_for`]).
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// The part this VM plays in templating, if any: saved as a template, or cloned from one.
    #[serde(default)]
    pub template: Option<TemplateRole>,
    /// The agent channel.
    pub agent_channel: AgentChannel,
    /// TCG translation-block cache size in MiB (`-accel tcg,tb-size=`); QEMU's default when
    /// `None`. Ignored under KVM.
    #[serde(default)]
    pub tcg_tb_size_mib: Option<u32>,
}

impl HypervisorConfig {
    /// A config with 1 vCPU, 256 MiB, q35, `auto` accelerator, virtio-serial agent channel,
    /// no hotplug room, and `qemu-system-x86_64` from `PATH`.
    pub fn new(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> Self {
        Self {
            qemu_path: PathBuf::from("qemu-system-x86_64"),
            kernel: kernel.into(),
            initrd,
            image: None,
            kernel_params: String::new(),
            vcpus: 1,
            max_vcpus: 1,
            memory_mib: 256,
            memory_slots: 0,
            max_memory_mib: 256,
            machine: MachineType::Q35,
            accel: Accel::Auto,
            cpu_model: None,
            template: None,
            agent_channel: AgentChannel::VirtioSerial,
            tcg_tb_size_mib: None,
        }
    }

    /// The full kernel command line: [`DEFAULT_KERNEL_PARAMS`] then `kernel_params`.
    pub fn full_kernel_params(&self) -> String {
        let extra = self.kernel_params.trim();
        if extra.is_empty() {
            DEFAULT_KERNEL_PARAMS.to_owned()
        } else {
            format!("{DEFAULT_KERNEL_PARAMS} {extra}")
        }
    }

    /// Whether this VM boots to be saved as a template.
    pub fn saves_template(&self) -> bool {
        matches!(self.template, Some(TemplateRole::SaveTo(_)))
    }

    /// Whether this VM boots as a clone of a template.
    pub fn clones_template(&self) -> bool {
        matches!(self.template, Some(TemplateRole::CloneFrom(_)))
    }

    /// This config without its template role: what a template, its clones and a plain VM of the
    /// same shape have in common. Configs are compared through it.
    pub fn without_template(&self) -> Self {
        Self {
            template: None,
            ..self.clone()
        }
    }

    /// Checks that a VM of this config can be saved as a template and cloned: an initrd guest
    /// (a disk image would be one writable disk shared by every clone), no hybrid vsock (its
    /// vhost-user device blocks migration) and no pinned vsock CID (two clones cannot share
    /// one). [`HypervisorConfig::validate_shape`] applies it
    /// to any config with a template role; a factory applies it before it gives one.
    pub fn check_templatable(&self) -> Result<(), ConfigError> {
        if self.image.is_some() {
            return Err(ConfigError::TemplateWithImage);
        }
        if self.initrd.is_none() {
            return Err(ConfigError::TemplateWithoutInitrd);
        }
        if matches!(self.agent_channel, AgentChannel::HybridVsock { .. }) {
            return Err(ConfigError::HybridVsockWithTemplate);
        }
        if let AgentChannel::Vsock {
            guest_cid: Some(cid),
        } = self.agent_channel
        {
            return Err(ConfigError::PinnedCidWithTemplate { cid });
        }
        Ok(())
    }

    /// Checks the config; returns the first problem found.
    ///
    /// Reads the kernel, initrd and image paths (opens them), so call it from a blocking context
    /// (the backend does so through `spawn_blocking`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_readable(&self.kernel, false).map_err(|source| ConfigError::KernelUnreadable {
            path: self.kernel.clone(),
            source,
        })?;
        if let Some(initrd) = &self.initrd {
            check_readable(initrd, false).map_err(|source| ConfigError::InitrdUnreadable {
                path: initrd.clone(),
                source,
            })?;
        }
        if let Some(image) = &self.image {
            check_readable(image, true).map_err(|source| ConfigError::ImageUnreadable {
                path: image.clone(),
                source,
            })?;
        }
        self.validate_shape()
    }

    /// The checks of [`HypervisorConfig::validate`] that do not touch the file system.
    pub fn validate_shape(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 {
            return Err(ConfigError::ZeroVcpus);
        }
        if self.vcpus > self.max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                vcpus: self.vcpus,
                max_vcpus: self.max_vcpus,
            });
        }
        if self.memory_mib == 0 {
            return Err(ConfigError::ZeroMemory);
        }
        if self.memory_mib > self.max_memory_mib {
            return Err(ConfigError::TooMuchMemory {
                memory_mib: self.memory_mib,
                max_memory_mib: self.max_memory_mib,
            });
        }
        if self.max_memory_mib > MAX_MEMORY_MIB {
            return Err(ConfigError::MemoryOverLimit {
                max_memory_mib: self.max_memory_mib,
                limit: MAX_MEMORY_MIB,
            });
        }
        if self.memory_slots > 0 && self.max_memory_mib == self.memory_mib {
            return Err(ConfigError::SlotsWithoutMaxMemory);
        }
        if !self.machine.supports_hotplug()
            && (self.max_vcpus > self.vcpus || self.memory_slots > 0)
        {
            return Err(ConfigError::HotplugUnsupported {
                machine: self.machine,
            });
        }
        if self.template.is_some() {
            self.check_templatable()?;
        }
        if let Some(model) = &self.cpu_model {
            check_cpu_model(model, self.accel)?;
        }
        match self.agent_channel {
            AgentChannel::Vsock {
                guest_cid: Some(cid),
            }
            | AgentChannel::HybridVsock { guest_cid: cid, .. }
                if !(FIRST_GUEST_CID..=LAST_GUEST_CID).contains(&cid) =>
            {
                Err(ConfigError::ReservedCid { cid })
            }
            _ => Ok(()),
        }
    }

    /// Checks that a VM booted with this config can be grown by hotplug to `size`: vCPUs in
    /// `vcpus..=max_vcpus`, memory in `memory_mib..=max_memory_mib`, and memory above the boot
    /// memory only with memory slots. The one rule for a size asked of a factory (its
    /// `get_vm`, which never shrinks a VM and so asks for at least the boot size) and of the
    /// CLI's `get --vcpus/--memory`. A size at the maximum is fine: the VM boots smaller and
    /// grows by one DIMM, which QEMU's `maxmem` leaves room for.
    pub fn check_size(&self, size: VmSize) -> Result<(), ConfigError> {
        if !(self.vcpus..=self.max_vcpus).contains(&size.vcpus) {
            return Err(ConfigError::VcpusOutOfRange {
                vcpus: size.vcpus,
                min: self.vcpus,
                max: self.max_vcpus,
            });
        }
        if !(self.memory_mib..=self.max_memory_mib).contains(&size.memory_mib) {
            return Err(ConfigError::MemoryOutOfRange {
                memory_mib: size.memory_mib,
                min: self.memory_mib,
                max: self.max_memory_mib,
            });
        }
        if size.memory_mib > self.memory_mib && self.memory_slots == 0 {
            return Err(ConfigError::NoMemoryHotplug {
                memory_mib: size.memory_mib,
                boot_mib: self.memory_mib,
            });
        }
        Ok(())
    }
}

/// Checks a CPU model for `-cpu`: a name and optional `,feature` parts (letters, digits and
/// `-_.+=`), and no `host` under forced TCG, so such mistakes fail as a config error, not as
/// a QEMU that exits at start.
fn check_cpu_model(model: &str, accel: Accel) -> Result<(), ConfigError> {
    let mut chars = model.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.,+=".contains(c));
    if !well_formed {
        return Err(ConfigError::InvalidCpuModel(model.to_owned()));
    }
    let name = model.split(',').next().unwrap_or_default();
    if accel == Accel::Tcg && name == "host" {
        return Err(ConfigError::HostCpuWithoutKvm);
    }
    Ok(())
}

/// Opens `path` for reading (symlinks followed: guest files are often links) without waiting
/// on a FIFO or device, and checks it is a regular file (or, for a disk image, a block
/// device).
fn check_readable(path: &Path, block_device_ok: bool) -> std::io::Result<()> {
    open_regular(path, Symlinks::Follow, block_device_ok).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, HypervisorConfig) {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initrd");
        std::fs::write(&kernel, b"k").expect("write");
        std::fs::write(&initrd, b"i").expect("write");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        let cfg = HypervisorConfig::new(kernel, Some(initrd));
        (dir, cfg)
    }

    fn paths() -> TemplatePaths {
        TemplatePaths {
            memory: "/tpl/memory".into(),
            state: "/tpl/state".into(),
        }
    }

    fn template(mut c: HypervisorConfig) -> HypervisorConfig {
        c.template = Some(TemplateRole::SaveTo(paths()));
        c
    }

    #[test]
    fn validation_table() {
        let (dir, base) = files();
        type Case = (
            &'static str,
            fn(&mut HypervisorConfig),
            fn(&ConfigError) -> bool,
        );
        let cases: Vec<Case> = vec![
            ("ok", |_| {}, |_| false),
            (
                "missing kernel",
                |c| c.kernel = "/nonexistent/vmlinux".into(),
                |e| matches!(e, ConfigError::KernelUnreadable { .. }),
            ),
            (
                "kernel is a dir",
                |c| c.kernel = "/".into(),
                |e| matches!(e, ConfigError::KernelUnreadable { .. }),
            ),
            (
                "kernel is a FIFO (refused without waiting for a writer)",
                |c| c.kernel = c.kernel.with_file_name("fifo"),
                |e| matches!(e, ConfigError::KernelUnreadable { .. }),
            ),
            (
                "initrd is a character device",
                |c| c.initrd = Some("/dev/zero".into()),
                |e| matches!(e, ConfigError::InitrdUnreadable { .. }),
            ),
            (
                "missing initrd",
                |c| c.initrd = Some("/nonexistent/initrd".into()),
                |e| matches!(e, ConfigError::InitrdUnreadable { .. }),
            ),
            (
                "missing image",
                |c| c.image = Some("/nonexistent/disk.img".into()),
                |e| matches!(e, ConfigError::ImageUnreadable { .. }),
            ),
            (
                "zero vcpus",
                |c| c.vcpus = 0,
                |e| matches!(e, ConfigError::ZeroVcpus),
            ),
            (
                "vcpus > max",
                |c| c.vcpus = 2,
                |e| {
                    matches!(
                        e,
                        ConfigError::TooManyVcpus {
                            vcpus: 2,
                            max_vcpus: 1
                        }
                    )
                },
            ),
            (
                "zero memory",
                |c| c.memory_mib = 0,
                |e| matches!(e, ConfigError::ZeroMemory),
            ),
            (
                "memory > max",
                |c| c.memory_mib = 512,
                |e| matches!(e, ConfigError::TooMuchMemory { .. }),
            ),
            (
                "slots without room",
                |c| c.memory_slots = 2,
                |e| matches!(e, ConfigError::SlotsWithoutMaxMemory),
            ),
            (
                "microvm hotplug",
                |c| {
                    c.machine = MachineType::Microvm;
                    c.max_vcpus = 2;
                },
                |e| matches!(e, ConfigError::HotplugUnsupported { .. }),
            ),
            (
                "template with image",
                |c| {
                    *c = template(c.clone());
                    c.image = Some(c.kernel.clone());
                },
                |e| matches!(e, ConfigError::TemplateWithImage),
            ),
            (
                "template without initrd",
                |c| {
                    *c = template(c.clone());
                    c.initrd = None;
                },
                |e| matches!(e, ConfigError::TemplateWithoutInitrd),
            ),
            (
                "hybrid vsock template",
                |c| {
                    *c = template(c.clone());
                    c.agent_channel = AgentChannel::HybridVsock {
                        backend: "vhost-device-vsock".into(),
                        guest_cid: 3,
                    };
                },
                |e| matches!(e, ConfigError::HybridVsockWithTemplate),
            ),
            (
                "cpu model with a space",
                |c| c.cpu_model = Some("host -smp 8".into()),
                |e| matches!(e, ConfigError::InvalidCpuModel(m) if m == "host -smp 8"),
            ),
            (
                "empty cpu model",
                |c| c.cpu_model = Some(String::new()),
                |e| matches!(e, ConfigError::InvalidCpuModel(_)),
            ),
            (
                "host cpu under forced tcg",
                |c| {
                    c.accel = Accel::Tcg;
                    c.cpu_model = Some("host,-pmu".into());
                },
                |e| matches!(e, ConfigError::HostCpuWithoutKvm),
            ),
            (
                "reserved cid",
                |c| c.agent_channel = AgentChannel::Vsock { guest_cid: Some(2) },
                |e| matches!(e, ConfigError::ReservedCid { cid: 2 }),
            ),
            (
                "VMADDR_CID_ANY",
                |c| {
                    c.agent_channel = AgentChannel::Vsock {
                        guest_cid: Some(u32::MAX),
                    }
                },
                |e| matches!(e, ConfigError::ReservedCid { cid: u32::MAX }),
            ),
            (
                "pinned cid template",
                |c| {
                    *c = template(c.clone());
                    c.agent_channel = AgentChannel::Vsock { guest_cid: Some(9) };
                },
                |e| matches!(e, ConfigError::PinnedCidWithTemplate { cid: 9 }),
            ),
        ];
        for (name, tweak, expect) in cases {
            let mut cfg = base.clone();
            tweak(&mut cfg);
            match cfg.validate() {
                Ok(()) => assert_eq!(name, "ok", "{name}: expected an error"),
                Err(e) => {
                    assert!(expect(&e), "{name}: unexpected error {e:?}");
                    assert!(!e.to_string().contains('\n'), "{name}: multi-line message");
                }
            }
        }
        // Models with features, and `host` where KVM may be used.
        for (accel, model) in [
            (Accel::Tcg, "Skylake-Client-v4,+avx2,-hle"),
            (Accel::Tcg, "max"),
            (Accel::Auto, "host"),
            (Accel::Kvm, "host,pmu=off"),
        ] {
            let mut c = base.clone();
            (c.accel, c.cpu_model) = (accel, Some(model.into()));
            c.validate().expect(model);
        }
        // A valid template and a valid clone.
        assert!(template(base.clone()).validate().is_ok());
        let mut vsock = template(base.clone());
        vsock.agent_channel = AgentChannel::Vsock { guest_cid: None };
        assert!(
            vsock.validate().is_ok(),
            "allocated CIDs work with templates"
        );
        let mut clone = base;
        clone.template = Some(TemplateRole::CloneFrom(paths()));
        assert!(clone.validate().is_ok());
        assert!(clone.clones_template() && !clone.saves_template());
        assert_eq!(clone.without_template().template, None);
        drop(dir);
    }

    #[test]
    fn accel_and_machine_parse() {
        assert_eq!("auto".parse::<Accel>().ok(), Some(Accel::Auto));
        assert_eq!("kvm".parse::<Accel>().ok(), Some(Accel::Kvm));
        assert_eq!("tcg".parse::<Accel>().ok(), Some(Accel::Tcg));
        assert!(matches!("hvf".parse::<Accel>(), Err(ConfigError::UnknownAccel(s)) if s == "hvf"));
        assert!(matches!(
            "KVM".parse::<Accel>(),
            Err(ConfigError::UnknownAccel(_))
        ));
        assert_eq!("q35".parse::<MachineType>().ok(), Some(MachineType::Q35));
        assert_eq!("pc".parse::<MachineType>().ok(), Some(MachineType::Pc));
        assert_eq!(
            "microvm".parse::<MachineType>().ok(),
            Some(MachineType::Microvm)
        );
        assert!(matches!(
            "virt".parse::<MachineType>(),
            Err(ConfigError::UnknownMachine(s)) if s == "virt"
        ));
    }

    #[test]
    fn serde_round_trip_and_unknown_values() {
        let mut cfg = HypervisorConfig::new("/k", None);
        cfg.agent_channel = AgentChannel::HybridVsock {
            backend: "/usr/bin/vhost-device-vsock".into(),
            guest_cid: 7,
        };
        let json = serde_json::to_string(&cfg).expect("serialize");
        assert!(json.contains("\"machine\":\"q35\""));
        assert!(json.contains("\"accel\":\"auto\""));
        let back: HypervisorConfig = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, cfg);
        let bad = json.replace("\"q35\"", "\"virt\"");
        assert!(serde_json::from_str::<HypervisorConfig>(&bad).is_err());
        let bad = json.replace("\"auto\"", "\"hvf\"");
        assert!(serde_json::from_str::<HypervisorConfig>(&bad).is_err());
        // One template role, with both paths: anything else does not parse.
        let mut tpl = HypervisorConfig::new("/k", None);
        tpl.template = Some(TemplateRole::SaveTo(TemplatePaths {
            memory: "/t/memory".into(),
            state: "/t/state".into(),
        }));
        let json = serde_json::to_string(&tpl).expect("serialize");
        assert_eq!(
            serde_json::from_str::<HypervisorConfig>(&json).expect("deserialize"),
            tpl
        );
        for bad in [
            json.replace(",\"state\":\"/t/state\"", ""),
            json.replace("\"save_to\"", "\"save_and_clone\""),
            json.replace(
                "}}",
                "},\"clone_from\":{\"memory\":\"/m\",\"state\":\"/s\"}}",
            ),
        ] {
            assert!(
                serde_json::from_str::<HypervisorConfig>(&bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn vsock_channel_serde_allocates_unless_pinned() {
        let allocate = AgentChannel::Vsock { guest_cid: None };
        let json = serde_json::to_string(&allocate).expect("serialize");
        assert_eq!(json, r#"{"kind":"vsock"}"#);
        assert_eq!(
            serde_json::from_str::<AgentChannel>(&json).expect("deserialize"),
            allocate
        );
        // A config written when the CID was required still reads, as a pinned one.
        let pinned: AgentChannel =
            serde_json::from_str(r#"{"kind":"vsock","guest_cid":5}"#).expect("deserialize");
        assert_eq!(pinned, AgentChannel::Vsock { guest_cid: Some(5) });
    }

    #[test]
    fn kernel_params_are_appended() {
        let mut cfg = HypervisorConfig::new("/k", None);
        assert_eq!(cfg.full_kernel_params(), DEFAULT_KERNEL_PARAMS);
        cfg.kernel_params = " memhp_default_state=online ".into();
        assert_eq!(
            cfg.full_kernel_params(),
            format!("{DEFAULT_KERNEL_PARAMS} memhp_default_state=online")
        );
    }

    #[test]
    fn sizes_a_vm_can_grow_to() {
        let mut c = HypervisorConfig::new("/k", None);
        c.vcpus = 1;
        c.max_vcpus = 4;
        c.memory_mib = 256;
        c.memory_slots = 2;
        c.max_memory_mib = 1024;
        c.validate_shape().expect("valid");
        let size = |vcpus, memory_mib| VmSize { vcpus, memory_mib };
        for ok in [size(1, 256), size(4, 1024), size(2, 512), size(1, 1024)] {
            c.check_size(ok).expect("in range");
        }
        // A request at the maximum is no boot config (no room left for the slots), but a VM
        // booted with `c` grows to it: the rule for sizes is not the rule for boot configs.
        let mut at_max = c.clone();
        at_max.memory_mib = 1024;
        assert!(matches!(
            at_max.validate_shape(),
            Err(ConfigError::SlotsWithoutMaxMemory)
        ));
        assert!(matches!(
            c.check_size(size(5, 256)),
            Err(ConfigError::VcpusOutOfRange {
                vcpus: 5,
                min: 1,
                max: 4
            })
        ));
        assert!(matches!(
            c.check_size(size(0, 256)),
            Err(ConfigError::VcpusOutOfRange { vcpus: 0, .. })
        ));
        assert!(matches!(
            c.check_size(size(1, 1025)),
            Err(ConfigError::MemoryOutOfRange {
                memory_mib: 1025,
                min: 256,
                max: 1024
            })
        ));
        assert!(matches!(
            c.check_size(size(1, 128)),
            Err(ConfigError::MemoryOutOfRange {
                memory_mib: 128,
                ..
            })
        ));
        c.memory_slots = 0;
        assert!(matches!(
            c.check_size(size(1, 512)),
            Err(ConfigError::NoMemoryHotplug {
                memory_mib: 512,
                boot_mib: 256
            })
        ));
        c.check_size(size(1, 256)).expect("no growth needs no slot");
    }
}
