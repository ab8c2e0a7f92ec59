//! Host networking for vmfactory's VMs.
//!
//! Every VM gets a network namespace of its own ([`VmNetwork`]): the tap its QEMU uses is
//! inside, with the same guest address and MAC in every VM, so a template's clones keep what
//! the template had and still never meet on a shared network. A veth pair joins the namespace
//! to the host, where the VM has a unique address (one /30 of [`NetworkConfig::subnet`]); NAT
//! in the namespace maps it to the guest's. The host's nftables table keeps VMs from each
//! other and from the host's other addresses, and NATs their egress. [`proxy`] publishes a
//! VM's port on the host. See docs/networking.md.

// The README crates.io shows: its examples compiled (and run where they need no VM) as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod error;
mod names;
pub mod netns;
pub mod proxy;
mod rules;
mod setup;
pub mod tap;

pub use error::{NetError, Result};
pub use ipnet;
pub use names::{
    DEFAULT_SUBNET, GUEST_ADDRESS, GUEST_GATEWAY, GUEST_MAC, GUEST_PREFIX, NS_UPLINK, TAP, TAP_MAC,
};
pub use rules::{HOST_TABLE, NFT};
pub use setup::{
    host_links, mac_string, remove_host_rules_if_unused, NetStep, NetworkConfig, VmNetwork,
};
