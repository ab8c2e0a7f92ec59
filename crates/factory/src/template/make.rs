//! The steps of making a template: its directory, and the template VM's boot, warm-up and
//! save.

use std::path::Path;

use vmfactory_vm::{AgentChannel, Backends, Vm, VmConfig};

use super::error::{TemplateError, TemplateStep};

type Result<T> = std::result::Result<T, TemplateError>;

/// What a template creation has done so far.
#[derive(Debug, Default)]
pub(super) struct Made {
    pub(super) dir: bool,
    pub(super) mounted: bool,
    pub(super) files: bool,
}

/// Boots the template VM, warms it up, waits for its agent to re-listen after a disconnect
/// (virtio-serial), pauses, saves, and stops it (also on failure).
pub(super) async fn save_template_vm(tpl: &VmConfig, backends: &dyn Backends) -> Result<()> {
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
            .map_err(|e| TemplateError::vm(TemplateStep::Save, e))
    }
    .await;
    let stopped = vm
        .stop()
        .await
        .map_err(|e| TemplateError::vm(TemplateStep::Stop, e));
    saved.and(stopped)
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
