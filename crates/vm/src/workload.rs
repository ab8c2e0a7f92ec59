//! Work in a running VM: processes with their standard streams, and files in and out.
//!
//! A [`Process`] is the host's handle on a process the agent started. Its streams are tokio
//! `AsyncWrite`/`AsyncRead` ends fed by background tasks that call `WriteStdin`, `ReadStdout`
//! and `ReadStderr`; each task holds at most a few chunks, so a reader that stops reading stops
//! the reads, the guest pipe fills, and the process is held: flow control end to end.
//! Every wait ends as soon as the VM's hypervisor exits.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tracing::{debug, instrument};

use vmfactory_agent::workload::MAX_CHUNK;
use vmfactory_agent::{Agent, CopyFileChunk, ExitStatus, ProcessSpec};
use vmfactory_hypervisor::Hypervisor;

use crate::error::{Error, Result};
use crate::exit::agent_call;
use crate::vm::Vm;

/// Size of the chunks streams and copies move per call.
const CHUNK: u32 = 256 << 10;

/// Chunks of output a [`ProcessOutput`] holds before its reads stop.
const OUTPUT_QUEUE: usize = 4;

/// How much stdin a [`Process`] takes before its writer waits.
const STDIN_BUFFER: usize = 256 << 10;

/// A process running in a VM: its streams, its exit status, signals and terminal size.
///
/// Take the streams with [`Process::stdin`], [`Process::stdout`] and [`Process::stderr`].
/// Dropping the stdin end closes the process's stdin. Read stdout and stderr to their end
/// (or drop them) before or while waiting: output left unread holds a process that writes
/// more than its pipe takes.
#[derive(Debug)]
pub struct Process {
    link: Link,
    stdin: Option<DuplexStream>,
    stdout: Option<ProcessOutput>,
    stderr: Option<ProcessOutput>,
}

/// A process's stdout or stderr as an `AsyncRead`; I/O errors carry the agent's error.
#[derive(Debug)]
pub struct ProcessOutput {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    pending: Vec<u8>,
    at: usize,
}

impl AsyncRead for ProcessOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.at == this.pending.len() {
            match ready!(this.rx.poll_recv(cx)) {
                Some(Ok(chunk)) => {
                    this.pending = chunk;
                    this.at = 0;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.pending.len() - this.at);
        buf.put_slice(&this.pending[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A unique exec id: processes of one VM may be started by several hosts' handles.
fn new_exec_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "exec-{}-{}-{nanos:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// An error and its sources on one line, for an `io::Error` that carries no source.
fn one_line(e: &Error) -> String {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    text
}

fn io_error(e: &Error) -> io::Error {
    io::Error::other(one_line(e))
}

/// What every call about one process needs: its VM, its agent, and the VM's hypervisor when
/// at hand (then QEMU's exit ends each call at once).
#[derive(Debug, Clone)]
struct Link {
    vm_id: String,
    /// Empty for the VM's own root.
    container_id: String,
    exec_id: String,
    agent: Arc<dyn Agent>,
    hv: Option<Arc<dyn Hypervisor>>,
}

impl Link {
    async fn call<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = vmfactory_agent::Result<T>>,
    ) -> Result<T> {
        agent_call(&self.vm_id, self.hv.as_deref(), op, call).await
    }
}

impl Process {
    /// Starts `spec` through `agent`, the agent of VM `vm_id`, for a VM this process does not
    /// own (held by another: `vmfactory get --hold`). [`Vm::exec`] is the same for a VM at
    /// hand, whose hypervisor's exit also ends every wait.
    pub async fn start(vm_id: &str, agent: Arc<dyn Agent>, spec: ProcessSpec) -> Result<Process> {
        Self::start_with(vm_id, agent, None, spec).await
    }

    async fn start_with(
        vm_id: &str,
        agent: Arc<dyn Agent>,
        hv: Option<Arc<dyn Hypervisor>>,
        spec: ProcessSpec,
    ) -> Result<Process> {
        Self::exec_as(vm_id, agent, hv, new_exec_id(), spec).await
    }

    /// `ExecProcess` of `spec` as `exec_id` in `spec.container_id`.
    pub(crate) async fn exec_as(
        vm_id: &str,
        agent: Arc<dyn Agent>,
        hv: Option<Arc<dyn Hypervisor>>,
        exec_id: String,
        spec: ProcessSpec,
    ) -> Result<Process> {
        let link = Link {
            vm_id: vm_id.to_owned(),
            container_id: spec.container_id.clone(),
            exec_id,
            agent,
            hv,
        };
        link.call(
            "exec_process",
            link.agent.exec_process(&link.exec_id, &spec),
        )
        .await?;
        Ok(Self::attach(link))
    }

    /// The handle of a process the agent already has (a container's init).
    pub(crate) fn attached(
        vm_id: &str,
        agent: Arc<dyn Agent>,
        hv: Option<Arc<dyn Hypervisor>>,
        container_id: &str,
        exec_id: &str,
    ) -> Process {
        Self::attach(Link {
            vm_id: vm_id.to_owned(),
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            agent,
            hv,
        })
    }

    fn attach(link: Link) -> Process {
        let stdout = pump_output(link.clone(), false);
        let stderr = pump_output(link.clone(), true);
        let stdin = pump_stdin(link.clone());
        Process {
            link,
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    /// The agent's id of this process.
    pub fn exec_id(&self) -> &str {
        &self.link.exec_id
    }

    /// The container the process runs in; empty for the VM's own root.
    pub fn container_id(&self) -> &str {
        &self.link.container_id
    }

    /// The stdin end (once): bytes written go to the process; dropping or shutting it down
    /// closes the process's stdin.
    pub fn stdin(&mut self) -> Option<DuplexStream> {
        self.stdin.take()
    }

    /// The stdout end (once). With a terminal, stdout and stderr are both here.
    pub fn stdout(&mut self) -> Option<ProcessOutput> {
        self.stdout.take()
    }

    /// The stderr end (once); empty with a terminal.
    pub fn stderr(&mut self) -> Option<ProcessOutput> {
        self.stderr.take()
    }

    /// Waits until the process ends: its exit code, or the signal that killed it.
    pub async fn wait(&self) -> Result<ExitStatus> {
        let l = &self.link;
        l.call(
            "wait_process",
            l.agent.wait_process(&l.container_id, &l.exec_id),
        )
        .await
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) to the process; no-op once it has ended.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        let sig = u32::try_from(signal).unwrap_or(0);
        let l = &self.link;
        l.call(
            "signal_process",
            l.agent.signal_process(&l.container_id, &l.exec_id, sig),
        )
        .await
    }

    /// Sets the terminal size of a process started with a terminal.
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let l = &self.link;
        l.call(
            "tty_win_resize",
            l.agent
                .tty_win_resize(&l.container_id, &l.exec_id, rows, cols),
        )
        .await
    }
}

/// Feeds one output stream: reads while the queue has room, ends at the stream's end.
fn pump_output(link: Link, stderr: bool) -> ProcessOutput {
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let op = if stderr { "read_stderr" } else { "read_stdout" };
    tokio::spawn(async move {
        loop {
            let Ok(permit) = tx.reserve().await else {
                return; // The reader is gone.
            };
            let read = async {
                if stderr {
                    link.agent
                        .read_stderr(&link.container_id, &link.exec_id, CHUNK)
                        .await
                } else {
                    link.agent
                        .read_stdout(&link.container_id, &link.exec_id, CHUNK)
                        .await
                }
            };
            match link.call(op, read).await {
                Ok(chunk) if chunk.is_empty() => return,
                Ok(chunk) => permit.send(Ok(chunk)),
                Err(e) => {
                    permit.send(Err(io_error(&e)));
                    return;
                }
            }
        }
    });
    ProcessOutput {
        rx,
        pending: Vec::new(),
        at: 0,
    }
}

/// Feeds stdin from the user's end; closes the process's stdin when that end closes.
fn pump_stdin(link: Link) -> DuplexStream {
    let (user, mut ours) = tokio::io::duplex(STDIN_BUFFER);
    tokio::spawn(async move {
        let mut buf = vec![0; CHUNK as usize];
        loop {
            // The user's end only fails when dropped: that is the end of stdin too.
            let n = ours.read(&mut buf).await.unwrap_or_default();
            let call = async {
                if n == 0 {
                    link.agent
                        .close_stdin(&link.container_id, &link.exec_id)
                        .await
                } else {
                    link.agent
                        .write_stdin(&link.container_id, &link.exec_id, &buf[..n])
                        .await
                }
            };
            if let Err(e) = link.call("write_stdin", call).await {
                // The process or the VM is gone: the user's writes now fail.
                debug!(exec_id = %link.exec_id, error = %one_line(&e), "stdin closed");
                let _ = ours.shutdown().await;
                return;
            }
            if n == 0 {
                return;
            }
        }
    });
    user
}

impl Vm {
    /// Starts a process in the VM's own root and returns its handle.
    ///
    /// ```no_run
    /// # async fn example(vm: &vmfactory_vm::Vm) -> vmfactory_vm::Result<()> {
    /// use tokio::io::AsyncReadExt;
    /// use vmfactory_vm::ProcessSpec;
    ///
    /// let mut p = vm.exec(ProcessSpec::new(["sh", "-c", "echo hello"])).await?;
    /// drop(p.stdin()); // nothing to say: the process reads EOF
    /// let mut out = String::new();
    /// p.stdout().expect("stdout").read_to_string(&mut out).await.expect("read");
    /// assert_eq!(out, "hello\n");
    /// assert!(p.wait().await?.success());
    /// # Ok(())
    /// # }
    /// ```
    #[instrument(skip_all, fields(vm = %self.id, args = ?spec.args))]
    pub async fn exec(&self, spec: ProcessSpec) -> Result<Process> {
        drop(self.owned().await?);
        Process::start_with(
            &self.id,
            self.agent.clone(),
            Some(self.hypervisor.clone()),
            spec,
        )
        .await
    }

    /// Copies the host file `src` to `dst` in the guest (absolute; parent directories are
    /// created), in chunks, with `src`'s permission bits, owned by root. The guest renames it
    /// into place only when all of it arrived. Returns the bytes copied.
    ///
    /// ```no_run
    /// # async fn example(vm: &vmfactory_vm::Vm) -> vmfactory_vm::Result<()> {
    /// vm.copy_in("/etc/hostname".as_ref(), "/tmp/hostname").await?;
    /// vm.copy_out("/tmp/hostname", "/tmp/back".as_ref()).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn copy_in(&self, src: &Path, dst: &str) -> Result<u64> {
        drop(self.owned().await?);
        let host = |op, source| Error::HostFile {
            op,
            path: src.to_owned(),
            source,
        };
        let mut file = tokio::fs::File::open(src)
            .await
            .map_err(|e| host("open", e))?;
        let meta = file.metadata().await.map_err(|e| host("stat", e))?;
        if !meta.is_file() {
            return Err(host("copy", io::Error::other("not a regular file")));
        }
        let size = meta.len();
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        let mut offset = 0;
        loop {
            let want = usize::try_from((size - offset).min(u64::from(MAX_CHUNK))).unwrap_or(0);
            let mut data = vec![0; want];
            file.read_exact(&mut data)
                .await
                .map_err(|e| host("read", e))?;
            let chunk = CopyFileChunk {
                path: dst.to_owned(),
                file_size: size,
                file_mode: mode,
                dir_mode: 0o755,
                uid: 0,
                gid: 0,
                offset,
                data,
            };
            self.agent_call("copy_file", self.agent.copy_file(&chunk))
                .await?;
            offset += want as u64;
            if offset >= size {
                return Ok(size);
            }
        }
    }

    /// Copies the guest file `src` (a regular file, reached without symlinks) to `dst` on the
    /// host: written to a temporary file beside `dst`, renamed at the end. Returns the bytes
    /// copied.
    #[instrument(skip(self), fields(vm = %self.id))]
    pub async fn copy_out(&self, src: &str, dst: &Path) -> Result<u64> {
        drop(self.owned().await?);
        let name = dst.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dst.with_file_name(format!(".{}.vmfactory-copy", name.unwrap_or_default()));
        let host = |op, path: &Path, source| Error::HostFile {
            op,
            path: path.to_owned(),
            source,
        };
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| host("create", &tmp, e))?;
        let result = async {
            let mut offset = 0;
            loop {
                let chunk = self
                    .agent_call("read_file", self.agent.read_file(src, offset, MAX_CHUNK))
                    .await?;
                out.write_all(&chunk.data)
                    .await
                    .map_err(|e| host("write", &tmp, e))?;
                offset += chunk.data.len() as u64;
                if chunk.data.is_empty() || offset >= chunk.file_size {
                    out.flush().await.map_err(|e| host("write", &tmp, e))?;
                    return Ok(offset);
                }
            }
        }
        .await;
        drop(out);
        match result {
            Ok(n) => {
                tokio::fs::rename(&tmp, dst)
                    .await
                    .map_err(|e| host("rename", dst, e))?;
                Ok(n)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::fake::FakeBackends;

    #[tokio::test]
    async fn exec_streams_and_waits_through_the_agent() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let mut p = vm.exec(ProcessSpec::new(["cat"])).await.expect("exec");
        let mut stdin = p.stdin().expect("stdin");
        let mut stdout = p.stdout().expect("stdout");
        let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                stdin.write_all(&data).await.expect("write");
                // Dropping the end closes the process's stdin.
            })
        };
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).await.expect("read");
        writer.await.expect("writer");
        assert!(out == data, "{} of {} bytes", out.len(), data.len());
        assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(0));

        let mut p = vm.exec(ProcessSpec::new(["nope"])).await.expect("exec");
        let mut err = String::new();
        p.stderr()
            .expect("stderr")
            .read_to_string(&mut err)
            .await
            .expect("read");
        assert_eq!(err, "nope: not found\n");
        assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(127));

        let p = vm.exec(ProcessSpec::new(["sleep"])).await.expect("exec");
        p.signal(9).await.expect("signal");
        assert_eq!(p.wait().await.expect("wait"), ExitStatus::Signal(9));
        vm.stop().await.expect("stop");
        assert!(matches!(
            vm.exec(ProcessSpec::new(["true"])).await,
            Err(Error::NotOwned { .. })
        ));
    }

    #[tokio::test]
    async fn copies_in_and_out_in_chunks() {
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        let body: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &body).expect("write");
        assert_eq!(
            vm.copy_in(&src, "/data/f").await.expect("copy in"),
            2_500_000
        );
        let back = dir.path().join("back");
        assert_eq!(
            vm.copy_out("/data/f", &back).await.expect("copy out"),
            2_500_000
        );
        assert!(std::fs::read(&back).expect("read") == body);
        let e = vm
            .copy_out("/missing", &dir.path().join("x"))
            .await
            .expect_err("missing");
        assert!(
            matches!(
                e,
                Error::Agent {
                    op: "read_file",
                    ..
                }
            ),
            "{e}"
        );
        assert!(!dir.path().join("x").exists() && !dir.path().join(".x.vmfactory-copy").exists());
        let e = vm
            .copy_in(&dir.path().join("nope"), "/f")
            .await
            .expect_err("no source");
        assert!(matches!(e, Error::HostFile { op: "open", .. }), "{e}");
        vm.stop().await.expect("stop");
    }

    #[tokio::test]
    async fn a_vm_dying_mid_exec_ends_wait_and_streams() {
        use std::os::unix::process::ExitStatusExt;
        let h = FakeBackends::new();
        let vm = Vm::new_with(h.config(), &h).await.expect("new VM");
        let mut p = vm.exec(ProcessSpec::new(["sleep"])).await.expect("exec");
        let mut stdout = p.stdout().expect("stdout");
        h.last_hv()
            .exit(std::process::ExitStatus::from_raw(9), "qemu: killed");
        let e = p.wait().await.expect_err("VM died");
        assert!(e.hypervisor_exit().is_some(), "{e}");
        let mut out = Vec::new();
        let e = stdout.read_to_end(&mut out).await.expect_err("stream ends");
        assert!(e.to_string().contains("died during read_stdout"), "{e}");
        vm.stop().await.expect("stop");
    }
}
