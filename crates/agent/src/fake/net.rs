//! The fake guest's network behind [`FakeAgent`](super::FakeAgent)'s networking calls: links
//! found by MAC, an address list each, and one route table. Input is checked as the real
//! agent checks it ([`Interface::validate`], [`Route::validate`]) and refused with the same
//! status codes, before anything changes.

use std::collections::BTreeSet;

use ttrpc::Code;

use super::workload::status;
use crate::error::Result;
use crate::net::{format_mac, parse_mac, Interface, IpAddress, Route};

/// Links and routes of the fake guest.
#[derive(Debug)]
pub(super) struct FakeNetwork {
    links: Vec<Interface>,
    routes: Vec<Route>,
}

impl Default for FakeNetwork {
    /// A guest with only `lo` (127.0.0.1/8, MTU 65536).
    fn default() -> Self {
        FakeNetwork {
            links: vec![Interface {
                device: "lo".into(),
                name: "lo".into(),
                ip_addresses: vec![IpAddress::new([127, 0, 0, 1].into(), 8)],
                mtu: 65536,
                hw_addr: format_mac(&[0; 6]),
            }],
            routes: Vec::new(),
        }
    }
}

impl FakeNetwork {
    /// Adds a link as a hot-plugged NIC appears: MTU 1500, no address.
    pub(super) fn add_link(&mut self, name: &str, mac: [u8; 6]) {
        self.links.push(Interface {
            device: name.into(),
            name: name.into(),
            mtu: 1500,
            hw_addr: format_mac(&mac),
            ..Default::default()
        });
    }

    pub(super) fn update_interface(&mut self, iface: &Interface) -> Result<Interface> {
        const M: &str = "UpdateInterface";
        let cfg = iface
            .validate()
            .map_err(|e| status(M, Code::INVALID_ARGUMENT, e.to_string()))?;
        let idx = self
            .links
            .iter()
            .position(|l| parse_mac(&l.hw_addr).ok() == Some(cfg.mac))
            .ok_or_else(|| {
                status(
                    M,
                    Code::NOT_FOUND,
                    format!("No link with MAC {}", format_mac(&cfg.mac)),
                )
            })?;
        if let Some(name) = &cfg.name {
            if self
                .links
                .iter()
                .enumerate()
                .any(|(i, l)| i != idx && &l.name == name)
            {
                return Err(status(
                    M,
                    Code::ALREADY_EXISTS,
                    format!("Another link is named {name}"),
                ));
            }
        }
        let link = &mut self.links[idx];
        if let Some(name) = cfg.name {
            link.device.clone_from(&name);
            link.name = name;
        }
        if let Some(mtu) = cfg.mtu {
            link.mtu = u64::from(mtu);
        }
        link.ip_addresses = cfg
            .addresses
            .iter()
            .map(|c| IpAddress::new(c.addr, c.prefix))
            .collect();
        Ok(link.clone())
    }

    pub(super) fn update_routes(&mut self, routes: &[Route]) -> Result<Vec<Route>> {
        const M: &str = "UpdateRoutes";
        let mut devices = BTreeSet::new();
        for r in routes {
            r.validate()
                .map_err(|e| status(M, Code::INVALID_ARGUMENT, e.to_string()))?;
            if !self.links.iter().any(|l| l.name == r.device) {
                return Err(status(
                    M,
                    Code::NOT_FOUND,
                    format!("No link named {}", r.device),
                ));
            }
            devices.insert(r.device.as_str());
        }
        self.routes.retain(|r| !devices.contains(r.device.as_str()));
        self.routes.extend(routes.iter().cloned());
        Ok(self.routes.clone())
    }

    pub(super) fn interfaces(&self) -> Vec<Interface> {
        self.links.clone()
    }

    pub(super) fn routes(&self) -> Vec<Route> {
        self.routes.clone()
    }
}
