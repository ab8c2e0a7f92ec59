//! `vmfactory --version`: the package version and commit, and what this configuration would
//! run: the QEMU binary's own version and the guest image's manifest (written by `cargo xtask
//! guest`). Parts that cannot be read say why; the version itself always prints.

use std::path::Path;

use serde::Deserialize;

use crate::config_file::{self, Settings};

/// The package version.
pub const PACKAGE: &str = env!("CARGO_PKG_VERSION");

/// The commit this binary was built from (`build.rs`).
pub const COMMIT: &str = env!("VMFACTORY_COMMIT");

/// The largest guest manifest read (a few hundred bytes in practice).
const MAX_MANIFEST: u64 = 64 * 1024;

/// What `--version` reads of `manifest.json` beside the guest kernel.
#[derive(Debug, Deserialize)]
struct Manifest {
    format: u32,
    kernel_release: String,
    #[serde(default)]
    agent_sha256: String,
}

/// The text `--version` prints.
pub async fn text(config: Option<&Path>) -> String {
    let mut out = format!("vmfactory {PACKAGE} (commit {COMMIT})\n");
    let source = config_file::choose(config).await;
    match config_file::load(&source).await {
        Ok(s) => {
            out.push_str(&format!("config: {}\n", s.origin));
            out.push_str(&format!("qemu:   {}\n", qemu(&s).await));
            out.push_str(&format!("guest:  {}\n", guest(&s).await));
        }
        Err(e) => out.push_str(&format!(
            "config: cannot load: {}\n",
            vmfactory_factory::error_chain(&e)
        )),
    }
    out
}

async fn qemu(s: &Settings) -> String {
    let path = &s.vm.hypervisor.qemu_path;
    match vmfactory_hypervisor::qemu_version(path).await {
        Ok(v) => format!("{} ({v})", path.display()),
        Err(e) => format!("{}: cannot run it: {e}", path.display()),
    }
}

async fn guest(s: &Settings) -> String {
    let kernel = &s.vm.hypervisor.kernel;
    let Some(dir) = kernel.parent() else {
        return format!("{}: no directory", kernel.display());
    };
    let path = dir.join("manifest.json");
    let bytes = match vmfactory_persist::read_limited(&path, MAX_MANIFEST).await {
        Ok(b) => b,
        Err(e) => {
            return format!(
                "{}: no image manifest ({}; `cargo xtask guest` writes one)",
                dir.display(),
                vmfactory_factory::error_chain(&e)
            )
        }
    };
    match serde_json::from_slice::<Manifest>(&bytes) {
        Ok(m) => format!(
            "{}: image format {}, kernel {}, agent sha256 {}",
            dir.display(),
            m.format,
            m.kernel_release,
            m.agent_sha256.get(..12).unwrap_or(&m.agent_sha256)
        ),
        Err(e) => format!("{}: unreadable manifest: {e}", path.display()),
    }
}
