//! The names and addresses every VM's network uses: the same in every namespace, which is
//! what lets a template's clones keep the template's.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Host links of VMs are named `vmf-N`; the host's rules match them with this wildcard.
pub(crate) const HOST_LINK_PREFIX: &str = "vmf-";

/// The tap QEMU uses, inside the VM's namespace.
pub const TAP: &str = "tap0";
/// The namespace's end of the veth pair.
pub const NS_UPLINK: &str = "veth0";
/// The guest's address, the same in every VM (each has a namespace of its own).
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The guest's prefix length.
pub const GUEST_PREFIX: u8 = 24;
/// The guest's gateway: the tap's address in the namespace.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The guest NIC's MAC, the same in every VM (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x66, 0x00, 0x0f];
/// The tap's MAC, the same in every namespace, so that a clone's neighbour cache (the
/// template's) stays right.
pub const TAP_MAC: [u8; 6] = [0x02, 0x76, 0x6d, 0x66, 0x00, 0x02];
/// The default [`crate::NetworkConfig::subnet`].
pub const DEFAULT_SUBNET: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 201, 0, 0), 16) {
    Ok(n) => n,
    Err(_) => panic!("a /16 is valid"),
};
