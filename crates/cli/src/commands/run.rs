//! `vmfactory run`: a command in a fresh VM, as `docker run` runs one in a fresh container;
//! `vmfactory exec`: a command in a VM held by `vmfactory get --hold`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use tracing::warn;
use vmfactory_factory::Factory;
use vmfactory_hypervisor::VmSize;
use vmfactory_net::proxy::{BoundPort, PortSpec};
use vmfactory_persist::{LockMode, Store};
use vmfactory_vm::{
    DiskConfig, DiskFormat, DiskMount, KataAgent, Process, ProcessSpec, Vm, VmState,
};

use super::attach::{attach, terminal_spec, Ended, Signals, Stdio};
use crate::config_file::{FactoryChoice, Settings};
use crate::failure::{CmdResult, Failure};
use crate::lock::RootLock;

/// `--copy SRC:DST`: a host file copied to an absolute guest path before the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyArg {
    /// Host file.
    pub src: PathBuf,
    /// Guest path.
    pub dst: String,
}

/// Parses `SRC:DST`.
pub fn parse_copy(s: &str) -> Result<CopyArg, String> {
    let (src, dst) = s
        .rsplit_once(':')
        .filter(|(src, _)| !src.is_empty())
        .ok_or_else(|| format!("{s:?} is not SRC:DST"))?;
    if !dst.starts_with('/') {
        return Err(format!("{dst:?} is not an absolute guest path"));
    }
    Ok(CopyArg {
        src: src.into(),
        dst: dst.to_owned(),
    })
}

/// `--disk PATH[:ro]:MOUNTPOINT`: an ext4 image (raw or qcow2) mounted in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    /// Host image.
    pub path: PathBuf,
    /// Attached read-only.
    pub read_only: bool,
    /// Guest mount point.
    pub mount_point: String,
}

/// Parses `PATH[:ro]:MOUNTPOINT`.
pub fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let (rest, mount_point) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not PATH[:ro]:MOUNTPOINT"))?;
    let (path, read_only) = match rest.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
    };
    if path.is_empty() {
        return Err(format!("{s:?} names no image"));
    }
    if !mount_point.starts_with('/') || mount_point.trim_matches('/').is_empty() {
        return Err(format!(
            "{mount_point:?} is not an absolute guest path below /"
        ));
    }
    Ok(DiskArg {
        path: path.into(),
        read_only,
        mount_point: mount_point.to_owned(),
    })
}

/// An image's format from its first bytes (qcow2 starts with `QFI\xfb`).
async fn disk_format(path: &std::path::Path) -> std::io::Result<DiskFormat> {
    use tokio::io::AsyncReadExt;
    let mut magic = [0u8; 4];
    let mut f = tokio::fs::File::open(path).await?;
    let n = f.read(&mut magic).await?;
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// Parses `-p [IP:]HOST_PORT:GUEST_PORT`.
pub fn parse_publish(s: &str) -> Result<PortSpec, String> {
    s.parse()
        .map_err(|e: vmfactory_net::NetError| e.to_string())
}

/// Parses `-u UID[:GID]` (the group defaults to the user id, as for numeric users in Docker).
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let num = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{v:?} is not a numeric id"))
    };
    match s.split_once(':') {
        Some((u, g)) => Ok((num(u)?, num(g)?)),
        None => num(s).map(|u| (u, u)),
    }
}

/// Parses `-e K=V`; a bare `K` takes our own value of K, as Docker does.
pub fn parse_env(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((k, _)) if !k.is_empty() => Ok(s.to_owned()),
        Some(_) => Err(format!("{s:?} has no variable name")),
        None => std::env::var(s)
            .map(|v| format!("{s}={v}"))
            .map_err(|_| format!("{s} is not set here (give {s}=VALUE)")),
    }
}

/// What `run` was asked.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// vCPUs.
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory: Option<u64>,
    /// Files to copy in first.
    pub copies: Vec<CopyArg>,
    /// Disks to attach and mount first.
    pub disks: Vec<DiskArg>,
    /// Whether the VM gets a network even if the config gives none.
    pub net: bool,
    /// Host ports to forward to the guest.
    pub publish: Vec<PortSpec>,
    /// The process.
    pub spec: ProcessSpec,
    /// Its stdio.
    pub stdio: Stdio,
}

/// Where `run` takes its VM from: the VM-cache server if one answers, else the template, else a
/// direct boot (with a note when the configuration asks for a faster one that is not there).
async fn factory_for_run(s: &Settings) -> anyhow::Result<Factory> {
    let (factory, choice) = s
        .factory_for_use()
        .await
        .context("Cannot build the factory")?;
    if choice
        == (FactoryChoice::Direct {
            faster_configured: true,
        })
    {
        eprintln!(
            "vmfactory: note: booting a VM from scratch; `vmfactory init` makes the next ones fast"
        );
    }
    Ok(factory)
}

pub use vmfactory_vm::step_took;

/// `vmfactory run`. Returns the command's exit code.
pub async fn run(s: &Settings, req: RunRequest) -> Result<u8, Failure> {
    let t = Instant::now();
    let hv = &s.vm.hypervisor;
    let size = VmSize {
        vcpus: req.vcpus.unwrap_or(hv.vcpus),
        memory_mib: req.memory.unwrap_or(hv.memory_mib),
    };
    hv.check_size(size)
        .map_err(|e| Failure::usage(anyhow!(super::get::size_flag(&e))))?;
    for c in &req.copies {
        let meta = tokio::fs::metadata(&c.src).await;
        if !meta.map(|m| m.is_file()).unwrap_or(false) {
            return Err(Failure::usage(anyhow!(
                "--copy {}: no such host file",
                c.src.display()
            )));
        }
    }
    let mut disks = Vec::new();
    for d in &req.disks {
        let format = disk_format(&d.path).await.map_err(|e| {
            Failure::usage(anyhow::Error::new(e).context(format!("--disk {}", d.path.display())))
        })?;
        let mut config = DiskConfig::new(&d.path, format);
        config.read_only = d.read_only;
        disks.push((config, DiskMount::ext4(&d.mount_point)));
    }
    // Bound before any VM starts: a taken port fails here and leaves nothing.
    let mut ports = Vec::new();
    for p in &req.publish {
        let bound = BoundPort::bind(p.host)
            .await
            .map_err(|e| Failure::usage(anyhow!("--publish {p}: {e}")))?;
        ports.push((bound, p.guest_port));
    }
    let mut with_net;
    let s = if req.net && s.vm.network.is_none() {
        // The template and the VM-cache server's VMs were made without a NIC: a clone of them
        // cannot have one.
        if s.template || s.cache_number > 0 {
            eprintln!(
                "vmfactory: note: --net boots this VM from scratch: the template has no NIC \
                 (set [network] enable = true and run `vmfactory init` again)"
            );
        }
        with_net = s.clone();
        with_net.vm = with_net.vm.with_network(s.network.clone());
        with_net.template = false;
        with_net.cache_number = 0;
        &with_net
    } else {
        s
    };
    s.check_files().await?;
    let mut signals = Signals::install()?;
    let t = step_took("prepare", t);
    let factory = factory_for_run(s).await?;
    let t = step_took("factory", t);
    let root = RootLock::acquire(s, LockMode::Shared).await?;
    let t = step_took("lock", t);
    let mut request = s.vm.clone();
    request.hypervisor.vcpus = size.vcpus;
    request.hypervisor.memory_mib = size.memory_mib;
    let got = factory.get_vm(&request).await;
    let t = step_took("get_vm", t);
    if let Err(e) = factory.close().await {
        warn!(error = %e, "closing the factory");
    }
    let t = step_took("close", t);
    let res = match got.context("Cannot get a VM") {
        Ok(vm) => {
            // Forwarding ends when `_published` drops, before the VM stops.
            let _published: Vec<_> = match vm.network() {
                Some(net) => ports
                    .into_iter()
                    .map(|(bound, guest)| bound.forward(SocketAddr::new(net.address.into(), guest)))
                    .collect(),
                None => Vec::new(),
            };
            let ran = run_in(&vm, req, &disks, &mut signals).await;
            let t = step_took("exec", t);
            let stopped = vm
                .stop()
                .await
                .with_context(|| format!("Cannot stop VM {}", vm.id()));
            step_took("stop", t);
            match (ran, stopped) {
                (Ok(code), Ok(())) => Ok(code),
                (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let t = Instant::now();
    root.release().await;
    step_took("release", t);
    Ok(res?)
}

async fn run_in(
    vm: &Vm,
    mut req: RunRequest,
    disks: &[(DiskConfig, DiskMount)],
    signals: &mut Signals,
) -> anyhow::Result<u8> {
    // Stopping the VM takes the disks with it: no detach on the way out.
    for (disk, mount) in disks {
        vm.attach_disk(disk, mount).await.with_context(|| {
            format!(
                "Cannot attach {} at {}",
                disk.path.display(),
                mount.mount_point
            )
        })?;
    }
    for c in &req.copies {
        vm.copy_in(&c.src, &c.dst)
            .await
            .with_context(|| format!("Cannot copy {} to {}", c.src.display(), c.dst))?;
    }
    terminal_spec(&mut req.spec, &req.stdio);
    let p = vm
        .exec(req.spec.clone())
        .await
        .with_context(|| format!("Cannot start {:?}", req.spec.args))?;
    let ended = attach(p, &req.stdio, signals).await?;
    if matches!(ended, Ended::Abandoned) {
        eprintln!("vmfactory: stopping VM {}", vm.id());
    }
    Ok(ended.code())
}

/// `vmfactory exec ID`: runs in a VM held by another process, through its agent's URL; the
/// VM is left as it was.
pub async fn exec(
    s: &Settings,
    id: &str,
    mut spec: ProcessSpec,
    stdio: Stdio,
) -> Result<u8, Failure> {
    let store = Store::new(&s.vm.run_root);
    let state: VmState = store.load_state(id).await.map_err(|e| match e {
        vmfactory_persist::Error::VmNotFound { .. }
        | vmfactory_persist::Error::InvalidId { .. } => {
            Failure::usage(anyhow!("No VM {id} under {}", s.vm.run_root.display()))
        }
        e => anyhow::Error::new(e)
            .context(format!("Cannot load the state of VM {id}"))
            .into(),
    })?;
    let url = state
        .agent_url()
        .ok_or_else(|| anyhow!("VM {id} is not running"))?;
    let agent = KataAgent::with_config(url, state.config.agent.client_config());
    let mut signals = Signals::install()?;
    terminal_spec(&mut spec, &stdio);
    let p = Process::start(id, Arc::new(agent), spec.clone())
        .await
        .with_context(|| format!("Cannot start {:?} in VM {id}", spec.args))?;
    let ended = attach(p, &stdio, &mut signals).await?;
    Ok(ended.code())
}

/// Adapts a command that has no exit code of its own.
pub fn code_of(r: CmdResult) -> Result<u8, Failure> {
    r.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(
            parse_copy("./a:b:/c").expect("ok"),
            CopyArg {
                src: "./a:b".into(),
                dst: "/c".into()
            }
        );
        assert!(parse_copy("a:rel").is_err());
        assert!(parse_copy(":/x").is_err());
        let d = parse_disk("/i.img:ro:/data").expect("ok");
        assert_eq!(
            (d.path.to_str(), d.read_only, d.mount_point.as_str()),
            (Some("/i.img"), true, "/data")
        );
        assert!(!parse_disk("a:b:/m").expect("ok").read_only);
        assert_eq!(parse_disk("a:b:/m").expect("ok").path.to_str(), Some("a:b"));
        assert!(parse_disk("/i.img:data").is_err());
        assert!(parse_disk(":/m").is_err());
        assert!(parse_disk("/i.img:/").is_err());
        assert_eq!(parse_user("1000").expect("ok"), (1000, 1000));
        assert_eq!(parse_user("1000:100").expect("ok"), (1000, 100));
        assert!(parse_user("bob").is_err());
        assert_eq!(parse_env("A=b=c").expect("ok"), "A=b=c");
        assert!(parse_env("=x").is_err());
        assert!(parse_env("VMFACTORY_SURELY_UNSET_VAR").is_err());
    }
}
