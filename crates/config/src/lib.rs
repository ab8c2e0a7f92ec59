//! The configuration file: TOML with Kata-like sections and names, its loading (`--config`,
//! else [`SYSTEM_CONFIG`], else the embedded default), relative-path resolution, and checks
//! whose errors name the key and, where it can be found, the line.

// The README crates.io shows, compiled as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vmfactory_factory::cache_service::check_endpoint;
use vmfactory_factory::metrics::{MetricsAddress, MetricsAddressError};
use vmfactory_factory::{
    error_chain, CacheServiceError, FactoryConfig, DEFAULT_PRESTART, DEFAULT_TEMPLATE_PATH,
};
use vmfactory_hypervisor::{Accel, AgentChannel, HypervisorConfig, MachineType};
use vmfactory_net::NetworkConfig;
use vmfactory_proxy::ProxyKind;
use vmfactory_vm::{VmAgentConfig, VmConfig};

/// The embedded default configuration.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The environment variable naming the configuration file (the CLI's `--config` wins over it).
pub const CONFIG_ENV: &str = "VMFACTORY_CONFIG";

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
    /// Parsed, but the values do not make a usable factory; or the one problem of the file.
    #[error("{origin}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Invalid {
        /// The file, or `embedded default`.
        origin: String,
        /// The line of the offending key, when it is in the file.
        line: Option<usize>,
        /// What is wrong, naming the key.
        message: String,
    },
    /// More than one problem, all found in one pass (unknown keys, values of the wrong type,
    /// and the first rule a value breaks). Its text is one line per problem.
    #[error("{} problems in {origin}{}", problems.len(), lines(origin, problems))]
    Problems {
        /// The file, or `embedded default`.
        origin: String,
        /// Every problem, by line.
        problems: Vec<Problem>,
    },
}

/// One thing wrong (or, as a warning, ignored) in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The 1-based line of the key, when it is in the file.
    pub line: Option<usize>,
    /// What, naming the section and key.
    pub message: String,
}

impl Problem {
    /// `ORIGIN line N: MESSAGE`.
    pub fn at(&self, origin: &str) -> String {
        match self.line {
            Some(l) => format!("{origin} line {l}: {}", self.message),
            None => format!("{origin}: {}", self.message),
        }
    }
}

fn lines(origin: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("\n{}", p.at(origin)))
        .collect()
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
    /// Kata's: 0 is the default (1), negative the host's CPUs.
    #[serde(default)]
    default_vcpus: i32,
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
    #[serde(default)]
    metrics_address: Option<String>,
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
            metrics_address: None,
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
    /// Kata keys the file sets that nothing reads, one `FILE line N: ...` each: printed by
    /// `config check`, logged once at warn by the other commands.
    pub warnings: Vec<String>,
    /// The line of each key the file sets, by our section and key name (Kata's
    /// `[agent.kata] dial_timeout` under `agent`, `dial_timeout_ms`), for later errors.
    lines: KeyLines,
    /// `[factory] metrics_address` as written (see [`Settings::metrics_address`]).
    metrics_address: Option<String>,
}

/// What "the host's maximum" is, for Kata's 0 and negative sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// CPUs this process may run on (what Kata's Go runtime counts as the host's).
    pub cpus: u32,
    /// The host's RAM in MiB; `None` when it cannot be read.
    pub memory_mib: Option<u64>,
}

/// Kata's cap on `default_maxvcpus` on x86_64 (its QEMU driver's `MaxVCPUs`): what 0 means
/// on a host with more CPUs.
pub const KATA_MAX_VCPUS: u32 = 240;

impl Host {
    /// This host: the CPUs from the affinity mask and cgroup quota, the RAM from
    /// `sysinfo(2)`.
    pub fn current() -> Self {
        let cpus = std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
        let memory_mib = nix::sys::sysinfo::sysinfo()
            .ok()
            .map(|i| i.ram_total() >> 20);
        Self { cpus, memory_mib }
    }
}

impl fmt::Display for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)
    }
}

/// Where each key is set: (our section, key) -> 1-based line.
type KeyLines = std::collections::BTreeMap<(&'static str, &'static str), usize>;

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
    // `available_parallelism` reads cgroup files: off the async threads.
    let host = tokio::task::spawn_blocking(Host::current)
        .await
        .unwrap_or(Host {
            cpus: 1,
            memory_mib: None,
        });
    match source {
        Source::Embedded => parse_on(
            "embedded default",
            DEFAULT_TOML,
            &default_guest_dir(),
            &host,
        ),
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
            parse_on(&path.display().to_string(), &text, &base, &host)
        }
    }
}

/// Parses `text` (from `origin`), resolves relative guest paths against `base` and checks the
/// values (no file access), with `host` for Kata's "0 is the host's maximum". Every unknown
/// key and value of the wrong type is reported at once; the rules of the values are checked
/// when the values could all be read.
pub fn parse_on(
    origin: &str,
    text: &str,
    base: &Path,
    host: &Host,
) -> Result<Settings, ConfigFileError> {
    let walked = walk::walk(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigFileError::Parse {
            origin: origin.to_owned(),
            line,
            column,
            message: e.message().trim().replace('\n', " "),
        }
    })?;
    let mut problems = walked.errors;
    let mut settings = None;
    if !walked.bad_values {
        match FileConfig::deserialize(toml::Value::Table(walked.table)) {
            Ok(file) => match resolve(origin, walked.lines, file, base, host) {
                Ok(s) => match s.check() {
                    Ok(()) => settings = Some(s),
                    Err(ConfigFileError::Invalid { line, message, .. }) => {
                        problems.push(Problem { line, message })
                    }
                    Err(e) => return Err(e),
                },
                Err(p) => problems.push(p),
            },
            // A key in keys.rs that its section's struct lacks (a bug), as serde says it.
            Err(e) => problems.push(Problem {
                line: None,
                message: e.message().trim().replace('\n', " "),
            }),
        }
    }
    // By line; those without one (a missing key, a rule of several keys) last.
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    let origin = origin.to_owned();
    match (settings, problems.len()) {
        (Some(mut s), 0) => {
            s.warnings = walked.warnings.iter().map(|w| w.at(&origin)).collect();
            Ok(s)
        }
        (_, 1) => {
            let Problem { line, message } = problems.remove(0);
            Err(ConfigFileError::Invalid {
                origin,
                line,
                message,
            })
        }
        _ => Err(ConfigFileError::Problems { origin, problems }),
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
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

/// Kata's sizes: `default_vcpus` 0 is 1 and negative the host's CPUs; `default_maxvcpus` 0
/// the host's CPUs up to [`KATA_MAX_VCPUS`]; `default_maxmemory` 0 the host's RAM.
fn sizes(q: &QemuSection, host: &Host) -> Result<(u32, u32, u64), Problem> {
    let vcpus = match q.default_vcpus {
        n if n < 0 => host.cpus,
        0 => 1,
        n => n.unsigned_abs(),
    };
    let max_vcpus = match q.default_maxvcpus {
        None => vcpus,
        Some(0) => host.cpus.min(KATA_MAX_VCPUS),
        Some(n) => n,
    };
    let max_memory = match q.default_maxmemory {
        None => q.default_memory,
        Some(0) => host.memory_mib.ok_or_else(|| Problem {
            line: None,
            message: "default_maxmemory = 0 means the host's memory, which cannot be read here"
                .into(),
        })?,
        Some(n) => n,
    };
    Ok((vcpus, max_vcpus, max_memory))
}

fn resolve(
    origin: &str,
    lines: KeyLines,
    file: FileConfig,
    base: &Path,
    host: &Host,
) -> Result<Settings, Problem> {
    let q = file.hypervisor.qemu;
    let (vcpus, max_vcpus, max_memory) = sizes(&q, host).map_err(|p| Problem {
        line: lines.get(&(QEMU, "default_maxmemory")).copied(),
        ..p
    })?;
    let mut hv = HypervisorConfig::new(
        against(base, q.kernel, false),
        q.initrd.map(|p| against(base, p, false)),
    );
    hv.qemu_path = against(base, q.path, true);
    hv.image = q.image.map(|p| against(base, p, false));
    hv.kernel_params = q.kernel_params;
    hv.vcpus = vcpus;
    hv.max_vcpus = max_vcpus;
    hv.memory_mib = q.default_memory;
    hv.memory_slots = q.memory_slots;
    hv.disk_slots = q.disk_slots;
    hv.vmgenid = q.vmgenid;
    hv.max_memory_mib = max_memory;
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
    Ok(Settings {
        origin: origin.to_owned(),
        vm,
        template: file.factory.enable_template,
        template_path: file.factory.template_path,
        cache_number: file.factory.vm_cache_number,
        endpoint: file.factory.vm_cache_endpoint,
        prestart: file.factory.prestart,
        metrics_address: file.factory.metrics_address,
        network,
        warnings: Vec::new(),
        lines,
    })
}

use rules::{config_key, QEMU};

impl Settings {
    /// An [`ConfigFileError::Invalid`] about `[section] key`.
    fn invalid(
        &self,
        section: &'static str,
        key: &'static str,
        message: String,
    ) -> ConfigFileError {
        ConfigFileError::Invalid {
            origin: self.origin.clone(),
            line: self.lines.get(&(section, key)).copied(),
            message,
        }
    }

    /// `[factory] metrics_address`: where the VM-cache server serves its metrics, if anywhere.
    pub fn metrics_address(&self) -> Result<Option<MetricsAddress>, ConfigFileError> {
        let Some(raw) = &self.metrics_address else {
            return Ok(None);
        };
        raw.parse().map(Some).map_err(|e| {
            let message = match e {
                MetricsAddressError::TooLong { max, .. } => {
                    format!("metrics_address: the socket path is longer than {max} bytes")
                }
                _ => format!(
                    "metrics_address must be IP:PORT (e.g. 127.0.0.1:9464) or unix:/ABSOLUTE/PATH, not {raw:?}"
                ),
            };
            self.invalid("factory", "metrics_address", message)
        })
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
        self.metrics_address()?;
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

mod keys;
mod qemu;
mod rules;
mod select;
mod walk;

pub use select::FactoryChoice;

#[cfg(test)]
mod tests;
