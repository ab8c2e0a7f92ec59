//! Booting real VMs for the scenarios: configs, boot-to-ready, templates and clones, driven
//! only through the public APIs of `vmfactory-hypervisor` and `vmfactory-agent`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmfactory_agent::{Agent, HealthStatus, KataAgent};
use vmfactory_hypervisor::{Accel, AgentChannel, Hypervisor, HypervisorConfig, Qemu};

use crate::GuestEnv;

/// Bound on a cold boot until the agent answers (TCG boots take ~2 s; CI hosts are slower).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-call agent timeout.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The console line the guest agent prints each time it (re)opens the serial port.
pub const LISTENING_LINE: &str = "vmfactory-agent: listening on agent.channel.0";

/// A guest config: 1 vCPU (up to 4), 256 MiB (2 slots, up to 1 GiB), virtio-serial agent.
pub fn config(env: &GuestEnv) -> HypervisorConfig {
    let mut cfg = HypervisorConfig::new(&env.kernel, Some(env.initrd.clone()));
    cfg.qemu_path = env.qemu.clone();
    cfg.accel = Accel::Auto;
    cfg.vcpus = 1;
    cfg.max_vcpus = 4;
    cfg.memory_mib = 256;
    cfg.memory_slots = 2;
    cfg.max_memory_mib = 1024;
    cfg
}

/// Template side of `cfg`: RAM in `dir/memory`, device state in `dir/state`.
pub fn template_config(mut cfg: HypervisorConfig, dir: &Path) -> HypervisorConfig {
    cfg.boot_to_be_template = true;
    cfg.memory_path = Some(dir.join("memory"));
    cfg.devices_state_path = Some(dir.join("state"));
    cfg
}

/// Clone side of a template config.
pub fn clone_config(template: &HypervisorConfig) -> HypervisorConfig {
    let mut cfg = template.clone();
    cfg.boot_to_be_template = false;
    cfg.boot_from_template = true;
    cfg
}

/// Hybrid-vsock variant of `cfg` (direct VMs only).
pub fn hybrid_vsock_config(mut cfg: HypervisorConfig, backend: PathBuf) -> HypervisorConfig {
    cfg.agent_channel = AgentChannel::HybridVsock { backend, guest_cid: 3 };
    cfg
}

/// A started VM and a client of its agent.
#[derive(Debug)]
pub struct TestVm {
    /// The VM.
    pub vm: Arc<Qemu>,
    /// Its agent.
    pub agent: KataAgent,
}

impl TestVm {
    /// Spawns QEMU for `cfg` in `root/<id>` without waiting for the guest.
    pub async fn start(root: &Path, id: &str, cfg: HypervisorConfig) -> Self {
        let vm = Arc::new(Qemu::new(id, cfg, root.join(id)).expect("valid config"));
        vm.start().await.expect("QEMU starts");
        let agent = KataAgent::new(vm.agent_url().as_str(), CALL_TIMEOUT).expect("agent url");
        Self { vm, agent }
    }

    /// Boots `cfg` and waits until the agent answers `Check`; returns the VM and the time.
    pub async fn boot(root: &Path, id: &str, cfg: HypervisorConfig) -> (Self, Duration) {
        let t0 = Instant::now();
        let vm = Self::start(root, id, cfg).await;
        vm.wait_ready().await;
        (vm, t0.elapsed())
    }

    /// Polls `Check` until it answers SERVING (dialing retries inside the client).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match self.agent.check().await {
                Ok(HealthStatus::Serving) => return,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "agent of {} not ready after {BOOT_TIMEOUT:?}: {other:?}\nconsole:\n{}",
                        self.vm.id(),
                        self.console()
                    );
                }
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
    pub async fn wait_console(&self, line: &str, n: usize) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while self.console_count(line) < n {
            assert!(Instant::now() < deadline, "no {line:?} x{n} on the console:\n{}", self.console());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fails the test if the guest kernel reported a lockup or a panic.
    pub fn assert_healthy_console(&self) {
        let console = self.console();
        for bad in ["soft lockup", "hard LOCKUP", "rcu_sched self-detected", "Kernel panic", "BUG:"] {
            assert!(!console.contains(bad), "guest console shows {bad:?}:\n{console}");
        }
    }

    /// Disconnects the agent and stops the VM.
    pub async fn stop(self) {
        let _ = self.agent.disconnect().await;
        self.vm.stop().await.expect("stop");
    }
}

/// Makes a template from a booted `cfg` (a template config): waits for the agent to re-listen
/// after the host disconnects, saves, stops. Returns the time it took.
pub async fn make_template(root: &Path, cfg: HypervisorConfig) -> Duration {
    let t0 = Instant::now();
    let (vm, _) = TestVm::boot(root, "template", cfg).await;
    let listening = vm.console_count(LISTENING_LINE);
    vm.agent.disconnect().await.expect("disconnect");
    vm.wait_console(LISTENING_LINE, listening + 1).await;
    vm.vm.save_template().await.expect("save template");
    vm.vm.stop().await.expect("stop template VM");
    t0.elapsed()
}
