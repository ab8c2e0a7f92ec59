//! Tap devices through `/dev/net/tun`: made persistent inside a VM's namespace by the network
//! setup, and opened there again by the hypervisor, which hands the descriptor to QEMU.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{NetError, Result};
use crate::netns;

const TUN: &str = "/dev/net/tun";

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    IfReq
);
nix::ioctl_write_int!(tun_set_persist, b'T', 203);

/// Opens tap `name` in the calling thread's namespace (making it if it does not exist), with
/// virtio-net headers, as QEMU's `-netdev tap,fd=` wants.
fn attach(name: &str) -> Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(NetError::Invalid(format!("bad tap name {name:?}")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN)
        .map_err(|e| NetError::io("Opening", TUN, e))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `req` is a valid, initialised ifreq that outlives the call; the descriptor is
    // open.
    unsafe { tun_set_iff(file.as_raw_fd(), &req) }
        .map_err(|e| NetError::io("Attaching to tap", PathBuf::from(name), e.into()))?;
    Ok(file.into())
}

/// Makes tap `name` in the calling thread's namespace and keeps it after its descriptor
/// closes, until the namespace ends.
pub(crate) fn create_persistent(name: &str) -> Result<()> {
    let fd = attach(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument; the descriptor is open.
    unsafe { tun_set_persist(fd.as_raw_fd(), 1) }
        .map_err(|e| NetError::io("Making persistent tap", PathBuf::from(name), e.into()))?;
    Ok(())
}

/// Opens tap `name` of the namespace pinned at `netns` (the VM's, see
/// [`crate::VmNetwork::netns`]) for a QEMU to inherit.
pub async fn open_in(netns: &Path, name: &str) -> Result<OwnedFd> {
    let (netns, name) = (netns.to_owned(), name.to_owned());
    netns::on_own_thread(move || {
        netns::enter(&netns)?;
        attach(&name)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_persistent_tap_is_opened_again_in_its_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ns = dir.path().join("netns");
        let p = ns.clone();
        netns::on_own_thread(move || {
            netns::unshare_to(&p)?;
            create_persistent("tap0")
        })
        .await
        .expect("tap");
        let fd = open_in(&ns, "tap0").await.expect("reopen");
        drop(fd);
        assert!(open_in(&ns, "").await.is_err());
        netns::remove(&ns).expect("remove");
        assert!(open_in(&ns, "tap0").await.is_err(), "namespace gone");
    }
}
