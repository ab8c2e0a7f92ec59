//! Asking a QEMU binary its version: part of what a template and the accelerator cache are
//! keyed by.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Bound on `<qemu> --version`.
pub const QEMU_VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The first line of `<qemu> --version` (e.g. `QEMU emulator version 7.2.0`), or why it could
/// not be had: QEMU did not start, timed out after [`QEMU_VERSION_TIMEOUT`] or failed.
pub async fn qemu_version(qemu: &Path) -> std::io::Result<String> {
    let child = tokio::process::Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let out = tokio::time::timeout(QEMU_VERSION_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("exited with {}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn first_line_or_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            p
        };
        let ok = script(
            "ok",
            "echo ' QEMU emulator version 7.2.0 '; echo 'Copyright'",
        );
        assert_eq!(
            qemu_version(&ok).await.expect("version"),
            "QEMU emulator version 7.2.0"
        );
        assert!(qemu_version(&script("fails", "exit 3")).await.is_err());
        assert!(qemu_version(&dir.path().join("missing")).await.is_err());
    }
}
