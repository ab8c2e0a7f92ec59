//! Reaping children and handing their exit statuses to the processes the agent started.
//!
//! As PID 1 the agent inherits every orphan of the guest, so one thread waits for any child
//! (`waitpid(-1)`) and hands each status to whoever watches that pid; the rest are reaped and
//! forgotten. Outside PID 1 (tests on a host) waiting for any child would steal the statuses
//! of the test harness's own children, so each watched child gets its own waiting thread.
//!
//! Threads rather than a tokio SIGCHLD stream: the reaper outlives any one runtime (tests run
//! one per test) and a blocking `waitpid` needs no signal handler at all.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;
use tracing::{debug, warn};

use vmfactory_agent::ExitStatus;

/// Where a watched child's exit status goes.
pub type ExitSender = watch::Sender<Option<ExitStatus>>;

#[derive(Default)]
struct Inner {
    watched: HashMap<i32, ExitSender>,
    /// Children spawned so far: the PID 1 thread sleeps on it while there are none.
    spawned: u64,
}

/// The guest's one reaper.
pub struct Reaper {
    inner: Mutex<Inner>,
    children: Condvar,
    reap_all: bool,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("reap_all", &self.reap_all)
            .finish_non_exhaustive()
    }
}

impl Reaper {
    /// The process-wide reaper; the first call as PID 1 starts the thread that reaps all.
    pub fn global() -> &'static Reaper {
        static REAPER: OnceLock<Reaper> = OnceLock::new();
        REAPER.get_or_init(|| {
            let reap_all = std::process::id() == 1;
            if reap_all {
                if let Err(e) = std::thread::Builder::new()
                    .name("reaper".into())
                    .spawn(|| Reaper::global().reap_forever())
                {
                    warn!(error = %e, "cannot start the reaper thread");
                }
            }
            Reaper {
                inner: Mutex::new(Inner::default()),
                children: Condvar::new(),
                reap_all,
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns `cmd` and watches the child: its exit status goes to `exit`. Blocking (fork and
    /// exec); call it off the async workers. The lock is held across the spawn so that a
    /// child that exits at once is registered before its status can be handed out.
    pub fn spawn(&self, cmd: &mut Command, exit: ExitSender) -> io::Result<Child> {
        let mut inner = self.lock();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        self.watch_locked(&mut inner, pid, exit)?;
        Ok(child)
    }

    /// Runs `f` with the reaper's lock held and a [`Watcher`] for the children it creates
    /// itself (raw clones): a child that exits at once is registered before its status can be
    /// handed out. Blocking; call it off the async workers.
    pub fn with_watcher<T>(&self, f: impl FnOnce(&mut Watcher<'_>) -> T) -> T {
        let mut inner = self.lock();
        let mut w = Watcher {
            reaper: self,
            inner: &mut inner,
        };
        f(&mut w)
    }

    fn watch_locked(&self, inner: &mut Inner, pid: i32, exit: ExitSender) -> io::Result<()> {
        if self.reap_all {
            inner.watched.insert(pid, exit);
            inner.spawned += 1;
            self.children.notify_all();
        } else {
            std::thread::Builder::new()
                .name(format!("wait-{pid}"))
                .spawn(move || loop {
                    match waitpid(Pid::from_raw(pid), None) {
                        Ok(st) => {
                            if let Some(s) = exit_status(st) {
                                exit.send_replace(Some(s));
                                return;
                            }
                        }
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            warn!(pid, error = %e, "waitpid failed");
                            return;
                        }
                    }
                })?;
        }
        Ok(())
    }

    /// PID 1: wait for any child, forever.
    fn reap_forever(&self) {
        let mut seen = 0;
        loop {
            match waitpid(None, Some(WaitPidFlag::__WALL)) {
                Ok(st) => {
                    let (Some(pid), Some(status)) = (st.pid(), exit_status(st)) else {
                        continue;
                    };
                    match self.lock().watched.remove(&pid.as_raw()) {
                        Some(tx) => {
                            tx.send_replace(Some(status));
                        }
                        None => debug!(pid = pid.as_raw(), %status, "reaped orphan"),
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    // No children: sleep until one is spawned. Orphans cannot appear meanwhile:
                    // they are re-parented from a child of ours, and we had none.
                    let mut inner = self.lock();
                    while inner.spawned == seen {
                        inner = self.children.wait(inner).unwrap_or_else(|p| p.into_inner());
                    }
                    seen = inner.spawned;
                }
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// Registers children with the [`Reaper`] while its lock is held ([`Reaper::with_watcher`]).
pub struct Watcher<'a> {
    reaper: &'a Reaper,
    inner: &'a mut Inner,
}

impl std::fmt::Debug for Watcher<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher<'_> {
    /// Hands `pid`'s exit status to `exit` once it ends; `pid` must be a child of this
    /// process.
    pub fn watch(&mut self, pid: Pid, exit: ExitSender) -> io::Result<()> {
        self.reaper.watch_locked(self.inner, pid.as_raw(), exit)
    }
}

/// Kata's view of a wait status: an exit code, or death by a signal; `None` for stops.
fn exit_status(st: WaitStatus) -> Option<ExitStatus> {
    match st {
        WaitStatus::Exited(_, code) => Some(ExitStatus::Code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ExitStatus::Signal(sig as i32)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reaper waits for the children, not their `Child` handles.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn hands_out_exit_codes_and_signals() {
        let reaper = Reaper::global();
        let (tx, mut rx) = watch::channel(None);
        reaper
            .spawn(Command::new("sh").args(["-c", "exit 42"]), tx)
            .expect("spawn");
        let st = *rx.wait_for(Option::is_some).await.expect("status");
        assert_eq!(st, Some(ExitStatus::Code(42)));
        let (tx, mut rx) = watch::channel(None);
        let child = reaper
            .spawn(Command::new("sh").args(["-c", "kill -9 $$"]), tx)
            .expect("spawn");
        assert!(child.id() > 0);
        let st = *rx.wait_for(Option::is_some).await.expect("status");
        assert_eq!(st, Some(ExitStatus::Signal(9)));
    }
}
