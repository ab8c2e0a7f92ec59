//! containerd's stdio FIFOs wired to a process's streams.
//!
//! containerd (or `ctr`) makes the FIFOs and opens its ends; the shim opens each FIFO
//! read-write, which never blocks on a missing peer (a plain open for writing would wait for
//! a reader). stdin is copied until CloseIO (our read-write end never sees EOF by itself, as
//! containerd signals the end of input with CloseIO); stdout and stderr are copied until the
//! process's stream ends, and then the FIFO is closed, which containerd reads as EOF.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::sandbox::{OutputStream, SandboxProcess, StdinStream};

/// Bytes moved per read from the stdin FIFO.
const COPY_BUFFER: usize = 64 << 10;

/// The FIFO paths of one process (empty: not wired).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    /// containerd's stdin FIFO.
    pub stdin: String,
    /// containerd's stdout FIFO.
    pub stdout: String,
    /// containerd's stderr FIFO.
    pub stderr: String,
    /// One stream on a terminal.
    pub terminal: bool,
}

/// Why a FIFO could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("Cannot open stdio FIFO {}", path.display())]
pub struct StdioError {
    /// The FIFO.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// The copies of one process.
#[derive(Debug)]
pub struct Copies {
    /// The stdin copy, cut by CloseIO.
    pub stdin: StdinCopy,
    /// The stdout and stderr copies, awaited before the exit is reported.
    pub outputs: OutputCopies,
}

/// The stdin copy; dropping it stops the copy and closes the process's stdin.
#[derive(Debug, Default)]
pub struct StdinCopy {
    close: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl StdinCopy {
    /// Copies what containerd has written so far, then closes the process's stdin.
    pub fn close(&mut self) {
        if let Some(tx) = self.close.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for StdinCopy {
    fn drop(&mut self) {
        if let Some(h) = self.task.take() {
            h.abort();
        }
    }
}

/// The stdout and stderr copies.
#[derive(Debug, Default)]
pub struct OutputCopies(Vec<JoinHandle<()>>);

impl OutputCopies {
    /// Waits until stdout and stderr are copied to their end; then their FIFOs are closed.
    pub async fn done(self) {
        for h in self.0 {
            let _ = h.await;
        }
    }
}

fn open_sender(path: &Path) -> Result<pipe::Sender, StdioError> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path)
        .map_err(|source| StdioError {
            path: path.to_path_buf(),
            source,
        })
}

fn open_receiver(path: &Path) -> Result<pipe::Receiver, StdioError> {
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|source| StdioError {
            path: path.to_path_buf(),
            source,
        })
}

/// Opens the FIFOs in `paths` (all before any copy starts, so a bad path changes nothing) and
/// copies between them and `process`'s streams. Must run inside a tokio runtime.
pub fn wire(process: &mut dyn SandboxProcess, paths: &StdioPaths) -> Result<Copies, StdioError> {
    let opt = |p: &str| (!p.is_empty()).then(|| PathBuf::from(p));
    let stdin_fifo = opt(&paths.stdin).map(|p| open_receiver(&p)).transpose()?;
    let stdout_fifo = opt(&paths.stdout).map(|p| open_sender(&p)).transpose()?;
    let stderr_fifo = match paths.terminal {
        true => None,
        false => opt(&paths.stderr).map(|p| open_sender(&p)).transpose()?,
    };

    let stdin = match (stdin_fifo, process.take_stdin()) {
        (Some(fifo), Some(to)) => {
            let (tx, rx) = oneshot::channel();
            StdinCopy {
                close: Some(tx),
                task: Some(tokio::spawn(copy_in(fifo, to, rx))),
            }
        }
        // No stdin FIFO: the process's stdin is closed at once (the end is dropped here).
        _ => StdinCopy::default(),
    };
    let mut outputs = Vec::new();
    for (fifo, from) in [
        (stdout_fifo, process.take_stdout()),
        (stderr_fifo, process.take_stderr()),
    ] {
        match (fifo, from) {
            (Some(fifo), Some(from)) => outputs.push(tokio::spawn(copy_out(from, fifo))),
            // Nobody reads it: drain it so the process is never held on a full pipe.
            (None, Some(from)) => outputs.push(tokio::spawn(copy_out(from, tokio::io::sink()))),
            _ => {}
        }
    }
    Ok(Copies {
        stdin,
        outputs: OutputCopies(outputs),
    })
}

/// Copies stdin until `close` (CloseIO): then what is already in the FIFO (containerd wrote it
/// before asking) is copied too, and the process's stdin is closed.
async fn copy_in(mut fifo: pipe::Receiver, mut to: StdinStream, mut close: oneshot::Receiver<()>) {
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        tokio::select! {
            biased;
            n = fifo.read(&mut buf) => match n {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    debug!(error = %e, "stdin copy ended");
                    break;
                }
            },
            _ = &mut close => {
                // A plain non-blocking read: tokio's `try_read` answers WouldBlock until its
                // reactor has seen the data arrive, which it may not have yet.
                while let Ok(n) = nix::unistd::read(fifo.as_raw_fd(), &mut buf) {
                    if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
        }
    }
    let _ = to.shutdown().await;
}

async fn copy_out(
    mut from: OutputStream,
    mut fifo: impl tokio::io::AsyncWrite + Unpin + Send + 'static,
) {
    if let Err(e) = tokio::io::copy(&mut from, &mut fifo).await {
        debug!(error = %e, "output copy ended");
    }
    let _ = fifo.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeSandbox;
    use crate::sandbox::{ContainerRequest, SandboxProvider};

    #[tokio::test]
    async fn a_missing_fifo_is_an_error_naming_it() {
        let fake = FakeSandbox::new();
        let vm = fake.new_vm("s").await.expect("vm");
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2", "process": {"args": ["echo", "x"], "cwd": "/",
            "user": {"uid": 0, "gid": 0}}}))
        .expect("spec");
        let mut p = vm
            .create_container(&ContainerRequest {
                id: "c".into(),
                spec,
                rootfs_image: "/img".into(),
            })
            .await
            .expect("create");
        let paths = StdioPaths {
            stdout: "/nonexistent/fifo".into(),
            ..Default::default()
        };
        let e = wire(p.as_mut(), &paths).expect_err("missing");
        assert_eq!(e.path, Path::new("/nonexistent/fifo"));
        // Nothing was taken: the streams are still there for a retry.
        assert!(p.take_stdout().is_some());
    }
}
