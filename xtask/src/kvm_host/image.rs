//! The L1 image: one uncompressed newc initramfs holding busybox, the kvm and vhost modules,
//! QEMU 10 with its firmware and libraries, and the project's binaries, guest image and tools
//! at the same absolute paths as on this machine (so paths built into the test binaries hold).
//!
//! Binaries are copied without their debug info (a debug test binary is ~130 MB, ~25 MB
//! stripped); shared libraries are found with `ldd` and copied to the path it reports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::guest::KernelTree;

/// L1 kernel modules in load order (the cloud kernel ships no modules.dep): KVM for AMD SVM
/// (what TCG's `-cpu max` emulates), vhost-vsock for plain vsock, and what VM networks use:
/// tap and vhost-net, veth, and nftables with conntrack, NAT and `fib`.
const L1_MODULES: &[&str] = &[
    "virt/lib/irqbypass",
    "arch/x86/kvm/kvm",
    "arch/x86/kvm/kvm-amd",
    "drivers/vhost/vhost_iotlb",
    "drivers/vhost/vhost",
    "net/vmw_vsock/vsock",
    "net/vmw_vsock/vmw_vsock_virtio_transport_common",
    "drivers/vhost/vhost_vsock",
    "drivers/net/tun",
    "drivers/net/tap",
    "drivers/vhost/vhost_net",
    "drivers/net/veth",
    "lib/libcrc32c",
    "net/netfilter/nfnetlink",
    "net/netfilter/nf_tables",
    "net/ipv4/netfilter/nf_defrag_ipv4",
    "net/ipv6/netfilter/nf_defrag_ipv6",
    "net/netfilter/nf_conntrack",
    "net/netfilter/nf_nat",
    "net/netfilter/nft_chain_nat",
    "net/netfilter/nft_ct",
    "net/netfilter/nft_nat",
    "net/netfilter/nft_masq",
    "net/netfilter/nft_fib",
    "net/ipv4/netfilter/nft_fib_ipv4",
    "net/ipv6/netfilter/nft_fib_ipv6",
    "net/netfilter/nft_fib_inet",
    // containerd's overlayfs snapshotter (the container scenarios).
    "fs/overlayfs/overlay",
];

/// L1's `/init`: mounts, modules, then the runner; its exit code on the console, then off.
/// `/tmp` stays on the (writable) initramfs: the image holds the runner and the test binaries
/// at their host paths, which a checkout under `/tmp` puts there, so a tmpfs would hide them.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /root /usr/bin /usr/sbin /sbin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t devpts -o ptmxmode=0666 devpts /dev/pts
mount -t cgroup2 cgroup2 /sys/fs/cgroup
chmod 1777 /tmp
mount -t tmpfs run /run
for m in $(cat /kvm-host/modules); do
  insmod "/kvm-host/$m.ko" || echo "@kvm insmod $m failed"
done
ip link set lo up
hostname kvm-host
export HOME=/root PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
RUNNER=$(cat /kvm-host/runner)
"$RUNNER" kvm-host-inside /kvm-host/manifest.json
echo "@kvm exit $?"
sync
poweroff -f
"#;

/// A file of the image: its content comes from `source`; `strip` drops debug info first.
struct Entry {
    source: PathBuf,
    strip: bool,
    exec: bool,
}

/// What goes into the image, keyed by absolute path inside L1.
#[derive(Default)]
pub struct Image {
    files: BTreeMap<PathBuf, Entry>,
    data: BTreeMap<PathBuf, (Vec<u8>, bool)>,
}

impl Image {
    /// A dynamically linked program at its own path, stripped, with its libraries.
    pub fn program(&mut self, path: &Path) -> Result<()> {
        self.program_at(path, path)
    }

    /// A program from `source` placed at `dest`, stripped, with its libraries.
    pub fn program_at(&mut self, dest: &Path, source: &Path) -> Result<()> {
        for lib in libraries(source)? {
            let real = fs::canonicalize(&lib)
                .with_context(|| format!("Cannot resolve {}", lib.display()))?;
            self.files.insert(
                lib,
                Entry {
                    source: real,
                    strip: false,
                    exec: true,
                },
            );
        }
        self.files.insert(
            dest.to_owned(),
            Entry {
                source: source.to_owned(),
                strip: true,
                exec: true,
            },
        );
        Ok(())
    }

    /// A file copied as it is to `dest`.
    pub fn file(&mut self, dest: &Path, source: &Path, exec: bool) {
        self.files.insert(
            dest.to_owned(),
            Entry {
                source: source.to_owned(),
                strip: false,
                exec,
            },
        );
    }

    /// Every regular file under `source` (symlinks followed), placed under `dest`.
    pub fn tree(&mut self, dest: &Path, source: &Path) -> Result<()> {
        for entry in fs::read_dir(source).with_context(|| format!("{}", source.display()))? {
            let entry = entry?;
            let path = entry.path();
            let target = dest.join(entry.file_name());
            let meta = fs::metadata(&path)?;
            if meta.is_dir() {
                self.tree(&target, &path)?;
            } else if meta.is_file() {
                self.file(&target, &path, false);
            }
        }
        Ok(())
    }

    /// A file with the given bytes.
    pub fn bytes(&mut self, dest: &Path, data: Vec<u8>, exec: bool) {
        self.data.insert(dest.to_owned(), (data, exec));
    }

    /// The init script, busybox and the L1 modules.
    pub fn base(&mut self, busybox: &Path, kernel: &KernelTree) -> Result<()> {
        self.bytes(Path::new("/init"), INIT.as_bytes().to_vec(), true);
        self.file(Path::new("/bin/busybox"), busybox, true);
        let mut order = String::new();
        for m in L1_MODULES {
            let name = Path::new(m)
                .file_name()
                .and_then(|n| n.to_str())
                .context("module name")?;
            let src = kernel.module(m);
            if !src.is_file() {
                bail!("Module {} missing from the kernel package", src.display());
            }
            self.file(
                &Path::new("/kvm-host").join(format!("{name}.ko")),
                &src,
                false,
            );
            order.push_str(name);
            order.push('\n');
        }
        self.bytes(Path::new("/kvm-host/modules"), order.into_bytes(), false);
        Ok(())
    }

    /// Writes the archive to `out` (stripped copies staged in `scratch`); returns its size.
    pub fn write(&self, out: &Path, scratch: &Path) -> Result<u64> {
        use cpio::newc::trailer;
        let _ = fs::remove_dir_all(scratch);
        fs::create_dir_all(scratch)?;
        let tmp = out.with_extension("tmp");
        let mut w = BufWriter::new(fs::File::create(&tmp)?);
        let mut dirs = BTreeSet::new();
        let all: BTreeSet<&Path> = self
            .files
            .keys()
            .chain(self.data.keys())
            .map(PathBuf::as_path)
            .collect();
        for path in &all {
            for dir in path.ancestors().skip(1) {
                if dir != Path::new("/") {
                    dirs.insert(dir.to_owned());
                }
            }
        }
        let mut ino = 1u32;
        for dir in &dirs {
            header(&mut w, &mut ino, dir, 0o040755, 0).finish()?;
        }
        let mut staged = 0u32;
        for path in all {
            let (bytes, exec) = match (self.files.get(path), self.data.get(path)) {
                (_, Some((data, exec))) => (data.clone(), *exec),
                (Some(e), None) if e.strip => {
                    staged += 1;
                    let copy = scratch.join(format!("{staged}"));
                    crate::util::run(
                        Command::new("strip")
                            .arg("--strip-debug")
                            .arg("-o")
                            .arg(&copy)
                            .arg(&e.source),
                    )?;
                    (fs::read(&copy)?, e.exec)
                }
                (Some(e), None) => (
                    fs::read(&e.source)
                        .with_context(|| format!("Cannot read {}", e.source.display()))?,
                    e.exec,
                ),
                (None, None) => continue,
            };
            let size = u32::try_from(bytes.len()).context("file too large for newc")?;
            let mode = if exec { 0o100755 } else { 0o100644 };
            let mut fw = header(&mut w, &mut ino, path, mode, size);
            fw.write_all(&bytes)?;
            fw.finish()?;
        }
        trailer(&mut w)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, out)?;
        let _ = fs::remove_dir_all(scratch);
        Ok(fs::metadata(out)?.len())
    }
}

fn header<'a>(
    w: &'a mut BufWriter<fs::File>,
    ino: &mut u32,
    path: &Path,
    mode: u32,
    size: u32,
) -> cpio::newc::Writer<&'a mut BufWriter<fs::File>> {
    let name = path.to_string_lossy();
    *ino += 1;
    cpio::newc::Builder::new(name.trim_start_matches('/'))
        .ino(*ino)
        .mode(mode)
        .nlink(if mode & 0o040000 != 0 { 2 } else { 1 })
        .write(w, size)
}

/// The shared libraries `ldd` reports for `program`, the dynamic loader included; none for a
/// static one.
fn libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .context("Cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed", program.display());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: library {line}", program.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}
