//! The one place where the crate's own types ([`crate::types`]) meet the generated protobuf
//! types ([`crate::protocols`]).

use std::time::Duration;

use protobuf::{EnumOrUnknown, MessageField};

use crate::container::{ContainerSpec, ContainerStats, Mount, Namespace, Rlimit};
use crate::net::{Interface, IpAddress, IpFamily, Route};
use crate::protocols::{agent as pb, diag, health, oci, types as tpb, workload as wl};
use crate::types::{
    AgentDetails, GuestDetails, HealthStatus, OnlineCpuMem, Resources, Uptime, VersionInfo,
};
use crate::workload::{CopyFileChunk, FileChunk, ProcessSpec, Storage};

use health::health_check_response::ServingStatus;

impl From<EnumOrUnknown<ServingStatus>> for HealthStatus {
    fn from(s: EnumOrUnknown<ServingStatus>) -> Self {
        match s.enum_value() {
            Ok(ServingStatus::SERVING) => HealthStatus::Serving,
            Ok(ServingStatus::NOT_SERVING) => HealthStatus::NotServing,
            Ok(ServingStatus::UNKNOWN) | Err(_) => HealthStatus::Unknown,
        }
    }
}

impl From<HealthStatus> for health::HealthCheckResponse {
    fn from(s: HealthStatus) -> Self {
        let status = match s {
            HealthStatus::Unknown => ServingStatus::UNKNOWN,
            HealthStatus::Serving => ServingStatus::SERVING,
            HealthStatus::NotServing => ServingStatus::NOT_SERVING,
        };
        health::HealthCheckResponse {
            status: status.into(),
            ..Default::default()
        }
    }
}

impl From<health::VersionCheckResponse> for VersionInfo {
    fn from(r: health::VersionCheckResponse) -> Self {
        VersionInfo {
            grpc_version: r.grpc_version,
            agent_version: r.agent_version,
        }
    }
}

impl From<VersionInfo> for health::VersionCheckResponse {
    fn from(v: VersionInfo) -> Self {
        health::VersionCheckResponse {
            grpc_version: v.grpc_version,
            agent_version: v.agent_version,
            ..Default::default()
        }
    }
}

impl From<OnlineCpuMem> for pb::OnlineCPUMemRequest {
    fn from(r: OnlineCpuMem) -> Self {
        pb::OnlineCPUMemRequest {
            wait: r.wait,
            nb_cpus: r.nb_cpus,
            cpu_only: r.cpu_only,
            ..Default::default()
        }
    }
}

impl From<pb::OnlineCPUMemRequest> for OnlineCpuMem {
    fn from(r: pb::OnlineCPUMemRequest) -> Self {
        OnlineCpuMem {
            wait: r.wait,
            nb_cpus: r.nb_cpus,
            cpu_only: r.cpu_only,
        }
    }
}

impl From<pb::AgentDetails> for AgentDetails {
    fn from(d: pb::AgentDetails) -> Self {
        AgentDetails {
            version: d.version,
            init_daemon: d.init_daemon,
            device_handlers: d.device_handlers,
            storage_handlers: d.storage_handlers,
            supports_seccomp: d.supports_seccomp,
        }
    }
}

impl From<AgentDetails> for pb::AgentDetails {
    fn from(d: AgentDetails) -> Self {
        pb::AgentDetails {
            version: d.version,
            init_daemon: d.init_daemon,
            device_handlers: d.device_handlers,
            storage_handlers: d.storage_handlers,
            supports_seccomp: d.supports_seccomp,
            ..Default::default()
        }
    }
}

impl From<pb::GuestDetailsResponse> for GuestDetails {
    fn from(r: pb::GuestDetailsResponse) -> Self {
        GuestDetails {
            mem_block_size_bytes: r.mem_block_size_bytes,
            agent_details: r.agent_details.into_option().map(Into::into),
            support_mem_hotplug_probe: r.support_mem_hotplug_probe,
        }
    }
}

impl From<GuestDetails> for pb::GuestDetailsResponse {
    fn from(d: GuestDetails) -> Self {
        pb::GuestDetailsResponse {
            mem_block_size_bytes: d.mem_block_size_bytes,
            agent_details: MessageField::from_option(d.agent_details.map(Into::into)),
            support_mem_hotplug_probe: d.support_mem_hotplug_probe,
            ..Default::default()
        }
    }
}

/// Builds a `SetGuestDateTimeRequest` from seconds and microseconds since the epoch.
pub(crate) fn set_time_request(sec: i64, usec: i64) -> pb::SetGuestDateTimeRequest {
    pb::SetGuestDateTimeRequest {
        Sec: sec,
        Usec: usec,
        ..Default::default()
    }
}

/// Builds a `ReseedRandomDevRequest`.
pub(crate) fn reseed_request(data: &[u8]) -> pb::ReseedRandomDevRequest {
    pb::ReseedRandomDevRequest {
        data: data.to_vec(),
        ..Default::default()
    }
}

impl From<diag::ResourcesResponse> for Resources {
    fn from(r: diag::ResourcesResponse) -> Self {
        Resources {
            online_cpus: r.online_cpus,
            offline_cpus: r.offline_cpus,
            mem_total_kb: r.mem_total_kb,
            online_memory_blocks: r.online_memory_blocks,
            offline_memory_blocks: r.offline_memory_blocks,
            memory_block_size_bytes: r.memory_block_size_bytes,
        }
    }
}

impl From<Resources> for diag::ResourcesResponse {
    fn from(r: Resources) -> Self {
        diag::ResourcesResponse {
            online_cpu_count: u32::try_from(r.online_cpus.len()).unwrap_or(u32::MAX),
            online_cpus: r.online_cpus,
            offline_cpus: r.offline_cpus,
            mem_total_kb: r.mem_total_kb,
            online_memory_blocks: r.online_memory_blocks,
            offline_memory_blocks: r.offline_memory_blocks,
            memory_block_size_bytes: r.memory_block_size_bytes,
            ..Default::default()
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl From<diag::UptimeResponse> for Uptime {
    fn from(r: diag::UptimeResponse) -> Self {
        Uptime {
            agent: Duration::from_nanos(r.agent_uptime_ns),
            system: Duration::from_nanos(r.system_uptime_ns),
        }
    }
}

impl From<Uptime> for diag::UptimeResponse {
    fn from(u: Uptime) -> Self {
        diag::UptimeResponse {
            agent_uptime_ns: nanos(u.agent),
            system_uptime_ns: nanos(u.system),
            ..Default::default()
        }
    }
}

impl From<&ProcessSpec> for oci::Process {
    fn from(p: &ProcessSpec) -> Self {
        oci::Process {
            Terminal: p.terminal,
            ConsoleSize: MessageField::from_option(p.console_size.map(|(rows, cols)| oci::Box {
                Height: rows,
                Width: cols,
                ..Default::default()
            })),
            User: MessageField::some(oci::User {
                UID: p.uid,
                GID: p.gid,
                AdditionalGids: p.additional_gids.clone(),
                ..Default::default()
            }),
            Args: p.args.clone(),
            Env: p.env.clone(),
            Cwd: p.cwd.clone(),
            ..Default::default()
        }
    }
}

impl From<oci::Process> for ProcessSpec {
    fn from(p: oci::Process) -> Self {
        let user = p.User.into_option().unwrap_or_default();
        ProcessSpec {
            container_id: String::new(),
            args: p.Args,
            env: p.Env,
            cwd: p.Cwd,
            uid: user.UID,
            gid: user.GID,
            additional_gids: user.AdditionalGids,
            terminal: p.Terminal,
            console_size: p.ConsoleSize.into_option().map(|b| (b.Height, b.Width)),
        }
    }
}

/// `ExecProcess` of `spec` as `exec_id` in `spec.container_id` (empty: the VM's own root).
pub(crate) fn exec_request(exec_id: &str, spec: &ProcessSpec) -> pb::ExecProcessRequest {
    pb::ExecProcessRequest {
        container_id: spec.container_id.clone(),
        exec_id: exec_id.to_owned(),
        process: MessageField::some(spec.into()),
        ..Default::default()
    }
}

impl From<&ContainerSpec> for oci::Spec {
    fn from(c: &ContainerSpec) -> Self {
        let mut process = oci::Process::from(&c.process);
        process.Rlimits = c
            .rlimits
            .iter()
            .map(|r| oci::POSIXRlimit {
                Type: r.kind.clone(),
                Hard: r.hard,
                Soft: r.soft,
                ..Default::default()
            })
            .collect();
        process.NoNewPrivileges = c.no_new_privileges;
        oci::Spec {
            Version: c.version.clone(),
            Process: MessageField::some(process),
            Root: MessageField::some(oci::Root {
                Path: c.root_path.clone(),
                Readonly: c.root_readonly,
                ..Default::default()
            }),
            Hostname: c.hostname.clone(),
            Mounts: c
                .mounts
                .iter()
                .map(|m| oci::Mount {
                    destination: m.destination.clone(),
                    source: m.source.clone(),
                    type_: m.kind.clone(),
                    options: m.options.clone(),
                    ..Default::default()
                })
                .collect(),
            Annotations: c.annotations.clone().into_iter().collect(),
            Linux: MessageField::some(oci::Linux {
                Sysctl: c.sysctl.clone().into_iter().collect(),
                Namespaces: c
                    .namespaces
                    .iter()
                    .map(|n| oci::LinuxNamespace {
                        Type: n.kind.clone(),
                        Path: n.path.clone(),
                        ..Default::default()
                    })
                    .collect(),
                MaskedPaths: c.masked_paths.clone(),
                ReadonlyPaths: c.readonly_paths.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl From<oci::Spec> for ContainerSpec {
    fn from(s: oci::Spec) -> Self {
        let process = s.Process.into_option().unwrap_or_default();
        let rlimits = process
            .Rlimits
            .iter()
            .map(|r| Rlimit {
                kind: r.Type.clone(),
                hard: r.Hard,
                soft: r.Soft,
            })
            .collect();
        let no_new_privileges = process.NoNewPrivileges;
        let root = s.Root.into_option().unwrap_or_default();
        let linux = s.Linux.into_option().unwrap_or_default();
        ContainerSpec {
            version: s.Version,
            process: process.into(),
            rlimits,
            no_new_privileges,
            root_path: root.Path,
            root_readonly: root.Readonly,
            hostname: s.Hostname,
            mounts: s
                .Mounts
                .into_iter()
                .map(|m| Mount {
                    destination: m.destination,
                    source: m.source,
                    kind: m.type_,
                    options: m.options,
                })
                .collect(),
            annotations: s.Annotations.into_iter().collect(),
            namespaces: linux
                .Namespaces
                .into_iter()
                .map(|n| Namespace {
                    kind: n.Type,
                    path: n.Path,
                })
                .collect(),
            masked_paths: linux.MaskedPaths,
            readonly_paths: linux.ReadonlyPaths,
            sysctl: linux.Sysctl.into_iter().collect(),
        }
    }
}

/// `CreateContainer` of `spec` as `container_id` (its init's exec id too), over `storages`.
pub(crate) fn create_container_request(
    container_id: &str,
    storages: &[Storage],
    spec: &ContainerSpec,
) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        container_id: container_id.to_owned(),
        exec_id: container_id.to_owned(),
        storages: storages.iter().map(Into::into).collect(),
        OCI: MessageField::some(spec.into()),
        ..Default::default()
    }
}

impl From<&ContainerStats> for pb::StatsContainerResponse {
    fn from(s: &ContainerStats) -> Self {
        pb::StatsContainerResponse {
            cgroup_stats: MessageField::some(pb::CgroupStats {
                cpu_stats: MessageField::some(pb::CpuStats {
                    cpu_usage: MessageField::some(pb::CpuUsage {
                        total_usage: s.cpu_usage_ns,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                memory_stats: MessageField::some(pb::MemoryStats {
                    usage: MessageField::some(pb::MemoryData {
                        usage: s.memory_usage_bytes,
                        limit: s.memory_limit_bytes,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                pids_stats: MessageField::some(pb::PidsStats {
                    current: s.pids,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl From<pb::StatsContainerResponse> for ContainerStats {
    fn from(r: pb::StatsContainerResponse) -> Self {
        let cg = r.cgroup_stats.into_option().unwrap_or_default();
        let cpu = cg.cpu_stats.into_option().unwrap_or_default();
        let mem = cg
            .memory_stats
            .into_option()
            .unwrap_or_default()
            .usage
            .into_option()
            .unwrap_or_default();
        ContainerStats {
            cpu_usage_ns: cpu.cpu_usage.into_option().unwrap_or_default().total_usage,
            memory_usage_bytes: mem.usage,
            memory_limit_bytes: mem.limit,
            pids: cg.pids_stats.into_option().unwrap_or_default().current,
        }
    }
}

// Kata carries uid and gid as int32: the same 32 bits either way.
fn id_to_wire(id: u32) -> i32 {
    i32::from_ne_bytes(id.to_ne_bytes())
}

fn id_from_wire(id: i32) -> u32 {
    u32::from_ne_bytes(id.to_ne_bytes())
}

impl From<&CopyFileChunk> for pb::CopyFileRequest {
    fn from(c: &CopyFileChunk) -> Self {
        pb::CopyFileRequest {
            path: c.path.clone(),
            file_size: i64::try_from(c.file_size).unwrap_or(i64::MAX),
            file_mode: c.file_mode,
            dir_mode: c.dir_mode,
            uid: id_to_wire(c.uid),
            gid: id_to_wire(c.gid),
            offset: i64::try_from(c.offset).unwrap_or(i64::MAX),
            data: c.data.clone(),
            ..Default::default()
        }
    }
}

impl TryFrom<pb::CopyFileRequest> for CopyFileChunk {
    type Error = &'static str;

    fn try_from(r: pb::CopyFileRequest) -> Result<Self, Self::Error> {
        Ok(CopyFileChunk {
            path: r.path,
            file_size: u64::try_from(r.file_size).map_err(|_| "negative file_size")?,
            file_mode: r.file_mode,
            dir_mode: r.dir_mode,
            uid: id_from_wire(r.uid),
            gid: id_from_wire(r.gid),
            offset: u64::try_from(r.offset).map_err(|_| "negative offset")?,
            data: r.data,
        })
    }
}

impl From<wl::ReadFileResponse> for FileChunk {
    fn from(r: wl::ReadFileResponse) -> Self {
        FileChunk {
            data: r.data,
            file_size: r.file_size,
            file_mode: r.file_mode,
        }
    }
}

impl From<FileChunk> for wl::ReadFileResponse {
    fn from(c: FileChunk) -> Self {
        wl::ReadFileResponse {
            data: c.data,
            file_size: c.file_size,
            file_mode: c.file_mode,
            ..Default::default()
        }
    }
}

impl From<&Storage> for pb::Storage {
    fn from(s: &Storage) -> Self {
        pb::Storage {
            driver: s.driver.clone(),
            source: s.source.clone(),
            fstype: s.fstype.clone(),
            options: s.options.clone(),
            mount_point: s.mount_point.clone(),
            ..Default::default()
        }
    }
}

impl From<pb::Storage> for Storage {
    fn from(s: pb::Storage) -> Self {
        Storage {
            driver: s.driver,
            source: s.source,
            fstype: s.fstype,
            options: s.options,
            mount_point: s.mount_point,
        }
    }
}

impl From<IpFamily> for EnumOrUnknown<tpb::IPFamily> {
    fn from(f: IpFamily) -> Self {
        EnumOrUnknown::new(match f {
            IpFamily::V4 => tpb::IPFamily::v4,
            IpFamily::V6 => tpb::IPFamily::v6,
        })
    }
}

fn family_from_wire(f: EnumOrUnknown<tpb::IPFamily>) -> Result<IpFamily, &'static str> {
    match f.enum_value() {
        Ok(tpb::IPFamily::v4) => Ok(IpFamily::V4),
        Ok(tpb::IPFamily::v6) => Ok(IpFamily::V6),
        Err(_) => Err("unknown IP family"),
    }
}

impl From<&IpAddress> for tpb::IPAddress {
    fn from(a: &IpAddress) -> Self {
        tpb::IPAddress {
            family: a.family.into(),
            address: a.address.clone(),
            mask: a.mask.clone(),
            ..Default::default()
        }
    }
}

impl TryFrom<tpb::IPAddress> for IpAddress {
    type Error = &'static str;

    fn try_from(a: tpb::IPAddress) -> Result<Self, Self::Error> {
        Ok(IpAddress {
            family: family_from_wire(a.family)?,
            address: a.address,
            mask: a.mask,
        })
    }
}

impl From<&Interface> for tpb::Interface {
    fn from(i: &Interface) -> Self {
        tpb::Interface {
            device: i.device.clone(),
            name: i.name.clone(),
            IPAddresses: i.ip_addresses.iter().map(Into::into).collect(),
            mtu: i.mtu,
            hwAddr: i.hw_addr.clone(),
            ..Default::default()
        }
    }
}

impl TryFrom<tpb::Interface> for Interface {
    type Error = &'static str;

    fn try_from(i: tpb::Interface) -> Result<Self, Self::Error> {
        Ok(Interface {
            device: i.device,
            name: i.name,
            ip_addresses: i
                .IPAddresses
                .into_iter()
                .map(IpAddress::try_from)
                .collect::<Result<_, _>>()?,
            mtu: i.mtu,
            hw_addr: i.hwAddr,
        })
    }
}

impl From<&Route> for tpb::Route {
    fn from(r: &Route) -> Self {
        tpb::Route {
            dest: r.dest.clone(),
            gateway: r.gateway.clone(),
            device: r.device.clone(),
            source: r.source.clone(),
            scope: r.scope,
            family: r.family.into(),
            ..Default::default()
        }
    }
}

impl TryFrom<tpb::Route> for Route {
    type Error = &'static str;

    fn try_from(r: tpb::Route) -> Result<Self, Self::Error> {
        Ok(Route {
            dest: r.dest,
            gateway: r.gateway,
            device: r.device,
            source: r.source,
            scope: r.scope,
            family: family_from_wire(r.family)?,
        })
    }
}

impl From<&[Route]> for pb::Routes {
    fn from(routes: &[Route]) -> Self {
        pb::Routes {
            Routes: routes.iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

impl TryFrom<pb::Routes> for Vec<Route> {
    type Error = &'static str;

    fn try_from(routes: pb::Routes) -> Result<Self, Self::Error> {
        routes.Routes.into_iter().map(Route::try_from).collect()
    }
}

impl From<&[Interface]> for pb::Interfaces {
    fn from(ifaces: &[Interface]) -> Self {
        pb::Interfaces {
            Interfaces: ifaces.iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

impl TryFrom<pb::Interfaces> for Vec<Interface> {
    type Error = &'static str;

    fn try_from(ifaces: pb::Interfaces) -> Result<Self, Self::Error> {
        ifaces
            .Interfaces
            .into_iter()
            .map(Interface::try_from)
            .collect()
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
