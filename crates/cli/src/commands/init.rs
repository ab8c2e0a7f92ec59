//! `vmfactory init`: make the template and/or run the VM-cache server (Kata's
//! `kata-runtime factory init`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use sd_notify::NotifyState;
use tracing::warn;
use vmfactory_factory::{
    CacheClient, CacheFactory, CacheServer, DirectFactory, FactoryBase, GetVmSource, Metrics,
    MetricsServer, SystemHost, TemplateFactory, TemplateHost as _,
};
use vmfactory_persist::LockMode;

use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};
use crate::lock::RootLock;
use crate::progress::Step;

/// How often the fill progress asks the pool for its size.
const FILL_POLL: Duration = Duration::from_millis(200);

pub async fn run(s: &Settings) -> CmdResult {
    if !s.template && s.cache_number == 0 {
        return Err(Failure::usage(anyhow!(
            "Nothing to initialise: {} has [factory] enable_template = false and vm_cache_number = 0 \
             (a direct factory needs no init)",
            s.origin
        )));
    }
    s.check_files().await?;
    // Held for the whole run, serving included: `destroy` stops the server first.
    let root = RootLock::acquire(s, LockMode::Shared).await?;
    let res = make_and_serve(s).await;
    root.release().await;
    res
}

/// Makes the template and/or runs the VM-cache server until it stops, with its metrics
/// endpoint (if configured) up from before the template is made, so that a taken address
/// fails at once, to after the server stopped.
async fn make_and_serve(s: &Settings) -> CmdResult {
    let address = s.metrics_address()?;
    if s.cache_number > 0 {
        if let Ok(client) = CacheClient::connect(&s.endpoint).await {
            let pid = client.server_status().await.map(|st| st.pid).unwrap_or(0);
            return Err(anyhow!(
                "A VM-cache server (pid {pid}) already serves {}; stop it with `vmfactory destroy`",
                s.endpoint.display()
            )
            .into());
        }
    }
    let address = match address {
        Some(a) if s.cache_number == 0 => {
            warn!(address = %a, "metrics_address is set, but init without a VM cache exits at once: no metrics endpoint");
            None
        }
        other => other,
    };
    let Some(address) = address else {
        return make_and_serve_with(s, None).await;
    };
    let metrics = Arc::new(Metrics::new());
    let mut endpoint = MetricsServer::start(&address, metrics.clone())
        .await
        .with_context(|| format!("Cannot serve metrics on {address}"))?;
    println!("metrics: {} (GET /metrics)", endpoint.address());
    let res = make_and_serve_with(s, Some(metrics)).await;
    let stopped = endpoint.shutdown().await;
    res?;
    stopped
        .with_context(|| format!("Cannot stop serving metrics on {address}"))
        .map_err(Failure::from)
}

/// [`make_and_serve`] after the metrics endpoint started, recording in `metrics`.
async fn make_and_serve_with(s: &Settings, metrics: Option<Arc<Metrics>>) -> CmdResult {
    super::leftovers::recover(s).await?;
    // `auto` resolved once per host, kept in the run root: every VM this process boots takes
    // that answer (a template pins it; a direct VM's QEMU asks the process).
    SystemHost
        .resolve_accel(&s.vm.hypervisor, &s.vm.run_root)
        .await;

    let template = if s.template {
        notify(&[NotifyState::Status("creating the template")]);
        let step = Step::start(format!(
            "Creating the template at {}",
            s.template_path.display()
        ));
        let t = TemplateFactory::new(&s.vm, &s.template_path)
            .await
            .with_context(|| {
                format!(
                    "Cannot create the template at {}",
                    s.template_path.display()
                )
            })?;
        let took = step.done();
        let size = t
            .metadata()
            .await
            .map(|m| m.memory_mib)
            .unwrap_or(s.vm.hypervisor.memory_mib);
        println!(
            "template: {} ({size} MiB guest, ready in {:.1} s)",
            s.template_path.display(),
            took.as_secs_f64()
        );
        Some(t)
    } else {
        None
    };
    if s.cache_number == 0 {
        // The template outlives this process; `vmfactory destroy` removes it.
        if let Some(t) = template {
            t.keep().await;
        }
        return Ok(());
    }

    let (inner, miss): (Arc<dyn FactoryBase>, _) = match template {
        Some(t) => {
            // The server lives on: its refills get QEMUs started ahead.
            t.prestart(s.prestart as usize).await;
            if let (Some(m), Ok(meta)) = (&metrics, t.metadata().await) {
                m.set_template_created(meta.created_at_secs);
            }
            (Arc::new(t), GetVmSource::Template)
        }
        None => (
            Arc::new(DirectFactory::new(s.vm.clone())),
            GetVmSource::Direct,
        ),
    };
    let base: Arc<dyn FactoryBase> = match metrics {
        Some(m) => {
            m.watch_base(&inner);
            Arc::new(CacheFactory::with_metrics(s.cache_number, inner, miss, m))
        }
        None => Arc::new(CacheFactory::new(s.cache_number, inner)),
    };
    let step = Step::start(format!(
        "Starting the VM-cache server on {}",
        s.endpoint.display()
    ));
    let server = match CacheServer::start(base.clone(), &s.endpoint).await {
        Ok(server) => server,
        Err(e) => {
            // Stops the cache workers and removes the template made above.
            if let Err(close) = base.close().await {
                warn!(error = %close, "cleaning up after a failed server start");
            }
            return Err(anyhow::Error::new(e)
                .context(format!(
                    "Cannot start the VM-cache server on {}",
                    s.endpoint.display()
                ))
                .into());
        }
    };
    let want = usize::try_from(s.cache_number).unwrap_or(usize::MAX);
    let run = server.run_until_signal();
    tokio::pin!(run);
    let early = tokio::select! {
        res = &mut run => Some(res),
        () = fill(&base, want, &step) => None,
    };
    let took = step.done();
    if let Some(res) = early {
        return res
            .context("The VM-cache server stopped")
            .map_err(Failure::from);
    }
    println!(
        "VM-cache server: pid {}, socket {}, {want} VMs ready in {:.1} s (Ctrl-C, SIGTERM or `vmfactory destroy` stops it)",
        std::process::id(),
        s.endpoint.display(),
        took.as_secs_f64()
    );
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!(
            "serving {} with {want} VMs ready",
            s.endpoint.display()
        )),
    ]);
    let res = run.await;
    notify(&[NotifyState::Stopping]);
    res.context("The VM-cache server stopped with an error")
        .map_err(Failure::from)
}

/// Tells systemd (a `Type=notify` unit) how `init` is doing; a no-op outside systemd
/// (`NOTIFY_SOCKET` unset). One datagram on a local socket: it does not block.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Shows the pool filling up; returns once it holds `want` VMs.
async fn fill(base: &Arc<dyn FactoryBase>, want: usize, step: &Step) {
    let mut told = usize::MAX;
    loop {
        let have = base.status().await.len();
        step.set(format!("Filling the VM cache: {have}/{want} VMs ready"));
        if have != told {
            notify(&[NotifyState::Status(&format!(
                "filling the VM cache: {have}/{want} VMs ready"
            ))]);
            told = have;
        }
        if have >= want {
            return;
        }
        tokio::time::sleep(FILL_POLL).await;
    }
}
