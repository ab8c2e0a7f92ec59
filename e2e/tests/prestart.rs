//! Pre-started clones on real QEMU: a template factory keeps QEMUs waiting at `-incoming
//! defer`; `get_vm` hands each out once, as a working VM; one SIGKILLed while it waits is
//! replaced and never handed out; a rewritten template drops them; `close` leaves nothing.

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmfactory_e2e::{guest_env, scaled, vm, RunRoot};
use vmfactory_factory::{BaseError, Factory, GetVmError, Prestarted, TemplateError, MEMORY_FILE};

/// Waits until `pred` holds for the factory's pre-started clones.
async fn until(f: &Factory, what: &str, pred: impl Fn(&Prestarted) -> bool) -> Prestarted {
    let deadline = Instant::now() + scaled(Duration::from_secs(60));
    loop {
        let p = f.prestarted();
        if pred(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "{what}: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prestarted_clones_are_handed_out_once_replaced_and_dropped() {
    let Some(env) = guest_env() else { return };
    let root = RunRoot::new();
    let mut cfg = vm::template_factory_config(&env, root.path());
    cfg.prestart = 2;
    let f = Factory::new(&cfg).await.expect("template factory");
    let waiting = until(&f, "two wait", |p| p.pids.len() == 2).await;

    // Two at once: each gets its own waiting QEMU, and a working VM.
    let (a, b) = tokio::join!(f.get_vm(&cfg.vm), f.get_vm(&cfg.vm));
    let (a, b) = (a.expect("first"), b.expect("second"));
    let pids = [a.hypervisor().pid(), b.hypervisor().pid()].map(|p| p.expect("pid"));
    assert_ne!(pids[0], pids[1], "never one QEMU for two clones");
    for pid in pids {
        assert!(
            waiting.pids.contains(&pid),
            "{pid} was pre-started: {waiting:?}"
        );
    }
    for vm in [&a, &b] {
        vm.agent().check().await.expect("the clone answers");
    }

    // Refilled; one of them SIGKILLed while it waits is replaced, never handed out.
    let refilled = until(&f, "refilled", |p| p.pids.len() == 2).await;
    let victim = refilled.pids[0];
    kill(
        Pid::from_raw(i32::try_from(victim).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill");
    until(&f, "replaced", |p| {
        p.pids.len() == 2 && !p.pids.contains(&victim)
    })
    .await;
    let c = f.get_vm(&cfg.vm).await.expect("third");
    assert_ne!(c.hypervisor().pid(), Some(victim));
    c.agent().check().await.expect("the third answers");

    // The template's memory rewritten: the get is refused and the waiting QEMUs stopped.
    let before = until(&f, "refilled again", |p| p.pids.len() == 2).await;
    let memory = cfg.template_path.join(MEMORY_FILE);
    let bytes = std::fs::read(&memory).expect("memory");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&memory, &bytes).expect("rewrite");
    let err = f.get_vm(&cfg.vm).await.expect_err("changed template");
    assert!(
        matches!(
            err,
            GetVmError::Base(BaseError::Template(TemplateError::Modified { .. }))
        ),
        "{err:?}"
    );
    assert_eq!(f.prestarted().waiting, 0, "dropped");
    for pid in before.pids {
        assert!(!alive(pid), "{pid} stopped");
    }

    for vm in [a, b, c] {
        vm.stop().await.expect("stop");
    }
    f.close().await.expect("close");
    root.assert_no_leaks();
}
