//! A container's rootfs as a read-only erofs image, built once per set of committed layers.
//!
//! containerd hands the shim its snapshot as mounts: an overlay (`lowerdir=…,upperdir=…,
//! workdir=…`) from the overlayfs snapshotter, or a bind mount of one directory from the native
//! snapshotter. The lower layers of an overlay are committed snapshots and never change, so an
//! image made from them can be shared by every container of that image; the cache key is the
//! identity (path, device, inode, mtime) of each lower directory, in order. The writable upper
//! directory is not part of the image: in the guest the container's root is an overlay of the
//! image and a tmpfs, so a container's writes live in guest memory and never reach the
//! snapshot.
//!
//! Several shims (one per `ctr run`) may ask for the same image at once. A build holds an
//! exclusive `flock` on `<key>.build` and writes `<key>.erofs.tmp-<pid>` before renaming it
//! into place, so one build runs and the others find its result. A user of an image holds a
//! shared lock on `<key>.lock` ([`RootfsImage`]) from before its lookup until its container is
//! deleted; pruning only removes an image whose `<key>.lock` it gets exclusively without
//! waiting, so an image in use (or being looked up or built) is never removed. A shim that
//! dies releases its locks with its file descriptors.
//!
//! The bound: after each build, images beyond the newest [`RootfsConfig::max_images`] or past
//! [`RootfsConfig::max_bytes`] in total (newest first, by mtime, which a hit refreshes) are
//! removed unless in use.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// Bumped when the image layout or the key's inputs change, so old images are not reused.
const KEY_VERSION: &str = "vmfactory-rootfs-1";

/// The `mkfs.erofs` binary (Debian's erofs-utils).
pub const MKFS_EROFS: &str = "mkfs.erofs";

/// One of containerd's rootfs mounts (`containerd.types.Mount`), as the Create request has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    /// `overlay`, `bind`, …
    pub kind: String,
    /// The mount source (a directory for a bind mount).
    pub source: String,
    /// Mount options (`lowerdir=…`, `rbind`, `ro`, …).
    pub options: Vec<String>,
}

/// Where the images live and how many are kept.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RootfsConfig {
    /// The cache directory: `<run_root>/rootfs`, so `vmfactory destroy` can clean it.
    pub dir: PathBuf,
    /// Keep at most this many images (newest first).
    pub max_images: usize,
    /// Keep at most this many bytes of images in total (newest first).
    pub max_bytes: u64,
    /// The `mkfs.erofs` program.
    pub mkfs: PathBuf,
}

impl RootfsConfig {
    /// The cache under `<run_root>/rootfs`, keeping 32 images and 8 GiB.
    pub fn new(run_root: &Path) -> Self {
        RootfsConfig {
            dir: run_root.join("rootfs"),
            max_images: 32,
            max_bytes: 8 << 30,
            mkfs: PathBuf::from(MKFS_EROFS),
        }
    }
}

/// Why a rootfs image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The request's mounts are not an overlay or bind mount we can read layers from.
    #[error("Unsupported rootfs mounts: {0}")]
    Unsupported(String),
    /// A layer directory could not be looked at.
    #[error("Cannot read rootfs layer {}", path.display())]
    Layer {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The cache directory or one of its files failed.
    #[error("Rootfs cache I/O failed on {}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Mounting or unmounting the read-only overlay of the layers failed.
    #[error("Cannot mount the layers' read-only overlay at {}", path.display())]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// `mkfs.erofs` could not be run or failed.
    #[error("mkfs.erofs failed for {}: {stderr}", image.display())]
    Mkfs {
        /// The image it was making.
        image: PathBuf,
        /// Its last stderr line (or the spawn error).
        stderr: String,
    },
    /// A blocking task panicked or was cancelled.
    #[error("Rootfs task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

/// Where the image's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layers {
    /// One directory, used as it is.
    Dir(PathBuf),
    /// Overlay lower directories, topmost first (containerd's `lowerdir=` order).
    Overlay(Vec<PathBuf>),
}

impl Layers {
    /// The read-only layers of `mounts`; with no mounts, `rootfs` (the bundle's prepared root).
    pub fn from_mounts(mounts: &[RootfsMount], rootfs: &Path) -> Result<Layers, RootfsError> {
        match mounts {
            [] => Ok(Layers::Dir(rootfs.to_path_buf())),
            [m] if m.kind == "overlay" => {
                let lower = m
                    .options
                    .iter()
                    .find_map(|o| o.strip_prefix("lowerdir="))
                    .ok_or_else(|| RootfsError::Unsupported("overlay without lowerdir".into()))?;
                let dirs: Vec<PathBuf> = lower
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect();
                match dirs.as_slice() {
                    [] => Err(RootfsError::Unsupported(
                        "overlay with an empty lowerdir".into(),
                    )),
                    [one] => Ok(Layers::Dir(one.clone())),
                    _ => Ok(Layers::Overlay(dirs)),
                }
            }
            [m] if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
                Ok(Layers::Dir(PathBuf::from(&m.source)))
            }
            [m] => Err(RootfsError::Unsupported(format!("mount type {:?}", m.kind))),
            _ => Err(RootfsError::Unsupported(format!("{} mounts", mounts.len()))),
        }
    }

    fn dirs(&self) -> &[PathBuf] {
        match self {
            Layers::Dir(d) => std::slice::from_ref(d),
            Layers::Overlay(v) => v,
        }
    }

    /// The cache key: a hash of each directory's path, device, inode and mtime, in order.
    pub fn key(&self) -> Result<String, RootfsError> {
        let mut h = Sha256::new();
        h.update(KEY_VERSION.as_bytes());
        for d in self.dirs() {
            let md = fs::metadata(d).map_err(|source| RootfsError::Layer {
                path: d.clone(),
                source,
            })?;
            if !md.is_dir() {
                return Err(RootfsError::Layer {
                    path: d.clone(),
                    source: io::Error::other("not a directory"),
                });
            }
            h.update(d.as_os_str().as_encoded_bytes());
            h.update([0]);
            for n in [md.dev(), md.ino()] {
                h.update(n.to_le_bytes());
            }
            h.update(md.mtime().to_le_bytes());
            h.update(md.mtime_nsec().to_le_bytes());
        }
        let digest = h.finalize();
        Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
    }
}

/// An image in use: its path and the shared lock that keeps pruning away from it.
#[derive(Debug)]
pub struct RootfsImage {
    /// The erofs image.
    pub path: PathBuf,
    /// Whether this call built it (false: found in the cache).
    pub built: bool,
    _lease: Flock<File>,
}

/// The image cache of one node.
#[derive(Debug, Clone)]
pub struct RootfsCache {
    config: RootfsConfig,
}

impl RootfsCache {
    /// A cache over `config` (the directory is created on first use).
    pub fn new(config: RootfsConfig) -> Self {
        RootfsCache { config }
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }

    /// The image of `layers`: found, or built once however many callers ask at the same time.
    pub async fn image(&self, layers: &Layers) -> Result<RootfsImage, RootfsError> {
        let key = blocking({
            let layers = layers.clone();
            move || layers.key()
        })
        .await?;
        let dir = self.config.dir.clone();
        let image = dir.join(format!("{key}.erofs"));
        let lock_path = dir.join(format!("{key}.lock"));
        blocking({
            let dir = dir.clone();
            move || fs::create_dir_all(&dir).map_err(|source| RootfsError::Io { path: dir, source })
        })
        .await?;

        // The lease: held by every user of the image until its container is deleted, so a
        // pruner (which needs it exclusively) never removes an image in use.
        let lease = blocking({
            let p = lock_path.clone();
            move || lock_file(&p, FlockArg::LockShared)
        })
        .await?;
        if exists(&image)? {
            touch(&image);
            return Ok(RootfsImage {
                path: image,
                built: false,
                _lease: lease,
            });
        }
        // Builders take another lock, so waiting to build never waits for the image's users.
        let build_lock = blocking({
            let p = dir.join(format!("{key}.build"));
            move || lock_file(&p, FlockArg::LockExclusive)
        })
        .await?;
        // Another builder may have finished while we waited.
        let built = match exists(&image)? {
            true => false,
            false => {
                self.build(layers, &image).await?;
                true
            }
        };
        drop(build_lock);
        if built {
            let cache = self.clone();
            blocking(move || {
                cache.prune();
                Ok(())
            })
            .await?;
        }
        Ok(RootfsImage {
            path: image,
            built,
            _lease: lease,
        })
    }

    async fn build(&self, layers: &Layers, image: &Path) -> Result<(), RootfsError> {
        let started = Instant::now();
        let tmp = image.with_extension(format!("erofs.tmp-{}", std::process::id()));
        let result = match layers {
            Layers::Dir(d) => self.mkfs(&tmp, d).await,
            Layers::Overlay(lowers) => self.mkfs_overlay(&tmp, lowers).await,
        };
        let result = result.and_then(|()| {
            fs::rename(&tmp, image).map_err(|source| RootfsError::Io {
                path: image.to_path_buf(),
                source,
            })
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        let size = fs::metadata(image).map(|m| m.len()).unwrap_or(0);
        info!(
            image = %image.display(),
            bytes = size,
            ms = started.elapsed().as_millis() as u64,
            "built rootfs image"
        );
        Ok(())
    }

    /// Mounts the lower directories as a read-only overlay in a private temporary directory,
    /// makes the image from it, and unmounts.
    async fn mkfs_overlay(&self, tmp: &Path, lowers: &[PathBuf]) -> Result<(), RootfsError> {
        let mnt = tmp.with_extension("mnt");
        let lowerdir = lowers
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        blocking({
            let mnt = mnt.clone();
            move || {
                fs::create_dir_all(&mnt).map_err(|source| RootfsError::Io {
                    path: mnt.clone(),
                    source,
                })?;
                let data = format!("lowerdir={lowerdir}");
                nix::mount::mount(
                    Some("overlay"),
                    &mnt,
                    Some("overlay"),
                    nix::mount::MsFlags::MS_RDONLY,
                    Some(data.as_str()),
                )
                .map_err(|source| {
                    let _ = fs::remove_dir(&mnt);
                    RootfsError::Mount { path: mnt, source }
                })
            }
        })
        .await?;
        let made = self.mkfs(tmp, &mnt).await;
        let unmounted = blocking(move || {
            nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
                RootfsError::Mount {
                    path: mnt.clone(),
                    source,
                }
            })?;
            let _ = fs::remove_dir(&mnt);
            Ok(())
        })
        .await;
        made.and(unmounted)
    }

    async fn mkfs(&self, image: &Path, dir: &Path) -> Result<(), RootfsError> {
        let out = tokio::process::Command::new(&self.config.mkfs)
            .arg("--quiet")
            .arg(image)
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| RootfsError::Mkfs {
                image: image.to_path_buf(),
                stderr: format!("cannot run {}: {e}", self.config.mkfs.display()),
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(RootfsError::Mkfs {
            image: image.to_path_buf(),
            stderr: stderr
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .to_owned(),
        })
    }

    /// Removes every image not in use, the lock and build files no image needs any more, and
    /// the directory once empty (for `vmfactory destroy`); returns how many images are kept
    /// because a container still uses them. Blocking: call it off the async threads.
    pub fn clear(&self) -> usize {
        let all = RootfsCache::new(RootfsConfig {
            max_images: 0,
            max_bytes: 0,
            ..self.config.clone()
        });
        all.prune();
        let Ok(entries) = fs::read_dir(&self.config.dir) else {
            return 0;
        };
        let mut kept = 0;
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            match path.extension().and_then(|x| x.to_str()) {
                Some("erofs") => kept += 1,
                // A key's lock or build file whose image is gone (pruned, or a build that died):
                // removed under its own lock, so a shim looking the key up now is not cut off.
                Some("lock" | "build") if !path.with_extension("erofs").exists() => {
                    if let Ok(_held) = lock_file(&path, FlockArg::LockExclusiveNonblock) {
                        let _ = fs::remove_file(&path);
                    }
                }
                _ => {}
            }
        }
        // Only when empty: a live build's temporary file or a kept image stays.
        let _ = fs::remove_dir(&self.config.dir);
        kept
    }

    /// Removes images past the bound, newest kept first, skipping any in use.
    pub fn prune(&self) {
        let Ok(entries) = fs::read_dir(&self.config.dir) else {
            return;
        };
        let mut images: Vec<(PathBuf, SystemTime, u64)> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
            .filter_map(|p| {
                let md = fs::metadata(&p).ok()?;
                Some((p, md.modified().ok()?, md.len()))
            })
            .collect();
        images.sort_by_key(|i| std::cmp::Reverse(i.1));
        let mut total = 0u64;
        for (n, (path, _, len)) in images.into_iter().enumerate() {
            total = total.saturating_add(len);
            if n < self.config.max_images && total <= self.config.max_bytes {
                continue;
            }
            let lock_path = path.with_extension("lock");
            match lock_file(&lock_path, FlockArg::LockExclusiveNonblock) {
                Ok(_held) => {
                    // Removed under the lock: a later locker sees a new inode and retries.
                    let _ = fs::remove_file(&path);
                    let _ = fs::remove_file(path.with_extension("build"));
                    let _ = fs::remove_file(&lock_path);
                    debug!(image = %path.display(), "pruned rootfs image");
                }
                Err(_) => debug!(image = %path.display(), "rootfs image in use, kept"),
            }
        }
    }
}

/// Locks `path` (created if missing), retrying when the file was replaced while waiting, so a
/// lock is always on the file the path names.
fn lock_file(path: &Path, how: FlockArg) -> Result<Flock<File>, RootfsError> {
    let io_err = |source: io::Error| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    };
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let held = Flock::lock(file, how).map_err(|(_, e)| io_err(e.into()))?;
        let ours = held.metadata().map_err(io_err)?.ino();
        match fs::metadata(path) {
            Ok(md) if md.ino() == ours => return Ok(held),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
}

fn exists(path: &Path) -> Result<bool, RootfsError> {
    match fs::metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(RootfsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Marks a cache hit as recent for pruning.
fn touch(path: &Path) {
    let set = File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = set {
        warn!(image = %path.display(), error = %e, "cannot refresh rootfs image mtime");
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RootfsError> + Send + 'static,
) -> Result<T, RootfsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(RootfsError::Task)?
}

#[cfg(test)]
#[path = "rootfs_tests.rs"]
mod tests;
