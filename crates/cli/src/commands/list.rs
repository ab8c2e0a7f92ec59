//! `vmfactory list` (alias `ps`): every VM under the run root, with where it came from, its
//! size, its QEMU, its age and the process that owns it. Read-only: no lock is taken (owners
//! are read from `/proc/locks`) and nothing is signalled.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use vmfactory_factory::{error_chain, CacheClient};
use vmfactory_hypervisor::{ProcessKind, ProcessRecord, TemplateRole};
use vmfactory_persist::{Error as PersistError, Store};
use vmfactory_vm::VmState;

use crate::config_file::Settings;
use crate::failure::CmdResult;
use crate::probe::exists;

/// One VM as `list` shows it.
#[derive(Debug, Serialize)]
pub struct Listed {
    /// The VM id.
    pub id: String,
    /// `template` (a clone), `template-save` (the VM a template is being saved from),
    /// `direct` (booted for its request), `cache` (ready in the VM-cache server's pool; a
    /// pooled VM is a clone or a direct VM, as the server's base is), `cache-prestart` (a QEMU
    /// the server started ahead for its next clone) or `starting` (no state stored yet).
    pub source: String,
    /// Recorded vCPUs, if its state is stored yet.
    pub vcpus: Option<u32>,
    /// Recorded memory in MiB.
    pub memory_mib: Option<u64>,
    /// Its QEMU's pid, if recorded and alive.
    pub pid: Option<u32>,
    /// Seconds since its QEMU started.
    pub age_secs: Option<u64>,
    /// The pid of the process that owns it (holds its lock); `None`: an orphan.
    pub owner_pid: Option<u32>,
    /// The owner's command line.
    pub owner: Option<String>,
    /// Why its state cannot be read (being created, or damaged).
    pub error: Option<String>,
}

pub async fn run(s: &Settings, json: bool) -> CmdResult {
    let vms = gather(s).await?;
    if json {
        let text = serde_json::to_string_pretty(&vms).context("Cannot encode the list")?;
        println!("{text}");
    } else {
        print!("{}", table(&vms));
    }
    Ok(())
}

/// Every VM under the run root, sorted by id.
pub async fn gather(s: &Settings) -> anyhow::Result<Vec<Listed>> {
    let store = Store::new(&s.vm.run_root);
    let ids = store
        .list_vms()
        .await
        .with_context(|| format!("Cannot list the VMs under {}", s.vm.run_root.display()))?;
    let server = server_pid(&s.endpoint).await;
    let mut out = Vec::new();
    for id in ids {
        let holders = match store.lock_holders(&id).await {
            Ok(h) => h,
            // Never locked: not a VM (Kata's layout keeps the template among the VMs).
            Err(PersistError::NotFound { .. } | PersistError::VmNotFound { .. }) => continue,
            Err(e) => return Err(anyhow::Error::new(e).context(format!("Cannot read VM {id}"))),
        };
        let owner = holders.first();
        let mut vm = Listed {
            id: id.clone(),
            source: String::new(),
            vcpus: None,
            memory_mib: None,
            pid: None,
            age_secs: None,
            owner_pid: owner.map(|h| h.pid),
            owner: owner.map(|h| h.command.clone()),
            error: None,
        };
        match store.load_state::<VmState>(&id).await {
            Ok(state) => {
                vm.vcpus = Some(state.vcpus);
                vm.memory_mib = Some(state.memory_mib);
                vm.source = match state.config.hypervisor.template {
                    _ if server.is_some() && vm.owner_pid == server => "cache",
                    Some(TemplateRole::CloneFrom(_)) => "template",
                    Some(TemplateRole::SaveTo(_)) => "template-save",
                    None => "direct",
                }
                .to_owned();
                if state.hypervisor.qemu_alive().await {
                    vm.pid = state.hypervisor.pid;
                    if let Some(start) = state.hypervisor.pid_start_time {
                        vm.age_secs = age_of(start).await;
                    }
                }
            }
            // No state yet: a VM being made, or a QEMU pre-started for the next clone
            // (waiting for its template state); its QEMU record says what runs.
            Err(PersistError::NotFound { .. } | PersistError::VmNotFound { .. }) => {
                vm.source = if server.is_some() && vm.owner_pid == server {
                    "cache-prestart"
                } else {
                    "starting"
                }
                .to_owned();
                let dir = store.vm_dir(&id).map_err(anyhow::Error::new)?;
                if let Ok(records) = ProcessRecord::read_all(&dir).await {
                    for r in records.iter().filter(|r| r.kind == ProcessKind::Qemu) {
                        if r.alive().await {
                            vm.pid = Some(r.pid);
                            vm.age_secs = age_of(r.start_time).await;
                        }
                    }
                }
            }
            Err(e) => {
                vm.source = "-".to_owned();
                vm.error = Some(error_chain(&e));
            }
        }
        out.push(vm);
    }
    Ok(out)
}

/// The VM-cache server's pid, if one answers on `endpoint`.
async fn server_pid(endpoint: &Path) -> Option<u32> {
    if !exists(endpoint).await {
        return None;
    }
    let client = CacheClient::connect(endpoint).await.ok()?;
    client.server_status().await.ok().map(|st| st.pid)
}

/// Seconds since a process started at `start` (clock ticks after boot, `/proc/PID/stat`).
async fn age_of(start: u64) -> Option<u64> {
    let uptime = tokio::fs::read_to_string("/proc/uptime").await.ok()?;
    let uptime: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)?;
    // Whole seconds are all a listing needs.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let up = uptime as u64;
    Some(up.saturating_sub(start / ticks))
}

fn table(vms: &[Listed]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<13}  {:>5}  {:>9}  {:>8}  {:>7}  OWNER",
        "ID", "SOURCE", "VCPUS", "MEMORY", "PID", "AGE"
    );
    for vm in vms {
        let dash = || "-".to_owned();
        let vcpus = vm.vcpus.map_or_else(dash, |v| v.to_string());
        let memory = vm.memory_mib.map_or_else(dash, |m| format!("{m} MiB"));
        let pid = vm.pid.map_or_else(dash, |p| p.to_string());
        let age = vm.age_secs.map_or_else(dash, super::status::span);
        let owner = match (vm.owner_pid, &vm.owner) {
            (Some(pid), Some(cmd)) if !cmd.is_empty() => format!("{pid} {cmd}"),
            (Some(pid), _) => pid.to_string(),
            (None, _) => "none (orphan: `vmfactory destroy` ends it)".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<13}  {vcpus:>5}  {memory:>9}  {pid:>8}  {age:>7}  {owner}",
            vm.id, vm.source
        );
        if let Some(e) = &vm.error {
            let _ = writeln!(out, "  state unreadable: {e}");
        }
    }
    out
}
