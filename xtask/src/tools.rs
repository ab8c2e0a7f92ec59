//! Host tools the tests need and the project installs itself: QEMU (Debian package),
//! rust-vmm's `vhost-device-vsock` (crates.io), the user-space backend for hybrid vsock, and
//! what the OCI container tests run (Debian's containerd, runc, erofs-utils, busybox-static).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{on_path, run, workspace_root};

/// Version of `vhost-device-vsock` the e2e tests were proven with.
const VHOST_DEVICE_VSOCK_VERSION: &str = "0.3.0";

/// Installs `qemu-system-x86` (QEMU), `qemu-utils` (`qemu-img`, which the disk hotplug
/// e2e makes its qcow2 image with) and `nftables` (`nft`, which VM networks need) with apt
/// when they are missing.
pub fn ensure_qemu() -> Result<()> {
    apt_install_missing(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("nft", "nftables"),
    ])
}

/// Installs what the OCI container tests and bench need with apt when missing: `containerd`
/// (Debian's 1.6, with `ctr`), `runc` (the baseline runtime, and the proof of the harness),
/// `erofs-utils` (`mkfs.erofs`, which turns a snapshot into the image the VM mounts) and
/// `busybox-static` (on the host for tools that copy it; the test image itself is built from
/// the downloaded .deb, see `oci_image`).
pub fn ensure_containers() -> Result<()> {
    apt_install_missing(&CONTAINER_TOOLS)
}

/// `(binary, Debian package)` of [`ensure_containers`]; busybox-static's binary is
/// `/bin/busybox`, which the dynamic `busybox` package also provides, hence the path.
const CONTAINER_TOOLS: [(&str, &str); 4] = [
    ("containerd", "containerd"),
    ("runc", "runc"),
    ("mkfs.erofs", "erofs-utils"),
    ("busybox", "busybox-static"),
];

/// Installs the packages of the `(binary, package)` pairs whose binary is not on `PATH`.
fn apt_install_missing(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages = missing.join(" ");
    if !nix_is_root() {
        bail!("{packages} missing; install: apt-get install --no-install-recommends {packages}");
    }
    eprintln!("installing {packages} ...");
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Path of the `vhost-device-vsock` binary installed under `target/tools`.
pub fn vhost_device_vsock() -> PathBuf {
    workspace_root().join("target/tools/bin/vhost-device-vsock")
}

/// Installs `vhost-device-vsock` from crates.io under `target/tools` when missing.
pub fn ensure_vhost_device_vsock() -> Result<PathBuf> {
    let bin = vhost_device_vsock();
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!("installing vhost-device-vsock {VHOST_DEVICE_VSOCK_VERSION} (about a minute) ...");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args([
            "install",
            "--locked",
            "--quiet",
            "vhost-device-vsock",
            "--version",
        ])
        .arg(VHOST_DEVICE_VSOCK_VERSION)
        .arg("--root")
        .arg(workspace_root().join("target/tools"))
        .env_remove("CARGO_TARGET_DIR"))?;
    Ok(bin)
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
