//! [`Netlink`]: the guest's real [`GuestNetwork`], over rtnetlink.
//!
//! Each call opens its own netlink socket: the socket belongs to the network namespace of the
//! thread that opens it (a test runs the server in a fresh one), and a template's clone gets
//! no socket its parent opened. Everything that can be found wrong is found before the first
//! change; route changes that fail half-way are undone.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

use async_trait::async_trait;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType, RouteVia,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use tracing::{debug, info, warn};
use vmfactory_agent::net::{
    format_mac, Cidr, InterfaceConfig, IpFamily, NetConfigError, RouteConfig,
};
use vmfactory_agent::{Interface, IpAddress, Route};

use super::net::{GuestNetwork, NetError};

/// The kernel's network stack, through rtnetlink.
#[derive(Debug, Default, Clone, Copy)]
pub struct Netlink;

/// One netlink socket and the task that drives it; dropping it stops the task.
struct Session {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        // The connection task only ends once every handle *and* its (unused) unsolicited
        // message receiver are gone; ending it here is simpler than waiting for that.
        self.conn.abort();
    }
}

impl Session {
    fn open() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
        Ok(Session {
            handle,
            conn: tokio::spawn(conn),
        })
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, NetError> {
        let mut links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list", "links", e))?;
        links.sort_by_key(|l| l.header.index);
        Ok(links)
    }

    async fn addresses(&self) -> Result<Vec<AddressMessage>, NetError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetError::netlink("list", "addresses", e))
    }

    /// The unicast routes of the main table, both families.
    async fn routes(&self) -> Result<Vec<RouteMessage>, NetError> {
        let mut all = Vec::new();
        for family in [IpFamily::V4, IpFamily::V6] {
            let query = match family {
                IpFamily::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpFamily::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            };
            let got: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetError::netlink("list", format!("{family} routes"), e))?;
            all.extend(
                got.into_iter()
                    .filter(|r| table(r) == u32::from(RouteHeader::RT_TABLE_MAIN))
                    .filter(|r| r.header.kind == RouteType::Unicast),
            );
        }
        Ok(all)
    }

    async fn set_link(
        &self,
        op: &'static str,
        name: &str,
        msg: LinkMessage,
    ) -> Result<(), NetError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetError::netlink(op, name, e))
    }

    /// `link` as an [`Interface`], with its addresses from `addrs`.
    fn interface(link: &LinkMessage, addrs: &[AddressMessage]) -> Interface {
        let name = link_name(link).unwrap_or_default().to_owned();
        Interface {
            device: name.clone(),
            name,
            ip_addresses: addrs
                .iter()
                .filter(|a| a.header.index == link.header.index)
                .filter_map(address_cidr)
                .map(|c| IpAddress::new(c.addr, c.prefix))
                .collect(),
            mtu: link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Mtu(m) => Some(u64::from(*m)),
                    _ => None,
                })
                .unwrap_or(0),
            hw_addr: link_mac(link).map(format_mac).unwrap_or_default(),
        }
    }

    async fn interfaces(&self) -> Result<Vec<Interface>, NetError> {
        let links = self.links().await?;
        let addrs = self.addresses().await?;
        Ok(links.iter().map(|l| Self::interface(l, &addrs)).collect())
    }

    async fn route_list(&self) -> Result<Vec<Route>, NetError> {
        let names: HashMap<u32, String> = self
            .links()
            .await?
            .iter()
            .filter_map(|l| Some((l.header.index, link_name(l)?.to_owned())))
            .collect();
        Ok(self
            .routes()
            .await?
            .iter()
            .filter_map(|r| route_of(r, &names))
            .collect())
    }

    /// Adds `routes` in order; on a failure removes those it added and answers the error.
    async fn add_routes(
        &self,
        routes: &[(RouteMessage, String)],
    ) -> Result<(), (NetError, Vec<RouteMessage>)> {
        let mut added = Vec::new();
        for (msg, what) in routes {
            match self.handle.route().add(msg.clone()).execute().await {
                Ok(()) => added.push(msg.clone()),
                Err(e) => return Err((NetError::netlink("add route", what, e), added)),
            }
        }
        Ok(())
    }

    async fn delete_routes(&self, routes: &[RouteMessage]) -> Result<(), NetError> {
        for r in routes {
            self.handle
                .route()
                .del(r.clone())
                .execute()
                .await
                .map_err(|e| NetError::netlink("delete route", describe(r), e))?;
        }
        Ok(())
    }
}

#[async_trait]
impl GuestNetwork for Netlink {
    async fn update_interface(&self, cfg: &InterfaceConfig) -> Result<Interface, NetError> {
        let s = Session::open()?;
        let links = s.links().await?;
        let mac = format_mac(&cfg.mac);
        let link = links
            .iter()
            .find(|l| link_mac(l) == Some(cfg.mac.as_slice()))
            .ok_or_else(|| NetError::NoLinkWithMac(mac.clone()))?;
        let index = link.header.index;
        let current = link_name(link).unwrap_or_default().to_owned();
        let rename = cfg.name.as_ref().filter(|n| **n != current);
        if let Some(name) = rename {
            if links.iter().any(|l| link_name(l) == Some(name.as_str())) {
                return Err(NetError::NameTaken(name.clone()));
            }
        }
        // Nothing can be found wrong from here on; the MTU goes first as the change most
        // likely refused (out of the driver's range), before anything else has changed.
        if let Some(mtu) = cfg.mtu {
            let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
            s.set_link("set the MTU of", &current, msg).await?;
        }
        if let Some(name) = rename {
            if link.header.flags.contains(LinkFlags::Up) {
                // Linux renames only a link that is down.
                let msg = LinkUnspec::new_with_index(index).down().build();
                s.set_link("set down", &current, msg).await?;
            }
            let msg = LinkUnspec::new_with_index(index).name(name.clone()).build();
            s.set_link("rename", &current, msg).await?;
            info!(from = %current, to = %name, %mac, "link renamed");
        }
        let name = rename.cloned().unwrap_or(current);
        let have: Vec<AddressMessage> = s
            .addresses()
            .await?
            .into_iter()
            .filter(|a| a.header.index == index)
            .collect();
        for a in &have {
            let Some(c) = address_cidr(a) else { continue };
            // The kernel's own IPv6 link-local address stays unless asked for by name.
            if !cfg.addresses.contains(&c) && !is_link_local(c.addr) {
                s.handle
                    .address()
                    .del(a.clone())
                    .execute()
                    .await
                    .map_err(|e| NetError::netlink("delete address", c, e))?;
            }
        }
        let had: BTreeSet<String> = have
            .iter()
            .filter_map(address_cidr)
            .map(|c| c.to_string())
            .collect();
        for c in &cfg.addresses {
            if !had.contains(&c.to_string()) {
                s.handle
                    .address()
                    .add(index, c.addr, c.prefix)
                    .execute()
                    .await
                    .map_err(|e| NetError::netlink("add address", c, e))?;
            }
        }
        s.set_link(
            "set up",
            &name,
            LinkUnspec::new_with_index(index).up().build(),
        )
        .await?;
        if let Some(lo) = links
            .iter()
            .find(|l| l.header.flags.contains(LinkFlags::Loopback))
            .filter(|l| !l.header.flags.contains(LinkFlags::Up))
        {
            let msg = LinkUnspec::new_with_index(lo.header.index).up().build();
            s.set_link("set up", "lo", msg).await?;
        }
        info!(%name, %mac, mtu = ?cfg.mtu, addresses = cfg.addresses.len(), "interface updated");
        let links = s.links().await?;
        let link = links
            .iter()
            .find(|l| l.header.index == index)
            .ok_or(NetError::NoLinkWithMac(mac))?;
        Ok(Session::interface(link, &s.addresses().await?))
    }

    async fn update_routes(&self, routes: &[RouteConfig]) -> Result<Vec<Route>, NetError> {
        let s = Session::open()?;
        let index: HashMap<String, u32> = s
            .links()
            .await?
            .iter()
            .filter_map(|l| Some((link_name(l)?.to_owned(), l.header.index)))
            .collect();
        let mut wanted = Vec::with_capacity(routes.len());
        for r in routes {
            let oif = *index
                .get(&r.device)
                .ok_or_else(|| NetError::NoLinkNamed(r.device.clone()))?;
            wanted.push((r, oif, route_message(r, oif)?));
        }
        // Routes through a gateway need the gateway's link route first.
        wanted.sort_by_key(|(r, _, _)| r.gateway.is_some());
        let links: BTreeSet<u32> = wanted.iter().map(|(_, oif, _)| *oif).collect();
        let existing = s.routes().await?;
        let (kernel, old): (Vec<RouteMessage>, Vec<RouteMessage>) = existing
            .into_iter()
            .filter(|r| oif(r).is_some_and(|i| links.contains(&i)))
            .partition(|r| r.header.protocol == RouteProtocol::Kernel);
        // A route the kernel already made for an address (the host often lists it) stays.
        let to_add: Vec<(RouteMessage, String)> = wanted
            .iter()
            .filter(|(r, oif, _)| {
                r.gateway.is_none() && !kernel.iter().any(|k| same_link_route(k, r, *oif))
            })
            .chain(wanted.iter().filter(|(r, _, _)| r.gateway.is_some()))
            .map(|(r, _, msg)| (msg.clone(), format!("to {} dev {}", r.dest, r.device)))
            .collect();
        s.delete_routes(&old).await?;
        if let Err((e, added)) = s.add_routes(&to_add).await {
            warn!(error = %e, "route update failed; restoring the old routes");
            let restore: Vec<(RouteMessage, String)> =
                old.iter().map(|r| (replayable(r), describe(r))).collect();
            if let Err(undo) = s.delete_routes(&added).await {
                warn!(error = %undo, "could not remove a route added before the failure");
            }
            if let Err((undo, _)) = s.add_routes(&restore).await {
                warn!(error = %undo, "could not restore a route");
            }
            return Err(e);
        }
        debug!(deleted = old.len(), added = to_add.len(), "routes updated");
        s.route_list().await
    }

    async fn list_interfaces(&self) -> Result<Vec<Interface>, NetError> {
        Session::open()?.interfaces().await
    }

    async fn list_routes(&self) -> Result<Vec<Route>, NetError> {
        Session::open()?.route_list().await
    }
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

/// An address message's address: `IFA_LOCAL` for IPv4 (`IFA_ADDRESS` is the peer's on a
/// point-to-point link), `IFA_ADDRESS` for IPv6.
fn address_cidr(a: &AddressMessage) -> Option<Cidr> {
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let addr = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    Some(Cidr {
        addr: local.or(addr)?,
        prefix: a.header.prefix_len,
    })
}

fn is_link_local(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn destination(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => route_addr(d),
        _ => None,
    })
}

fn gateway(r: &RouteMessage) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => route_addr(g),
        RouteAttribute::Via(RouteVia::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Via(RouteVia::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}

/// A kernel route the same as the link route `r` would be.
fn same_link_route(k: &RouteMessage, r: &RouteConfig, oif_index: u32) -> bool {
    oif(k) == Some(oif_index)
        && gateway(k).is_none()
        && k.header.destination_prefix_length == r.dest.prefix
        && destination(k) == Some(r.dest.addr)
}

/// The netlink message adding `r` out of link `oif`.
fn route_message(r: &RouteConfig, oif: u32) -> Result<RouteMessage, NetError> {
    let bad = |_| {
        NetError::Invalid(NetConfigError::InvalidRoute {
            dest: r.dest.to_string(),
            reason: "addresses of different families",
        })
    };
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.dest.addr, r.dest.prefix)
        .map_err(bad)?
        .output_interface(oif)
        .scope(RouteScope::from(r.scope));
    if let Some(gw) = r.gateway {
        b = b.gateway(gw).map_err(bad)?;
    }
    if let Some(src) = r.source {
        b = b.pref_source(src).map_err(bad)?;
    }
    Ok(b.build())
}

/// A dumped route as a message that adds it again: the header and the attributes that say
/// where it goes (a dump also carries cache info and the like).
fn replayable(r: &RouteMessage) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header = r.header.clone();
    // A dump flags a route on a link without carrier `linkdown`; adding one so flagged is
    // refused (EINVAL).
    m.header.flags = RouteFlags::empty();
    m.attributes = r
        .attributes
        .iter()
        .filter(|a| {
            matches!(
                a,
                RouteAttribute::Destination(_)
                    | RouteAttribute::Gateway(_)
                    | RouteAttribute::Via(_)
                    | RouteAttribute::Oif(_)
                    | RouteAttribute::PrefSource(_)
                    | RouteAttribute::Priority(_)
                    | RouteAttribute::Table(_)
                    | RouteAttribute::Metrics(_)
                    | RouteAttribute::Preference(_)
            )
        })
        .cloned()
        .collect();
    m
}

fn describe(r: &RouteMessage) -> String {
    let dest = destination(r).map_or_else(|| "default".to_owned(), |d| d.to_string());
    format!(
        "to {dest}/{} dev #{}",
        r.header.destination_prefix_length,
        oif(r).unwrap_or(0)
    )
}

/// A dumped route as a [`Route`]; `None` for one without an output link.
fn route_of(r: &RouteMessage, names: &HashMap<u32, String>) -> Option<Route> {
    let family = match r.header.address_family {
        AddressFamily::Inet => IpFamily::V4,
        AddressFamily::Inet6 => IpFamily::V6,
        _ => return None,
    };
    let device = names.get(&oif(r)?)?.clone();
    let prefix = r.header.destination_prefix_length;
    let dest = match destination(r) {
        Some(d) if prefix > 0 => format!("{d}/{prefix}"),
        _ => String::new(),
    };
    let source = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::PrefSource(s) => route_addr(s),
        _ => None,
    });
    Some(Route {
        dest,
        gateway: gateway(r).map(|g| g.to_string()).unwrap_or_default(),
        device,
        source: source.map(|s| s.to_string()).unwrap_or_default(),
        scope: u32::from(u8::from(r.header.scope)),
        family,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_is_told_apart() {
        assert!(is_link_local("fe80::1".parse().expect("ip")));
        assert!(!is_link_local("fd00::1".parse().expect("ip")));
        assert!(!is_link_local("169.254.0.1".parse().expect("ip")));
    }

    #[test]
    fn route_messages_round_trip_through_route_of() {
        let cfg = Route {
            dest: "10.0.0.0/8".into(),
            gateway: "172.16.0.1".into(),
            device: "eth0".into(),
            source: "172.16.0.2".into(),
            ..Default::default()
        }
        .validate()
        .expect("valid");
        let mut msg = route_message(&cfg, 3).expect("message");
        msg.header.protocol = RouteProtocol::Static;
        let names = HashMap::from([(3, "eth0".to_owned())]);
        let back = route_of(&msg, &names).expect("route");
        assert_eq!(back.dest, "10.0.0.0/8");
        assert_eq!(back.gateway, "172.16.0.1");
        assert_eq!(back.source, "172.16.0.2");
        assert_eq!(back.device, "eth0");
        assert_eq!(replayable(&msg), msg);
        let default = Route {
            gateway: "172.16.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        }
        .validate()
        .expect("valid");
        let msg = route_message(&default, 3).expect("message");
        assert_eq!(route_of(&msg, &names).expect("route").dest, "");
        assert!(route_of(&msg, &HashMap::new()).is_none(), "unknown link");
    }
}
