//! What goes into the guest image beyond the agent and busybox: `vmfactory-guest.toml`
//! (`[guest] kernel = "6.1" | "6.12"`, `packages = [...]`) plus `cargo xtask guest --kernel
//! SERIES --package NAME`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

use super::kernel::{GuestKernel, DEFAULT_KERNEL};
use crate::util::workspace_root;

/// The configuration file read when `--config` is not given (at the workspace root, optional).
pub const DEFAULT_CONFIG: &str = "vmfactory-guest.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    guest: GuestSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestSection {
    /// The kernel series (default [`DEFAULT_KERNEL`]).
    #[serde(default)]
    kernel: Option<GuestKernel>,
    /// Extra Debian packages (their Depends/Pre-Depends closure comes with them).
    #[serde(default)]
    packages: Vec<String>,
}

/// The requested contents of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The kernel series.
    pub kernel: GuestKernel,
    /// Extra Debian packages, sorted and without duplicates.
    pub packages: Vec<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            kernel: DEFAULT_KERNEL,
            packages: Vec::new(),
        }
    }
}

impl ImageSpec {
    /// Reads `config` (an error if it is missing), or `vmfactory-guest.toml` at the workspace
    /// root if that exists, and adds `extra` (from `--package`); `kernel` (from `--kernel`)
    /// wins over the file's.
    pub fn load(
        config: Option<&Path>,
        extra: &[String],
        kernel: Option<GuestKernel>,
    ) -> Result<Self> {
        let default = workspace_root().join(DEFAULT_CONFIG);
        let path = match config {
            Some(path) => Some(path),
            None => default.is_file().then_some(default.as_path()),
        };
        let section = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("Cannot read {}", path.display()))?;
                parse(&text).with_context(|| format!("Invalid {}", path.display()))?
            }
            None => GuestSection::default(),
        };
        let mut packages = section.packages;
        packages.extend(extra.iter().map(|p| p.trim().to_string()));
        packages.retain(|p| !p.is_empty());
        for p in &packages {
            ensure!(valid_name(p), "{p:?} is not a Debian package name");
        }
        packages.sort();
        packages.dedup();
        Ok(ImageSpec {
            kernel: kernel.or(section.kernel).unwrap_or(DEFAULT_KERNEL),
            packages,
        })
    }
}

fn parse(text: &str) -> Result<GuestSection> {
    let file: ConfigFile = toml::from_str(text)?;
    Ok(file.guest)
}

/// Debian policy 5.6.1: lower-case letters, digits, `+`, `-`, `.`; at least two characters,
/// starting with a letter or digit. Also keeps an option (`-o...`) away from apt.
fn valid_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file() {
        assert_eq!(
            parse("[guest]\npackages = [\"python3-minimal\", \"jq\"]\n")
                .unwrap()
                .packages,
            ["python3-minimal", "jq"]
        );
        assert!(parse("").unwrap().packages.is_empty());
        assert_eq!(parse("").unwrap().kernel, None);
        assert_eq!(
            parse("[guest]\nkernel = \"6.12\"\n").unwrap().kernel,
            Some(GuestKernel::V6_12)
        );
        assert!(
            parse("[guest]\nkernel = \"6.2\"\n").is_err(),
            "no such series"
        );
        assert!(
            parse("[guest]\npackage = [\"x\"]\n").is_err(),
            "unknown key"
        );
        assert!(parse("[guest]\npackages = \"x\"\n").is_err(), "not a list");
    }

    #[test]
    fn load_merges_sorts_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "[guest]\npackages = [\"python3-minimal\"]\n").unwrap();
        let spec =
            ImageSpec::load(Some(&path), &["jq".into(), "python3-minimal".into()], None).unwrap();
        assert_eq!(spec.packages, ["jq", "python3-minimal"]);
        assert_eq!(spec.kernel, DEFAULT_KERNEL);
        assert!(ImageSpec::load(Some(&path), &["-oFoo=1".into()], None).is_err());
        assert!(ImageSpec::load(Some(&dir.path().join("missing.toml")), &[], None).is_err());
        // `--kernel` wins over the file.
        std::fs::write(&path, "[guest]\nkernel = \"6.12\"\n").unwrap();
        let from_file = ImageSpec::load(Some(&path), &[], None).unwrap();
        assert_eq!(from_file.kernel, GuestKernel::V6_12);
        let flag = ImageSpec::load(Some(&path), &[], Some(GuestKernel::V6_1)).unwrap();
        assert_eq!(flag.kernel, GuestKernel::V6_1);
        assert!(valid_name("libstdc++6") && valid_name("g++") && !valid_name("Foo"));
    }
}
