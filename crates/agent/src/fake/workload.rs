//! The fake guest behind [`FakeAgent`](super::FakeAgent)'s workload calls: a few programs that
//! behave like their namesakes, files in memory, storages in a map.
//!
//! Programs: `echo ARGS` prints its arguments; `cat` copies stdin to stdout and exits at EOF;
//! `true` and `false`; `exit N` ends with code N; `sleep` runs until signalled; anything else
//! prints "not found" on stderr and exits 127. Errors are the statuses the real agent answers.
//!
//! Containers: `CreateContainer` records the container and its storages and starts its init
//! process at once (the fake has nothing to hold back); a container's processes are kept as
//! `container/exec`. `RemoveContainer` forgets them and unmounts the storages.

use std::collections::{HashMap, VecDeque};

use ttrpc::{get_status, Code};

use crate::container::{ContainerSpec, ContainerStats};
use crate::error::{Error, Result};
use crate::workload::{CopyFileChunk, ExitStatus, FileChunk, ProcessSpec, Storage};

#[derive(Debug, Default)]
struct Proc {
    program: String,
    stdout: VecDeque<u8>,
    stderr: VecDeque<u8>,
    stdin_open: bool,
    exit: Option<ExitStatus>,
    tty: Option<(u32, u32)>,
}

/// State of the fake guest.
#[derive(Debug, Default)]
pub(super) struct FakeGuest {
    procs: HashMap<String, Proc>,
    /// Files being written: (expected size, bytes so far, mode).
    partial: HashMap<String, (u64, Vec<u8>, u32)>,
    files: HashMap<String, (Vec<u8>, u32)>,
    pub(super) storages: HashMap<String, Storage>,
    /// Containers by id: their storages' mount points and whether they were started.
    containers: HashMap<String, (Vec<String>, bool)>,
}

/// Where a process is kept: its exec id, or `container/exec` in a container.
fn key(container_id: &str, exec_id: &str) -> String {
    if container_id.is_empty() {
        exec_id.to_owned()
    } else {
        format!("{container_id}/{exec_id}")
    }
}

pub(super) fn status(method: &'static str, code: Code, msg: String) -> Error {
    Error::Rpc {
        method,
        source: ttrpc::Error::RpcStatus(get_status(code, msg)),
    }
}

fn take(buf: &mut VecDeque<u8>, len: u32) -> Vec<u8> {
    let n = buf.len().min(len as usize);
    buf.drain(..n).collect()
}

impl FakeGuest {
    pub(super) fn files(&self) -> HashMap<String, Vec<u8>> {
        self.files
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    pub(super) fn process_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.procs.keys().cloned().collect();
        ids.sort();
        ids
    }

    pub(super) fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.containers.keys().cloned().collect();
        ids.sort();
        ids
    }

    fn proc(&mut self, method: &'static str, container_id: &str, id: &str) -> Result<&mut Proc> {
        self.procs
            .get_mut(&key(container_id, id))
            .ok_or_else(|| status(method, Code::NOT_FOUND, format!("No process {id:?}")))
    }

    fn container(&self, method: &'static str, id: &str) -> Result<&(Vec<String>, bool)> {
        self.containers
            .get(id)
            .ok_or_else(|| status(method, Code::NOT_FOUND, format!("No container {id:?}")))
    }

    pub(super) fn create_container(
        &mut self,
        id: &str,
        storages: &[Storage],
        spec: &ContainerSpec,
    ) -> Result<()> {
        let invalid = |m: &str| status("CreateContainer", Code::INVALID_ARGUMENT, m.to_owned());
        if id.is_empty() || id.contains('/') {
            return Err(invalid("Invalid container id"));
        }
        if self.containers.contains_key(id) {
            return Err(status(
                "CreateContainer",
                Code::ALREADY_EXISTS,
                format!("Container {id:?} exists"),
            ));
        }
        if storages.is_empty() {
            return Err(invalid("No root storage"));
        }
        if !spec.root_path.is_empty() && !spec.root_path.starts_with('/') {
            return Err(invalid("Relative root path"));
        }
        // Where the guest puts storages without a mount point.
        let storages: Vec<Storage> = storages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut s = s.clone();
                if s.mount_point.is_empty() {
                    s.mount_point = format!("/run/vmfactory/containers/{id}/storage-{i}");
                }
                s
            })
            .collect();
        for s in &storages {
            if self.storages.contains_key(&s.mount_point) {
                return Err(status(
                    "CreateContainer",
                    Code::ALREADY_EXISTS,
                    format!("{} is mounted", s.mount_point),
                ));
            }
        }
        let mut init = spec.process.clone();
        init.container_id = id.to_owned();
        self.exec(id, id, &init)
            .map_err(|_| invalid("No program to run"))?;
        for s in &storages {
            self.storages.insert(s.mount_point.clone(), s.clone());
        }
        let mounts = storages.iter().map(|s| s.mount_point.clone()).collect();
        self.containers.insert(id.to_owned(), (mounts, false));
        Ok(())
    }

    pub(super) fn start_container(&mut self, id: &str) -> Result<()> {
        if self.container("StartContainer", id)?.1 {
            return Err(status(
                "StartContainer",
                Code::FAILED_PRECONDITION,
                format!("Container {id:?} was started"),
            ));
        }
        if let Some(c) = self.containers.get_mut(id) {
            c.1 = true;
        }
        Ok(())
    }

    pub(super) fn remove_container(&mut self, id: &str) -> Result<()> {
        let (mounts, _) = self.container("RemoveContainer", id)?.clone();
        for m in mounts {
            self.storages.remove(&m);
        }
        let prefix = format!("{id}/");
        self.procs.retain(|k, _| !k.starts_with(&prefix));
        self.containers.remove(id);
        Ok(())
    }

    fn live(&self, id: &str) -> impl Iterator<Item = &Proc> {
        let prefix = format!("{id}/");
        self.procs
            .iter()
            .filter(move |(k, p)| k.starts_with(&prefix) && p.exit.is_none())
            .map(|(_, p)| p)
    }

    pub(super) fn stats_container(&self, id: &str) -> Result<ContainerStats> {
        self.container("StatsContainer", id)?;
        let pids = self.live(id).count() as u64;
        Ok(ContainerStats {
            cpu_usage_ns: 1_000_000 * pids,
            memory_usage_bytes: 1 << 20,
            memory_limit_bytes: u64::MAX,
            pids,
        })
    }

    pub(super) fn container_pids(&self, id: &str) -> Result<Vec<u32>> {
        self.container("ListContainerPids", id)?;
        Ok((1..=self.live(id).count() as u32).collect())
    }

    pub(super) fn exec(
        &mut self,
        container_id: &str,
        exec_id: &str,
        spec: &ProcessSpec,
    ) -> Result<()> {
        if !container_id.is_empty()
            && !self.containers.contains_key(container_id)
            && container_id != exec_id
        {
            return Err(status(
                "ExecProcess",
                Code::NOT_FOUND,
                format!("No container {container_id:?}"),
            ));
        }
        let id = key(container_id, exec_id);
        let id = id.as_str();
        if self.procs.contains_key(id) {
            return Err(status(
                "ExecProcess",
                Code::ALREADY_EXISTS,
                format!("Process {id:?} exists"),
            ));
        }
        let program =
            spec.args.first().cloned().ok_or_else(|| {
                status("ExecProcess", Code::INVALID_ARGUMENT, "No program".into())
            })?;
        let mut p = Proc {
            program: program.clone(),
            stdin_open: true,
            tty: spec.console_size.filter(|_| spec.terminal),
            ..Default::default()
        };
        match program.as_str() {
            "echo" => {
                p.stdout
                    .extend(format!("{}\n", spec.args[1..].join(" ")).bytes());
                p.exit = Some(ExitStatus::Code(0));
            }
            "true" => p.exit = Some(ExitStatus::Code(0)),
            "false" => p.exit = Some(ExitStatus::Code(1)),
            "exit" => {
                let code = spec.args.get(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                p.exit = Some(ExitStatus::Code(code));
            }
            "cat" | "sleep" => {}
            other => {
                p.stderr.extend(format!("{other}: not found\n").bytes());
                p.exit = Some(ExitStatus::Code(127));
            }
        }
        self.procs.insert(id.to_owned(), p);
        Ok(())
    }

    /// `Some` once the process has ended; the process is then forgotten.
    pub(super) fn wait(&mut self, container_id: &str, id: &str) -> Option<Result<ExitStatus>> {
        let exit = match self.proc("WaitProcess", container_id, id) {
            Ok(p) => p.exit?,
            Err(e) => return Some(Err(e)),
        };
        // A container's init stays until the container is removed.
        if container_id.is_empty() || container_id != id {
            self.procs.remove(&key(container_id, id));
        }
        Some(Ok(exit))
    }

    pub(super) fn signal(&mut self, container_id: &str, id: &str, signal: u32) -> Result<()> {
        if !container_id.is_empty() && id.is_empty() {
            self.container("SignalProcess", container_id)?;
            let prefix = format!("{container_id}/");
            for (_, p) in self
                .procs
                .iter_mut()
                .filter(|(k, _)| k.starts_with(&prefix))
            {
                if p.exit.is_none() {
                    p.exit = Some(ExitStatus::Signal(
                        i32::try_from(signal).unwrap_or(i32::MAX),
                    ));
                }
            }
            return Ok(());
        }
        let p = self.proc("SignalProcess", container_id, id)?;
        if p.exit.is_none() {
            p.exit = Some(ExitStatus::Signal(
                i32::try_from(signal).unwrap_or(i32::MAX),
            ));
        }
        Ok(())
    }

    pub(super) fn write_stdin(&mut self, container_id: &str, id: &str, data: &[u8]) -> Result<()> {
        let p = self.proc("WriteStdin", container_id, id)?;
        if !p.stdin_open || p.exit.is_some() {
            return Err(status("WriteStdin", Code::INTERNAL, "Broken pipe".into()));
        }
        if p.program == "cat" {
            p.stdout.extend(data);
        }
        Ok(())
    }

    pub(super) fn close_stdin(&mut self, container_id: &str, id: &str) -> Result<()> {
        let p = self.proc("CloseStdin", container_id, id)?;
        p.stdin_open = false;
        if p.program == "cat" && p.exit.is_none() {
            p.exit = Some(ExitStatus::Code(0));
        }
        Ok(())
    }

    /// `Some` when there are bytes, or at the end of the stream (empty).
    pub(super) fn read(
        &mut self,
        container_id: &str,
        id: &str,
        stderr: bool,
        len: u32,
    ) -> Option<Result<Vec<u8>>> {
        let method = if stderr { "ReadStderr" } else { "ReadStdout" };
        let p = match self.proc(method, container_id, id) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let buf = if stderr { &mut p.stderr } else { &mut p.stdout };
        if !buf.is_empty() || p.exit.is_some() {
            return Some(Ok(take(buf, len)));
        }
        None
    }

    pub(super) fn resize(
        &mut self,
        container_id: &str,
        id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<()> {
        let p = self.proc("TtyWinResize", container_id, id)?;
        match p.tty {
            Some(_) => {
                p.tty = Some((rows, cols));
                Ok(())
            }
            None => Err(status(
                "TtyWinResize",
                Code::FAILED_PRECONDITION,
                format!("Process {id:?} has no terminal"),
            )),
        }
    }

    pub(super) fn copy_file(&mut self, c: &CopyFileChunk) -> Result<()> {
        if !c.path.starts_with('/') || c.path.split('/').any(|p| p == "..") {
            return Err(status(
                "CopyFile",
                Code::INVALID_ARGUMENT,
                format!("Refusing path {:?}", c.path),
            ));
        }
        let entry = self
            .partial
            .entry(c.path.clone())
            .or_insert_with(|| (c.file_size, Vec::new(), c.file_mode));
        if c.offset == 0 {
            *entry = (c.file_size, Vec::new(), c.file_mode);
        }
        let end = c.offset as usize + c.data.len();
        if entry.1.len() < end {
            entry.1.resize(end, 0);
        }
        entry.1[c.offset as usize..end].copy_from_slice(&c.data);
        if entry.1.len() as u64 >= entry.0 {
            if let Some((_, bytes, mode)) = self.partial.remove(&c.path) {
                self.files.insert(c.path.clone(), (bytes, mode));
            }
        }
        Ok(())
    }

    pub(super) fn read_file(&self, path: &str, offset: u64, len: u32) -> Result<FileChunk> {
        let (bytes, mode) = self
            .files
            .get(path)
            .ok_or_else(|| status("ReadFile", Code::NOT_FOUND, format!("No file {path:?}")))?;
        let start = (offset as usize).min(bytes.len());
        let end = (start + len as usize).min(bytes.len());
        Ok(FileChunk {
            data: bytes[start..end].to_vec(),
            file_size: bytes.len() as u64,
            file_mode: *mode,
        })
    }

    pub(super) fn add_storage(&mut self, s: &Storage) -> Result<()> {
        if self.storages.contains_key(&s.mount_point) {
            return Err(status(
                "AddStorage",
                Code::ALREADY_EXISTS,
                format!("{} is mounted", s.mount_point),
            ));
        }
        self.storages.insert(s.mount_point.clone(), s.clone());
        Ok(())
    }

    pub(super) fn remove_storage(&mut self, mount_point: &str) -> Result<()> {
        self.storages
            .remove(mount_point)
            .map(|_| ())
            .ok_or_else(|| {
                status(
                    "RemoveStorage",
                    Code::NOT_FOUND,
                    format!("Nothing mounted at {mount_point}"),
                )
            })
    }
}
