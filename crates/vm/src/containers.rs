//! OCI containers in a running VM: the host half of the agent's `CreateContainer` family.
//!
//! A container's root is a read-only erofs image on the host, hot-plugged for it (like
//! [`Vm::attach_disk`] but mounted by the agent as the container's storage, not as a disk of
//! the VM), overlaid in the guest by a tmpfs: its writes stay in guest memory and are gone
//! once it is removed. The container's processes are [`Process`]es like the VM's own, named
//! by the container's id as well as their exec id; the init's exec id is the container id.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use thiserror::Error;
use tracing::{info, instrument, warn};

use vmfactory_agent::{
    ContainerSpec, ContainerStats, Mount, Namespace, ProcessSpec, Rlimit, Storage,
};
use vmfactory_hypervisor::{DiskConfig, DiskFormat};

use crate::error::Error;
use crate::vm::Vm;
use crate::workload::Process;

/// How long the guest may take to kill a removed container's processes.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The file system the agent mounts a container's image as.
pub const ROOTFS_FSTYPE: &str = "erofs";

/// A container to create in a VM.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ContainerConfig {
    /// The container's id: 1-128 of `[A-Za-z0-9._-]`, unique in the VM.
    pub id: String,
    /// The bundle's `config.json`. Its `root.path` names the bundle's rootfs on the host and
    /// is not sent: the guest's root is the image.
    pub spec: Spec,
    /// The root file system: an erofs image on the host, hot-plugged read-only.
    pub rootfs_image: PathBuf,
}

impl ContainerConfig {
    /// A container `id` running `spec` over the erofs image `rootfs_image`.
    pub fn new(id: impl Into<String>, spec: Spec, rootfs_image: impl Into<PathBuf>) -> Self {
        ContainerConfig {
            id: id.into(),
            spec,
            rootfs_image: rootfs_image.into(),
        }
    }
}

/// What can go wrong with a container.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// The VM has a container of this id already.
    #[error("Container {id:?} already exists in VM {vm}")]
    Exists {
        /// VM id.
        vm: String,
        /// Container id.
        id: String,
    },
    /// The VM has no container of this id.
    #[error("No container {id:?} in VM {vm}")]
    NotFound {
        /// VM id.
        vm: String,
        /// Container id.
        id: String,
    },
    /// The spec cannot run (no process, no args, an unsupported namespace, …); nothing was
    /// changed.
    #[error("Invalid spec for container {id:?}: {reason}")]
    InvalidSpec {
        /// Container id.
        id: String,
        /// What is wrong, in one line.
        reason: String,
    },
    /// The rootfs image is not a readable regular file.
    #[error("Rootfs image {} of container {id:?} is unusable", path.display())]
    Image {
        /// Container id.
        id: String,
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM (its hypervisor or agent) failed the operation.
    #[error("Container {id:?}: {op} failed")]
    Vm {
        /// Container id.
        id: String,
        /// The operation (`create_container`, `attach_disk`, …).
        op: &'static str,
        /// The VM's error (boxed: it is large).
        #[source]
        source: Box<Error>,
    },
}

/// The gRPC status of an agent error, if it is one.
fn agent_status(e: &Error) -> Option<(ttrpc::Code, String)> {
    let Error::Agent { source, .. } = e else {
        return None;
    };
    match source.as_ref() {
        vmfactory_agent::Error::Rpc {
            source: ttrpc::Error::RpcStatus(st),
            ..
        } => Some((st.code(), st.message.clone())),
        _ => None,
    }
}

/// Converts the bundle's spec into the subset the agent acts on.
pub fn container_spec(id: &str, spec: &Spec) -> Result<ContainerSpec, ContainerError> {
    let invalid = |reason: &str| ContainerError::InvalidSpec {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    let p = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("the spec has no process"))?;
    let args = p.args().clone().unwrap_or_default();
    if args.first().map_or(true, String::is_empty) {
        return Err(invalid("process.args is empty"));
    }
    let user = p.user();
    let process = ProcessSpec {
        container_id: id.to_owned(),
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd: p.cwd().to_string_lossy().into_owned(),
        uid: user.uid(),
        gid: user.gid(),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        terminal: p.terminal().unwrap_or(false),
        console_size: p.console_size().map(|b| {
            let dim = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
            (dim(b.height()), dim(b.width()))
        }),
    };
    let rlimits = p
        .rlimits()
        .iter()
        .flatten()
        .map(|r| Rlimit {
            kind: r.typ().to_string(),
            hard: r.hard(),
            soft: r.soft(),
        })
        .collect();
    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| Mount {
            destination: m.destination().to_string_lossy().into_owned(),
            source: m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind: m.typ().clone().unwrap_or_default(),
            options: m.options().clone().unwrap_or_default(),
        })
        .collect();
    let linux = spec.linux().as_ref();
    let namespaces = linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .map(|n| Namespace {
            kind: match n.typ() {
                LinuxNamespaceType::Mount => "mount",
                LinuxNamespaceType::Cgroup => "cgroup",
                LinuxNamespaceType::Uts => "uts",
                LinuxNamespaceType::Ipc => "ipc",
                LinuxNamespaceType::User => "user",
                LinuxNamespaceType::Pid => "pid",
                LinuxNamespaceType::Network => "network",
                LinuxNamespaceType::Time => "time",
            }
            .to_owned(),
            path: n
                .path()
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        })
        .collect();
    let list = |v: Option<&Vec<String>>| v.cloned().unwrap_or_default();
    Ok(ContainerSpec {
        version: spec.version().clone(),
        process,
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        // The bundle's root path is the host's; the guest mounts the image itself.
        root_path: String::new(),
        root_readonly: spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false),
        hostname: spec.hostname().clone().unwrap_or_default(),
        mounts,
        annotations: spec
            .annotations()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        namespaces,
        masked_paths: list(linux.and_then(|l| l.masked_paths().as_ref())),
        readonly_paths: list(linux.and_then(|l| l.readonly_paths().as_ref())),
        sysctl: linux
            .and_then(|l| l.sysctl().as_ref())
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

impl Vm {
    fn container_err(&self, id: &str, op: &'static str, source: Error) -> ContainerError {
        match agent_status(&source) {
            Some((ttrpc::Code::INVALID_ARGUMENT, reason)) if op == "create_container" => {
                ContainerError::InvalidSpec {
                    id: id.to_owned(),
                    reason,
                }
            }
            Some((ttrpc::Code::NOT_FOUND, _)) if op != "exec_process" => ContainerError::NotFound {
                vm: self.id.clone(),
                id: id.to_owned(),
            },
            _ => ContainerError::Vm {
                id: id.to_owned(),
                op,
                source: Box::new(source),
            },
        }
    }

    /// The container's image disk, or [`ContainerError::NotFound`].
    async fn container_disk(&self, id: &str) -> Result<String, ContainerError> {
        let inner = self.inner.lock().await;
        inner
            .containers
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound {
                vm: self.id.clone(),
                id: id.to_owned(),
            })
    }

    /// Hot-plugs the image, has the agent mount it with a tmpfs overlay and create the
    /// container with its init process (`spec.process`), created but not started: its streams
    /// exist from now on. On failure the image is unplugged and nothing is recorded.
    #[instrument(skip_all, fields(vm = %self.id, container = %c.id))]
    pub async fn create_container(&self, c: &ContainerConfig) -> Result<Process, ContainerError> {
        let id = c.id.as_str();
        let spec = container_spec(id, &c.spec)?;
        let meta = std::fs::metadata(&c.rootfs_image).and_then(|m| {
            if m.is_file() {
                Ok(m)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        });
        if let Err(source) = meta {
            return Err(ContainerError::Image {
                id: id.to_owned(),
                path: c.rootfs_image.clone(),
                source,
            });
        }
        {
            let mut inner = self
                .owned()
                .await
                .map_err(|e| self.container_err(id, "create_container", e))?;
            if inner.containers.contains_key(id) {
                return Err(ContainerError::Exists {
                    vm: self.id.clone(),
                    id: id.to_owned(),
                });
            }
            // Reserved while the disk is plugged and the guest works, without holding the
            // VM's lock.
            inner.containers.insert(id.to_owned(), String::new());
        }
        let res = self.create_reserved(id, c, &spec).await;
        let mut inner = self.inner.lock().await;
        match res {
            Ok((process, disk)) => {
                inner.containers.insert(id.to_owned(), disk);
                info!("container created");
                Ok(process)
            }
            Err(e) => {
                inner.containers.remove(id);
                Err(e)
            }
        }
    }

    async fn create_reserved(
        &self,
        id: &str,
        c: &ContainerConfig,
        spec: &ContainerSpec,
    ) -> Result<(Process, String), ContainerError> {
        let t = std::time::Instant::now();
        let disk = DiskConfig::new(&c.rootfs_image, DiskFormat::Raw).with_read_only(true);
        let attached = self.hypervisor.attach_disk(&disk).await.map_err(|e| {
            self.container_err(id, "attach_disk", Error::hv(&self.id, "attach_disk", e))
        })?;
        let t = crate::step_took("image hotplug", t);
        let storage = Storage {
            driver: Storage::BLK.into(),
            source: attached.pci_path.clone(),
            fstype: ROOTFS_FSTYPE.into(),
            options: vec!["ro".into()],
            // The agent puts it under the container's directory.
            mount_point: String::new(),
        };
        let created = self
            .agent_call(
                "create_container",
                self.agent
                    .create_container(id, std::slice::from_ref(&storage), spec),
            )
            .await;
        crate::step_took("guest create", t);
        if let Err(e) = created {
            if let Err(undo) = self.hypervisor.detach_disk(&attached.id).await {
                warn!(disk = %attached.id, error = %undo, "cannot unplug a failed container's image");
            }
            return Err(self.container_err(id, "create_container", e));
        }
        let process = Process::attached(
            &self.id,
            self.agent.clone(),
            Some(self.hypervisor.clone()),
            id,
            id,
        );
        Ok((process, attached.id))
    }

    /// Lets the container's init process exec; fails if it cannot (no such program, …).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn start_container(&self, id: &str) -> Result<(), ContainerError> {
        self.container_disk(id).await?;
        self.agent_call("start_container", self.agent.start_container(id))
            .await
            .map_err(|e| self.container_err(id, "start_container", e))
    }

    /// Starts a process in the container (ExecProcess with its container id), as `exec_id`.
    #[instrument(skip(self, spec), fields(vm = %self.id, args = ?spec.args))]
    pub async fn exec_in(
        &self,
        id: &str,
        exec_id: &str,
        mut spec: ProcessSpec,
    ) -> Result<Process, ContainerError> {
        self.container_disk(id).await?;
        spec.container_id = id.to_owned();
        Process::exec_as(
            &self.id,
            self.agent.clone(),
            Some(self.hypervisor.clone()),
            exec_id.to_owned(),
            spec,
        )
        .await
        .map_err(|e| self.container_err(id, "exec_process", e))
    }

    /// Sends `signal` to every process of the container (`all` in containerd's Kill).
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn signal_container(&self, id: &str, signal: i32) -> Result<(), ContainerError> {
        self.container_disk(id).await?;
        let sig = u32::try_from(signal).unwrap_or(0);
        self.agent_call("signal_process", self.agent.signal_process(id, "", sig))
            .await
            .map_err(|e| self.container_err(id, "signal_process", e))
    }

    /// The guest pids of the container's processes.
    pub async fn container_pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        self.container_disk(id).await?;
        self.agent_call("container_pids", self.agent.container_pids(id))
            .await
            .map_err(|e| self.container_err(id, "container_pids", e))
    }

    /// CPU, memory and process figures of the container's cgroup.
    pub async fn container_stats(&self, id: &str) -> Result<ContainerStats, ContainerError> {
        self.container_disk(id).await?;
        self.agent_call("stats_container", self.agent.stats_container(id))
            .await
            .map_err(|e| self.container_err(id, "stats_container", e))
    }

    /// Kills what is left of the container, unmounts it, unplugs and forgets its image.
    /// Idempotent: an unknown id is already removed.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn remove_container(&self, id: &str) -> Result<(), ContainerError> {
        let Ok(disk) = self.container_disk(id).await else {
            return Ok(());
        };
        if disk.is_empty() {
            // Still being created by another call: that call owns it.
            return Err(ContainerError::NotFound {
                vm: self.id.clone(),
                id: id.to_owned(),
            });
        }
        let removed = self
            .agent_call(
                "remove_container",
                self.agent.remove_container(id, REMOVE_TIMEOUT),
            )
            .await
            .map_err(|e| self.container_err(id, "remove_container", e));
        match removed {
            Ok(()) | Err(ContainerError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        self.hypervisor.detach_disk(&disk).await.map_err(|e| {
            self.container_err(id, "detach_disk", Error::hv(&self.id, "detach_disk", e))
        })?;
        self.inner.lock().await.containers.remove(id);
        info!("container removed");
        Ok(())
    }

    /// Ids of the VM's containers.
    pub async fn containers(&self) -> Vec<String> {
        self.inner.lock().await.containers.keys().cloned().collect()
    }
}

#[cfg(test)]
#[path = "containers_tests.rs"]
mod tests;
