//! What a killed `init`, `get` or VM-cache server leaves: VMs no process owns any more
//! (orphans) and a template tmpfs no one owns (a stale mount). `status` shows them; `init`
//! first ends the orphans it can prove are ours (by the pid and start time each one's record
//! names) and, for what it cannot prove, names the command that removes it.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use serde::Serialize;
use tracing::debug;
use vmfactory_factory::{error_chain, SystemHost, TemplateFactory, TemplateHost};
use vmfactory_persist::{Error as PersistError, Store};
use vmfactory_vm::{Orphan, ProcessKind, TemplateRole, Vm, VmState};

use crate::config_file::Settings;
use crate::failure::CmdResult;
use crate::probe::exists;

/// The leftovers part of `status`.
#[derive(Debug, Serialize)]
pub struct LeftoversReport {
    /// VMs under `run_root` that no process owns.
    pub orphaned_vms: Vec<Orphan>,
    /// A tmpfs at `template_path` that no one owns any more.
    pub stale_mount: Option<StaleMount>,
    /// The command that removes them, when there are any.
    pub remedy: Option<String>,
    /// Why the VMs could not be listed.
    pub error: Option<String>,
}

/// A tmpfs at the template path that no one owns any more.
#[derive(Debug, Serialize)]
pub struct StaleMount {
    /// The mount point (`[factory] template_path`).
    pub path: PathBuf,
    /// Why it is stale.
    pub reason: StaleReason,
}

/// Why a template tmpfs is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StaleReason {
    /// It holds no usable template for this configuration (a creation killed half-way).
    NoUsableTemplate,
    /// Its template is usable, but the VM-cache server that made or adopted it (and would
    /// have removed it on exit) is gone. The next `init` adopts it.
    ServerGone,
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NoUsableTemplate => "it holds no usable template",
            Self::ServerGone => "the VM-cache server that served its template is gone",
        })
    }
}

/// A VM that failed to come up, whose logs are kept under `<run_root>/failed/<id>/` until
/// `vmfactory destroy` (the newest `vmfactory_vm::KEEP_FAILED` of them).
#[derive(Debug, Clone, Serialize)]
pub struct FailedVmLogs {
    /// The VM id.
    pub id: String,
    /// Its console log, `<run_root>/failed/<id>/console.log`.
    pub console_log: PathBuf,
}

/// The VMs that failed to come up and whose logs are kept, newest first. For `logs` and for
/// `status` to list.
pub async fn failed_vms(s: &Settings) -> std::io::Result<Vec<FailedVmLogs>> {
    Ok(vmfactory_vm::list_failed(&s.vm.run_root)
        .await?
        .into_iter()
        .map(|f| FailedVmLogs {
            console_log: f.dir.join("console.log"),
            id: f.id,
        })
        .collect())
}

/// Looks for leftovers without changing anything. `server_running`: a VM-cache server answers
/// on the configured endpoint.
pub async fn find(s: &Settings, server_running: bool) -> LeftoversReport {
    let (orphaned_vms, error) = match Vm::orphans(&s.vm.run_root).await {
        Ok(orphans) => (orphans, None),
        Err(e) => (Vec::new(), Some(error_chain(&e))),
    };
    let stale_mount = stale_mount(s, server_running).await;
    let remedy = (!orphaned_vms.is_empty() || stale_mount.is_some()).then(|| command(s, "destroy"));
    LeftoversReport {
        orphaned_vms,
        stale_mount,
        remedy,
        error,
    }
}

/// The table lines of `report` (none when there is nothing).
pub fn table(report: &LeftoversReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(e) = &report.error {
        let _ = writeln!(out, "orphaned VMs:  cannot list: {e}");
    }
    if !report.orphaned_vms.is_empty() {
        let _ = writeln!(
            out,
            "orphaned VMs:  {} with no live owner",
            report.orphaned_vms.len()
        );
        let _ = writeln!(out, "  {:<36}  {:>8}  PROCESSES", "ID", "QEMU PID");
        for vm in &report.orphaned_vms {
            let running: Vec<&str> = vm
                .processes
                .iter()
                .filter(|p| p.alive)
                .map(|p| p.record.kind.label())
                .collect();
            let state = match (&vm.error, vm.processes.is_empty()) {
                (Some(e), _) => format!("unreadable record: {e}"),
                (None, true) => "never ran a process".to_owned(),
                (None, false) if running.is_empty() => "its processes exited".to_owned(),
                (None, false) => format!("{} running", running.join(" and ")),
            };
            let pid = vm
                .processes
                .iter()
                .find(|p| p.record.kind == ProcessKind::Qemu)
                .map_or_else(|| "-".to_owned(), |p| p.record.pid.to_string());
            let _ = writeln!(out, "  {:<36}  {pid:>8}  {state}", vm.id);
        }
    }
    if let Some(m) = &report.stale_mount {
        let _ = writeln!(
            out,
            "stale mount:   {}: tmpfs, {}",
            m.path.display(),
            m.reason
        );
    }
    if let Some(remedy) = &report.remedy {
        let _ = writeln!(out, "  remove with: {remedy}");
    }
    out
}

/// What `init` does first: ends the VMs no process owns whose records prove what they ran
/// (and removes those that never ran one), warns about the others with the command to look
/// at each, and refuses to go on over a stale template tmpfs, naming the command that
/// removes it.
pub async fn recover(s: &Settings) -> CmdResult {
    let root = &s.vm.run_root;
    if exists(&root.join("vm")).await {
        match Vm::reap_orphans(root).await {
            Ok(reaped) if !reaped.is_empty() => println!(
                "reaped {} orphaned VM(s) under {} (their owner had died)",
                reaped.len(),
                root.display()
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "vmfactory: cannot reap orphaned VMs under {}: {}",
                root.display(),
                error_chain(&e)
            ),
        }
        // What is left could not be proved or ended: named, never guessed at.
        for vm in Vm::orphans(root).await.unwrap_or_default() {
            let why = vm
                .error
                .as_deref()
                .unwrap_or("its recorded processes would not end");
            let look = command(s, &format!("inspect vm {}", vm.id));
            eprintln!(
                "vmfactory: left VM {} ({why}); look with `{look}`, then remove {}",
                vm.id,
                vm.dir.display(),
            );
        }
    }
    if !s.template {
        return Ok(());
    }
    // The server check came first: no live server answers here.
    match stale_mount(s, false).await {
        Some(m) if m.reason == StaleReason::NoUsableTemplate => Err(anyhow!(
            "A tmpfs at {} is left from a killed vmfactory ({}); remove it with `{}`, then run init again",
            m.path.display(),
            m.reason,
            command(s, "destroy")
        )
        .into()),
        Some(m) => {
            println!(
                "adopting the template at {} ({})",
                m.path.display(),
                m.reason
            );
            Ok(())
        }
        None => Ok(()),
    }
}

/// The tmpfs at the template path, if no one owns it any more: it holds no usable template
/// (or, with a VM-cache server configured, no server serves it, and that server made or
/// adopted it), and no live VM is saving a template into it.
async fn stale_mount(s: &Settings, server_running: bool) -> Option<StaleMount> {
    let path = &s.template_path;
    match SystemHost.mount_type(path).await {
        Ok(Some(fs)) if fs == "tmpfs" => {}
        _ => return None,
    }
    let usable = TemplateFactory::fetch(&s.vm, path).await;
    if let Err(e) = &usable {
        debug!(error = %error_chain(e), "template not usable");
    }
    let reason = match (usable.is_ok(), s.cache_number > 0) {
        (false, _) => StaleReason::NoUsableTemplate,
        (true, true) if !server_running => StaleReason::ServerGone,
        (true, _) => return None,
    };
    if template_being_made(&s.vm.run_root, path).await {
        return None;
    }
    Some(StaleMount {
        path: path.clone(),
        reason,
    })
}

/// Whether a VM owned by a live process is saving a template into `template_path`, or might
/// be (owned, with no record yet).
async fn template_being_made(run_root: &Path, template_path: &Path) -> bool {
    let store = Store::new(run_root);
    for id in store.list_vms().await.unwrap_or_default() {
        if !matches!(store.is_locked(&id).await, Ok(true)) {
            continue;
        }
        match store.load_state::<VmState>(&id).await {
            Ok(state) => {
                if let Some(TemplateRole::SaveTo(paths)) = &state.config.hypervisor.template {
                    if paths.memory.parent() == Some(template_path) {
                        return true;
                    }
                }
            }
            Err(PersistError::NotFound { .. }) => return true,
            Err(_) => {}
        }
    }
    false
}

/// `vmfactory [--config FILE] ARGS`, as the user runs it with this configuration.
fn command(s: &Settings, args: &str) -> String {
    if s.origin == "embedded default" {
        return format!("vmfactory {args}");
    }
    let safe = s
        .origin
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:=@".contains(&b));
    if safe {
        format!("vmfactory --config {} {args}", s.origin)
    } else {
        format!(
            "vmfactory --config '{}' {args}",
            s.origin.replace('\'', r"'\''")
        )
    }
}
