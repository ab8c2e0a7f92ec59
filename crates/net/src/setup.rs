//! A VM's network: its own namespace holding the tap QEMU uses and one end of a veth pair whose
//! other end, on the host, carries the VM's unique address (one /30 of the configured subnet
//! per VM). Inside, the guest keeps the same address and MAC in every VM, so a template's
//! clones need no re-addressing; NAT in the namespace maps the unique address to the guest's.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use tracing::{debug, instrument};

use crate::error::{NetError, Result};
use crate::names::{
    DEFAULT_SUBNET, GUEST_ADDRESS, GUEST_GATEWAY, GUEST_PREFIX, HOST_LINK_PREFIX, NS_UPLINK, TAP,
    TAP_MAC,
};
use crate::rules::{self, NsRules};
use crate::{netns, tap};

/// Formats a MAC as QEMU and Kata write it.
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How VMs are networked (`[network]` of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkConfig {
    /// The host-side addresses: each VM gets a /30 of it (the host's end and the VM's).
    #[serde(default = "default_subnet")]
    pub subnet: Ipv4Net,
    /// Whether guests may open connections beyond the host (NATed out of the host's default
    /// route; turns on the host's IPv4 forwarding). Off, a guest reaches only the host's end
    /// of its own link.
    #[serde(default = "default_true")]
    pub egress: bool,
}

fn default_subnet() -> Ipv4Net {
    DEFAULT_SUBNET
}

fn default_true() -> bool {
    true
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            subnet: DEFAULT_SUBNET,
            egress: true,
        }
    }
}

impl NetworkConfig {
    /// VMs on `subnet`, with egress (as [`NetworkConfig::default`]).
    pub fn new(subnet: Ipv4Net) -> Self {
        Self {
            subnet,
            egress: true,
        }
    }

    /// This config with `egress` set.
    pub fn with_egress(mut self, egress: bool) -> Self {
        self.egress = egress;
        self
    }

    /// Checks that the subnet holds at least one VM and is its network address.
    pub fn validate(&self) -> Result<()> {
        if self.subnet.prefix_len() > 30 {
            return Err(NetError::Invalid(format!(
                "subnet {} holds no /30 (one per VM); use a prefix of 30 or less",
                self.subnet
            )));
        }
        if self.subnet.addr() != self.subnet.network() {
            return Err(NetError::Invalid(format!(
                "subnet {} is not a network address (did you mean {}?)",
                self.subnet,
                self.subnet.trunc()
            )));
        }
        Ok(())
    }

    /// How many VMs the subnet holds.
    pub fn capacity(&self) -> u32 {
        1 << (30 - u32::from(self.subnet.prefix_len().min(30)))
    }

    /// VM `n`'s (host end, VM end) addresses.
    fn addresses(&self, n: u32) -> (Ipv4Addr, Ipv4Addr) {
        let base = u32::from(self.subnet.network()) + n * 4;
        (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
    }
}

/// A step of [`VmNetwork::create`], where a test may make it fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetStep {
    /// The namespace and its pin.
    Namespace,
    /// The tap.
    Tap,
    /// The veth pair, its host end named after the VM's address.
    Link,
    /// Addresses, link states and the namespace's default route.
    Addresses,
    /// The namespace's NAT rules.
    Rules,
    /// The host's table and forwarding (last: see [`VmNetwork::create`]).
    HostRules,
}

/// A VM's network as made: where it lives and how the host reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmNetwork {
    /// The VM's network namespace, pinned here (`nsenter --net=PATH`).
    pub netns: PathBuf,
    /// The host end of the VM's link (`vmf-N`).
    pub host_link: String,
    /// The host's address on that link (what the guest reaches the host at, through NAT).
    pub host_address: Ipv4Addr,
    /// The VM's address: what the host connects to.
    pub address: Ipv4Addr,
    /// The guest's own address (the same in every VM).
    pub guest_address: Ipv4Addr,
    /// Whether the guest may reach beyond the host.
    pub egress: bool,
}

impl VmNetwork {
    /// Makes a VM's network with its namespace pinned at `netns` (which must not exist). On
    /// failure nothing is left: no namespace, link or pin.
    #[instrument(skip(cfg))]
    pub async fn create(cfg: &NetworkConfig, netns: &Path) -> Result<Self> {
        Self::create_with(cfg, netns, None).await
    }

    /// [`VmNetwork::create`], failing at `step`: for tests of what a failure leaves.
    #[doc(hidden)]
    pub async fn create_failing_at(
        cfg: &NetworkConfig,
        netns: &Path,
        step: NetStep,
    ) -> Result<Self> {
        Self::create_with(cfg, netns, Some(step)).await
    }

    async fn create_with(cfg: &NetworkConfig, netns: &Path, fail: Option<NetStep>) -> Result<Self> {
        cfg.validate()?;
        let (inner, path) = (cfg.clone(), netns.to_owned());
        let net = netns::on_own_thread(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| NetError::io("Starting a runtime for", &path, e))?;
            rt.block_on(create_here(&inner, &path, fail))
        })
        .await?;
        // The host's table goes in at every creation, and only once the VM's link exists: a
        // `destroy` elsewhere deletes the table only while no `vmf-*` link is left, so it can
        // never leave this VM without its isolation. Before QEMU starts, so before any guest
        // packet. Replacing the table is one atomic transaction.
        let egress = cfg.egress;
        let host = netns::on_own_thread(move || {
            injected(fail, NetStep::HostRules)?;
            rules::apply("host", &rules::host_rules())?;
            if egress {
                write_sysctl("/proc/sys/net/ipv4/ip_forward")?;
            }
            Ok(())
        })
        .await;
        match host {
            Ok(()) => Ok(net),
            Err(e) => {
                debug!(error = %e, "host rules failed; removing the network");
                let _ = net.remove().await;
                Err(e)
            }
        }
    }

    /// Removes the network: the host link at once, then the namespace's pin (the namespace,
    /// its tap and NAT rules end when the VM's QEMU has exited too). Idempotent.
    #[instrument(skip(self), fields(link = %self.host_link))]
    pub async fn remove(&self) -> Result<()> {
        let (link, path) = (self.host_link.clone(), self.netns.clone());
        netns::on_own_thread(move || remove_here(Some(&link), &path)).await
    }

    /// Removes what a VM's network left at `netns` when its record is lost (a crash mid-setup).
    pub async fn remove_pin(netns: &Path) -> Result<()> {
        let path = netns.to_owned();
        netns::on_own_thread(move || remove_here(None, &path)).await
    }
}

/// Deletes the host table when no VM link is left on the host (after the last VM's network
/// was removed). Answers whether there was a table to delete.
pub async fn remove_host_rules_if_unused() -> Result<bool> {
    if !host_links().await?.is_empty() {
        return Ok(false);
    }
    netns::on_own_thread(rules::delete_host_table).await
}

/// The VM links on the host (`vmf-N`).
pub async fn host_links() -> Result<Vec<String>> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetError::io("Opening", "netlink", e))?;
    let task = tokio::spawn(conn);
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|e| NetError::netlink("list links", e))?
    {
        for attr in &msg.attributes {
            if let rtnetlink::packet_route::link::LinkAttribute::IfName(n) = attr {
                if n.starts_with(HOST_LINK_PREFIX) {
                    names.push(n.clone());
                }
            }
        }
    }
    task.abort();
    Ok(names)
}

fn injected(fail: Option<NetStep>, step: NetStep) -> Result<()> {
    match fail {
        Some(s) if s == step => Err(NetError::Injected(step)),
        _ => Ok(()),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn connect(what: &Path) -> Result<Handle> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetError::io("Opening netlink for", what, e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Runs on its own thread (it moves into the new namespace), inside a current-thread runtime.
async fn create_here(cfg: &NetworkConfig, path: &Path, fail: Option<NetStep>) -> Result<VmNetwork> {
    // Made before the move: netlink sockets stay in the namespace they were opened in.
    let host = connect(path)?;
    injected(fail, NetStep::Namespace)?;
    netns::unshare_to(path)?;
    // IPv4 only inside (the NAT is IPv4): the namespace then sends the guest no neighbour
    // discovery or multicast reports, which would queue on the tap while a pre-started clone
    // waits.
    if let Err(e) = ["all", "default"]
        .iter()
        .try_for_each(|c| write_sysctl(&format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6")))
    {
        let _ = netns::remove(path);
        return Err(e);
    }
    let mut link = None;
    let made = setup_inside(cfg, path, &host, &mut link, fail).await;
    match made {
        Ok(net) => Ok(net),
        Err(e) => {
            debug!(error = %e, "network setup failed; removing what it made");
            if let Some(name) = &link {
                let _ = delete_link(&host, name).await;
            }
            let _ = netns::remove(path);
            Err(e)
        }
    }
}

async fn setup_inside(
    cfg: &NetworkConfig,
    path: &Path,
    host: &Handle,
    link: &mut Option<String>,
    fail: Option<NetStep>,
) -> Result<VmNetwork> {
    let inner = connect(path)?;
    injected(fail, NetStep::Tap)?;
    tap::create_persistent(TAP)?;
    injected(fail, NetStep::Link)?;
    let ns_fd = std::fs::File::open(path).map_err(|e| NetError::io("Opening", path, e))?;
    let n = allocate(cfg, host, path, link).await?;
    let peer = format!("vmfp-{n}");
    host.link()
        .set(
            LinkUnspec::new_with_name(&peer)
                .setns_by_fd(ns_fd.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("move {peer} into the namespace"), e))?;
    injected(fail, NetStep::Addresses)?;
    let (host_address, address) = cfg.addresses(n);
    let host_link = format!("{HOST_LINK_PREFIX}{n}");
    let idx = index(host, &host_link).await?;
    add_address(host, idx, host_address, 30).await?;
    set_up(
        host,
        LinkUnspec::new_with_index(idx).up().build(),
        &host_link,
    )
    .await?;
    let uplink = index(&inner, &peer).await?;
    set_up(
        &inner,
        LinkUnspec::new_with_index(uplink)
            .name(NS_UPLINK)
            .up()
            .build(),
        NS_UPLINK,
    )
    .await?;
    add_address(&inner, uplink, address, 30).await?;
    let tap = index(&inner, TAP).await?;
    set_up(
        &inner,
        LinkUnspec::new_with_index(tap)
            .address(TAP_MAC.to_vec())
            .up()
            .build(),
        TAP,
    )
    .await?;
    add_address(&inner, tap, GUEST_GATEWAY, GUEST_PREFIX).await?;
    let lo = index(&inner, "lo").await?;
    set_up(&inner, LinkUnspec::new_with_index(lo).up().build(), "lo").await?;
    inner
        .route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(host_address)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| NetError::netlink("add the namespace's default route", e))?;
    injected(fail, NetStep::Rules)?;
    write_sysctl("/proc/sys/net/ipv4/ip_forward")?;
    rules::apply(
        "namespace",
        &rules::ns_rules(&NsRules {
            address,
            host_address,
            guest: GUEST_ADDRESS,
            egress: cfg.egress,
        }),
    )?;
    Ok(VmNetwork {
        netns: path.to_owned(),
        host_link,
        host_address,
        address,
        guest_address: GUEST_ADDRESS,
        egress: cfg.egress,
    })
}

/// Takes the first free VM number: the kernel refuses a second link of the same name, so two
/// processes never take the same one. Probing starts at a hash of the pin's path.
async fn allocate(
    cfg: &NetworkConfig,
    host: &Handle,
    path: &Path,
    link: &mut Option<String>,
) -> Result<u32> {
    let capacity = cfg.capacity();
    let start = path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(*b)))
        % capacity;
    for i in 0..capacity {
        let n = (start + i) % capacity;
        let name = format!("{HOST_LINK_PREFIX}{n}");
        match host
            .link()
            .add(LinkVeth::new(&name, &format!("vmfp-{n}")).build())
            .execute()
            .await
        {
            Ok(()) => {
                *link = Some(name);
                return Ok(n);
            }
            Err(e) if errno(&e) == Some(libc::EEXIST) => continue,
            Err(e) => return Err(NetError::netlink(format!("add link {name}"), e)),
        }
    }
    Err(NetError::SubnetFull {
        subnet: cfg.subnet,
        capacity,
    })
}

async fn index(handle: &Handle, name: &str) -> Result<u32> {
    let msg = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(|e| NetError::netlink(format!("find link {name}"), e))?
        .ok_or_else(|| NetError::Invalid(format!("link {name} vanished")))?;
    Ok(msg.header.index)
}

async fn add_address(handle: &Handle, idx: u32, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    handle
        .address()
        .add(idx, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("add address {addr}/{prefix}"), e))
}

async fn set_up(
    handle: &Handle,
    msg: rtnetlink::packet_route::link::LinkMessage,
    name: &str,
) -> Result<()> {
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| NetError::netlink(format!("set up {name}"), e))
}

async fn delete_link(handle: &Handle, name: &str) -> Result<()> {
    let idx = match index(handle, name).await {
        Ok(i) => i,
        Err(NetError::Netlink { source, .. }) if errno(&source) == Some(libc::ENODEV) => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    match handle.link().del(idx).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(NetError::netlink(format!("delete link {name}"), e)),
    }
}

fn remove_here(link: Option<&str>, path: &Path) -> Result<()> {
    if let Some(name) = link {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::io("Starting a runtime for", path, e))?;
        rt.block_on(async { delete_link(&connect(path)?, name).await })?;
    }
    netns::remove(path)
}

fn write_sysctl(path: &str) -> Result<()> {
    std::fs::write(path, b"1").map_err(|e| NetError::io("Writing 1 to", path, e))
}
