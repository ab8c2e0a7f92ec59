//! Guest networking (Kata's `UpdateInterface`, `UpdateRoutes`, `ListInterfaces`,
//! `ListRoutes`): the interface and route types, and the one check of what a request may
//! hold, shared by the guest agent and `FakeAgent` so that both refuse the same input.
//!
//! Addresses and routes travel as text, as in Kata: `"172.16.0.2"` with mask `"30"`, a route
//! to `"10.0.0.0/8"` (empty for the default route) via `"172.16.0.1"`.

use std::fmt;
use std::net::IpAddr;

use thiserror::Error;

/// Route scope `RT_SCOPE_UNIVERSE`: a route through a gateway.
pub const SCOPE_UNIVERSE: u32 = 0;
/// Route scope `RT_SCOPE_LINK`: a destination on the link itself.
pub const SCOPE_LINK: u32 = 253;
/// Route scope `RT_SCOPE_HOST`.
pub const SCOPE_HOST: u32 = 254;

/// Longest interface name Linux takes (`IFNAMSIZ` less its NUL).
pub const MAX_NAME_LEN: usize = 15;

/// IP version of an address or route (Kata's `IPFamily`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum IpFamily {
    /// IPv4 (the wire's default).
    #[default]
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// Longest prefix of the family: 32 or 128.
    pub fn max_prefix(self) -> u8 {
        match self {
            IpFamily::V4 => 32,
            IpFamily::V6 => 128,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

/// An address of an interface (Kata's `IPAddress`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct IpAddress {
    /// Its family; must match `address`.
    pub family: IpFamily,
    /// `"172.16.0.2"`, `"fd00::2"`.
    pub address: String,
    /// The prefix length in decimal, as Kata sends it: `"30"`.
    pub mask: String,
}

impl IpAddress {
    /// `addr/prefix`, with the family taken from `addr`.
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        IpAddress {
            family: IpFamily::of(addr),
            address: addr.to_string(),
            mask: prefix.to_string(),
        }
    }

    /// The address and prefix, checked: a valid address of `family` and a prefix it can have.
    pub fn cidr(&self) -> Result<Cidr, NetConfigError> {
        let text = format!("{}/{}", self.address, self.mask);
        let bad = |reason| NetConfigError::InvalidAddress {
            address: text.clone(),
            reason,
        };
        let addr: IpAddr = self
            .address
            .parse()
            .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
        let prefix: u8 = self.mask.parse().map_err(|_| bad("bad prefix length"))?;
        if IpFamily::of(addr) != self.family {
            return Err(bad("family does not match the address"));
        }
        if prefix > self.family.max_prefix() {
            return Err(bad("prefix too long"));
        }
        Ok(Cidr { addr, prefix })
    }
}

/// An address with its prefix length, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length, at most 32 or 128.
    pub prefix: u8,
}

impl Cidr {
    /// The family of the address.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }

    /// True when the address has no bits set past the prefix (a network, as a route's
    /// destination must be).
    pub fn is_network(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                u32::from(a) & host == 0
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
                u128::from(a) & host == 0
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A network interface of the guest (Kata's `Interface`, the fields vmfactory uses).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Interface {
    /// The link's current name, in answers; requests leave it empty.
    pub device: String,
    /// The name to give the link (empty: keep it), or the name it has in answers.
    pub name: String,
    /// The addresses the link is to have: all of them, replacing the others.
    pub ip_addresses: Vec<IpAddress>,
    /// The MTU to set (0: keep it), or the MTU it has in answers.
    pub mtu: u64,
    /// The MAC, `"02:00:ca:fe:00:01"`: how the guest finds the link the host means.
    pub hw_addr: String,
}

/// An [`Interface`] request, checked: see [`Interface::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InterfaceConfig {
    /// The MAC of the link to configure.
    pub mac: [u8; 6],
    /// The new name, if any.
    pub name: Option<String>,
    /// The new MTU, if any.
    pub mtu: Option<u32>,
    /// All the addresses the link is to have.
    pub addresses: Vec<Cidr>,
}

impl Interface {
    /// Checks an `UpdateInterface` request: a MAC, a name Linux takes (or none), an MTU that
    /// fits 32 bits, valid addresses.
    pub fn validate(&self) -> Result<InterfaceConfig, NetConfigError> {
        let mac = parse_mac(&self.hw_addr)?;
        let name = if self.name.is_empty() {
            None
        } else {
            check_name(&self.name)?;
            Some(self.name.clone())
        };
        let mtu = match self.mtu {
            0 => None,
            m => Some(u32::try_from(m).map_err(|_| NetConfigError::InvalidMtu(m))?),
        };
        let addresses = self
            .ip_addresses
            .iter()
            .map(IpAddress::cidr)
            .collect::<Result<_, _>>()?;
        Ok(InterfaceConfig {
            mac,
            name,
            mtu,
            addresses,
        })
    }
}

/// A route of the guest's main table (Kata's `Route`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Route {
    /// `"10.0.0.0/8"` (a bare address is a host route); empty for the default route.
    pub dest: String,
    /// The next hop; empty for a destination on the link.
    pub gateway: String,
    /// The link's name.
    pub device: String,
    /// The preferred source address; may be empty.
    pub source: String,
    /// `RT_SCOPE_*` ([`SCOPE_UNIVERSE`], [`SCOPE_LINK`], [`SCOPE_HOST`]).
    pub scope: u32,
    /// The family of `dest`, `gateway` and `source`.
    pub family: IpFamily,
}

/// A [`Route`], checked: see [`Route::validate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RouteConfig {
    /// The destination network; prefix 0 for the default route.
    pub dest: Cidr,
    /// The next hop.
    pub gateway: Option<IpAddr>,
    /// The link's name.
    pub device: String,
    /// The preferred source address.
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*`.
    pub scope: u8,
}

impl Route {
    /// Checks one route of an `UpdateRoutes` request: a link name, a destination network
    /// (no host bits set), and addresses all of the route's family.
    pub fn validate(&self) -> Result<RouteConfig, NetConfigError> {
        let bad = |reason| NetConfigError::InvalidRoute {
            dest: self.dest.clone(),
            reason,
        };
        if self.device.is_empty() {
            return Err(bad("no device"));
        }
        check_name(&self.device)?;
        let family = self.family;
        let addr = |text: &str| -> Result<Option<IpAddr>, NetConfigError> {
            if text.is_empty() {
                return Ok(None);
            }
            let a: IpAddr = text.parse().map_err(|_| NetConfigError::InvalidAddress {
                address: text.to_owned(),
                reason: "not an IPv4 or IPv6 address",
            })?;
            if IpFamily::of(a) != family {
                return Err(bad("an address is not of the route's family"));
            }
            Ok(Some(a))
        };
        let dest = match self.dest.as_str() {
            "" | "default" => Cidr {
                addr: match family {
                    IpFamily::V4 => IpAddr::from([0u8; 4]),
                    IpFamily::V6 => IpAddr::from([0u8; 16]),
                },
                prefix: 0,
            },
            d => {
                let (a, p) = match d.split_once('/') {
                    Some((a, p)) => (a, p.to_owned()),
                    None => (d, family.max_prefix().to_string()),
                };
                let cidr = IpAddress {
                    family,
                    address: a.to_owned(),
                    mask: p,
                }
                .cidr()?;
                if !cidr.is_network() {
                    return Err(bad("host bits set past the prefix"));
                }
                cidr
            }
        };
        let scope = u8::try_from(self.scope).map_err(|_| bad("scope over 255"))?;
        Ok(RouteConfig {
            dest,
            gateway: addr(&self.gateway)?,
            device: self.device.clone(),
            source: addr(&self.source)?,
            scope,
        })
    }
}

/// What is wrong with a networking request. Found before the guest changes anything.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NetConfigError {
    /// `hw_addr` is not six hex bytes separated by colons.
    #[error("Invalid MAC {0:?}")]
    InvalidMac(String),
    /// An interface or device name Linux would refuse.
    #[error("Invalid interface name {0:?}")]
    InvalidName(String),
    /// An MTU over 32 bits.
    #[error("Invalid MTU {0}")]
    InvalidMtu(u64),
    /// An address that does not parse or does not fit its family.
    #[error("Invalid address {address}: {reason}")]
    InvalidAddress {
        /// The address as given (`"300.1.1.1/24"`).
        address: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A route that cannot be added as given.
    #[error("Invalid route to {dest:?}: {reason}")]
    InvalidRoute {
        /// Its destination as given.
        dest: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Parses `"02:00:ca:fe:00:01"` (either case).
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetConfigError> {
    let bad = || NetConfigError::InvalidMac(text.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Formats a hardware address as `02:00:ca:fe:00:01` (lower case, any length).
pub fn format_mac(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A name Linux takes for a link: 1 to 15 bytes, no `/`, `:` or white space, not `.` or `..`.
fn check_name(name: &str) -> Result<(), NetConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(NetConfigError::InvalidName(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: &str, m: &str) -> IpAddress {
        IpAddress {
            family: if a.contains(':') {
                IpFamily::V6
            } else {
                IpFamily::V4
            },
            address: a.into(),
            mask: m.into(),
        }
    }

    #[test]
    fn macs_parse_and_format() {
        assert_eq!(
            parse_mac("02:00:CA:fe:00:01").expect("mac"),
            [2, 0, 0xca, 0xfe, 0, 1]
        );
        assert_eq!(format_mac(&[2, 0, 0xca, 0xfe, 0, 1]), "02:00:ca:fe:00:01");
        for bad in [
            "",
            "02:00:ca:fe:00",
            "02:00:ca:fe:00:01:02",
            "2:00:ca:fe:00:01",
            "zz:00:ca:fe:00:01",
        ] {
            assert_eq!(parse_mac(bad), Err(NetConfigError::InvalidMac(bad.into())));
        }
    }

    #[test]
    fn addresses_are_checked() {
        let c = addr("172.16.0.2", "30").cidr().expect("valid");
        assert_eq!(c.to_string(), "172.16.0.2/30");
        assert!(!c.is_network());
        assert_eq!(addr("fd00::1", "64").cidr().expect("v6").prefix, 64);
        let err = addr("300.1.1.1", "24").cidr().expect_err("bad octet");
        assert_eq!(
            err.to_string(),
            "Invalid address 300.1.1.1/24: not an IPv4 or IPv6 address"
        );
        assert!(addr("10.0.0.1", "33").cidr().is_err());
        assert!(addr("10.0.0.1", "").cidr().is_err());
        assert!(addr("fd00::1", "129").cidr().is_err());
        let mut wrong = addr("10.0.0.1", "8");
        wrong.family = IpFamily::V6;
        assert!(wrong.cidr().is_err());
        assert_eq!(
            IpAddress::new("10.1.2.3".parse().expect("ip"), 8),
            addr("10.1.2.3", "8")
        );
    }

    #[test]
    fn interfaces_are_checked() {
        let iface = Interface {
            name: "eth0".into(),
            hw_addr: "02:00:00:00:00:01".into(),
            mtu: 1400,
            ip_addresses: vec![addr("172.16.0.2", "30")],
            ..Default::default()
        };
        let cfg = iface.validate().expect("valid");
        assert_eq!(cfg.mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(cfg.name.as_deref(), Some("eth0"));
        assert_eq!(cfg.mtu, Some(1400));
        let keep = Interface {
            name: String::new(),
            mtu: 0,
            ..iface.clone()
        };
        let cfg = keep.validate().expect("valid");
        assert_eq!((cfg.name, cfg.mtu), (None, None));
        for bad in [
            Interface {
                hw_addr: String::new(),
                ..iface.clone()
            },
            Interface {
                name: "a-name-far-too-long".into(),
                ..iface.clone()
            },
            Interface {
                name: "a/b".into(),
                ..iface.clone()
            },
            Interface {
                mtu: 1 << 40,
                ..iface.clone()
            },
            Interface {
                ip_addresses: vec![addr("172.16.0.2", "30"), addr("300.1.1.1", "24")],
                ..iface.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn routes_are_checked() {
        let default = Route {
            gateway: "172.16.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        };
        let cfg = default.validate().expect("default route");
        assert_eq!(cfg.dest.to_string(), "0.0.0.0/0");
        assert_eq!(cfg.gateway, Some("172.16.0.1".parse().expect("ip")));
        let v6 = Route {
            dest: "default".into(),
            gateway: "fd00::1".into(),
            device: "eth0".into(),
            family: IpFamily::V6,
            ..Default::default()
        };
        assert_eq!(v6.validate().expect("v6").dest.to_string(), "::/0");
        let link = Route {
            dest: "172.16.0.0/30".into(),
            device: "eth0".into(),
            source: "172.16.0.2".into(),
            scope: SCOPE_LINK,
            ..Default::default()
        };
        let cfg = link.validate().expect("link route");
        assert_eq!((cfg.gateway, cfg.scope), (None, 253));
        let host = Route {
            dest: "10.1.1.1".into(),
            ..link.clone()
        };
        assert_eq!(host.validate().expect("host").dest.prefix, 32);
        for bad in [
            Route {
                device: String::new(),
                ..default.clone()
            },
            Route {
                dest: "172.16.0.1/30".into(),
                ..link.clone()
            },
            Route {
                gateway: "fd00::1".into(),
                ..default.clone()
            },
            Route {
                gateway: "300.1.1.1".into(),
                ..default.clone()
            },
            Route {
                scope: 256,
                ..link.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
