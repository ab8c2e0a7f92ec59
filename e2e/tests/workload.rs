//! Work in template clones on real QEMU: processes (exit codes, SIGKILL, env, cwd, uid, 32 at
//! once, 16 MiB through `cat`, a reader that stops for 5 s with the agent's memory measured,
//! a terminal resized), files in and out, disks mounted read-write and one read-only image in
//! 4 clones at once, and QEMU killed under a running process. Nothing may leak.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmfactory_e2e::{guest_env, scaled, vm, RunRoot};
use vmfactory_factory::Factory;
use vmfactory_vm::{DiskConfig, DiskFormat, DiskMount, ExitStatus, ProcessSpec, Vm};

use vm::{ok_in as ok, run_in as run, sh};

/// VmRSS of the guest agent (PID 1), in KiB.
async fn agent_rss_kib(vm: &Vm) -> u64 {
    let out = ok(vm, "grep VmRSS /proc/1/status").await;
    out.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("VmRSS in {out:?}"))
}

async fn template_factory(root: &RunRoot) -> Option<(Factory, vmfactory_factory::FactoryConfig)> {
    let env = guest_env()?;
    let cfg = vm::template_factory_config(&env, root.path());
    let factory = Factory::new(&cfg).await.expect("template factory");
    Some((factory, cfg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_streams_files_and_a_terminal_in_a_clone() {
    let root = RunRoot::new();
    let Some((factory, cfg)) = template_factory(&root).await else {
        return;
    };
    let v = factory.get_vm(&cfg.vm).await.expect("clone");

    // Exit codes and death by signal, as Kata reports them.
    for (script, want) in [
        ("true", ExitStatus::Code(0)),
        ("exit 1", ExitStatus::Code(1)),
        ("exit 42", ExitStatus::Code(42)),
        ("kill -9 $$", ExitStatus::Signal(9)),
    ] {
        assert_eq!(run(&v, sh(script)).await.0, want, "{script}");
    }
    assert_eq!(ExitStatus::Signal(9).to_wire(), 137);

    // Environment, working directory and user.
    let mut spec = sh("echo $GREETING; pwd; id -u; id -g; echo err >&2");
    spec.env = vec!["GREETING=hello".into()];
    spec.cwd = "/tmp".into();
    (spec.uid, spec.gid) = (1000, 1001);
    let (st, out, err) = run(&v, spec).await;
    assert_eq!(
        (st, out.as_str(), err.as_str()),
        (ExitStatus::Code(0), "hello\n/tmp\n1000\n1001\n", "err\n")
    );

    // 16 MiB through stdin -> cat -> stdout, checksums equal.
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let t = Instant::now();
    let mut p = v.exec(ProcessSpec::new(["cat"])).await.expect("exec cat");
    let mut stdin = p.stdin().expect("stdin");
    let mut stdout = p.stdout().expect("stdout");
    let sent = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        stdin.write_all(&data).await.expect("write");
    });
    let mut back = Vec::new();
    stdout.read_to_end(&mut back).await.expect("read");
    writer.await.expect("writer");
    assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(0));
    assert_eq!(back.len(), 16 << 20);
    assert_eq!(Sha256::digest(&back), sent, "checksums differ");
    eprintln!("16 MiB through cat in {:?}", t.elapsed());

    // A reader that stops for 5 s: the writer is held by its pipe, the agent does not buffer.
    let before = agent_rss_kib(&v).await;
    let mut p = v
        .exec(sh("head -c 67108864 /dev/zero"))
        .await
        .expect("exec head");
    let mut stdout = p.stdout().expect("stdout");
    let mut first = vec![0; 65536];
    stdout.read_exact(&mut first).await.expect("first bytes");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = agent_rss_kib(&v).await;
    eprintln!("agent VmRSS: {before} KiB before, {during} KiB with a stalled reader");
    assert!(
        during < before + 4096,
        "agent grew from {before} to {during} KiB"
    );
    let stuck = ok(&v, "pidof head; cat /proc/$(pidof head)/wchan; echo").await;
    eprintln!("writer while the reader stalls: {stuck:?}");
    assert!(
        stuck.contains("pipe_write"),
        "head is not held by its pipe: {stuck:?}"
    );
    p.signal(9).await.expect("kill head");
    drop(stdout);
    assert_eq!(p.wait().await.expect("wait"), ExitStatus::Signal(9));

    // 32 processes at once.
    let v = Arc::new(v);
    let mut tasks = Vec::new();
    for i in 0..32 {
        let v = v.clone();
        tasks.push(tokio::spawn(async move {
            run(&v, sh(&format!("sleep 1; echo {i}"))).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (st, out, _) = t.await.expect("task");
        assert_eq!((st, out), (ExitStatus::Code(0), format!("{i}\n")));
    }

    // A file in, read by cat; a file the guest wrote, read out. Host files live outside the
    // run root, whose every entry is a leak.
    let scratch = tempfile::tempdir().expect("scratch");
    let host = scratch.path().join("host-file");
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&host, &body).expect("host file");
    assert_eq!(
        v.copy_in(&host, "/work/in/file").await.expect("copy in"),
        3_000_000
    );
    let sum = ok(&v, "sha256sum /work/in/file").await;
    assert!(
        sum.starts_with(&format!("{:x}", Sha256::digest(&body))),
        "{sum}"
    );
    ok(&v, "seq 1 100000 > /tmp/out.txt").await;
    let out = scratch.path().join("out.txt");
    v.copy_out("/tmp/out.txt", &out).await.expect("copy out");
    let text = std::fs::read_to_string(&out).expect("read");
    assert_eq!(text.lines().count(), 100_000);
    assert_eq!(text.lines().last(), Some("100000"));
    let e = v
        .copy_out("/dev/zero", &root.path().join("x"))
        .await
        .expect_err("a device");
    assert!(e.to_string().contains("read_file"), "{e}");

    // A terminal: the size set by a resize is what the process sees.
    let mut spec = sh("stty size; read x; stty size");
    spec.terminal = true;
    spec.console_size = Some((24, 80));
    let mut p = v.exec(spec).await.expect("exec tty");
    let mut stdin = p.stdin().expect("stdin");
    let mut stdout = p.stdout().expect("stdout");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("24 80") {
        let mut buf = [0; 256];
        let n = stdout.read(&mut buf).await.expect("read");
        assert!(n > 0, "ended early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend(&buf[..n]);
    }
    p.resize(30, 100).await.expect("resize");
    stdin.write_all(b"go\n").await.expect("write");
    stdout.read_to_end(&mut seen).await.expect("read");
    assert!(
        String::from_utf8_lossy(&seen).contains("30 100"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    assert_eq!(p.wait().await.expect("wait"), ExitStatus::Code(0));

    let v = Arc::try_unwrap(v).expect("one handle");
    v.stop().await.expect("stop");
    factory.close().await.expect("close");
    root.assert_no_leaks();
}

/// An ext4 image of `mib` MiB holding the files of `content` (made with `mkfs.ext4 -d`).
fn ext4_image(dir: &Path, name: &str, mib: u64, content: Option<&Path>) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(c) = content {
        cmd.arg("-d").arg(c);
    }
    let out = cmd
        .arg(&path)
        .arg(format!("{mib}M"))
        .output()
        .expect("mkfs.ext4 (e2fsprogs; `.ci/run` installs it)");
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    path
}

/// A file of an ext4 image, read on the host with `debugfs`.
fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_mounted_in_clones_read_write_and_shared_read_only() {
    let root = RunRoot::new();
    let Some((factory, cfg)) = template_factory(&root).await else {
        return;
    };
    // Images live outside the run root, whose every entry is a leak.
    let scratch = tempfile::tempdir().expect("scratch");
    // Read-write in one clone: mounted, written, detached, then checked on the host.
    let rw = ext4_image(scratch.path(), "rw.img", 32, None);
    let v = factory.get_vm(&cfg.vm).await.expect("clone");
    let d = v
        .attach_disk(
            &DiskConfig::new(&rw, DiskFormat::Raw),
            &DiskMount::ext4("/data"),
        )
        .await
        .expect("attach");
    let mounts = ok(&v, "grep ' /data ' /proc/mounts").await;
    assert!(mounts.starts_with("/dev/vd"), "{mounts}");
    ok(&v, "echo from-the-clone > /data/result; sync").await;
    v.detach_disk(&d.id).await.expect("detach");
    assert_eq!(
        ok(&v, "grep -c ' /data ' /proc/mounts || true")
            .await
            .trim(),
        "0"
    );
    v.stop().await.expect("stop");
    assert_eq!(debugfs_cat(&rw, "/result"), "from-the-clone\n");

    // One read-only image in 4 clones at once.
    let content = scratch.path().join("content");
    std::fs::create_dir(&content).expect("dir");
    std::fs::write(content.join("dataset"), "shared bytes\n").expect("file");
    let ro = ext4_image(scratch.path(), "ro.img", 16, Some(&content));
    let mut ro_cfg = DiskConfig::new(&ro, DiskFormat::Raw);
    ro_cfg.read_only = true;
    let mut clones = Vec::new();
    for _ in 0..4 {
        let v = factory.get_vm(&cfg.vm).await.expect("clone");
        v.attach_disk(&ro_cfg, &DiskMount::ext4("/ro"))
            .await
            .expect("attach ro");
        clones.push(v);
    }
    for v in &clones {
        assert_eq!(ok(v, "cat /ro/dataset").await, "shared bytes\n");
        let (st, _, err) = run(v, sh("touch /ro/x")).await;
        assert_ne!(st, ExitStatus::Code(0), "a read-only mount took a write");
        assert!(err.contains("Read-only"), "{err}");
    }
    for v in clones {
        v.stop().await.expect("stop");
    }
    factory.close().await.expect("close");
    root.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_exec_is_one_error_and_leaks_nothing() {
    let root = RunRoot::new();
    let Some((factory, cfg)) = template_factory(&root).await else {
        return;
    };
    let v = factory.get_vm(&cfg.vm).await.expect("clone");
    let mut p = v.exec(sh("echo started; sleep 600")).await.expect("exec");
    let mut stdout = p.stdout().expect("stdout");
    let mut line = [0; 8];
    stdout.read_exact(&mut line).await.expect("started");
    let pid = v.hypervisor().pid().expect("QEMU pid");
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::SIGKILL,
    )
    .expect("kill QEMU");
    let bound = scaled(Duration::from_secs(5));
    let e = tokio::time::timeout(bound, p.wait())
        .await
        .expect("wait ends within the bound")
        .expect_err("the VM died");
    let text = e.to_string();
    eprintln!("after {:?}: {text}", t.elapsed());
    assert!(!text.contains('\n'), "one line: {text:?}");
    assert!(
        e.hypervisor_exit().is_some() || text.contains("died"),
        "{text}"
    );
    let mut rest = Vec::new();
    assert!(
        stdout.read_to_end(&mut rest).await.is_err(),
        "the stream fails too"
    );
    v.stop().await.expect("stop a dead VM");
    factory.close().await.expect("close");
    root.assert_no_leaks();
}
