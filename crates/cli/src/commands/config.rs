//! `vmfactory config check`: every problem of the file at once, one per line, the Kata keys it
//! ignores as warnings, then the guest files, the QEMU binary and the accelerator a VM gets.

use std::path::Path;

use crate::config_file::{self, ConfigFileError};
use crate::failure::{CmdResult, Failure};

pub async fn check(path: Option<&Path>) -> CmdResult {
    let source = config_file::choose(path).await;
    let settings = config_file::load(&source).await.map_err(|e| match e {
        // One line per problem: the point of the check is to see them all.
        e @ ConfigFileError::Problems { .. } => Failure::usage(e).multiline(),
        e => e.into(),
    })?;
    for w in &settings.warnings {
        eprintln!("vmfactory: warning: {w}");
    }
    settings.check_files().await?;
    let qemu = settings.check_qemu().await?;
    let hv = &settings.vm.hypervisor;
    println!("qemu: {} ({})", hv.qemu_path.display(), qemu.version);
    println!("accel: {} ({})", qemu.accel.accel, qemu.accel.reason);
    println!("{}: OK", settings.origin);
    Ok(())
}
