//! The snapshot's mounts at `bundle/rootfs`, as runc's shim mounts them.

use std::path::Path;

use containerd_shim::protos::types::mount::Mount;
use tracing::warn;

use crate::rootfs::RootfsMount;
use crate::status::{Code, TaskError};

/// Mounts `mounts` in order at `target` (created if missing); on a failure the ones already
/// mounted are unmounted again.
pub async fn mount_all(mounts: &[RootfsMount], target: &Path) -> Result<(), TaskError> {
    if let Err(e) = tokio::fs::create_dir_all(target).await {
        return Err(
            TaskError::from_error(Code::Internal, &e).context("Cannot create bundle/rootfs")
        );
    }
    for (n, m) in mounts.iter().enumerate() {
        let mut pm = Mount::new();
        pm.type_ = m.kind.clone();
        pm.source = m.source.clone();
        pm.options = m.options.clone();
        if let Err(e) = containerd_shim::util::mount_rootfs(&pm, target).await {
            if n > 0 {
                unmount(target).await;
            }
            return Err(TaskError::from_error(Code::Internal, &e)
                .context(&format!("Cannot mount the rootfs at {}", target.display())));
        }
    }
    Ok(())
}

/// Unmounts everything at and under `dir`; failures are logged (a later `delete` retries).
pub async fn unmount(dir: &Path) {
    let d = dir.to_string_lossy().into_owned();
    let r = tokio::task::spawn_blocking(move || {
        containerd_shim::mount::umount_recursive(Some(&d), libc::MNT_DETACH)
    })
    .await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(dir = %dir.display(), error = %e, "cannot unmount rootfs"),
        Err(e) => warn!(dir = %dir.display(), error = %e, "unmount task failed"),
    }
}
