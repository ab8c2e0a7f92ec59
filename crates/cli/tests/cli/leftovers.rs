//! What killed commands leave, without QEMU: VM directories no process owns, one with a
//! stand-in "QEMU" (a `sleep` the test started) recorded and one that never ran a process,
//! beside an operator's `tail -f` of a VM's console log. `status` lists them; `destroy` ends exactly the
//! recorded process and leaves the `tail` alone. Uses the helpers of `cli.rs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use vmfactory_hypervisor::{ProcessKind, ProcessRecord};
use vmfactory_persist::Store;

use super::{stdout, Scratch};

const RECORDED: &str = "1d7c3a52-4b0f-4a57-8f7e-5f9a3c2d1e01";
const NEVER_RAN: &str = "2e8d4b63-5c1f-4b68-9f8f-6fab4d3e2f02";

pub(super) fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// An unowned VM directory under `root` (locked once, as every VM's, then released), with
/// `qemu` recorded as its QEMU when given, as QEMU records itself.
pub(super) async fn orphan(root: &Path, id: &str, qemu: Option<u32>) {
    let store = Store::new(root);
    let dir = store.create_vm_dir(id).await.expect("VM dir");
    drop(store.lock(id).await.expect("lock"));
    if let Some(pid) = qemu {
        ProcessRecord::save(ProcessKind::Qemu, pid, &dir)
            .await
            .expect("record");
    }
}

/// Kills a child of the test if it still runs.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    fn running(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }
}

#[test]
fn status_lists_orphans_and_destroy_ends_only_recorded_processes() {
    let s = Scratch::new();
    let cfg = s.write(&s.config(false, 0));
    let root = s.path().join("run");
    let mut qemu = Reaped(Command::new("sleep").arg("300").spawn().expect("sleep"));
    block_on(async {
        orphan(&root, RECORDED, Some(qemu.0.id())).await;
        orphan(&root, NEVER_RAN, None).await;
    });
    let log = root.join("vm").join(NEVER_RAN).join("console.log");
    std::fs::write(&log, b"").expect("log");
    let mut tail = Reaped(
        Command::new("tail")
            .arg("-f")
            .arg(&log)
            .stdout(Stdio::null())
            .spawn()
            .expect("tail"),
    );

    let o = s.run(&cfg, &["status", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON");
    let vms = v["leftovers"]["orphaned_vms"].as_array().expect("orphans");
    assert_eq!(vms.len(), 2, "{v}");
    assert_eq!(vms[0]["id"], RECORDED);
    let p = &vms[0]["processes"][0];
    assert_eq!(
        (&p["kind"], &p["pid"], &p["alive"]),
        (&"qemu".into(), &qemu.0.id().into(), &true.into()),
        "{v}"
    );
    assert_eq!(vms[1]["id"], NEVER_RAN);
    assert_eq!(vms[1]["processes"], serde_json::json!([]));
    let remedy = v["leftovers"]["remedy"].as_str().expect("remedy");
    assert!(
        remedy.ends_with("destroy") && remedy.contains("--config"),
        "{remedy}"
    );
    let table = stdout(&s.run(&cfg, &["status"]));
    assert!(
        table.contains("orphaned VMs:  2 with no live owner"),
        "{table}"
    );
    assert!(table.contains("QEMU running"), "{table}");
    assert!(qemu.running() && tail.running(), "status touched nothing");

    let o = s.run(&cfg, &["destroy"]);
    assert_eq!(o.status.code(), Some(0), "{}", super::stderr(&o));
    assert!(
        stdout(&o).contains("stopped 2 orphaned VM(s)"),
        "{}",
        stdout(&o)
    );
    assert!(!qemu.running(), "the recorded process was ended");
    assert!(
        tail.running(),
        "a process that merely names the VM's directory survives"
    );
    assert!(!root.join("vm").exists(), "both directories removed");
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&s.run(&cfg, &["status", "--json"]))).expect("JSON");
    assert_eq!(v["leftovers"]["orphaned_vms"], serde_json::json!([]));
    assert_eq!(v["leftovers"]["remedy"], serde_json::Value::Null);
}
