//! Each container's cgroup (v2): what `StatsContainer` and `ListContainerPids` read, and how
//! `RemoveContainer` kills everything the container started (`cgroup.kill`).
//!
//! The groups are `/sys/fs/cgroup/vmfactory/<id>`; cgroup2 is mounted there if the guest has
//! not, and the cpu, memory and pids controllers are enabled down to them.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tracing::debug;

use vmfactory_agent::ContainerStats;

use super::sysfs::GuestPaths;
use crate::error::{Error, Result};

/// Controllers the containers' groups get.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// One container's cgroup.
#[derive(Debug, Clone)]
pub(super) struct Cgroup {
    dir: PathBuf,
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::io("write", path.display(), e))
}

/// Mounts cgroup2 under `paths.sys` if needed and enables the controllers for `vmfactory/`.
fn parent(paths: &GuestPaths) -> Result<PathBuf> {
    let root = paths.sys.join("fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        fs::create_dir_all(&root).map_err(|e| Error::io("create", root.display(), e))?;
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        mount(Some("cgroup2"), &root, Some("cgroup2"), flags, None::<&str>)
            .map_err(|e| Error::sys("mount cgroup2 on", root.display(), e))?;
    }
    let parent = root.join("vmfactory");
    for dir in [&root, &parent] {
        if dir == &parent {
            fs::create_dir_all(dir).map_err(|e| Error::io("create", dir.display(), e))?;
        }
        // One at a time: a controller the kernel lacks must not stop the others.
        for c in CONTROLLERS {
            if let Err(e) = write(&dir.join("cgroup.subtree_control"), &format!("+{c}")) {
                debug!(controller = c, error = %e, "controller not enabled");
            }
        }
    }
    Ok(parent)
}

impl Cgroup {
    /// Creates the group of container `id`.
    pub(super) fn create(paths: &GuestPaths, id: &str) -> Result<Cgroup> {
        let dir = parent(paths)?.join(id);
        fs::create_dir(&dir).map_err(|e| Error::io("create", dir.display(), e))?;
        Ok(Cgroup { dir })
    }

    /// `cgroup.procs`, open for a child to write itself into.
    pub(super) fn procs_fd(&self) -> Result<OwnedFd> {
        let path = self.dir.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map(OwnedFd::from)
            .map_err(|e| Error::io("open", path.display(), e))
    }

    fn read(&self, name: &str) -> Result<String> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(|e| Error::io("read", path.display(), e))
    }

    /// The pids of every process in the group.
    pub(super) fn pids(&self) -> Result<Vec<u32>> {
        Ok(self
            .read("cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Sends `sig` to every process of the group (SIGKILL through `cgroup.kill`, which also
    /// catches processes forked meanwhile).
    pub(super) fn signal(&self, sig: Signal) -> Result<()> {
        if sig == Signal::SIGKILL && write(&self.dir.join("cgroup.kill"), "1").is_ok() {
            return Ok(());
        }
        for pid in self.pids()? {
            let pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
            match kill(pid, sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(Error::sys("signal", pid, e)),
            }
        }
        Ok(())
    }

    fn populated(&self) -> Result<bool> {
        Ok(self
            .read("cgroup.events")?
            .lines()
            .any(|l| l.trim() == "populated 1"))
    }

    /// Kills everything in the group, waits until it is empty (at most `timeout`, if any) and
    /// removes it. Blocking.
    pub(super) fn destroy(&self, timeout: Option<Duration>) -> Result<()> {
        if !self.dir.exists() {
            return Ok(());
        }
        self.signal(Signal::SIGKILL)?;
        let t0 = Instant::now();
        // The kernel says when the group empties only through inotify on cgroup.events; the
        // processes are SIGKILLed, so a short poll ends within milliseconds.
        while self.populated()? {
            if timeout.is_some_and(|t| t0.elapsed() >= t) {
                return Err(Error::WaitTimeout {
                    what: format!("the processes of {} to die", self.dir.display()),
                    timeout: timeout.unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        fs::remove_dir(&self.dir).map_err(|e| Error::io("remove", self.dir.display(), e))
    }

    /// The group's figures; a controller the kernel lacks reads as zero.
    pub(super) fn stats(&self) -> Result<ContainerStats> {
        let num = |name: &str| -> u64 {
            self.read(name)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let usage_usec = self
            .read("cpu.stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let limit = match self.read("memory.max").ok().as_deref().map(str::trim) {
            Some("max") | None => u64::MAX,
            Some(n) => n.parse().unwrap_or(u64::MAX),
        };
        Ok(ContainerStats {
            cpu_usage_ns: usage_usec.saturating_mul(1000),
            memory_usage_bytes: num("memory.current"),
            memory_limit_bytes: limit,
            pids: num("pids.current"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_groups_figures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cg = Cgroup {
            dir: dir.path().to_owned(),
        };
        fs::write(
            dir.path().join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\n",
        )
        .expect("w");
        fs::write(dir.path().join("memory.current"), "4096\n").expect("w");
        fs::write(dir.path().join("memory.max"), "max\n").expect("w");
        fs::write(dir.path().join("pids.current"), "3\n").expect("w");
        fs::write(dir.path().join("cgroup.procs"), "12\n13\n").expect("w");
        let st = cg.stats().expect("stats");
        assert_eq!(
            st,
            ContainerStats {
                cpu_usage_ns: 1_500_000,
                memory_usage_bytes: 4096,
                memory_limit_bytes: u64::MAX,
                pids: 3,
            }
        );
        fs::write(dir.path().join("memory.max"), "1048576\n").expect("w");
        assert_eq!(cg.stats().expect("stats").memory_limit_bytes, 1 << 20);
        assert_eq!(cg.pids().expect("pids"), [12, 13]);
    }
}
