//! `vmfactory inspect`: what vmfactory stores, loaded through the libraries' own checks and
//! printed as JSON. `template` reads `<template_path>/metadata.json`, `vm <ID>` reads
//! `<run_root>/vm/<ID>/state.json` (through the persist `Store`, without taking the VM's lock),
//! `wire <FILE>` reads a VM wire form. Nothing is created, locked, changed or removed.
//!
//! Exit codes are chosen from the libraries' error variants, never from their text: a stored
//! input that is corrupt, truncated, of another version, over its size limit or inconsistent,
//! an invalid or unknown VM id, and an unreadable wire file are bad input (2); a missing
//! template and a failing read of the run root are runtime failures (1).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use vmfactory_factory::{TemplateError, TemplateMetadata, METADATA_FILE};
use vmfactory_persist::{Error as PersistError, Store};
use vmfactory_vm::{Error as VmError, VmState, MAX_WIRE_SIZE};

use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};

/// What `inspect template` prints.
#[derive(Debug, Serialize)]
struct TemplateView<'a> {
    /// The metadata file read.
    metadata_file: PathBuf,
    /// Its content, checked (version, hash).
    metadata: &'a TemplateMetadata,
}

/// What `inspect vm` and `inspect wire` print.
#[derive(Debug, Serialize)]
struct VmView<'a> {
    /// Where it was read: the state file, the wire file, or `-` (standard input).
    source: String,
    /// VM id.
    id: &'a str,
    /// QEMU's recorded pid.
    pid: Option<u32>,
    /// Whether that QEMU runs on this host now (same pid and start time).
    qemu_alive: bool,
    /// The VM's run directory.
    run_dir: &'a Path,
    /// Its QMP socket.
    qmp_socket: &'a Path,
    /// Its serial console socket.
    console_socket: &'a Path,
    /// Where the host reaches its agent (none for a vsock VM whose QEMU holds no CID).
    agent_url: Option<String>,
    /// vCPUs (boot + hot-added).
    vcpus: u32,
    /// Memory in MiB (boot + hot-added).
    memory_mib: u64,
    /// Everything the state holds.
    state: &'a VmState,
}

impl<'a> VmView<'a> {
    async fn new(source: String, state: &'a VmState) -> VmView<'a> {
        let hv = &state.hypervisor;
        VmView {
            source,
            id: &state.id,
            pid: hv.pid,
            qemu_alive: hv.qemu_alive().await,
            run_dir: hv.run_dir(),
            qmp_socket: &hv.paths.qmp,
            console_socket: &hv.paths.console,
            agent_url: state.agent_url().map(|u| u.to_string()),
            vcpus: state.vcpus,
            memory_mib: state.memory_mib,
            state,
        }
    }
}

/// `inspect template`.
pub async fn template(s: &Settings) -> CmdResult {
    let dir = &s.template_path;
    let metadata = TemplateMetadata::load(dir).await.map_err(|e| match e {
        TemplateError::Missing { .. } => Failure::from(anyhow!(
            "No template at {} (run `vmfactory init`)",
            dir.display()
        )),
        e => classify(is_bad_metadata(&e), e.into()),
    })?;
    print_json(&TemplateView {
        metadata_file: dir.join(METADATA_FILE),
        metadata: &metadata,
    })
    .await
}

/// `inspect vm <ID>`.
pub async fn vm(s: &Settings, id: &str) -> CmdResult {
    let root = &s.vm.run_root;
    let store = Store::new(root);
    // Fails only for an invalid id (`InvalidId`), before any path is touched.
    let path = store.state_path(id).map_err(Failure::usage)?;
    let state: VmState = store.load_state(id).await.map_err(|e| match e {
        PersistError::VmNotFound { .. } => {
            Failure::usage(anyhow!("No VM {id} under {}", root.display()))
        }
        PersistError::InvalidId { .. } => Failure::usage(e),
        // A directory without a state: not a VM, or one whose creator has not saved it yet.
        PersistError::NotFound { .. } => {
            Failure::usage(anyhow::Error::new(e).context(format!("VM {id} has no saved state")))
        }
        e => classify(
            is_bad_file(&e),
            anyhow::Error::new(e).context(format!("Cannot load the state of VM {id}")),
        ),
    })?;
    let source = path.display().to_string();
    state.check().map_err(|e| {
        classify(
            is_bad_vm(&e),
            anyhow::Error::new(e).context(format!("VM state {source} fails its checks")),
        )
    })?;
    print_json(&VmView::new(source, &state).await).await
}

/// `inspect wire <FILE>` (`-`: standard input).
pub async fn wire(file: &Path) -> CmdResult {
    let stdin = file == Path::new("-");
    // In messages; the JSON's `source` is the argument as given.
    let name = if stdin {
        "on standard input".to_owned()
    } else {
        file.display().to_string()
    };
    // A named file is read as every stored input is (no symlink, FIFO or device, at most
    // MAX_WIRE_SIZE bytes); standard input is what the user pipes in, read up to the limit.
    let read = if stdin {
        read_wire(tokio::io::stdin())
            .await
            .map_err(anyhow::Error::new)
    } else {
        vmfactory_persist::read_limited(file, MAX_WIRE_SIZE as u64)
            .await
            .map_err(anyhow::Error::new)
    };
    // The user named the file: an unreadable one is bad input too.
    let bytes = read
        .with_context(|| format!("Cannot read wire form {name}"))
        .map_err(Failure::usage)?;
    let state = VmState::from_wire(&bytes).map_err(|e| {
        classify(
            is_bad_vm(&e),
            anyhow::Error::new(e).context(format!("Wire form {name} is unusable")),
        )
    })?;
    let source = file.display().to_string();
    print_json(&VmView::new(source, &state).await).await
}

/// Reads at most one byte more than [`MAX_WIRE_SIZE`], so an oversized input is refused by
/// `VmState::from_wire` without being read whole.
async fn read_wire(input: impl AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    input
        .take(MAX_WIRE_SIZE as u64 + 1)
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

/// Exit 2 for bad input, else 1.
fn classify(bad_input: bool, error: anyhow::Error) -> Failure {
    if bad_input {
        Failure::usage(error)
    } else {
        error.into()
    }
}

/// Whether the template metadata file itself is bad: corrupt or truncated JSON, another format
/// version, a failed hash check, over the size limit, or not a regular file. A missing file or
/// a failing read is not.
pub fn is_bad_metadata(e: &TemplateError) -> bool {
    match e {
        TemplateError::Corrupt { .. }
        | TemplateError::UnsupportedVersion { .. }
        | TemplateError::HashMismatch { .. } => true,
        TemplateError::Persist { source, .. } => is_bad_file(source),
        _ => false,
    }
}

/// Whether a template's stored files are bad: its metadata (see [`is_bad_metadata`]), or a
/// memory or state file truncated or grown against the size its metadata records, written
/// after the save, a symlink or not a regular file.
pub fn is_bad_template(e: &TemplateError) -> bool {
    match e {
        TemplateError::FileSize { .. } | TemplateError::Modified { .. } => true,
        TemplateError::File { source, .. } => is_bad_file(source),
        e => is_bad_metadata(e),
    }
}

/// Whether a persist error is about a file's content or kind (as opposed to its absence, a
/// failing read or an unusable id).
fn is_bad_file(e: &PersistError) -> bool {
    matches!(
        e,
        PersistError::TooLarge { .. }
            | PersistError::InvalidPath { .. }
            | PersistError::Symlink { .. }
            | PersistError::NotRegular { .. }
            | PersistError::Corrupt { .. }
            | PersistError::VersionTooNew { .. }
            | PersistError::VersionTooOld { .. }
            | PersistError::IdMismatch { .. }
    )
}

/// Whether a VM state or wire form was refused for what it holds (its form, version, size or
/// parts), which is all `VmState::from_wire` and `VmState::check` refuse it for.
fn is_bad_vm(e: &VmError) -> bool {
    matches!(e, VmError::Wire(_) | VmError::Config(_))
}

/// Prints `value` as pretty JSON on stdout (a closed stdout is an error, not a panic).
async fn print_json(value: &impl Serialize) -> CmdResult {
    let mut text = serde_json::to_string_pretty(value).context("Cannot encode the JSON")?;
    text.push('\n');
    let mut out = tokio::io::stdout();
    out.write_all(text.as_bytes())
        .await
        .context("Cannot write to standard output")?;
    out.flush()
        .await
        .context("Cannot write to standard output")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_errors_are_bad_input_only_for_bad_content() {
        let path = PathBuf::from("/t/metadata.json");
        let json_err = || serde_json::from_slice::<u8>(b"{").expect_err("not JSON");
        let persist = |source| TemplateError::Persist {
            op: "read",
            path: path.clone(),
            source,
        };
        for e in [
            TemplateError::Corrupt {
                path: path.clone(),
                source: json_err(),
            },
            TemplateError::UnsupportedVersion {
                path: path.clone(),
                found: 2,
                supported: 1,
            },
            TemplateError::HashMismatch { path: path.clone() },
            persist(PersistError::TooLarge {
                path: path.clone(),
                size: 2,
                limit: 1,
            }),
            persist(PersistError::InvalidPath {
                path: path.clone(),
                reason: "is not a regular file",
            }),
            persist(PersistError::Symlink { path: path.clone() }),
            persist(PersistError::NotRegular {
                path: path.clone(),
                kind: vmfactory_persist::FileKind::Fifo,
            }),
        ] {
            assert!(is_bad_metadata(&e), "{e:?}");
        }
        for e in [
            TemplateError::Missing { path: path.clone() },
            persist(PersistError::Io {
                op: "open",
                path: path.clone(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            }),
        ] {
            assert!(!is_bad_metadata(&e), "{e:?}");
        }
    }

    #[test]
    fn failures_keep_their_code() {
        assert_eq!(
            classify(true, anyhow!("x")).code,
            crate::failure::EXIT_USAGE
        );
        assert_eq!(
            classify(false, anyhow!("x")).code,
            crate::failure::EXIT_FAILURE
        );
    }
}
