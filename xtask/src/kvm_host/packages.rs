//! The Debian packages the nested KVM host is made of, fetched with a private apt state under
//! `target/kvm-host/apt` (the machine's own sources and QEMU are left as they are) and unpacked
//! with `dpkg-deb -x` (no maintainer scripts).
//!
//! QEMU ≥ 9.2 is needed as the outer (L0) QEMU: older TCG mis-emulates nested paging in real
//! mode, so an L2 guest never starts. Debian bookworm has 7.2; bookworm-backports has 10.0,
//! which runs on bookworm's libraries. The same QEMU is the VMM inside L1, so one CI run covers
//! both the machine's QEMU 7.2 (the main suite) and 10.0 (the nested suite).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::util::run;

/// Packages, each `name/suite`: QEMU 10 with its firmware, and busybox for L1's userland.
const PACKAGES: &[&str] = &[
    "qemu-system-x86/bookworm-backports",
    "qemu-system-data/bookworm-backports",
    "seabios/bookworm-backports",
    "busybox-static/bookworm",
];

/// Oldest QEMU that can be the outer QEMU of a nested KVM host under TCG.
const MIN_QEMU: (u32, u32) = (9, 2);

const SOURCES: &str = "\
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
";

/// The unpacked packages: a tree with `usr/bin/qemu-system-x86_64`, `usr/share/qemu`,
/// `usr/share/seabios` and `bin/busybox`.
pub struct Unpacked {
    /// Root of the tree.
    pub root: PathBuf,
    /// `<qemu> --version`, first line.
    pub qemu_version: String,
}

impl Unpacked {
    /// The QEMU binary.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }
}

/// Fetches (once) and unpacks (once) the packages into `dir/root`.
pub fn ensure(dir: &Path) -> Result<Unpacked> {
    let debs = dir.join("debs");
    let root = dir.join("root");
    let stamp = root.join(".complete");
    if !stamp.is_file() {
        fs::create_dir_all(&debs)?;
        let missing: Vec<&str> = PACKAGES
            .iter()
            .copied()
            .filter(|p| find_deb(&debs, package_name(p)).is_none())
            .collect();
        if !missing.is_empty() {
            download(dir, &debs, &missing)?;
        }
        let tmp = dir.join("root.unpacking");
        let _ = fs::remove_dir_all(&tmp);
        for p in PACKAGES {
            let deb = find_deb(&debs, package_name(p))
                .with_context(|| format!("apt-get download {p} left no .deb"))?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
        }
        fs::write(tmp.join(".complete"), b"")?;
        let _ = fs::remove_dir_all(&root);
        fs::rename(&tmp, &root)?;
    }
    let unpacked = Unpacked {
        qemu_version: String::new(),
        root,
    };
    let out = Command::new(unpacked.qemu())
        .arg("--version")
        .output()
        .with_context(|| format!("Cannot run {}", unpacked.qemu().display()))?;
    let qemu_version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let version = parse_version(&qemu_version)
        .with_context(|| format!("Cannot read QEMU's version from {qemu_version:?}"))?;
    ensure!(
        version >= MIN_QEMU,
        "{qemu_version}: the nested KVM host needs QEMU >= {}.{}",
        MIN_QEMU.0,
        MIN_QEMU.1
    );
    Ok(Unpacked {
        qemu_version,
        ..unpacked
    })
}

fn download(dir: &Path, debs: &Path, packages: &[&str]) -> Result<()> {
    let apt = dir.join("apt");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(sub))?;
    }
    let sources = apt.join("sources.list");
    fs::write(&sources, SOURCES)?;
    let opts = |cmd: &mut Command| {
        cmd.arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", sources.display()))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", apt.join("cache").display()))
            .args(["-o", "APT::Sandbox::User=root", "-qq"]);
    };
    eprintln!("kvm-host: fetching {} from Debian ...", packages.join(", "));
    let mut update = Command::new("apt-get");
    opts(&mut update);
    run(update.arg("update"))?;
    let mut get = Command::new("apt-get");
    opts(&mut get);
    run(get.arg("download").args(packages).current_dir(debs))
}

fn package_name(spec: &str) -> &str {
    spec.split('/').next().unwrap_or(spec)
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
}

/// `QEMU emulator version 10.0.2 (Debian ...)` → `(10, 0)`.
pub fn parse_version(line: &str) -> Option<(u32, u32)> {
    let v = line.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions() {
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0))
        );
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian)"),
            Some((7, 2))
        );
        assert_eq!(parse_version("qemu"), None);
        assert!(parse_version("QEMU emulator version 9.2.0").unwrap_or_default() >= MIN_QEMU);
        assert!(parse_version("QEMU emulator version 9.1.2").unwrap_or_default() < MIN_QEMU);
    }

    #[test]
    fn package_names() {
        assert_eq!(
            package_name("qemu-system-x86/bookworm-backports"),
            "qemu-system-x86"
        );
        assert_eq!(package_name("busybox-static"), "busybox-static");
    }
}
