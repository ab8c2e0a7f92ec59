//! Manual smoke run against real QEMU: boot a template VM, pause/resume, hot-add CPUs and
//! memory, save it as a template, boot two clones from it, stop everything.
//!
//! `cargo run -p vmfactory-hypervisor --example smoke -- KERNEL INITRD WORKDIR`

use std::path::PathBuf;
use std::time::Instant;

use vmfactory_hypervisor::{
    Accel, Hypervisor, HypervisorConfig, Qemu, Result, TemplatePaths, TemplateRole,
};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kernel), Some(initrd), Some(work)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: smoke KERNEL INITRD WORKDIR");
        std::process::exit(2);
    };
    let work = PathBuf::from(work);
    let tpl = work.join("template");
    std::fs::create_dir_all(&tpl).map_err(|e| vmfactory_hypervisor::Error::Io {
        op: "Creating",
        path: tpl.clone(),
        source: e,
    })?;
    let mut cfg = HypervisorConfig::new(kernel, Some(initrd.into()));
    cfg.accel = Accel::Auto;
    cfg.max_vcpus = 4;
    cfg.memory_slots = 4;
    cfg.max_memory_mib = 2048;
    let paths = TemplatePaths {
        memory: tpl.join("memory"),
        state: tpl.join("state"),
    };
    cfg.template = Some(TemplateRole::SaveTo(paths.clone()));

    let t = Instant::now();
    let vm = Qemu::new("tpl", cfg.clone(), work.join("tpl"))?;
    vm.start().await?;
    println!(
        "template vm started in {:?}, pid {:?}, agent {:?}",
        t.elapsed(),
        vm.pid(),
        vm.agent_endpoint()
    );
    println!("status {:?}", vm.status().await?);
    vm.pause().await?;
    println!("after pause {:?}", vm.status().await?);
    vm.resume().await?;
    println!("after resume {:?}", vm.status().await?);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    println!("add_vcpus(2) -> {}", vm.add_vcpus(2).await?);
    println!("add_vcpus(5) -> {}", vm.add_vcpus(5).await?);
    println!("add_memory(128) -> {}", vm.add_memory(128).await?);
    let st = vm.state().await;
    println!("state: vcpus {} memory {} MiB", st.vcpus, st.memory_mib);
    vm.stop().await?;

    // A fresh template without hotplugged devices (clones must match the template's devices).
    let vm = Qemu::new("tpl2", cfg.clone(), work.join("tpl2"))?;
    vm.start().await?;
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let t = Instant::now();
    vm.save_template().await?;
    println!(
        "template saved in {:?}; status {:?}",
        t.elapsed(),
        vm.status().await?
    );
    vm.stop().await?;

    let mut clone_cfg = cfg.clone();
    clone_cfg.template = Some(TemplateRole::CloneFrom(paths));
    let mut clones = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        let c = Qemu::new(
            format!("clone{i}"),
            clone_cfg.clone(),
            work.join(format!("clone{i}")),
        )?;
        c.start().await?;
        println!(
            "clone{i} ready (paused) in {:?}: {:?}",
            t.elapsed(),
            c.status().await?
        );
        c.resume().await?;
        println!("clone{i} resumed: {:?}", c.status().await?);
        clones.push(c);
    }
    // Hand clone0 to "another process": detach and re-attach.
    let wire = clones[0].detach().await?;
    let re = Qemu::attach(wire).await?;
    println!(
        "re-attached clone0: {:?} pid {:?}",
        re.status().await?,
        re.pid()
    );
    println!("clone0 add_vcpus(1) -> {}", re.add_vcpus(1).await?);
    println!("clone0 add_memory(256) -> {}", re.add_memory(256).await?);
    re.stop().await?;
    clones[1].stop().await?;
    println!("done");
    Ok(())
}
