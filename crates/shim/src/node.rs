//! The node's vmfactory configuration, found as the CLI finds it: `VMFACTORY_CONFIG`, else
//! `/etc/vmfactory/config.toml` if it exists, else the embedded default.

use std::path::{Path, PathBuf};

pub use vmfactory_config::{ConfigFileError, Settings, CONFIG_ENV};

/// The file `VMFACTORY_CONFIG` names, if set and not empty.
pub fn config_from_env() -> Option<PathBuf> {
    std::env::var_os(CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads and checks the node's settings from `explicit`, else as the CLI chooses.
pub async fn load(explicit: Option<&Path>) -> Result<Settings, ConfigFileError> {
    let source = vmfactory_config::choose(explicit).await;
    let settings = vmfactory_config::load(&source).await?;
    settings.check()?;
    Ok(settings)
}

/// Where the rootfs images of a node with `settings` live: `<run_root>/rootfs`.
pub fn rootfs_config(settings: &Settings) -> crate::RootfsConfig {
    crate::RootfsConfig::new(&settings.vm.run_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_named_file_is_read_and_a_missing_one_is_an_error_naming_it() {
        let t = tempfile::tempdir().expect("tmp");
        let missing = t.path().join("nope.toml");
        let e = load(Some(&missing)).await.expect_err("missing");
        let text = crate::status::one_line(&e);
        assert!(text.contains("nope.toml"), "{text}");

        let file = t.path().join("config.toml");
        std::fs::write(&file, vmfactory_config::DEFAULT_TOML).expect("write");
        let s = load(Some(&file)).await.expect("default file");
        let rootfs = rootfs_config(&s);
        assert_eq!(rootfs.dir, s.vm.run_root.join("rootfs"));

        std::fs::write(&file, "[hypervisor.qemu]\nno_such_key = 1\n").expect("write");
        let e = load(Some(&file)).await.expect_err("unknown key");
        assert!(crate::status::one_line(&e).contains("no_such_key"));
    }
}
