//! A VM's NIC on the host: its tap, opened inside the VM's network namespace, and vhost-net.

use std::os::fd::OwnedFd;
use std::path::Path;

use tracing::debug;

use crate::config::{NicConfig, NIC_NETNS, NIC_TAP, VHOST_NET};
use crate::error::{Error, Result};

/// Opens the NIC's tap in the VM's network namespace (pinned in its run directory by
/// `vmfactory-net`) and, where used, vhost-net: descriptors for QEMU to inherit.
pub(super) async fn open_nic(nic: &NicConfig, dir: &Path) -> Result<(OwnedFd, Option<OwnedFd>)> {
    let netns = dir.join(NIC_NETNS);
    let tap = vmfactory_net::tap::open_in(&netns, NIC_TAP)
        .await
        .map_err(|e| Error::io("Opening the tap in", &netns, std::io::Error::other(e)))?;
    let vhost_path = Path::new(VHOST_NET);
    let vhost = match nic.vhost {
        Some(false) => None,
        want => match tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(vhost_path)
            .await
        {
            Ok(f) => Some(OwnedFd::from(f.into_std().await)),
            Err(e) if want == Some(true) => return Err(Error::io("Opening", vhost_path, e)),
            Err(e) => {
                debug!(error = %e, "no vhost-net: QEMU moves the NIC's packets itself");
                None
            }
        },
    };
    Ok((tap, vhost))
}
