//! `cargo xtask guest`: the guest image (kernel + initramfs) every real-QEMU test and bench boots.
//!
//! Inputs: Debian's `linux-image-cloud-amd64` (resolved to its versioned package, fetched with
//! `apt-get download`, unpacked with `dpkg-deb -x`: no maintainer scripts run), the statically
//! linked guest agent, `busybox-static` and the extra packages of [`ImageSpec`] with their
//! dependency closure (fetched and unpacked the same way). Output in `target/guest/`:
//! - `vmlinuz`: the kernel;
//! - `initramfs.cpio`: a reproducible, usr-merged newc archive (`/init` = agent, busybox and its
//!   applet links, the packages, the virtio/vsock/virtio-blk modules, `/lib/modules/load-order`,
//!   `/dev/console`, `/etc/passwd`), all mtimes 0, owners root;
//! - `manifest.json`: what went in, with hashes and package versions. A rebuild happens only
//!   when an input changes.

mod config;
mod cpio;
mod debs;

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
use crate::util::{run, workspace_root};

/// The meta package whose dependency names the kernel we use.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest needs, in load order (no modules.dep ships in the .deb).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_mmio",
    "virtio_console",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Bumped whenever the layout of the initramfs changes, so old images are rebuilt.
const IMAGE_FORMAT: u32 = 2;

/// Target triple of the static guest agent.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// What `target/guest/manifest.json` records.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Layout version of the image.
    pub format: u32,
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
    /// Modules in load order.
    pub modules: Vec<String>,
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

/// The unpacked kernel package: `boot/vmlinuz-<release>` and `lib/modules/<release>/`.
pub struct KernelTree {
    /// Where `dpkg-deb -x` put the package.
    pub unpacked: PathBuf,
    /// Kernel release (`uname -r`).
    pub release: String,
}

impl KernelTree {
    /// Path of module `name` (e.g. `kernel/arch/x86/kvm/kvm.ko` → give `arch/x86/kvm/kvm`).
    pub fn module(&self, rel: &str) -> PathBuf {
        self.unpacked
            .join(format!("lib/modules/{}/kernel", self.release))
            .join(format!("{rel}.ko"))
    }
}

/// Fetches (once) and unpacks (once) the kernel package under `target/guest/cache`.
pub fn kernel_tree() -> Result<KernelTree> {
    let cache = guest_dir().join("cache");
    fs::create_dir_all(&cache).with_context(|| format!("Cannot create {}", cache.display()))?;
    let deb = kernel_deb(&cache)?;
    let package = deb
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').next())
        .context("Kernel package file name is not name_version_arch.deb")?
        .to_string();
    let unpacked = cache.join(format!("{package}.unpacked"));
    if !unpacked.join("boot").is_dir() {
        let tmp = cache.join(format!("{package}.unpacking"));
        let _ = fs::remove_dir_all(&tmp);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        fs::rename(&tmp, &unpacked)?;
    }
    let release = package
        .strip_prefix("linux-image-")
        .context("Kernel package is not linux-image-*")?
        .to_string();
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{release}"));
    ensure!(
        vmlinuz.is_file(),
        "Kernel {} missing from the package",
        vmlinuz.display()
    );
    Ok(KernelTree { unpacked, release })
}

/// Builds (or reuses) the guest image with the packages of `vmfactory-guest.toml`, if any.
pub fn build(quiet: bool) -> Result<GuestImage> {
    build_with(&ImageSpec::load(None, &[])?, quiet)
}

/// Builds (or reuses) the guest image with the packages of `spec`.
pub fn build_with(spec: &ImageSpec, quiet: bool) -> Result<GuestImage> {
    let dir = guest_dir();

    let KernelTree { unpacked, release } = kernel_tree()?;
    let package = format!("linux-image-{release}");
    let vmlinuz_src = unpacked.join(format!("boot/vmlinuz-{release}"));

    let agent = build_agent(quiet)?;
    let agent_bytes =
        fs::read(&agent).with_context(|| format!("Cannot read {}", agent.display()))?;
    ensure!(
        is_static_elf(&agent_bytes),
        "Agent {} is not statically linked",
        agent.display()
    );

    let mut modules = Vec::new();
    for name in MODULES {
        let path = unpacked
            .join(format!("lib/modules/{release}"))
            .join(module_subdir(name));
        let path = path.join(format!("{name}.ko"));
        let bytes = fs::read(&path)
            .with_context(|| format!("Module {name} missing: {}", path.display()))?;
        modules.push((name.to_string(), bytes));
    }

    let mut roots = vec![BUSYBOX_PACKAGE.to_string()];
    roots.extend(spec.packages.iter().cloned());
    let closure = debs::closure(&roots)?;
    let unpacked = debs::fetch(&dir.join("cache"), &closure)?;
    let trees: Vec<(String, PathBuf)> = closure
        .iter()
        .map(|p| p.name.clone())
        .zip(unpacked)
        .collect();

    let kernel_bytes = fs::read(&vmlinuz_src)?;
    let cpio = initramfs(&agent_bytes, &modules, &trees)?.write()?;
    let manifest = Manifest {
        format: IMAGE_FORMAT,
        kernel_package: package,
        kernel_release: release,
        kernel_sha256: sha256(&kernel_bytes),
        agent_sha256: sha256(&agent_bytes),
        initramfs_sha256: sha256(&cpio),
        modules: MODULES.iter().map(|m| m.to_string()).collect(),
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
            "guest image built: {} ({} KiB initramfs, {} Debian packages, kernel {})",
            dir.display(),
            cpio.len() / 1024,
            manifest.packages.len(),
            manifest.kernel_release
        );
    }
    Ok(image)
}

/// Where each module lives under `lib/modules/<release>/`.
fn module_subdir(name: &str) -> &'static str {
    match name {
        "virtio_console" => "kernel/drivers/char",
        "virtio_blk" => "kernel/drivers/block",
        n if n.starts_with("virtio") => "kernel/drivers/virtio",
        _ => "kernel/net/vmw_vsock",
    }
}

/// Returns the kernel .deb, downloading it once. `VMFACTORY_KERNEL_DEB` overrides.
fn kernel_deb(cache: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VMFACTORY_KERNEL_DEB") {
        return Ok(PathBuf::from(path));
    }
    let package = match resolve_kernel_package() {
        Ok(p) => p,
        Err(_) => {
            // A fresh machine has no package lists yet.
            run(Command::new("apt-get").arg("update").arg("-qq"))?;
            resolve_kernel_package()?
        }
    };
    if let Some(found) = find_deb(cache, &package)? {
        return Ok(found);
    }
    run(Command::new("apt-get")
        .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
        .arg(&package)
        .current_dir(cache))?;
    find_deb(cache, &package)?.with_context(|| format!("apt-get download {package} left no .deb"))
}

fn find_deb(cache: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(cache)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `linux-image-cloud-amd64` → `linux-image-6.1.0-NN-cloud-amd64`.
fn resolve_kernel_package() -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META_PACKAGE])
        .output()
        .context("Cannot run apt-cache (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
        .map(str::to_string)
        .with_context(|| format!("apt-cache knows no dependency of {KERNEL_META_PACKAGE}"))
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

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"not an elf"));
        let host = fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are dynamically linked.
        assert!(!is_static_elf(&host));
    }

    #[test]
    fn module_paths() {
        assert_eq!(module_subdir("virtio_console"), "kernel/drivers/char");
        assert_eq!(module_subdir("virtio_pci"), "kernel/drivers/virtio");
        assert_eq!(module_subdir("virtio_blk"), "kernel/drivers/block");
        assert_eq!(module_subdir("vsock"), "kernel/net/vmw_vsock");
    }
}
