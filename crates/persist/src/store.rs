//! Per-VM storage under `<root>/vm/<id>/`: directory lifecycle, versioned state, locks, listing.

use std::fs::{self, DirBuilder, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::error::{Error, Result};
use crate::fs::{blocking, read_limited_blocking, write_atomic};
use crate::id::validate_id;
use crate::lock::{is_locked_blocking, lock_blocking, Open, VmLock};
use crate::staged::StagedVmDir;

/// Default run directory, as in Kata Containers 1.x.
pub const DEFAULT_ROOT: &str = "/run/vc";
/// Version written into every state file by this build.
pub const STATE_VERSION: u32 = 1;
/// Oldest state-file version this build can read.
pub const OLDEST_STATE_VERSION: u32 = 1;
/// Default limit on the size of a state file.
pub const DEFAULT_MAX_STATE_SIZE: u64 = 1024 * 1024;

/// Subdirectory of the root that holds one directory per VM.
const VM_SUBDIR: &str = "vm";
/// Name of the state file inside a VM directory.
const STATE_FILE: &str = "state.json";
/// Name of the lock file inside a VM directory.
const LOCK_FILE: &str = "lock";
/// Name prefix of a VM directory being created ([`StagedVmDir`]): hidden, so never an id.
const STAGING_PREFIX: &str = ".new-";
/// Permission bits of directories this crate creates.
const DIR_MODE: u32 = 0o700;
/// Permission bits of files this crate creates.
const FILE_MODE: u32 = 0o600;

/// What a state file looks like on disk, as written.
#[derive(Serialize)]
struct EnvelopeRef<'a, T: ?Sized> {
    version: u32,
    id: &'a str,
    state: &'a T,
}

/// The envelope's header, checked before the state is decoded.
#[derive(Deserialize)]
struct Header {
    version: u32,
    id: String,
}

/// The envelope's payload.
#[derive(Deserialize)]
struct Payload<T> {
    state: T,
}

/// Run-directory storage for VMs.
///
/// Each VM owns `<root>/vm/<id>/` (mode 0700) holding `state.json` (mode 0600, the envelope
/// `{"version": N, "id": "<id>", "state": ...}`) and `lock`. All methods validate the id with
/// [`validate_id`] first and do their file I/O on tokio's blocking pool.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    max_state_size: u64,
}

impl Default for Store {
    /// A store at [`DEFAULT_ROOT`].
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

impl Store {
    /// A store rooted at `root`. Nothing is created until a VM directory is.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            max_state_size: DEFAULT_MAX_STATE_SIZE,
        }
    }

    /// Sets the largest state file [`Store::load_state`] accepts (and `save_state` writes).
    pub fn with_max_state_size(mut self, bytes: u64) -> Self {
        self.max_state_size = bytes;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of VM `id` (which may not exist).
    pub fn vm_dir(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        Ok(self.root.join(VM_SUBDIR).join(id))
    }

    /// The state file of VM `id` (which may not exist).
    pub fn state_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.vm_dir(id)?.join(STATE_FILE))
    }

    /// Path of a VM's lock file. Its presence marks a directory that a VM's owner locked at
    /// least once (a template or other directory under `vm/` has none).
    pub fn lock_path(&self, id: &str) -> Result<PathBuf> {
        Ok(self.vm_dir(id)?.join(LOCK_FILE))
    }

    /// Creates the directory of VM `id` with mode 0700 (and the root and `vm/` with 0700 if
    /// missing) and returns its path, unlocked. Fails with [`Error::AlreadyExists`] if it
    /// exists. A VM's owner uses [`Store::stage_vm_dir`] instead, so that its directory is
    /// never seen unlocked.
    pub async fn create_vm_dir(&self, id: &str) -> Result<PathBuf> {
        let dir = self.vm_dir(id)?;
        let id = id.to_owned();
        blocking(move || {
            make_dir(&dir, &id)?;
            debug!(vm_id = %id, dir = %dir.display(), "created VM storage");
            Ok(dir)
        })
        .await
    }

    /// Starts creating the directory of VM `id`: makes it with mode 0700 (and the root and
    /// `vm/` if missing) under a hidden name that [`Store::list_vms`] never lists;
    /// [`StagedVmDir::publish`] locks it and moves it into place. Fails with
    /// [`Error::AlreadyExists`] if VM `id` has a directory (or is being created).
    pub async fn stage_vm_dir(&self, id: &str) -> Result<StagedVmDir> {
        let target = self.vm_dir(id)?;
        let staging = self
            .root
            .join(VM_SUBDIR)
            .join(format!("{STAGING_PREFIX}{id}"));
        let id = id.to_owned();
        blocking(move || {
            if target.exists() {
                return Err(Error::AlreadyExists { id });
            }
            make_dir(&staging, &id)?;
            Ok(StagedVmDir::new(id, staging, target, LOCK_FILE, FILE_MODE))
        })
        .await
    }

    /// Removes the staged directories ([`Store::stage_vm_dir`]) whose creator died before
    /// publishing them: those whose lock nobody holds, and empty ones without a lock. Never
    /// one whose creator holds its lock. Returns their paths. A creator caught between making
    /// its staged directory and locking it (microseconds) then fails with an error; no
    /// process ever runs before a directory is published, so none is left.
    pub async fn remove_abandoned_staging(&self) -> Result<Vec<PathBuf>> {
        let dir = self.root.join(VM_SUBDIR);
        blocking(move || {
            let mut removed = Vec::new();
            for entry in entries_of(&dir)? {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else {
                    continue;
                };
                let path = entry.path();
                let lock_path = path.join(LOCK_FILE);
                let gone = if lock_path.exists() {
                    match lock_blocking(id, &lock_path, Open::OrCreate, FILE_MODE) {
                        Ok(_lock) => fs::remove_dir_all(&path).is_ok(),
                        Err(_) => false,
                    }
                } else {
                    fs::remove_dir(&path).is_ok()
                };
                if gone {
                    debug!(dir = %path.display(), "removed an abandoned staged VM directory");
                    removed.push(path);
                }
            }
            Ok(removed)
        })
        .await
    }

    /// Removes the directory of VM `id` and everything in it. Succeeds if it does not exist.
    ///
    /// This does not take the VM's lock: the owner destroys while holding it, then drops it.
    pub async fn destroy_vm_dir(&self, id: &str) -> Result<()> {
        let dir = self.vm_dir(id)?;
        let id = id.to_owned();
        blocking(move || match fs::remove_dir_all(&dir) {
            Ok(()) => {
                debug!(vm_id = %id, "destroyed VM storage");
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        })
        .await
    }

    /// Atomically replaces the state of VM `id` with `state`, in the current envelope version.
    /// The VM directory must exist ([`Error::VmNotFound`] otherwise).
    pub async fn save_state<T: Serialize + ?Sized>(&self, id: &str, state: &T) -> Result<()> {
        let path = self.state_path(id)?;
        let bytes = serde_json::to_vec_pretty(&EnvelopeRef {
            version: STATE_VERSION,
            id,
            state,
        })
        .map_err(|source| Error::Encode {
            id: id.to_owned(),
            source,
        })?;
        if bytes.len() as u64 > self.max_state_size {
            return Err(Error::TooLarge {
                path,
                size: bytes.len() as u64,
                limit: self.max_state_size,
            });
        }
        match write_atomic(path, bytes, FILE_MODE).await {
            Err(Error::NotFound { .. }) => Err(Error::VmNotFound { id: id.to_owned() }),
            other => other,
        }
    }

    /// Loads and validates the state of VM `id`.
    ///
    /// Errors: [`Error::VmNotFound`] / [`Error::NotFound`] if the directory / file is missing,
    /// [`Error::TooLarge`], [`Error::Corrupt`] (bad or truncated JSON, or a state of the wrong
    /// shape), [`Error::VersionTooNew`], [`Error::VersionTooOld`], [`Error::IdMismatch`].
    pub async fn load_state<T: DeserializeOwned + Send + 'static>(&self, id: &str) -> Result<T> {
        let dir = self.vm_dir(id)?;
        let path = dir.join(STATE_FILE);
        let id = id.to_owned();
        let max = self.max_state_size;
        blocking(move || {
            let bytes = match read_limited_blocking(&path, max) {
                Err(Error::NotFound { .. }) if !dir.is_dir() => {
                    return Err(Error::VmNotFound { id });
                }
                other => other?,
            };
            decode(&path, &id, &bytes)
        })
        .await
    }

    /// Takes the advisory lock of VM `id` without waiting: [`Error::Locked`] if another open
    /// lock exists (in this or another process), [`Error::VmNotFound`] if there is no directory.
    /// The lock is released when the returned guard is dropped (or the process exits).
    pub async fn lock(&self, id: &str) -> Result<VmLock> {
        let path = self.lock_path(id)?;
        let id = id.to_owned();
        blocking(move || lock_blocking(&id, &path, Open::OrCreate, FILE_MODE)).await
    }

    /// Whether a live process holds VM `id`'s lock, without taking it (read from
    /// `/proc/locks`), so a look never makes an owner taking the VM over fail.
    /// [`Error::NotFound`] if the VM has no lock file (it was never locked: not a VM).
    pub async fn is_locked(&self, id: &str) -> Result<bool> {
        let path = self.lock_path(id)?;
        blocking(move || is_locked_blocking(&path)).await
    }

    /// The processes holding VM `id`'s lock (its owner; read from `/proc/locks`, the lock is not
    /// taken): empty when no process owns it. [`Error::NotFound`] if the VM has no lock file.
    pub async fn lock_holders(&self, id: &str) -> Result<Vec<crate::Holder>> {
        let path = self.lock_path(id)?;
        blocking(move || {
            let meta = std::fs::metadata(&path).map_err(|e| match e.kind() {
                ErrorKind::NotFound => Error::NotFound { path: path.clone() },
                _ => Error::io("stat", &path, e),
            })?;
            Ok(crate::oplock::holders(meta.dev(), meta.ino()))
        })
        .await
    }

    /// The ids of all VMs with a directory under the root, sorted. Entries that are not
    /// directories or whose names are not valid ids are skipped. A missing root gives `[]`.
    pub async fn list_vms(&self) -> Result<Vec<String>> {
        let dir = self.root.join(VM_SUBDIR);
        blocking(move || {
            let mut ids = Vec::new();
            for entry in entries_of(&dir)? {
                let is_dir = entry
                    .file_type()
                    .map_err(|e| Error::io("stat", entry.path(), e))?
                    .is_dir();
                if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                    if validate_id(name).is_ok() {
                        ids.push(name.to_owned());
                    }
                }
            }
            ids.sort();
            Ok(ids)
        })
        .await
    }
}

/// Makes `dir` (0700) and, if missing, its parents; [`Error::AlreadyExists`] if it exists.
fn make_dir(dir: &Path, id: &str) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(parent)
        .map_err(|e| Error::io("create", parent, e))?;
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(Error::AlreadyExists { id: id.to_owned() })
        }
        Err(e) => return Err(Error::io("create", dir, e)),
    }
    // The mode given to mkdir(2) is filtered by the umask.
    fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
        .map_err(|e| Error::io("set permissions of", dir, e))
}

/// Parses and validates a state file's content.
fn decode<T: DeserializeOwned>(path: &Path, id: &str, bytes: &[u8]) -> Result<T> {
    let corrupt = |source| Error::Corrupt {
        path: path.to_owned(),
        source,
    };
    let header: Header = serde_json::from_slice(bytes).map_err(corrupt)?;
    if header.version > STATE_VERSION {
        return Err(Error::VersionTooNew {
            path: path.to_owned(),
            found: header.version,
            supported: STATE_VERSION,
        });
    }
    if header.version < OLDEST_STATE_VERSION {
        return Err(Error::VersionTooOld {
            path: path.to_owned(),
            found: header.version,
            oldest: OLDEST_STATE_VERSION,
        });
    }
    if header.id != id {
        return Err(Error::IdMismatch {
            path: path.to_owned(),
            expected: id.to_owned(),
            found: header.id,
        });
    }
    let payload: Payload<T> = serde_json::from_slice(bytes).map_err(corrupt)?;
    Ok(payload.state)
}

/// The entries of `dir` (none if it does not exist), read in full.
fn entries_of(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map_err(|e| Error::io("list", dir, e)))
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::io("list", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};
    use std::sync::Arc;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct TestState {
        pid: u32,
        cpus: u32,
        memory_mib: u64,
        socket: String,
    }

    fn state(n: u32) -> TestState {
        TestState {
            pid: 1000 + n,
            cpus: n,
            memory_mib: 256 * u64::from(n),
            // Different lengths, so a torn file would not parse as any written state.
            socket: "s".repeat(n as usize * 37),
        }
    }

    async fn store_with_vm(id: &str) -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("vc"));
        store.create_vm_dir(id).await.unwrap();
        (tmp, store)
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn default_root_is_run_vc() {
        assert_eq!(Store::default().root(), Path::new("/run/vc"));
    }

    #[tokio::test]
    async fn round_trip() {
        let (_tmp, store) = store_with_vm("vm1").await;
        store.save_state("vm1", &state(3)).await.unwrap();
        let loaded: TestState = store.load_state("vm1").await.unwrap();
        assert_eq!(loaded, state(3));

        let raw: serde_json::Value =
            serde_json::from_slice(&fs::read(store.state_path("vm1").unwrap()).unwrap()).unwrap();
        assert_eq!(raw["version"], STATE_VERSION);
        assert_eq!(raw["id"], "vm1");
        assert_eq!(raw["state"]["cpus"], 3);
    }

    #[tokio::test]
    async fn permissions_are_private() {
        let (_tmp, store) = store_with_vm("vm1").await;
        store.save_state("vm1", &state(1)).await.unwrap();
        assert_eq!(mode_of(&store.vm_dir("vm1").unwrap()), 0o700);
        assert_eq!(mode_of(&store.state_path("vm1").unwrap()), 0o600);
        assert_eq!(mode_of(&store.root().join("vm")), 0o700);
    }

    #[tokio::test]
    async fn create_twice_is_an_error() {
        let (_tmp, store) = store_with_vm("vm1").await;
        assert!(matches!(
            store.create_vm_dir("vm1").await,
            Err(Error::AlreadyExists { .. })
        ));
    }

    #[tokio::test]
    async fn destroy_is_idempotent() {
        let (_tmp, store) = store_with_vm("vm1").await;
        store.save_state("vm1", &state(1)).await.unwrap();
        store.destroy_vm_dir("vm1").await.unwrap();
        assert!(!store.vm_dir("vm1").unwrap().exists());
        store.destroy_vm_dir("vm1").await.unwrap();
        store.destroy_vm_dir("never-existed").await.unwrap();
    }

    #[tokio::test]
    async fn missing_vm_and_missing_state() {
        let (_tmp, store) = store_with_vm("vm1").await;
        assert!(matches!(
            store.load_state::<TestState>("vm1").await,
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.load_state::<TestState>("other").await,
            Err(Error::VmNotFound { .. })
        ));
        assert!(matches!(
            store.save_state("other", &state(1)).await,
            Err(Error::VmNotFound { .. })
        ));
        assert!(matches!(
            store.lock("other").await,
            Err(Error::VmNotFound { .. })
        ));
    }

    /// Writes `content` as VM `id`'s state file and loads it.
    async fn load_raw(content: &[u8]) -> Result<TestState> {
        let (_tmp, store) = store_with_vm("vm1").await;
        fs::write(store.state_path("vm1").unwrap(), content).unwrap();
        store.load_state::<TestState>("vm1").await
    }

    fn envelope(version: u32, id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "version": version, "id": id, "state": state(2),
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn corrupt_files_are_typed_errors() {
        let good = envelope(STATE_VERSION, "vm1");
        assert_eq!(load_raw(&good).await.unwrap(), state(2));
        let cases: Vec<Vec<u8>> = vec![
            b"not json at all".to_vec(),
            b"".to_vec(),
            vec![0xff, 0xfe, 0x00],
            br#"{"version": "1", "id": "vm1", "state": {}}"#.to_vec(),
            br#"{"id": "vm1", "state": {}}"#.to_vec(),
            // Right header, state of the wrong shape.
            br#"{"version": 1, "id": "vm1", "state": {"pid": "x"}}"#.to_vec(),
            br#"[1, 2, 3]"#.to_vec(),
        ];
        for content in cases {
            assert!(
                matches!(load_raw(&content).await, Err(Error::Corrupt { .. })),
                "{:?} was not Corrupt",
                String::from_utf8_lossy(&content)
            );
        }
    }

    #[tokio::test]
    async fn truncated_files_are_corrupt_at_every_length() {
        let good = envelope(STATE_VERSION, "vm1");
        let (_tmp, store) = store_with_vm("vm1").await;
        let path = store.state_path("vm1").unwrap();
        for len in 0..good.len() {
            fs::write(&path, &good[..len]).unwrap();
            let result = store.load_state::<TestState>("vm1").await;
            assert!(
                matches!(result, Err(Error::Corrupt { .. })),
                "prefix of {len} bytes: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_versions_are_refused() {
        match load_raw(&envelope(STATE_VERSION + 1, "vm1")).await {
            Err(Error::VersionTooNew {
                found, supported, ..
            }) => assert_eq!((found, supported), (STATE_VERSION + 1, STATE_VERSION)),
            other => panic!("expected VersionTooNew, got {other:?}"),
        }
        // A future version is refused before its (possibly different) state is decoded.
        let future = br#"{"version": 99, "id": "vm1", "state": "new layout"}"#;
        assert!(matches!(
            load_raw(future).await,
            Err(Error::VersionTooNew { found: 99, .. })
        ));
        match load_raw(&envelope(OLDEST_STATE_VERSION - 1, "vm1")).await {
            Err(Error::VersionTooOld { found, oldest, .. }) => {
                assert_eq!(
                    (found, oldest),
                    (OLDEST_STATE_VERSION - 1, OLDEST_STATE_VERSION)
                );
            }
            other => panic!("expected VersionTooOld, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn wrong_id_is_refused() {
        match load_raw(&envelope(STATE_VERSION, "vm2")).await {
            Err(Error::IdMismatch {
                expected, found, ..
            }) => assert_eq!((expected.as_str(), found.as_str()), ("vm1", "vm2")),
            other => panic!("expected IdMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_files_are_refused() {
        let (tmp, store) = store_with_vm("vm1").await;
        let store = Store::new(store.root()).with_max_state_size(64);
        let mut big = envelope(STATE_VERSION, "vm1");
        big.extend(std::iter::repeat(b' ').take(100));
        fs::write(store.state_path("vm1").unwrap(), &big).unwrap();
        assert!(matches!(
            store.load_state::<TestState>("vm1").await,
            Err(Error::TooLarge { limit: 64, .. })
        ));
        // Saving something that could not be loaded back is refused too.
        assert!(matches!(
            store.save_state("vm1", &state(5)).await,
            Err(Error::TooLarge { .. })
        ));
        drop(tmp);
    }

    #[tokio::test]
    async fn hostile_ids_are_refused_everywhere() {
        let (tmp, store) = store_with_vm("vm1").await;
        for id in ["../x", "a/b", "", ".", "..", "/etc", "x\0y"] {
            let invalid = |r: Result<()>| matches!(r, Err(Error::InvalidId { .. }));
            assert!(invalid(store.create_vm_dir(id).await.map(drop)), "{id:?}");
            assert!(invalid(store.destroy_vm_dir(id).await), "{id:?}");
            assert!(invalid(store.save_state(id, &state(1)).await), "{id:?}");
            assert!(invalid(store.load_state::<TestState>(id).await.map(drop)));
            assert!(invalid(store.lock(id).await.map(drop)), "{id:?}");
        }
        // Nothing was created or removed outside the VM directories.
        let mut names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("vc")]);
        assert_eq!(store.list_vms().await.unwrap(), vec!["vm1".to_owned()]);
    }

    #[tokio::test]
    async fn list_vms_sorted_and_filtered() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("vc"));
        assert!(store.list_vms().await.unwrap().is_empty());
        for id in ["b", "a", "c-1"] {
            store.create_vm_dir(id).await.unwrap();
        }
        fs::write(store.root().join("vm").join("stray-file"), b"").unwrap();
        fs::create_dir(store.root().join("vm").join(".hidden")).unwrap();
        store.destroy_vm_dir("b").await.unwrap();
        assert_eq!(store.list_vms().await.unwrap(), vec!["a", "c-1"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_never_tear() {
        let (_tmp, store) = store_with_vm("vm1").await;
        let store = Arc::new(store);
        store.save_state("vm1", &state(0)).await.unwrap();
        let written: Vec<TestState> = (0..32).map(state).collect();

        let mut tasks = Vec::new();
        for n in 0..32u32 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    store.save_state("vm1", &state(n)).await.unwrap();
                }
            }));
        }
        // Readers run while the writers rename over each other.
        let mut reads = 0;
        while tasks.iter().any(|t| !t.is_finished()) || reads < 50 {
            let loaded: TestState = store.load_state("vm1").await.unwrap();
            assert!(written.contains(&loaded), "torn state {loaded:?}");
            reads += 1;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let loaded: TestState = store.load_state("vm1").await.unwrap();
        assert!(written.contains(&loaded));
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(store.vm_dir("vm1").unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![STATE_FILE.to_owned()]);
    }

    #[tokio::test]
    async fn lock_refuses_a_second_holder_until_dropped() {
        let (_tmp, store) = store_with_vm("vm1").await;
        store.create_vm_dir("vm2").await.unwrap();
        let first = store.lock("vm1").await.unwrap();
        assert_eq!(first.id(), "vm1");
        // Each `lock` opens the file anew: a separate open file description, as in another
        // process.
        assert!(matches!(
            store.lock("vm1").await,
            Err(Error::Locked { ref id }) if id == "vm1"
        ));
        // Other VMs are independent.
        let other = store.lock("vm2").await.unwrap();
        drop(first);
        let again = store.lock("vm1").await.unwrap();
        assert_eq!(
            mode_of(&store.vm_dir("vm1").unwrap().join(LOCK_FILE)),
            0o600
        );
        drop((again, other));
    }

    #[tokio::test]
    async fn a_staged_dir_is_hidden_until_published_locked() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("vc"));
        let staged = store.stage_vm_dir("vm1").await.unwrap();
        assert_eq!(staged.id(), "vm1");
        assert!(staged.path().is_dir());
        assert_eq!(mode_of(staged.path()), 0o700);
        assert!(store.list_vms().await.unwrap().is_empty(), "not a VM yet");
        assert!(!store.vm_dir("vm1").unwrap().exists());
        // Its lock is being taken by a live creator: not abandoned.
        let (dir, lock) = staged.publish().await.unwrap();
        assert_eq!(dir, store.vm_dir("vm1").unwrap());
        assert_eq!(store.list_vms().await.unwrap(), vec!["vm1"]);
        assert!(store.is_locked("vm1").await.unwrap(), "published locked");
        assert!(matches!(store.lock("vm1").await, Err(Error::Locked { .. })));
        assert!(matches!(
            store.stage_vm_dir("vm1").await,
            Err(Error::AlreadyExists { .. })
        ));
        drop(lock);
        assert!(!store.is_locked("vm1").await.unwrap());
        // Never locked: no lock file, not a VM's directory.
        store.create_vm_dir("plain").await.unwrap();
        assert!(matches!(
            store.is_locked("plain").await,
            Err(Error::NotFound { .. })
        ));

        let staged = store.stage_vm_dir("vm2").await.unwrap();
        let hidden = staged.path().to_owned();
        staged.discard().await.unwrap();
        assert!(!hidden.exists());
    }

    #[tokio::test]
    async fn publishing_over_an_existing_dir_fails_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("vc"));
        let staged = store.stage_vm_dir("vm1").await.unwrap();
        let hidden = staged.path().to_owned();
        store.create_vm_dir("vm1").await.unwrap();
        assert!(matches!(
            staged.publish().await,
            Err(Error::AlreadyExists { .. })
        ));
        assert!(!hidden.exists());
        assert!(store.vm_dir("vm1").unwrap().is_dir(), "the other one kept");
    }

    #[tokio::test]
    async fn abandoned_staged_dirs_are_removed_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("vc"));
        assert!(store.remove_abandoned_staging().await.unwrap().is_empty());
        // Abandoned after taking its lock, abandoned before, and one whose creator holds it.
        let vm = store.root().join("vm");
        for (name, lock) in [(".new-a", true), (".new-b", false), (".new-c", true)] {
            fs::create_dir_all(vm.join(name)).unwrap();
            if lock {
                fs::write(vm.join(name).join(LOCK_FILE), b"").unwrap();
            }
        }
        let held = lock_blocking("c", &vm.join(".new-c/lock"), Open::OrCreate, FILE_MODE).unwrap();
        store.create_vm_dir("d").await.unwrap();
        let mut removed = store.remove_abandoned_staging().await.unwrap();
        removed.sort();
        assert_eq!(removed, vec![vm.join(".new-a"), vm.join(".new-b")]);
        assert!(vm.join(".new-c").is_dir() && vm.join("d").is_dir());
        drop(held);
    }

    #[tokio::test]
    async fn destroy_while_locked_then_recreate() {
        let (_tmp, store) = store_with_vm("vm1").await;
        let guard = store.lock("vm1").await.unwrap();
        store.destroy_vm_dir("vm1").await.unwrap();
        drop(guard);
        store.create_vm_dir("vm1").await.unwrap();
        drop(store.lock("vm1").await.unwrap());
    }
}
