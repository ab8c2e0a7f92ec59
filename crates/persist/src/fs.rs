//! Crash-safe file helpers: atomic replace, and size-limited reads that follow no symlink,
//! never block on a FIFO or device, and read regular files only.
//!
//! The `*_blocking` functions do synchronous I/O (including `fsync`) and must not be called from
//! async code; the async wrappers run them on tokio's blocking pool.

use std::fs::{self, File, Metadata, OpenOptions, Permissions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::error::{Error, FileKind, Result};

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

/// Reads all of `path`, a regular file opened with [`open_regular_blocking`] (no symlink
/// followed, no wait on a FIFO or device), failing with [`Error::TooLarge`] if it is longer
/// than `max` bytes, also if it grows while read, and with [`Error::NotFound`] if it does not
/// exist. Runs on tokio's blocking pool.
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
    let (file, meta) = open_regular_blocking(path)?;
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

/// Opens `path` for reading as [`read_limited`] does and returns it with its metadata, for
/// callers that need the descriptor or only its size (template files). Runs on tokio's
/// blocking pool.
pub async fn open_regular(path: impl Into<PathBuf>) -> Result<(File, Metadata)> {
    let path = path.into();
    tokio::task::spawn_blocking(move || open_regular_blocking(&path))
        .await
        .map_err(Error::Task)?
}

/// Synchronous [`open_regular`]: the one way this workspace opens a file it reads from a run
/// root, a template directory or a config path.
///
/// The open never follows a symbolic link in the last component ([`Error::Symlink`]) and never
/// waits (`O_NONBLOCK`: a FIFO would wait for a writer), nor makes a terminal ours
/// (`O_NOCTTY`); std adds `O_CLOEXEC`. The type is then checked on the open descriptor, so a
/// file swapped after a check cannot slip in: anything but a regular file is
/// [`Error::NotRegular`]. `O_NONBLOCK` has no effect on reads of a regular file.
pub fn open_regular_blocking(path: &Path) -> Result<(File, Metadata)> {
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| open_error(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io("stat", path, e))?;
    match FileKind::of(meta.file_type()) {
        None => Ok((file, meta)),
        Some(kind) => Err(Error::NotRegular {
            path: path.to_owned(),
            kind,
        }),
    }
}

/// The error of a failed open for reading: `O_NOFOLLOW` reports a symlink as `ELOOP`, which
/// also means a loop in the directories above; `lstat` tells them apart.
fn open_error(path: &Path, e: std::io::Error) -> Error {
    let symlink = || fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match e.kind() {
        ErrorKind::NotFound => Error::NotFound {
            path: path.to_owned(),
        },
        _ if e.raw_os_error() == Some(Errno::ELOOP as i32) && symlink() => Error::Symlink {
            path: path.to_owned(),
        },
        _ => Error::io("open", path, e),
    }
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
        // Refused by its type on the open descriptor (it was `InvalidPath` before kinds).
        assert!(matches!(
            read_limited(dir.path(), 10).await,
            Err(Error::NotRegular {
                kind: FileKind::Directory,
                ..
            })
        ));
        assert!(matches!(
            write_atomic("/", vec![], 0o600).await,
            Err(Error::InvalidPath { .. })
        ));
    }

    /// `err` and its causes on one line, as the CLI reports them.
    fn chain(err: &dyn std::error::Error) -> String {
        let mut line = err.to_string();
        let mut cause = err.source();
        while let Some(c) = cause {
            line = format!("{line}: {c}");
            cause = c.source();
        }
        line
    }

    /// How long a refusal may take: opening a FIFO without `O_NONBLOCK` waits forever.
    const FAST: std::time::Duration = std::time::Duration::from_secs(5);

    /// [`read_limited`] of `path`, failing the test if it does not return within [`FAST`].
    async fn read_fast(path: &Path, max: u64) -> Result<Vec<u8>> {
        tokio::time::timeout(FAST, read_limited(path, max))
            .await
            .unwrap_or_else(|_| panic!("reading {} hung", path.display()))
    }

    #[tokio::test]
    async fn regular_file_is_read_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"content").unwrap();
        assert_eq!(read_fast(&path, 7).await.unwrap(), b"content");
        let (_file, meta) = open_regular(&path).await.unwrap();
        assert_eq!(meta.len(), 7);
    }

    #[tokio::test]
    async fn symlink_is_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"secret").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = read_fast(&link, 100).await.unwrap_err();
        assert!(
            matches!(err, Error::Symlink { ref path } if *path == link),
            "{err:?}"
        );
        assert!(!err.to_string().contains("secret"));
        // A dangling link too, and the sibling that hands out descriptors.
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("dangling"))
            .unwrap();
        assert!(matches!(
            read_fast(&dir.path().join("dangling"), 100).await,
            Err(Error::Symlink { .. })
        ));
        assert!(matches!(
            open_regular(&link).await,
            Err(Error::Symlink { .. })
        ));
    }

    #[tokio::test]
    async fn fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("metadata.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = read_fast(&fifo, 100).await.unwrap_err();
        assert!(
            matches!(err, Error::NotRegular { kind: FileKind::Fifo, ref path } if *path == fifo),
            "{err:?}"
        );
        assert_eq!(
            chain(&err),
            format!("File {} is not a regular file: Is a FIFO", fifo.display())
        );
    }

    #[tokio::test]
    async fn dev_zero_is_refused_at_once() {
        let started = std::time::Instant::now();
        let err = read_fast(Path::new("/dev/zero"), 1 << 20)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::NotRegular {
                    kind: FileKind::CharDevice,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn kinds_of_regular_and_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"").unwrap();
        let kind = |p: &Path| FileKind::of(fs::symlink_metadata(p).unwrap().file_type());
        assert_eq!(kind(&file), None);
        assert_eq!(kind(dir.path()), Some(FileKind::Directory));
        assert_eq!(kind(Path::new("/dev/null")), Some(FileKind::CharDevice));
        let sock = dir.path().join("s");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(kind(&sock), Some(FileKind::Socket));
        assert!(matches!(
            open_regular_blocking(&sock),
            Err(Error::NotRegular { .. } | Error::Io { .. })
        ));
    }
}
