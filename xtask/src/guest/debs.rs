//! Debian packages in the initramfs: the dependency closure (apt-cache), the .debs (fetched once
//! with `apt-get download` into `target/guest/cache`), unpacked with `dpkg-deb -x` (no
//! maintainer scripts run) and merged into the [`Tree`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use super::cpio::{Node, Tree};
use crate::util::run;

/// A package at the version apt would install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Candidate version (with its epoch, as apt prints it).
    pub version: String,
    /// `amd64` or `all`.
    pub arch: String,
}

impl Package {
    /// The file `apt-get download` writes: the epoch's `:` is written `%3a`.
    fn deb_name(&self) -> String {
        let version = self.version.replace(':', "%3a");
        format!("{}_{version}_{}.deb", self.name, self.arch)
    }
}

/// Files of an installed system the guest does without (as dpkg's `path-exclude` in slim
/// images): documentation, manual pages and message translations. Copyright files (and their
/// directories) stay.
fn dropped(path: &str, is_dir: bool) -> bool {
    let doc = path.starts_with("usr/share/doc/") && !is_dir && !path.ends_with("/copyright");
    let mo = path.starts_with("usr/share/locale/") && path.ends_with(".mo");
    doc || mo
        || ["usr/share/man/", "usr/share/info/", "usr/share/lintian/"]
            .iter()
            .any(|p| path.starts_with(p))
}

/// The packages `roots` need, themselves included, sorted by name: Depends and Pre-Depends
/// followed recursively (no Recommends or Suggests); of alternatives (`a | b`) the first that is
/// a real package, of a virtual package its first provider. Runs `apt-get update` once when the
/// machine has no package lists yet.
pub fn closure(roots: &[String]) -> Result<Vec<Package>> {
    match resolve(roots) {
        Err(e) if !apt_lists_present() => {
            eprintln!("guest: no apt package lists ({e:#}); running apt-get update");
            run(Command::new("apt-get").arg("update").arg("-qq"))?;
            resolve(roots)
        }
        other => other,
    }
}

fn resolve(roots: &[String]) -> Result<Vec<Package>> {
    // Two apt-cache runs whatever the depth: each loads the whole package index (~0.7 s here,
    // where apt keeps no pkgcache.bin).
    let mut args = DEPENDS_ARGS.to_vec();
    args.push("--recurse");
    let names = walk(roots, &parse_depends(&apt_cache(&args, roots)?))?;
    let text = apt_cache(&["show", "--no-all-versions"], &names)?;
    let mut packages = parse_show(&text);
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    packages.dedup_by(|a, b| a.name == b.name);
    let found: BTreeSet<&str> = packages.iter().map(|p| p.name.as_str()).collect();
    for name in &names {
        ensure!(
            found.contains(name.as_str()),
            "apt-cache has no candidate version of {name}"
        );
    }
    Ok(packages)
}

/// The packages reachable from `roots` through the chosen alternative of each dependency.
/// `apt-cache depends --recurse` lists every alternative; only the chosen ones are followed.
fn walk(roots: &[String], deps: &BTreeMap<String, Vec<Vec<Alt>>>) -> Result<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut todo: Vec<String> = roots.to_vec();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        let groups = deps.get(&name).with_context(|| {
            format!("No Debian package named {name} (or it is virtual: name one that provides it)")
        })?;
        for group in groups {
            todo.push(
                choose(group).with_context(|| format!("{name}: no package satisfies {group:?}"))?,
            );
        }
        seen.insert(name);
    }
    Ok(seen.into_iter().collect())
}

/// `apt-cache depends` limited to Depends and Pre-Depends.
const DEPENDS_ARGS: [&str; 7] = [
    "depends",
    "--no-recommends",
    "--no-suggests",
    "--no-conflicts",
    "--no-breaks",
    "--no-replaces",
    "--no-enhances",
];

fn apt_cache(args: &[&str], names: &[String]) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(args)
        .arg("--")
        .args(names)
        .output()
        .context("Cannot run apt-cache (is this Debian?)")?;
    ensure!(
        out.status.success(),
        "apt-cache {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when apt has downloaded any package list.
fn apt_lists_present() -> bool {
    fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

/// One alternative of a dependency: a package name, or `<virtual>` with its providers.
type Alt = (String, Vec<String>);

/// Parses `apt-cache depends` (Depends/PreDepends lines only) into each real package's
/// dependencies, each a group of alternatives. Lines: `pkg`, `  Depends: x`, ` |Depends: a`
/// (an alternative follows), `  Depends: <virt>` followed by `    provider` lines. A virtual
/// package at the top level (`<virt>`) is left out, so asking for one is reported as missing.
fn parse_depends(text: &str) -> BTreeMap<String, Vec<Vec<Alt>>> {
    let mut all: BTreeMap<String, Vec<Vec<Alt>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut group_open = false;
    for line in text.lines() {
        if !line.starts_with(' ') {
            let name = line.trim();
            current = (!name.starts_with('<') && !name.is_empty()).then(|| name.to_string());
            if let Some(name) = &current {
                all.entry(name.clone()).or_default();
            }
            group_open = false;
            continue;
        }
        let Some(groups) = current.as_ref().and_then(|n| all.get_mut(n)) else {
            continue;
        };
        if line.starts_with("    ") {
            if let Some((_, providers)) = groups.last_mut().and_then(|g| g.last_mut()) {
                providers.push(line.trim().to_string());
            }
            continue;
        }
        let trimmed = line.trim_start();
        let (alternative, rest) = match trimmed.strip_prefix('|') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let Some((kind, dep)) = rest.split_once(": ") else {
            continue;
        };
        if kind != "Depends" && kind != "PreDepends" {
            continue;
        }
        let alt = (dep.trim().to_string(), Vec::new());
        match groups.last_mut() {
            Some(g) if group_open => g.push(alt),
            _ => groups.push(vec![alt]),
        }
        group_open = alternative;
    }
    all
}

/// The first real alternative, else the first provider of a virtual one.
fn choose(group: &[Alt]) -> Option<String> {
    let strip = |n: &str| n.split(':').next().unwrap_or(n).to_string();
    group
        .iter()
        .find(|(n, _)| !n.starts_with('<'))
        .map(|(n, _)| strip(n))
        .or_else(|| {
            group
                .iter()
                .find_map(|(_, providers)| providers.first().map(|p| strip(p)))
        })
}

/// Parses `apt-cache show --no-all-versions` stanzas.
fn parse_show(text: &str) -> Vec<Package> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |key: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
                    .map(|v| v.trim().to_string())
            };
            Some(Package {
                name: field("Package")?,
                version: field("Version")?,
                arch: field("Architecture")?,
            })
        })
        .collect()
}

/// Downloads the missing .debs into `cache` (one `apt-get download` call) and unpacks each
/// once; returns the unpacked trees in the order of `packages`.
pub fn fetch(cache: &Path, packages: &[Package]) -> Result<Vec<PathBuf>> {
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| !cache.join(p.deb_name()).is_file())
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if !missing.is_empty() {
        eprintln!("guest: downloading {} Debian package(s)", missing.len());
        run(Command::new("apt-get")
            // As root into a root-owned directory: apt's `_apt` sandbox cannot write there.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root"])
            .args(&missing)
            .current_dir(cache))?;
    }
    packages
        .iter()
        .map(|p| {
            let deb = cache.join(p.deb_name());
            ensure!(deb.is_file(), "apt-get download left no {}", deb.display());
            let unpacked = deb.with_extension("unpacked");
            if !unpacked.is_dir() {
                let tmp = deb.with_extension("unpacking");
                let _ = fs::remove_dir_all(&tmp);
                run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
                fs::rename(&tmp, &unpacked)?;
            }
            Ok(unpacked)
        })
        .collect()
}

/// Adds every file, directory and symlink under `root` to `tree` (less [`dropped`] paths).
/// Returns the paths where it replaced a different file (two packages shipping one path).
pub fn add_unpacked(tree: &mut Tree, root: &Path) -> Result<Vec<String>> {
    let mut replaced = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("Cannot read {}", dir.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let key = rel
                .to_str()
                .with_context(|| format!("Non-UTF-8 path {}", path.display()))?
                .to_string();
            let meta = fs::symlink_metadata(&path)?;
            if dropped(&key, meta.is_dir()) {
                continue;
            }
            let perm = meta.permissions().mode() & 0o7777;
            let node = if meta.is_symlink() {
                let target = fs::read_link(&path)?;
                let target = target
                    .to_str()
                    .with_context(|| format!("Non-UTF-8 link {}", path.display()))?;
                Node::Symlink(target.to_string())
            } else if meta.is_dir() {
                stack.push(rel.clone());
                Node::Dir(perm)
            } else if meta.is_file() {
                let data =
                    fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
                Node::File(perm, data)
            } else {
                bail!("{} is neither file, directory nor symlink", path.display());
            };
            let is_dir = matches!(node, Node::Dir(_));
            let old = tree.insert(&key, node.clone())?;
            if !is_dir && old.is_some_and(|o| o != node) {
                replaced.push(key);
            }
        }
    }
    Ok(replaced)
}

/// Busybox's applets as paths (`bin/sh`, `usr/bin/sha256sum`, ...): `busybox --list-full`,
/// run on the host (the binary is static). Anything outside the bin directories is left out.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("Cannot run {}", busybox.display()))?;
    ensure!(
        out.status.success(),
        "{} --list-full failed",
        busybox.display()
    );
    Ok(parse_applets(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_applets(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            ["bin/", "sbin/", "usr/bin/", "usr/sbin/"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPENDS: &str = "\
libpam-runtime
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
  Depends: libpam-modules
  PreDepends: libc6:any
python3-minimal
  PreDepends: python3.11-minimal
  Depends: dpkg
mawk
  Depends: <awk-virt>
    gawk
gawk
<awk>
debconf
cdebconf
  Depends: <gone>
libpam-modules
libc6
python3.11-minimal
dpkg
broken
  Depends: <gone>
";

    fn closure_of(roots: &[&str]) -> Result<Vec<String>> {
        let roots: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
        walk(&roots, &parse_depends(DEPENDS))
    }

    #[test]
    fn closure_follows_first_alternatives_and_providers() {
        assert_eq!(
            closure_of(&["libpam-runtime"]).unwrap(),
            ["debconf", "libc6", "libpam-modules", "libpam-runtime"],
            "cdebconf (an unchosen provider) is not followed"
        );
        assert_eq!(
            closure_of(&["mawk"]).unwrap(),
            ["gawk", "mawk"],
            "a virtual dependency's first provider"
        );
    }

    #[test]
    fn missing_virtual_or_unsatisfiable_is_an_error() {
        let err = closure_of(&["awk"]).unwrap_err();
        assert!(err.to_string().starts_with("No Debian package named awk"));
        let err = closure_of(&["broken"]).unwrap_err();
        assert!(err.to_string().starts_with("broken: no package satisfies"));
        // An unsatisfiable package that is never chosen does not matter.
        assert!(closure_of(&["python3-minimal"]).is_ok());
    }

    #[test]
    fn show_output_and_deb_names() {
        let text = "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nArchitecture: amd64\n\
                    Description: x\n\nPackage: tzdata\nVersion: 2025b-0+deb12u1\nArchitecture: all\n";
        let pkgs = parse_show(text);
        assert_eq!(pkgs.len(), 2);
        assert_eq!(
            pkgs[0].deb_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(pkgs[1].deb_name(), "tzdata_2025b-0+deb12u1_all.deb");
    }

    #[test]
    fn applets_and_dropped_paths() {
        assert_eq!(
            parse_applets("linuxrc\nbin/sh\nusr/bin/[\nsbin/mdev\nusr/sbin/chroot\n"),
            ["bin/sh", "usr/bin/[", "sbin/mdev", "usr/sbin/chroot"]
        );
        assert!(dropped("usr/share/doc/x/changelog.gz", false));
        assert!(!dropped("usr/share/doc/x/copyright", false));
        assert!(!dropped("usr/share/doc/x", true));
        assert!(dropped("usr/share/man/man1", true));
        assert!(!dropped("usr/share/zoneinfo/UTC", false));
        assert!(dropped("usr/share/locale/de/LC_MESSAGES/dpkg.mo", false));
        assert!(!dropped("usr/share/locale/locale.alias", false));
    }

    #[test]
    fn unpacked_tree_is_merged_and_conflicts_reported() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(r.join("lib64")).unwrap();
        fs::create_dir_all(r.join("usr/share/doc/p")).unwrap();
        fs::write(r.join("lib/x86_64-linux-gnu/ld.so"), b"ld").unwrap();
        symlink("/lib/x86_64-linux-gnu/ld.so", r.join("lib64/ld.so")).unwrap();
        fs::write(r.join("usr/share/doc/p/changelog"), b"c").unwrap();
        fs::write(r.join("usr/share/doc/p/copyright"), b"c").unwrap();
        let mut tree = Tree::new();
        assert!(add_unpacked(&mut tree, r).unwrap().is_empty());
        assert!(matches!(
            tree.get("usr/lib/x86_64-linux-gnu/ld.so"),
            Some(Node::File(_, d)) if d == b"ld"
        ));
        assert_eq!(
            tree.get("usr/lib64/ld.so"),
            Some(&Node::Symlink("/lib/x86_64-linux-gnu/ld.so".into()))
        );
        assert!(tree.get("usr/share/doc/p/changelog").is_none());
        assert!(tree.get("usr/share/doc/p/copyright").is_some());
        // The same tree again replaces nothing; a different file is reported.
        assert!(add_unpacked(&mut tree, r).unwrap().is_empty());
        fs::write(r.join("lib/x86_64-linux-gnu/ld.so"), b"other").unwrap();
        assert_eq!(
            add_unpacked(&mut tree, r).unwrap(),
            ["lib/x86_64-linux-gnu/ld.so"]
        );
    }
}
