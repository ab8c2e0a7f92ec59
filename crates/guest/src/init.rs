//! The PID 1 duties of the guest agent: mount the pseudo file systems, load kernel modules, make
//! sure the console is stdio. Reaping orphans is the server's reaper's (`server::reaper`),
//! which also hands the agent's own processes their exit statuses.
//!
//! Everything here is synchronous and runs before the tokio runtime starts.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::console::{console_line, source_chain};

/// Where [`load_modules`] finds its modules by default.
pub const MODULES_DIR: &str = "/lib/modules";

/// What a PID 1 duty can fail at. [`init_guest`] prints it on the console and goes on.
#[derive(Debug, Error)]
pub enum InitError {
    /// A file operation failed (a mount point, the module list, a module file).
    #[error("Failed to {op} {}", path.display())]
    Io {
        /// What was being done ("create", "read", "open").
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A system call failed (mount, dup2, finit_module).
    #[error("Failed to {op} {}", path.display())]
    Sys {
        /// What was being done ("mount", "load module", ...).
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
}

impl InitError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        InitError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }

    fn sys(op: &'static str, path: &Path, source: nix::Error) -> Self {
        InitError::Sys {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// One file system PID 1 mounts.
struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    options: Option<&'static str>,
}

/// What PID 1 mounts, in order (`/dev` before `/dev/pts`). devpts is a private instance whose
/// `ptmx` anyone may open and whose terminals belong to group `tty` (5, as in `/etc/group`);
/// `/tmp` and `/run` are tmpfs so the initramfs root stays what the template captured.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        options: None,
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        options: None,
    },
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        options: None,
    },
    Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        options: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        options: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        options: Some("mode=0755"),
    },
];

/// Performs all PID 1 duties in order: mounts, `/dev/ptmx`, console, modules. Failures are
/// logged and do not stop the remaining steps; a guest with a partial init may still be able
/// to serve.
pub fn init_guest() {
    for m in MOUNTS {
        if let Err(e) = mount_fs(m.fstype, Path::new(m.target), m.fstype, m.flags, m.options) {
            report(&e, "mount failed");
        }
    }
    if let Err(e) = ensure_ptmx(Path::new("/dev")) {
        report(&e, "no /dev/ptmx");
    }
    if let Err(e) = ensure_console_stdio(Path::new("/dev/console")) {
        warn!(error = %e, "no console");
    }
    let loaded = load_modules(Path::new(MODULES_DIR));
    info!(loaded, "guest init done");
}

/// Logs a failed duty and prints it on the console.
fn report(e: &InitError, what: &str) {
    warn!(error = %e, "{what}");
    console_line(&format!("vmfactory-agent: {e}: {}", source_chain(e)));
}

/// Mounts `fstype` at `target` with `flags` and `options`, creating the directory first; an
/// already mounted target (`EBUSY`) counts as success.
pub fn mount_fs(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    options: Option<&str>,
) -> Result<(), InitError> {
    fs::create_dir_all(target).map_err(|e| InitError::io("create", target, e))?;
    match mount(Some(source), target, Some(fstype), flags, options) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(InitError::sys("mount", target, e)),
    }
}

/// Makes `<dev>/ptmx` open a terminal of the devpts at `<dev>/pts`: devtmpfs normally has the
/// node already (5:2, which the kernel resolves to the `pts` beside it); where it does not, a
/// symlink to `pts/ptmx` does the same.
pub fn ensure_ptmx(dev: &Path) -> Result<(), InitError> {
    let ptmx = dev.join("ptmx");
    if fs::symlink_metadata(&ptmx).is_ok() {
        return Ok(());
    }
    std::os::unix::fs::symlink("pts/ptmx", &ptmx).map_err(|e| InitError::io("create", &ptmx, e))
}

/// Makes sure fds 0, 1 and 2 are open, pointing them at `console` if they are not (the kernel
/// leaves them closed when the initramfs has no `/dev/console` node).
pub fn ensure_console_stdio(console: &Path) -> Result<(), InitError> {
    let closed: Vec<i32> = (0..3)
        .filter(|fd| fcntl(*fd, FcntlArg::F_GETFD) == Err(Errno::EBADF))
        .collect();
    if closed.is_empty() {
        return Ok(());
    }
    let fd = nix::fcntl::open(console, OFlag::O_RDWR | OFlag::O_NOCTTY, Mode::empty())
        .map_err(|e| InitError::sys("open", console, e))?;
    for target in &closed {
        if *target != fd {
            nix::unistd::dup2(fd, *target).map_err(|e| InitError::sys("dup2", console, e))?;
        }
    }
    if fd > 2 {
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Reads `<dir>/load-order` (one module file name per line, `#` comments and blank lines
/// ignored) and returns the module paths in order.
pub fn module_load_order(dir: &Path) -> Result<Vec<PathBuf>, InitError> {
    let list = dir.join("load-order");
    let text = fs::read_to_string(&list).map_err(|e| InitError::io("read", &list, e))?;
    Ok(parse_load_order(dir, &text))
}

fn parse_load_order(dir: &Path, text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|name| {
            let name = if name.ends_with(".ko") {
                name.to_owned()
            } else {
                format!("{name}.ko")
            };
            dir.join(name)
        })
        .collect()
}

/// Loads the modules listed in `<dir>/load-order` with `finit_module`, in order. A module that
/// is already loaded (`EEXIST`) is fine; any other failure is logged and the next module is
/// tried. Returns how many modules were loaded (or already present).
pub fn load_modules(dir: &Path) -> usize {
    let paths = match module_load_order(dir) {
        Ok(paths) => paths,
        Err(e) => {
            debug!(error = %e, "no module list");
            return 0;
        }
    };
    let mut loaded = 0;
    for path in paths {
        match load_module(&path) {
            Ok(()) => loaded += 1,
            Err(e) => {
                warn!(error = %e, "module not loaded");
                console_line(&format!("vmfactory-agent: {e}: {}", source_chain(&e)));
            }
        }
    }
    loaded
}

/// Loads one module file with `finit_module`; `EEXIST` counts as success.
pub fn load_module(path: &Path) -> Result<(), InitError> {
    let file = fs::File::open(path).map_err(|e| InitError::io("open", path, e))?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) => {
            debug!(module = %path.display(), fd = file.as_raw_fd(), "module loaded");
            Ok(())
        }
        Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(InitError::sys("load module", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_skips_comments_and_adds_suffix() {
        let order = parse_load_order(
            Path::new("/lib/modules"),
            "# comment\nvirtio_ring.ko\n\n  virtio \nvsock.ko\n",
        );
        assert_eq!(
            order,
            vec![
                PathBuf::from("/lib/modules/virtio_ring.ko"),
                PathBuf::from("/lib/modules/virtio.ko"),
                PathBuf::from("/lib/modules/vsock.ko"),
            ]
        );
    }

    #[test]
    fn missing_load_order_loads_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(load_modules(dir.path()), 0);
        assert!(matches!(
            module_load_order(dir.path()),
            Err(InitError::Io { .. })
        ));
    }

    #[test]
    fn error_text_names_the_operation_and_path() {
        let err = module_load_order(Path::new("/nonexistent")).expect_err("no list");
        assert_eq!(err.to_string(), "Failed to read /nonexistent/load-order");
    }

    #[test]
    fn failing_module_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("load-order"), "missing.ko\n").expect("write");
        assert_eq!(load_modules(dir.path()), 0);
    }

    #[test]
    fn ptmx_is_linked_when_missing_and_kept_when_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_ptmx(dir.path()).expect("link");
        let link = fs::read_link(dir.path().join("ptmx")).expect("symlink");
        assert_eq!(link, Path::new("pts/ptmx"));
        // A second call (or a devtmpfs node) leaves what is there.
        ensure_ptmx(dir.path()).expect("kept");
        let err = ensure_ptmx(&dir.path().join("missing")).expect_err("no dir");
        assert!(err.to_string().starts_with("Failed to create "));
    }

    #[test]
    fn mounts_put_dev_before_dev_pts() {
        let pos = |t: &str| MOUNTS.iter().position(|m| m.target == t);
        assert!(pos("/dev") < pos("/dev/pts"));
        for m in MOUNTS {
            assert!(
                m.flags.contains(MsFlags::MS_NOSUID),
                "{} allows setuid",
                m.target
            );
        }
    }
}
