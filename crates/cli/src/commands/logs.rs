//! `vmfactory logs ID [-f]`: print the guest console log of a VM, running under the run root
//! (`<run_root>/vm/<ID>/console.log`, with its previous chunk `console.log.1` first) or one
//! that failed to come up (`<run_root>/failed/<ID>/console.log`). `-f` follows a running VM's
//! log until its directory goes away (it stopped) or Ctrl-C.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::commands::leftovers;
use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};
use crate::probe::exists;

/// How often `-f` looks for new lines: the console proxy writes a VM's lines as they come,
/// and a person watching does not notice 200 ms.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Where a VM's console log is.
enum Source {
    /// A VM under `<run_root>/vm/<id>`; the log may not exist yet.
    Running { dir: PathBuf },
    /// A VM that failed to come up; its log is kept.
    Failed { log: PathBuf },
}

pub async fn run(s: &Settings, id: &str, follow: bool) -> CmdResult {
    let unknown = || Failure::usage(anyhow!("No VM {id} under {}", s.vm.run_root.display()));
    // An id that is not a VM id (`..`, a path) names nothing, and reads nothing.
    vmfactory_persist::validate_id(id).map_err(|_| unknown())?;
    let source = find(s, id).await?.ok_or_else(unknown)?;
    let mut out = tokio::io::stdout();
    match source {
        Source::Failed { log } => {
            copy_file(&log, &mut out).await?;
            Ok(())
        }
        Source::Running { dir } => {
            let log = dir.join("console.log");
            let rotated = vmfactory_vm::rotated_path(&log);
            if exists(&rotated).await {
                copy_file(&rotated, &mut out).await?;
            }
            if !follow {
                if !exists(&log).await {
                    return Err(anyhow!(
                        "VM {id} has no console log yet ({} is missing; with `[proxy] \
                         kind = \"none\"` there is none)",
                        log.display()
                    )
                    .into());
                }
                copy_file(&log, &mut out).await?;
                return Ok(());
            }
            self::follow(&dir, &log, &mut out).await
        }
    }
}

/// Where VM `id`'s log is, if it is a running or a failed VM.
async fn find(s: &Settings, id: &str) -> Result<Option<Source>, Failure> {
    let dir = s.vm.run_root.join("vm").join(id);
    if tokio::fs::metadata(&dir).await.is_ok_and(|m| m.is_dir()) {
        return Ok(Some(Source::Running { dir }));
    }
    let failed = leftovers::failed_vms(s)
        .await
        .with_context(|| format!("Cannot list failed VMs under {}", s.vm.run_root.display()))?;
    Ok(failed
        .into_iter()
        .find(|f| f.id == id)
        .map(|f| Source::Failed { log: f.console_log }))
}

/// Writes the whole file at `path` to `out`.
async fn copy_file(path: &Path, out: &mut tokio::io::Stdout) -> anyhow::Result<()> {
    let mut file = File::open(path)
        .await
        .with_context(|| format!("Cannot open {}", path.display()))?;
    tokio::io::copy(&mut file, out)
        .await
        .with_context(|| format!("Cannot print {}", path.display()))?;
    out.flush().await.context("Cannot write to stdout")?;
    Ok(())
}

/// Prints `log` and what is appended to it until `dir` goes away or Ctrl-C. The log is
/// replaced when it reaches its cap (the old one becomes `console.log.1`): the rest of the
/// old file is printed, then the new one from its start.
async fn follow(dir: &Path, log: &Path, out: &mut tokio::io::Stdout) -> CmdResult {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut current: Option<(File, u64)> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // The directory is checked before the last read, so lines written just before the
        // VM stopped are printed.
        let gone = !exists(dir).await;
        if let Some((file, _)) = &mut current {
            drain(file, &mut buf, out).await?;
        }
        if gone {
            return Ok(());
        }
        // A new file at the path (first appearance, or a rotation): switch to it.
        if let Ok(meta) = tokio::fs::metadata(log).await {
            if current.as_ref().map(|(_, ino)| *ino) != Some(meta.ino()) {
                if let Ok(mut file) = File::open(log).await {
                    drain(&mut file, &mut buf, out).await?;
                    current = Some((file, meta.ino()));
                }
            }
        }
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
}

/// Prints what `file` holds from its position to its end.
async fn drain(file: &mut File, buf: &mut [u8], out: &mut tokio::io::Stdout) -> CmdResult {
    loop {
        let n = file
            .read(buf)
            .await
            .context("Cannot read the console log")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .await
            .context("Cannot write to stdout")?;
    }
    out.flush().await.context("Cannot write to stdout")?;
    Ok(())
}
