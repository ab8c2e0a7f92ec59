//! Child processes (QEMU, the vsock backend): spawned here (each writing its own record
//! before it execs, see `record.rs`) and reaped through tokio, or re-attached by pid from
//! another process and watched through `/proc`.
//!
//! A re-attached process is identified by pid *and* start time (`/proc/PID/stat` field 22), so a
//! reused pid is never signalled.
//!
//! Every [`Proc`] has a monitor task that reports its exit, with the tail of its stderr, on a
//! [`ProcExit`] watch the moment it happens: a spawned child is awaited through tokio (SIGCHLD);
//! a re-attached process, not our child, through a pidfd (readable once every thread has
//! exited), or where pidfds are missing by polling `/proc/PID/stat` with [`wait_until`].

impl ProcessRecord {
    /// Whether the recorded process still runs (same pid, same start time, not exited).
    pub async fn alive(&self) -> bool {
        is_same(self.pid, self.start_time).await
    }

    /// SIGKILLs the recorded process of VM `id` if it still runs, checked by pid and start
    /// time, and waits until every thread of it has exited; returns whether it was running.
    pub async fn kill(&self, id: &str) -> Result<bool> {
        kill_recorded(id, self.kind.label(), self.pid, self.start_time).await
    }

    /// Records the live process `pid` as `kind` in `run_dir`, as a spawned process records
    /// itself (for tools and tests standing in for one). [`Error::ProcessGone`] if it is not
    /// running.
    pub async fn save(kind: ProcessKind, pid: u32, run_dir: &Path) -> Result<Self> {
        let gone = || Error::ProcessGone {
            id: run_dir.display().to_string(),
            pid,
        };
        let start_time = process_start_time(pid).await.ok_or_else(gone)?;
        let mut buf = [0; 64];
        let text = format_record(&mut buf, pid, start_time);
        let path = run_dir.join(kind.file_name());
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| Error::io("Writing", &path, e))?;
        Ok(Self {
            kind,
            pid,
            start_time,
        })
    }
}

#[cfg(test)]
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::error::{Error, Result};
use crate::exit::{Ended, ProcExit};
use crate::files::read_tail;
use crate::record::{format_record, parse_stat, ProcessKind, ProcessRecord, RecordTarget};
use crate::wait::wait_until;

/// How long a process gets after SIGKILL before it is declared unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Bytes of a process's stderr kept with its exit (the last lines QEMU wrote).
const STDERR_TAIL: usize = 600;

/// How long one `/proc` polling round lasts where pidfds are missing (it then starts again).
const POLL_ROUND: Duration = Duration::from_secs(3600);

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

/// A process this crate manages. Dropping it releases the process (it keeps running, and
/// tokio reaps a spawned child in the background) and stops watching it.
#[derive(Debug)]
pub(crate) struct Proc {
    /// `QEMU` or `vsock backend`, for messages.
    pub(crate) what: &'static str,
    pub(crate) pid: u32,
    pub(crate) start_time: u64,
    /// Re-attached by pid, not spawned here.
    attached: bool,
    exit: ProcExit,
    /// Awaits the exit and reports it on `exit`; it owns the `Child` of a spawned process.
    monitor: JoinHandle<()>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.monitor.abort();
    }
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
        Self::spawn_with_fds(what, binary, args, stderr_path, record, &[], true).await
    }

    /// [`Proc::spawn`], and the child inherits each of `inherit` under the same number (every
    /// other descriptor of ours stays close-on-exec). The caller keeps ownership of `inherit`
    /// and may close them once this returns. Without `thp` the child runs with transparent
    /// huge pages disabled (`PR_SET_THP_DISABLE`, kept across exec); with it, the host decides.
    pub(crate) async fn spawn_with_fds(
        what: &'static str,
        binary: &Path,
        args: &[std::ffi::OsString],
        stderr_path: &Path,
        record: RecordTarget,
        inherit: &[BorrowedFd<'_>],
        thp: bool,
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
        let inherit: Vec<RawFd> = inherit.iter().map(AsRawFd::as_raw_fd).collect();
        // SAFETY: the closure runs in the forked child before exec and only calls umask(2),
        // prctl(2), fcntl(2) and what `write_own` calls (open, read, write, close, rename,
        // getpid), all async-signal-safe, allocating nothing (its paths and `inherit` were
        // made before the fork). Each of `inherit` is open in the parent for the whole spawn
        // (the caller borrows it), hence in the child; clearing its close-on-exec flag in the
        // child alone leaves the parent's descriptor and other children untouched.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
                if !thp {
                    // Only memory is at stake: a kernel without the flag runs QEMU as before.
                    let _ = nix::sys::prctl::set_thp_disable(true);
                }
                for &fd in &inherit {
                    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
                }
                record.write_own()
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        let start_time = match proc_stat(pid).await {
            ProcStat::Alive(t) => t,
            ProcStat::Dead => 0,
        };
        debug!(what, pid, "spawned");
        let (tx, exit) = ProcExit::channel(what);
        let stderr_path = stderr_path.to_owned();
        let monitor = tokio::spawn(async move {
            let status = child.wait().await.ok();
            report(&tx, what, pid, status, &stderr_path).await;
        });
        Ok(Self {
            what,
            pid,
            start_time,
            attached: false,
            exit,
            monitor,
        })
    }

    /// Re-attaches to `pid` if it is alive and started at `start_time`; `stderr_path` is
    /// where it writes its stderr (quoted when it exits).
    pub(crate) async fn attach(
        what: &'static str,
        pid: u32,
        start_time: u64,
        stderr_path: &Path,
    ) -> Option<Self> {
        if !is_same(pid, start_time).await {
            return None;
        }
        let (tx, exit) = ProcExit::channel(what);
        let stderr_path = stderr_path.to_owned();
        let monitor = tokio::spawn(async move {
            gone(pid, start_time).await;
            report(&tx, what, pid, None, &stderr_path).await;
        });
        Some(Self {
            what,
            pid,
            start_time,
            attached: true,
            exit,
            monitor,
        })
    }

    /// Whether this was re-attached (not spawned here, so not reaped here).
    pub(crate) fn is_attached(&self) -> bool {
        self.attached
    }

    /// The watch of this process's exit.
    pub(crate) fn exit(&self) -> &ProcExit {
        &self.exit
    }

    /// Waits up to `timeout` for the process to exit; true if it did.
    pub(crate) async fn wait_exit(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.exit.ended())
            .await
            .is_ok()
    }

    /// Sends `signal` unless the process is already gone.
    pub(crate) async fn signal(&mut self, id: &str, signal: Signal) -> Result<()> {
        if self.exit.now().is_some() {
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

/// Reports on `tx` that the process ended with `status`, quoting the tail of its stderr.
async fn report(
    tx: &watch::Sender<Option<Arc<Ended>>>,
    what: &'static str,
    pid: u32,
    status: Option<ExitStatus>,
    stderr_path: &Path,
) {
    let stderr_tail = tail(stderr_path, STDERR_TAIL).await;
    debug!(what, pid, ?status, stderr = %stderr_tail, "exited");
    tx.send_replace(Some(Arc::new(Ended {
        status,
        stderr_tail,
    })));
}

/// Whether `pid` is alive and started at `start_time` (not a reused pid).
pub(crate) async fn is_same(pid: u32, start_time: u64) -> bool {
    matches!(proc_stat(pid).await, ProcStat::Alive(t) if t == start_time)
}

/// Resolves once `pid` (started at `start_time`, and not our child) has exited.
async fn gone(pid: u32, start_time: u64) {
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => Some(fd),
        Err(Errno::ESRCH) => return,
        Err(e) => {
            debug!(pid, error = %e, "no pidfd, polling /proc");
            None
        }
    };
    if let Some(fd) = pidfd {
        // The pidfd pins the pid: checked again, it cannot be reused under us any more.
        if !is_same(pid, start_time).await {
            return;
        }
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until dropped: the
        // descriptor stays open and `as_raw_fd` returns it unchanged all that time.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => {
                // A pidfd turns readable once the whole process has exited.
                let _ = fd.readable().await;
                return;
            }
            Err(e) => debug!(pid, error = %e, "cannot poll a pidfd, polling /proc"),
        }
    }
    let exited = move || async move { (!is_same(pid, start_time).await).then_some(()) };
    while wait_until(POLL_ROUND, exited).await.is_none() {}
}

/// `pidfd_open(2)`: a descriptor that turns readable when `pid` exits (close-on-exec).
fn pidfd_open(pid: u32) -> nix::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| Errno::ESRCH)?;
    // SAFETY: pidfd_open takes a pid and flags by value and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// SIGKILLs `pid` if it is alive and started at `start_time` (so a reused pid is never
/// signalled), and waits until every thread of it has exited. Returns whether it was running.
pub(crate) async fn kill_recorded(
    id: &str,
    what: &'static str,
    pid: u32,
    start_time: u64,
) -> Result<bool> {
    // Killing only: no stderr to quote when it exits.
    let Some(mut proc) = Proc::attach(what, pid, start_time, Path::new("")).await else {
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

/// The last whole lines within the last `max` bytes of a file, joined with ` | `, for error
/// messages (empty if unreadable, a symlink or not a regular file). Only the end is read.
pub(crate) async fn tail(path: &Path, max: usize) -> String {
    let path = path.to_owned();
    let max = u64::try_from(max).unwrap_or(u64::MAX);
    let Some((cut, bytes)) = tokio::task::spawn_blocking(move || read_tail(&path, max))
        .await
        .ok()
        .and_then(|read| read.ok())
    else {
        return String::new();
    };
    let mut text = bytes.as_slice();
    // Cut inside a line: drop that partial line (unless it is the only one).
    if cut {
        if let Some(nl) = text.iter().position(|&b| b == b'\n') {
            text = &text[nl + 1..];
        }
    }
    String::from_utf8_lossy(text).trim().replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ProcessKind, ProcessRecord};

    fn target(dir: &Path) -> RecordTarget {
        RecordTarget::new(dir, ProcessKind::Qemu).expect("record target")
    }

    /// `sleep 60`, recorded in `dir`, its stderr in `dir/stderr`.
    async fn spawn_sleep(dir: &Path) -> Proc {
        Proc::spawn(
            "sleep",
            Path::new("sleep"),
            &["60".into()],
            &dir.join("stderr"),
            target(dir),
        )
        .await
        .expect("spawn sleep")
    }

    #[tokio::test]
    async fn a_spawned_process_has_recorded_itself_when_spawn_returns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = spawn_sleep(dir.path()).await;
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
        let stderr = Path::new("/nonexistent");
        assert!(Proc::attach("self", me, start, stderr).await.is_some());
        assert!(Proc::attach("self", me, start + 1, stderr).await.is_none());
    }

    #[tokio::test]
    async fn tail_keeps_the_last_whole_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stderr");
        std::fs::write(&path, "first line\nsecond line\nthird\n").expect("write");
        assert_eq!(tail(&path, 100).await, "first line | second line | third");
        // 15 bytes reach into "second line": that partial line is dropped.
        assert_eq!(tail(&path, 15).await, "third");
        std::fs::write(&path, "one long line without an end").expect("write");
        assert_eq!(tail(&path, 8).await, "t an end");
        assert_eq!(tail(&dir.path().join("missing"), 8).await, "");
    }

    #[tokio::test]
    async fn terminate_kills_and_reaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = spawn_sleep(dir.path()).await;
        assert!(p.exit().now().is_none());
        p.terminate("t", Duration::from_millis(50))
            .await
            .expect("terminate");
        assert!(p.exit().now().is_some());
        assert_eq!(proc_stat(p.pid).await, ProcStat::Dead);
    }

    #[tokio::test]
    async fn kill_recorded_checks_pid_and_start_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = spawn_sleep(dir.path()).await;
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
        let stderr = dir.path().join("stderr");
        let mut attached = Proc::attach("sleep", spawned.pid, spawned.start_time, &stderr)
            .await
            .expect("attach");
        assert!(attached.is_attached());
        // Our `spawned` handle is dropped: tokio reaps it once it dies.
        drop(spawned);
        attached.signal("t", Signal::SIGKILL).await.expect("kill");
        assert!(attached.wait_exit(Duration::from_secs(5)).await);
    }

    /// Runs `sh -c script` through `spawn_with_fds` and returns how it exited.
    async fn run_sh(script: &str, fds: &[BorrowedFd<'_>], thp: bool) -> ExitStatus {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Proc::spawn_with_fds(
            "sh",
            Path::new("sh"),
            &["-c".into(), script.into()],
            &dir.path().join("stderr"),
            target(dir.path()),
            fds,
            thp,
        )
        .await
        .expect("spawn sh");
        assert!(child.wait_exit(Duration::from_secs(10)).await, "sh exits");
        child.exit().now().and_then(|e| e.status).expect("status")
    }

    #[tokio::test]
    async fn spawn_with_fds_passes_those_descriptors_only() {
        let passed = std::fs::File::open("/dev/null").expect("open");
        let also = std::fs::File::open("/dev/null").expect("open");
        let kept = std::fs::File::open("/dev/null").expect("open");
        let (p, a, k) = (passed.as_raw_fd(), also.as_raw_fd(), kept.as_raw_fd());
        // Exit 0 only when the child has the passed descriptors and not the other one.
        let script = format!(
            "test -e /proc/self/fd/{p} && test -e /proc/self/fd/{a} && ! test -e /proc/self/fd/{k}"
        );
        let status = run_sh(&script, &[passed.as_fd(), also.as_fd()], true).await;
        assert!(
            status.success(),
            "descriptors seen by the child: {status:?}"
        );
        // Ours stay close-on-exec.
        for fd in [p, a] {
            let flags = fcntl(fd, FcntlArg::F_GETFD).expect("flags");
            assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
        }
    }

    #[tokio::test]
    async fn spawn_without_thp_disables_it_in_the_child() {
        let status = |line: &str| line.starts_with("THP_enabled:");
        let ours = std::fs::read_to_string("/proc/self/status").expect("status");
        let Some(ours) = ours.lines().find(|l| status(l)) else {
            return; // a kernel before 5.0 does not show the flag
        };
        for (thp, want) in [
            (false, "THP_enabled:\t0".to_owned()),
            (true, ours.to_owned()),
        ] {
            let exit = run_sh(&format!("grep -qx '{want}' /proc/self/status"), &[], thp).await;
            assert!(
                exit.success(),
                "thp {thp}: the child's status lacks {want:?}"
            );
        }
    }
}
