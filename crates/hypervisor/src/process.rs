//! Child processes (QEMU, the vsock backend): spawned here (each writing its own record
//! before it execs, see `record.rs`) and reaped through tokio, or re-attached by pid from
//! another process and watched through `/proc`.
//!
//! A re-attached process is identified by pid *and* start time (`/proc/PID/stat` field 22), so a
//! reused pid is never signalled. Without a `Child` to wait on, exit is detected by polling
//! `/proc/PID/stat` (gone, or a zombie waiting for its real parent) with [`wait_until`].

#[cfg(test)]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::record::RecordTarget;
use crate::wait::wait_until;

/// How long a process gets after SIGKILL before it is declared unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The start time of the live process `pid` (`/proc/PID/stat` field 22), the value a record
/// pins a pid with; `None` if it is not running.
pub(crate) async fn process_start_time(pid: u32) -> Option<u64> {
    match proc_stat(pid).await {
        ProcStat::Alive(start) => Some(start),
        ProcStat::Dead => None,
    }
}

/// Liveness of a pid as seen in `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcStat {
    /// Running (or sleeping), with this start time.
    Alive(u64),
    /// Exited (gone, or a zombie).
    Dead,
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

/// Whether a `/proc` state letter means exited (zombie or dead).
fn exited(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

/// Reads the liveness of `pid`.
///
/// A multi-threaded process is dead only once every thread is: its leader turns zombie as
/// soon as it exits, while the other threads may still be exiting and holding the process's
/// memory and files (measured: a SIGKILLed QEMU's leader was a zombie while the process
/// still mapped the template's memory file, so unmounting the template failed with EBUSY).
pub(crate) async fn proc_stat(pid: u32) -> ProcStat {
    let Ok(stat) = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await else {
        return ProcStat::Dead;
    };
    match parse_stat(&stat) {
        None => ProcStat::Dead,
        Some((state, start)) if exited(state) => {
            if threads_exited(pid).await {
                ProcStat::Dead
            } else {
                ProcStat::Alive(start)
            }
        }
        Some((_, start)) => ProcStat::Alive(start),
    }
}

/// Whether every thread of `pid` has exited (or the process is gone).
async fn threads_exited(pid: u32) -> bool {
    let Ok(mut tasks) = tokio::fs::read_dir(format!("/proc/{pid}/task")).await else {
        return true;
    };
    while let Ok(Some(task)) = tasks.next_entry().await {
        let Ok(stat) = tokio::fs::read_to_string(task.path().join("stat")).await else {
            continue;
        };
        if parse_stat(&stat).is_some_and(|(state, _)| !exited(state)) {
            return false;
        }
    }
    true
}

/// A process this crate manages.
#[derive(Debug)]
pub(crate) struct Proc {
    /// `QEMU` or `vsock backend`, for messages.
    pub(crate) what: &'static str,
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    /// Present when this process spawned it; `None` when re-attached.
    child: Option<Child>,
}

impl Proc {
    /// Spawns `binary args…` with stdin/stdout on /dev/null and stderr into `stderr_path`; the
    /// child writes its own `record` before it execs (see `record.rs`), and the spawn fails
    /// if it cannot.
    pub(crate) async fn spawn(
        what: &'static str,
        binary: &Path,
        args: &[std::ffi::OsString],
        stderr_path: &Path,
        record: RecordTarget,
    ) -> Result<Self> {
        Self::spawn_with_fd(what, binary, args, stderr_path, record, None).await
    }

    /// [`Proc::spawn`], and the child inherits `inherit` under the same number (every other
    /// descriptor of ours stays close-on-exec). The caller keeps ownership of `inherit` and may
    /// close it once this returns.
    pub(crate) async fn spawn_with_fd(
        what: &'static str,
        binary: &Path,
        args: &[std::ffi::OsString],
        stderr_path: &Path,
        record: RecordTarget,
        inherit: Option<BorrowedFd<'_>>,
    ) -> Result<Self> {
        let stderr = tokio::fs::File::create(stderr_path)
            .await
            .map_err(|e| Error::io("Creating", stderr_path, e))?
            .into_std()
            .await;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // A VM outlives a dropped handle on purpose (it may be handed to another process);
            // `stop` is what ends it. tokio reaps dropped children in the background.
            .kill_on_drop(false);
        // Everything QEMU and the vsock backend create (QMP, console and agent sockets, logs,
        // the template's memory file) is for its owner only: umask 0177 gives 0600 sockets
        // and files (neither creates directories).
        let inherit = inherit.map(|fd| fd.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and only calls umask(2),
        // fcntl(2) and what `write_own` calls (open, read, write, close, rename, getpid), all
        // async-signal-safe, allocating nothing (its paths were made before the fork).
        // `inherit` is open in the parent for the whole spawn (the caller borrows it), hence in
        // the child; clearing its close-on-exec flag in the child alone leaves the parent's
        // descriptor and other children untouched.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                if let Some(fd) = inherit {
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                record.write_own()
            });
        }
        let child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let start_time = match proc_stat(pid).await {
            ProcStat::Alive(t) => t,
            ProcStat::Dead => 0,
        };
        debug!(what, pid, "spawned");
        Ok(Self {
            what,
            pid,
            start_time,
            child: Some(child),
        })
    }

    /// Re-attaches to `pid` if it is alive and started at `start_time`.
    pub(crate) async fn attach(what: &'static str, pid: u32, start_time: u64) -> Option<Self> {
        match proc_stat(pid).await {
            ProcStat::Alive(t) if t == start_time => Some(Self {
                what,
                pid,
                start_time,
                child: None,
            }),
            _ => None,
        }
    }

    /// Whether this was re-attached (no `Child` to reap).
    pub(crate) fn is_attached(&self) -> bool {
        self.child.is_none()
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub(crate) async fn try_exited(&mut self) -> Option<Option<ExitStatus>> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(Some(status)),
                Ok(None) => None,
                Err(_) => Some(None),
            },
            None => match proc_stat(self.pid).await {
                ProcStat::Alive(t) if t == self.start_time => None,
                _ => Some(None),
            },
        }
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> bool {
        match &mut self.child {
            Some(child) => tokio::time::timeout(timeout, child.wait()).await.is_ok(),
            None => {
                let (pid, start) = (self.pid, self.start_time);
                wait_until(timeout, || async move {
                    match proc_stat(pid).await {
                        ProcStat::Alive(t) if t == start => None,
                        _ => Some(()),
                    }
                })
                .await
                .is_some()
            }
        }
    }

    /// Sends `signal` unless the process is already gone.
    pub(crate) async fn signal(&mut self, id: &str, signal: Signal) -> Result<()> {
        if self.try_exited().await.is_some() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid).map_err(|_| Error::ProcessGone {
            id: id.to_owned(),
            pid: self.pid,
        })?;
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(Error::Signal {
                id: id.to_owned(),
                pid: self.pid,
                source,
            }),
        }
    }

    /// Waits `grace` for a voluntary exit, then SIGKILLs and waits again; the process is reaped
    /// when this process spawned it.
    pub(crate) async fn terminate(&mut self, id: &str, grace: Duration) -> Result<()> {
        if self.wait_exit(grace).await {
            return Ok(());
        }
        warn!(
            vm = id,
            what = self.what,
            pid = self.pid,
            "did not exit in time, sending SIGKILL"
        );
        self.signal(id, Signal::SIGKILL).await?;
        if self.wait_exit(KILL_WAIT).await {
            Ok(())
        } else {
            Err(Error::Unkillable {
                id: id.to_owned(),
                pid: self.pid,
            })
        }
    }
}

/// SIGKILLs `pid` if it is alive and started at `start_time` (so a reused pid is never
/// signalled), and waits until every thread of it has exited. Returns whether it was running.
pub(crate) async fn kill_recorded(
    id: &str,
    what: &'static str,
    pid: u32,
    start_time: u64,
) -> Result<bool> {
    let Some(mut proc) = Proc::attach(what, pid, start_time).await else {
        return Ok(false);
    };
    proc.signal(id, Signal::SIGKILL).await?;
    if proc.wait_exit(KILL_WAIT).await {
        debug!(vm = id, what, pid, "killed a recorded process");
        Ok(true)
    } else {
        Err(Error::Unkillable {
            id: id.to_owned(),
            pid,
        })
    }
}

/// The last `max` bytes of a file, for error messages (empty if unreadable).
pub(crate) async fn tail(path: &Path, max: usize) -> String {
    let bytes = tokio::fs::read(path).await.unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..])
        .trim()
        .replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ProcessKind, ProcessRecord};

    fn target(dir: &Path) -> RecordTarget {
        RecordTarget::new(dir, ProcessKind::Qemu).expect("record target")
    }

    #[tokio::test]
    async fn a_spawned_process_has_recorded_itself_when_spawn_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.path().join("stderr"),
            target(dir.path()),
        )
        .await
        .expect("spawn sleep");
        let records = ProcessRecord::read_all(dir.path()).await.expect("read");
        assert_eq!(
            records,
            [ProcessRecord {
                kind: ProcessKind::Qemu,
                pid: p.pid,
                start_time: p.start_time,
            }]
        );
        p.terminate("t", Duration::ZERO).await.expect("terminate");
        // No record, no process: the child fails before exec and nothing runs.
        let missing = dir.path().join("gone");
        let err = Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.path().join("stderr2"),
            target(&missing),
        )
        .await
        .expect_err("cannot record");
        assert!(matches!(err, Error::Spawn { .. }), "{err:?}");
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat =
            "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 \
                    1000 100";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[tokio::test]
    async fn a_zombie_leader_with_a_live_thread_is_not_dead() {
        // The main thread exits alone (exit(2), not exit_group) while another sleeps 2 s.
        let script = "import threading, time, ctypes\n\
                      threading.Thread(target=time.sleep, args=(2,)).start()\n\
                      ctypes.CDLL(None).syscall(60, 0)\n";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .spawn()
            .expect("python3 is on every machine this project runs on");
        let pid = child.id();
        let leader_exited = async {
            loop {
                let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await;
                if stat
                    .ok()
                    .and_then(|s| parse_stat(&s))
                    .is_some_and(|(st, _)| exited(st))
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), leader_exited)
            .await
            .expect("the leader exits");
        assert!(
            matches!(proc_stat(pid).await, ProcStat::Alive(_)),
            "a thread still runs"
        );
        let gone = wait_until(Duration::from_secs(10), || async {
            (proc_stat(pid).await == ProcStat::Dead).then_some(())
        });
        assert!(gone.await.is_some(), "dead once the thread ends");
        child.wait().expect("reap");
    }

    #[tokio::test]
    async fn own_process_is_alive_and_attachable() {
        let me = std::process::id();
        let ProcStat::Alive(start) = proc_stat(me).await else {
            panic!("this process must be alive");
        };
        assert!(Proc::attach("self", me, start).await.is_some());
        assert!(Proc::attach("self", me, start + 1).await.is_none());
    }

    #[tokio::test]
    async fn terminate_kills_and_reaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.path().join("stderr"),
            target(dir.path()),
        )
        .await
        .expect("spawn sleep");
        assert!(p.try_exited().await.is_none());
        p.terminate("t", Duration::from_millis(50))
            .await
            .expect("terminate");
        assert!(p.try_exited().await.is_some());
        assert_eq!(proc_stat(p.pid).await, ProcStat::Dead);
    }

    #[tokio::test]
    async fn kill_recorded_checks_pid_and_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.path().join("stderr"),
            target(dir.path()),
        )
        .await
        .expect("spawn sleep");
        // Another start time: a reused pid, left alone.
        let other = kill_recorded("t", "sleep", p.pid, p.start_time + 1).await;
        assert!(!other.expect("no error"));
        assert!(matches!(proc_stat(p.pid).await, ProcStat::Alive(_)));
        assert!(kill_recorded("t", "sleep", p.pid, p.start_time)
            .await
            .expect("killed"));
        assert_eq!(proc_stat(p.pid).await, ProcStat::Dead);
        assert!(!kill_recorded("t", "sleep", p.pid, p.start_time)
            .await
            .expect("gone already"));
    }

    #[tokio::test]
    async fn attached_process_is_watched_through_proc() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spawned = Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.path().join("stderr"),
            target(dir.path()),
        )
        .await
        .expect("spawn sleep");
        let mut attached = Proc::attach("sleep", spawned.pid, spawned.start_time)
            .await
            .expect("attach");
        assert!(attached.is_attached());
        // Our `spawned` handle is dropped: tokio reaps it once it dies.
        drop(spawned);
        attached.signal("t", Signal::SIGKILL).await.expect("kill");
        assert!(attached.wait_exit(Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn spawn_with_fd_passes_that_descriptor_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let passed = std::fs::File::open("/dev/null").expect("open");
        let kept = std::fs::File::open("/dev/null").expect("open");
        let (p, k) = (passed.as_raw_fd(), kept.as_raw_fd());
        // Exit 0 only when the child has the passed descriptor and not the other one.
        let script = format!("test -e /proc/self/fd/{p} && ! test -e /proc/self/fd/{k}");
        let mut child = Proc::spawn_with_fd(
            "sh",
            Path::new("sh"),
            &["-c".into(), script.into()],
            &dir.path().join("stderr"),
            target(dir.path()),
            Some(passed.as_fd()),
        )
        .await
        .expect("spawn sh");
        assert!(child.wait_exit(Duration::from_secs(10)).await, "sh exits");
        let status = child.try_exited().await.flatten().expect("status");
        assert!(
            status.success(),
            "descriptors seen by the child: {status:?}"
        );
        // Ours stays close-on-exec.
        let flags = fcntl(p, FcntlArg::F_GETFD).expect("flags");
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
    }
}
