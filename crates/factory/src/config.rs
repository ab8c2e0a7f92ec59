//! [`FactoryConfig`]: how a factory is built (Kata's `factory.Config` and the `[factory]`
//! section of its `configuration.toml`).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmfactory_vm::VmConfig;

/// Why a [`FactoryConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FactoryConfigError {
    /// `fetch_only` without `template`.
    #[error("fetch_only needs template = true")]
    FetchOnlyWithoutTemplate,
    /// A cache over a fetch-only template (Kata refuses it too).
    #[error("A cache cannot use a fetch-only template")]
    CacheOverFetchOnly,
    /// A VM-cache client that would also make its own base VMs.
    #[error("A VM-cache client cannot also use a template or a local cache")]
    ClientWithLocalBase,
    /// The template path is relative.
    #[error("template_path {path} is not absolute")]
    RelativeTemplatePath {
        /// The configured path.
        path: PathBuf,
    },
    /// The template path is one vmfactory must never mount over or remove files from.
    #[error("template_path {path} {problem}")]
    UnsafeTemplatePath {
        /// The configured path.
        path: PathBuf,
        /// What is wrong with it.
        problem: TemplatePathProblem,
    },
    /// `template` is on but the base VM cannot be templated (see
    /// [`vmfactory_hypervisor::HypervisorConfig::check_templatable`]).
    #[error("The base VM cannot be templated")]
    NotTemplatable(#[source] vmfactory_hypervisor::ConfigError),
    /// The base VM config is invalid.
    #[error("Invalid base VM config")]
    Vm(#[from] vmfactory_vm::ConfigError),
}

/// Default template directory (a tmpfs is mounted here).
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";

/// Directories a template path must not be (a template mounts a tmpfs over its path and
/// `destroy` removes files in it); their subdirectories are fine.
pub const SYSTEM_DIRS: &[&str] = &[
    "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
];

/// Why a template path is refused ([`FactoryConfigError::UnsafeTemplatePath`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TemplatePathProblem {
    /// It has a `..` component (the directory it names is not what it reads as).
    ParentComponent,
    /// It is `/`.
    Root,
    /// It is one of [`SYSTEM_DIRS`].
    SystemDir,
    /// It is a run root or its `vm` directory (the default's or the configured one's), which
    /// hold every VM's storage.
    RunRoot,
}

impl fmt::Display for TemplatePathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ParentComponent => "has a .. component",
            Self::Root => "is the root directory",
            Self::SystemDir => "is a system directory",
            Self::RunRoot => "is a run root or its vm directory",
        })
    }
}

/// Checks an absolute template path lexically (no file access): no `..`, not `/`, not a
/// system directory, not `run_root`, the default run root or their `vm` directories.
fn check_template_path(path: &Path, run_root: &Path) -> Result<(), TemplatePathProblem> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(TemplatePathProblem::ParentComponent);
    }
    // `Path` equality compares components: `/etc/`, `/etc/.` and `//etc` are `/etc`.
    if path == Path::new("/") {
        return Err(TemplatePathProblem::Root);
    }
    if SYSTEM_DIRS.iter().any(|d| path == Path::new(d)) {
        return Err(TemplatePathProblem::SystemDir);
    }
    let default_root = Path::new(vmfactory_persist::DEFAULT_ROOT);
    for root in [run_root, default_root] {
        if path == root || path == root.join("vm") {
            return Err(TemplatePathProblem::RunRoot);
        }
    }
    Ok(())
}

/// How a factory is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FactoryConfig {
    /// Make base VMs as clones of a template (Kata `enable_template`).
    #[serde(default)]
    pub template: bool,
    /// Where the template lives (a tmpfs is mounted there).
    #[serde(default = "default_template_path")]
    pub template_path: PathBuf,
    /// Use an existing template and never create one (Kata's fetch-only template factory).
    #[serde(default)]
    pub fetch_only: bool,
    /// Keep this many ready VMs in a cache (Kata `vm_cache_number`); 0 disables the cache.
    #[serde(default)]
    pub cache: u32,
    /// Get base VMs from the VM-cache server on this unix socket (Kata `vm_cache_endpoint`).
    #[serde(default)]
    pub cache_endpoint: Option<PathBuf>,
    /// With a template, keep this many clones' QEMUs started ahead of need, waiting for the
    /// state load ([`crate::TemplateFactory::prestart`]); 0 turns it off.
    #[serde(default = "default_prestart")]
    pub prestart: u32,
    /// The base VM config.
    pub vm: VmConfig,
}

/// Pre-started clones a template factory keeps by default: one hides QEMU's start from one
/// `get_vm` at a time, for ~10 MiB of idle QEMU (measured in docs/benchmarks.md).
pub const DEFAULT_PRESTART: u32 = 1;

fn default_prestart() -> u32 {
    DEFAULT_PRESTART
}

fn default_template_path() -> PathBuf {
    PathBuf::from(DEFAULT_TEMPLATE_PATH)
}

impl FactoryConfig {
    /// A direct factory for `vm` (no template, no cache).
    pub fn new(vm: VmConfig) -> Self {
        Self {
            template: false,
            template_path: default_template_path(),
            fetch_only: false,
            cache: 0,
            cache_endpoint: None,
            prestart: DEFAULT_PRESTART,
            vm,
        }
    }

    /// Checks the combination of options and the VM config's shape (no file access).
    pub fn validate(&self) -> Result<(), FactoryConfigError> {
        if self.fetch_only && !self.template {
            return Err(FactoryConfigError::FetchOnlyWithoutTemplate);
        }
        if self.fetch_only && self.cache > 0 {
            return Err(FactoryConfigError::CacheOverFetchOnly);
        }
        if self.cache_endpoint.is_some() && (self.template || self.cache > 0) {
            // The server owns templates and pools.
            return Err(FactoryConfigError::ClientWithLocalBase);
        }
        if !self.template_path.is_absolute() {
            return Err(FactoryConfigError::RelativeTemplatePath {
                path: self.template_path.clone(),
            });
        }
        check_template_path(&self.template_path, &self.vm.run_root).map_err(|problem| {
            FactoryConfigError::UnsafeTemplatePath {
                path: self.template_path.clone(),
                problem,
            }
        })?;
        self.vm.validate_shape()?;
        if self.template {
            self.vm
                .hypervisor
                .check_templatable()
                .map_err(FactoryConfigError::NotTemplatable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmfactory_hypervisor::HypervisorConfig;

    fn cfg() -> FactoryConfig {
        let hv = HypervisorConfig::new("/k", Some("/i".into()));
        FactoryConfig::new(VmConfig::new(hv))
    }

    #[test]
    fn option_combinations() {
        cfg().validate().unwrap();
        let mut c = cfg();
        c.fetch_only = true;
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::FetchOnlyWithoutTemplate)
        ));
        c.template = true;
        c.validate().unwrap();
        c.cache = 2;
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::CacheOverFetchOnly)
        ));
        let mut c = cfg();
        c.template_path = "rel".into();
        assert!(matches!(
            c.validate(),
            Err(FactoryConfigError::RelativeTemplatePath { .. })
        ));
    }

    #[test]
    fn template_paths_that_are_not_ours_are_refused() {
        use TemplatePathProblem as P;
        let mut c = cfg();
        c.vm.run_root = "/srv/vmf".into();
        let cases = [
            ("/", P::Root),
            ("//", P::Root),
            ("/etc", P::SystemDir),
            ("/etc/", P::SystemDir),
            ("/usr/./", P::SystemDir),
            ("/tmp", P::SystemDir),
            ("/run", P::SystemDir),
            ("/run/vc", P::RunRoot),
            ("/run/vc/vm", P::RunRoot),
            ("/srv/vmf", P::RunRoot),
            ("/srv/vmf/vm/", P::RunRoot),
            ("/run/vc/vm/../../../etc", P::ParentComponent),
            ("/var/lib/vmf/../x", P::ParentComponent),
        ];
        for (path, want) in cases {
            c.template_path = path.into();
            match c.validate() {
                Err(FactoryConfigError::UnsafeTemplatePath { problem, .. }) => {
                    assert_eq!(problem, want, "{path}");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        let e = FactoryConfigError::UnsafeTemplatePath {
            path: "/etc".into(),
            problem: P::SystemDir,
        };
        assert_eq!(e.to_string(), "template_path /etc is a system directory");
        // The default and directories under system ones stay valid.
        for path in [
            DEFAULT_TEMPLATE_PATH,
            "/run/vc/template",
            "/tmp/vmf/tpl",
            "/var/lib/vmf",
            "/srv/vmf/vm/template",
        ] {
            c.template_path = path.into();
            c.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
        }
    }
}
