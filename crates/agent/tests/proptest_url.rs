//! Property tests of [`AgentUrl::parse`]: no input makes it panic, every failure is
//! [`Error::InvalidUrl`] with a one-line message, and every valid URL survives
//! `Display` → `parse` unchanged.

use std::path::PathBuf;

use proptest::prelude::*;
use vmfactory_agent::{AgentUrl, Error};

/// An absolute path; `:` is allowed (the hvsock port is after the last one).
fn abs_path() -> impl Strategy<Value = PathBuf> {
    "/[A-Za-z0-9._:/ -]{0,60}".prop_map(PathBuf::from)
}

fn url() -> impl Strategy<Value = AgentUrl> {
    prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(cid, port)| AgentUrl::Vsock { cid, port }),
        (abs_path(), any::<u32>()).prop_map(|(path, port)| AgentUrl::Hvsock { path, port }),
        abs_path().prop_map(|path| AgentUrl::Serial { path }),
        abs_path().prop_map(|path| AgentUrl::Unix { path }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn any_string_parses_or_fails_typed(s in ".*") {
        check(&s)?;
    }

    #[test]
    fn any_scheme_and_rest_parses_or_fails_typed(
        scheme in prop_oneof![
            Just("vsock".to_string()), Just("hvsock".to_string()),
            Just("serial".to_string()), Just("unix".to_string()), "[a-z]{0,6}",
        ],
        rest in "[0-9a-z:/.\\x00 -]{0,24}|.{0,24}",
    ) {
        check(&format!("{scheme}://{rest}"))?;
    }

    #[test]
    fn valid_urls_round_trip_through_display(u in url()) {
        let text = u.to_string();
        let back = AgentUrl::parse(&text);
        prop_assert_eq!(back.ok(), Some(u), "{}", text);
    }
}

fn check(s: &str) -> Result<(), TestCaseError> {
    match AgentUrl::parse(s) {
        Ok(u) => {
            // What parses prints as something that parses to the same URL.
            prop_assert_eq!(AgentUrl::parse(&u.to_string()).ok(), Some(u));
        }
        Err(e @ Error::InvalidUrl { .. }) => {
            let text = e.to_string();
            // The URL is quoted with `{:?}`, so even a newline in it stays on one line.
            prop_assert!(!text.contains('\n'), "multi-line error: {text:?}");
        }
        Err(other) => prop_assert!(false, "not an InvalidUrl error: {other:?}"),
    }
    Ok(())
}
