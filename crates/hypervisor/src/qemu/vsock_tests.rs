//! Starting a vsock VM against a stand-in kernel (`vsock::fake`) and a stand-in QEMU script:
//! the CID reserved and handed to QEMU with its descriptor, and nothing left on any failure.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::config::TemplatePaths;
use crate::vsock::fake::FakeKernel;
use crate::vsock::VsockError;

/// A "QEMU" that reports the vhost-vsock descriptor it inherited and its CID, and exits 1.
const REPORTING_QEMU: &str = r#"#!/bin/sh
for a in "$@"; do case "$a" in vhost-vsock-pci,*) dev=$a;; esac; done
fd=${dev#*vhostfd=}; fd=${fd%%,*}
echo "vhostfd $fd is $(readlink /proc/self/fd/$fd), guest-cid ${dev#*guest-cid=}" >&2
exit 1
"#;

fn vsock_config(dir: &Path) -> HypervisorConfig {
    let (kernel, initrd) = (dir.join("k"), dir.join("i"));
    std::fs::write(&kernel, b"k").expect("write");
    std::fs::write(&initrd, b"i").expect("write");
    let qemu = dir.join("qemu");
    std::fs::write(&qemu, REPORTING_QEMU).expect("script");
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut cfg = HypervisorConfig::new(kernel, Some(initrd));
    cfg.accel = Accel::Tcg;
    cfg.qemu_path = qemu;
    cfg.agent_channel = AgentChannel::Vsock { guest_cid: None };
    cfg
}

#[tokio::test]
async fn no_vhost_vsock_fails_before_anything_is_made() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = Arc::new(VhostVsock::new(dir.path().join("no-vhost-vsock")));
    let run = dir.path().join("run");
    let vm = Qemu::with_cid_kernel("t", vsock_config(dir.path()), &run, device).expect("new");
    let err = vm.start().await.expect_err("no device");
    assert!(
        matches!(
            &err,
            Error::Vsock {
                source: VsockError::NoDevice { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!run.exists(), "nothing created");
    assert_eq!(vm.agent_endpoint(), None);
}

#[tokio::test]
async fn qemu_inherits_the_reserved_cid_and_a_failed_start_releases_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = FakeKernel::new(&dir.path().join("vhost-vsock"));
    kernel.take(3..=5);
    let tpl = dir.path().join("tpl");
    std::fs::create_dir(&tpl).expect("mkdir");
    std::fs::write(tpl.join("state"), b"state").expect("write");
    let direct = vsock_config(dir.path());
    let mut clone = direct.clone();
    clone.template = Some(TemplateRole::CloneFrom(TemplatePaths {
        memory: tpl.join("memory"),
        state: tpl.join("state"),
    }));
    // A clone inherits two descriptors (its state and the device): the device's is the one
    // named on the command line.
    for cfg in [direct, clone] {
        let run = dir.path().join("run");
        let vm = Qemu::with_cid_kernel("t", cfg, &run, Arc::new(kernel.clone())).expect("new");
        let err = vm.start().await.expect_err("the script exits");
        let Error::Exited { stderr_tail, .. } = &err else {
            panic!("expected an exit, got {err:?}");
        };
        let (seen, cid) = stderr_tail
            .split_once(", guest-cid ")
            .unwrap_or_else(|| panic!("no report: {stderr_tail:?}"));
        assert!(
            seen.ends_with(&format!(" is {}", kernel.device.display())),
            "{stderr_tail}"
        );
        let cid: u32 = cid.parse().expect("a CID");
        assert!(cid >= 3 && cid != u32::MAX, "{cid}");
        assert!(kernel.taken.lock().expect("lock").contains(&cid));
        assert_eq!(kernel.open_fds(), 0, "our descriptor is closed");
        assert!(!run.exists(), "run dir removed");
        assert_eq!(vm.agent_endpoint(), None);
    }
}

#[tokio::test]
async fn a_pinned_cid_in_use_and_a_refusing_kernel_are_typed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = FakeKernel::new(&dir.path().join("vhost-vsock"));
    kernel.take([7]);
    let mut cfg = vsock_config(dir.path());
    cfg.agent_channel = AgentChannel::Vsock { guest_cid: Some(7) };
    let run = dir.path().join("run");
    let vm = Qemu::with_cid_kernel("t", cfg, &run, Arc::new(kernel.clone())).expect("new");
    let err = vm.start().await.expect_err("in use");
    assert!(
        matches!(
            &err,
            Error::Vsock {
                source: VsockError::CidInUse { cid: 7 },
                ..
            }
        ),
        "{err:?}"
    );
    let mut refusing = kernel.clone();
    refusing.fail = Some(nix::errno::Errno::EPERM);
    let vm = Qemu::with_cid_kernel("t", vsock_config(dir.path()), &run, Arc::new(refusing))
        .expect("new");
    let err = vm.start().await.expect_err("refused");
    assert!(
        matches!(
            &err,
            Error::Vsock {
                source: VsockError::SetCid { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(kernel.open_fds(), 0);
    assert!(!run.exists());
}
