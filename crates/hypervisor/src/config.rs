//! [`HypervisorConfig`]: what a VM is made of, and its validation.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::disk::{DEFAULT_DISK_SLOTS, MAX_DISK_SLOTS};
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

    /// The `-machine` options a VM gets unless configured otherwise
    /// ([`HypervisorConfig::machine_options`]): on q35, no AHCI controller (`sata=off`), which
    /// no guest of ours uses and which costs ~1.5 MiB of every QEMU's anonymous memory
    /// (measured on idle clones and direct VMs, see docs/benchmarks.md).
    pub fn lean_options(self) -> &'static str {
        match self {
            Self::Q35 => "sata=off",
            Self::Pc | Self::Microvm => "",
        }
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
#[non_exhaustive]
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
    /// How many disks can be hot-plugged at once (see [`crate::Hypervisor::attach_disk`]).
    /// On q35 each is a `pcie-root-port` added at boot (q35's root bus takes no hot-plugged
    /// device); on pc disks go on `pci.0` and this only caps their number; microvm has no PCI
    /// and ignores it. At most [`crate::disk::MAX_DISK_SLOTS`]; 0 turns disk hotplug off.
    /// [`HypervisorConfig::new`] gives [`crate::disk::DEFAULT_DISK_SLOTS`]; a config written
    /// before the field existed reads as 0, which is what its VMs and templates booted with.
    #[serde(default)]
    pub disk_slots: u32,
    /// Extra `-machine` options after the machine type, as comma-separated `key=value` pairs
    /// (e.g. `sata=off,smbus=off`). They change the machine, so a template's clones must have
    /// the same. `None`: [`MachineType::lean_options`] of `machine`; `Some("")`: none. A config
    /// stored before the field existed reads as `Some("")`, which is what its VMs booted with.
    #[serde(default = "no_machine_options")]
    pub machine_options: Option<String>,
    /// Lets a clone's QEMU use transparent huge pages as the host allows. Off by default: a
    /// clone's guest RAM is a private file mapping whose copied pages are 4 KiB either way,
    /// so THP only rounds QEMU's own allocations up to 2 MiB (its ACPI-table ROM block, the
    /// TCG translation buffer), measured at ~3.6 MiB of an idle clone's PSS. Other VMs are
    /// left to the host's setting (their guest RAM gains from huge pages under KVM).
    #[serde(default)]
    pub clone_thp: bool,
    /// A VM generation id device (`-device vmgenid,guid=auto`): every QEMU start, each clone
    /// of a template included, gives the guest a new id, and a guest kernel with a VMGenID
    /// driver (Debian's 6.12, not its 6.1) reseeds its CRNG when the id changes. It is in the
    /// machine a template saves, so a template and its clones must agree on it. microvm
    /// ignores it: QEMU builds the device's ACPI table only on q35 and pc. Off by default:
    /// under TCG the guest's handling of the new id costs each clone more CPU (9 ms on 6.1,
    /// which has no driver; 13 ms on 6.12) than the host reseed it makes unnecessary (3 ms;
    /// docs/benchmarks.md, "VMGenID and the 6.12 kernel").
    #[serde(default)]
    pub vmgenid: bool,
    /// A virtio-net NIC on tap [`NIC_TAP`] of the network namespace pinned at
    /// [`NIC_NETNS`] in the run directory (made by `vmfactory-net` before the start). It is
    /// in the machine a template saves, so a template and its clones must agree on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<NicConfig>,
}

/// The pin of a VM's network namespace in its run directory.
pub const NIC_NETNS: &str = "netns";

/// The tap a VM's NIC uses, in its network namespace.
pub const NIC_TAP: &str = "tap0";

/// A VM's NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NicConfig {
    /// The guest's MAC (`aa:bb:cc:dd:ee:ff`): the same in every VM, each in a namespace of
    /// its own.
    pub mac: String,
    /// vhost-net (the kernel moves the packets): `None` uses it where `/dev/vhost-net`
    /// exists; `Some(true)` requires it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost: Option<bool>,
}

/// Where vhost-net is.
pub const VHOST_NET: &str = "/dev/vhost-net";

impl NicConfig {
    /// A NIC with the guest MAC `mac`, on vhost-net where the host has it.
    pub fn new(mac: impl Into<String>) -> Self {
        Self {
            mac: mac.into(),
            vhost: None,
        }
    }

    /// Checks the MAC: six hex pairs, unicast.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = || ConfigError::BadMac {
            mac: self.mac.clone(),
        };
        let bytes: Vec<&str> = self.mac.split(':').collect();
        if bytes.len() != 6 || bytes.iter().any(|b| b.len() != 2) {
            return Err(bad());
        }
        let first = u8::from_str_radix(bytes[0], 16).map_err(|_| bad())?;
        for b in &bytes[1..] {
            u8::from_str_radix(b, 16).map_err(|_| bad())?;
        }
        if first & 1 == 1 {
            return Err(bad());
        }
        Ok(())
    }
}

/// The serde default of [`HypervisorConfig::machine_options`]: none.
fn no_machine_options() -> Option<String> {
    Some(String::new())
}

impl HypervisorConfig {
    /// A config with 1 vCPU, 256 MiB, q35, `auto` accelerator, virtio-serial agent channel,
    /// no CPU or memory hotplug room, [`DEFAULT_DISK_SLOTS`] disk slots, no VM generation id
    /// device, and `qemu-system-x86_64` from `PATH`.
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
            disk_slots: DEFAULT_DISK_SLOTS,
            machine_options: None,
            clone_thp: false,
            vmgenid: false,
            nic: None,
        }
    }

    /// The `-machine` options this VM gets after its type: `machine_options`, else the
    /// machine's [`MachineType::lean_options`].
    pub fn effective_machine_options(&self) -> &str {
        self.machine_options
            .as_deref()
            .unwrap_or(self.machine.lean_options())
    }

    /// Whether the command line has a VM generation id device: [`HypervisorConfig::vmgenid`]
    /// on a machine with ACPI tables for it.
    pub fn has_vmgenid(&self) -> bool {
        self.vmgenid && !matches!(self.machine, MachineType::Microvm)
    }

    /// The `pcie-root-port`s the command line adds for disk hotplug: `disk_slots` on q35,
    /// none on the other machines.
    pub fn disk_root_ports(&self) -> u32 {
        match self.machine {
            MachineType::Q35 => self.disk_slots,
            MachineType::Pc | MachineType::Microvm => 0,
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
        if let Some(nic) = &self.nic {
            nic.validate()?;
        }
        if self.disk_slots > MAX_DISK_SLOTS {
            return Err(ConfigError::TooManyDiskSlots {
                slots: self.disk_slots,
                max: MAX_DISK_SLOTS,
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
        check_machine_options(self.effective_machine_options())?;
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

/// Checks `-machine` options: `key=value` pairs of letters, digits and `-_.`, comma-separated,
/// none setting `memory-backend` (the command line sets it), so a typo fails as a config error
/// and nothing can be smuggled into the option list.
fn check_machine_options(options: &str) -> Result<(), ConfigError> {
    if options.is_empty() {
        return Ok(());
    }
    let word = |w: &str| {
        !w.is_empty()
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let ok = options.split(',').all(|pair| {
        pair.split_once('=')
            .is_some_and(|(k, v)| word(k) && word(v) && k != "memory-backend")
    });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidMachineOptions(options.to_owned()))
    }
}

/// Opens `path` for reading (symlinks followed: guest files are often links) without waiting
/// on a FIFO or device, and checks it is a regular file (or, for a disk image, a block
/// device).
fn check_readable(path: &Path, block_device_ok: bool) -> std::io::Result<()> {
    open_regular(path, Symlinks::Follow, block_device_ok).map(drop)
}

#[cfg(test)]
mod tests;
