//! The processes the agent starts (Kata's `ExecProcess` family) and their standard streams.
//!
//! Each process runs in its own session with pipes for stdin, stdout and stderr, or with a
//! pseudo-terminal that is both stdin and stdout. The agent reads a stream only when the host
//! asks (`ReadStdout`), at most one chunk at a time: a process writing faster than the host
//! reads fills its pipe and blocks, and the agent holds no more than one chunk per stream.
//! A process is forgotten once it has been waited for and both its output streams reached
//! their end, so output written before exit is all delivered even after `WaitProcess`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::pty::{openpty, Winsize};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{setgid, setgroups, setsid, setuid, Gid, Pid, Uid};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Mutex as AsyncMutex};
use tracing::{debug, info};

use vmfactory_agent::workload::MAX_CHUNK;
use vmfactory_agent::{ExitStatus, ProcessSpec};

use super::reaper::Reaper;
use super::serial::FdStream;
use crate::error::{Error, Result};

/// How many processes the agent keeps at once.
pub const MAX_PROCESSES: usize = 1024;

/// `PATH` of a process whose environment names none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

mod ioctl {
    use nix::pty::Winsize;
    nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, Winsize);
    nix::ioctl_write_int_bad!(tiocsctty, libc::TIOCSCTTY);
}
use ioctl::{tiocsctty, tiocswinsz};

/// An output stream: open until it reads its end.
#[derive(Debug)]
enum Output {
    Open(FdStream),
    Ended,
}

#[derive(Debug)]
struct Proc {
    pid: Pid,
    stdin: AsyncMutex<Option<FdStream>>,
    stdout: AsyncMutex<Output>,
    stderr: AsyncMutex<Output>,
    /// The terminal's master, for resizes.
    tty: Option<OwnedFd>,
    exit: watch::Receiver<Option<ExitStatus>>,
    waited: AtomicBool,
    stdout_ended: AtomicBool,
    stderr_ended: AtomicBool,
    /// A container's init: kept until the container is removed, however it ended.
    keep: bool,
}

impl Proc {
    fn finished(&self) -> bool {
        !self.keep
            && self.waited.load(Ordering::Acquire)
            && self.stdout_ended.load(Ordering::Acquire)
            && self.stderr_ended.load(Ordering::Acquire)
    }
}

/// A process's key: its container (empty for the VM's own root) and its exec id.
type Key = (String, String);

fn key(container_id: &str, exec_id: &str) -> Key {
    (container_id.to_owned(), exec_id.to_owned())
}

/// The processes of one agent, by container and exec id.
#[derive(Debug, Default)]
pub struct Processes {
    procs: Mutex<HashMap<Key, Arc<Proc>>>,
}

/// The fds a started process leaves to the agent.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) pid: Pid,
    pub(super) stdin: OwnedFd,
    pub(super) stdout: OwnedFd,
    pub(super) stderr: Option<OwnedFd>,
    pub(super) tty: Option<OwnedFd>,
}

impl Processes {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, cid: &str, exec_id: &str) -> Result<Arc<Proc>> {
        self.lock()
            .get(&key(cid, exec_id))
            .cloned()
            .ok_or_else(|| Error::NoProcess(exec_id.to_owned()))
    }

    /// Forgets `exec_id` once it is waited for and drained.
    fn forget_if_finished(&self, cid: &str, exec_id: &str, p: &Proc) {
        if p.finished() {
            let mut procs = self.lock();
            let k = key(cid, exec_id);
            if procs.get(&k).is_some_and(|q| std::ptr::eq(q.as_ref(), p)) {
                procs.remove(&k);
                debug!(container_id = cid, exec_id, "process forgotten");
            }
        }
    }

    /// Forgets every process of container `cid`.
    pub(super) fn forget_container(&self, cid: &str) {
        self.lock().retain(|(c, _), _| c != cid);
    }

    /// The pid of a process, while it runs.
    pub(super) fn pid(&self, cid: &str, exec_id: &str) -> Result<Option<Pid>> {
        let p = self.get(cid, exec_id)?;
        let running = p.exit.borrow().is_none();
        Ok(running.then_some(p.pid))
    }

    /// Number of processes kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no process is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts `spec` as `exec_id` in `root` (the VM's own processes).
    pub async fn exec(
        &self,
        exec_id: &str,
        spec: ProcessSpec,
        root: &std::path::Path,
    ) -> Result<()> {
        let root = root.to_owned();
        let terminal = spec.terminal;
        self.add(
            "",
            exec_id,
            &spec.args.clone(),
            terminal,
            false,
            move |tx| start(&spec, &root, tx),
        )
        .await
    }

    /// Checks that `exec_id` of `cid` is free and `args` name a program, runs `start` off the
    /// async workers and keeps what it started under that key (`keep`: until the container
    /// is removed).
    pub(super) async fn add(
        &self,
        cid: &str,
        exec_id: &str,
        args: &[String],
        terminal: bool,
        keep: bool,
        start: impl FnOnce(watch::Sender<Option<ExitStatus>>) -> Result<Started> + Send + 'static,
    ) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::Invalid("empty exec_id".into()));
        }
        if args.first().map_or(true, |a| a.is_empty()) {
            return Err(Error::Invalid("no program to run".into()));
        }
        {
            let procs = self.lock();
            if procs.contains_key(&key(cid, exec_id)) {
                return Err(Error::ProcessExists(exec_id.to_owned()));
            }
            if procs.len() >= MAX_PROCESSES {
                return Err(Error::TooManyProcesses(procs.len()));
            }
        }
        let (tx, rx) = watch::channel(None);
        let started = tokio::task::spawn_blocking(move || start(tx))
            .await
            .map_err(|e| Error::io("run", "spawn task", std::io::Error::other(e)))??;
        let stream = |fd: OwnedFd, what: &'static str| {
            FdStream::new(fd).map_err(|e| Error::io("watch", what, e))
        };
        let stdout = Output::Open(stream(started.stdout, "stdout")?);
        let stderr = match started.stderr {
            Some(fd) => Output::Open(stream(fd, "stderr")?),
            None => Output::Ended,
        };
        let proc = Arc::new(Proc {
            pid: started.pid,
            stdin: AsyncMutex::new(Some(stream(started.stdin, "stdin")?)),
            stdout: AsyncMutex::new(stdout),
            stderr: AsyncMutex::new(stderr),
            tty: started.tty,
            exit: rx,
            waited: AtomicBool::new(false),
            stdout_ended: AtomicBool::new(false),
            // A terminal's one output stream is read as stdout.
            stderr_ended: AtomicBool::new(terminal),
            keep,
        });
        let mut procs = self.lock();
        if procs.contains_key(&key(cid, exec_id)) {
            // Two ExecProcess of one id raced: this one lost and its process is killed.
            let _ = kill(started.pid, Signal::SIGKILL);
            return Err(Error::ProcessExists(exec_id.to_owned()));
        }
        procs.insert(key(cid, exec_id), proc);
        info!(
            container_id = cid,
            exec_id,
            pid = started.pid.as_raw(),
            ?args,
            terminal,
            "process started"
        );
        Ok(())
    }

    /// Waits until `exec_id` ends and returns how.
    pub async fn wait(&self, cid: &str, exec_id: &str) -> Result<ExitStatus> {
        let p = self.get(cid, exec_id)?;
        let mut rx = p.exit.clone();
        let status = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|s| *s)
            .ok_or_else(|| Error::io("wait for", exec_id, std::io::Error::other("reaper gone")))?;
        p.waited.store(true, Ordering::Release);
        self.forget_if_finished(cid, exec_id, &p);
        Ok(status)
    }

    /// Sends `signal` to `exec_id`; a process that already ended is left alone.
    pub fn signal(&self, cid: &str, exec_id: &str, signal: u32) -> Result<()> {
        let p = self.get(cid, exec_id)?;
        let sig = parse_signal(signal)?;
        if p.exit.borrow().is_some() {
            return Ok(());
        }
        match kill(p.pid, sig) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::sys("signal", exec_id, e)),
        }
    }

    /// Writes all of `data` to the process's stdin.
    pub async fn write_stdin(&self, cid: &str, exec_id: &str, data: &[u8]) -> Result<usize> {
        let p = self.get(cid, exec_id)?;
        let mut stdin = p.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| Error::NotPossible {
            exec_id: exec_id.to_owned(),
            what: "stdin is closed",
        })?;
        pipe.write_all(data)
            .await
            .map_err(|e| Error::io("write stdin of", exec_id, e))?;
        Ok(data.len())
    }

    /// Closes the process's stdin (on a terminal: sends end-of-file, as a user's Ctrl-D).
    pub async fn close_stdin(&self, cid: &str, exec_id: &str) -> Result<()> {
        let p = self.get(cid, exec_id)?;
        let mut stdin = p.stdin.lock().await;
        if p.tty.is_some() {
            if let Some(t) = stdin.as_mut() {
                t.write_all(&[4])
                    .await
                    .map_err(|e| Error::io("write EOF to", exec_id, e))?;
            }
        }
        *stdin = None;
        Ok(())
    }

    /// Reads up to `len` bytes of stdout (or stderr); empty at the end of the stream.
    pub async fn read(&self, cid: &str, exec_id: &str, stderr: bool, len: u32) -> Result<Vec<u8>> {
        let p = self.get(cid, exec_id)?;
        let (stream, ended) = if stderr {
            (&p.stderr, &p.stderr_ended)
        } else {
            (&p.stdout, &p.stdout_ended)
        };
        let mut out = stream.lock().await;
        let Output::Open(s) = &mut *out else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0; len.clamp(1, MAX_CHUNK) as usize];
        let n = s
            .read(&mut buf)
            .await
            .map_err(|e| Error::io("read output of", exec_id, e))?;
        buf.truncate(n);
        if n == 0 {
            *out = Output::Ended;
            drop(out);
            ended.store(true, Ordering::Release);
            self.forget_if_finished(cid, exec_id, &p);
        }
        Ok(buf)
    }

    /// Sets the terminal size of a process started with a terminal.
    pub fn resize(&self, cid: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let p = self.get(cid, exec_id)?;
        let tty = p.tty.as_ref().ok_or_else(|| Error::NotPossible {
            exec_id: exec_id.to_owned(),
            what: "no terminal",
        })?;
        let ws = winsize(rows, cols);
        // SAFETY: the master fd is open for the call and TIOCSWINSZ reads one winsize from a
        // valid pointer.
        unsafe { tiocswinsz(std::os::fd::AsRawFd::as_raw_fd(tty), &ws) }
            .map_err(|e| Error::sys("resize the terminal of", exec_id, e))?;
        Ok(())
    }
}

/// A signal number as the wire carries it.
pub(super) fn parse_signal(signal: u32) -> Result<Signal> {
    i32::try_from(signal)
        .ok()
        .and_then(|s| Signal::try_from(s).ok())
        .ok_or_else(|| Error::Invalid(format!("unknown signal {signal}")))
}

pub(super) fn winsize(rows: u32, cols: u32) -> Winsize {
    Winsize {
        ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
        ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Forks and execs `spec` (blocking).
fn start(
    spec: &ProcessSpec,
    root: &std::path::Path,
    exit: watch::Sender<Option<ExitStatus>>,
) -> Result<Started> {
    let program = spec.args[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&spec.args[1..]).env_clear();
    let mut has_path = false;
    for kv in &spec.env {
        let (k, v) = kv
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Error::Invalid(format!("environment entry {kv:?} is not KEY=VALUE")))?;
        has_path |= k == "PATH";
        cmd.env(k, v);
    }
    if !has_path {
        cmd.env("PATH", DEFAULT_PATH);
    }
    let cwd = if spec.cwd.is_empty() { "/" } else { &spec.cwd };
    cmd.current_dir(root.join(cwd.trim_start_matches('/')));

    let ids = Ids::of(spec);
    let mut tty = None;
    if spec.terminal {
        let size = spec.console_size.map(|(r, c)| winsize(r, c));
        let pty = openpty(size.as_ref(), None).map_err(|e| Error::sys("open", "a pty", e))?;
        let slave = |what| {
            pty.slave
                .try_clone()
                .map_err(|e| Error::io("duplicate", what, e))
        };
        cmd.stdin(Stdio::from(slave("pty")?))
            .stdout(Stdio::from(slave("pty")?))
            .stderr(Stdio::from(pty.slave));
        tty = Some(pty.master);
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
    }
    let terminal = spec.terminal;
    // SAFETY: the closure only makes async-signal-safe system calls (setsid, ioctl, setgroups,
    // setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            setsid()?;
            if terminal {
                tiocsctty(0, 0)?;
            }
            ids.apply()?;
            Ok(())
        });
    }
    let mut child = Reaper::global()
        .spawn(&mut cmd, exit)
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    drop(cmd);
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (stdin, stdout, stderr) = match &tty {
        Some(master) => {
            let dup = |what| {
                master
                    .try_clone()
                    .map_err(|e| Error::io("duplicate", what, e))
            };
            (dup("pty")?, dup("pty")?, None)
        }
        None => {
            let missing = || Error::io("take", "pipes", std::io::Error::other("missing"));
            let stdin = child.stdin.take().ok_or_else(missing)?;
            let stdout = child.stdout.take().ok_or_else(missing)?;
            let stderr = child.stderr.take().ok_or_else(missing)?;
            (stdin.into(), stdout.into(), Some(stderr.into()))
        }
    };
    Ok(Started {
        pid,
        stdin,
        stdout,
        stderr,
        tty,
    })
}

/// The identity a process takes before exec.
#[derive(Debug, Clone)]
struct Ids {
    uid: Uid,
    gid: Gid,
    groups: Vec<Gid>,
    change: bool,
}

impl Ids {
    fn of(spec: &ProcessSpec) -> Self {
        let uid = Uid::from_raw(spec.uid);
        let gid = Gid::from_raw(spec.gid);
        // Unprivileged (tests on a host), only a request for another identity is applied.
        let change = Uid::effective().is_root()
            || uid != Uid::effective()
            || gid != Gid::effective()
            || !spec.additional_gids.is_empty();
        Ids {
            uid,
            gid,
            groups: spec
                .additional_gids
                .iter()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            change,
        }
    }

    fn apply(&self) -> std::io::Result<()> {
        if self.change {
            setgroups(&self.groups)?;
            setgid(self.gid)?;
            setuid(self.uid)?;
        }
        Ok(())
    }
}
