//! The VM-fork barrier: what lets the host leave `ReseedRandomDev` out of a clone's `get_vm`.
//!
//! With a VMGenID device, QEMU gives each clone of a template a new generation id and signals
//! it (an ACPI notify) as the clone's state is loaded. A kernel with a VMGenID driver then
//! mixes the id into its input pool and reseeds its CRNG, in a kworker, some time after the
//! resume. Until then the clone's CRNG is its template's, the same in every clone: a process
//! started then would read what its siblings read.
//!
//! So the template VM's agent is armed just before the save ([`ForkBarrier::arm`], the
//! host's `PrepareTemplate`): it opens `/dev/kmsg` at its end and watches it. Every clone
//! resumes with that watch in place, and holds the calls that could let anyone read the
//! CRNG (`SetGuestDateTime`, which `get_vm` makes last; `ExecProcess`; `GetRandom`) until
//! the kernel has logged [`FORK_RESEED_LOG`], which random.c prints right after that reseed.
//! An explicit `ReseedRandomDev` releases the barrier too: the host's entropy makes the clone
//! unique as well.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tracing::{debug, warn};
use vmfactory_agent::types::ForkReseed;

use super::sysfs::GuestPaths;
use crate::error::{Error, Result};

/// What the kernel logs once it reseeded its CRNG from a new VM generation id (random.c's
/// `add_vmfork_randomness`, since 5.18; checked in 6.12.117's image and on its clones).
pub const FORK_RESEED_LOG: &str = "crng reseeded due to virtual machine fork";

/// How long a clone's held calls wait for that reseed. Under TCG the kernel had logged it
/// before the first call arrived in every clone traced; the bound is for a loaded host, and
/// stays under the host's default 10 s call timeout so the error says what was missing.
pub const FORK_RESEED_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the VMGenID driver's bound devices show: a platform driver since 6.10, an ACPI
/// driver from 5.18 to 6.9.
const VMGENID_DRIVER_DIRS: [&str; 2] = ["bus/platform/drivers/vmgenid", "bus/acpi/drivers/vmgenid"];

/// Holds a template clone's randomness-revealing calls until its kernel reseeded itself.
#[derive(Debug)]
pub struct ForkBarrier {
    /// True from [`ForkBarrier::arm`] until the kernel's reseed (or an explicit one).
    held: Arc<watch::Sender<bool>>,
    /// `/dev/kmsg` (or a stand-in).
    kmsg: std::path::PathBuf,
    timeout: Duration,
}

impl ForkBarrier {
    /// An open barrier watching `<dev>/kmsg` once armed.
    pub fn new(paths: &GuestPaths) -> Self {
        Self::with_timeout(paths, FORK_RESEED_TIMEOUT)
    }

    /// As [`ForkBarrier::new`], waiting at most `timeout`.
    pub fn with_timeout(paths: &GuestPaths, timeout: Duration) -> Self {
        Self {
            held: Arc::new(watch::Sender::new(false)),
            kmsg: paths.dev.join("kmsg"),
            timeout,
        }
    }

    /// Arms the barrier if this guest reseeds itself on a VM fork: its VMGenID driver is bound
    /// (under `paths.sys`) and its CRNG is ready (random.c reseeds on a fork only then). Says
    /// which, and why not. Arming twice is arming once.
    pub fn arm(&self, paths: &GuestPaths) -> ForkReseed {
        if *self.held.borrow() {
            return ForkReseed::Active;
        }
        if !vmgenid_bound(&paths.sys) {
            return ForkReseed::Inactive("no VMGenID driver is bound".into());
        }
        if !crng_ready() {
            return ForkReseed::Inactive("the CRNG is not initialised yet".into());
        }
        let kmsg = match open_at_end(&self.kmsg) {
            Ok(f) => f,
            Err(e) => return ForkReseed::Inactive(format!("{e}: {}", io_cause(&e))),
        };
        self.held.send_replace(true);
        tokio::spawn(watch_kmsg(kmsg, self.held.clone()));
        debug!("armed: clones wait for the kernel's VM-fork reseed");
        ForkReseed::Active
    }

    /// Returns once the barrier is open: at once unless armed, else when the kernel has
    /// reseeded (or an explicit reseed released it); [`Error::WaitTimeout`] after the bound.
    pub async fn wait(&self) -> Result<()> {
        let mut held = self.held.subscribe();
        if !*held.borrow_and_update() {
            return Ok(());
        }
        let t0 = Instant::now();
        let opened = tokio::time::timeout(self.timeout, held.wait_for(|h| !*h))
            .await
            .is_ok();
        if !opened {
            return Err(Error::WaitTimeout {
                what: format!("the kernel's CRNG reseed after a VM fork ({FORK_RESEED_LOG:?})"),
                timeout: self.timeout,
            });
        }
        debug!(waited = ?t0.elapsed(), "VM-fork reseed seen");
        Ok(())
    }

    /// Opens the barrier: the CRNG was reseeded from host entropy.
    pub fn release(&self) {
        if self.held.send_replace(false) {
            debug!("VM-fork barrier released by an explicit reseed");
        }
    }

    /// Whether calls are held now.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }
}

/// Whether a VMGenID driver has a device bound: a symlink in its sysfs directory.
fn vmgenid_bound(sys: &Path) -> bool {
    VMGENID_DRIVER_DIRS.iter().any(|dir| {
        std::fs::read_dir(sys.join(dir)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_type().is_ok_and(|t| t.is_symlink()) && e.file_name() != "module")
        })
    })
}

/// Whether the kernel's CRNG is initialised: `getrandom(GRND_NONBLOCK)` fails with `EAGAIN`
/// before.
fn crng_ready() -> bool {
    let mut byte = 0u8;
    // SAFETY: the buffer is one valid, writable byte for the whole call.
    let n = unsafe { libc::getrandom(std::ptr::addr_of_mut!(byte).cast(), 1, libc::GRND_NONBLOCK) };
    n == 1
}

/// Opens the kernel log for reading without blocking, positioned after its last record (a
/// FIFO, as in tests, cannot seek and needs not).
fn open_at_end(path: &Path) -> Result<AsyncFd<File>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io("open", path.display(), e))?;
    match file.seek(SeekFrom::End(0)) {
        Err(e) if e.raw_os_error() != Some(libc::ESPIPE) => {
            return Err(Error::io("seek", path.display(), e))
        }
        _ => {}
    }
    // SAFETY: the `File` owns its descriptor, and nothing replaces or closes it while the
    // `AsyncFd` owns the `File`.
    unsafe { AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE) }
        .map_err(|e| Error::io("poll", path.display(), std::io::Error::from(e)))
}

/// The source of an I/O error, for a reason string.
fn io_cause(e: &Error) -> String {
    std::error::Error::source(e)
        .map(ToString::to_string)
        .unwrap_or_default()
}

/// Reads kernel log records until one is [`FORK_RESEED_LOG`], then opens the barrier; stops
/// when something else opened it. A read error leaves it held: its waiters then fail, which
/// is safe, where opening it would not be.
async fn watch_kmsg(kmsg: AsyncFd<File>, held: Arc<watch::Sender<bool>>) {
    let mut released = held.subscribe();
    let mut buf = vec![0u8; 8192];
    loop {
        let mut ready = tokio::select! {
            r = kmsg.readable() => match r {
                Ok(r) => r,
                Err(e) => return warn!(error = %e, "cannot poll the kernel log"),
            },
            _ = released.wait_for(|h| !*h) => return,
        };
        // `/dev/kmsg` gives one record per read.
        match ready.try_io(|f| f.get_ref().read(&mut buf)) {
            Ok(Ok(0)) => return warn!("the kernel log ended"),
            Ok(Ok(n)) => {
                if String::from_utf8_lossy(&buf[..n]).contains(FORK_RESEED_LOG) {
                    held.send_replace(false);
                    return;
                }
            }
            // Records were overwritten before we read them: the next read gives the oldest
            // one left.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Ok(Err(e)) => return warn!(error = %e, "cannot read the kernel log"),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A guest tree with a bound (or unbound) vmgenid driver and a FIFO as `/dev/kmsg`.
    fn guest(bound: bool) -> (tempfile::TempDir, GuestPaths) {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = GuestPaths::under(dir.path());
        let drv = paths.sys.join(VMGENID_DRIVER_DIRS[0]);
        std::fs::create_dir_all(&drv).expect("driver dir");
        std::fs::write(drv.join("bind"), b"").expect("bind");
        if bound {
            std::os::unix::fs::symlink("../../../../devices/QEMUVGID:00", drv.join("QEMUVGID:00"))
                .expect("device link");
        }
        std::fs::create_dir_all(&paths.dev).expect("dev");
        nix::unistd::mkfifo(&paths.dev.join("kmsg"), nix::sys::stat::Mode::S_IRWXU).expect("fifo");
        (dir, paths)
    }

    fn writer(paths: &GuestPaths) -> File {
        OpenOptions::new()
            .write(true)
            .open(paths.dev.join("kmsg"))
            .expect("writer")
    }

    #[tokio::test]
    async fn clone_calls_wait_for_the_kernels_fork_reseed() {
        let (_dir, paths) = guest(true);
        let barrier = Arc::new(ForkBarrier::new(&paths));
        barrier.wait().await.expect("open until armed");
        assert_eq!(barrier.arm(&paths), ForkReseed::Active);
        assert_eq!(barrier.arm(&paths), ForkReseed::Active, "idempotent");
        let mut log = writer(&paths);
        // As in a clone right after the resume: the held call may come first.
        let waiter = tokio::spawn({
            let b = barrier.clone();
            async move { b.wait().await }
        });
        writeln!(log, "6,1001,7412320,-;virtio-pci 0000:00:02.0: other news").expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "another record opens nothing");
        assert!(barrier.is_held());
        writeln!(log, "5,1002,7412399,-;random: {FORK_RESEED_LOG}").expect("write");
        waiter.await.expect("join").expect("opened by the reseed");
        assert!(!barrier.is_held());
        barrier.wait().await.expect("and stays open");
    }

    #[tokio::test]
    async fn no_driver_no_barrier() {
        let (_dir, paths) = guest(false);
        let barrier = ForkBarrier::new(&paths);
        assert!(matches!(barrier.arm(&paths), ForkReseed::Inactive(r) if r.contains("VMGenID")));
        assert!(!barrier.is_held());
        barrier.wait().await.expect("never held");
    }

    #[tokio::test]
    async fn no_reseed_means_a_timeout_and_an_explicit_reseed_releases() {
        let (_dir, paths) = guest(true);
        let barrier = Arc::new(ForkBarrier::with_timeout(
            &paths,
            Duration::from_millis(100),
        ));
        assert_eq!(barrier.arm(&paths), ForkReseed::Active);
        let _log = writer(&paths);
        let err = barrier.wait().await.expect_err("no reseed logged");
        assert!(matches!(err, Error::WaitTimeout { .. }), "{err:?}");
        assert!(err.to_string().contains(FORK_RESEED_LOG), "{err}");
        let waiter = tokio::spawn({
            let b = barrier.clone();
            async move { b.wait().await }
        });
        barrier.release();
        waiter.await.expect("join").expect("released");
    }

    #[tokio::test]
    async fn an_unreadable_log_is_no_barrier() {
        let (_dir, paths) = guest(true);
        std::fs::remove_file(paths.dev.join("kmsg")).expect("rm");
        let barrier = ForkBarrier::new(&paths);
        assert!(
            matches!(barrier.arm(&paths), ForkReseed::Inactive(r) if r.contains("kmsg")),
            "names the file"
        );
        assert!(!barrier.is_held());
    }
}
