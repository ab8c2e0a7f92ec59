//! Reading and writing the guest's sysfs and procfs: CPUs, memory blocks, uptime.
//!
//! All functions are synchronous file I/O on small pseudo files; the server calls them from
//! `spawn_blocking`. The roots are injectable ([`GuestPaths`]) so tests use a fake tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

use vmfactory_agent::types::Resources;

use crate::error::{Error, Result};

/// Roots of the pseudo file systems the guest server reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPaths {
    /// The root file system processes, copied files and mounts live in (`/`).
    pub root: PathBuf,
    /// sysfs mount point (`/sys`).
    pub sys: PathBuf,
    /// procfs mount point (`/proc`).
    pub proc: PathBuf,
    /// devtmpfs mount point (`/dev`).
    pub dev: PathBuf,
}

impl Default for GuestPaths {
    fn default() -> Self {
        GuestPaths {
            root: PathBuf::from("/"),
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            dev: PathBuf::from("/dev"),
        }
    }
}

impl GuestPaths {
    /// All roots under one directory (`<root>`, `<root>/sys`, `<root>/proc`, `<root>/dev`).
    pub fn under(root: &Path) -> Self {
        GuestPaths {
            root: root.to_owned(),
            sys: root.join("sys"),
            proc: root.join("proc"),
            dev: root.join("dev"),
        }
    }

    fn cpu_dir(&self) -> PathBuf {
        self.sys.join("devices/system/cpu")
    }

    fn memory_dir(&self) -> PathBuf {
        self.sys.join("devices/system/memory")
    }

    /// `/sys/class/virtio-ports`.
    pub fn virtio_ports_dir(&self) -> PathBuf {
        self.sys.join("class/virtio-ports")
    }
}

fn read_trimmed(path: &Path) -> Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| Error::io("read", path.display(), e))
}

fn write_str(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::io("write", path.display(), e))
}

/// Lists `<dir>/<prefix>N` entries as (N, path), sorted by N.
fn numbered_entries(dir: &Path, prefix: &str) -> Result<Vec<(u32, PathBuf)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir.display(), e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir.display(), e))?;
        let name = entry.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        out.push((n, entry.path()));
    }
    out.sort_by_key(|(n, _)| *n);
    Ok(out)
}

/// Online state of one CPU: a CPU without an `online` file (the boot CPU) is online.
fn cpu_online(cpu_dir: &Path) -> Result<bool> {
    let file = cpu_dir.join("online");
    match fs::read_to_string(&file) {
        Ok(s) => Ok(s.trim() == "1"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::io("read", file.display(), e)),
    }
}

/// Onlines up to `max` offline CPUs; returns how many were onlined.
pub fn online_cpus(paths: &GuestPaths, max: u32) -> Result<u32> {
    let mut done = 0;
    for (n, dir) in numbered_entries(&paths.cpu_dir(), "cpu")? {
        if done >= max {
            break;
        }
        if cpu_online(&dir)? {
            continue;
        }
        match write_str(&dir.join("online"), "1") {
            Ok(()) => {
                debug!(cpu = n, "cpu onlined");
                done += 1;
            }
            Err(e) => warn!(cpu = n, error = %e, "cannot online cpu"),
        }
    }
    Ok(done)
}

/// Onlines every offline memory block; returns how many were onlined.
pub fn online_memory(paths: &GuestPaths) -> Result<u32> {
    let mut done = 0;
    for (n, dir) in numbered_entries(&paths.memory_dir(), "memory")? {
        let state = dir.join("state");
        if read_trimmed(&state)? != "offline" {
            continue;
        }
        match write_str(&state, "online") {
            Ok(()) => {
                debug!(block = n, "memory block onlined");
                done += 1;
            }
            Err(e) => warn!(block = n, error = %e, "cannot online memory block"),
        }
    }
    Ok(done)
}

/// Memory block size from `block_size_bytes` (hexadecimal, no `0x`); 0 when the guest has no
/// memory hotplug support (the file is missing).
pub fn memory_block_size(paths: &GuestPaths) -> Result<u64> {
    let file = paths.memory_dir().join("block_size_bytes");
    let text = match fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("read", file.display(), e)),
    };
    parse_hex(text.trim()).ok_or_else(|| {
        Error::io(
            "parse",
            file.display(),
            io::Error::new(io::ErrorKind::InvalidData, format!("not hex: {text:?}")),
        )
    })
}

fn parse_hex(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(s, 16).ok()
}

/// `MemTotal` of `<proc>/meminfo` in KiB.
pub fn mem_total_kb(paths: &GuestPaths) -> Result<u64> {
    let file = paths.proc.join("meminfo");
    let text = fs::read_to_string(&file).map_err(|e| Error::io("read", file.display(), e))?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| {
            Error::io(
                "parse",
                file.display(),
                io::Error::new(io::ErrorKind::InvalidData, "no MemTotal line"),
            )
        })
}

/// The guest's `/proc/uptime` (first field).
pub fn system_uptime(paths: &GuestPaths) -> Result<Duration> {
    let file = paths.proc.join("uptime");
    let text = read_trimmed(&file)?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            Error::io(
                "parse",
                file.display(),
                io::Error::new(io::ErrorKind::InvalidData, format!("bad uptime {text:?}")),
            )
        })
}

/// Online and offline CPUs, memory blocks and totals.
pub fn resources(paths: &GuestPaths) -> Result<Resources> {
    let mut res = Resources::default();
    for (n, dir) in numbered_entries(&paths.cpu_dir(), "cpu")? {
        if cpu_online(&dir)? {
            res.online_cpus.push(n);
        } else {
            res.offline_cpus.push(n);
        }
    }
    for (_, dir) in numbered_entries(&paths.memory_dir(), "memory")? {
        match read_trimmed(&dir.join("state"))?.as_str() {
            "online" => res.online_memory_blocks += 1,
            _ => res.offline_memory_blocks += 1,
        }
    }
    res.mem_total_kb = mem_total_kb(paths)?;
    res.memory_block_size_bytes = memory_block_size(paths)?;
    Ok(res)
}

/// Finds the device of the virtio port named `name`: scans `<sys>/class/virtio-ports/*/name` and
/// returns `<dev>/<entry>` (e.g. `/dev/vport0p1`).
pub fn find_virtio_port(paths: &GuestPaths, name: &str) -> Result<PathBuf> {
    let dir = paths.virtio_ports_dir();
    let not_found = || Error::PortNotFound {
        name: name.to_owned(),
        dir: dir.clone(),
    };
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
        Err(e) => return Err(Error::io("list", dir.display(), e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir.display(), e))?;
        // A port whose name the host has not sent yet has an empty or unreadable name file.
        let Ok(port_name) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim() == name {
            return Ok(paths.dev.join(entry.file_name()));
        }
    }
    Err(not_found())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a fake guest tree: `cpus` = online flags (cpu0 without `online` file), `blocks`
    /// = memory block states.
    pub(crate) fn fake_tree(root: &Path, cpus: &[bool], blocks: &[&str]) -> GuestPaths {
        let paths = GuestPaths::under(root);
        for (i, online) in cpus.iter().enumerate() {
            let dir = paths.cpu_dir().join(format!("cpu{i}"));
            fs::create_dir_all(&dir).expect("mkdir cpu");
            if i > 0 {
                fs::write(dir.join("online"), if *online { "1\n" } else { "0\n" }).expect("w");
            }
        }
        fs::create_dir_all(paths.cpu_dir().join("cpufreq")).expect("mkdir cpufreq");
        for (i, state) in blocks.iter().enumerate() {
            let dir = paths.memory_dir().join(format!("memory{i}"));
            fs::create_dir_all(&dir).expect("mkdir mem");
            fs::write(dir.join("state"), format!("{state}\n")).expect("w");
        }
        fs::create_dir_all(paths.memory_dir()).expect("mkdir memory");
        fs::write(paths.memory_dir().join("block_size_bytes"), "8000000\n").expect("w");
        fs::create_dir_all(&paths.proc).expect("mkdir proc");
        fs::write(
            paths.proc.join("meminfo"),
            "MemTotal:         245760 kB\nMemFree: 1 kB\n",
        )
        .expect("w");
        fs::write(paths.proc.join("uptime"), "12.50 3.00\n").expect("w");
        fs::create_dir_all(&paths.dev).expect("mkdir dev");
        paths
    }

    #[test]
    fn resources_of_fake_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = fake_tree(
            dir.path(),
            &[true, true, false, false],
            &["online", "offline"],
        );
        let res = resources(&paths).expect("resources");
        assert_eq!(res.online_cpus, vec![0, 1]);
        assert_eq!(res.offline_cpus, vec![2, 3]);
        assert_eq!(res.online_memory_blocks, 1);
        assert_eq!(res.offline_memory_blocks, 1);
        assert_eq!(res.mem_total_kb, 245_760);
        assert_eq!(res.memory_block_size_bytes, 128 << 20);
        assert_eq!(
            system_uptime(&paths).expect("uptime"),
            Duration::from_millis(12_500)
        );
    }

    #[test]
    fn online_cpus_respects_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = fake_tree(dir.path(), &[true, false, false, false], &[]);
        assert_eq!(online_cpus(&paths, 2).expect("online"), 2);
        assert_eq!(resources(&paths).expect("res").online_cpus, vec![0, 1, 2]);
        assert_eq!(online_cpus(&paths, 5).expect("online"), 1);
        assert_eq!(online_cpus(&paths, 5).expect("online"), 0);
    }

    #[test]
    fn online_memory_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = fake_tree(dir.path(), &[true], &["online", "offline", "offline"]);
        assert_eq!(online_memory(&paths).expect("online"), 2);
        assert_eq!(resources(&paths).expect("res").online_memory_blocks, 3);
    }

    #[test]
    fn block_size_missing_is_zero_and_garbage_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(dir.path());
        assert_eq!(memory_block_size(&paths).expect("size"), 0);
        fs::create_dir_all(paths.memory_dir()).expect("mkdir");
        fs::write(paths.memory_dir().join("block_size_bytes"), "zz\n").expect("w");
        assert!(matches!(memory_block_size(&paths), Err(Error::Io { .. })));
        assert_eq!(parse_hex("0x10"), Some(16));
    }

    #[test]
    fn finds_virtio_port_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(dir.path());
        let ports = paths.virtio_ports_dir();
        for (port, name) in [("vport0p0", ""), ("vport0p1", "agent.channel.0\n")] {
            fs::create_dir_all(ports.join(port)).expect("mkdir");
            fs::write(ports.join(port).join("name"), name).expect("w");
        }
        assert_eq!(
            find_virtio_port(&paths, "agent.channel.0").expect("port"),
            paths.dev.join("vport0p1")
        );
        assert!(matches!(
            find_virtio_port(&paths, "other"),
            Err(Error::PortNotFound { .. })
        ));
    }
}
