//! Lifecycle errors of the QEMU backend that need no guest.

use super::*;
use crate::config::TemplatePaths;

#[tokio::test]
async fn lifecycle_errors_without_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = HypervisorConfig::new(dir.path().join("missing-kernel"), None);
    cfg.accel = Accel::Tcg;
    let vm = Qemu::new("t", cfg, dir.path().join("run")).expect("new");
    assert_eq!(vm.status().await.ok(), Some(VmStatus::NotStarted));
    assert!(matches!(vm.pause().await, Err(Error::NotRunning { .. })));
    assert!(matches!(
        vm.add_vcpus(1).await,
        Err(Error::NotRunning { .. })
    ));
    // Unreadable kernel: start fails validation and leaves nothing behind.
    assert!(matches!(vm.start().await, Err(Error::Config(_))));
    assert!(!dir.path().join("run").exists());
    vm.stop().await.expect("stop is a no-op");
    vm.stop().await.expect("and idempotent");
    assert_eq!(vm.pid(), None);
    assert_eq!(
        vm.agent_endpoint(),
        Some(AgentEndpoint::VirtioSerial {
            path: dir.path().join("run/agent.sock")
        })
    );
    let st = vm.state().await;
    assert_eq!(st.pid, None);
    assert!(matches!(vm.detach().await, Err(Error::NotRunning { .. })));
}

#[tokio::test]
async fn missing_qemu_binary_is_a_spawn_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("k");
    std::fs::write(&kernel, b"k").expect("write");
    let mut cfg = HypervisorConfig::new(kernel, None);
    cfg.accel = Accel::Tcg;
    cfg.qemu_path = dir.path().join("no-such-qemu");
    let vm = Qemu::new("t", cfg, dir.path().join("run")).expect("new");
    assert!(matches!(vm.start().await, Err(Error::Spawn { .. })));
    assert!(
        !dir.path().join("run").exists(),
        "run dir removed after failure"
    );
}

#[tokio::test]
async fn clone_state_that_is_a_symlink_or_fifo_is_refused_before_qemu_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (kernel, initrd) = (dir.path().join("k"), dir.path().join("i"));
    std::fs::write(&kernel, b"k").expect("write");
    std::fs::write(&initrd, b"i").expect("write");
    let real = dir.path().join("real-state");
    std::fs::write(&real, b"state").expect("write");
    let tpl = dir.path().join("tpl");
    std::fs::create_dir(&tpl).expect("mkdir");
    let makers: [fn(&Path, &Path); 2] = [
        |state, real| std::os::unix::fs::symlink(real, state).expect("ln"),
        |state, _| nix::unistd::mkfifo(state, nix::sys::stat::Mode::S_IRWXU).expect("fifo"),
    ];
    for make in makers {
        let state = tpl.join("state");
        let _ = std::fs::remove_file(&state);
        make(&state, &real);
        let mut cfg = HypervisorConfig::new(&kernel, Some(initrd.clone()));
        cfg.accel = Accel::Tcg;
        // Were the state opened, spawning this would fail instead (`Error::Spawn`).
        cfg.qemu_path = dir.path().join("no-such-qemu");
        cfg.template = Some(TemplateRole::CloneFrom(TemplatePaths {
            memory: tpl.join("memory"),
            state: state.clone(),
        }));
        let vm = Qemu::new("t", cfg, dir.path().join("run")).expect("new");
        let started = tokio::time::timeout(Duration::from_secs(5), vm.start())
            .await
            .expect("refused at once");
        assert!(
            matches!(&started, Err(Error::Io { path, .. }) if *path == state),
            "{started:?}"
        );
        assert!(!dir.path().join("run").exists(), "run dir removed");
    }
}

#[tokio::test]
async fn qemu_exiting_during_start_is_an_exit_with_its_message() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("k");
    std::fs::write(&kernel, b"k").expect("write");
    let qemu = dir.path().join("qemu");
    std::fs::write(
        &qemu,
        "#!/bin/sh\necho 'qemu-system-x86_64: -machine q35: no such machine' >&2\nexit 1\n",
    )
    .expect("script");
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cfg = HypervisorConfig::new(kernel, None);
    cfg.accel = Accel::Tcg;
    cfg.qemu_path = qemu;
    let vm = Qemu::new("t", cfg, dir.path().join("run")).expect("new");
    let t0 = std::time::Instant::now();
    let err = vm.start().await.expect_err("QEMU exits");
    assert!(t0.elapsed() < SOCKET_TIMEOUT / 2, "{:?}", t0.elapsed());
    assert!(
        matches!(&err, Error::Exited { what: "QEMU", status: Some(s), stderr_tail, .. }
            if s.code() == Some(1) && stderr_tail.ends_with("no such machine")),
        "{err:?}"
    );
    assert!(!dir.path().join("run").exists(), "run dir removed");
    // Not running: `exited` does not resolve.
    let pending = tokio::time::timeout(Duration::from_millis(20), vm.exited());
    assert!(pending.await.is_err());
}

#[tokio::test]
async fn attach_to_dead_pid_fails() {
    let mut st = Qemu::new("t", HypervisorConfig::new("/k", None), "/nonexistent/run")
        .expect("new")
        .state()
        .await;
    st.pid = Some(u32::MAX - 1);
    st.pid_start_time = Some(1);
    assert!(matches!(
        Qemu::attach(st).await,
        Err(Error::ProcessGone { .. })
    ));
}

/// A QEMU that never answers `quit` (a hung main loop ignores SIGTERM too) is killed once the
/// quit times out, without waiting out the grace a quitting QEMU gets.
#[tokio::test]
async fn a_qemu_deaf_to_quit_is_killed_without_the_grace() {
    let (_dir, inner, mut r, log) = fake_qmp::fake_vm(HypervisorConfig::new("/k", None), |cmd| {
        match cmd["execute"].as_str() {
            Some("quit") => serde_json::json!([]),
            _ => serde_json::json!({"return": {}}),
        }
    })
    .await;
    let t0 = std::time::Instant::now();
    inner
        .teardown(Some(&r.qmp), Some(&mut r.qemu), None, false)
        .await
        .expect("killed");
    assert!(t0.elapsed() < QUIT_GRACE, "{:?}", t0.elapsed());
    assert!(r.qemu.wait_exit(Duration::ZERO).await, "gone");
    assert_eq!(
        fake_qmp::names(&log).last().map(String::as_str),
        Some("quit")
    );
}
