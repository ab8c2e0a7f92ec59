//! The steps of making a template: its directory, and the template VM's boot, warm-up and
//! save.

use std::path::Path;

use tracing::info;
use vmfactory_vm::{AgentChannel, Backends, ForkReseed, Vm, VmConfig};

use super::error::{TemplateError, TemplateStep};

type Result<T> = std::result::Result<T, TemplateError>;

/// What a template creation has done so far.
#[derive(Debug, Default)]
pub(super) struct Made {
    pub(super) dir: bool,
    pub(super) mounted: bool,
    pub(super) files: bool,
}

/// Boots the template VM, warms it up, asks its agent whether clones will reseed themselves
/// (and so arms it), waits for the agent to re-listen after a disconnect (virtio-serial),
/// pauses, saves, and stops it (also on failure). Returns the agent's answer.
pub(super) async fn save_template_vm(
    tpl: &VmConfig,
    backends: &dyn Backends,
) -> Result<ForkReseed> {
    let vm = Vm::new_with(tpl.clone(), backends)
        .await
        .map_err(|e| TemplateError::vm(TemplateStep::Boot, e))?;
    let saved = async {
        // A serial port is reopened by the agent after the host leaves, and a clone must not
        // find it half-way through. A vsock listener never closes: a connection the guest
        // still holds at the save is reset in each clone (transport reset), so no wait.
        let serial = matches!(tpl.hypervisor.agent_channel, AgentChannel::VirtioSerial);
        // QEMU drops console output while no console client is connected: subscribe (the
        // proxy is connected) before disconnecting.
        let mut lines = if serial {
            let lines = vm
                .proxy()
                .subscribe()
                .ok_or_else(|| TemplateError::NoConsole {
                    id: vm.id().to_owned(),
                })?;
            Some(lines)
        } else {
            None
        };
        // Run the guest side of `get_vm` once before saving: every clone then resumes with
        // it done (a ready CRNG, the agent's handler pages mapped) instead of doing it first.
        let (seeded, timed) = tokio::join!(vm.reseed_rng(), vm.sync_time());
        seeded.map_err(|e| TemplateError::vm(TemplateStep::WarmUpReseed, e))?;
        timed.map_err(|e| TemplateError::vm(TemplateStep::WarmUpTimeSync, e))?;
        // After the warm-up: a guest reseeds on a VM fork only once its CRNG is ready.
        let fork = vm
            .prepare_template()
            .await
            .map_err(|e| TemplateError::vm(TemplateStep::Prepare, e))?;
        match &fork {
            ForkReseed::Active => info!("clones will reseed their CRNG themselves (VMGenID)"),
            ForkReseed::Inactive(why) => {
                info!(reason = %why, "clones need the host's RNG reseed");
            }
        }
        vm.disconnect()
            .await
            .map_err(|e| TemplateError::vm(TemplateStep::Disconnect, e))?;
        if let Some(lines) = lines.as_mut() {
            let relisten = vmfactory_proxy::wait_for_line(lines, tpl.agent.ready_timeout, |l| {
                l.contains(vmfactory_agent::channel::LISTENING_PREFIX)
            });
            vm.unless_exited("the agent's re-listen", relisten)
                .await
                .map_err(|e| TemplateError::vm(TemplateStep::Relisten, e))?
                .map_err(|source| TemplateError::Relisten {
                    id: vm.id().to_owned(),
                    source,
                })?;
        }
        vm.pause()
            .await
            .map_err(|e| TemplateError::vm(TemplateStep::Pause, e))?;
        vm.save()
            .await
            .map_err(|e| TemplateError::vm(TemplateStep::Save, e))?;
        Ok(fork)
    }
    .await;
    let stopped = vm
        .stop()
        .await
        .map_err(|e| TemplateError::vm(TemplateStep::Stop, e));
    let fork = saved?;
    stopped.map(|()| fork)
}

/// Creates `path` (and its parents) with mode 0700; true if `path` itself was created.
pub(super) async fn create_dir(path: &Path) -> Result<bool> {
    if let Some(parent) = path.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| TemplateError::io("create", parent, e))?;
    }
    let mut b = tokio::fs::DirBuilder::new();
    b.mode(0o700);
    match b.create(path).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .await
                .map_err(|e| TemplateError::io("chmod", path, e))?;
            Ok(false)
        }
        Err(e) => Err(TemplateError::io("create", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmfactory_vm::FakeBackends;

    use super::super::factory::TemplateFactory;
    use super::*;
    use crate::testing::FakeHost;

    #[tokio::test]
    async fn a_failed_preparation_fails_the_template_and_cleans_up() {
        let b = Arc::new(FakeBackends::new());
        b.fail_agent_methods(["prepare_template"]);
        let host = Arc::new(FakeHost::default());
        let err = TemplateFactory::new_with(&b.config(), b.template_path(), b.clone(), host)
            .await
            .expect_err("fails");
        assert!(
            matches!(
                err,
                TemplateError::Vm {
                    step: TemplateStep::Prepare,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!b.template_path().exists());
        assert_eq!(b.live().await, 0);
        assert_eq!(b.vm_dir_count(), 0);
    }
}
