//! The nftables rules: one table on the host that keeps VMs apart and NATs their egress, and
//! one in each VM's namespace that maps the VM's host-side address to the guest's.
//!
//! Rules go through `nft -f -`: one atomic transaction per table, in the syntax operators
//! read in `nft list ruleset`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::error::{NetError, Result};
use crate::names::{GUEST_GATEWAY, HOST_LINK_PREFIX, NS_UPLINK, TAP};

/// The `nft` binary (looked up in `PATH`).
pub const NFT: &str = "nft";

/// The host table's name (family `inet`).
pub const HOST_TABLE: &str = "vmfactory";

/// The host's rules, the same for every VM: a VM's packets reach the host only at its own
/// link's address, never another VM, and leave the host masqueraded. Replacing the table is
/// atomic and idempotent.
pub(crate) fn host_rules() -> String {
    let vm = format!("\"{HOST_LINK_PREFIX}*\"");
    format!(
        "add table inet {t}
flush table inet {t}
add chain inet {t} input {{ type filter hook input priority filter; policy accept; }}
add chain inet {t} forward {{ type filter hook forward priority filter; policy accept; }}
add chain inet {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add rule inet {t} input iifname {vm} ct state established,related accept
add rule inet {t} input iifname {vm} fib daddr . iif type local accept
add rule inet {t} input iifname {vm} drop
add rule inet {t} forward iifname {vm} oifname {vm} drop
add rule inet {t} postrouting iifname {vm} oifname != {vm} masquerade
",
        t = HOST_TABLE
    )
}

/// What a VM's namespace needs to map addresses.
pub(crate) struct NsRules {
    /// The VM's address on the host link (the namespace's end).
    pub address: Ipv4Addr,
    /// The host's end of the link.
    pub host_address: Ipv4Addr,
    /// The guest's own address.
    pub guest: Ipv4Addr,
    /// Whether the guest may open connections beyond the host's end of its link.
    pub egress: bool,
}

/// The rules of a VM's namespace: what reaches its host-side address goes to the guest, what
/// the guest sends out leaves from that address, and the guest's gateway stands for the host
/// (as 10.0.2.2 does with QEMU's user networking), whatever the VM's host-side address.
pub(crate) fn ns_rules(r: &NsRules) -> String {
    let mut s = format!(
        "add table ip vmfactory
add chain ip vmfactory prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain ip vmfactory postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add chain ip vmfactory forward {{ type filter hook forward priority filter; policy accept; }}
add rule ip vmfactory prerouting iifname \"{uplink}\" ip daddr {addr} dnat to {guest}
add rule ip vmfactory prerouting iifname \"{tap}\" ip daddr {gateway} dnat to {host}
add rule ip vmfactory postrouting oifname \"{uplink}\" snat to {addr}
",
        uplink = NS_UPLINK,
        tap = TAP,
        addr = r.address,
        guest = r.guest,
        gateway = GUEST_GATEWAY,
        host = r.host_address,
    );
    if !r.egress {
        s.push_str(&format!(
            "add rule ip vmfactory forward iifname \"{tap}\" ip daddr != {host} ct state new drop\n",
            tap = TAP,
            host = r.host_address,
        ));
    }
    s
}

/// Applies `rules` with `nft -f -` in the calling thread's network namespace.
pub(crate) fn apply(what: &'static str, rules: &str) -> Result<()> {
    let fail = |reason: String| NetError::Firewall { what, reason };
    let mut child = Command::new(NFT)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {NFT}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| fail(format!("writing the rules: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(fail(
        err.lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed")
            .trim()
            .to_owned(),
    ))
}

/// Deletes the host table (when no VM's link is left): whether there was one.
pub(crate) fn delete_host_table() -> Result<bool> {
    match apply("host", &format!("delete table inet {HOST_TABLE}\n")) {
        Ok(()) => Ok(true),
        Err(NetError::Firewall { reason, .. })
            if reason.contains("No such file") || reason.contains("does not exist") =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_off_adds_the_drop_rule() {
        let mut r = NsRules {
            address: Ipv4Addr::new(10, 201, 0, 2),
            host_address: Ipv4Addr::new(10, 201, 0, 1),
            guest: Ipv4Addr::new(10, 0, 2, 15),
            egress: true,
        };
        let open = ns_rules(&r);
        assert!(open.contains("dnat to 10.0.2.15") && open.contains("snat to 10.201.0.2"));
        assert!(open.contains("ip daddr 10.0.2.2 dnat to 10.201.0.1"));
        assert!(!open.contains("drop"));
        r.egress = false;
        assert!(ns_rules(&r).contains("ip daddr != 10.201.0.1 ct state new drop"));
        assert!(host_rules().contains("iifname \"vmf-*\" oifname \"vmf-*\" drop"));
    }
}
