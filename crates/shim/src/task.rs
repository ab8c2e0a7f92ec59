//! containerd's `Task` ttRPC API, translated to [`TaskService`] calls.

use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::types::task::Status;
use containerd_shim::{TtrpcContext, TtrpcResult};
use tracing::debug;

use crate::rootfs::RootfsMount;
use crate::sandbox::ContainerUsage;
use crate::service::{CreateParams, ProcState, TaskService};
use crate::status::{Code, TaskError};
use crate::stdio::StdioPaths;

/// The type URL containerd decodes cgroups v1 metrics from.
pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v1.Metrics";

/// The shim's version, reported by Connect.
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn status_of(state: ProcState) -> Status {
    match state {
        ProcState::Created => Status::CREATED,
        ProcState::Running => Status::RUNNING,
        ProcState::Stopped => Status::STOPPED,
    }
}

/// containerd's cgroups v1 `Metrics` of one container.
pub fn metrics(u: &ContainerUsage) -> Metrics {
    let mut cpu_usage = CPUUsage::new();
    cpu_usage.total = u.cpu_usage_ns;
    let mut cpu = CPUStat::new();
    cpu.usage = Some(cpu_usage).into();
    let mut usage = MemoryEntry::new();
    usage.usage = u.memory_usage_bytes;
    usage.limit = u.memory_limit_bytes;
    let mut memory = MemoryStat::new();
    memory.usage = Some(usage).into();
    let mut pids = PidsStat::new();
    pids.current = u.pids;
    let mut m = Metrics::new();
    m.cpu = Some(cpu).into();
    m.memory = Some(memory).into();
    m.pids = Some(pids).into();
    m
}

/// An exec's process spec: containerd sends the OCI `Process` as JSON in an `Any`.
pub fn exec_spec(any: Option<&Any>) -> Result<oci_spec::runtime::Process, TaskError> {
    let any = any.ok_or_else(|| TaskError::invalid("exec without a process spec".to_owned()))?;
    serde_json::from_slice(&any.value).map_err(|e| {
        TaskError::from_error(Code::InvalidArgument, &e).context("Bad exec process spec")
    })
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        debug!(id = %req.id, "create");
        let params = CreateParams {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        };
        let pid = TaskService::create(self, params).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = TaskService::start(self, &req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let s = TaskService::state(self, &req.id, &req.exec_id).await?;
        let mut r = api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: s.bundle,
            pid: s.pid,
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: s.stdio.terminal,
            ..Default::default()
        };
        r.status = status_of(s.state).into();
        if let Some(e) = s.exited {
            r.exit_status = e.status;
            r.exited_at = Some(e.at).into();
        }
        Ok(r)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pids = TaskService::pids(self, &req.id).await?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = exec_spec(req.spec.as_ref())?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        TaskService::exec(self, &req.id, &req.exec_id, spec, stdio).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.resize(&req.id, &req.exec_id, req.height, req.width)
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.close_stdin(&req.id, &req.exec_id).await?;
        }
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        TaskService::kill(self, &req.id, &req.exec_id, req.signal, req.all).await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let e = TaskService::wait(self, &req.id, &req.exec_id).await?;
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: Some(e.at).into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let d = TaskService::delete(self, &req.id, &req.exec_id).await?;
        let mut r = api::DeleteResponse {
            pid: d.pid,
            ..Default::default()
        };
        if let Some(e) = d.exited {
            r.exit_status = e.status;
            r.exited_at = Some(e.at).into();
        }
        Ok(r)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.task_pid(&req.id).await,
            version: VERSION.to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::shutdown(self).await;
        Ok(api::Empty::new())
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let usage = TaskService::stats(self, &req.id).await?;
        let value = metrics(&usage)
            .write_to_bytes()
            .map_err(|e| TaskError::from_error(Code::Internal, &e))?;
        let any = Any {
            type_url: METRICS_TYPE_URL.to_owned(),
            value,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_cgroups_v1_metrics() {
        let m = metrics(&ContainerUsage {
            cpu_usage_ns: 7,
            memory_usage_bytes: 8,
            memory_limit_bytes: 9,
            pids: 2,
        });
        let bytes = m.write_to_bytes().expect("encode");
        let back = Metrics::parse_from_bytes(&bytes).expect("decode");
        assert_eq!(back.cpu.usage.total, 7);
        assert_eq!(back.memory.usage.usage, 8);
        assert_eq!(back.memory.usage.limit, 9);
        assert_eq!(back.pids.current, 2);
    }

    #[test]
    fn an_exec_spec_is_the_oci_process_json() {
        let any = Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value:
                br#"{"args":["sh","-c","id"],"cwd":"/tmp","user":{"uid":1,"gid":2},"env":["A=b"]}"#
                    .to_vec(),
            ..Default::default()
        };
        let p = exec_spec(Some(&any)).expect("spec");
        assert_eq!(
            p.args().as_deref(),
            Some(&["sh".into(), "-c".into(), "id".into()][..])
        );
        assert_eq!((p.user().uid(), p.user().gid()), (1, 2));
        assert_eq!(
            exec_spec(None).expect_err("none").code,
            Code::InvalidArgument
        );
        let bad = Any {
            value: b"{nope".to_vec(),
            ..Default::default()
        };
        let e = exec_spec(Some(&bad)).expect_err("bad");
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(
            e.message.starts_with("Bad exec process spec"),
            "{}",
            e.message
        );
    }

    #[test]
    fn task_errors_become_ttrpc_statuses_with_their_code() {
        let e: containerd_shim::protos::ttrpc::Error = TaskError::no_container("c").into();
        match e {
            containerd_shim::protos::ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "container c not found");
            }
            other => panic!("not a status: {other:?}"),
        }
    }
}
