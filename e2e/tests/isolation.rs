//! Isolation of clones on real QEMU: clones of one template get RNG states of their own, a
//! clock set to the host's although the template was made minutes earlier, and private memory
//! (the template's memory file is unchanged after they ran); the template directory is 0700
//! and every socket of the run root 0600.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmfactory_e2e::{guest_env, vm, RunRoot};
use vmfactory_factory::{BaseKind, Factory};

/// How long the template ages before clones are taken: a clone resumes with the clock the
/// template was saved with, so an unsynced clone is this far behind; `get_vm`'s must not be.
/// Only wall time: nothing runs meanwhile, so CI pays two minutes of waiting, not of CPU.
const TEMPLATE_AGE: Duration = Duration::from_secs(120);

/// How far off a clone's clock may be after `get_vm`.
const MAX_SKEW: Duration = Duration::from_secs(1);

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn sockets_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_no_randomness_time_or_memory() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let cfg = vm::template_factory_config(&env, root.path());
    // Before the template exists: its clock is set while it is made, so it can't be older.
    let made = std::time::Instant::now();
    let factory = Factory::new(&cfg).await.expect("template factory");
    assert_eq!(factory.kind(), BaseKind::Template);

    let tpl_mode = std::fs::metadata(&cfg.template_path)
        .expect("template dir")
        .permissions();
    assert_eq!(tpl_mode.mode() & 0o777, 0o700, "template directory mode");
    let memory = cfg.template_path.join("memory");
    let before = sha256(&memory);

    // Age the template, then take a clone straight from the base: resumed, neither reseeded
    // nor given the time. Its clock shows the template's age, and its RNG stream is the
    // template's own.
    tokio::time::sleep(TEMPLATE_AGE).await;
    let raw = factory
        .base()
        .get_base_vm(&cfg.vm)
        .await
        .expect("base clone");
    raw.resume().await.expect("resume");
    raw.wait_ready().await.expect("agent");
    let raw_skew = vm::clock_skew(&raw).await.expect("guest time");
    eprintln!(
        "unsynced clone of a template made at most {:?} ago: clock off by {raw_skew:?}",
        made.elapsed()
    );
    assert!(
        raw_skew + MAX_SKEW >= TEMPLATE_AGE && raw_skew <= made.elapsed() + MAX_SKEW,
        "an unsynced clone of a template made {:?} ago is {raw_skew:?} off",
        made.elapsed()
    );
    let template_random = raw.agent().random(32).await.expect("random");

    let a = factory.get_vm(&cfg.vm).await.expect("clone a");
    let b = factory.get_vm(&cfg.vm).await.expect("clone b");
    let ra = a.agent().random(32).await.expect("random a");
    let rb = b.agent().random(32).await.expect("random b");
    assert_ne!(ra, rb, "two clones return the same randomness");
    assert_ne!(ra, template_random);
    assert_ne!(rb, template_random);
    for v in [&a, &b] {
        let skew = vm::clock_skew(v).await.expect("guest time");
        eprintln!("clone {} after get_vm: clock off by {skew:?}", v.id());
        assert!(
            skew < MAX_SKEW,
            "clone {} of a template made {:?} ago: clock off by {skew:?}",
            v.id(),
            made.elapsed()
        );
    }

    // Make the clones write to their memory: the agent allocates and fills buffers.
    for v in [&a, &b, &raw] {
        for _ in 0..8 {
            v.agent().random(1 << 20).await.expect("random 1 MiB");
        }
    }
    let sockets = sockets_under(root.path());
    assert!(!sockets.is_empty(), "no sockets found under the run root");
    for s in &sockets {
        let mode = std::fs::metadata(s).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", s.display());
    }
    for v in [a, b, raw] {
        v.stop().await.expect("stop");
    }
    assert_eq!(
        sha256(&memory),
        before,
        "a clone changed the template's memory file"
    );
    factory.close().await.expect("close");
    root.assert_no_leaks();
}
