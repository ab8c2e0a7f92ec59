//! The template's data files (`memory`, `state`), checked by kind and size before a clone
//! uses them: opened with [`vmfactory_persist::open_regular`], so a symlink is refused, never
//! followed, and a FIFO or device is refused without waiting on it.

use std::path::Path;

use vmfactory_persist::Error as PersistError;

use super::error::TemplateError;
use super::metadata::{FileIdentity, SavedFiles, MEMORY_FILE, STATE_FILE};

/// The metadata of `path`, a regular file (not a symlink).
async fn stat_regular(path: &Path) -> Result<std::fs::Metadata, TemplateError> {
    match vmfactory_persist::open_regular(path).await {
        Ok((_file, meta)) => Ok(meta),
        Err(PersistError::NotFound { .. }) => Err(TemplateError::Missing {
            path: path.to_owned(),
        }),
        Err(source) => Err(TemplateError::File {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks that `path` is still the file `saved` describes: a regular file of the same size and
/// modification time. Two `stat`s' worth per clone, and it refuses a memory file written after
/// the save before a clone maps it (what a clone of one does depends on what was written:
/// QEMU may exit, or the guest hang with QEMU's monitor).
async fn check_saved(path: &Path, saved: &FileIdentity) -> Result<(), TemplateError> {
    let meta = stat_regular(path).await?;
    let found = FileIdentity::from_metadata(path, &meta)?;
    if found.size != saved.size {
        return Err(TemplateError::FileSize {
            path: path.to_owned(),
            expected: saved.size,
            found: found.size,
        });
    }
    if (found.mtime_secs, found.mtime_nanos) != (saved.mtime_secs, saved.mtime_nanos) {
        return Err(TemplateError::Modified {
            path: path.to_owned(),
            saved: saved.mtime(),
            found: found.mtime(),
        });
    }
    Ok(())
}

/// Checks that the template in `dir` still has its memory and state files as `saved`.
pub(super) async fn check_saved_files(dir: &Path, saved: &SavedFiles) -> Result<(), TemplateError> {
    check_saved(&dir.join(MEMORY_FILE), &saved.memory).await?;
    check_saved(&dir.join(STATE_FILE), &saved.state).await
}

/// Checks that `path` is a regular file (not a symlink) with `expected` bytes (or, with `None`,
/// not empty); returns its size.
pub(super) async fn check_size(path: &Path, expected: Option<u64>) -> Result<u64, TemplateError> {
    let found = stat_regular(path).await?.len();
    match expected {
        Some(expected) if found != expected => Err(TemplateError::FileSize {
            path: path.to_owned(),
            expected,
            found,
        }),
        None if found == 0 => Err(TemplateError::FileSize {
            path: path.to_owned(),
            expected: 1,
            found,
        }),
        _ => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmfactory_persist::FileKind;

    /// `check_size`, failing the test if it hangs (a FIFO opened without `O_NONBLOCK` would).
    async fn check(path: &Path, expected: Option<u64>) -> Result<u64, TemplateError> {
        tokio::time::timeout(Duration::from_secs(5), check_size(path, expected))
            .await
            .expect("check_size returns at once")
    }

    #[tokio::test]
    async fn sizes_of_regular_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::write(&state, b"abc").expect("write");
        assert_eq!(check(&state, None).await.expect("ok"), 3);
        assert_eq!(check(&state, Some(3)).await.expect("ok"), 3);
        assert!(matches!(
            check(&state, Some(4)).await,
            Err(TemplateError::FileSize {
                expected: 4,
                found: 3,
                ..
            })
        ));
        std::fs::write(&state, b"").expect("write");
        assert!(matches!(
            check(&state, None).await,
            Err(TemplateError::FileSize { found: 0, .. })
        ));
        assert!(matches!(
            check(&dir.path().join("memory"), None).await,
            Err(TemplateError::Missing { .. })
        ));
    }

    #[tokio::test]
    async fn symlinks_fifos_and_directories_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A memory file elsewhere, of the right size: a followed link would pass the check.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, vec![0; 4096]).expect("write");
        let memory = dir.path().join("memory");
        std::os::unix::fs::symlink(&elsewhere, &memory).expect("symlink");
        let err = check(&memory, Some(4096)).await.expect_err("symlink");
        assert!(
            matches!(&err, TemplateError::File { path, source: PersistError::Symlink { .. } } if *path == memory),
            "{err:?}"
        );

        let state = dir.path().join("state");
        nix::unistd::mkfifo(&state, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
        assert!(matches!(
            check(&state, None).await,
            Err(TemplateError::File {
                source: PersistError::NotRegular {
                    kind: FileKind::Fifo,
                    ..
                },
                ..
            })
        ));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        assert!(matches!(
            check(&sub, None).await,
            Err(TemplateError::File {
                source: PersistError::NotRegular {
                    kind: FileKind::Directory,
                    ..
                },
                ..
            })
        ));
    }
}
