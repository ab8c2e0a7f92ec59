//! Conversions between vmfactory's types and the generated `cache.proto` messages, in one place.

use vmfactory_hypervisor::VmStatus;
use vmfactory_vm::{VmConfig, VmInfo, VmState};

use super::error::{CacheServiceError, Result};
use super::protocols::cache::{GrpcVM, GrpcVMConfig, GrpcVMStatus};

/// `GrpcVMConfig` of `config`: `Data` is its wire form, `AgentConfig` the JSON of its agent
/// timeouts (Kata sends the agent config apart; clients here only read `Data`).
pub(crate) fn config_to_grpc(config: &VmConfig) -> Result<GrpcVMConfig> {
    let mut msg = GrpcVMConfig::new();
    msg.Data = config
        .to_wire()
        .map_err(|e| CacheServiceError::EncodeConfig(Box::new(e)))?;
    msg.AgentConfig = serde_json::to_vec(&config.agent).map_err(|e| {
        CacheServiceError::EncodeConfig(Box::new(vmfactory_vm::WireError::Encode(e).into()))
    })?;
    Ok(msg)
}

/// The config a `GrpcVMConfig` carries.
pub(crate) fn config_from_grpc(msg: &GrpcVMConfig) -> Result<VmConfig> {
    VmConfig::from_wire(&msg.Data).map_err(|source| CacheServiceError::InvalidReply {
        method: "Config",
        source: Box::new(source),
    })
}

/// `GrpcVM` of a detached VM: `hypervisor` carries the whole [`VmState`] wire form `bytes`; the
/// other fields repeat what it says, as Kata's message has them.
pub(crate) fn vm_to_grpc(state: &VmState, bytes: Vec<u8>) -> GrpcVM {
    let mut msg = GrpcVM::new();
    msg.id = state.id.clone();
    msg.hypervisor = bytes;
    msg.proxyPid = 0;
    // A handed-over VM runs, so its wire form has an endpoint (`VmState::check`).
    msg.proxyURL = state.agent_url().map(|u| u.to_string()).unwrap_or_default();
    msg.cpu = state.vcpus;
    msg.memory = saturate(state.memory_mib);
    msg.cpuDelta = state.cpu_delta;
    msg
}

/// `GrpcVMStatus` of a cached VM (Kata's pid, cpu, memory; our id and run state).
pub(crate) fn status_to_grpc(info: &VmInfo) -> GrpcVMStatus {
    let mut msg = GrpcVMStatus::new();
    msg.pid = info.pid.map_or(0, i64::from);
    msg.cpu = info.vcpus;
    msg.memory = saturate(info.memory_mib);
    msg.id = info.id.clone();
    msg.state = state_name(&info.state);
    msg
}

/// The [`VmInfo`] a `GrpcVMStatus` describes (`cpu_delta` is not on the wire: 0).
pub(crate) fn status_from_grpc(msg: &GrpcVMStatus) -> VmInfo {
    VmInfo {
        id: msg.id.clone(),
        pid: u32::try_from(msg.pid).ok().filter(|p| *p != 0),
        vcpus: msg.cpu,
        memory_mib: u64::from(msg.memory),
        cpu_delta: 0,
        state: state_from_name(&msg.state),
    }
}

fn saturate(mib: u64) -> u32 {
    u32::try_from(mib).unwrap_or(u32::MAX)
}

/// The serde name of a run state (`running`, `paused`, ...; `Other` by its QMP name).
fn state_name(state: &VmStatus) -> String {
    match state {
        VmStatus::Other(name) => name.clone(),
        s => match serde_json::to_value(s) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{s:?}"),
        },
    }
}

fn state_from_name(name: &str) -> VmStatus {
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .unwrap_or_else(|_| VmStatus::Other(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip() {
        for state in [
            VmStatus::Running,
            VmStatus::Paused,
            VmStatus::NotStarted,
            VmStatus::Other("guest-panicked".into()),
        ] {
            let info = VmInfo {
                id: "a".repeat(8),
                pid: Some(42),
                vcpus: 2,
                memory_mib: 512,
                cpu_delta: 0,
                state,
            };
            assert_eq!(status_from_grpc(&status_to_grpc(&info)), info);
        }
        let mut msg = GrpcVMStatus::new();
        msg.memory = 1;
        let info = status_from_grpc(&msg);
        assert_eq!((info.pid, info.memory_mib), (None, 1), "pid 0 is unknown");
        assert_eq!(saturate(u64::MAX), u32::MAX);
    }
}
