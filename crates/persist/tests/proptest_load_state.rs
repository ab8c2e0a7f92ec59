//! Property tests of [`Store::load_state`]: any bytes in `state.json` — garbage, truncated or
//! edited envelopes, other versions, foreign ids, oversized files — load as a value or fail
//! with a typed [`Error`] whose message is one line; nothing panics.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use vmfactory_persist::{Error, Store, STATE_VERSION};

const ID: &str = "0c3e7f5e-6a55-4b8e-9d0b-7b8b2f1d2a10";

/// A state of some shape, as the vm crate's would be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    pid: u32,
    name: String,
    sizes: Vec<u64>,
    tags: BTreeMap<String, String>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

type Loaded = (Result<State, Error>, Result<Value, Error>);

/// Writes `bytes` as the state of `ID` and loads it as a [`State`] and as raw JSON.
fn load(bytes: &[u8], max: Option<u64>) -> Loaded {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::new(dir.path());
    if let Some(max) = max {
        store = store.with_max_state_size(max);
    }
    runtime().block_on(async {
        store.create_vm_dir(ID).await.expect("vm dir");
        std::fs::write(store.state_path(ID).expect("path"), bytes).expect("write");
        (store.load_state(ID).await, store.load_state(ID).await)
    })
}

/// A value, or one of the typed load errors with a one-line message.
fn typed<T: std::fmt::Debug>(r: &Result<T, Error>) -> Result<(), TestCaseError> {
    match r {
        Ok(_) => Ok(()),
        Err(
            e @ (Error::Corrupt { .. }
            | Error::VersionTooNew { .. }
            | Error::VersionTooOld { .. }
            | Error::IdMismatch { .. }
            | Error::TooLarge { .. }),
        ) => {
            prop_assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!("unexpected error: {other:?}"))),
    }
}

fn state() -> impl Strategy<Value = State> {
    (
        any::<u32>(),
        ".{0,16}",
        prop::collection::vec(any::<u64>(), 0..4),
        prop::collection::btree_map("[a-z]{0,6}", ".{0,6}", 0..3),
    )
        .prop_map(|(pid, name, sizes, tags)| State {
            pid,
            name,
            sizes,
            tags,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_load_or_fail_typed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (s, v) = load(&bytes, None);
        typed(&s)?;
        typed(&v)?;
    }

    #[test]
    fn edited_envelopes_load_or_fail_typed(
        st in state(),
        version in prop_oneof![Just(u64::from(STATE_VERSION)), any::<u64>()],
        id in prop_oneof![Just(ID.to_string()), ".{0,40}"],
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        extra in prop::option::of(("[a-z]{1,6}", any::<i32>())),
    ) {
        let mut body = serde_json::to_value(&st).expect("json");
        if let Some((k, v)) = &extra {
            body[k.as_str()] = json!(v);
        }
        let env = json!({"version": version, "id": id, "state": body});
        let mut bytes = serde_json::to_vec(&env).expect("json");
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let (s, v) = load(&bytes, None);
        typed(&s)?;
        typed(&v)?;
        let current = version == u64::from(STATE_VERSION);
        if !truncate && current && id == ID && extra.is_none() {
            prop_assert_eq!(s.ok(), Some(st));
        } else if truncate {
            prop_assert!(matches!(v, Err(Error::Corrupt { .. })), "{:?}", v);
        } else if id != ID && current {
            prop_assert!(matches!(v, Err(Error::IdMismatch { .. })), "{:?}", v);
        } else if version > u64::from(STATE_VERSION) && version <= u64::from(u32::MAX) {
            prop_assert!(matches!(v, Err(Error::VersionTooNew { .. })), "{:?}", v);
        }
    }

    #[test]
    fn oversized_files_are_refused(len in 65usize..2048) {
        let (s, v) = load(&vec![b' '; len], Some(64));
        prop_assert!(matches!(s, Err(Error::TooLarge { .. })), "{:?}", s);
        prop_assert!(matches!(v, Err(Error::TooLarge { .. })), "{:?}", v);
    }
}
