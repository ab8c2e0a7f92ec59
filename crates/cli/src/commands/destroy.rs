//! `vmfactory destroy`: stop the VM-cache server, stop VMs no process owns any more, remove
//! the logs of VMs that failed to come up, a killed `init`'s metrics socket, and the template
//! (Kata's `kata-runtime factory destroy`). Idempotent: with nothing there it succeeds.

use std::os::unix::fs::FileTypeExt;
use std::time::Duration;

use anyhow::{anyhow, Context};
use vmfactory_factory::{
    probe_socket, CacheClient, MetricsAddress, SocketPath, SystemHost, TemplateFactory,
    METADATA_FILE,
};
use vmfactory_persist::LockMode;

use crate::config_file::Settings;
use crate::failure::CmdResult;
use crate::lock::RootLock;
use crate::probe::{exists, process_alive, wait_until};
use crate::progress::Step;

/// Bound on the server stopping after `Quit` (it stops its cached VMs first).
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub async fn run(s: &Settings) -> CmdResult {
    let mut done = Vec::new();
    if exists(&s.endpoint).await {
        match CacheClient::connect(&s.endpoint).await {
            Ok(client) => {
                let pid = client.server_status().await.ok().map(|st| st.pid);
                let step = Step::start("Stopping the VM-cache server");
                client.quit().await.with_context(|| {
                    format!(
                        "Cannot stop the VM-cache server on {}",
                        s.endpoint.display()
                    )
                })?;
                let endpoint = s.endpoint.clone();
                let stopped = wait_until(STOP_TIMEOUT, || {
                    !endpoint.exists() && !matches!(pid, Some(p) if process_alive(p))
                })
                .await;
                step.done();
                if !stopped {
                    return Err(anyhow!(
                        "The VM-cache server on {} did not stop within {STOP_TIMEOUT:?}",
                        s.endpoint.display()
                    )
                    .into());
                }
                let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                done.push(format!(
                    "stopped the VM-cache server{pid} on {}",
                    s.endpoint.display()
                ));
            }
            Err(_) => {
                let meta = tokio::fs::symlink_metadata(&s.endpoint)
                    .await
                    .with_context(|| format!("Cannot inspect {}", s.endpoint.display()))?;
                if !meta.file_type().is_socket() {
                    return Err(anyhow!(
                        "{} is not a socket; not removing it (check [factory] vm_cache_endpoint)",
                        s.endpoint.display()
                    )
                    .into());
                }
                tokio::fs::remove_file(&s.endpoint).await.with_context(|| {
                    format!("Cannot remove the stale socket {}", s.endpoint.display())
                })?;
                done.push(format!("removed the stale socket {}", s.endpoint.display()));
            }
        }
    }
    // A killed `init` leaves its metrics socket: removed once nobody answers on it.
    if let Ok(Some(MetricsAddress::Unix(path))) = s.metrics_address() {
        if probe_socket(&path).await.ok() == Some(SocketPath::Stale) {
            tokio::fs::remove_file(&path).await.with_context(|| {
                format!("Cannot remove the stale metrics socket {}", path.display())
            })?;
            done.push(format!(
                "removed the stale metrics socket {}",
                path.display()
            ));
        }
    }
    // Nothing below runs under another command: the run root is ours alone from here.
    let root_lock = if exists(&s.vm.run_root).await {
        Some(RootLock::acquire(s, LockMode::Exclusive).await?)
    } else {
        None
    };
    // VMs no process owns any more (a server that died with VMs in its pool or in flight):
    // stopped and removed.
    if exists(&s.vm.run_root.join("vm")).await {
        let reaped = vmfactory_vm::Vm::reap_orphans(&s.vm.run_root)
            .await
            .with_context(|| {
                format!("Cannot reap orphaned VMs under {}", s.vm.run_root.display())
            })?;
        if !reaped.is_empty() {
            done.push(format!("stopped {} orphaned VM(s)", reaped.len()));
        }
    }
    // The logs of VMs that failed to come up.
    let failed = vmfactory_vm::remove_failed(&s.vm.run_root)
        .await
        .with_context(|| {
            format!(
                "Cannot remove {}",
                vmfactory_vm::failed_root(&s.vm.run_root).display()
            )
        })?;
    if failed > 0 {
        done.push(format!(
            "removed the console logs of {failed} VM(s) that failed to come up ({})",
            vmfactory_vm::failed_root(&s.vm.run_root).display()
        ));
    }
    // The containerd shim's rootfs images (those no container uses).
    let cache = vmfactory_shim::RootfsCache::new(vmfactory_shim::RootfsConfig::new(&s.vm.run_root));
    let dir = cache.dir().to_path_buf();
    if exists(&dir).await {
        let kept = tokio::task::spawn_blocking(move || cache.clear())
            .await
            .map_err(|e| anyhow!("Cannot clear {}: {e}", dir.display()))?;
        done.push(match kept {
            0 => format!("removed the containers' rootfs images ({})", dir.display()),
            n => format!(
                "removed the unused rootfs images; {n} in use kept ({})",
                dir.display()
            ),
        });
    }
    // The host's VM network table, once no VM's link is left on the host (VMs of other run
    // roots keep it).
    match vmfactory_net::remove_host_rules_if_unused().await {
        Ok(true) => done.push(format!(
            "removed the host's VM network rules (nft table inet {})",
            vmfactory_net::HOST_TABLE
        )),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "no VM network rules to remove"),
    }
    // The server removes a template it made when it stops; what is left is removed here.
    if exists(&s.template_path).await {
        let had_template = exists(&s.template_path.join(METADATA_FILE)).await;
        let step = Step::start(format!(
            "Removing the template at {}",
            s.template_path.display()
        ));
        TemplateFactory::destroy(&s.template_path, &SystemHost)
            .await
            .with_context(|| {
                format!(
                    "Cannot remove the template at {}",
                    s.template_path.display()
                )
            })?;
        step.done();
        if had_template {
            done.push(format!(
                "removed the template at {}",
                s.template_path.display()
            ));
        } else if exists(&s.template_path).await {
            done.push(format!(
                "left {} (it holds files that are not a template's)",
                s.template_path.display()
            ));
        } else {
            done.push(format!(
                "removed the empty template directory {}",
                s.template_path.display()
            ));
        }
    }
    if let Some(lock) = root_lock {
        lock.remove().await?;
    }
    if done.is_empty() {
        println!("nothing to destroy");
    }
    for line in done {
        println!("{line}");
    }
    Ok(())
}
