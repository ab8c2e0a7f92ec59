//! [`TemplateHost`]: what a template needs from the host besides a VM — mount points, tmpfs
//! mounts, the QEMU version and what `accel = auto` resolves to — behind a narrow trait, so
//! unit tests fake it and run without root or KVM. [`SystemHost`] is the real one.

use std::fmt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tracing::debug;
use vmfactory_hypervisor::{Accel, HypervisorConfig};

use super::error::TemplateError;

/// Where the kernel lists this process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The file in the run root that keeps what `accel = auto` resolved to on this host (see
/// [`vmfactory_hypervisor::resolve_accel_with_cache`]).
pub const ACCEL_CACHE_FILE: &str = "accel.json";

/// What [`TemplateHost::mount_tmpfs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOutcome {
    /// A tmpfs is mounted at the path.
    Mounted,
    /// Mounting is not permitted here (`EPERM`, e.g. no `CAP_SYS_ADMIN`); nothing was mounted.
    NotPermitted,
}

/// The host operations a template needs. Object safe.
#[async_trait]
pub trait TemplateHost: Send + Sync + fmt::Debug {
    /// The file-system type of the topmost mount exactly at `path` (as
    /// `/proc/self/mountinfo` lists it), or `None` when `path` is not a mount point or does not
    /// exist.
    async fn mount_type(&self, path: &Path) -> Result<Option<String>, TemplateError>;

    /// Mounts a tmpfs of `size_bytes` at the existing directory `path` with `MS_NOSUID |
    /// MS_NODEV` and mode 0700.
    async fn mount_tmpfs(
        &self,
        path: &Path,
        size_bytes: u64,
    ) -> Result<MountOutcome, TemplateError>;

    /// Unmounts the topmost mount at `path`.
    async fn unmount(&self, path: &Path) -> Result<(), TemplateError>;

    /// The first line of `<qemu> --version`.
    async fn qemu_version(&self, qemu: &Path) -> Result<String, TemplateError>;

    /// The accelerator `cfg` runs with on this host (`kvm` or `tcg`), `auto` resolved once per
    /// host and kept in `<run_root>/`[`ACCEL_CACHE_FILE`].
    async fn resolve_accel(&self, cfg: &HypervisorConfig, run_root: &Path) -> Accel;
}

/// The real host: `/proc/self/mountinfo`, mount(2) and umount(2) on tokio's blocking pool, and
/// QEMU run through `tokio::process`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemHost;

#[async_trait]
impl TemplateHost for SystemHost {
    async fn mount_type(&self, path: &Path) -> Result<Option<String>, TemplateError> {
        let canonical = match tokio::fs::canonicalize(path).await {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TemplateError::io("resolve", path, e)),
        };
        let info = tokio::fs::read_to_string(MOUNTINFO)
            .await
            .map_err(|e| TemplateError::io("read", Path::new(MOUNTINFO), e))?;
        Ok(parse_mount_type(&info, &canonical))
    }

    async fn mount_tmpfs(
        &self,
        path: &Path,
        size_bytes: u64,
    ) -> Result<MountOutcome, TemplateError> {
        let target = path.to_owned();
        let data = format!("size={size_bytes},mode=0700");
        let res = tokio::task::spawn_blocking(move || {
            nix::mount::mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some(data.as_str()),
            )
        })
        .await
        .map_err(TemplateError::Task)?;
        match res {
            Ok(()) => {
                debug!(path = %path.display(), size_bytes, "tmpfs mounted");
                Ok(MountOutcome::Mounted)
            }
            Err(Errno::EPERM) => Ok(MountOutcome::NotPermitted),
            Err(errno) => Err(TemplateError::Mount {
                path: path.to_owned(),
                source: errno,
            }),
        }
    }

    async fn unmount(&self, path: &Path) -> Result<(), TemplateError> {
        let target = path.to_owned();
        tokio::task::spawn_blocking(move || nix::mount::umount2(&target, MntFlags::empty()))
            .await
            .map_err(TemplateError::Task)?
            .map_err(|errno| TemplateError::Unmount {
                path: path.to_owned(),
                source: errno,
            })?;
        debug!(path = %path.display(), "unmounted");
        Ok(())
    }

    async fn qemu_version(&self, qemu: &Path) -> Result<String, TemplateError> {
        vmfactory_hypervisor::qemu_version(qemu)
            .await
            .map_err(|source| TemplateError::QemuVersion {
                qemu: qemu.to_owned(),
                source,
            })
    }

    async fn resolve_accel(&self, cfg: &HypervisorConfig, run_root: &Path) -> Accel {
        let cache = run_root.join(ACCEL_CACHE_FILE);
        vmfactory_hypervisor::resolve_accel_with_cache(cfg, Some(&cache)).await
    }
}

/// The processes that map `file` (its path in `/proc/PID/maps`): VMs cloned from a template
/// map its memory file. Processes whose maps cannot be read (gone, or another user's when not
/// root) are skipped.
pub(crate) async fn processes_mapping(file: &Path) -> Vec<u32> {
    let file = file.to_owned();
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/maps"))
                    .is_ok_and(|maps| maps_name(&maps, &file))
            })
            .collect();
        pids.sort_unstable();
        pids
    })
    .await
    .unwrap_or_default()
}

/// Whether a `/proc/PID/maps` text maps `file` (by path; a deleted file shows as
/// `PATH (deleted)` and is not `file` any more).
fn maps_name(maps: &str, file: &Path) -> bool {
    maps.lines().any(|line| {
        // "addr perms offset dev inode      path": the path is everything after the inode.
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            rest = rest.find(' ').map_or("", |i| &rest[i..]);
        }
        Path::new(rest.trim_start()) == file
    })
}

/// The file-system type of the last (topmost) mount at `path` in a mountinfo text.
pub(crate) fn parse_mount_type(info: &str, path: &Path) -> Option<String> {
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            // Optional fields end with "-", then the file-system type.
            let sep = fields.iter().position(|f| *f == "-")?;
            let fs_type = fields.get(sep + 1)?;
            (mount_point == path).then(|| (*fs_type).to_owned())
        })
        .next_back()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let (b'\\', Some(oct)) = (bytes[i], bytes.get(i + 1..i + 4)) {
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw
42 22 0:39 / /tmp/a\\040b rw,relatime shared:5 - tmpfs tmpfs rw,size=1024k,mode=700
43 22 0:40 / /tmp/t rw,relatime - tmpfs tmpfs rw
44 43 0:41 / /tmp/t rw,relatime - ramfs ramfs rw
";

    #[test]
    fn maps_lines_name_their_file() {
        let maps = "\
7f00-7f10 rw-p 00000000 00:2a 17                         /run/vc/vm/template/memory
7f10-7f20 r-xp 00000000 fd:01 99                         /usr/lib/libc.so.6
7f20-7f30 rw-p 00000000 00:2a 18                         /tmp/x/memory (deleted)
7f30-7f40 rw-p 00000000 00:00 0
";
        assert!(maps_name(maps, Path::new("/run/vc/vm/template/memory")));
        assert!(!maps_name(maps, Path::new("/tmp/x/memory")), "deleted");
        assert!(!maps_name(maps, Path::new("/run/vc/vm/template")));
    }

    #[tokio::test]
    async fn a_mapped_file_names_this_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("memory");
        std::fs::write(&file, vec![0u8; 4096]).expect("write");
        assert!(processes_mapping(&file).await.is_empty());
        let f = std::fs::File::open(&file).expect("open");
        // SAFETY: a private read-only mapping of a file this test owns and does not change
        // while mapped; unmapped below.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                std::num::NonZeroUsize::new(4096).expect("size"),
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                &f,
                0,
            )
        }
        .expect("mmap");
        assert_eq!(processes_mapping(&file).await, [std::process::id()]);
        // SAFETY: the mapping made above, of that length, no longer used.
        unsafe { nix::sys::mman::munmap(addr, 4096) }.expect("munmap");
    }

    #[test]
    fn mountinfo_is_parsed_with_escapes_and_stacking() {
        assert_eq!(
            parse_mount_type(INFO, Path::new("/tmp/a b")).as_deref(),
            Some("tmpfs")
        );
        assert_eq!(
            parse_mount_type(INFO, Path::new("/tmp/t")).as_deref(),
            Some("ramfs"),
            "the topmost of stacked mounts"
        );
        assert_eq!(parse_mount_type(INFO, Path::new("/tmp")), None);
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        assert_eq!(unescape("\\04"), "\\04");
    }

    #[tokio::test]
    async fn system_host_reads_mounts_and_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SystemHost.mount_type(dir.path()).await.expect("info"), None);
        assert_eq!(
            SystemHost
                .mount_type(&dir.path().join("missing"))
                .await
                .expect("info"),
            None
        );
        assert!(SystemHost
            .mount_type(Path::new("/"))
            .await
            .expect("info")
            .is_some());
        assert!(matches!(
            SystemHost.qemu_version(&dir.path().join("no-qemu")).await,
            Err(TemplateError::QemuVersion { .. })
        ));
        // A stand-in "QEMU" that prints a version.
        let fake = dir.path().join("qemu");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'QEMU emulator version 9.9'\necho x\n",
        )
        .expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        assert_eq!(
            SystemHost.qemu_version(&fake).await.expect("version"),
            "QEMU emulator version 9.9"
        );
    }
}
