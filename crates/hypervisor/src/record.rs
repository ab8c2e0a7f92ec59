//! Process records: every process this crate spawns (QEMU, `vhost-device-vsock`) writes its own
//! pid and start time into the run directory, between fork and exec.
//!
//! A VM's owner can be killed at any instant, and what it started must then be provably its
//! own, never guessed from command lines. A record written by the owner after the spawn leaves
//! a window in which the process runs unrecorded (measured: SIGKILLing a VM-cache server while
//! it refilled its pool left a clone's QEMU without a record, mapping the template's memory so
//! that unmounting it failed with EBUSY). Written by the child before it execs, the record
//! exists before the program does: no process of ours runs without one, whenever its owner
//! dies. [`ProcessRecord::read_all`] reads them back; [`ProcessRecord::kill`] ends the process
//! after checking pid and start time, so a reused pid is never signalled.

use std::io::{Cursor, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, renameat, OFlag};
use nix::sys::stat::Mode;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::error::{Error, Result};

/// Version written at the start of every record (`v1 <pid> <start time>\n`).
const RECORD_VERSION: &str = "v1";

/// The largest record read back; a real one is under 40 bytes.
const MAX_RECORD: u64 = 128;

/// Which of a VM's processes a record is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessKind {
    /// QEMU (`qemu.pid`).
    Qemu,
    /// `vhost-device-vsock`, hybrid vsock only (`vsock-backend.pid`).
    VsockBackend,
}

impl ProcessKind {
    /// Every kind, in the order a VM's processes are ended.
    pub const ALL: [Self; 2] = [Self::Qemu, Self::VsockBackend];

    /// The record's file name in the run directory.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu.pid",
            Self::VsockBackend => "vsock-backend.pid",
        }
    }

    /// The name used in messages (`QEMU`, `vsock backend`).
    pub fn label(self) -> &'static str {
        match self {
            Self::Qemu => "QEMU",
            Self::VsockBackend => "vsock backend",
        }
    }
}

/// A process of a VM as it recorded itself before exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcessRecord {
    /// Which process.
    pub kind: ProcessKind,
    /// Its pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22), which a reused pid does not share.
    pub start_time: u64,
}

impl ProcessRecord {
    /// The records in `run_dir`, in [`ProcessKind::ALL`] order (none for a VM that never ran
    /// a process). A record that is not a small regular file of this format (a symlink, a
    /// FIFO, garbage) is [`Error::BadRecord`]: nothing about that process can be proved.
    pub async fn read_all(run_dir: &Path) -> Result<Vec<Self>> {
        let mut records = Vec::new();
        for kind in ProcessKind::ALL {
            let path = run_dir.join(kind.file_name());
            if let Some((pid, start_time)) = read(&path).await? {
                records.push(Self {
                    kind,
                    pid,
                    start_time,
                });
            }
        }
        Ok(records)
    }
}

/// Removes the records (and any temporary one a failed spawn left) from `run_dir`, once the
/// processes they name are gone.
pub(crate) async fn remove_records(run_dir: &Path) {
    for kind in ProcessKind::ALL {
        for path in [run_dir.join(kind.file_name()), tmp_path(run_dir, kind)] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove"),
            }
        }
    }
}

/// The temporary name a record is written under before it is renamed into place.
fn tmp_path(run_dir: &Path, kind: ProcessKind) -> PathBuf {
    run_dir.join(format!(".{}.tmp", kind.file_name()))
}

/// Reads one record: `None` if there is none.
async fn read(path: &Path) -> Result<Option<(u32, u64)>> {
    let bad = |reason| Error::BadRecord {
        path: path.to_owned(),
        reason,
    };
    // Never follow a link or block on a FIFO planted under the record's name.
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .await;
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(bad("a symlink")),
        Err(e) => return Err(Error::io("Reading", path, e)),
    };
    let meta = file
        .metadata()
        .await
        .map_err(|e| Error::io("Reading", path, e))?;
    if !meta.is_file() {
        return Err(bad("not a regular file"));
    }
    let mut text = String::new();
    file.take(MAX_RECORD)
        .read_to_string(&mut text)
        .await
        .map_err(|_| bad("not text"))?;
    parse_record(&text)
        .map(Some)
        .ok_or_else(|| bad("not a process record"))
}

/// `v1 <pid> <start time>\n` in `buf`.
pub(crate) fn format_record(buf: &mut [u8; 64], pid: u32, start_time: u64) -> &[u8] {
    let mut cursor = Cursor::new(&mut buf[..]);
    // 64 bytes hold the longest record (2 + 1 + 10 + 1 + 20 + 1).
    let _ = writeln!(cursor, "{RECORD_VERSION} {pid} {start_time}");
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    &buf[..len]
}

/// The pid and start time of a record.
fn parse_record(text: &str) -> Option<(u32, u64)> {
    let line = text.strip_suffix('\n')?;
    let mut fields = line.split(' ');
    if fields.next()? != RECORD_VERSION {
        return None;
    }
    let pid = fields.next()?.parse().ok()?;
    let start = fields.next()?.parse().ok()?;
    fields.next().is_none().then_some((pid, start))
}

/// Where a spawned process writes its record: the record's path and a temporary name beside
/// it, as C strings made before the fork (the child must not allocate).
#[derive(Debug)]
pub(crate) struct RecordTarget {
    path: std::ffi::CString,
    tmp: std::ffi::CString,
}

impl RecordTarget {
    /// The record of `kind` in `run_dir`.
    pub(crate) fn new(run_dir: &Path, kind: ProcessKind) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let path = run_dir.join(kind.file_name());
        let tmp = tmp_path(run_dir, kind);
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|e| Error::io("Recording to", p, std::io::Error::other(e)))
        };
        Ok(Self {
            path: c(&path)?,
            tmp: c(&tmp)?,
        })
    }

    /// Writes the calling process's own record. Runs in the forked child before exec: it
    /// allocates nothing and makes only async-signal-safe calls (open, read, write, close,
    /// rename). The temporary name and the rename make the record appear whole.
    pub(crate) fn write_own(&self) -> std::io::Result<()> {
        let mut stat = [0u8; 1024];
        let fd = own(open(
            c"/proc/self/stat",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?);
        let n = nix::unistd::read(fd.as_raw_fd(), &mut stat)?;
        drop(fd);
        let (_, start_time) = std::str::from_utf8(&stat[..n])
            .ok()
            .and_then(parse_stat)
            .ok_or(std::io::ErrorKind::InvalidData)?;
        let pid = nix::unistd::getpid().as_raw().unsigned_abs();
        let mut buf = [0; 64];
        let text = format_record(&mut buf, pid, start_time);
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_CLOEXEC;
        let fd = own(open(
            self.tmp.as_c_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )?);
        let mut written = 0;
        while written < text.len() {
            written += nix::unistd::write(&fd, &text[written..])?;
        }
        drop(fd);
        renameat(None, self.tmp.as_c_str(), None, self.path.as_c_str())?;
        Ok(())
    }
}

/// Takes ownership of a descriptor `open` just returned.
fn own(fd: std::os::fd::RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(2) and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Parses `/proc/PID/stat`: the state (field 3) and start time (field 22).
pub(crate) fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // `comm` (field 2) is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let mut buf = [0; 64];
        let text = format_record(&mut buf, u32::MAX, u64::MAX).to_vec();
        let text = String::from_utf8(text).expect("text");
        assert_eq!(text, format!("v1 {} {}\n", u32::MAX, u64::MAX));
        assert_eq!(parse_record(&text), Some((u32::MAX, u64::MAX)));
        for bad in [
            "",
            "v1 1 2",
            "v2 1 2\n",
            "v1 1\n",
            "v1 1 2 3\n",
            "v1 -1 2\n",
            "v1  1 2\n",
            "1 2\n",
        ] {
            assert_eq!(parse_record(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn bad_records_are_typed_errors_and_missing_ones_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(ProcessRecord::read_all(dir.path())
            .await
            .expect("none")
            .is_empty());
        let qemu = dir.path().join(ProcessKind::Qemu.file_name());
        for (what, make) in [
            (
                "garbage",
                Box::new(|p: &Path| std::fs::write(p, b"pid 12\n").expect("write"))
                    as Box<dyn Fn(&Path)>,
            ),
            (
                "symlink",
                Box::new(|p: &Path| std::os::unix::fs::symlink("/etc/hostname", p).expect("ln")),
            ),
            (
                "fifo",
                Box::new(|p: &Path| nix::unistd::mkfifo(p, Mode::S_IRWXU).expect("mkfifo")),
            ),
            (
                "huge",
                Box::new(|p: &Path| std::fs::write(p, vec![b'1'; 4096]).expect("write")),
            ),
        ] {
            make(&qemu);
            let err = ProcessRecord::read_all(dir.path()).await.expect_err(what);
            assert!(matches!(err, Error::BadRecord { .. }), "{what}: {err:?}");
            std::fs::remove_file(&qemu).expect("rm");
        }
    }

    #[tokio::test]
    async fn a_saved_record_names_the_process_until_it_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep");
        let saved = ProcessRecord::save(ProcessKind::VsockBackend, child.id(), dir.path())
            .await
            .expect("save");
        let read = ProcessRecord::read_all(dir.path()).await.expect("read");
        assert_eq!(read, [saved]);
        assert!(saved.alive().await);
        assert!(saved.kill("t").await.expect("kill"));
        child.wait().expect("reap");
        assert!(!saved.alive().await);
        assert!(!saved.kill("t").await.expect("gone"));
    }
}
