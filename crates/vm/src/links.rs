//! Symlinks a VM makes for a sandbox and removes on stop: creating one over an old symlink,
//! and removing only those that still lead into the VM's directory.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::error::{Error, Result};

/// Creates the symlink `link` → `target`, replacing a symlink already at `link`.
pub(crate) async fn make_link(target: &Path, link: &Path) -> Result<()> {
    match tokio::fs::symlink_metadata(link).await {
        Ok(m) if m.file_type().is_symlink() => {
            tokio::fs::remove_file(link)
                .await
                .map_err(|source| Error::Link {
                    op: "Removing",
                    path: link.to_owned(),
                    source,
                })?;
        }
        Ok(_) => {
            return Err(Error::LinkExists {
                path: link.to_owned(),
            })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Link {
                op: "Inspecting",
                path: link.to_owned(),
                source,
            })
        }
    }
    tokio::fs::symlink(target, link)
        .await
        .map_err(|source| Error::Link {
            op: "Creating",
            path: link.to_owned(),
            source,
        })
}

/// Removes each symlink in `links` that still leads into `vm_dir` (others were replaced by
/// someone else and are left alone).
pub(crate) async fn remove_links(links: &[PathBuf], vm_dir: &Path) {
    for link in links {
        match tokio::fs::read_link(link).await {
            Ok(target) if target.starts_with(vm_dir) => {
                if let Err(e) = tokio::fs::remove_file(link).await {
                    warn!(link = %link.display(), error = %e, "cannot remove sandbox link");
                }
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => warn!(link = %link.display(), error = %e, "cannot read sandbox link"),
        }
    }
}
