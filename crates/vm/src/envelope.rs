//! The versioned envelope of every wire form ([`crate::VmState`], [`crate::VmConfig`]):
//! JSON `{"kind": "...", "version": N, "body": ...}`. Decoding checks, in order: the size limit
//! ([`MAX_WIRE_SIZE`]), that the bytes are JSON with a kind and a version, the kind, the version
//! ([`WIRE_VERSION`]), then the body's shape. Each failure is a [`crate::WireError`] variant;
//! nothing panics on bad input.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::WireError;

/// Version of the wire envelope and of [`crate::VmState`]; bumped on incompatible changes (2:
/// `agent_url` is gone, the hypervisor state's config and paths give it; 3: the hypervisor
/// state records its vsock CID, and a vsock channel's CID is optional in the config).
pub const WIRE_VERSION: u32 = 3;

/// Largest wire form accepted (a real one is a few KiB).
pub const MAX_WIRE_SIZE: usize = 1 << 20;

/// Kind of a [`crate::VmConfig`] wire form.
pub(crate) const CONFIG_KIND: &str = "vmfactory-vm-config";

/// Kind of a [`crate::VmState`] wire form.
pub(crate) const VM_KIND: &str = "vmfactory-vm";

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    kind: &'a str,
    version: u32,
    body: &'a T,
}

#[derive(Deserialize)]
struct Header {
    kind: String,
    version: u32,
}

#[derive(Deserialize)]
struct Envelope<T> {
    body: T,
}

/// Encodes `body` in an envelope of `kind`.
pub(crate) fn encode<T: Serialize>(
    kind: &str,
    body: &T,
) -> std::result::Result<Vec<u8>, WireError> {
    let bytes = serde_json::to_vec(&EnvelopeRef {
        kind,
        version: WIRE_VERSION,
        body,
    })
    .map_err(WireError::Encode)?;
    if bytes.len() > MAX_WIRE_SIZE {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_WIRE_SIZE,
        });
    }
    Ok(bytes)
}

/// Decodes an envelope of `kind`; see the module docs for the checks.
pub(crate) fn decode<T: DeserializeOwned>(
    kind: &'static str,
    bytes: &[u8],
) -> std::result::Result<T, WireError> {
    if bytes.len() > MAX_WIRE_SIZE {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            limit: MAX_WIRE_SIZE,
        });
    }
    let header: Header = serde_json::from_slice(bytes).map_err(WireError::Corrupt)?;
    if header.kind != kind {
        return Err(WireError::WrongKind {
            expected: kind,
            found: header.kind,
        });
    }
    if header.version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion {
            found: header.version,
            supported: WIRE_VERSION,
        });
    }
    let env: Envelope<T> = serde_json::from_slice(bytes).map_err(WireError::Corrupt)?;
    Ok(env.body)
}
