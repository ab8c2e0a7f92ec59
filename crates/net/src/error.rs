//! The error of setting up, reaching and removing a VM's network.

use std::path::PathBuf;

/// What failed while setting up, publishing or removing a VM's network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A system call or file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("netlink: {op}: {source}")]
    Netlink {
        /// What was asked.
        op: String,
        /// The kernel's answer (boxed: it is large).
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// `nft` refused the rules or could not run.
    #[error("nft ({what}): {reason}")]
    Firewall {
        /// Which rules.
        what: &'static str,
        /// Its message.
        reason: String,
    },
    /// Every VM address of the subnet is taken.
    #[error("no free VM address in {subnet}: {capacity} VMs have one")]
    SubnetFull {
        /// The configured subnet.
        subnet: ipnet::Ipv4Net,
        /// How many VMs it holds.
        capacity: u32,
    },
    /// The configuration cannot work.
    #[error("invalid network config: {0}")]
    Invalid(String),
    /// A step failed on purpose (tests).
    #[error("injected failure at {0:?}")]
    Injected(crate::NetStep),
}

impl NetError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        Self::Netlink {
            op: op.into(),
            source: Box::new(source),
        }
    }
}

/// The result of this crate's operations.
pub type Result<T> = std::result::Result<T, NetError>;
