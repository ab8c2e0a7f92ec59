//! What vmfactory can prove it made at a template path, and removing exactly that.
//!
//! A template directory gets a marker (`.vmfactory-template`) right after it is created or
//! mounted, recording whether this code created the directory and mounted the tmpfs. Removal
//! takes the template's exclusive [`OpLock`], refuses a path without a marker, refuses while
//! any process still maps the template memory (live clones), and only then removes the known
//! files, the tmpfs it mounted and the directory it created — never half of it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vmfactory_persist::{LockMode, OpLock};

use super::error::TemplateError;
use super::host::{processes_mapping, TemplateHost};
use super::metadata::{write_json, MEMORY_FILE, METADATA_FILE, STATE_FILE};

/// The marker file in a template directory.
pub const MARKER_FILE: &str = ".vmfactory-template";
/// Version of the marker's layout.
const MARKER_VERSION: u32 = 1;
/// Longest marker read (a real one is ~60 bytes).
const MAX_MARKER_SIZE: u64 = 4096;
/// How many mounts removal takes off one path at most (one, unless someone stacked them).
const MAX_UNMOUNTS: usize = 8;
/// How long removal waits for a template being made (or removed) by another process.
pub(crate) const REMOVE_WAIT: Duration = Duration::from_secs(120);

/// What this code did to make a template directory, recorded in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Marker {
    version: u32,
    /// The directory did not exist before: remove it with the template.
    pub(crate) created_dir: bool,
    /// A tmpfs was mounted on it: unmount it with the template.
    pub(crate) mounted: bool,
}

impl Marker {
    pub(crate) fn new(created_dir: bool, mounted: bool) -> Self {
        Self {
            version: MARKER_VERSION,
            created_dir,
            mounted,
        }
    }

    /// Writes the marker into `dir` (atomically, 0600).
    pub(crate) async fn write(&self, dir: &Path) -> Result<(), TemplateError> {
        write_json(&dir.join(MARKER_FILE), self).await
    }

    /// The marker in `dir`, if there is one this user wrote.
    pub(crate) async fn load(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let path = dir.join(MARKER_FILE);
        let meta = match tokio::fs::symlink_metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TemplateError::io("stat", &path, e)),
        };
        // Only a regular file of ours counts: not a symlink, not someone else's file.
        if !meta.file_type().is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
            return Ok(None);
        }
        let bytes = vmfactory_persist::read_limited(&path, MAX_MARKER_SIZE)
            .await
            .map_err(|source| TemplateError::Persist {
                op: "read",
                path: path.clone(),
                source,
            })?;
        let marker: Self =
            serde_json::from_slice(&bytes).map_err(|source| TemplateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        Ok((marker.version == MARKER_VERSION).then_some(marker))
    }
}

/// Takes the template's exclusive lock (waiting while another process makes or removes it).
pub(crate) async fn lock_exclusive(path: &Path, wait: Duration) -> Result<OpLock, TemplateError> {
    OpLock::acquire(path, LockMode::Exclusive, wait)
        .await
        .map_err(|source| TemplateError::Busy {
            path: path.to_owned(),
            source,
        })
}

/// Removes the template at `path` while `_lock` (its exclusive lock) is held: refuses a path
/// without a marker or whose memory a live process still maps, before touching anything; then
/// removes the known files, the marker, the tmpfs it mounted and the directory it created. A
/// path that does not exist is nothing to do. The lock file is the caller's to remove.
pub(crate) async fn remove_locked(
    path: &Path,
    host: &dyn TemplateHost,
    _lock: &OpLock,
) -> Result<(), TemplateError> {
    match tokio::fs::symlink_metadata(path).await {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TemplateError::io("stat", path, e)),
        Ok(m) if !m.file_type().is_dir() => {
            return Err(TemplateError::NotOurs {
                path: path.to_owned(),
                marker: MARKER_FILE,
            })
        }
        Ok(_) => {}
    }
    let Some(marker) = Marker::load(path).await? else {
        return Err(TemplateError::NotOurs {
            path: path.to_owned(),
            marker: MARKER_FILE,
        });
    };
    let users = processes_mapping(&path.join(MEMORY_FILE)).await;
    if !users.is_empty() {
        return Err(TemplateError::InUse {
            path: path.to_owned(),
            pids: users,
        });
    }
    for name in [MEMORY_FILE, STATE_FILE, METADATA_FILE, MARKER_FILE] {
        remove_file(&path.join(name)).await?;
    }
    if marker.mounted {
        for _ in 0..MAX_UNMOUNTS {
            if host.mount_type(path).await?.as_deref() != Some("tmpfs") {
                break;
            }
            host.unmount(path).await?;
        }
    }
    if marker.created_dir {
        match tokio::fs::remove_dir(path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Files someone else put there: they and the directory stay.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOTEMPTY as i32) => {
                warn!(path = %path.display(), "template removed; the directory holds other files and stays");
            }
            Err(e) => return Err(TemplateError::io("remove", path, e)),
        }
    }
    info!(path = %path.display(), "template removed");
    Ok(())
}

/// Removes `path` if it exists.
pub(crate) async fn remove_file(path: &Path) -> Result<(), TemplateError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TemplateError::io("remove", path, e)),
    }
}
