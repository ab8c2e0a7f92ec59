//! Agent URLs: where the host dials the guest agent.
//!
//! | URL | Transport |
//! |-----|-----------|
//! | `vsock://CID:PORT` | AF_VSOCK (needs `/dev/vhost-vsock` on the host) |
//! | `hvsock://PATH:PORT` | hybrid vsock: unix socket + `CONNECT <port>\n` (port after the last `:`) |
//! | `serial://PATH` | unix-socket chardev of a virtio-serial port |
//! | `unix://PATH` | plain unix socket (an agent run on the host with `--serve-unix`) |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::Error;

/// A parsed agent URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AgentUrl {
    /// `vsock://CID:PORT`.
    Vsock {
        /// Guest context id.
        cid: u32,
        /// vsock port.
        port: u32,
    },
    /// `hvsock://PATH:PORT`.
    Hvsock {
        /// The multiplexer's unix socket.
        path: PathBuf,
        /// vsock port to `CONNECT` to.
        port: u32,
    },
    /// `serial://PATH`.
    Serial {
        /// The chardev's unix socket.
        path: PathBuf,
    },
    /// `unix://PATH`.
    Unix {
        /// The agent's unix socket.
        path: PathBuf,
    },
}

impl AgentUrl {
    /// Parses an agent URL; see the module docs for the forms.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("missing scheme://"))?;
        let abs_path = |p: &str| {
            if p.is_empty() {
                Err(bad("empty path"))
            } else if !p.starts_with('/') {
                Err(bad("path is not absolute"))
            } else if p.contains('\0') {
                Err(bad("path contains NUL"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        let port = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| bad("port is not a 32-bit number"))
        };
        match scheme {
            "vsock" => {
                let (cid, p) = rest
                    .split_once(':')
                    .ok_or_else(|| bad("expected CID:PORT"))?;
                let cid = cid
                    .parse::<u32>()
                    .map_err(|_| bad("CID is not a 32-bit number"))?;
                Ok(AgentUrl::Vsock {
                    cid,
                    port: port(p)?,
                })
            }
            "hvsock" => {
                let (path, p) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected PATH:PORT"))?;
                Ok(AgentUrl::Hvsock {
                    path: abs_path(path)?,
                    port: port(p)?,
                })
            }
            "serial" => Ok(AgentUrl::Serial {
                path: abs_path(rest)?,
            }),
            "unix" => Ok(AgentUrl::Unix {
                path: abs_path(rest)?,
            }),
            _ => Err(bad("unknown scheme (want vsock, hvsock, serial or unix)")),
        }
    }
}

impl FromStr for AgentUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        AgentUrl::parse(s)
    }
}

impl TryFrom<&str> for AgentUrl {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self, Error> {
        AgentUrl::parse(s)
    }
}

impl TryFrom<String> for AgentUrl {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        AgentUrl::parse(&s)
    }
}

impl TryFrom<&String> for AgentUrl {
    type Error = Error;

    fn try_from(s: &String) -> Result<Self, Error> {
        AgentUrl::parse(s)
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentUrl::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            AgentUrl::Hvsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            AgentUrl::Serial { path } => write!(f, "serial://{}", path.display()),
            AgentUrl::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(url: &str) -> &'static str {
        match AgentUrl::parse(url) {
            Err(Error::InvalidUrl { reason, url: u }) => {
                assert_eq!(u, url);
                reason
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn parses_vsock() {
        assert_eq!(
            AgentUrl::parse("vsock://3:1024").expect("parse"),
            AgentUrl::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            AgentUrl::parse("vsock://4294967295:0").expect("parse"),
            AgentUrl::Vsock {
                cid: u32::MAX,
                port: 0
            }
        );
    }

    #[test]
    fn parses_hvsock_port_after_last_colon() {
        assert_eq!(
            AgentUrl::parse("hvsock:///run/a:b/vm.vsock:1024").expect("parse"),
            AgentUrl::Hvsock {
                path: PathBuf::from("/run/a:b/vm.vsock"),
                port: 1024
            }
        );
    }

    #[test]
    fn parses_serial_and_unix() {
        assert_eq!(
            "serial:///run/vm/agent.sock"
                .parse::<AgentUrl>()
                .expect("parse"),
            AgentUrl::Serial {
                path: PathBuf::from("/run/vm/agent.sock")
            }
        );
        assert_eq!(
            AgentUrl::try_from("unix:///tmp/a").expect("parse"),
            AgentUrl::Unix {
                path: PathBuf::from("/tmp/a")
            }
        );
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "vsock://3:1024",
            "hvsock:///run/vm.vsock:1024",
            "serial:///run/vm/agent.sock",
            "unix:///tmp/a",
        ] {
            assert_eq!(AgentUrl::parse(s).expect("parse").to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_urls() {
        assert_eq!(reason("3:1024"), "missing scheme://");
        assert_eq!(
            reason("tcp://1.2.3.4:5"),
            "unknown scheme (want vsock, hvsock, serial or unix)"
        );
        assert_eq!(reason("vsock://3"), "expected CID:PORT");
        assert_eq!(reason("vsock://x:1024"), "CID is not a 32-bit number");
        assert_eq!(reason("vsock://3:"), "port is not a 32-bit number");
        assert_eq!(
            reason("vsock://3:99999999999"),
            "port is not a 32-bit number"
        );
        assert_eq!(reason("vsock://-1:1024"), "CID is not a 32-bit number");
        assert_eq!(reason("hvsock:///run/vm.vsock"), "expected PATH:PORT");
        assert_eq!(reason("hvsock://vm.vsock:1024"), "path is not absolute");
        assert_eq!(reason("hvsock://:1024"), "empty path");
        assert_eq!(reason("hvsock:///x:port"), "port is not a 32-bit number");
        assert_eq!(reason("serial://"), "empty path");
        assert_eq!(reason("serial://relative/p"), "path is not absolute");
        assert_eq!(reason("unix:///a\0b"), "path contains NUL");
    }
}
