//! The shim's lifecycle: `start` (one shim per sandbox), `delete` (a dead shim's leftovers),
//! and serving the task service until Shutdown.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{api, Config, DeleteResponse, Error, Flags, StartOpts};
use tracing::{info, warn};

use crate::events::Publisher;
use crate::rootfs::{RootfsCache, RootfsConfig};
use crate::sandbox::SandboxProvider;
use crate::service::{TaskService, SANDBOX_ID_ANNOTATION, VM_RECORD_FILE};

/// The CRI annotation telling a pod's sandbox container from its other containers.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";

/// containerd's exit status for a task whose shim died: 128 + SIGKILL.
const KILLED_STATUS: u32 = 128 + 9;

/// What a shim process needs besides containerd's flags.
#[derive(Debug, Clone)]
pub struct ShimSetup {
    /// Where sandbox VMs come from.
    pub provider: Arc<dyn SandboxProvider>,
    /// The rootfs image cache.
    pub rootfs: RootfsConfig,
}

/// The setup of this process: set by the binary before [`containerd_shim::asynchronous::run`],
/// which builds the shim through [`Shim::new`] without arguments of ours.
static SETUP: std::sync::OnceLock<ShimSetup> = std::sync::OnceLock::new();

/// Sets the setup for [`VmfactoryShim::new`] (once; later calls are ignored).
pub fn set_setup(setup: ShimSetup) {
    let _ = SETUP.set(setup);
}

/// The shim of one sandbox.
pub struct VmfactoryShim {
    namespace: String,
    exit: Arc<ExitSignal>,
    setup: Option<ShimSetup>,
}

impl std::fmt::Debug for VmfactoryShim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmfactoryShim")
            .field("namespace", &self.namespace)
            .field("setup", &self.setup)
            .finish_non_exhaustive()
    }
}

/// The socket a container's shim serves on: its sandbox's for a CRI container, else its own.
pub fn grouping(id: &str, annotations: &HashMap<String, String>) -> String {
    match (
        annotations
            .get(CONTAINER_TYPE_ANNOTATION)
            .map(String::as_str),
        annotations.get(SANDBOX_ID_ANNOTATION),
    ) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => sandbox.clone(),
        _ => id.to_owned(),
    }
}

fn annotations_in(bundle: &Path) -> HashMap<String, String> {
    oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default()
}

/// A dead shim's leftovers in `bundle`: the VM its record names is stopped and the rootfs
/// unmounted. Failures are logged: `vmfactory destroy` still finds the VM under its run root.
pub async fn clean_bundle(bundle: &Path, provider: &dyn SandboxProvider) {
    let record = bundle.join(VM_RECORD_FILE);
    if let Ok(text) = tokio::fs::read_to_string(&record).await {
        match provider.stop_recorded(text.trim()).await {
            Ok(()) => info!(vm = %text.trim(), "stopped the dead shim's VM"),
            Err(e) => warn!(error = %crate::status::one_line(&e), "cannot stop the dead shim's VM"),
        }
        let _ = tokio::fs::remove_file(&record).await;
    }
    crate::mounts::unmount(&bundle.join("rootfs")).await;
}

#[async_trait]
impl Shim for VmfactoryShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        VmfactoryShim {
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
            setup: SETUP.get().cloned(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // containerd runs `start` in the bundle directory.
        let group = grouping(&opts.id, &annotations_in(Path::new(".")));
        let address = spawn(opts, &group, Vec::new()).await?;
        containerd_shim::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // containerd runs `delete` in the bundle directory after the shim died. Absolute:
        // unmounting matches mountinfo's absolute mount points.
        let bundle = std::env::current_dir().map_err(|e| Error::IoError {
            context: "cannot read the bundle directory".to_owned(),
            err: e,
        })?;
        let setup = self.setup.clone().unwrap_or_else(ShimSetup::unset);
        clean_bundle(&bundle, setup.provider.as_ref()).await;
        Ok(api::DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: Some(crate::events::now()).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let setup = self.setup.clone().unwrap_or_else(ShimSetup::unset);
        TaskService::new(
            setup.provider,
            Arc::new(Publisher::new(publisher, self.namespace.clone())),
            RootfsCache::new(setup.rootfs),
            self.exit.clone(),
        )
    }
}

impl ShimSetup {
    /// What a shim whose binary never called [`set_setup`] has: every VM refused.
    fn unset() -> Self {
        Self::refusing(crate::sandbox::SandboxError::Unsupported(
            "the shim binary set up no node".into(),
        ))
    }

    /// A setup whose every VM is refused with `error` (a node configuration that does not
    /// load), with images under the default run root.
    pub fn refusing(error: crate::sandbox::SandboxError) -> Self {
        ShimSetup {
            provider: Arc::new(crate::sandbox::Refused(error)),
            rootfs: RootfsConfig::new(Path::new(crate::DEFAULT_RUN_ROOT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_cri_container_joins_its_sandbox_and_others_get_their_own_shim() {
        let pod = ann(&[
            (CONTAINER_TYPE_ANNOTATION, "container"),
            (SANDBOX_ID_ANNOTATION, "sb1"),
        ]);
        assert_eq!(grouping("c1", &pod), "sb1");
        let sandbox = ann(&[
            (CONTAINER_TYPE_ANNOTATION, "sandbox"),
            (SANDBOX_ID_ANNOTATION, "sb1"),
        ]);
        assert_eq!(grouping("sb1", &sandbox), "sb1");
        assert_eq!(grouping("c2", &HashMap::new()), "c2");
        let empty = ann(&[
            (CONTAINER_TYPE_ANNOTATION, "container"),
            (SANDBOX_ID_ANNOTATION, ""),
        ]);
        assert_eq!(grouping("c3", &empty), "c3");
    }
}
