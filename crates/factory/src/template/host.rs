//! [`TemplateHost`]: what a template needs from the host besides a VM — mount points, tmpfs
//! mounts and the QEMU version — behind a narrow trait, so unit tests fake it and run without
//! root. [`SystemHost`] is the real one.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use tracing::debug;

use super::error::TemplateError;

/// Where the kernel lists this process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Bound on `qemu-system-x86_64 --version`.
const QEMU_VERSION_TIMEOUT: Duration = Duration::from_secs(10);

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
        let err = |source| TemplateError::QemuVersion {
            qemu: qemu.to_owned(),
            source,
        };
        let child = tokio::process::Command::new(qemu)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(err)?;
        let out = tokio::time::timeout(QEMU_VERSION_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
            .map_err(err)?;
        if !out.status.success() {
            return Err(err(std::io::Error::other(format!(
                "exited with {}",
                out.status
            ))));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned())
    }
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
