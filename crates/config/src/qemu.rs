//! `config check`'s look at the QEMU binary: that it runs, is QEMU, and which accelerator a
//! VM would get, resolved as `init` resolves it but writing nothing.

use vmfactory_factory::ACCEL_CACHE_FILE;
use vmfactory_hypervisor::{explain_accel, qemu_version, AccelChoice};

use super::{ConfigFileError, Settings, QEMU};

/// What `<qemu> --version` prints first when the binary is QEMU.
const QEMU_BANNER: &str = "QEMU emulator version";

/// The configured QEMU, as `config check` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCheck {
    /// The first line of `--version`.
    pub version: String,
    /// The accelerator a VM would run with, and why.
    pub accel: AccelChoice,
}

impl Settings {
    /// Runs `<path> --version` and resolves the accelerator (reading, never writing,
    /// `<run_root>/accel.json`). A binary that is missing, cannot be run, fails or is not
    /// QEMU is an error naming `path` and its line.
    pub async fn check_qemu(&self) -> Result<QemuCheck, ConfigFileError> {
        let hv = &self.vm.hypervisor;
        let qemu = hv.qemu_path.display();
        let version = qemu_version(&hv.qemu_path)
            .await
            .map_err(|e| self.invalid(QEMU, "path", format!("QEMU {qemu} cannot be run: {e}")))?;
        if !version.starts_with(QEMU_BANNER) {
            let message = format!("{qemu} is not QEMU: `--version` printed {version:?}");
            return Err(self.invalid(QEMU, "path", message));
        }
        let cache = self.vm.run_root.join(ACCEL_CACHE_FILE);
        let accel = explain_accel(hv, Some(&cache)).await;
        Ok(QemuCheck { version, accel })
    }
}
