//! Booting real VMs: configs, boot-to-ready, templates and clones, driven only through the
//! public APIs of `vmfactory-hypervisor`, `vmfactory-agent` and `vmfactory-proxy`. Shared by the e2e tests and by
//! `cargo xtask bench`, so every operation returns an error instead of panicking.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use vmfactory_agent::{Agent, AgentConfig, HealthStatus, KataAgent};
use vmfactory_hypervisor::{
    Accel, AgentChannel, Hypervisor, HypervisorConfig, Qemu, TemplatePaths, TemplateRole,
};
use vmfactory_proxy::{BuiltinProxy, Proxy as _};

use crate::GuestEnv;

/// Bound on a cold boot until the agent answers (TCG boots take ~2 s; CI hosts are slower).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-call agent timeout.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The console line the guest agent prints each time it (re)opens the serial port.
pub const LISTENING_LINE: &str = "vmfactory-agent: listening on agent.channel.0";

/// What a guest kernel prints when it is in trouble.
pub const KERNEL_TROUBLE: &[&str] = &[
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched self-detected",
    "Kernel panic",
    "BUG:",
];

/// A guest config: 1 vCPU (up to 4), 256 MiB (2 slots, up to 1 GiB), virtio-serial agent.
pub fn config(env: &GuestEnv) -> HypervisorConfig {
    let mut cfg = HypervisorConfig::new(&env.kernel, Some(env.initrd.clone()));
    cfg.qemu_path = env.qemu.clone();
    cfg.accel = Accel::Auto;
    cfg.cpu_model = crate::cpu_model();
    cfg.vcpus = 1;
    cfg.max_vcpus = 4;
    cfg.memory_mib = 256;
    cfg.memory_slots = 2;
    cfg.max_memory_mib = 1024;
    cfg
}

/// A VM config around `hv` with the agent's default timeouts [`crate::scaled`].
pub fn vm_config(hv: HypervisorConfig) -> vmfactory_vm::VmConfig {
    let mut cfg = vmfactory_vm::VmConfig::new(hv);
    cfg.agent.dial_timeout = crate::scaled(cfg.agent.dial_timeout);
    cfg.agent.call_timeout = crate::scaled(cfg.agent.call_timeout);
    cfg.agent.ready_timeout = crate::scaled(cfg.agent.ready_timeout);
    cfg
}

/// Template side of `cfg`: RAM in `dir/memory`, device state in `dir/state`.
pub fn template_config(mut cfg: HypervisorConfig, dir: &Path) -> HypervisorConfig {
    cfg.template = Some(TemplateRole::SaveTo(TemplatePaths {
        memory: dir.join("memory"),
        state: dir.join("state"),
    }));
    cfg
}

/// A template directory `<root>/tpl`, created, and the config of a template saved there.
pub fn template_in(env: &GuestEnv, root: &Path) -> (PathBuf, HypervisorConfig) {
    let dir = root.join("tpl");
    if let Err(e) = std::fs::create_dir(&dir) {
        panic!("creating {}: {e}", dir.display());
    }
    let cfg = template_config(config(env), &dir);
    (dir, cfg)
}

/// Clone side of a template config.
pub fn clone_config(template: &HypervisorConfig) -> HypervisorConfig {
    let mut cfg = template.clone();
    if let Some(role) = cfg.template.take() {
        cfg.template = Some(TemplateRole::CloneFrom(role.paths().clone()));
    }
    cfg
}

/// vhost-vsock variant of `cfg`: a guest CID allocated at each start (templates too).
pub fn vsock_config(mut cfg: HypervisorConfig) -> HypervisorConfig {
    cfg.agent_channel = AgentChannel::Vsock { guest_cid: None };
    cfg
}

/// Hybrid-vsock variant of `cfg` (direct VMs only).
pub fn hybrid_vsock_config(mut cfg: HypervisorConfig, backend: PathBuf) -> HypervisorConfig {
    cfg.agent_channel = AgentChannel::HybridVsock {
        backend,
        guest_cid: 3,
    };
    cfg
}

/// A started VM, a client of its agent, and the console proxy writing its console log (as a
/// `vmfactory_vm::Vm`'s does; QEMU itself writes none).
#[derive(Debug)]
pub struct TestVm {
    /// The VM.
    pub vm: Arc<Qemu>,
    /// Its agent.
    pub agent: KataAgent,
    /// Its console proxy (its task ends when this is dropped).
    pub proxy: BuiltinProxy,
}

impl TestVm {
    /// Spawns QEMU for `cfg` in `root/<id>` without waiting for the guest.
    pub async fn start(root: &Path, id: &str, cfg: HypervisorConfig) -> Result<Self> {
        let vm = Arc::new(Qemu::new(id, cfg, root.join(id))?);
        vm.start()
            .await
            .with_context(|| format!("Cannot start VM {id}"))?;
        let Some(endpoint) = vm.agent_endpoint() else {
            let _ = vm.stop().await;
            bail!("VM {id} runs without an agent endpoint");
        };
        let proxy = BuiltinProxy::default();
        if let Err(e) = proxy
            .start(id, &vm.console_address(), Some(&vm.console_log_path()))
            .await
        {
            let _ = vm.stop().await;
            return Err(e).with_context(|| format!("Cannot start the console proxy of VM {id}"));
        }
        let agent = KataAgent::with_config(
            vmfactory_vm::agent_url(&endpoint),
            AgentConfig::new(crate::scaled(CALL_TIMEOUT), crate::scaled(CALL_TIMEOUT)),
        );
        Ok(Self { vm, agent, proxy })
    }

    /// Boots `cfg` and waits until the agent answers `Check`; returns the VM and the time.
    pub async fn boot(root: &Path, id: &str, cfg: HypervisorConfig) -> Result<(Self, Duration)> {
        let t0 = Instant::now();
        let vm = Self::start(root, id, cfg).await?;
        if let Err(e) = vm.wait_ready().await {
            let _ = vm.vm.stop().await;
            return Err(e);
        }
        Ok((vm, t0.elapsed()))
    }

    /// Polls `Check` until it answers SERVING (dialing retries inside the client).
    pub async fn wait_ready(&self) -> Result<()> {
        let bound = crate::scaled(BOOT_TIMEOUT);
        let deadline = Instant::now() + bound;
        loop {
            match self.agent.check().await {
                Ok(HealthStatus::Serving) => return Ok(()),
                other if Instant::now() >= deadline => bail!(
                    "Agent of {} not ready after {bound:?}: {other:?}\nconsole:\n{}",
                    self.vm.id(),
                    self.console()
                ),
                // Dialing already backs off; this only keeps a fast-failing call from spinning.
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// The guest console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.vm.console_log_path()).unwrap_or_default()
    }

    /// How many times the console shows `line`.
    pub fn console_count(&self, line: &str) -> usize {
        self.console().lines().filter(|l| l.contains(line)).count()
    }

    /// Waits until the console shows `line` at least `n` times.
    pub async fn wait_console(&self, line: &str, n: usize) -> Result<()> {
        let deadline = Instant::now() + crate::scaled(BOOT_TIMEOUT);
        while self.console_count(line) < n {
            if Instant::now() >= deadline {
                bail!("No {line:?} x{n} on the console:\n{}", self.console());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Fails the test if the guest kernel reported a lockup or a panic.
    pub fn assert_healthy_console(&self) {
        let console = self.console();
        for bad in KERNEL_TROUBLE {
            assert!(
                !console.contains(bad),
                "guest console shows {bad:?}:\n{console}"
            );
        }
    }

    /// Disconnects the agent and stops the VM.
    pub async fn stop(self) -> Result<()> {
        let _ = self.agent.disconnect().await;
        self.vm.stop().await?;
        Ok(())
    }
}

/// Makes a template from a booted `cfg` (a template config): waits for the agent to re-listen
/// after the host disconnects, saves, stops. Returns the time it took.
pub async fn make_template(root: &Path, cfg: HypervisorConfig) -> Result<Duration> {
    let t0 = Instant::now();
    let (vm, _) = TestVm::boot(root, "template", cfg).await?;
    let saved = async {
        let listening = vm.console_count(LISTENING_LINE);
        vm.agent.disconnect().await?;
        vm.wait_console(LISTENING_LINE, listening + 1).await?;
        vm.vm.save_template().await?;
        anyhow::Ok(())
    }
    .await;
    vm.vm.stop().await?;
    saved?;
    Ok(t0.elapsed())
}

/// Boots a clone of the template `cfg` and waits until its agent answers; returns the clone,
/// the time until QEMU had loaded the template (paused), and the total time to ready.
pub async fn boot_clone(
    root: &Path,
    id: &str,
    template: &HypervisorConfig,
) -> Result<(TestVm, Duration, Duration)> {
    let t0 = Instant::now();
    let vm = TestVm::start(root, id, clone_config(template)).await?;
    let loaded = t0.elapsed();
    let ready = async {
        vm.vm.resume().await?;
        vm.wait_ready().await
    }
    .await;
    if let Err(e) = ready {
        let _ = vm.vm.stop().await;
        return Err(e);
    }
    Ok((vm, loaded, t0.elapsed()))
}

/// A template factory config for `env` with everything under `root`: VMs in
/// `<root>/vm/<id>/`, the template (a tmpfs) at `<root>/template`.
pub fn template_factory_config(env: &GuestEnv, root: &Path) -> vmfactory_factory::FactoryConfig {
    let mut vm_cfg = vm_config(config(env));
    vm_cfg.run_root = root.to_owned();
    let mut cfg = vmfactory_factory::FactoryConfig::new(vm_cfg);
    cfg.template = true;
    cfg.template_path = root.join("template");
    cfg
}

/// How far the guest clock of `vm` is from the host's, either way.
pub async fn clock_skew(vm: &vmfactory_vm::Vm) -> Result<Duration> {
    // The guest read its clock somewhere between `before` and `after`; its error is how far
    // outside that window it lies (a slow call, as on the nested KVM host, is not skew).
    let before = std::time::SystemTime::now();
    let guest = vm.agent().guest_time().await?;
    let after = std::time::SystemTime::now();
    Ok(before
        .duration_since(guest)
        .or_else(|_| guest.duration_since(after))
        .unwrap_or_default())
}

/// `sh -c script`.
pub fn sh(script: &str) -> vmfactory_vm::ProcessSpec {
    vmfactory_vm::ProcessSpec::new(["sh", "-c", script])
}

/// Runs `spec` in `vm` with no stdin: (status, stdout, stderr).
pub async fn run_in(
    vm: &vmfactory_vm::Vm,
    spec: vmfactory_vm::ProcessSpec,
) -> (vmfactory_vm::ExitStatus, String, String) {
    use tokio::io::AsyncReadExt;
    let mut p = vm.exec(spec).await.expect("exec");
    drop(p.stdin());
    let (mut o, mut e) = (p.stdout().expect("stdout"), p.stderr().expect("stderr"));
    let (mut out, mut err) = (String::new(), String::new());
    let (ro, re) = tokio::join!(o.read_to_string(&mut out), e.read_to_string(&mut err));
    ro.expect("stdout");
    re.expect("stderr");
    (p.wait().await.expect("wait"), out, err)
}

/// Runs `script` in `vm`, expecting exit 0; its stdout.
pub async fn ok_in(vm: &vmfactory_vm::Vm, script: &str) -> String {
    let (st, out, err) = run_in(vm, sh(script)).await;
    assert_eq!(st, vmfactory_vm::ExitStatus::Code(0), "{script}: {err}");
    out
}
