//! Noticing that a VM's processes exited: each process's exit as a [`ProcExit`] watch (fed
//! by its monitor task in `process.rs`), a VM's processes together as a [`VmExit`], and
//! [`VmExit::guard`], which every wait on a running VM in this crate runs under, so that a
//! QEMU that dies ends the wait at once with [`Error::Exited`] instead of its timeout.

use std::future::Future;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, QmpError, Result};

/// How long a lost QMP connection waits for QEMU's exit to be reported. QEMU's sockets close
/// as it exits, a moment before its parent hears of the exit; a QEMU that closed QMP and
/// lives on (never seen) costs this much before the QMP error is returned as it is.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    /// Its exit status; `None` for a re-attached process (not our child, so not ours to reap).
    pub(crate) status: Option<ExitStatus>,
    /// The last bytes it wrote to stderr, lines joined with ` | `.
    pub(crate) stderr_tail: String,
}

/// The exit of one process: set once by its monitor task, read by any number of waiters.
#[derive(Debug, Clone)]
pub(crate) struct ProcExit {
    /// `QEMU` or `vsock backend`, for messages.
    pub(crate) what: &'static str,
    rx: watch::Receiver<Option<Arc<Ended>>>,
}

impl ProcExit {
    /// A watch and the sender its monitor reports the exit on.
    pub(crate) fn channel(what: &'static str) -> (watch::Sender<Option<Arc<Ended>>>, Self) {
        let (tx, rx) = watch::channel(None);
        (tx, Self { what, rx })
    }

    /// How the process ended, if it has.
    pub(crate) fn now(&self) -> Option<Arc<Ended>> {
        self.rx.borrow().clone()
    }

    /// Resolves once the process has exited. Never resolves once its monitor is gone (the
    /// process was released: detached or dropped), since its end is then no longer ours to see.
    pub(crate) async fn ended(&self) -> Arc<Ended> {
        let mut rx = self.rx.clone();
        let ended = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|e| e.clone());
        match ended {
            Some(ended) => ended,
            None => std::future::pending().await,
        }
    }

    /// [`Error::Exited`] for VM `id` from how this process `ended`.
    pub(crate) fn error(&self, id: &str, ended: &Ended) -> Error {
        Error::Exited {
            id: id.to_owned(),
            what: self.what,
            status: ended.status,
            stderr_tail: ended.stderr_tail.clone(),
        }
    }
}

/// The processes of one VM (QEMU, and the vsock backend for hybrid vsock): the first of them
/// to exit ends every wait guarded by this.
#[derive(Debug, Clone)]
pub(crate) struct VmExit {
    id: String,
    qemu: ProcExit,
    backend: Option<ProcExit>,
}

impl VmExit {
    /// The exits of VM `id`'s processes.
    pub(crate) fn new(id: &str, qemu: ProcExit, backend: Option<ProcExit>) -> Self {
        Self {
            id: id.to_owned(),
            qemu,
            backend,
        }
    }

    /// Resolves with [`Error::Exited`] once any of the VM's processes has exited.
    pub(crate) async fn exited(&self) -> Error {
        let backend = async {
            match &self.backend {
                Some(b) => (b, b.ended().await),
                None => std::future::pending().await,
            }
        };
        let (proc, ended) = tokio::select! {
            biased;
            ended = self.qemu.ended() => (&self.qemu, ended),
            b = backend => b,
        };
        proc.error(&self.id, &ended)
    }

    /// Runs `fut`, ending it with [`Error::Exited`] as soon as a process of the VM exits. A
    /// lost QMP connection is QEMU exiting, reported a moment before the exit is: such an
    /// error waits (at most [`EXIT_GRACE`]) for the exit and returns that instead.
    pub(crate) async fn guard<T>(&self, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let res = tokio::select! {
            biased;
            exited = self.exited() => return Err(exited),
            res = fut => res,
        };
        match res {
            Err(e) if lost_qmp(&e) => match tokio::time::timeout(EXIT_GRACE, self.exited()).await {
                Ok(exited) => Err(exited),
                Err(_) => Err(e),
            },
            res => res,
        }
    }
}

/// Whether `e` is the QMP connection going away under a command (QEMU closing it).
fn lost_qmp(e: &Error) -> bool {
    matches!(
        e,
        Error::Qmp {
            source: QmpError::Disconnected { .. } | QmpError::Send { .. },
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Proc;
    use crate::record::{ProcessKind, RecordTarget};
    use std::path::Path;

    async fn spawn(dir: &Path, script: &str) -> Proc {
        Proc::spawn(
            "QEMU",
            Path::new("sh"),
            &["-c".into(), script.into()],
            &dir.join("stderr"),
            RecordTarget::new(dir, ProcessKind::Qemu).expect("record target"),
        )
        .await
        .expect("spawn sh")
    }

    #[tokio::test]
    async fn a_guarded_wait_ends_when_the_process_exits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let qemu = spawn(
            dir.path(),
            "echo 'qemu: first' >&2; echo 'qemu: last' >&2; exit 3",
        )
        .await;
        let exit = VmExit::new("vm", qemu.exit().clone(), None);
        let t0 = std::time::Instant::now();
        let never = std::future::pending::<Result<()>>();
        let err = exit.guard(never).await.expect_err("the process exits");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        match err {
            Error::Exited {
                id,
                what,
                status,
                stderr_tail,
            } => {
                assert_eq!((id.as_str(), what), ("vm", "QEMU"));
                assert_eq!(status.and_then(|s| s.code()), Some(3));
                assert_eq!(stderr_tail, "qemu: first | qemu: last");
            }
            other => panic!("{other:?}"),
        }
        // Already exited: the next guard ends before its future runs.
        let ran = exit.guard(async { Ok(()) }).await;
        assert!(matches!(ran, Err(Error::Exited { .. })), "{ran:?}");
    }

    #[tokio::test]
    async fn the_backend_exiting_ends_the_wait_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut qemu = spawn(dir.path(), "sleep 30").await;
        let backend = Proc::spawn(
            "vsock backend",
            Path::new("sh"),
            &["-c".into(), "echo gone >&2; kill -9 $$".into()],
            &dir.path().join("backend.stderr"),
            RecordTarget::new(dir.path(), ProcessKind::VsockBackend).expect("record target"),
        )
        .await
        .expect("spawn");
        let exit = VmExit::new("vm", qemu.exit().clone(), Some(backend.exit().clone()));
        let err = exit.exited().await;
        assert!(
            matches!(&err, Error::Exited { what: "vsock backend", status: Some(s), stderr_tail, .. }
                if std::os::unix::process::ExitStatusExt::signal(s) == Some(9) && stderr_tail == "gone"),
            "{err:?}"
        );
        qemu.terminate("vm", Duration::ZERO).await.expect("kill");
    }

    #[tokio::test]
    async fn a_lost_qmp_connection_reports_the_exit_behind_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // QMP is lost first (QEMU's sockets close as it exits), the exit is seen a moment later.
        let qemu = spawn(dir.path(), "sleep 0.2; echo 'qemu: died' >&2; exit 1").await;
        let exit = VmExit::new("vm", qemu.exit().clone(), None);
        let lost = async {
            Err::<(), _>(Error::Qmp {
                id: "vm".into(),
                source: QmpError::Disconnected {
                    command: "cont".into(),
                },
            })
        };
        let err = exit.guard(lost).await.expect_err("lost");
        assert!(
            matches!(&err, Error::Exited { stderr_tail, .. } if stderr_tail == "qemu: died"),
            "{err:?}"
        );

        // Any other error of a live VM is returned as it is, at once.
        let mut alive = spawn(dir.path(), "sleep 30").await;
        let exit = VmExit::new("vm", alive.exit().clone(), None);
        let t0 = std::time::Instant::now();
        let other = exit
            .guard(async { Err::<(), _>(Error::NotRunning { id: "vm".into() }) })
            .await;
        assert!(matches!(other, Err(Error::NotRunning { .. })), "{other:?}");
        assert!(t0.elapsed() < EXIT_GRACE);
        alive.terminate("vm", Duration::ZERO).await.expect("kill");
    }
}
