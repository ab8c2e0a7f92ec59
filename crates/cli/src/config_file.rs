//! The configuration file: TOML with Kata-like sections and names, its loading (`--config`,
//! else [`SYSTEM_CONFIG`], else the embedded default), relative-path resolution, and checks
//! whose errors name the key and, where it can be found, the line.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vmfactory_factory::cache_service::check_endpoint;
use vmfactory_factory::{
    error_chain, CacheServiceError, FactoryConfig, FactoryConfigError, DEFAULT_PRESTART,
    DEFAULT_TEMPLATE_PATH,
};
use vmfactory_hypervisor::{Accel, AgentChannel, HypervisorConfig, MachineType};
use vmfactory_net::NetworkConfig;
use vmfactory_proxy::ProxyKind;
use vmfactory_vm::{AgentTimeout, VmAgentConfig, VmConfig};

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The system-wide configuration, used when `--config` is not given and the file exists.
pub const SYSTEM_CONFIG: &str = "/etc/vmfactory/config.toml";

/// The largest configuration file read, in bytes (the default is about 2 KiB). The file is
/// read as every file vmfactory reads: a symlink, a FIFO or a device is refused at once.
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// Where the VM-cache server listens by default (Kata's `vm_cache_endpoint` is a socket path).
pub const DEFAULT_CACHE_ENDPOINT: &str = "/run/vc/cache.sock";

/// Where relative guest paths of the embedded default point: `$VMFACTORY_GUEST_DIR`, else the
/// `target/guest` of the checkout this binary was built from (what `cargo xtask guest` fills).
pub fn default_guest_dir() -> PathBuf {
    match std::env::var_os("VMFACTORY_GUEST_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => normalize(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest")),
    }
}

/// Removes `..` and `.` lexically (the compile-time path has no symlinks to care about).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read: missing, a symlink, not a regular file, over
    /// [`MAX_CONFIG_SIZE`], or unreadable (the cause names the path).
    #[error("Cannot read config")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vmfactory_persist::Error,
    },
    /// The file is not UTF-8 text.
    #[error("Config {path} is not UTF-8 text")]
    NotText {
        /// The file.
        path: PathBuf,
        /// Where the first bad byte is.
        #[source]
        source: std::string::FromUtf8Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{origin}{}: {message}", at(*line, *column))]
    Parse {
        /// The file, or `embedded default`.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// Parsed, but the values do not make a usable factory.
    #[error("{origin}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        /// The file, or `embedded default`.
        origin: String,
        /// The line of the offending key, when it is in the file.
        line: Option<usize>,
        /// What is wrong, naming the key.
        message: String,
    },
}

fn at(line: usize, column: usize) -> String {
    format!(" line {line}, column {column}")
}

// ---- The file's shape -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    hypervisor: HypervisorSection,
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    proxy: ProxySection,
    #[serde(default)]
    factory: FactorySection,
    #[serde(default)]
    runtime: RuntimeSection,
    #[serde(default)]
    network: NetworkSection,
}

/// `[network]`: off by default (a VM without a NIC is the tighter sandbox, and networking
/// needs root, `nft` and changes to the host's firewall and forwarding).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSection {
    #[serde(default)]
    enable: bool,
    #[serde(default = "default_subnet")]
    subnet: vmfactory_net::ipnet::Ipv4Net,
    #[serde(default = "yes")]
    egress: bool,
}

fn default_subnet() -> vmfactory_net::ipnet::Ipv4Net {
    vmfactory_net::DEFAULT_SUBNET
}

fn yes() -> bool {
    true
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self {
            enable: false,
            subnet: default_subnet(),
            egress: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HypervisorSection {
    qemu: QemuSection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ChannelName {
    VirtioSerial,
    Vsock,
    HybridVsock,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QemuSection {
    #[serde(default = "default_qemu")]
    path: PathBuf,
    kernel: PathBuf,
    #[serde(default)]
    initrd: Option<PathBuf>,
    #[serde(default)]
    image: Option<PathBuf>,
    #[serde(default)]
    kernel_params: String,
    #[serde(default = "one")]
    default_vcpus: u32,
    #[serde(default)]
    default_maxvcpus: Option<u32>,
    #[serde(default = "default_memory")]
    default_memory: u64,
    #[serde(default)]
    memory_slots: u32,
    #[serde(default)]
    default_maxmemory: Option<u64>,
    #[serde(default = "default_machine")]
    machine_type: MachineType,
    #[serde(default = "default_accel")]
    accel: Accel,
    #[serde(default)]
    cpu_model: Option<String>,
    #[serde(default = "default_channel")]
    agent_channel: ChannelName,
    /// vsock: unset allocates a CID per VM; hybrid vsock: unset is [`HYBRID_VSOCK_CID`].
    #[serde(default)]
    guest_cid: Option<u32>,
    #[serde(default = "default_vsock_backend")]
    vhost_device_vsock: PathBuf,
    #[serde(default)]
    tcg_tb_size: Option<u32>,
    #[serde(default = "default_disk_slots")]
    disk_slots: u32,
    /// Kata's name for extra `-machine` options; unset is the machine's lean default.
    #[serde(default)]
    machine_accelerators: Option<String>,
    #[serde(default)]
    clone_thp: bool,
    /// Kata's name: the NIC's packets stay in QEMU even where `/dev/vhost-net` exists.
    #[serde(default)]
    disable_vhost_net: bool,
    #[serde(default)]
    vmgenid: bool,
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}
fn one() -> u32 {
    1
}
fn default_memory() -> u64 {
    256
}
fn default_disk_slots() -> u32 {
    vmfactory_hypervisor::disk::DEFAULT_DISK_SLOTS
}
fn default_machine() -> MachineType {
    MachineType::Q35
}
fn default_accel() -> Accel {
    Accel::Auto
}
fn default_channel() -> ChannelName {
    ChannelName::VirtioSerial
}
/// The guest CID of hybrid vsock when none is set: each VM has its own backend, so all can
/// use the first guest CID.
const HYBRID_VSOCK_CID: u32 = 3;
fn default_vsock_backend() -> PathBuf {
    PathBuf::from("vhost-device-vsock")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    #[serde(default = "dial_ms")]
    dial_timeout_ms: u64,
    #[serde(default = "call_ms")]
    call_timeout_ms: u64,
    #[serde(default = "ready_ms")]
    ready_timeout_ms: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
fn dial_ms() -> u64 {
    ms(vmfactory_vm::DEFAULT_DIAL_TIMEOUT)
}
fn call_ms() -> u64 {
    ms(vmfactory_vm::DEFAULT_CALL_TIMEOUT)
}
fn ready_ms() -> u64 {
    ms(vmfactory_vm::DEFAULT_READY_TIMEOUT)
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            dial_timeout_ms: dial_ms(),
            call_timeout_ms: call_ms(),
            ready_timeout_ms: ready_ms(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxySection {
    #[serde(default)]
    kind: ProxyKind,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FactorySection {
    #[serde(default)]
    enable_template: bool,
    #[serde(default = "default_template_path")]
    template_path: PathBuf,
    #[serde(default)]
    vm_cache_number: u32,
    #[serde(default = "default_endpoint")]
    vm_cache_endpoint: PathBuf,
    #[serde(default = "default_prestart")]
    prestart: u32,
}

fn default_template_path() -> PathBuf {
    PathBuf::from(DEFAULT_TEMPLATE_PATH)
}
fn default_prestart() -> u32 {
    DEFAULT_PRESTART
}
fn default_endpoint() -> PathBuf {
    PathBuf::from(DEFAULT_CACHE_ENDPOINT)
}

impl Default for FactorySection {
    fn default() -> Self {
        Self {
            enable_template: false,
            template_path: default_template_path(),
            vm_cache_number: 0,
            vm_cache_endpoint: default_endpoint(),
            prestart: DEFAULT_PRESTART,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeSection {
    #[serde(default = "default_run_root")]
    run_root: PathBuf,
}

fn default_run_root() -> PathBuf {
    PathBuf::from(vmfactory_persist::DEFAULT_ROOT)
}

impl Default for RuntimeSection {
    fn default() -> Self {
        Self {
            run_root: default_run_root(),
        }
    }
}

// ---- The resolved settings ----------------------------------------------------------------

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where it came from (a path, or `embedded default`).
    pub origin: String,
    /// The base VM config (what `get` sizes up and what templates are made of).
    pub vm: VmConfig,
    /// `[factory] enable_template`.
    pub template: bool,
    /// `[factory] template_path`.
    pub template_path: PathBuf,
    /// `[factory] vm_cache_number`.
    pub cache_number: u32,
    /// `[factory] vm_cache_endpoint`.
    pub endpoint: PathBuf,
    /// `[factory] prestart`: pre-started clones the VM-cache server's template keeps.
    pub prestart: u32,
    /// `[network]`'s subnet and egress, also when `enable` is off (`run --net` uses them).
    pub network: NetworkConfig,
    /// The source text, to find the line of a key in later errors.
    source: String,
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)
    }
}

/// Where the configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file.
    File(PathBuf),
    /// [`DEFAULT_TOML`].
    Embedded,
}

/// `--config`, else [`SYSTEM_CONFIG`] if it exists, else the embedded default.
pub async fn choose(explicit: Option<&Path>) -> Source {
    if let Some(p) = explicit {
        return Source::File(p.to_owned());
    }
    match tokio::fs::try_exists(SYSTEM_CONFIG).await {
        Ok(true) => Source::File(PathBuf::from(SYSTEM_CONFIG)),
        _ => Source::Embedded,
    }
}

/// Reads, parses and checks (without touching guest files) the configuration from `source`.
pub async fn load(source: &Source) -> Result<Settings, ConfigFileError> {
    match source {
        Source::Embedded => parse("embedded default", DEFAULT_TOML, &default_guest_dir()),
        Source::File(path) => {
            let bytes = vmfactory_persist::read_limited(path, MAX_CONFIG_SIZE)
                .await
                .map_err(|source| ConfigFileError::Read {
                    path: path.clone(),
                    source,
                })?;
            let text = String::from_utf8(bytes).map_err(|source| ConfigFileError::NotText {
                path: path.clone(),
                source,
            })?;
            let base = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
                _ => PathBuf::from("."),
            };
            let base = std::path::absolute(&base).unwrap_or(base);
            parse(&path.display().to_string(), &text, &base)
        }
    }
}

/// Parses `text` (from `origin`), resolves relative guest paths against `base` and checks the
/// values (no file access).
pub fn parse(origin: &str, text: &str, base: &Path) -> Result<Settings, ConfigFileError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigFileError::Parse {
            origin: origin.to_owned(),
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    })?;
    let settings = resolve(origin, text, file, base);
    settings.check()?;
    Ok(settings)
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The 1-based line where `key` is set in `[section]` of `text`, if it is.
fn key_line(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            current = name.trim().to_owned();
            continue;
        }
        let Some((k, _)) = line.split_once('=') else {
            continue;
        };
        if current == section && k.trim().trim_matches('"') == key {
            return Some(i + 1);
        }
    }
    None
}

/// `path` against `base` when relative and meant as a file path (a bare name such as
/// `qemu-system-x86_64` is left for a `PATH` lookup when `bare_is_command`).
fn against(base: &Path, path: PathBuf, bare_is_command: bool) -> PathBuf {
    let bare = path.components().count() == 1 && !path.as_os_str().is_empty();
    if path.is_absolute() || (bare_is_command && bare) {
        path
    } else {
        base.join(path)
    }
}

fn resolve(origin: &str, text: &str, file: FileConfig, base: &Path) -> Settings {
    let q = file.hypervisor.qemu;
    let mut hv = HypervisorConfig::new(
        against(base, q.kernel, false),
        q.initrd.map(|p| against(base, p, false)),
    );
    hv.qemu_path = against(base, q.path, true);
    hv.image = q.image.map(|p| against(base, p, false));
    hv.kernel_params = q.kernel_params;
    hv.vcpus = q.default_vcpus;
    hv.max_vcpus = q.default_maxvcpus.unwrap_or(q.default_vcpus);
    hv.memory_mib = q.default_memory;
    hv.memory_slots = q.memory_slots;
    hv.disk_slots = q.disk_slots;
    hv.vmgenid = q.vmgenid;
    hv.max_memory_mib = q.default_maxmemory.unwrap_or(q.default_memory);
    hv.machine = q.machine_type;
    hv.accel = q.accel;
    hv.cpu_model = q.cpu_model;
    hv.tcg_tb_size_mib = q.tcg_tb_size;
    hv.machine_options = q.machine_accelerators;
    hv.clone_thp = q.clone_thp;
    hv.agent_channel = match q.agent_channel {
        ChannelName::VirtioSerial => AgentChannel::VirtioSerial,
        ChannelName::Vsock => AgentChannel::Vsock {
            guest_cid: q.guest_cid,
        },
        ChannelName::HybridVsock => AgentChannel::HybridVsock {
            backend: against(base, q.vhost_device_vsock, true),
            guest_cid: q.guest_cid.unwrap_or(HYBRID_VSOCK_CID),
        },
    };
    let mut vm = VmConfig::new(hv);
    vm.agent = VmAgentConfig::new(
        Duration::from_millis(file.agent.call_timeout_ms),
        Duration::from_millis(file.agent.dial_timeout_ms),
        Duration::from_millis(file.agent.ready_timeout_ms),
    );
    vm.proxy = file.proxy.kind;
    vm.run_root = file.runtime.run_root;
    let network = NetworkConfig::new(file.network.subnet).with_egress(file.network.egress);
    if file.network.enable {
        vm = vm.with_network(network.clone());
        if let Some(nic) = &mut vm.hypervisor.nic {
            nic.vhost = q.disable_vhost_net.then_some(false);
        }
    }
    Settings {
        origin: origin.to_owned(),
        vm,
        template: file.factory.enable_template,
        template_path: file.factory.template_path,
        cache_number: file.factory.vm_cache_number,
        endpoint: file.factory.vm_cache_endpoint,
        prestart: file.factory.prestart,
        network,
        source: text.to_owned(),
    }
}

const QEMU: &str = "hypervisor.qemu";

/// The section, key and message, in the file's own names, of a rule the library refused.
/// `None` for a rule that no single key breaks (e.g. a run root too long for its sockets).
fn config_key(e: &FactoryConfigError) -> Option<(&'static str, &'static str, String)> {
    use vmfactory_hypervisor::ConfigError as Hv;
    use vmfactory_vm::ConfigError as Vm;
    use FactoryConfigError as F;
    Some(match e {
        F::RelativeTemplatePath { path } => (
            "factory",
            "template_path",
            format!("template_path must be an absolute path, not {}", path.display()),
        ),
        F::UnsafeTemplatePath { .. } => ("factory", "template_path", e.to_string()),
        F::NotTemplatable(Hv::TemplateWithImage) => (
            QEMU,
            "image",
            "enable_template needs an initrd guest: a disk image cannot be shared by clones".into(),
        ),
        F::NotTemplatable(Hv::TemplateWithoutInitrd) => (
            "factory",
            "enable_template",
            "enable_template needs [hypervisor.qemu] initrd".into(),
        ),
        F::NotTemplatable(Hv::HybridVsockWithTemplate) => (
            QEMU,
            "agent_channel",
            "enable_template cannot use agent_channel = \"hybrid-vsock\" (it blocks migration)"
                .into(),
        ),
        F::NotTemplatable(Hv::PinnedCidWithTemplate { cid }) => (
            QEMU,
            "guest_cid",
            format!(
                "enable_template with agent_channel = \"vsock\" cannot pin guest_cid = {cid}: \
                 leave it unset and each clone gets its own"
            ),
        ),
        F::Vm(Vm::Hypervisor(hv)) => match hv {
            Hv::ZeroVcpus => (
                QEMU,
                "default_vcpus",
                "default_vcpus must be at least 1".into(),
            ),
            Hv::TooManyVcpus { vcpus, max_vcpus } => (
                QEMU,
                "default_maxvcpus",
                format!("default_vcpus ({vcpus}) exceeds default_maxvcpus ({max_vcpus})"),
            ),
            Hv::ZeroMemory => (
                QEMU,
                "default_memory",
                "default_memory must be at least 1 MiB".into(),
            ),
            Hv::TooMuchMemory {
                memory_mib,
                max_memory_mib,
            } => (
                QEMU,
                "default_maxmemory",
                format!(
                    "default_memory ({memory_mib} MiB) exceeds default_maxmemory ({max_memory_mib} MiB)"
                ),
            ),
            Hv::MemoryOverLimit { limit, .. } => (
                QEMU,
                "default_maxmemory",
                format!("default_maxmemory exceeds {limit} MiB"),
            ),
            Hv::SlotsWithoutMaxMemory => (
                QEMU,
                "memory_slots",
                "memory_slots needs default_maxmemory above default_memory".into(),
            ),
            Hv::InvalidCpuModel(_) => (QEMU, "cpu_model", hv.to_string()),
            Hv::InvalidMachineOptions(_) => (QEMU, "machine_accelerators", hv.to_string()),
            Hv::HostCpuWithoutKvm => (
                QEMU,
                "cpu_model",
                "cpu_model = \"host\" needs KVM: set accel = \"auto\" or \"kvm\", or another model"
                    .into(),
            ),
            Hv::ReservedCid { cid } => (
                QEMU,
                "guest_cid",
                format!("guest_cid = {cid} is reserved: use 3 to 4294967294"),
            ),
            Hv::HotplugUnsupported { machine } => (
                QEMU,
                "machine_type",
                format!(
                    "machine_type = \"{machine}\" does not support hotplug: set default_maxvcpus = default_vcpus and memory_slots = 0"
                ),
            ),
            _ => return None,
        },
        F::Vm(Vm::ZeroTimeout { what }) => {
            let key = match what {
                AgentTimeout::Dial => "dial_timeout_ms",
                AgentTimeout::Call => "call_timeout_ms",
                AgentTimeout::Ready => "ready_timeout_ms",
            };
            ("agent", key, format!("{key} must not be 0"))
        }
        F::Vm(Vm::Network(e)) => ("network", "subnet", e.to_string()),
        F::Vm(Vm::RelativeRunRoot { path }) => (
            "runtime",
            "run_root",
            format!("run_root must be an absolute path, not {}", path.display()),
        ),
        _ => return None,
    })
}

impl Settings {
    /// An [`ConfigFileError::Invalid`] about `[section] key`.
    fn invalid(&self, section: &str, key: &str, message: String) -> ConfigFileError {
        ConfigFileError::Invalid {
            origin: self.origin.clone(),
            line: key_line(&self.source, section, key),
            message,
        }
    }

    /// The factory config `init` uses: template and cache as configured, no endpoint.
    pub fn factory_config(&self) -> FactoryConfig {
        let mut c = FactoryConfig::new(self.vm.clone());
        c.template = self.template;
        c.template_path = self.template_path.clone();
        c.cache = self.cache_number;
        c.prestart = self.prestart;
        c
    }

    /// Checks the values with the library's own rules (no file access) and names the key at
    /// fault: the VM-cache endpoint with [`check_endpoint`], the rest with
    /// [`FactoryConfig::validate`].
    pub fn check(&self) -> Result<(), ConfigFileError> {
        if let Err(e) = check_endpoint(&self.endpoint) {
            let message = match &e {
                CacheServiceError::RelativeEndpoint { path } => format!(
                    "vm_cache_endpoint must be an absolute path, not {}",
                    path.display()
                ),
                CacheServiceError::EndpointTooLong { max, .. } => {
                    format!("vm_cache_endpoint is longer than {max} bytes")
                }
                other => error_chain(other),
            };
            return Err(self.invalid("factory", "vm_cache_endpoint", message));
        }
        match self.factory_config().validate() {
            Ok(()) => Ok(()),
            Err(e) => Err(match config_key(&e) {
                Some((section, key, message)) => self.invalid(section, key, message),
                None => ConfigFileError::Invalid {
                    origin: self.origin.clone(),
                    line: None,
                    message: error_chain(&e),
                },
            }),
        }
    }

    /// Also checks that the guest files (kernel, initrd, image) are readable.
    pub async fn check_files(&self) -> Result<(), ConfigFileError> {
        use vmfactory_hypervisor::ConfigError as Hv;
        match self.vm.validate_async().await {
            Ok(()) => Ok(()),
            Err(vmfactory_vm::ConfigError::Hypervisor(e)) => {
                let key = match &e {
                    Hv::KernelUnreadable { .. } => Some("kernel"),
                    Hv::InitrdUnreadable { .. } => Some("initrd"),
                    Hv::ImageUnreadable { .. } => Some("image"),
                    _ => None,
                };
                let mut message = error_chain(&e);
                if self.origin == "embedded default" {
                    message.push_str(" (run `cargo xtask guest`, or set VMFACTORY_GUEST_DIR)");
                }
                Err(match key {
                    Some(key) => self.invalid(QEMU, key, message),
                    None => ConfigFileError::Invalid {
                        origin: self.origin.clone(),
                        line: None,
                        message,
                    },
                })
            }
            Err(e) => Err(ConfigFileError::Invalid {
                origin: self.origin.clone(),
                line: None,
                message: error_chain(&e),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
