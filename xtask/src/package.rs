//! `cargo xtask package`: `cargo package` of every publishable crate at once, in dependency
//! order, each verified by building it from its `.crate` file. Cargo (1.89+) resolves the
//! internal dependencies of a crate being verified against the other crates of the same run
//! (a local registry laid over crates.io), so nothing has to be on crates.io first.
//! `cargo xtask test` runs it, so CI fails when a crate could not be published.
//!
//! The metadata a crate needs on crates.io (description, repository, docs, readme, keywords,
//! categories, a version on every internal dependency) is checked first, here and by this
//! file's unit test (which also keeps every crate under `crates/` publishable).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::util::{self, workspace_root};

/// What `cargo metadata --no-deps` says of a workspace member (the fields used here).
#[derive(Debug, Deserialize)]
pub struct Package {
    pub name: String,
    pub manifest_path: PathBuf,
    /// `None`: publishable anywhere; `Some([])`: `publish = false`.
    pub publish: Option<Vec<String>>,
    pub description: Option<String>,
    pub license: Option<String>,
    pub repository: Option<String>,
    pub documentation: Option<String>,
    pub readme: Option<PathBuf>,
    pub rust_version: Option<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    #[serde(default)]
    pub categories: Vec<String>,
    pub dependencies: Vec<Dependency>,
    pub targets: Vec<Target>,
}

/// One dependency of a [`Package`].
#[derive(Debug, Deserialize)]
pub struct Dependency {
    pub name: String,
    /// `"*"` when the manifest gives no version.
    pub req: String,
    /// `None` (normal), `"dev"` or `"build"`.
    pub kind: Option<String>,
    /// Set for a path dependency (another workspace member).
    pub path: Option<PathBuf>,
}

/// One build target of a [`Package`].
#[derive(Debug, Deserialize)]
pub struct Target {
    pub kind: Vec<String>,
}

impl Package {
    pub fn is_publishable(&self) -> bool {
        !self.publish.as_ref().is_some_and(Vec::is_empty)
    }

    pub fn is_library(&self) -> bool {
        self.targets
            .iter()
            .any(|t| t.kind.iter().any(|k| k == "lib"))
    }

    /// The crate's directory.
    pub fn dir(&self) -> PathBuf {
        self.manifest_path
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct Metadata {
    packages: Vec<Package>,
}

/// The members of the workspace at `root`, from `cargo metadata --no-deps` (no network: the
/// manifests only).
pub fn members(root: &Path) -> Result<Vec<Package>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .context("Cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: Metadata = serde_json::from_slice(&out.stdout).context("cargo metadata's JSON")?;
    Ok(meta.packages)
}

/// The publishable members in the order they must reach crates.io: every crate after the
/// crates it depends on (normal and build dependencies; dev-dependencies are dropped from a
/// published manifest's resolution), ties broken by name so the order is stable.
pub fn publish_order(packages: &[Package]) -> Result<Vec<String>> {
    let names: BTreeSet<&str> = packages
        .iter()
        .filter(|p| p.is_publishable())
        .map(|p| p.name.as_str())
        .collect();
    let mut deps: BTreeMap<&str, BTreeSet<&str>> = packages
        .iter()
        .filter(|p| names.contains(p.name.as_str()))
        .map(|p| {
            let internal = p
                .dependencies
                .iter()
                .filter(|d| d.kind.as_deref() != Some("dev"))
                .map(|d| d.name.as_str())
                .filter(|d| names.contains(d) && *d != p.name)
                .collect();
            (p.name.as_str(), internal)
        })
        .collect();
    let mut order = Vec::new();
    while !deps.is_empty() {
        let ready: Vec<&str> = deps
            .iter()
            .filter(|(_, d)| d.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            bail!("Internal dependency cycle among {:?}", deps.keys());
        }
        for name in ready {
            deps.remove(name);
            for d in deps.values_mut() {
                d.remove(name);
            }
            order.push(name.to_owned());
        }
    }
    Ok(order)
}

/// Checks every publishable crate's metadata, then packages and verifies them all in one
/// `cargo package` run; fails on any problem. The `.crate` files land in `target/package/`.
pub fn run() -> Result<()> {
    run_in(&workspace_root())
}

/// [`run`] on the workspace at `root`.
fn run_in(root: &Path) -> Result<()> {
    let members = members(root)?;
    // Metadata crates.io wants but `cargo package` only warns about: refused here first.
    let problems: Vec<String> = members
        .iter()
        .filter(|p| p.is_publishable())
        .flat_map(|p| {
            metadata_problems(p)
                .into_iter()
                .map(move |problem| format!("{}: {problem}", p.name))
        })
        .collect();
    if !problems.is_empty() {
        bail!("Crate metadata incomplete:\n{}", problems.join("\n"));
    }
    let order = publish_order(&members)?;
    println!(
        "package: {} crates, in publish order: {}",
        order.len(),
        order.join(", ")
    );
    forget_previous_run(root, &order)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--allow-dirty`: this checks the working tree, committed or not (publish from a clean
    // one).
    cmd.current_dir(root).args(["package", "--allow-dirty"]);
    for name in &order {
        cmd.args(["-p", name]);
    }
    let start = Instant::now();
    util::run(&mut cmd).context("Packaging failed")?;
    println!(
        "package: all {} crates packaged and verified in {:.0} s",
        order.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Makes cargo build this run's `.crate` files, not the previous run's. A crate verified
/// against the other crates of the run takes them from a local registry, which cargo unpacks
/// under `$CARGO_HOME/registry/src/-<hash>/` once and never again for the same version, and
/// whose builds it keeps as fresh whatever their source (a registry crate's fingerprint is its
/// version). Without this, `vmfactory-vm` was verified against the last run's agent and failed.
/// The unpacked sources go whoever unpacked them: a fresh checkout has no dep-info to name
/// them, and CI's fresh checkout at a fixed path met the last CI run's (same path, same hash).
/// The build units to drop are the ones this target dir's dep-info files name.
fn forget_previous_run(root: &Path, crates: &[String]) -> Result<()> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("Neither CARGO_HOME nor HOME is set")?;
    // Local registries have no host, so their directory names start with `-`.
    let local_src = format!("{}/-", cargo_home.join("registry/src").display());
    let target = root.join("target/debug");
    let mut dep_infos = Vec::new();
    for dir in [target.join("deps"), target.join("build")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dep_infos.extend(std::fs::read_dir(&path)?.flatten().map(|e| e.path()));
            } else {
                dep_infos.push(path);
            }
        }
    }
    let mut unpacked = BTreeSet::new();
    let mut units = BTreeSet::new();
    for d in dep_infos
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "d"))
    {
        let Ok(text) = std::fs::read_to_string(d) else {
            continue;
        };
        let mut ours = false;
        for (at, _) in text.match_indices(&local_src) {
            let rest = &text[at + local_src.len()..];
            // `<hash>/<crate>-<version>/...`
            let mut parts = rest.splitn(3, '/');
            let (Some(hash), Some(dir)) = (parts.next(), parts.next()) else {
                continue;
            };
            if crates.iter().any(|c| {
                dir.strip_prefix(c.as_str())
                    .is_some_and(|v| v.starts_with('-'))
            }) {
                unpacked.insert(
                    cargo_home
                        .join("registry/src")
                        .join(format!("-{hash}"))
                        .join(dir),
                );
                ours = true;
            }
        }
        if let (true, Some(unit)) = (ours, d.file_stem().and_then(|s| s.to_str())) {
            if let Some((_, hash)) = unit.rsplit_once('-') {
                units.insert(hash.to_owned());
            }
        }
    }
    unpacked.extend(local_unpackings(&cargo_home.join("registry/src"), crates));
    for dir in &unpacked {
        std::fs::remove_dir_all(dir).with_context(|| format!("Cannot remove {}", dir.display()))?;
    }
    if let Ok(entries) = std::fs::read_dir(target.join(".fingerprint")) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let hash = name
                .to_str()
                .and_then(|n| n.rsplit_once('-'))
                .map(|(_, h)| h);
            if hash.is_some_and(|h| units.contains(h)) {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
    }
    Ok(())
}

/// `<crate>-<version>` directories of `crates` under every local registry in `registry_src`.
fn local_unpackings(registry_src: &Path, crates: &[String]) -> Vec<PathBuf> {
    let Ok(registries) = std::fs::read_dir(registry_src) else {
        return Vec::new();
    };
    registries
        .flatten()
        .filter(|r| r.file_name().to_str().is_some_and(|n| n.starts_with('-')))
        .filter_map(|r| std::fs::read_dir(r.path()).ok())
        .flat_map(|dirs| dirs.flatten())
        .filter(|d| {
            d.file_name().to_str().is_some_and(|n| {
                crates.iter().any(|c| {
                    n.strip_prefix(c.as_str())
                        .and_then(|v| v.strip_prefix('-'))
                        .is_some_and(|v| v.starts_with(|ch: char| ch.is_ascii_digit()))
                })
            })
        })
        .map(|d| d.path())
        .collect()
}

/// crates.io's category slugs (its `src/boot/categories.toml`, 2026): another slug is dropped
/// with only a warning at publish time, so it is refused here instead.
pub const CATEGORIES: &[&str] = &[
    "accessibility",
    "aerospace",
    "aerospace::drones",
    "aerospace::protocols",
    "aerospace::simulation",
    "aerospace::space-protocols",
    "aerospace::unmanned-aerial-vehicles",
    "algorithms",
    "api-bindings",
    "asynchronous",
    "authentication",
    "automotive",
    "caching",
    "compilers",
    "command-line-interface",
    "command-line-utilities",
    "compression",
    "computer-vision",
    "config",
    "concurrency",
    "cryptography",
    "cryptography::cryptocurrencies",
    "database",
    "database-implementations",
    "data-structures",
    "date-and-time",
    "development-tools",
    "development-tools::build-utils",
    "development-tools::cargo-plugins",
    "development-tools::debugging",
    "development-tools::ffi",
    "development-tools::procedural-macro-helpers",
    "development-tools::profiling",
    "development-tools::testing",
    "email",
    "embedded",
    "emulators",
    "encoding",
    "external-ffi-bindings",
    "filesystem",
    "finance",
    "game-engines",
    "game-development",
    "games",
    "graphics",
    "gui",
    "hardware-support",
    "internationalization",
    "localization",
    "mathematics",
    "memory-management",
    "multimedia",
    "multimedia::audio",
    "multimedia::video",
    "multimedia::images",
    "multimedia::encoding",
    "network-programming",
    "no-std",
    "no-std::no-alloc",
    "os",
    "os::android-apis",
    "os::linux-apis",
    "os::freebsd-apis",
    "os::macos-apis",
    "os::unix-apis",
    "os::windows-apis",
    "parser-implementations",
    "parsing",
    "rendering",
    "rendering::engine",
    "rendering::graphics-api",
    "rendering::data-formats",
    "rust-patterns",
    "science",
    "science::chemistry",
    "science::chemistry::physical",
    "science::chemistry::informatics",
    "science::geo",
    "science::robotics",
    "science::neuroscience",
    "science::bioinformatics",
    "science::bioinformatics::genomics",
    "science::bioinformatics::proteomics",
    "science::bioinformatics::sequence-analysis",
    "science::bioinformatics::structural",
    "security",
    "simulation",
    "template-engine",
    "text-editors",
    "text-processing",
    "value-formatting",
    "virtualization",
    "visualization",
    "wasm",
    "web-programming",
    "web-programming::http-client",
    "web-programming::http-server",
    "web-programming::websocket",
];

/// What crates.io accepts as a keyword: at most 20 ASCII characters, letters, digits, `_`,
/// `-` and `+`, starting with a letter or digit.
pub fn valid_keyword(k: &str) -> bool {
    k.len() <= 20
        && k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+'))
}

/// The problems that would keep `p` off crates.io or leave it without the metadata users
/// look for there (each a short sentence naming the field); empty when there are none.
pub fn metadata_problems(p: &Package) -> Vec<String> {
    let mut problems = Vec::new();
    let mut missing = |field: &str, value: &Option<String>| {
        if value
            .as_deref()
            .map(str::trim)
            .unwrap_or_default()
            .is_empty()
        {
            problems.push(format!("no `{field}`"));
        }
    };
    missing("description", &p.description);
    missing("license", &p.license);
    missing("repository", &p.repository);
    missing("rust-version", &p.rust_version);
    if p.is_library() {
        let docs_rs = format!("https://docs.rs/{}", p.name);
        if p.documentation.as_deref() != Some(docs_rs.as_str()) {
            problems.push(format!("`documentation` is not {docs_rs:?}"));
        }
    }
    match &p.readme {
        None => problems.push("no `readme`".to_owned()),
        Some(r) if !p.dir().join(r).is_file() => {
            problems.push(format!("`readme` {} does not exist", r.display()));
        }
        Some(_) => {}
    }
    if !p.dir().join("LICENSE").is_file() {
        problems.push("no LICENSE file beside the manifest".to_owned());
    }
    if p.keywords.is_empty() || p.keywords.len() > 5 {
        problems.push(format!("{} keywords (1 to 5)", p.keywords.len()));
    }
    for k in p.keywords.iter().filter(|k| !valid_keyword(k)) {
        problems.push(format!("keyword {k:?} is not valid on crates.io"));
    }
    if p.categories.is_empty() || p.categories.len() > 5 {
        problems.push(format!("{} categories (1 to 5)", p.categories.len()));
    }
    for c in p
        .categories
        .iter()
        .filter(|c| !CATEGORIES.contains(&c.as_str()))
    {
        problems.push(format!("category {c:?} is not a crates.io slug"));
    }
    // A dev-dependency without a version is dropped from the published manifest; any other
    // would make `cargo package` fail.
    for d in p
        .dependencies
        .iter()
        .filter(|d| d.path.is_some() && d.kind.as_deref() != Some("dev") && d.req == "*")
    {
        problems.push(format!("path dependency {} has no version", d.name));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stale unpackings of our crates go from every local registry, whatever checkout made
    /// them; crates.io's and other crates' stay.
    #[test]
    fn every_local_unpacking_of_our_crates_is_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path();
        for d in [
            "-aaa/vmfactory-agent-0.1.0",
            "-bbb/vmfactory-0.1.0",
            "-bbb/vmfactory-agentx-0.1.0",
            "-bbb/serde-1.0.0",
            "index.crates.io-1949cf8c6b5b557f/vmfactory-agent-0.1.0",
        ] {
            std::fs::create_dir_all(src.join(d)).expect("mkdir");
        }
        let crates = ["vmfactory".to_owned(), "vmfactory-agent".to_owned()];
        let mut found = local_unpackings(src, &crates);
        found.sort();
        assert_eq!(
            found,
            vec![
                src.join("-aaa/vmfactory-agent-0.1.0"),
                src.join("-bbb/vmfactory-0.1.0")
            ]
        );
    }

    /// Every crate under `crates/` is publishable with complete metadata, so a new crate cannot
    /// forget any of it; the e2e harness and xtask are not published.
    #[test]
    fn every_crate_has_its_crates_io_metadata() {
        let root = workspace_root();
        let members = members(&root).expect("cargo metadata");
        let mut problems = Vec::new();
        for p in &members {
            let under_crates = p.dir().starts_with(root.join("crates"));
            if under_crates != p.is_publishable() {
                problems.push(format!(
                    "{}: publishable is {} (crates/* are published, e2e and xtask not)",
                    p.name,
                    p.is_publishable()
                ));
            }
            if p.is_publishable() {
                for problem in metadata_problems(p) {
                    problems.push(format!("{}: {problem}", p.name));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    /// The check itself refuses what it should: a bare manifest shows every problem.
    #[test]
    fn a_bare_manifest_shows_every_problem() {
        let bare = Package {
            name: "vmfactory-new".into(),
            manifest_path: PathBuf::from("/nonexistent/Cargo.toml"),
            publish: None,
            description: None,
            license: Some("Apache-2.0".into()),
            repository: None,
            documentation: Some("https://example.invalid".into()),
            readme: None,
            rust_version: Some("1.80".into()),
            keywords: vec!["a".into(); 6],
            categories: vec!["virtualisation".into()],
            dependencies: vec![
                Dependency {
                    name: "vmfactory-vm".into(),
                    req: "*".into(),
                    kind: None,
                    path: Some("/nonexistent/vm".into()),
                },
                Dependency {
                    name: "vmfactory-agent".into(),
                    req: "*".into(),
                    kind: Some("dev".into()),
                    path: Some("/nonexistent/agent".into()),
                },
            ],
            targets: vec![Target {
                kind: vec!["lib".into()],
            }],
        };
        assert_eq!(
            metadata_problems(&bare),
            [
                "no `description`",
                "no `repository`",
                "`documentation` is not \"https://docs.rs/vmfactory-new\"",
                "no `readme`",
                "no LICENSE file beside the manifest",
                "6 keywords (1 to 5)",
                "category \"virtualisation\" is not a crates.io slug",
                "path dependency vmfactory-vm has no version",
            ]
        );
    }

    /// A crate that builds in the workspace but not from its `.crate` file (it reads a file
    /// outside its directory, which the package leaves out) fails the check; so does one that
    /// lacks metadata, before anything is built.
    #[test]
    fn a_crate_that_only_builds_in_the_workspace_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let write = |path: &str, text: &str| {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write(
            "Cargo.toml",
            "[workspace]\nresolver = \"2\"\nmembers = [\"crates/a\"]\n",
        );
        write("shared.txt", "outside the crate");
        write(
            "crates/a/Cargo.toml",
            r#"[package]
name = "a"
version = "0.1.0"
edition = "2021"
description = "d"
license = "Apache-2.0"
repository = "https://example.invalid/a"
documentation = "https://docs.rs/a"
readme = "README.md"
rust-version = "1.80"
keywords = ["k"]
categories = ["virtualization"]
"#,
        );
        write("crates/a/README.md", "# a\n");
        write("crates/a/LICENSE", "Apache-2.0\n");
        write(
            "crates/a/src/lib.rs",
            "//! a\npub const S: &str = include_str!(\"../../../shared.txt\");\n",
        );
        let err = run_in(root).expect_err("a crate reading ../../shared.txt packaged");
        assert_eq!(err.to_string(), "Packaging failed");

        write("crates/a/src/lib.rs", "//! a\n");
        write(
            "crates/a/Cargo.toml",
            "[package]\nname = \"a\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
        );
        let err = run_in(root).expect_err("a crate without metadata packaged");
        assert!(
            err.to_string()
                .starts_with("Crate metadata incomplete:\na: no `description`"),
            "{err}"
        );
    }

    #[test]
    fn keywords_as_crates_io_takes_them() {
        for ok in ["qemu", "run-directory", "c++", "os_2", "x86-64"] {
            assert!(valid_keyword(ok), "{ok}");
        }
        for bad in ["", "-qemu", "micro vm", "a-keyword-longer-than-20", "é"] {
            assert!(!valid_keyword(bad), "{bad}");
        }
    }

    /// README.md's publishing order is the order `publish_order` computes from the manifests.
    #[test]
    fn readme_lists_the_publish_order() {
        let root = workspace_root();
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        let documented = util::text_block(&readme, "## Publishing")
            .expect("README.md has no publishing order block");
        let documented: Vec<&str> = documented.split_whitespace().collect();
        let order =
            publish_order(&members(&workspace_root()).expect("cargo metadata")).expect("order");
        assert_eq!(documented, order, "README.md's publishing order is stale");
    }

    #[test]
    fn publish_order_puts_dependencies_first() {
        let pkg = |name: &str, deps: &[(&str, Option<&str>)]| Package {
            name: name.into(),
            manifest_path: PathBuf::new(),
            publish: None,
            description: None,
            license: None,
            repository: None,
            documentation: None,
            readme: None,
            rust_version: None,
            keywords: vec![],
            categories: vec![],
            dependencies: deps
                .iter()
                .map(|(d, kind)| Dependency {
                    name: (*d).into(),
                    req: "^0.1.0".into(),
                    kind: kind.map(String::from),
                    path: Some(PathBuf::new()),
                })
                .collect(),
            targets: vec![],
        };
        let mut unpublished = pkg("xtask", &[("cli", None)]);
        unpublished.publish = Some(vec![]);
        let packages = [
            pkg("cli", &[("vm", None), ("gen", Some("build"))]),
            pkg("vm", &[("leaf", None), ("cli", Some("dev"))]),
            pkg("gen", &[]),
            pkg("leaf", &[("serde", None)]),
            unpublished,
        ];
        assert_eq!(
            publish_order(&packages).expect("order"),
            ["gen", "leaf", "vm", "cli"]
        );
        let cycle = [pkg("a", &[("b", None)]), pkg("b", &[("a", None)])];
        assert!(publish_order(&cycle).is_err());
    }
}
