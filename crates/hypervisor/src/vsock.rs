//! vhost-vsock guest CIDs, reserved by the kernel as Kata's `FindContextID` does.
//!
//! A CID set on an open `/dev/vhost-vsock` (`VHOST_VSOCK_SET_GUEST_CID`) belongs to that
//! device until its last descriptor closes; setting it on another one fails with
//! `EADDRINUSE`. QEMU inherits the descriptor (`vhost-vsock-pci,vhostfd=N`), so a VM's CID
//! lives exactly as long as its QEMU, whichever process started or re-attached it, and no
//! bookkeeping of ours can disagree with the kernel's.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nix::errno::Errno;
use tracing::info;

use crate::cmdline::VhostVsockFd;
use crate::error::Error;

/// The vhost-vsock device.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

/// The lowest guest CID (0, 1 and 2 are the hypervisor, loopback and host).
pub const FIRST_GUEST_CID: u32 = 3;

/// The highest guest CID (`u32::MAX` is `VMADDR_CID_ANY`).
pub const LAST_GUEST_CID: u32 = u32::MAX - 1;

/// How many CIDs in a row an allocation tries before it gives up: far more than the VMs a
/// host runs, and probing all 2^32 would take minutes of ioctls.
pub const MAX_PROBES: u32 = 1 << 16;

nix::ioctl_write_ptr!(
    /// `VHOST_VSOCK_SET_GUEST_CID`: `_IOW(VHOST_VIRTIO, 0x60, __u64)` (linux/vhost.h).
    vhost_vsock_set_guest_cid,
    0xAF,
    0x60,
    u64
);

/// A guest CID that cannot be reserved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VsockError {
    /// The host has no vhost-vsock device.
    #[error("No {path}: vsock needs the vhost_vsock kernel module")]
    NoDevice {
        /// The device path.
        path: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },
    /// The device exists but cannot be opened (permissions, say).
    #[error("Opening {path} failed")]
    Open {
        /// The device path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A pinned CID is held by another VM (or is this host's own, when nested).
    #[error("Guest CID {cid} is in use")]
    CidInUse {
        /// The CID.
        cid: u32,
    },
    /// Every CID probed was in use.
    #[error("No free guest CID: {probes} in a row from {start} are in use")]
    NoFreeCid {
        /// The first CID tried.
        start: u32,
        /// How many were tried.
        probes: u32,
    },
    /// The kernel refused a CID for another reason than its being in use.
    #[error("Setting guest CID {cid} on {path} failed")]
    SetCid {
        /// The CID.
        cid: u32,
        /// The device path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: Errno,
    },
}

/// Where CIDs are reserved: the kernel's vhost-vsock device, or a stand-in in tests.
pub(crate) trait CidKernel: Send + Sync + fmt::Debug {
    /// The device path, for messages.
    fn path(&self) -> &Path;
    /// Opens a new vhost-vsock instance (close-on-exec).
    fn open(&self) -> std::io::Result<OwnedFd>;
    /// Sets `cid` on the instance `fd`; `EADDRINUSE` when another instance holds it.
    fn set_guest_cid(&self, fd: BorrowedFd<'_>, cid: u32) -> Result<(), Errno>;
}

/// The kernel's `/dev/vhost-vsock` (or another path to the same kind of device).
#[derive(Debug, Clone)]
pub(crate) struct VhostVsock {
    path: PathBuf,
}

impl VhostVsock {
    pub(crate) fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl Default for VhostVsock {
    fn default() -> Self {
        Self::new(VHOST_VSOCK_DEVICE)
    }
}

impl CidKernel for VhostVsock {
    fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> std::io::Result<OwnedFd> {
        // std opens with O_CLOEXEC: only the QEMU that is handed the descriptor inherits it.
        let file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(file.into())
    }

    fn set_guest_cid(&self, fd: BorrowedFd<'_>, cid: u32) -> Result<(), Errno> {
        let cid = u64::from(cid);
        // SAFETY: `fd` is open for the whole call (borrowed), and the kernel reads one u64
        // through the pointer, which points at `cid`, alive until the call returns.
        unsafe { vhost_vsock_set_guest_cid(fd.as_raw_fd(), &cid) }.map(drop)
    }
}

/// A guest CID held by an open vhost-vsock instance: released when the last copy of the
/// descriptor closes (ours on drop, QEMU's when it exits).
#[derive(Debug)]
pub struct CidReservation {
    device: OwnedFd,
    cid: u32,
}

impl CidReservation {
    /// Reserves a free CID on a new instance of `/dev/vhost-vsock`, probing upward from a
    /// process-wide counter that starts at a random CID. Blocking (open and ioctls).
    pub fn allocate() -> Result<Self, VsockError> {
        reserve(&VhostVsock::default(), None)
    }

    /// Reserves `cid` on a new instance of `/dev/vhost-vsock`; [`VsockError::CidInUse`] if
    /// another holds it. Blocking. Also tells whether a CID is free: the reservation is
    /// released when the value is dropped.
    pub fn pin(cid: u32) -> Result<Self, VsockError> {
        reserve(&VhostVsock::default(), Some(cid))
    }

    /// The CID.
    pub fn cid(&self) -> u32 {
        self.cid
    }

    /// The device as QEMU's command line names it, inheriting this descriptor.
    pub(crate) fn for_qemu(&self) -> VhostVsockFd {
        VhostVsockFd {
            fd: self.device.as_raw_fd(),
            cid: self.cid,
        }
    }
}

impl AsFd for CidReservation {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }
}

/// [`reserve`] for VM `id`, off the async threads (it makes blocking syscalls).
pub(crate) async fn reserve_for(
    id: &str,
    kernel: &Arc<dyn CidKernel>,
    pinned: Option<u32>,
) -> crate::Result<CidReservation> {
    let k = kernel.clone();
    let reserved = tokio::task::spawn_blocking(move || reserve(k.as_ref(), pinned))
        .await
        .map_err(|e| {
            Error::io(
                "Reserving a CID on",
                kernel.path(),
                std::io::Error::other(e),
            )
        })?
        .map_err(|source| Error::Vsock {
            id: id.to_owned(),
            source,
        })?;
    info!(vm = id, cid = reserved.cid, "vsock CID reserved");
    Ok(reserved)
}

/// Opens an instance of `kernel`'s device and reserves `pinned`, or a free CID when `None`.
/// On any error the instance is closed again.
pub(crate) fn reserve(
    kernel: &dyn CidKernel,
    pinned: Option<u32>,
) -> Result<CidReservation, VsockError> {
    let path = || kernel.path().to_owned();
    let device = kernel
        .open()
        .map_err(|source| match source.raw_os_error() {
            // No node, or a node without its driver loaded.
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => VsockError::NoDevice {
                path: path(),
                source,
            },
            _ => VsockError::Open {
                path: path(),
                source,
            },
        })?;
    let try_cid = |cid| match kernel.set_guest_cid(device.as_fd(), cid) {
        Ok(()) => Ok(true),
        Err(Errno::EADDRINUSE) => Ok(false),
        Err(source) => Err(VsockError::SetCid {
            cid,
            path: path(),
            source,
        }),
    };
    let cid = match pinned {
        Some(cid) if try_cid(cid)? => cid,
        Some(cid) => return Err(VsockError::CidInUse { cid }),
        None => {
            let cid = probe(next_start(), MAX_PROBES, try_cid)?;
            // Start the next allocation past this one: a CID just released is not handed out
            // again soon, so a stale client of a stopped VM does not reach a new one.
            NEXT_START.store(successor(cid), Ordering::Relaxed);
            cid
        }
    };
    Ok(CidReservation { device, cid })
}

/// Tries up to `probes` CIDs from `start` upward (wrapping within the guest range) until
/// `try_cid` reserves one (`Ok(true)`); `Ok(false)` means in use, an error ends the search.
pub(crate) fn probe(
    start: u32,
    probes: u32,
    mut try_cid: impl FnMut(u32) -> Result<bool, VsockError>,
) -> Result<u32, VsockError> {
    let start = if in_range(start) {
        start
    } else {
        FIRST_GUEST_CID
    };
    let mut cid = start;
    for _ in 0..probes {
        if try_cid(cid)? {
            return Ok(cid);
        }
        cid = successor(cid);
    }
    Err(VsockError::NoFreeCid { start, probes })
}

/// Where the next allocation starts probing; 0 until the first one picks a random start, so
/// factories on one host do not all probe from the same CID.
static NEXT_START: AtomicU32 = AtomicU32::new(0);

/// Claims a start for one allocation and moves the counter past it, so concurrent
/// allocations of this process start apart.
fn next_start() -> u32 {
    let mut now = NEXT_START.load(Ordering::Relaxed);
    loop {
        let start = if in_range(now) { now } else { random_cid() };
        match NEXT_START.compare_exchange_weak(
            now,
            successor(start),
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return start,
            Err(seen) => now = seen,
        }
    }
}

fn in_range(cid: u32) -> bool {
    (FIRST_GUEST_CID..=LAST_GUEST_CID).contains(&cid)
}

/// The CID after `cid`, wrapping from the last to the first.
fn successor(cid: u32) -> u32 {
    if cid >= LAST_GUEST_CID {
        FIRST_GUEST_CID
    } else {
        cid + 1
    }
}

/// A random guest CID (std's hasher keys are seeded from the OS; no RNG crate needed).
fn random_cid() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let span = u64::from(LAST_GUEST_CID - FIRST_GUEST_CID) + 1;
    FIRST_GUEST_CID + u32::try_from(r % span).unwrap_or(0)
}

/// A stand-in kernel for tests: instances are descriptors of a real file (so a test can see
/// whether one leaked or was inherited), CIDs are held in a shared set until released.
#[cfg(test)]
pub(crate) mod fake {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Shared by every test instance made from it: the CIDs "other VMs" hold.
    #[derive(Debug, Clone)]
    pub(crate) struct FakeKernel {
        pub(crate) device: PathBuf,
        pub(crate) taken: Arc<Mutex<HashSet<u32>>>,
        /// Fails every `set_guest_cid` with this errno instead.
        pub(crate) fail: Option<Errno>,
    }

    impl FakeKernel {
        /// A kernel whose "device" is the regular file `device` (created empty).
        pub(crate) fn new(device: &Path) -> Self {
            std::fs::write(device, b"").expect("fake device");
            Self {
                device: device.to_owned(),
                taken: Arc::default(),
                fail: None,
            }
        }

        pub(crate) fn take(&self, cids: impl IntoIterator<Item = u32>) {
            self.taken.lock().expect("lock").extend(cids);
        }

        /// How many descriptors of this process refer to the fake device.
        pub(crate) fn open_fds(&self) -> usize {
            std::fs::read_dir("/proc/self/fd")
                .expect("fd dir")
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == self.device))
                .count()
        }
    }

    impl CidKernel for FakeKernel {
        fn path(&self) -> &Path {
            &self.device
        }

        fn open(&self) -> std::io::Result<OwnedFd> {
            Ok(std::fs::File::open(&self.device)?.into())
        }

        fn set_guest_cid(&self, _fd: BorrowedFd<'_>, cid: u32) -> Result<(), Errno> {
            if let Some(e) = self.fail {
                return Err(e);
            }
            if self.taken.lock().expect("lock").insert(cid) {
                Ok(())
            } else {
                Err(Errno::EADDRINUSE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeKernel;
    use super::*;

    #[test]
    fn probing_skips_taken_cids_and_wraps() {
        let taken = [10, 11, 12];
        let free = |cid: u32| Ok(!taken.contains(&cid));
        assert_eq!(probe(10, 100, free).expect("free"), 13);
        assert_eq!(probe(9, 100, free).expect("free"), 9);
        // Wraps from the last CID to the first.
        let last_taken = |cid| Ok(cid != LAST_GUEST_CID);
        assert_eq!(
            probe(LAST_GUEST_CID, 2, last_taken).expect("free"),
            FIRST_GUEST_CID
        );
        // Out-of-range starts begin at the first CID.
        for start in [0, 1, 2, u32::MAX] {
            assert_eq!(probe(start, 1, |_| Ok(true)).expect("free"), 3);
        }
    }

    #[test]
    fn probing_gives_up_after_its_bound_and_stops_on_other_errors() {
        let mut tried = Vec::new();
        let err = probe(100, 5, |cid| {
            tried.push(cid);
            Ok(false)
        })
        .expect_err("all taken");
        assert!(
            matches!(
                err,
                VsockError::NoFreeCid {
                    start: 100,
                    probes: 5
                }
            ),
            "{err:?}"
        );
        assert_eq!(tried, [100, 101, 102, 103, 104]);
        let mut calls = 0;
        let err = probe(7, 5, |cid| {
            calls += 1;
            Err(VsockError::SetCid {
                cid,
                path: "/d".into(),
                source: Errno::EPERM,
            })
        })
        .expect_err("refused");
        assert!(matches!(err, VsockError::SetCid { cid: 7, .. }), "{err:?}");
        assert_eq!(calls, 1, "no further probing after a real error");
    }

    #[test]
    fn allocations_are_distinct_and_never_reserved_cids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = FakeKernel::new(&dir.path().join("vhost-vsock"));
        let mut held = Vec::new();
        for _ in 0..50 {
            held.push(reserve(&kernel, None).expect("allocate"));
        }
        let cids: std::collections::HashSet<u32> = held.iter().map(|r| r.cid()).collect();
        assert_eq!(cids.len(), 50);
        assert!(cids.iter().all(|c| in_range(*c)));
        assert_eq!(kernel.open_fds(), 50, "one instance per reservation");
        drop(held);
        assert_eq!(kernel.open_fds(), 0);
        for _ in 0..1000 {
            assert!(in_range(random_cid()));
        }
    }

    #[test]
    fn pinned_cids_and_errors_close_the_instance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = FakeKernel::new(&dir.path().join("vhost-vsock"));
        kernel.take([7]);
        let r = reserve(&kernel, Some(8)).expect("free");
        assert_eq!(r.cid(), 8);
        assert!(matches!(
            reserve(&kernel, Some(7)),
            Err(VsockError::CidInUse { cid: 7 })
        ));
        drop(r);
        let mut failing = kernel.clone();
        failing.fail = Some(Errno::ENOTTY);
        let err = reserve(&failing, None).expect_err("refused");
        assert!(
            matches!(
                err,
                VsockError::SetCid {
                    source: Errno::ENOTTY,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(kernel.open_fds(), 0, "nothing left open");
    }

    #[test]
    fn a_missing_device_says_what_to_load() {
        let err =
            reserve(&VhostVsock::new("/nonexistent/vhost-vsock"), None).expect_err("no device");
        assert!(matches!(err, VsockError::NoDevice { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "No /nonexistent/vhost-vsock: vsock needs the vhost_vsock kernel module"
        );
        // A device of another kind: the ioctl is refused, and reported as such.
        let err = reserve(&VhostVsock::new("/dev/null"), Some(5)).expect_err("not vhost");
        assert!(
            matches!(
                err,
                VsockError::SetCid {
                    cid: 5,
                    source: Errno::ENOTTY,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
