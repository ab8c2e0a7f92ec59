//! The real `containerd-shim-vmfactory-v2` binary, run as containerd runs it.

use std::fs;
use std::path::Path;
use std::process::Command;

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim::DeleteResponse;

const BIN: &str = env!("CARGO_BIN_EXE_containerd-shim-vmfactory-v2");

fn mounted(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let d = dir.to_string_lossy();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(&*d))
}

/// containerd runs `delete` in the bundle after a shim died: the rootfs is unmounted and the
/// task is reported killed (128 + SIGKILL), with the protobuf reply on stdout.
#[test]
fn delete_after_a_dead_shim_unmounts_the_rootfs_and_reports_a_kill() {
    let t = tempfile::tempdir().expect("tmp");
    let (bundle, snap) = (t.path().join("bundle"), t.path().join("snap"));
    fs::create_dir_all(bundle.join("rootfs")).expect("bundle");
    fs::create_dir_all(&snap).expect("snapshot");
    nix::mount::mount(
        Some(&snap),
        &bundle.join("rootfs"),
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");
    let config = t.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[runtime]\nrun_root = \"{}\"\n",
            t.path().join("run").display()
        ),
    )
    .expect("config");
    let out = Command::new(BIN)
        .args([
            "-namespace",
            "default",
            "-id",
            "c1",
            "-address",
            "/nonexistent.sock",
        ])
        .arg("delete")
        .current_dir(&bundle)
        .env("VMFACTORY_CONFIG", &config)
        // containerd always sets it; `delete` does not dial it.
        .env("TTRPC_ADDRESS", "/nonexistent.sock.ttrpc")
        .output()
        .expect("run the shim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply = DeleteResponse::parse_from_bytes(&out.stdout).expect("a DeleteResponse");
    assert_eq!(reply.exit_status, 137);
    assert!(reply.exited_at.is_some());
    assert!(!mounted(&bundle.join("rootfs")));
}
