//! `cargo xtask demo`: the main job on a fresh machine. Boots a VM, makes a template from a
//! second one, boots a clone from it, and prints what each took.

use std::time::Instant;

use anyhow::{Context, Result};
use vmfactory_agent::Agent;
use vmfactory_e2e::vm::{self, TestVm};
use vmfactory_hypervisor::Hypervisor;

/// Runs the demo.
pub async fn run() -> Result<()> {
    let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
    let root = tempfile::Builder::new()
        .prefix("vmf-demo-")
        .tempdir_in("/tmp")?;
    let tpl_dir = tempfile::Builder::new()
        .prefix("vmf-demo-tpl-")
        .tempdir_in("/dev/shm")?;
    let base = vm::config(&env);
    let accel = vmfactory_hypervisor::resolve_accel(&base).await;
    println!(
        "accelerator: {} (KVM only where a probe boot works)",
        accel.as_str()
    );

    let (direct, cold) = TestVm::boot(root.path(), "direct", base.clone()).await?;
    let res = direct.agent.resources().await;
    direct.stop().await?;
    let res = res?;
    println!(
        "cold boot:     {:>8.1} ms to agent Check ({} vCPU, {} MiB MemTotal)",
        ms(cold),
        res.online_cpu_count(),
        res.mem_total_kb / 1024
    );

    let tpl = vm::template_config(base, tpl_dir.path());
    let made = vm::make_template(root.path(), tpl.clone()).await?;
    let state = tpl_dir.path().join("state").metadata()?.len();
    println!(
        "template:      {:>8.1} ms (boot, agent re-listen, save; state {} KiB)",
        ms(made),
        state / 1024
    );

    let (clone, loaded, ready) = vm::boot_clone(root.path(), "clone", &tpl).await?;
    let t0 = Instant::now();
    let check = clone.agent.check().await;
    let rtt = t0.elapsed();
    let pid = clone.vm.pid();
    clone.stop().await?;
    check?;
    println!(
        "clone:         {:>8.1} ms to agent Check (template loaded at {:.1} ms; pid {})",
        ms(ready),
        ms(loaded),
        pid.unwrap_or_default()
    );
    println!("agent round trip: {:.2} ms", ms(rtt));
    println!(
        "clone is {:.1}x faster than a cold boot",
        cold.as_secs_f64() / ready.as_secs_f64()
    );
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
