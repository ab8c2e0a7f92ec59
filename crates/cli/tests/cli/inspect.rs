//! `vmfactory inspect`, and `status` on the same template metadata: valid stored inputs made
//! by the libraries (no QEMU), then each one damaged. Uses the helpers of `cli.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use vmfactory_factory::{
    CloneKey, MountOutcome, TemplateError, TemplateHost, TemplateMetadata, MAX_METADATA_SIZE,
    METADATA_FILE, TEMPLATE_METADATA_VERSION,
};
use vmfactory_hypervisor::{Accel, FakeHypervisor, Hypervisor as _, HypervisorConfig};
use vmfactory_persist::{Store, DEFAULT_MAX_STATE_SIZE, MAX_ID_LEN, STATE_VERSION};
use vmfactory_vm::{VmConfig, VmState, MAX_WIRE_SIZE, WIRE_VERSION};

use super::{assert_one_line_error, stderr, Scratch};

/// The VM whose state and wire form [`Stored`] makes.
const VM_ID: &str = "0c3e7f5e-6a55-4b8e-9d0b-7b8b2f1d2a10";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A template host for `CloneKey::gather` without QEMU (only its version is asked for).
#[derive(Debug)]
struct NoQemu;

#[async_trait::async_trait]
impl TemplateHost for NoQemu {
    async fn mount_type(&self, _: &Path) -> Result<Option<String>, TemplateError> {
        Ok(None)
    }
    async fn mount_tmpfs(&self, _: &Path, _: u64) -> Result<MountOutcome, TemplateError> {
        Ok(MountOutcome::NotPermitted)
    }
    async fn unmount(&self, _: &Path) -> Result<(), TemplateError> {
        Ok(())
    }
    async fn qemu_version(&self, _: &Path) -> Result<String, TemplateError> {
        Ok("QEMU emulator version 7.2.0 (test)".into())
    }
    async fn resolve_accel(&self, _: &HypervisorConfig, _: &Path) -> Accel {
        Accel::Tcg
    }
}

/// A [`Scratch`] with valid stored inputs written by the libraries: template metadata in
/// `tpl/`, the saved state of VM [`VM_ID`] under `run/` (with a lock file, as a real VM's), and
/// its wire form in `vm.wire`. The VM's hypervisor part comes from `FakeHypervisor`: no QEMU.
pub(super) struct Stored {
    pub(super) scratch: Scratch,
    pub(super) cfg: PathBuf,
    metadata: TemplateMetadata,
    state: VmState,
}

impl Stored {
    pub(super) fn new() -> Self {
        let scratch = Scratch::new();
        let cfg = scratch.write(&scratch.config(true, 0));
        let dir = scratch.path();
        let (metadata, state) = block_on(async {
            let hv = HypervisorConfig::new(dir.join("vmlinuz"), Some(dir.join("initramfs.cpio")));
            let key = CloneKey::gather(&hv.pinned(Accel::Tcg), &NoQemu)
                .await
                .expect("clone key");
            let metadata = TemplateMetadata::new(key);
            std::fs::create_dir(dir.join("tpl")).expect("mkdir");
            metadata.write(&dir.join("tpl")).await.expect("metadata");

            let mut config = VmConfig::new(hv);
            config.run_root = dir.join("run");
            let fake = FakeHypervisor::new(VM_ID, config.hypervisor.clone(), config.vm_dir(VM_ID));
            let state = VmState {
                id: VM_ID.into(),
                hypervisor: fake.state().await,
                config,
                vcpus: 1,
                memory_mib: 256,
                cpu_delta: 0,
                mounts: Default::default(),
                network: None,
            };
            let store = Store::new(dir.join("run"));
            store.create_vm_dir(VM_ID).await.expect("VM dir");
            drop(store.lock(VM_ID).await.expect("lock"));
            store.save_state(VM_ID, &state).await.expect("state");
            (metadata, state)
        });
        let wire = state.to_wire().expect("wire form");
        std::fs::write(dir.join("vm.wire"), wire).expect("wire");
        Self {
            scratch,
            cfg,
            metadata,
            state,
        }
    }

    pub(super) fn metadata_file(&self) -> PathBuf {
        self.scratch.path().join("tpl").join(METADATA_FILE)
    }

    fn store(&self) -> Store {
        Store::new(self.scratch.path().join("run"))
    }

    fn state_file(&self) -> PathBuf {
        self.store().state_path(VM_ID).expect("valid id")
    }

    fn wire_file(&self) -> PathBuf {
        self.scratch.path().join("vm.wire")
    }

    pub(super) fn run(&self, args: &[&str]) -> Output {
        self.scratch.run(&self.cfg, args)
    }
}

/// Every file and directory under `dir`: its mode and content (`None` for a directory).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Option<Vec<u8>>)> {
    let mut all = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("stat");
            let content = if meta.is_dir() {
                todo.push(path.clone());
                None
            } else {
                Some(std::fs::read(&path).expect("read"))
            };
            all.insert(path, (meta.permissions().mode(), content));
        }
    }
    all
}

/// Asserts that `dir` is as `before`, naming what differs (not dumping contents).
fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, (u32, Option<Vec<u8>>)>, what: &str) {
    let after = snapshot(dir);
    let changed: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "{what}: changed {changed:?}");
}

/// `bytes` (JSON) edited by `f`.
fn edit_json(bytes: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).expect("JSON");
    f(&mut v);
    serde_json::to_vec_pretty(&v).expect("JSON")
}

/// The first half of `bytes`.
fn truncated(bytes: &[u8]) -> Vec<u8> {
    bytes[..bytes.len() / 2].to_vec()
}

/// `bytes` padded with spaces (so still valid JSON) to one byte over `limit`.
fn oversized(bytes: &[u8], limit: u64) -> Vec<u8> {
    let mut big = bytes.to_vec();
    big.resize(usize::try_from(limit).expect("limit") + 1, b' ');
    big
}

/// Not JSON at all: NUL, invalid UTF-8, then a broken object.
const GARBAGE: &[u8] = b"\x00\xff\xfe{\"version\": garbage";

#[test]
fn inspect_prints_valid_stored_inputs_and_changes_nothing() {
    let st = Stored::new();
    let before = snapshot(st.scratch.path());
    let json = |o: &Output| -> serde_json::Value {
        assert_eq!(o.status.code(), Some(0), "{}", stderr(o));
        serde_json::from_slice(&o.stdout).expect("JSON")
    };

    let v = json(&st.run(&["inspect", "template"]));
    assert_eq!(
        v["metadata"]["config_hash"],
        st.metadata.config_hash.as_str()
    );
    assert_eq!(v["metadata_file"], st.metadata_file().display().to_string());
    // The stored template was made for another size than this config asks for: `status`
    // makes the check `get_vm` makes, calls it stale and exits 1 (degraded), changing nothing.
    let o = st.run(&["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("health:        degraded"), "{table}");
    assert!(
        table.contains("STALE: Template does not match the config in max_memory_mib"),
        "{table}"
    );
    assert!(
        stderr(&o).starts_with("vmfactory: Degraded: template stale"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));

    // The VM's owner holds its lock: `inspect vm` neither takes nor waits for it.
    let owner = block_on(st.store().lock(VM_ID)).expect("lock");
    let v = json(&st.run(&["inspect", "vm", VM_ID]));
    drop(owner);
    let state = serde_json::to_value(&st.state).expect("JSON");
    assert_eq!(v["id"], VM_ID);
    assert_eq!(v["source"], st.state_file().display().to_string());
    assert_eq!(v["pid"], serde_json::Value::Null);
    assert_eq!(v["qemu_alive"], false);
    assert_eq!(v["qmp_socket"], state["hypervisor"]["paths"]["qmp"]);
    assert_eq!(v["console_socket"], state["hypervisor"]["paths"]["console"]);
    assert_eq!(v["state"], state);

    let wire = st.wire_file();
    let v = json(&st.run(&["inspect", "wire", &wire.display().to_string()]));
    assert_eq!((&v["id"], &v["state"]), (&VM_ID.into(), &state));
    assert_eq!(v["source"], wire.display().to_string());
    let bytes = std::fs::read(&wire).expect("wire");
    let v = json(
        &st.scratch
            .run_with_stdin(&st.cfg, &["inspect", "wire", "-"], &bytes),
    );
    assert_eq!((&v["id"], &v["source"]), (&VM_ID.into(), &"-".into()));
    // A wire form carries its own config: no configuration file is read.
    let missing = st.scratch.path().join("nope.toml");
    let o = st
        .scratch
        .run(&missing, &["inspect", "wire", &wire.display().to_string()]);
    assert_eq!(json(&o)["id"], VM_ID);

    assert_unchanged(st.scratch.path(), &before, "valid inputs");
}

#[test]
fn inspect_template_without_one_is_a_runtime_failure() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(true, 0));
    let o = s.run(&cfg, &["inspect", "template"]);
    let tpl = s.path().join("tpl").display().to_string();
    assert_one_line_error(&o, 1, &["No template at", &tpl, "vmfactory init"]);
    assert!(!s.path().join("tpl").exists() && !s.path().join("run").exists());
}

#[test]
fn bad_stored_inputs_fail_with_2_and_one_line_and_change_nothing() {
    type Damage = Box<dyn Fn(&Stored)>;
    /// Rewrites the file `file` picks with `f` of its content.
    fn rewrite(file: fn(&Stored) -> PathBuf, f: fn(&[u8]) -> Vec<u8>) -> Damage {
        Box::new(move |st: &Stored| {
            let path = file(st);
            let bytes = std::fs::read(&path).expect("read");
            std::fs::write(&path, f(&bytes)).expect("write");
        })
    }
    let none = || -> Damage { Box::new(|_: &Stored| {}) };
    let (meta, state, wire) = (
        Stored::metadata_file as fn(&Stored) -> PathBuf,
        Stored::state_file as fn(&Stored) -> PathBuf,
        Stored::wire_file as fn(&Stored) -> PathBuf,
    );
    let meta_v = format!("version {}", TEMPLATE_METADATA_VERSION + 1);
    let state_v = format!("version {}, newer", STATE_VERSION + 1);
    let wire_v = format!("version {}", WIRE_VERSION + 1);
    let long_id = "a".repeat(MAX_ID_LEN + 1);
    // (what, damage, arguments, substrings of the error line); `@dir` is the scratch dir, and
    // a `-` argument gets the (damaged) wire file on standard input.
    let mut cases: Vec<(&str, Damage, Vec<&str>, Vec<&str>)> = Vec::new();
    for args in [&["inspect", "template"][..], &["status"][..], &["get"][..]] {
        cases.extend([
            (
                "metadata corrupt",
                rewrite(meta, |_| GARBAGE.to_vec()),
                args.to_vec(),
                vec!["metadata.json", "corrupt"],
            ),
            (
                "metadata truncated",
                rewrite(meta, truncated),
                args.to_vec(),
                vec!["metadata.json", "corrupt", "EOF"],
            ),
            (
                "metadata version",
                rewrite(meta, |b| {
                    edit_json(b, |v| v["version"] = (TEMPLATE_METADATA_VERSION + 1).into())
                }),
                args.to_vec(),
                vec!["metadata.json", &meta_v],
            ),
            (
                "metadata oversized",
                rewrite(meta, |b| oversized(b, MAX_METADATA_SIZE)),
                args.to_vec(),
                vec!["metadata.json", "too large"],
            ),
            (
                "metadata tampered",
                rewrite(meta, |b| edit_json(b, |v| v["key"]["vcpus"] = 3.into())),
                args.to_vec(),
                vec!["metadata.json", "hash"],
            ),
        ]);
    }
    let vm = vec!["inspect", "vm", VM_ID];
    cases.extend([
        (
            "state corrupt",
            rewrite(state, |_| GARBAGE.to_vec()),
            vm.clone(),
            vec!["Corrupt state file", "state.json"],
        ),
        (
            "state truncated",
            rewrite(state, truncated),
            vm.clone(),
            vec!["Corrupt state file", "EOF"],
        ),
        (
            "state version",
            rewrite(state, |b| {
                edit_json(b, |v| v["version"] = (STATE_VERSION + 1).into())
            }),
            vm.clone(),
            vec!["state.json", &state_v],
        ),
        (
            "state oversized",
            rewrite(state, |b| oversized(b, DEFAULT_MAX_STATE_SIZE)),
            vm.clone(),
            vec!["state.json", "too large"],
        ),
        (
            "state of another VM",
            rewrite(state, |b| edit_json(b, |v| v["id"] = "other".into())),
            vm.clone(),
            vec!["state.json", "is for VM \"other\""],
        ),
        (
            "state inconsistent",
            rewrite(state, |b| {
                edit_json(b, |v| v["state"]["hypervisor"]["id"] = "other".into())
            }),
            vm.clone(),
            vec!["state.json", "Inconsistent", "other"],
        ),
        (
            "no such VM",
            none(),
            vec!["inspect", "vm", "nope"],
            vec!["No VM nope under @dir/run"],
        ),
    ]);
    let wire_at = vec!["inspect", "wire", "@dir/vm.wire"];
    let stdin = vec!["inspect", "wire", "-"];
    cases.extend([
        (
            "wire corrupt",
            rewrite(wire, |_| GARBAGE.to_vec()),
            wire_at.clone(),
            vec!["vm.wire", "Corrupt wire form"],
        ),
        (
            "wire truncated",
            rewrite(wire, truncated),
            wire_at.clone(),
            vec!["vm.wire", "Corrupt wire form", "EOF"],
        ),
        (
            "wire version",
            rewrite(wire, |b| {
                edit_json(b, |v| v["version"] = (WIRE_VERSION + 1).into())
            }),
            wire_at.clone(),
            vec!["vm.wire", &wire_v],
        ),
        (
            "wire oversized",
            rewrite(wire, |b| oversized(b, MAX_WIRE_SIZE as u64)),
            wire_at.clone(),
            vec!["vm.wire", "too large"],
        ),
        (
            "wire of a config",
            rewrite(wire, |b| {
                edit_json(b, |v| v["kind"] = "vmfactory-vm-config".into())
            }),
            wire_at.clone(),
            vec!["vm.wire", "kind \"vmfactory-vm-config\""],
        ),
        (
            "wire truncated on stdin",
            rewrite(wire, truncated),
            stdin.clone(),
            vec!["standard input", "Corrupt wire form"],
        ),
        (
            "wire oversized on stdin",
            rewrite(wire, |b| oversized(b, MAX_WIRE_SIZE as u64)),
            stdin.clone(),
            vec!["standard input", "too large"],
        ),
        (
            "wire file missing",
            none(),
            vec!["inspect", "wire", "@dir/nope.wire"],
            vec!["@dir/nope.wire", "No such file"],
        ),
        (
            "wire file a directory",
            none(),
            vec!["inspect", "wire", "@dir/run"],
            vec!["@dir/run", "Is a directory"],
        ),
    ]);
    for id in ["../x", "a/b", "", ".", "..", "/etc", long_id.as_str()] {
        cases.push((
            "hostile id",
            none(),
            vec!["inspect", "vm", id],
            vec!["Invalid VM id"],
        ));
    }
    assert_eq!(cases.len(), 38, "bad stored inputs");

    for (what, damage, args, needles) in cases {
        let st = Stored::new();
        damage(&st);
        let dir = st.scratch.path().display().to_string();
        let at_dir = |s: &str| s.replace("@dir", &dir);
        let args: Vec<String> = args.iter().map(|a| at_dir(a)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let needles: Vec<String> = needles.iter().map(|n| at_dir(n)).collect();
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        let input = match args.last() {
            Some(&"-") => std::fs::read(st.wire_file()).expect("wire"),
            _ => Vec::new(),
        };
        let before = snapshot(st.scratch.path());
        eprintln!("case {what}: vmfactory {args:?}");
        let o = st.scratch.run_with_stdin(&st.cfg, &args, &input);
        assert!(!stderr(&o).contains("panicked"), "{what}: {}", stderr(&o));
        assert_one_line_error(&o, 2, &needles);
        assert_unchanged(st.scratch.path(), &before, what);
    }
}
