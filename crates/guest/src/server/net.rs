//! The guest's network as the networking calls see it: the injectable [`GuestNetwork`], its
//! errors, and [`Netlink`] (in `netlink.rs`), the real one over rtnetlink.
//!
//! The service checks every request ([`Interface::validate`](vmfactory_agent::Interface::validate),
//! [`Route::validate`](vmfactory_agent::Route::validate)) before a [`GuestNetwork`] sees it, so
//! an implementation gets only well-formed input and tests can stand in a fake.

use std::fmt;
use std::io;

use async_trait::async_trait;
use thiserror::Error;
use ttrpc::Code;
use vmfactory_agent::net::{InterfaceConfig, NetConfigError, RouteConfig};
use vmfactory_agent::{Interface, Route};

pub use super::netlink::Netlink;

/// The guest's links and routes, injectable so that service tests need no network namespace.
#[async_trait]
pub trait GuestNetwork: Send + Sync + fmt::Debug {
    /// Configures the link with `cfg.mac`: MTU, name, exactly `cfg.addresses`, up; brings
    /// `lo` up too. Answers the link as it then is.
    async fn update_interface(&self, cfg: &InterfaceConfig) -> Result<Interface, NetError>;
    /// Replaces the non-kernel routes of the links `routes` name with `routes`; answers all
    /// routes after.
    async fn update_routes(&self, routes: &[RouteConfig]) -> Result<Vec<Route>, NetError>;
    /// Every link with its addresses, by index.
    async fn list_interfaces(&self) -> Result<Vec<Interface>, NetError>;
    /// The unicast routes of the main table that go out of a link.
    async fn list_routes(&self) -> Result<Vec<Route>, NetError>;
}

/// What a networking call can fail at.
#[derive(Debug, Error)]
pub enum NetError {
    /// The request is malformed; nothing was changed.
    #[error(transparent)]
    Invalid(#[from] NetConfigError),
    /// No link has the MAC the request names; nothing was changed.
    #[error("No link with MAC {0}")]
    NoLinkWithMac(String),
    /// A route names a link the guest does not have; nothing was changed.
    #[error("No link named {0}")]
    NoLinkNamed(String),
    /// Another link already has the name asked for; nothing was changed.
    #[error("Another link is named {0}")]
    NameTaken(String),
    /// The netlink socket could not be opened.
    #[error("Failed to open a netlink socket")]
    Socket(#[source] io::Error),
    /// The kernel refused a change or a dump.
    #[error("Failed to {op} {target}")]
    Netlink {
        /// What was being done ("set the MTU of", "add route", ...).
        op: &'static str,
        /// What it was done to (a link, an address, a route).
        target: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
}

impl NetError {
    /// The ttRPC status code this error answers with.
    pub fn code(&self) -> Code {
        match self {
            NetError::Invalid(_) => Code::INVALID_ARGUMENT,
            NetError::NoLinkWithMac(_) | NetError::NoLinkNamed(_) => Code::NOT_FOUND,
            NetError::NameTaken(_) => Code::ALREADY_EXISTS,
            NetError::Socket(_) | NetError::Netlink { .. } => Code::INTERNAL,
        }
    }

    pub(super) fn netlink(
        op: &'static str,
        target: impl fmt::Display,
        source: rtnetlink::Error,
    ) -> Self {
        NetError::Netlink {
            op,
            target: target.to_string(),
            source,
        }
    }
}
