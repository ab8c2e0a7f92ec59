//! [`VmConfig`]: what a VM is made of (hypervisor, agent, proxy, run root), its validation and
//! its wire form (the seed's `VMConfig.ToGrpc` / `GrpcToVMConfig`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmfactory_hypervisor::{AgentChannel, HypervisorConfig, NicConfig};
use vmfactory_net::NetworkConfig;
use vmfactory_persist::DEFAULT_ROOT;
use vmfactory_proxy::ProxyKind;

use crate::envelope::{self, CONFIG_KIND};
use crate::error::{AgentTimeout, ConfigError, Result};

/// Default bound on each agent call.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on dialing the agent.
pub const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default bound on a boot until the agent answers `Check` (TCG boots take ~2 s; slow CI hosts
/// much longer).
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest unix socket path (`sun_path` is 108 bytes with the terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Length of a VM id (a hyphenated UUID).
const ID_LEN: usize = 36;

/// How the host talks to a VM's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmAgentConfig {
    /// Bound on each RPC, in milliseconds on the wire.
    #[serde(with = "millis", default = "default_call")]
    pub call_timeout: Duration,
    /// Bound on dialing the agent, in milliseconds on the wire.
    #[serde(with = "millis", default = "default_dial")]
    pub dial_timeout: Duration,
    /// Bound on waiting for the agent to answer `Check` with `SERVING` after a boot (and after
    /// a re-attach), in milliseconds on the wire.
    #[serde(with = "millis", default = "default_ready")]
    pub ready_timeout: Duration,
}

fn default_call() -> Duration {
    DEFAULT_CALL_TIMEOUT
}

fn default_dial() -> Duration {
    DEFAULT_DIAL_TIMEOUT
}

fn default_ready() -> Duration {
    DEFAULT_READY_TIMEOUT
}

impl Default for VmAgentConfig {
    fn default() -> Self {
        Self {
            call_timeout: DEFAULT_CALL_TIMEOUT,
            dial_timeout: DEFAULT_DIAL_TIMEOUT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

impl VmAgentConfig {
    /// Bounds of `call_timeout` per RPC, `dial_timeout` on dialing and `ready_timeout` on the
    /// agent's first `SERVING` answer.
    pub fn new(call_timeout: Duration, dial_timeout: Duration, ready_timeout: Duration) -> Self {
        Self {
            call_timeout,
            dial_timeout,
            ready_timeout,
        }
    }

    /// The agent crate's view of these timeouts.
    pub fn client_config(&self) -> vmfactory_agent::AgentConfig {
        vmfactory_agent::AgentConfig::new(self.call_timeout, self.dial_timeout)
    }
}

/// Everything a new VM needs (the seed's `VMConfig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmConfig {
    /// The hypervisor (QEMU) configuration.
    pub hypervisor: HypervisorConfig,
    /// Agent timeouts.
    #[serde(default)]
    pub agent: VmAgentConfig,
    /// The console proxy kind.
    #[serde(default)]
    pub proxy: ProxyKind,
    /// The persist root: the VM's storage, sockets and logs live in `<run_root>/vm/<id>/`.
    #[serde(default = "default_root")]
    pub run_root: PathBuf,
    /// The VM's network (see `vmfactory-net`): a namespace of its own, a unique address on the
    /// host. Set with [`VmConfig::with_network`], which gives the hypervisor its NIC too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
}

fn default_root() -> PathBuf {
    PathBuf::from(DEFAULT_ROOT)
}

impl VmConfig {
    /// A config for `hypervisor` with default agent timeouts, the builtin proxy and the
    /// default run root ([`DEFAULT_ROOT`], `/run/vc`).
    pub fn new(hypervisor: HypervisorConfig) -> Self {
        Self {
            hypervisor,
            agent: VmAgentConfig::default(),
            proxy: ProxyKind::default(),
            run_root: default_root(),
            network: None,
        }
    }

    /// This config with a network: `network` on the host and a virtio-net NIC in the VM
    /// ([`vmfactory_net::GUEST_MAC`], vhost-net where the host has it).
    pub fn with_network(mut self, network: NetworkConfig) -> Self {
        self.hypervisor.nic = Some(NicConfig::new(vmfactory_net::mac_string(
            &vmfactory_net::GUEST_MAC,
        )));
        self.network = Some(network);
        self
    }

    /// This config without the hypervisor's template role
    /// ([`HypervisorConfig::without_template`]).
    pub fn without_template(&self) -> Self {
        Self {
            hypervisor: self.hypervisor.without_template(),
            ..self.clone()
        }
    }

    /// Checks everything except that the kernel, initrd and image are readable (no file
    /// system access, so it may run anywhere).
    pub fn validate_shape(&self) -> std::result::Result<(), ConfigError> {
        self.hypervisor
            .validate_shape()
            .map_err(ConfigError::Hypervisor)?;
        for (what, t) in [
            (AgentTimeout::Call, self.agent.call_timeout),
            (AgentTimeout::Dial, self.agent.dial_timeout),
            (AgentTimeout::Ready, self.agent.ready_timeout),
        ] {
            if t.is_zero() {
                return Err(ConfigError::ZeroTimeout { what });
            }
        }
        match (&self.network, &self.hypervisor.nic) {
            (Some(net), Some(_)) => net.validate().map_err(ConfigError::Network)?,
            (None, None) => {}
            (Some(_), None) => return Err(ConfigError::NetworkWithoutNic),
            (None, Some(_)) => return Err(ConfigError::NicWithoutNetwork),
        }
        if !self.run_root.is_absolute() {
            return Err(ConfigError::RelativeRunRoot {
                path: self.run_root.clone(),
            });
        }
        let max = max_root_len(&self.hypervisor);
        let len = self.run_root.as_os_str().len();
        if len > max {
            return Err(ConfigError::RunRootTooLong {
                path: self.run_root.clone(),
                len,
                max,
            });
        }
        Ok(())
    }

    /// Checks the whole config, including that the guest files are readable.
    ///
    /// Opens files: call it from a blocking context, or use [`VmConfig::validate_async`].
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        self.validate_shape()?;
        self.hypervisor.validate().map_err(ConfigError::Hypervisor)
    }

    /// [`VmConfig::validate`] on tokio's blocking pool.
    pub async fn validate_async(&self) -> std::result::Result<(), ConfigError> {
        self.validate_shape()?;
        let cfg = self.clone();
        tokio::task::spawn_blocking(move || cfg.validate())
            .await
            .map_err(ConfigError::Task)?
    }

    /// The wire form of this config (versioned JSON).
    pub fn to_wire(&self) -> Result<Vec<u8>> {
        Ok(envelope::encode(CONFIG_KIND, self)?)
    }

    /// Decodes and shape-validates a config from its wire form. Bad bytes (corrupt, truncated,
    /// oversized, another kind or version) are a [`crate::WireError`]; a decoded but invalid config is
    /// a [`ConfigError`].
    pub fn from_wire(bytes: &[u8]) -> Result<Self> {
        let cfg: Self = envelope::decode(CONFIG_KIND, bytes)?;
        cfg.validate_shape()?;
        Ok(cfg)
    }

    /// The directory a VM `id` of this config lives in.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.run_root.join("vm").join(id)
    }
}

/// Longest run root for which every socket of a VM with `cfg` fits in a unix socket address.
fn max_root_len(cfg: &HypervisorConfig) -> usize {
    // `console.sock` is the longest socket name every VM has; hybrid vsock adds longer ones.
    let longest = match cfg.agent_channel {
        AgentChannel::HybridVsock { .. } => "vhost-user-vsock.sock".len(),
        _ => "console.sock".len(),
    };
    // <root>/vm/<id>/<socket>
    MAX_SOCKET_PATH - "/vm/".len() - ID_LEN - "/".len() - longest
}

/// (De)serialises a [`Duration`] as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use std::path::Path;

    fn cfg() -> VmConfig {
        let mut c = VmConfig::new(HypervisorConfig::new("/k", None));
        c.run_root = "/run/vc".into();
        c
    }

    #[test]
    fn defaults_are_valid_in_shape() {
        cfg().validate_shape().expect("valid");
        assert_eq!(cfg().vm_dir("a"), Path::new("/run/vc/vm/a"));
    }

    #[test]
    fn typed_validation_errors() {
        let mut c = cfg();
        c.hypervisor.vcpus = 0;
        assert!(matches!(
            c.validate_shape(),
            Err(ConfigError::Hypervisor(
                vmfactory_hypervisor::ConfigError::ZeroVcpus
            ))
        ));
        let mut c = cfg();
        c.agent.ready_timeout = Duration::ZERO;
        assert!(matches!(
            c.validate_shape(),
            Err(ConfigError::ZeroTimeout {
                what: AgentTimeout::Ready
            })
        ));
        let mut c = cfg();
        c.run_root = "run/vc".into();
        assert!(matches!(
            c.validate_shape(),
            Err(ConfigError::RelativeRunRoot { .. })
        ));
        let mut c = cfg();
        c.run_root = PathBuf::from(format!("/{}", "r".repeat(53)));
        c.validate_shape().expect("54 bytes fit with virtio-serial");
        c.run_root = PathBuf::from(format!("/{}", "r".repeat(54)));
        assert!(matches!(
            c.validate_shape(),
            Err(ConfigError::RunRootTooLong {
                len: 55,
                max: 54,
                ..
            })
        ));
        c.run_root = PathBuf::from(format!("/{}", "r".repeat(45)));
        c.hypervisor.agent_channel = AgentChannel::HybridVsock {
            backend: "/b".into(),
            guest_cid: 3,
        };
        assert!(matches!(
            c.validate_shape(),
            Err(ConfigError::RunRootTooLong { max: 45, .. })
        ));
    }

    #[tokio::test]
    async fn full_validation_reads_the_kernel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = cfg();
        c.hypervisor.kernel = dir.path().join("missing");
        assert!(matches!(
            c.validate_async().await,
            Err(ConfigError::Hypervisor(
                vmfactory_hypervisor::ConfigError::KernelUnreadable { .. }
            ))
        ));
        std::fs::write(&c.hypervisor.kernel, b"k").expect("write");
        c.validate_async().await.expect("valid");
    }

    #[test]
    fn wire_round_trip_and_defaults() {
        let mut c = cfg();
        c.proxy = ProxyKind::None;
        c.agent.call_timeout = Duration::from_millis(1500);
        let bytes = c.to_wire().expect("encode");
        assert_eq!(VmConfig::from_wire(&bytes).expect("decode"), c);

        // Only the hypervisor part is required in a config.
        let json = serde_json::to_value(&c.hypervisor).expect("json");
        let min: VmConfig =
            serde_json::from_value(serde_json::json!({ "hypervisor": json })).expect("minimal");
        assert_eq!(min.agent, VmAgentConfig::default());
        assert_eq!(min.proxy, ProxyKind::Builtin);
        assert_eq!(min.run_root, Path::new(DEFAULT_ROOT));
    }

    #[test]
    fn wire_rejects_invalid_config() {
        let mut c = cfg();
        c.agent.dial_timeout = Duration::ZERO;
        let bytes = c.to_wire().expect("encode");
        assert!(matches!(
            VmConfig::from_wire(&bytes),
            Err(Error::Config(ConfigError::ZeroTimeout {
                what: AgentTimeout::Dial
            }))
        ));
    }
}
