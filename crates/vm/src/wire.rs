//! [`VmState`]: what another process needs to re-attach to a running VM (the seed's
//! `VM.ToGrpc` / `NewVMFromGrpc`), in the envelope of `envelope.rs`.

use serde::{Deserialize, Serialize};
use vmfactory_agent::AgentUrl;
use vmfactory_hypervisor::{QemuState, QEMU_STATE_VERSION};

use crate::config::VmConfig;
use crate::endpoint::agent_url;
use crate::envelope::{decode, encode, VM_KIND};
use crate::error::{Result, WireError};

/// A running VM as another process needs it to re-attach (see [`crate::Vm::from_wire`]), and
/// as it is persisted in `<run_root>/vm/<id>/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// VM id.
    pub id: String,
    /// The config the VM was created with (including the proxy kind and run root).
    pub config: VmConfig,
    /// The hypervisor's wire form (pid and start time, sockets, hot-plugged devices, and so
    /// where the agent listens: see [`VmState::agent_url`]).
    pub hypervisor: QemuState,
    /// Current vCPUs (boot + hot-added).
    pub vcpus: u32,
    /// Current memory in MiB (boot + hot-added).
    pub memory_mib: u64,
    /// vCPUs hot-added but not yet onlined by [`crate::Vm::online_cpu_memory`].
    pub cpu_delta: u32,
    /// Guest mount points of hot-plugged disks, by disk id (the disks themselves are in
    /// `hypervisor`). Absent in states written before disks existed.
    #[serde(default)]
    pub mounts: std::collections::BTreeMap<String, String>,
    /// The VM's network (its namespace pin and addresses), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<vmfactory_net::VmNetwork>,
}

impl VmState {
    /// Encodes this state (versioned JSON envelope).
    pub fn to_wire(&self) -> Result<Vec<u8>> {
        Ok(encode(VM_KIND, self)?)
    }

    /// The URL the host dials to reach the agent, from the hypervisor state; `None` for a
    /// vsock VM whose state records no CID (its QEMU is not running).
    pub fn agent_url(&self) -> Option<AgentUrl> {
        self.hypervisor.agent_endpoint().map(|e| agent_url(&e))
    }

    /// Decodes and checks a state; see [`VmState::check`].
    pub fn from_wire(bytes: &[u8]) -> Result<Self> {
        let state: Self = decode(VM_KIND, bytes)?;
        state.check()?;
        Ok(state)
    }

    /// Checks that the parts agree: a valid id, the hypervisor state of the same VM, version and
    /// config, living in the VM's directory under the run root, an agent endpoint while its
    /// QEMU runs (a vsock VM's CID), and a config of valid shape.
    pub fn check(&self) -> Result<()> {
        let inconsistent = |reason: String| WireError::Inconsistent { reason };
        vmfactory_persist::validate_id(&self.id).map_err(|e| inconsistent(e.to_string()))?;
        let hv = &self.hypervisor;
        if hv.version != QEMU_STATE_VERSION {
            return Err(WireError::UnsupportedHypervisorVersion {
                found: hv.version,
                supported: QEMU_STATE_VERSION,
            }
            .into());
        }
        if hv.id != self.id {
            return Err(inconsistent(format!("hypervisor state is for VM {:?}", hv.id)).into());
        }
        if hv.config != self.config.hypervisor {
            return Err(inconsistent("hypervisor config differs from the VM config".into()).into());
        }
        if hv.run_dir() != self.config.vm_dir(&self.id) {
            return Err(inconsistent(format!(
                "run directory {} is not the VM's storage directory",
                hv.run_dir().display()
            ))
            .into());
        }
        if hv.pid.is_some() && hv.agent_endpoint().is_none() {
            return Err(inconsistent("a running vsock VM records no guest CID".into()).into());
        }
        self.config.validate_shape()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{CONFIG_KIND, MAX_WIRE_SIZE, WIRE_VERSION};
    use crate::error::{AgentTimeout, ConfigError, Error};
    use vmfactory_hypervisor::{AgentChannel, Hypervisor, HypervisorConfig};

    async fn state() -> VmState {
        let mut config = VmConfig::new(HypervisorConfig::new("/k", None));
        config.run_root = "/run/vc".into();
        let id = "0c3e7f5e-6a55-4b8e-9d0b-7b8b2f1d2a10";
        let hv = vmfactory_hypervisor::FakeHypervisor::new(
            id,
            config.hypervisor.clone(),
            config.vm_dir(id),
        );
        VmState {
            id: id.into(),
            hypervisor: hv.state().await,
            config,
            vcpus: 1,
            memory_mib: 256,
            cpu_delta: 0,
            mounts: Default::default(),
            network: None,
        }
    }

    fn with(bytes: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(bytes).expect("json");
        f(&mut v);
        serde_json::to_vec(&v).expect("json")
    }

    #[tokio::test]
    async fn round_trip() {
        let st = state().await;
        let bytes = st.to_wire().expect("encode");
        assert_eq!(VmState::from_wire(&bytes).expect("decode"), st);
        assert_eq!(
            st.agent_url().map(|u| u.to_string()),
            Some(format!("serial:///run/vc/vm/{}/agent.sock", st.id))
        );
    }

    #[tokio::test]
    async fn a_vsock_vm_hands_over_its_cid() {
        let mut st = state().await;
        st.config.hypervisor.agent_channel = AgentChannel::Vsock { guest_cid: None };
        st.hypervisor.config = st.config.hypervisor.clone();
        st.hypervisor.pid = Some(4242);
        st.hypervisor.vsock_cid = Some(90_001);
        let bytes = st.to_wire().expect("encode");
        let back = VmState::from_wire(&bytes).expect("decode");
        assert_eq!(back, st);
        assert_eq!(
            back.agent_url().map(|u| u.to_string()),
            Some("vsock://90001:1024".to_owned())
        );
        // A running vsock VM without its CID cannot be reached: refused, not guessed.
        let lost = with(&bytes, |v| {
            v["body"]["hypervisor"]["vsock_cid"] = serde_json::Value::Null;
        });
        assert!(matches!(
            VmState::from_wire(&lost),
            Err(Error::Wire(WireError::Inconsistent { .. }))
        ));
    }

    #[tokio::test]
    async fn version_1_with_its_agent_url_is_refused_by_version() {
        let bytes = state().await.to_wire().expect("encode");
        let v1 = with(&bytes, |v| {
            v["version"] = 1.into();
            v["body"]["agent_url"] = "serial:///x".into();
        });
        assert!(matches!(
            VmState::from_wire(&v1),
            Err(Error::Wire(WireError::UnsupportedVersion { found: 1, .. }))
        ));
    }

    #[tokio::test]
    async fn bad_bytes_are_typed_errors() {
        let bytes = state().await.to_wire().expect("encode");
        let wire_err = |b: &[u8]| match VmState::from_wire(b) {
            Err(Error::Wire(e)) => e,
            other => panic!("expected a wire error, got {other:?}"),
        };
        assert!(matches!(wire_err(b""), WireError::Corrupt(_)));
        assert!(matches!(
            wire_err(b"\xff\x00garbage"),
            WireError::Corrupt(_)
        ));
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            assert!(matches!(wire_err(&bytes[..cut]), WireError::Corrupt(_)));
        }
        let big = vec![b' '; MAX_WIRE_SIZE + 1];
        assert!(matches!(
            wire_err(&big),
            WireError::TooLarge { size, .. } if size == MAX_WIRE_SIZE + 1
        ));
        let next = with(&bytes, |v| v["version"] = (WIRE_VERSION + 1).into());
        assert!(matches!(
            wire_err(&next),
            WireError::UnsupportedVersion {
                found,
                supported: WIRE_VERSION
            } if found == WIRE_VERSION + 1
        ));
        let kind = with(&bytes, |v| v["kind"] = CONFIG_KIND.into());
        assert!(matches!(wire_err(&kind), WireError::WrongKind { .. }));
        let shape = with(&bytes, |v| v["body"]["vcpus"] = "two".into());
        assert!(matches!(wire_err(&shape), WireError::Corrupt(_)));
        let unknown = with(&bytes, |v| v["body"]["extra"] = 1.into());
        assert!(matches!(wire_err(&unknown), WireError::Corrupt(_)));
        let hv_version = with(&bytes, |v| v["body"]["hypervisor"]["version"] = 9.into());
        assert!(matches!(
            wire_err(&hv_version),
            WireError::UnsupportedHypervisorVersion { found: 9, .. }
        ));
        let id = with(&bytes, |v| v["body"]["id"] = "../etc".into());
        assert!(matches!(wire_err(&id), WireError::Inconsistent { .. }));
        let hv_id = with(&bytes, |v| v["body"]["hypervisor"]["id"] = "other".into());
        assert!(matches!(wire_err(&hv_id), WireError::Inconsistent { .. }));
        let dir = with(&bytes, |v| {
            v["body"]["config"]["run_root"] = "/elsewhere".into();
        });
        assert!(matches!(wire_err(&dir), WireError::Inconsistent { .. }));
        let cfg = with(&bytes, |v| {
            v["body"]["config"]["agent"]["call_timeout"] = 0.into();
        });
        assert!(matches!(
            VmState::from_wire(&cfg),
            Err(Error::Config(ConfigError::ZeroTimeout {
                what: AgentTimeout::Call
            }))
        ));
    }
}
