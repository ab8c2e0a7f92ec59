//! Property tests of the wire-form decoders: [`VmState::from_wire`], [`VmConfig::from_wire`]
//! and [`Vm::from_wire`] on arbitrary bytes, on truncated and on edited wire forms. Each
//! returns a value or a typed [`Error`] (`Wire` or `Config`, or for a stale but well-formed
//! VM, `Storage`) with a one-line message; nothing panics, and nothing is created on disk.

use proptest::prelude::*;
use serde_json::Value;
use vmfactory_hypervisor::{FakeHypervisor, Hypervisor, HypervisorConfig};
use vmfactory_vm::{Error, VmConfig, VmState};

const ID: &str = "0c3e7f5e-6a55-4b8e-9d0b-7b8b2f1d2a10";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A well-formed wire form of a VM under `root` (which holds no such VM).
fn valid_wire(root: &std::path::Path) -> Vec<u8> {
    let mut config = VmConfig::new(HypervisorConfig::new("/k", Some("/i".into())));
    config.run_root = root.to_owned();
    let hv = FakeHypervisor::new(ID, config.hypervisor.clone(), config.vm_dir(ID));
    let hypervisor = runtime().block_on(hv.state());
    VmState {
        id: ID.into(),
        hypervisor,
        config,
        vcpus: 1,
        memory_mib: 256,
        cpu_delta: 0,
        mounts: Default::default(),
        network: None,
    }
    .to_wire()
    .expect("encode")
}

fn one_line(e: &Error) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(!text.contains('\n'), "multi-line error: {text:?}");
    Ok(())
}

/// The typed outcome of decoding `bytes` in every way; `Vm::from_wire` runs against `root`.
fn decode_all(bytes: &[u8], root: &std::path::Path) -> Result<(), TestCaseError> {
    match VmState::from_wire(bytes) {
        Ok(_) => {}
        Err(e @ (Error::Wire(_) | Error::Config(_))) => one_line(&e)?,
        Err(other) => prop_assert!(false, "VmState: {other:?}"),
    }
    match VmConfig::from_wire(bytes) {
        Ok(_) => {}
        Err(e @ (Error::Wire(_) | Error::Config(_))) => one_line(&e)?,
        Err(other) => prop_assert!(false, "VmConfig: {other:?}"),
    }
    let res = runtime().block_on(vmfactory_vm::Vm::from_wire(bytes));
    match res {
        Ok(vm) => prop_assert!(false, "attached to a VM that does not exist: {}", vm.id()),
        // A well-formed wire form of a VM that is gone: its storage is not there to lock.
        Err(e @ (Error::Wire(_) | Error::Config(_) | Error::Storage { op: "lock", .. })) => {
            one_line(&e)?
        }
        Err(other) => prop_assert!(false, "Vm::from_wire: {other:?}"),
    }
    let left: Vec<_> = std::fs::read_dir(root).expect("root").collect();
    prop_assert!(left.is_empty(), "created {left:?}");
    Ok(())
}

/// Replaces the JSON value at a random place in `v` (following `path`) with `new`.
fn edit(v: &mut Value, path: &[prop::sample::Index], new: Value) {
    let Some((ix, rest)) = path.split_first() else {
        *v = new;
        return;
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            let key = m.keys().nth(ix.index(m.len())).cloned();
            if let Some(child) = key.and_then(|k| m.get_mut(&k)) {
                edit(child, rest, new);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = ix.index(a.len());
            if let Some(child) = a.get_mut(i) {
                edit(child, rest, new);
            }
        }
        _ => *v = new,
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        ".{0,16}".prop_map(Value::from),
        Just(Value::from("../../etc")),
        Just(serde_json::json!({})),
        Just(serde_json::json!([])),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let root = tempfile::tempdir().expect("tempdir");
        decode_all(&bytes, root.path())?;
    }

    #[test]
    fn truncated_wire_forms(cut in any::<prop::sample::Index>()) {
        let root = tempfile::tempdir().expect("tempdir");
        let bytes = valid_wire(root.path());
        let cut = cut.index(bytes.len());
        decode_all(&bytes[..cut], root.path())?;
        prop_assert!(VmState::from_wire(&bytes[..cut]).is_err());
    }

    #[test]
    fn edited_wire_forms(
        path in prop::collection::vec(any::<prop::sample::Index>(), 1..6),
        new in json_leaf(),
    ) {
        let root = tempfile::tempdir().expect("tempdir");
        let mut v: Value = serde_json::from_slice(&valid_wire(root.path())).expect("json");
        edit(&mut v, &path, new);
        let bytes = serde_json::to_vec(&v).expect("json");
        decode_all(&bytes, root.path())?;
    }
}

/// The unedited wire form decodes, and re-attaching to the VM it names fails typed (the VM
/// was never there) without creating anything.
#[test]
fn valid_but_stale_wire_form() {
    let root = tempfile::tempdir().expect("tempdir");
    let bytes = valid_wire(root.path());
    assert_eq!(VmState::from_wire(&bytes).expect("decodes").id, ID);
    let res = runtime().block_on(vmfactory_vm::Vm::from_wire(&bytes));
    assert!(
        matches!(res, Err(Error::Storage { op: "lock", .. })),
        "{res:?}"
    );
    assert_eq!(std::fs::read_dir(root.path()).expect("root").count(), 0);
}
