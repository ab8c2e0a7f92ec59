//! The initramfs as a tree of entries, written as a reproducible newc archive.
//!
//! The tree is usr-merged like a Debian bookworm install: `/bin`, `/sbin`, `/lib` and `/lib64`
//! are symlinks into `/usr`, and every path given to [`Tree::insert`] under them is stored under
//! `/usr`. So packages that still ship `/lib/x86_64-linux-gnu/libc.so.6` and ones that ship
//! `/usr/lib/...` end up in one directory, and `/lib64/ld-linux-x86-64.so.2` resolves.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Context, Result};

/// The top-level directories that are symlinks into `/usr`.
const MERGED: &[&str] = &["bin", "sbin", "lib", "lib64"];

/// One entry of the archive. Owners are always root, mtimes 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A directory with its permission bits.
    Dir(u32),
    /// A regular file with its permission bits and contents.
    File(u32, Vec<u8>),
    /// A symbolic link to the target.
    Symlink(String),
    /// A character device node (major, minor), mode 0600.
    CharDev(u32, u32),
}

/// The archive's entries by path (no leading `/`). A `BTreeMap` writes every directory before
/// what it holds (a path sorts before its extensions) and keeps the output reproducible.
#[derive(Debug)]
pub struct Tree {
    entries: BTreeMap<String, Node>,
}

impl Tree {
    /// An empty usr-merged tree: `/usr/{bin,sbin,lib,lib64}` and the symlinks to them.
    pub fn new() -> Self {
        let mut entries = BTreeMap::new();
        entries.insert("usr".to_string(), Node::Dir(0o755));
        for dir in MERGED {
            entries.insert(format!("usr/{dir}"), Node::Dir(0o755));
            entries.insert((*dir).to_string(), Node::Symlink(format!("usr/{dir}")));
        }
        Tree { entries }
    }

    /// Adds `node` at `path` (usr-merged), creating missing parent directories; returns what it
    /// replaced. Directories merge. Fails when a parent is not a directory, or when a directory
    /// and a non-directory meet.
    pub fn insert(&mut self, path: &str, node: Node) -> Result<Option<Node>> {
        let (path, moved) = merged_path(path).with_context(|| format!("Bad path {path:?}"))?;
        let node = match node {
            Node::Symlink(target) if moved => {
                Node::Symlink(relocated_target(moved_from(&path), &target))
            }
            other => other,
        };
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Node::Dir(0o755));
                }
                Some(Node::Dir(_)) => {}
                Some(_) => bail!("Cannot add /{path}: /{parent} is not a directory"),
            }
        }
        match (self.entries.get(&path), &node) {
            (Some(Node::Dir(_)), Node::Dir(_)) => Ok(self.entries.insert(path, node)),
            (Some(Node::Dir(_)), _) | (Some(_), Node::Dir(_)) => {
                bail!("Cannot add /{path}: a directory and a non-directory meet there")
            }
            _ => Ok(self.entries.insert(path, node)),
        }
    }

    /// The entry at `path` (usr-merged), if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        let (path, _) = merged_path(path)?;
        self.entries.get(&path)
    }

    /// The newc archive: entries in path order, sequential inodes, owner root, mtime 0.
    pub fn write(&self) -> Result<Vec<u8>> {
        use ::cpio::newc::{trailer, Builder};
        let mut out = Vec::new();
        for (ino, (name, node)) in (1..).zip(&self.entries) {
            let (mode, data, rdev) = match node {
                Node::Dir(perm) => (0o040000 | perm, &[][..], (0, 0)),
                Node::File(perm, data) => (0o100000 | perm, &data[..], (0, 0)),
                Node::Symlink(target) => (0o120777, target.as_bytes(), (0, 0)),
                Node::CharDev(major, minor) => (0o020600, &[][..], (*major, *minor)),
            };
            let size = u32::try_from(data.len())
                .with_context(|| format!("/{name} is too large for newc"))?;
            let mut writer = Builder::new(name)
                .ino(ino)
                .mode(mode)
                .uid(0)
                .gid(0)
                .nlink(if matches!(node, Node::Dir(_)) { 2 } else { 1 })
                .mtime(0)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1)
                .write(&mut out, size);
            writer.write_all(data)?;
            writer.finish()?;
        }
        trailer(&mut out)?;
        Ok(out)
    }
}

/// `./lib/x/y` → `("usr/lib/x/y", true)`, `usr/bin/z` → `("usr/bin/z", false)`. `None` for an
/// empty path or one with `.`/`..` components.
fn merged_path(path: &str) -> Option<(String, bool)> {
    let parts: Vec<&str> = path
        .trim_start_matches("./")
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") {
        return None;
    }
    let joined = parts.join("/");
    if MERGED.contains(&parts[0]) {
        Some((format!("usr/{joined}"), true))
    } else {
        Some((joined, false))
    }
}

/// The original (pre-merge) path of a moved entry: `usr/lib/x` → `lib/x`.
fn moved_from(path: &str) -> &str {
    path.strip_prefix("usr/").unwrap_or(path)
}

/// A relative symlink moved into `/usr` that climbs with `..` would now point elsewhere: make it
/// absolute from where it was. Other targets still resolve through the merge symlinks.
fn relocated_target(original: &str, target: &str) -> String {
    if target.starts_with('/') || !target.split('/').any(|p| p == "..") {
        return target.to_string();
    }
    let mut parts: Vec<&str> = original.split('/').collect();
    parts.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry read back from an archive.
    #[derive(Debug, Clone, PartialEq)]
    struct ReadEntry {
        name: String,
        mode: u32,
        data: Vec<u8>,
        rdev: (u32, u32),
    }

    /// Every entry of a newc archive, in order.
    fn entries(mut archive: &[u8]) -> Vec<ReadEntry> {
        let mut out = Vec::new();
        loop {
            let mut reader = ::cpio::NewcReader::new(archive).expect("newc header");
            if reader.entry().is_trailer() {
                return out;
            }
            let e = reader.entry();
            let (name, mode, rdev) = (
                e.name().to_string(),
                e.mode(),
                (e.rdev_major(), e.rdev_minor()),
            );
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data).expect("entry data");
            out.push(ReadEntry {
                name,
                mode,
                data,
                rdev,
            });
            archive = reader.finish().expect("next entry");
        }
    }

    #[test]
    fn paths_are_usr_merged() {
        assert_eq!(merged_path("./lib/x/y"), Some(("usr/lib/x/y".into(), true)));
        assert_eq!(merged_path("/bin"), Some(("usr/bin".into(), true)));
        assert_eq!(merged_path("usr/bin/z"), Some(("usr/bin/z".into(), false)));
        assert_eq!(merged_path("binary"), Some(("binary".into(), false)));
        assert_eq!(merged_path("./"), None);
        assert_eq!(merged_path("a/../b"), None);
    }

    #[test]
    fn moved_symlinks_that_climb_become_absolute() {
        assert_eq!(relocated_target("bin/x", "../usr/bin/y"), "/usr/bin/y");
        assert_eq!(
            relocated_target("lib/a/libz.so.1", "libz.so.1.2"),
            "libz.so.1.2"
        );
        assert_eq!(
            relocated_target("lib64/ld.so", "/lib/x/ld.so"),
            "/lib/x/ld.so"
        );
        let mut tree = Tree::new();
        tree.insert("bin/x", Node::Symlink("../usr/bin/y".into()))
            .unwrap();
        assert_eq!(
            tree.get("usr/bin/x"),
            Some(&Node::Symlink("/usr/bin/y".into()))
        );
    }

    #[test]
    fn parents_are_created_and_conflicts_refused() {
        let mut tree = Tree::new();
        tree.insert("etc/a/b", Node::File(0o644, b"x".to_vec()))
            .unwrap();
        assert_eq!(tree.get("etc/a"), Some(&Node::Dir(0o755)));
        assert!(tree.insert("etc/a/b/c", Node::Dir(0o755)).is_err());
        assert!(tree.insert("etc/a", Node::File(0o644, vec![])).is_err());
        let old = tree
            .insert("etc/a/b", Node::File(0o600, b"y".to_vec()))
            .unwrap();
        assert_eq!(old, Some(Node::File(0o644, b"x".to_vec())));
        // A merged directory is a symlink: nothing may be put below the link itself.
        assert!(tree.get("bin").is_some());
    }

    #[test]
    fn archive_is_reproducible_and_round_trips() {
        let build = || {
            let mut tree = Tree::new();
            tree.insert("bin/busybox", Node::File(0o755, b"bb".to_vec()))
                .unwrap();
            tree.insert("bin/sh", Node::Symlink("/bin/busybox".into()))
                .unwrap();
            tree.insert("dev/console", Node::CharDev(5, 1)).unwrap();
            tree.insert("tmp", Node::Dir(0o1777)).unwrap();
            tree.write().unwrap()
        };
        let archive = build();
        assert_eq!(archive, build());
        let all = entries(&archive);
        let find = |name: &str| all.iter().find(|e| e.name == name).cloned();
        let sh = find("usr/bin/sh").unwrap();
        assert_eq!(
            (sh.mode, sh.data.as_slice()),
            (0o120777, &b"/bin/busybox"[..])
        );
        let bin = find("bin").unwrap();
        assert_eq!((bin.mode, bin.data.as_slice()), (0o120777, &b"usr/bin"[..]));
        assert_eq!(find("usr/bin/busybox").unwrap().mode, 0o100755);
        let console = find("dev/console").unwrap();
        assert_eq!((console.mode, console.rdev), (0o020600, (5, 1)));
        assert_eq!(find("tmp").unwrap().mode, 0o041777);
        // Directories come before their contents.
        let pos = |name: &str| all.iter().position(|e| e.name == name);
        assert!(pos("usr") < pos("usr/bin") && pos("usr/bin") < pos("usr/bin/sh"));
    }

    /// GNU cpio reads the archive and extracts the symlink as a symlink.
    #[test]
    fn gnu_cpio_extracts_symlinks() {
        if !crate::util::on_path("cpio") {
            assert!(
                !crate::util::is_ci(),
                "CI needs GNU cpio (.ci/run installs it)"
            );
            eprintln!("skipped: no cpio on PATH");
            return;
        }
        let mut tree = Tree::new();
        tree.insert("bin/busybox", Node::File(0o755, b"bb".to_vec()))
            .unwrap();
        tree.insert("bin/sh", Node::Symlink("/bin/busybox".into()))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&tree.write().unwrap())
            .unwrap();
        assert!(child.wait().unwrap().success());
        let link = std::fs::read_link(dir.path().join("usr/bin/sh")).unwrap();
        assert_eq!(link, std::path::Path::new("/bin/busybox"));
        let bin = std::fs::read_link(dir.path().join("bin")).unwrap();
        assert_eq!(bin, std::path::Path::new("usr/bin"));
    }
}
