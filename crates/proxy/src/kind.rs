//! The proxy kinds and their names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Which [`crate::Proxy`] implementation a VM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    /// [`crate::BuiltinProxy`]: logs the guest console in-process. Named `builtin`.
    #[default]
    Builtin,
    /// [`crate::NoProxy`]: does nothing. Named `none`.
    None,
}

impl ProxyKind {
    /// The kind's configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyKind::Builtin => "builtin",
            ProxyKind::None => "none",
        }
    }
}

impl fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProxyKind {
    type Err = Error;

    /// Parses `builtin` or `none`; anything else is [`Error::UnknownKind`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "builtin" => Ok(ProxyKind::Builtin),
            "none" => Ok(ProxyKind::None),
            _ => Err(Error::UnknownKind { kind: s.to_owned() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_kinds() {
        assert_eq!("builtin".parse::<ProxyKind>().unwrap(), ProxyKind::Builtin);
        assert_eq!("none".parse::<ProxyKind>().unwrap(), ProxyKind::None);
        for kind in [ProxyKind::Builtin, ProxyKind::None] {
            assert_eq!(kind.to_string().parse::<ProxyKind>().unwrap(), kind);
        }
        assert_eq!(ProxyKind::default(), ProxyKind::Builtin);
    }

    #[test]
    fn unknown_kind_is_a_typed_error() {
        for name in ["", "kata", "Builtin", " none", "kataProxy"] {
            match name.parse::<ProxyKind>() {
                Err(Error::UnknownKind { kind }) => assert_eq!(kind, name),
                other => panic!("{name:?}: expected UnknownKind, got {other:?}"),
            }
        }
    }

    #[test]
    fn serde_uses_the_same_names() {
        assert_eq!(
            serde_json::to_string(&ProxyKind::Builtin).unwrap(),
            "\"builtin\""
        );
        assert_eq!(
            serde_json::from_str::<ProxyKind>("\"none\"").unwrap(),
            ProxyKind::None
        );
        assert!(serde_json::from_str::<ProxyKind>("\"kata\"").is_err());
    }
}
