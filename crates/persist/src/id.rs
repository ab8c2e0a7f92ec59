//! VM id validation: ids become directory names, so they must not escape the run directory.

use crate::error::{Error, Result};

/// Longest accepted VM id, in bytes (a UUID is 36).
pub const MAX_ID_LEN: usize = 128;

/// Checks that `id` can safely name a directory under the run directory.
///
/// Accepted: 1 to [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`, not starting with `.` (so `.`, `..`
/// and hidden names such as temporary files are never ids) and not containing `..`. This rules
/// out `/`, NUL and every other way of leaving `<root>/vm/`.
///
/// # Examples
/// ```
/// use vmfactory_persist::validate_id;
/// assert!(validate_id("3f2b6c1e-7d1a-4c2e-9a51-0d4c1b2e3f40").is_ok());
/// assert!(validate_id("../etc").is_err());
/// ```
pub fn validate_id(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        Some("empty")
    } else if id.len() > MAX_ID_LEN {
        Some("longer than 128 bytes")
    } else if id.starts_with('.') {
        Some("starts with '.'")
    } else if id.contains("..") {
        Some("contains '..'")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("contains a character outside [A-Za-z0-9._-]")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidId {
            id: id.to_owned(),
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_simple_names() {
        for id in [
            "3f2b6c1e-7d1a-4c2e-9a51-0d4c1b2e3f40",
            "vm0",
            "a.b_c-D",
            "x",
        ] {
            validate_id(id).unwrap();
        }
        validate_id(&"a".repeat(MAX_ID_LEN)).unwrap();
    }

    #[test]
    fn rejects_hostile_ids() {
        let long = "a".repeat(MAX_ID_LEN + 1);
        for id in [
            "", ".", "..", "../x", "a/b", "/abs", "a/../b", "x..y", ".hidden", "a\0b", "a b", "é",
            "a\\b", &long,
        ] {
            assert!(
                matches!(validate_id(id), Err(Error::InvalidId { .. })),
                "{id:?} was accepted"
            );
        }
    }
}
