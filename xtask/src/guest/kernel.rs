//! The guest kernel: which Debian cloud kernel ([`GuestKernel`]), fetched once with
//! `apt-get download` and unpacked with `dpkg-deb -x` (no maintainer scripts run), and where
//! each module the guest needs is in it ([`KernelTree::module_source`]): built in, or a
//! `.ko` / `.ko.xz` file (decompressed here, so the guest never does it at boot).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::run;

/// The Debian cloud kernel series the image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum GuestKernel {
    /// bookworm's own kernel (`linux-image-cloud-amd64`): no VMGenID driver.
    #[serde(rename = "6.1")]
    #[value(name = "6.1")]
    V6_1,
    /// The 6.12 series Debian ships to bookworm (`linux-image-6.12-cloud-amd64`, from
    /// bookworm-security on our mirror): `CONFIG_VMGENID=y`, so a clone reseeds its CRNG
    /// itself when QEMU's `vmgenid` device hands it a new generation id.
    #[serde(rename = "6.12")]
    #[value(name = "6.12")]
    V6_12,
}

/// The kernel an image gets when neither the config file nor `--kernel` names one
/// (docs/benchmarks.md, "VMGenID and the 6.12 kernel", has the numbers behind the choice).
pub const DEFAULT_KERNEL: GuestKernel = GuestKernel::V6_1;

impl GuestKernel {
    /// The meta package whose dependency names the versioned kernel package.
    pub fn meta_package(self) -> &'static str {
        match self {
            Self::V6_1 => "linux-image-cloud-amd64",
            Self::V6_12 => "linux-image-6.12-cloud-amd64",
        }
    }

    /// `6.1` or `6.12`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }
}

impl fmt::Display for GuestKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The unpacked kernel package: `boot/vmlinuz-<release>` and `lib/modules/<release>/`.
#[derive(Debug)]
pub struct KernelTree {
    /// Where `dpkg-deb -x` put the package.
    pub unpacked: PathBuf,
    /// Kernel release (`uname -r`).
    pub release: String,
}

/// Where a module the guest wants is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSource {
    /// Compiled into the kernel (listed in `modules.builtin`): nothing to load.
    BuiltIn,
    /// A module file: `.ko`, or `.ko.xz` on kernels that compress their modules (6.12).
    File(PathBuf),
}

impl KernelTree {
    /// Path of module `rel` without its suffix (e.g. `arch/x86/kvm/kvm`), uncompressed.
    pub fn module(&self, rel: &str) -> PathBuf {
        self.modules_dir().join("kernel").join(format!("{rel}.ko"))
    }

    /// The kernel image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.unpacked.join(format!("boot/vmlinuz-{}", self.release))
    }

    fn modules_dir(&self) -> PathBuf {
        self.unpacked.join(format!("lib/modules/{}", self.release))
    }

    /// Where module `name` (file name without `.ko`) is: `modules.builtin` and
    /// `modules.order` (both in the package) list every module by path, so names need no
    /// per-kernel table.
    pub fn module_source(&self, name: &str) -> Result<ModuleSource> {
        let dir = self.modules_dir();
        let read = |file: &str| {
            let path = dir.join(file);
            fs::read_to_string(&path).with_context(|| format!("Cannot read {}", path.display()))
        };
        if find_listed(&read("modules.builtin")?, name).is_some() {
            return Ok(ModuleSource::BuiltIn);
        }
        let rel = find_listed(&read("modules.order")?, name)
            .with_context(|| format!("Kernel {} has no module {name}", self.release))?;
        let plain = dir.join(&rel);
        if plain.is_file() {
            return Ok(ModuleSource::File(plain));
        }
        let xz = dir.join(format!("{rel}.xz"));
        ensure!(
            xz.is_file(),
            "Module {name} missing: neither {} nor {}",
            plain.display(),
            xz.display()
        );
        Ok(ModuleSource::File(xz))
    }
}

/// The line of a `modules.builtin` / `modules.order` list (`kernel/drivers/x/NAME.ko`) that
/// names module `name`.
fn find_listed(list: &str, name: &str) -> Option<String> {
    let file = format!("{name}.ko");
    list.lines()
        .map(str::trim)
        .find(|l| Path::new(l).file_name().and_then(|f| f.to_str()) == Some(file.as_str()))
        .map(str::to_owned)
}

/// The bytes of a module file, decompressed if it is `.xz` (with `xz`, part of every Debian
/// system): the kernel could decompress it at load, but under TCG that is boot time.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .context("Cannot run xz (apt-get install xz-utils)")?;
        ensure!(
            out.status.success(),
            "xz -dc {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return Ok(out.stdout);
    }
    fs::read(path).with_context(|| format!("Cannot read {}", path.display()))
}

/// Fetches (once) and unpacks (once) `kernel`'s package under `cache`.
pub fn kernel_tree_in(cache: &Path, kernel: GuestKernel) -> Result<KernelTree> {
    fs::create_dir_all(cache).with_context(|| format!("Cannot create {}", cache.display()))?;
    let deb = kernel_deb(cache, kernel)?;
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
    let tree = KernelTree { unpacked, release };
    ensure!(
        tree.vmlinuz().is_file(),
        "Kernel {} missing from the package",
        tree.vmlinuz().display()
    );
    Ok(tree)
}

/// Returns the kernel .deb, downloading it once. `VMFACTORY_KERNEL_DEB` overrides (whatever
/// series it is).
fn kernel_deb(cache: &Path, kernel: GuestKernel) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("VMFACTORY_KERNEL_DEB") {
        return Ok(PathBuf::from(path));
    }
    let package = match resolve_kernel_package(kernel) {
        Ok(p) => p,
        Err(_) => {
            // A fresh machine has no package lists yet.
            run(Command::new("apt-get").arg("update").arg("-qq"))?;
            resolve_kernel_package(kernel)?
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

/// `linux-image-cloud-amd64` → `linux-image-6.1.0-NN-cloud-amd64`;
/// `linux-image-6.12-cloud-amd64` → `linux-image-6.12.NN+deb12-cloud-amd64`.
fn resolve_kernel_package(kernel: GuestKernel) -> Result<String> {
    let meta = kernel.meta_package();
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .context("Cannot run apt-cache (is this Debian?)")?;
    parse_kernel_dependency(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("apt-cache knows no dependency of {meta}"))
}

fn parse_kernel_dependency(depends: &str) -> Option<String> {
    depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_meta_packages() {
        let parse = |s: &str| toml::from_str::<std::collections::BTreeMap<String, GuestKernel>>(s);
        assert_eq!(parse("k = \"6.12\"").unwrap()["k"], GuestKernel::V6_12);
        assert_eq!(parse("k = \"6.1\"").unwrap()["k"], GuestKernel::V6_1);
        assert!(parse("k = \"6.13\"").is_err());
        assert_eq!(GuestKernel::V6_12.to_string(), "6.12");
        assert_eq!(
            GuestKernel::V6_12.meta_package(),
            "linux-image-6.12-cloud-amd64"
        );
        let depends =
            "linux-image-6.12-cloud-amd64\n  Depends: linux-image-6.12.117+deb12-cloud-amd64\n";
        assert_eq!(
            parse_kernel_dependency(depends).as_deref(),
            Some("linux-image-6.12.117+deb12-cloud-amd64")
        );
        assert_eq!(parse_kernel_dependency("x\n  Depends: libc6\n"), None);
    }

    #[test]
    fn modules_built_in_plain_or_compressed() {
        let dir = tempfile::tempdir().unwrap();
        let tree = KernelTree {
            unpacked: dir.path().to_owned(),
            release: "6.12.0-cloud-amd64".into(),
        };
        let mods = tree.modules_dir();
        fs::create_dir_all(mods.join("kernel/drivers/block")).unwrap();
        fs::create_dir_all(mods.join("kernel/net/vmw_vsock")).unwrap();
        fs::write(
            mods.join("modules.builtin"),
            "kernel/drivers/virtio/virtio.ko\nkernel/drivers/char/virtio_console.ko\n",
        )
        .unwrap();
        fs::write(
            mods.join("modules.order"),
            "kernel/drivers/block/virtio_blk.ko\nkernel/net/vmw_vsock/vsock.ko\n\
             kernel/net/vmw_vsock/vsock_diag.ko\n",
        )
        .unwrap();
        fs::write(mods.join("kernel/drivers/block/virtio_blk.ko"), b"plain").unwrap();
        fs::write(mods.join("kernel/net/vmw_vsock/vsock.ko.xz"), b"xz").unwrap();
        assert_eq!(
            tree.module_source("virtio_console").unwrap(),
            ModuleSource::BuiltIn
        );
        assert_eq!(
            tree.module_source("virtio_blk").unwrap(),
            ModuleSource::File(mods.join("kernel/drivers/block/virtio_blk.ko"))
        );
        assert_eq!(
            tree.module_source("vsock").unwrap(),
            ModuleSource::File(mods.join("kernel/net/vmw_vsock/vsock.ko.xz"))
        );
        // Listed but not shipped, and not listed at all.
        assert!(tree.module_source("vsock_diag").is_err());
        assert!(tree.module_source("virtio_fs").is_err());
        // `vsock` is not `vsock_diag`'s suffix match.
        assert_eq!(
            find_listed("kernel/net/vmw_vsock/vsock_diag.ko\n", "vsock"),
            None
        );
    }

    #[test]
    fn xz_modules_are_decompressed() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("m.ko");
        fs::write(&plain, b"module bytes").unwrap();
        assert_eq!(read_module(&plain).unwrap(), b"module bytes");
        if !crate::util::on_path("xz") {
            return;
        }
        run(Command::new("xz").arg("-k").arg(&plain)).unwrap();
        fs::remove_file(&plain).unwrap();
        assert_eq!(
            read_module(&dir.path().join("m.ko.xz")).unwrap(),
            b"module bytes"
        );
        assert!(read_module(&dir.path().join("missing.ko.xz")).is_err());
    }
}
