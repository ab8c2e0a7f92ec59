//! `vmfactory get`: a VM sized to the request, printed as JSON; stopped before exit unless
//! `--hold`.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use serde::Serialize;
use tracing::warn;
use vmfactory_factory::{BaseKind, Factory, FactoryConfig, NewFactoryError as FactoryError};
use vmfactory_hypervisor::{ConfigError as HvConfigError, VmSize};
use vmfactory_persist::LockMode;
use vmfactory_vm::Vm;

use super::inspect::is_bad_template;
use crate::config_file::Settings;
use crate::failure::{CmdResult, Failure};
use crate::lock::RootLock;
use crate::progress::Step;

/// What `get` prints.
#[derive(Debug, Serialize)]
pub struct GotVm {
    /// VM id.
    pub id: String,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// Where the agent is reached (`serial://…`, `vsock://…`, `hvsock://…`).
    pub agent_url: String,
    /// The guest console's unix socket.
    pub console_socket: PathBuf,
    /// The VM's run directory (`<run_root>/vm/<id>`).
    pub run_dir: PathBuf,
    /// vCPUs (boot + hot-added).
    pub vcpus: u32,
    /// Memory in MiB (boot + hot-added).
    pub memory_mib: u64,
    /// Where it came from: `direct`, `template` or `cache`.
    pub source: &'static str,
    /// Whether it keeps running after this command (`--hold` until a signal).
    pub held: bool,
    /// How to reach it, when it has a network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<GotNetwork>,
}

/// `get`'s view of a VM's network.
#[derive(Debug, Serialize)]
pub struct GotNetwork {
    /// What the host connects to.
    pub address: std::net::Ipv4Addr,
    /// The guest's own address (the same in every VM).
    pub guest_address: std::net::Ipv4Addr,
    /// The host's address on the VM's link (what the guest reaches the host at).
    pub host_address: std::net::Ipv4Addr,
    /// The host end of the VM's link.
    pub host_link: String,
    /// The VM's network namespace (`nsenter --net=PATH`).
    pub netns: PathBuf,
    /// Whether the guest may reach beyond the host.
    pub egress: bool,
}

impl From<&vmfactory_net::VmNetwork> for GotNetwork {
    fn from(n: &vmfactory_net::VmNetwork) -> Self {
        Self {
            address: n.address,
            guest_address: n.guest_address,
            host_address: n.host_address,
            host_link: n.host_link.clone(),
            netns: n.netns.clone(),
            egress: n.egress,
        }
    }
}

pub async fn run(s: &Settings, vcpus: Option<u32>, memory: Option<u64>, hold: bool) -> CmdResult {
    let hv = &s.vm.hypervisor;
    let vcpus = vcpus.unwrap_or(hv.vcpus);
    let memory = memory.unwrap_or(hv.memory_mib);
    // The library's rule for sizes, checked before anything starts; only its words are ours.
    hv.check_size(VmSize {
        vcpus,
        memory_mib: memory,
    })
    .map_err(|e| Failure::usage(anyhow!(size_flag(&e))))?;
    s.check_files().await?;

    let mut config = FactoryConfig::new(s.vm.clone());
    config.template_path = s.template_path.clone();
    // One VM and the process exits: a QEMU started ahead would only be stopped again.
    config.prestart = 0;
    if s.cache_number > 0 {
        config.cache_endpoint = Some(s.endpoint.clone());
    } else if s.template {
        config.template = true;
        config.fetch_only = true;
    }
    let factory = match Factory::new(&config).await {
        Ok(f) => f,
        Err(e) => {
            // A template whose stored files are damaged is bad input, as for `status` and
            // `inspect`; a missing one or another failure is a runtime failure.
            let bad = matches!(&e, FactoryError::Template(t) if is_bad_template(t));
            let context = if s.cache_number > 0 {
                format!(
                    "No VM-cache server answers on {} (run `vmfactory init`)",
                    s.endpoint.display()
                )
            } else if s.template {
                format!(
                    "No usable template at {} (run `vmfactory init`)",
                    s.template_path.display()
                )
            } else {
                "Cannot build the factory".to_owned()
            };
            let error = anyhow::Error::new(e).context(context);
            return Err(if bad {
                Failure::usage(error)
            } else {
                error.into()
            });
        }
    };
    // Held until the VM is stopped: `destroy` waits for or refuses a running `get`.
    let root = RootLock::acquire(s, LockMode::Shared).await?;
    let res = get_and_show(s, &factory, vcpus, memory, hold).await;
    root.release().await;
    res
}

/// Gets the VM from `factory`, prints it, holds it if asked, and stops it.
async fn get_and_show(
    s: &Settings,
    factory: &Factory,
    vcpus: u32,
    memory: u64,
    hold: bool,
) -> CmdResult {
    let mut request = s.vm.clone();
    request.hypervisor.vcpus = vcpus;
    request.hypervisor.memory_mib = memory;

    let step = Step::start(format!("Getting a VM with {vcpus} vCPUs and {memory} MiB"));
    let got = factory.get_vm(&request).await;
    step.done();
    if let Err(e) = factory.close().await {
        warn!(error = %e, "closing the factory");
    }
    let vm = got.context("Cannot get a VM")?;
    let source = match factory.kind() {
        BaseKind::Direct => "direct",
        BaseKind::Template | BaseKind::FetchedTemplate => "template",
        BaseKind::CacheClient => "cache",
    };
    let shown = show(&vm, source, hold).await;
    let held = match shown {
        // The holder keeps no agent session open while it waits: a virtio-serial port serves
        // one session at a time, and `vmfactory exec` or the user's own client need it.
        Ok(()) if hold => match vm.disconnect().await {
            Ok(()) => wait_for_signal().await,
            Err(e) => Err(anyhow::Error::new(e).context("Cannot free the VM's agent")),
        },
        other => other,
    };
    let stopped = vm
        .stop()
        .await
        .with_context(|| format!("Cannot stop VM {}", vm.id()));
    held?;
    stopped?;
    Ok(())
}

/// What a size the library refused means in the flags' and the configuration's own names.
pub(super) fn size_flag(e: &HvConfigError) -> String {
    match e {
        HvConfigError::VcpusOutOfRange { vcpus, min, max } => format!(
            "--vcpus {vcpus} is outside {min}..={max} (default_vcpus..=default_maxvcpus)"
        ),
        HvConfigError::MemoryOutOfRange {
            memory_mib,
            min,
            max,
        } => format!(
            "--memory {memory_mib} is outside {min}..={max} MiB (default_memory..=default_maxmemory)"
        ),
        HvConfigError::NoMemoryHotplug { memory_mib, .. } => format!(
            "--memory {memory_mib} above default_memory needs memory_slots > 0 (memory hotplug)"
        ),
        other => other.to_string(),
    }
}

async fn show(vm: &Vm, source: &'static str, held: bool) -> anyhow::Result<()> {
    let info = vm.status().await.context("Cannot read the VM's status")?;
    let out = GotVm {
        id: vm.id().to_owned(),
        pid: info.pid.or_else(|| vm.hypervisor().pid()),
        agent_url: vm.agent_url().to_string(),
        console_socket: vm.hypervisor().console_address(),
        run_dir: vm.dir().to_owned(),
        vcpus: info.vcpus,
        memory_mib: info.memory_mib,
        source,
        held,
        network: vm.network().map(GotNetwork::from),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("Cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("Cannot handle SIGINT")?;
    eprintln!("holding the VM; Ctrl-C or SIGTERM stops it");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
