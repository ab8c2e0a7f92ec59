//! OCI containers in the guest (Kata's `CreateContainer` family).
//!
//! A container lives under `/run/vmfactory/containers/<id>/`: its storages (the first is the
//! read-only image, mounted by the storage code), `scratch` (a tmpfs holding the overlay's
//! upper and work directories) and `rootfs` (the overlay). Its init is cloned into new mount,
//! PID, UTS and IPC namespaces and a cgroup of its own (see `nsexec.rs`), sets up its mounts
//! and root and parks until `StartContainer`. Its streams are in the process table under
//! (container id, container id) from creation on; the init ending does not remove the
//! container: `RemoveContainer` kills what is left and unmounts everything.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::pty::openpty;
use nix::unistd::Pid;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use vmfactory_agent::{ContainerSpec, ContainerStats, ProcessSpec, Storage};

use super::cgroup::Cgroup;
use super::nsexec::{self, ChildStdio, JoinPlan};
use super::ocispec;
use super::process::{parse_signal, winsize, Processes, Started};
use super::reaper::Reaper;
use super::storage::Storages;
use super::sysfs::GuestPaths;
use crate::error::{Error, Result};

/// Where containers live in the guest.
pub const CONTAINERS_DIR: &str = "run/vmfactory/containers";

#[derive(Debug)]
struct Container {
    dir: PathBuf,
    /// Storage mount points, as given to [`Storages`].
    storages: Vec<String>,
    cgroup: Cgroup,
    /// The write end that lets the init exec; taken by `StartContainer`.
    start: Mutex<Option<(OwnedFd, OwnedFd)>>,
}

/// The agent's containers.
#[derive(Debug, Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// Creations and removals, one at a time (they mount and unmount).
    ops: AsyncMutex<()>,
}

/// The agent's pieces a container call uses.
#[derive(Debug, Clone, Copy)]
pub(super) struct Env<'a> {
    pub(super) paths: &'a GuestPaths,
    pub(super) procs: &'a Processes,
    pub(super) storages: &'a Storages,
    pub(super) device_timeout: Duration,
}

/// The parent's and the child's ends of a process's streams.
struct Stdio {
    child: Vec<OwnedFd>,
    started: Started,
}

/// Pipes, or a terminal, for a process about to be cloned (under the reaper's lock).
fn stdio(terminal: bool, size: Option<(u32, u32)>, pid_placeholder: Pid) -> Result<Stdio> {
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::sys("create", "a pipe", e))
    };
    if terminal {
        let ws = size.map(|(r, c)| winsize(r, c));
        let pty = openpty(ws.as_ref(), None).map_err(|e| Error::sys("open", "a pty", e))?;
        let set_cloexec = |fd: &OwnedFd| {
            nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| Error::sys("set close-on-exec on", "a pty", e))
        };
        set_cloexec(&pty.master)?;
        set_cloexec(&pty.slave)?;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| Error::io("duplicate", "pty", e));
        Ok(Stdio {
            child: vec![pty.slave],
            started: Started {
                pid: pid_placeholder,
                stdin: dup(&pty.master)?,
                stdout: dup(&pty.master)?,
                stderr: None,
                tty: Some(pty.master),
            },
        })
    } else {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        Ok(Stdio {
            child: vec![in_r, out_w, err_w],
            started: Started {
                pid: pid_placeholder,
                stdin: in_w,
                stdout: out_r,
                stderr: Some(err_r),
                tty: None,
            },
        })
    }
}

impl Stdio {
    fn child_fds(&self) -> ChildStdio {
        let fd = |i: usize| self.child[i.min(self.child.len() - 1)].as_raw_fd();
        ChildStdio {
            fds: [fd(0), fd(1), fd(2)],
        }
    }
}

/// Runs blocking container work off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("run", "container task", std::io::Error::other(e)))?
}

fn unmount(path: &Path) {
    if let Err(e) = umount2(path, MntFlags::empty()) {
        if e == nix::errno::Errno::EINVAL || e == nix::errno::Errno::ENOENT {
            return; // Not mounted.
        }
        warn!(path = %path.display(), error = %e, "unmount failed; detaching");
        let _ = umount2(path, MntFlags::MNT_DETACH);
    }
}

/// Makes `dest` (inside `rootfs`, already checked) exist as a directory, or an empty file
/// for a file bind mount, refusing to walk through a symlink (that could lead outside).
fn make_target(rootfs: &Path, dest: &str, file: bool) -> Result<()> {
    let mut at = rootfs.to_owned();
    let parts: Vec<&str> = dest.split('/').filter(|c| !c.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        at.push(part);
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Invalid(format!(
                    "mount destination {dest:?} goes through a symlink in the image"
                )))
            }
            Ok(_) => {}
            Err(_) if file && i + 1 == parts.len() => {
                fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o644)
                    .open(&at)
                    .map_err(|e| Error::io("create", at.display(), e))?;
            }
            Err(_) => fs::create_dir(&at).map_err(|e| Error::io("create", at.display(), e))?,
        }
    }
    Ok(())
}

impl Containers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NoContainer(id.to_owned()))
    }

    /// `CreateContainer`: mounts, the cgroup and the parked init.
    pub(super) async fn create(
        &self,
        env: Env<'_>,
        id: &str,
        exec_id: &str,
        mut storages: Vec<Storage>,
        spec: ContainerSpec,
    ) -> Result<()> {
        ocispec::check_id(id)?;
        if !exec_id.is_empty() && exec_id != id {
            return Err(Error::Invalid(format!(
                "the init's exec_id {exec_id:?} is not the container id"
            )));
        }
        if storages.is_empty() {
            return Err(Error::Invalid("no storage for the container's root".into()));
        }
        let _op = self.ops.lock().await;
        if self.lock().contains_key(id) {
            return Err(Error::ContainerExists(id.to_owned()));
        }
        let rel_dir = format!("{CONTAINERS_DIR}/{id}");
        let dir = env.paths.root.join(&rel_dir);
        let rootfs = dir.join("rootfs");
        // Every refusal before anything is mounted.
        let flags = ocispec::namespaces(&spec)?;
        let (plan, file_targets) = ocispec::init_plan(&spec, &rootfs)?;
        for (i, s) in storages.iter_mut().enumerate() {
            if s.mount_point.is_empty() {
                s.mount_point = format!("/{rel_dir}/storage-{i}");
            }
        }
        if dir.exists() {
            return Err(Error::ContainerExists(id.to_owned()));
        }
        let mut made = Made {
            dir: dir.clone(),
            ..Default::default()
        };
        let res = self
            .build(
                env,
                id,
                &storages,
                &spec,
                &mut made,
                flags,
                plan,
                &file_targets,
            )
            .await;
        match res {
            Ok(c) => {
                self.lock().insert(id.to_owned(), Arc::new(c));
                info!(container_id = id, "container created");
                Ok(())
            }
            Err(e) => {
                made.undo(env).await;
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        env: Env<'_>,
        id: &str,
        storages: &[Storage],
        spec: &ContainerSpec,
        made: &mut Made,
        flags: nix::sched::CloneFlags,
        plan: nsexec::InitPlan,
        file_targets: &[bool],
    ) -> Result<Container> {
        let dir = made.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", dir.display(), e))?;
        made.dir_made = true;
        for s in storages {
            env.storages
                .add(env.paths, s.clone(), env.device_timeout)
                .await?;
            made.storages.push(s.mount_point.clone());
        }
        let lowers: Vec<String> = storages
            .iter()
            .map(|s| {
                env.paths
                    .root
                    .join(s.mount_point.trim_start_matches('/'))
                    .display()
                    .to_string()
            })
            .collect();
        let (d, mounts) = (dir.clone(), spec.mounts.clone());
        let targets = file_targets.to_vec();
        let mounted = blocking(move || {
            let mut mounted = Vec::new();
            let scratch = d.join("scratch");
            fs::create_dir_all(&scratch).map_err(|e| Error::io("create", scratch.display(), e))?;
            mount(
                Some("tmpfs"),
                &scratch,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("mode=755"),
            )
            .map_err(|e| Error::sys("mount tmpfs on", scratch.display(), e))?;
            mounted.push(scratch.clone());
            let rootfs = d.join("rootfs");
            let result = (|| {
                for sub in ["upper", "work"] {
                    let p = scratch.join(sub);
                    fs::create_dir(&p).map_err(|e| Error::io("create", p.display(), e))?;
                }
                fs::create_dir_all(&rootfs)
                    .map_err(|e| Error::io("create", rootfs.display(), e))?;
                let data = format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lowers.join(":"),
                    scratch.join("upper").display(),
                    scratch.join("work").display()
                );
                mount(
                    Some("overlay"),
                    &rootfs,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(data.as_str()),
                )
                .map_err(|e| Error::sys("mount the overlay on", rootfs.display(), e))
            })();
            if result.is_ok() {
                mounted.push(rootfs.clone());
            }
            // The mount points of the spec's mounts, in the overlay's upper (tmpfs) layer.
            let targets = result.and_then(|()| {
                for (m, file) in mounts.iter().zip(targets) {
                    make_target(&rootfs, &m.destination, file)?;
                }
                Ok(())
            });
            Ok((mounted, targets))
        })
        .await?;
        made.mounts = mounted.0;
        mounted.1?;
        let cgroup = Cgroup::create(env.paths, id)?;
        made.cgroup = Some(cgroup.clone());
        let procs_fd = cgroup.procs_fd()?;
        let slot: Arc<Mutex<Option<(Pid, OwnedFd, OwnedFd)>>> = Arc::default();
        let (terminal, size) = (spec.process.terminal, spec.process.console_size);
        let slot2 = slot.clone();
        let res = env
            .procs
            .add(id, id, &spec.process.args, terminal, true, move |tx| {
                let (init, mut started) = Reaper::global().with_watcher(|w| {
                    let io = stdio(terminal, size, Pid::from_raw(0))?;
                    let init = nsexec::clone_init(&plan, flags, io.child_fds(), &procs_fd)?;
                    w.watch(init.pid, tx)
                        .map_err(|e| Error::io("watch", "the container's init", e))?;
                    Ok::<_, Error>((init, io.started))
                })?;
                started.pid = init.pid;
                let ready = nsexec::wait_ready(&init);
                *slot2.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((init.pid, init.start, init.status));
                ready.map(|()| started)
            })
            .await;
        let parked = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        res?;
        let (_, start, status) = parked.ok_or_else(|| {
            Error::io(
                "create",
                "the container's init",
                std::io::Error::other("no init"),
            )
        })?;
        made.keep = true;
        Ok(Container {
            dir,
            storages: made.storages.clone(),
            cgroup,
            start: Mutex::new(Some((start, status))),
        })
    }

    /// `StartContainer`: lets the init exec; fails if the exec does.
    pub(super) async fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let (start, status) = c
            .start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| Error::NotPossible {
                exec_id: id.to_owned(),
                what: "the container was started already",
            })?;
        blocking(move || {
            nix::unistd::write(&start, &[1]).map_err(|e| Error::sys("start", "the init", e))?;
            drop(start);
            nsexec::wait_exec(&status)
        })
        .await?;
        info!(container_id = id, "container started");
        Ok(())
    }

    /// `ExecProcess` in container `id`: joins its init's namespaces and cgroup.
    pub(super) async fn exec(
        &self,
        procs: &Processes,
        paths: &GuestPaths,
        id: &str,
        exec_id: &str,
        spec: ProcessSpec,
    ) -> Result<()> {
        let c = self.get(id)?;
        let init = procs.pid(id, id)?.ok_or_else(|| Error::NotPossible {
            exec_id: exec_id.to_owned(),
            what: "the container's init has ended",
        })?;
        let plan = ocispec::exec_plan(&spec)?;
        let proc_dir = paths.proc.join(init.as_raw().to_string());
        let open = |rel: &str, flags: libc::c_int| -> Result<OwnedFd> {
            let p = proc_dir.join(rel);
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(&p)
                .map(OwnedFd::from)
                .map_err(|e| Error::io("open", p.display(), e))
        };
        let join = JoinPlan {
            namespaces: ["ns/ipc", "ns/uts", "ns/pid", "ns/mnt"]
                .iter()
                .map(|n| open(n, 0))
                .collect::<Result<_>>()?,
            root: open("root", libc::O_DIRECTORY)?,
            exec: plan,
        };
        let procs_fd = c.cgroup.procs_fd()?;
        let (terminal, size) = (spec.terminal, spec.console_size);
        procs
            .add(id, exec_id, &spec.args, terminal, false, move |tx| {
                let (joined, mut started) = Reaper::global().with_watcher(|w| {
                    let io = stdio(terminal, size, Pid::from_raw(0))?;
                    let joined = nsexec::clone_into(&join, io.child_fds(), &procs_fd)?;
                    w.watch(joined.pid, tx)
                        .map_err(|e| Error::io("watch", "the process", e))?;
                    Ok::<_, Error>((joined, io.started))
                })?;
                started.pid = joined.pid;
                nsexec::wait_exec(&joined.status)?;
                Ok(started)
            })
            .await
    }

    /// `SignalProcess` with an empty exec id: every process of the container.
    pub(super) fn signal_all(&self, id: &str, signal: u32) -> Result<()> {
        let sig = parse_signal(signal)?;
        // The init joins the group before anything else: the group is all of the container.
        self.get(id)?.cgroup.signal(sig)
    }

    /// `StatsContainer`.
    pub(super) async fn stats(&self, id: &str) -> Result<ContainerStats> {
        let c = self.get(id)?;
        blocking(move || c.cgroup.stats()).await
    }

    /// `ListContainerPids`.
    pub(super) async fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        blocking(move || c.cgroup.pids()).await
    }

    /// `RemoveContainer`: kills, waits (up to `timeout`), unmounts, forgets.
    pub(super) async fn remove(
        &self,
        env: Env<'_>,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let _op = self.ops.lock().await;
        let c = self.get(id)?;
        let made = Made {
            dir: c.dir.clone(),
            dir_made: true,
            storages: c.storages.clone(),
            mounts: vec![c.dir.join("scratch"), c.dir.join("rootfs")],
            cgroup: Some(c.cgroup.clone()),
            keep: false,
        };
        let cg = c.cgroup.clone();
        blocking(move || cg.destroy(timeout)).await?;
        made.undo(env).await;
        env.procs.forget_container(id);
        self.lock().remove(id);
        info!(container_id = id, "container removed");
        Ok(())
    }

    /// Ids of the containers.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// What a creation made so far, undone in reverse when it fails (and by removal).
#[derive(Debug, Default)]
struct Made {
    dir: PathBuf,
    dir_made: bool,
    storages: Vec<String>,
    /// scratch, then rootfs.
    mounts: Vec<PathBuf>,
    /// Destroying it kills every process the container has (the init joins it first).
    cgroup: Option<Cgroup>,
    /// Set once the container is complete: nothing to undo.
    keep: bool,
}

impl Made {
    async fn undo(self, env: Env<'_>) {
        if self.keep {
            return;
        }
        let Made {
            dir,
            dir_made,
            storages,
            mounts,
            cgroup,
            ..
        } = self;
        let res = blocking(move || {
            if let Some(cg) = cgroup {
                if let Err(e) = cg.destroy(Some(Duration::from_secs(10))) {
                    warn!(error = %e, "cgroup left behind");
                }
            }
            for m in mounts.iter().rev() {
                unmount(m);
            }
            Ok(())
        })
        .await;
        if let Err(e) = res {
            warn!(error = %e, "cleanup failed");
        }
        for mp in storages.iter().rev() {
            if let Err(e) = env.storages.remove(env.paths, mp).await {
                warn!(mount_point = %mp, error = %e, "storage left mounted");
            }
        }
        if dir_made {
            // Directory by directory, never recursively: one still mounted stays, with its
            // files.
            let subdirs = fs::read_dir(&dir).into_iter().flatten().flatten();
            for sub in subdirs {
                let _ = fs::remove_dir(sub.path());
            }
            if let Err(e) = fs::remove_dir(&dir) {
                warn!(dir = %dir.display(), error = %e, "container directory left behind");
            }
        }
    }
}
