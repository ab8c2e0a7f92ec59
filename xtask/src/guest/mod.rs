//! `cargo xtask guest`: the guest image (kernel + initramfs) every real-QEMU test and bench boots.
//!
//! Inputs: a Debian cloud kernel ([`GuestKernel`]: 6.1 or 6.12, see `kernel.rs`), the
//! statically linked guest agent, `busybox-static` and the extra packages of [`ImageSpec`] with
//! their dependency closure (fetched with `apt-get download`, unpacked with `dpkg-deb -x`: no
//! maintainer scripts run). Output in `target/guest/`:
//! - `vmlinuz`: the kernel;
//! - `initramfs.cpio`: a reproducible, usr-merged newc archive (`/init` = agent, busybox and its
//!   applet links, the packages, those of the virtio/vsock/virtio-blk/virtio-net modules the
//!   kernel does not have built in, `/lib/modules/load-order`, `/dev/console`, `/etc/passwd`),
//!   all mtimes 0, owners root;
//! - `manifest.json`: what went in (the kernel series too), with hashes and package versions.
//!   A rebuild happens only when an input changes.

mod config;
mod cpio;
mod debs;
mod kernel;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use self::config::ImageSpec;
use self::cpio::{Node, Tree};
use self::kernel::{read_module, ModuleSource};
pub use self::kernel::{GuestKernel, KernelTree};
use crate::util::{run, workspace_root};

/// Modules the guest needs, in load order (no modules.dep ships in the .deb). Those a kernel
/// has built in (6.12 builds in virtio, virtio_pci and virtio_console) are left out of its
/// image.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_mmio",
    "virtio_console",
    // virtio-net and what it links against (net_failover needs failover).
    "failover",
    "net_failover",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    // OCI containers: the root is an overlay of an erofs image (erofs links against
    // libcrc32c). All three are modules in Debian's 6.1 and 6.12 cloud kernels.
    "libcrc32c",
    "erofs",
    "overlay",
];

/// Bumped whenever the layout of the initramfs changes, so old images are rebuilt (3: the
/// virtio-net modules; 4: erofs and overlay for containers).
const IMAGE_FORMAT: u32 = 4;

/// Target triple of the static guest agent.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// What `target/guest/manifest.json` records.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Layout version of the image.
    pub format: u32,
    /// The kernel series asked for.
    pub kernel: GuestKernel,
    /// Versioned Debian package the kernel came from.
    pub kernel_package: String,
    /// Kernel release (`uname -r` inside the guest).
    pub kernel_release: String,
    /// SHA-256 of `vmlinuz`.
    pub kernel_sha256: String,
    /// SHA-256 of the agent binary placed at `/init`.
    pub agent_sha256: String,
    /// SHA-256 of `initramfs.cpio`.
    pub initramfs_sha256: String,
    /// Modules in the image, in load order.
    pub modules: Vec<String>,
    /// Modules of [`MODULES`] the kernel has built in (not in the image).
    #[serde(default)]
    pub builtin_modules: Vec<String>,
    /// Packages asked for (`--package`, the config file), busybox-static aside.
    pub requested_packages: Vec<String>,
    /// Every unpacked Debian package (the requested ones, their closure, busybox-static) and
    /// its version.
    pub packages: BTreeMap<String, String>,
}

/// Paths of a built guest image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Directory of the guest image.
pub fn guest_dir() -> PathBuf {
    workspace_root().join("target/guest")
}

/// Fetches (once) and unpacks (once) `kernel`'s package under `target/guest/cache`.
pub fn kernel_tree(kernel: GuestKernel) -> Result<KernelTree> {
    kernel::kernel_tree_in(&guest_dir().join("cache"), kernel)
}

/// Builds (or reuses) the guest image with the packages of `vmfactory-guest.toml`, if any.
pub fn build(quiet: bool) -> Result<GuestImage> {
    build_with(&ImageSpec::load(None, &[], None)?, quiet)
}

/// Builds (or reuses) the guest image of `spec` in `target/guest`.
pub fn build_with(spec: &ImageSpec, quiet: bool) -> Result<GuestImage> {
    build_in(spec, &guest_dir(), quiet)
}

/// Builds (or reuses) the image of `vmfactory-guest.toml` with `kernel` instead of the
/// configured series, in `target/guest-kernels/<series>` (for comparisons and the second
/// VMGenID e2e pass), and returns it with its directory.
pub fn build_kernel_image(kernel: GuestKernel, quiet: bool) -> Result<(GuestImage, PathBuf)> {
    let spec = ImageSpec {
        kernel,
        ..ImageSpec::load(None, &[], None)?
    };
    let dir = workspace_root()
        .join("target/guest-kernels")
        .join(kernel.as_str());
    Ok((build_in(&spec, &dir, quiet)?, dir))
}

/// Builds (or reuses) the guest image of `spec` in `dir` (the package cache stays shared in
/// `target/guest/cache`).
pub fn build_in(spec: &ImageSpec, dir: &Path, quiet: bool) -> Result<GuestImage> {
    fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let tree = kernel_tree(spec.kernel)?;
    let package = format!("linux-image-{}", tree.release);
    let vmlinuz_src = tree.vmlinuz();

    let agent = build_agent(quiet)?;
    let agent_bytes =
        fs::read(&agent).with_context(|| format!("Cannot read {}", agent.display()))?;
    ensure!(
        is_static_elf(&agent_bytes),
        "Agent {} is not statically linked",
        agent.display()
    );

    let mut modules = Vec::new();
    let mut builtin_modules = Vec::new();
    for name in MODULES {
        match tree.module_source(name)? {
            ModuleSource::BuiltIn => builtin_modules.push(name.to_string()),
            ModuleSource::File(path) => modules.push((name.to_string(), read_module(&path)?)),
        }
    }

    let mut roots = vec![BUSYBOX_PACKAGE.to_string()];
    roots.extend(spec.packages.iter().cloned());
    let closure = debs::closure(&roots)?;
    let unpacked = debs::fetch(&guest_dir().join("cache"), &closure)?;
    let trees: Vec<(String, PathBuf)> = closure
        .iter()
        .map(|p| p.name.clone())
        .zip(unpacked)
        .collect();

    let kernel_bytes = fs::read(&vmlinuz_src)?;
    let cpio = initramfs(&agent_bytes, &modules, &trees)?.write()?;
    let manifest = Manifest {
        format: IMAGE_FORMAT,
        kernel: spec.kernel,
        kernel_package: package,
        kernel_release: tree.release.clone(),
        kernel_sha256: sha256(&kernel_bytes),
        agent_sha256: sha256(&agent_bytes),
        initramfs_sha256: sha256(&cpio),
        modules: modules.iter().map(|(m, _)| m.clone()).collect(),
        builtin_modules,
        requested_packages: spec.packages.clone(),
        packages: closure
            .iter()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect(),
    };

    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio"),
    };
    let manifest_path = dir.join("manifest.json");
    let current: Option<Manifest> = fs::read(&manifest_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if current.as_ref() == Some(&manifest) && image.kernel.is_file() && image.initrd.is_file() {
        if !quiet {
            eprintln!("guest image up to date: {}", dir.display());
        }
        return Ok(image);
    }
    write_atomic(&image.kernel, &kernel_bytes)?;
    write_atomic(&image.initrd, &cpio)?;
    write_atomic(&manifest_path, &serde_json::to_vec_pretty(&manifest)?)?;
    if !quiet {
        eprintln!(
            "guest image built: {} ({} KiB initramfs, {} Debian packages, kernel {} ({}))",
            dir.display(),
            cpio.len() / 1024,
            manifest.packages.len(),
            manifest.kernel_release,
            manifest.kernel
        );
    }
    Ok(image)
}

/// Builds the statically linked guest agent and returns its path.
fn build_agent(quiet: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "-p", "vmfactory-guest", "--bin", "vmfactory-agent"])
        .args(["--profile", "agent-static", "--target", GUEST_TARGET])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    if quiet {
        cmd.arg("-q");
    }
    run(&mut cmd)?;
    Ok(root.join(format!(
        "target/{GUEST_TARGET}/agent-static/vmfactory-agent"
    )))
}

/// True when the ELF file has no `PT_INTERP` program header (no dynamic loader).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(0..4) != Some(b"\x7fELF".as_slice()) || bytes.get(4) != Some(&2) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let off = phoff as usize + i * usize::from(phentsize);
        u32_at(off).is_some_and(|t| t != PT_INTERP)
    })
}

/// Debian package that gives every image its userland.
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Empty directories of the image, with their modes (the agent mounts over most of them).
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("dev/pts", 0o755),
    ("etc", 0o755),
    ("mnt", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

/// Users and groups that busybox's `id`, `ls -l` and the devpts `gid=5` mount refer to.
const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n";

/// Builds the initramfs tree: the unpacked packages (sorted by name), busybox's applets where
/// no package put a file, then our own files, which win over anything a package shipped.
fn initramfs(
    agent: &[u8],
    modules: &[(String, Vec<u8>)],
    packages: &[(String, PathBuf)],
) -> Result<Tree> {
    let mut tree = Tree::new();
    for (name, root) in packages {
        for path in debs::add_unpacked(&mut tree, root)? {
            eprintln!("guest: warning: {name} replaces /{path} from an earlier package");
        }
    }
    if let Some((_, root)) = packages.iter().find(|(n, _)| n == BUSYBOX_PACKAGE) {
        for applet in debs::busybox_applets(&root.join("bin/busybox"))? {
            if tree.get(&applet).is_none() {
                tree.insert(&applet, Node::Symlink("/bin/busybox".into()))?;
            }
        }
    }
    for (dir, mode) in DIRS {
        tree.insert(dir, Node::Dir(*mode))?;
    }
    tree.insert("etc/passwd", Node::File(0o644, PASSWD.into()))?;
    tree.insert("etc/group", Node::File(0o644, GROUP.into()))?;
    tree.insert("dev/console", Node::CharDev(5, 1))?;
    if tree
        .insert("init", Node::File(0o755, agent.to_vec()))?
        .is_some()
    {
        eprintln!("guest: warning: a package shipped /init; the agent replaces it");
    }
    let mut order = String::new();
    for (name, bytes) in modules {
        tree.insert(
            &format!("lib/modules/{name}.ko"),
            Node::File(0o644, bytes.clone()),
        )?;
        order.push_str(&format!("{name}.ko\n"));
    }
    tree.insert(
        "lib/modules/load-order",
        Node::File(0o644, order.into_bytes()),
    )?;
    Ok(tree)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file =
        fs::File::create(&tmp).with_context(|| format!("Cannot create {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("Cannot rename to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_files_win_and_applets_do_not_replace_package_files() {
        let pkg = tempfile::tempdir().unwrap();
        fs::create_dir_all(pkg.path().join("etc")).unwrap();
        fs::write(pkg.path().join("etc/passwd"), b"theirs").unwrap();
        fs::write(pkg.path().join("init"), b"theirs").unwrap();
        let modules = vec![("virtio".to_string(), b"mod".to_vec())];
        let packages = vec![("p".to_string(), pkg.path().to_path_buf())];
        let tree = initramfs(b"agent", &modules, &packages).unwrap();
        assert_eq!(
            tree.get("init"),
            Some(&Node::File(0o755, b"agent".to_vec()))
        );
        assert_eq!(
            tree.get("etc/passwd"),
            Some(&Node::File(0o644, PASSWD.into()))
        );
        assert_eq!(tree.get("tmp"), Some(&Node::Dir(0o1777)));
        assert_eq!(
            tree.get("lib/modules/load-order"),
            Some(&Node::File(0o644, b"virtio.ko\n".to_vec()))
        );
        assert!(tree.get("usr/lib/modules/virtio.ko").is_some());
        let a = tree.write().unwrap();
        assert_eq!(
            a,
            initramfs(b"agent", &modules, &packages)
                .unwrap()
                .write()
                .unwrap()
        );
    }

    /// No modules.dep ships: the list itself must put a module after those it links against.
    #[test]
    fn modules_load_after_their_dependencies() {
        let at = |m: &str| MODULES.iter().position(|x| *x == m).unwrap();
        for (before, after) in [
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
            ("virtio_ring", "virtio_net"),
            ("virtio", "virtio_net"),
            ("virtio_pci", "virtio_net"),
            ("libcrc32c", "erofs"),
        ] {
            assert!(at(before) < at(after), "{before} must load before {after}");
        }
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"not an elf"));
        let host = fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are dynamically linked.
        assert!(!is_static_elf(&host));
    }
}
