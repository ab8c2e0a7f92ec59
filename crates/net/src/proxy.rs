//! Published ports: a host TCP port whose connections are forwarded to a VM's port, as
//! `docker run -p` does with its userland proxy. A proxy rather than DNAT rules on the host:
//! it serves `127.0.0.1` too (DNAT from loopback needs `route_localnet`), and it ends with its
//! owner, so nothing is left on the host when the process that published it is gone.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::debug;

use crate::error::{NetError, Result};

/// `[HOST_IP:]HOST_PORT:GUEST_PORT`, as `docker run -p` takes it (TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortSpec {
    /// Where the host listens (`0.0.0.0` unless given).
    pub host: SocketAddr,
    /// The guest's port.
    pub guest_port: u16,
}

impl FromStr for PortSpec {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            NetError::Invalid(format!(
                "bad port mapping {s:?}: {why} (want [HOST_IP:]HOST_PORT:GUEST_PORT)"
            ))
        };
        let port = |p: &str| p.parse::<u16>().map_err(|_| bad("not a port number"));
        let (host_part, guest) = s.rsplit_once(':').ok_or_else(|| bad("no ':'"))?;
        let guest_port = port(guest)?;
        let host = match host_part.rsplit_once(':') {
            Some((ip, p)) => SocketAddr::new(
                ip.parse::<IpAddr>().map_err(|_| bad("not an IP address"))?,
                port(p)?,
            ),
            None => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port(host_part)?),
        };
        if guest_port == 0 {
            return Err(bad("guest port 0"));
        }
        Ok(Self { host, guest_port })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.guest_port)
    }
}

/// A published port: forwarding until dropped.
#[derive(Debug)]
pub struct Published {
    local: SocketAddr,
    target: SocketAddr,
    task: JoinHandle<()>,
}

/// A host port bound for publishing, not yet forwarding: bound before the VM exists, so
/// that a taken port fails before anything starts.
#[derive(Debug)]
pub struct BoundPort {
    listener: TcpListener,
    local: SocketAddr,
}

impl BoundPort {
    /// Listens on `host`; fails at once if the port is taken.
    pub async fn bind(host: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(host)
            .await
            .map_err(|e| NetError::io("Listening on", host.to_string(), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| NetError::io("Reading the address of", host.to_string(), e))?;
        Ok(Self { listener, local })
    }

    /// Where the host listens (the actual port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Forwards each connection to `target` (a VM's address and port) until dropped.
    pub fn forward(self, target: SocketAddr) -> Published {
        let Self { listener, local } = self;
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, peer)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    match TcpStream::connect(target).await {
                        Ok(mut outbound) => {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        Err(e) => debug!(%peer, %target, error = %e, "published port: no guest"),
                    }
                });
            }
        });
        Published {
            local,
            target,
            task,
        }
    }
}

impl Published {
    /// [`BoundPort::bind`] then [`BoundPort::forward`].
    pub async fn start(host: SocketAddr, target: SocketAddr) -> Result<Self> {
        Ok(BoundPort::bind(host).await?.forward(target))
    }

    /// Where the host listens (the port is the actual one when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Where connections go.
    pub fn target(&self) -> SocketAddr {
        self.target
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn port_specs_parse_as_docker_writes_them() {
        let p: PortSpec = "8080:80".parse().expect("short");
        assert_eq!(p.host, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(p.guest_port, 80);
        let p: PortSpec = "127.0.0.1:8080:80".parse().expect("with ip");
        assert_eq!(p.host, "127.0.0.1:8080".parse().expect("addr"));
        for bad in ["80", "x:80", "8080:0", "8080:70000", "1.2.3:8080:80", ""] {
            let e = bad.parse::<PortSpec>().expect_err(bad).to_string();
            assert!(e.contains("HOST_PORT:GUEST_PORT"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_published_port_forwards_both_ways_and_stops_when_dropped() {
        let server = TcpListener::bind("127.0.0.1:0").await.expect("server");
        let target = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.expect("read");
            s.write_all(&buf).await.expect("echo");
        });
        let p = Published::start("127.0.0.1:0".parse().expect("addr"), target)
            .await
            .expect("publish");
        let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
        c.write_all(b"hello").await.expect("write");
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"hello");
        // A taken port fails at once.
        assert!(Published::start(p.local_addr(), target).await.is_err());
        let local = p.local_addr();
        drop(p);
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(TcpStream::connect(local).await.is_err(), "still listening");
    }
}
