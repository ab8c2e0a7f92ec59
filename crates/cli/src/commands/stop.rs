//! `vmfactory stop ID`: stops one VM. A VM is owned by the process holding its lock: a
//! `get --hold` or `run` is asked to stop it with SIGTERM (a second SIGTERM makes `run` stop
//! its VM even while the command runs), and an orphan is ended here from its records. The
//! VM-cache server's VMs are left to `vmfactory destroy`, and a process that is not a
//! vmfactory command is never signalled.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vmfactory_factory::CacheClient;
use vmfactory_persist::{validate_id, Error as PersistError, Holder, Store};
use vmfactory_vm::Vm;

use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};
use crate::probe::exists;

/// How long the owner gets after each SIGTERM before the next step.
const GRACE: Duration = Duration::from_secs(10);
/// How often the VM's directory is looked at while its owner stops it.
const POLL: Duration = Duration::from_millis(100);

pub async fn run(s: &Settings, id: &str) -> CmdResult {
    let root = &s.vm.run_root;
    let missing = || {
        Failure::usage(anyhow!(
            "No VM {id} under {} (see `vmfactory list`)",
            root.display()
        ))
    };
    validate_id(id).map_err(|_| missing())?;
    let store = Store::new(root);
    let holders = match store.lock_holders(id).await {
        Ok(h) => h,
        Err(PersistError::NotFound { .. } | PersistError::VmNotFound { .. }) => {
            return Err(missing())
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("Cannot read VM {id}"))
                .into())
        }
    };
    let Some(owner) = holders.into_iter().next() else {
        if Vm::reap_orphan(root, id)
            .await
            .with_context(|| format!("Cannot end VM {id}"))?
        {
            println!("{id}: stopped (no process owned it)");
            return Ok(());
        }
        return Err(anyhow!("VM {id} was taken over while being stopped; try again").into());
    };
    check_owner(s, id, &owner).await?;
    let pid =
        Pid::from_raw(i32::try_from(owner.pid).map_err(|_| anyhow!("Bad pid {}", owner.pid))?);
    let dir = store.vm_dir(id).map_err(|_| missing())?;
    for attempt in 0..2 {
        match kill(pid, Signal::SIGTERM) {
            Ok(()) => {}
            // Gone already: what it left is an orphan now, ended below.
            Err(nix::errno::Errno::ESRCH) => break,
            Err(e) => {
                return Err(
                    anyhow!("Cannot signal pid {} (owner of VM {id}): {e}", owner.pid).into(),
                )
            }
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if !exists(&dir).await {
                println!("{id}: stopped (by its owner, pid {})", owner.pid);
                return Ok(());
            }
            if !alive(pid).await {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::debug!(vm = %id, attempt, "owner still holds the VM after SIGTERM");
    }
    if !alive(pid).await
        && Vm::reap_orphan(root, id)
            .await
            .with_context(|| format!("Cannot end VM {id}"))?
    {
        println!(
            "{id}: stopped (its owner, pid {}, exited without stopping it)",
            owner.pid
        );
        return Ok(());
    }
    if !exists(&dir).await {
        println!("{id}: stopped (by its owner, pid {})", owner.pid);
        return Ok(());
    }
    Err(anyhow!(
        "VM {id} is still running {}s after two SIGTERMs to its owner, pid {} ({})",
        2 * GRACE.as_secs(),
        owner.pid,
        owner.command
    )
    .into())
}

/// Refuses owners `stop` must not signal: the VM-cache server and non-vmfactory processes.
async fn check_owner(s: &Settings, id: &str, owner: &Holder) -> CmdResult {
    if exists(&s.endpoint).await {
        if let Ok(client) = CacheClient::connect(&s.endpoint).await {
            if client.server_status().await.map(|st| st.pid).ok() == Some(owner.pid) {
                return Err(Failure::usage(anyhow!(
                    "VM {id} is ready in the VM-cache server's pool (pid {}); `vmfactory destroy` stops the server and its VMs",
                    owner.pid
                )));
            }
        }
    }
    let comm = tokio::fs::read_to_string(format!("/proc/{}/comm", owner.pid))
        .await
        .unwrap_or_default();
    if comm.trim() != "vmfactory" {
        return Err(Failure::usage(anyhow!(
            "VM {id} is owned by pid {} ({}), not a vmfactory command: stop it there",
            owner.pid,
            if owner.command.is_empty() {
                comm.trim()
            } else {
                &owner.command
            }
        )));
    }
    Ok(())
}

/// Whether `pid` still runs (a zombie counts as gone: its locks are released).
async fn alive(pid: Pid) -> bool {
    if kill(pid, None).is_err() {
        return false;
    }
    let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .unwrap_or_default();
    // The state follows the command name in parentheses; `Z` is a zombie.
    !stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'))
}
