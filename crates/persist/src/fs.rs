//! Crash-safe file helpers: atomic replace and size-limited reads.
//!
//! The `*_blocking` functions do synchronous I/O (including `fsync`) and must not be called from
//! async code; the async wrappers run them on tokio's blocking pool.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes temporary files of concurrent writers within one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many temporary names are tried before giving up (a clash needs a stale file from a
/// process with the same pid).
const TEMP_ATTEMPTS: u32 = 16;

/// Atomically replaces `path` with `bytes`, leaving the file with permission bits `mode`.
///
/// Writes a temporary file in the same directory, `fsync`s it, renames it over `path` and
/// `fsync`s the directory, so after a crash `path` holds either the old or the new content,
/// never a mix, and concurrent writers never produce a torn file (the last rename wins).
/// Runs on tokio's blocking pool.
pub async fn write_atomic(path: impl Into<PathBuf>, bytes: Vec<u8>, mode: u32) -> Result<()> {
    let path = path.into();
    blocking(move || write_atomic_blocking(&path, &bytes, mode)).await
}

/// Reads all of `path`, failing with [`Error::TooLarge`] if it is longer than `max` bytes and
/// with [`Error::NotFound`] if it does not exist. Runs on tokio's blocking pool.
pub async fn read_limited(path: impl Into<PathBuf>, max: u64) -> Result<Vec<u8>> {
    let path = path.into();
    blocking(move || read_limited_blocking(&path, max)).await
}

/// Runs blocking filesystem work off the async executor.
pub(crate) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    tokio::task::spawn_blocking(f).await.map_err(Error::Task)?
}

/// Synchronous [`write_atomic`], for code that is not async. Blocks on `fsync`.
pub fn write_atomic_blocking(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let file_name = path.file_name().ok_or_else(|| Error::InvalidPath {
        path: path.to_owned(),
        reason: "has no file name",
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };

    let (tmp_path, mut file) = create_temp(dir, file_name.to_string_lossy().as_ref(), mode)?;
    let result = (|| {
        // Explicitly, because the mode given to open(2) is filtered by the umask.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| Error::io("set permissions of", &tmp_path, e))?;
        file.write_all(bytes)
            .map_err(|e| Error::io("write", &tmp_path, e))?;
        file.sync_all()
            .map_err(|e| Error::io("fsync", &tmp_path, e))?;
        fs::rename(&tmp_path, path).map_err(|e| Error::io("rename into", path, e))
    })();
    drop(file);
    if let Err(err) = result {
        // Best effort: the temporary name is hidden and unique, a leftover only wastes space.
        let _ = fs::remove_file(&tmp_path);
        return Err(err);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Creates a new, uniquely named hidden file next to the target.
fn create_temp(dir: &Path, file_name: &str, mode: u32) -> Result<(PathBuf, File)> {
    let pid = std::process::id();
    let mut last_err = None;
    for _ in 0..TEMP_ATTEMPTS {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_path = dir.join(format!(".{file_name}.tmp.{pid}.{n}"));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp_path)
        {
            Ok(file) => return Ok((tmp_path, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => last_err = Some((tmp_path, e)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::NotFound {
                    path: dir.to_owned(),
                })
            }
            Err(e) => return Err(Error::io("create", tmp_path, e)),
        }
    }
    let (tmp_path, e) = last_err.unwrap_or_else(|| {
        (
            dir.to_owned(),
            std::io::Error::from(ErrorKind::AlreadyExists),
        )
    });
    Err(Error::io("create", tmp_path, e))
}

/// Synchronous [`read_limited`], for code that is not async.
pub fn read_limited_blocking(path: &Path, max: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::NotFound {
            path: path.to_owned(),
        },
        _ => Error::io("open", path, e),
    })?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.is_file() {
        return Err(Error::InvalidPath {
            path: path.to_owned(),
            reason: "is not a regular file",
        });
    }
    if meta.len() > max {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            limit: max,
        });
    }
    // The file may grow between stat and read: never read more than max + 1 bytes.
    let mut buf = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    let read = buf.len() as u64;
    if read > max {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size: read,
            limit: max,
        });
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn write_then_read_round_trips_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.json");
        write_atomic(&path, b"hello".to_vec(), 0o600).await.unwrap();
        assert_eq!(read_limited(&path, 5).await.unwrap(), b"hello");
        assert_eq!(mode_of(&path), 0o600);

        // Replacing keeps the requested mode even if it differs from the old file's.
        write_atomic(&path, b"bye".to_vec(), 0o640).await.unwrap();
        assert_eq!(read_limited(&path, 5).await.unwrap(), b"bye");
        assert_eq!(mode_of(&path), 0o640);
    }

    #[tokio::test]
    async fn leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        for i in 0..5u8 {
            write_atomic(&path, vec![i; 10], 0o600).await.unwrap();
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }

    #[tokio::test]
    async fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![b'x'; 11]).unwrap();
        match read_limited(&path, 10).await {
            Err(Error::TooLarge { size, limit, .. }) => {
                assert_eq!((size, limit), (11, 10));
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(read_limited(&path, 11).await.unwrap().len(), 11);
    }

    #[tokio::test]
    async fn missing_file_and_missing_dir_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            read_limited(&missing, 10).await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            write_atomic(missing.join("f"), vec![], 0o600).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn directory_is_not_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_limited(dir.path(), 10).await,
            Err(Error::InvalidPath { .. })
        ));
        assert!(matches!(
            write_atomic("/", vec![], 0o600).await,
            Err(Error::InvalidPath { .. })
        ));
    }
}
