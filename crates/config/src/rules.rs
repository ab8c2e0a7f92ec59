//! The library's rules, told in the file's own names: which section and key a refused
//! [`FactoryConfig`](vmfactory_factory::FactoryConfig) points at, and the message for it.

use vmfactory_factory::FactoryConfigError;
use vmfactory_vm::AgentTimeout;

pub(super) const QEMU: &str = "hypervisor.qemu";

/// The section, key and message, in the file's own names, of a rule the library refused.
/// `None` for a rule that no single key breaks (e.g. a run root too long for its sockets).
pub(super) fn config_key(e: &FactoryConfigError) -> Option<(&'static str, &'static str, String)> {
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
