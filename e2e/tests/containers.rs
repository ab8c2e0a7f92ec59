//! OCI containers in a template clone on real QEMU: a busybox rootfs made into an erofs image
//! (Debian's busybox-static, `mkfs.erofs`), hot-plugged and run as a container with its own
//! PID, UTS, IPC and mount namespaces: PID 1 is the spec's process, the hostname, env and
//! root are the spec's, /proc is mounted, the exit code comes back; exec into a running one
//! (same PID namespace), writes land in a tmpfs and vanish with the container, a terminal,
//! signal_container, two containers isolated from each other, and a bad spec that leaves
//! nothing. After each removal no mount, directory or block device is left in the guest, and
//! no disk in the hypervisor's list.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::io::AsyncReadExt;
use vmfactory_e2e::{guest_env, vm, RunRoot};
use vmfactory_factory::Factory;
use vmfactory_vm::oci_spec::runtime::Spec;
use vmfactory_vm::{ContainerConfig, ContainerError, ExitStatus, Process, ProcessSpec, Vm};

use vm::ok_in as ok;

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("target"))
        .unwrap_or_default()
}

/// Debian's static busybox: the one `cargo xtask guest` unpacked, else downloaded once.
fn busybox() -> PathBuf {
    let guest_dir = std::env::var_os("VMFACTORY_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("guest"));
    for cache in [guest_dir.join("cache"), target_dir().join("guest/cache")] {
        let found = std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.starts_with("busybox-static") && n.ends_with(".unpacked")
            });
        if let Some(e) = found {
            return e.path().join("bin/busybox");
        }
    }
    let dir = target_dir().join("containers/busybox-deb");
    let bin = dir.join("root/bin/busybox");
    if !bin.is_file() {
        std::fs::create_dir_all(&dir).expect("cache dir");
        let st = Command::new("apt-get")
            .args(["download", "busybox-static"])
            .current_dir(&dir)
            .status()
            .expect("apt-get");
        assert!(st.success(), "apt-get download busybox-static");
        let deb = std::fs::read_dir(&dir)
            .expect("dir")
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".deb"))
            .expect("the .deb");
        let st = Command::new("dpkg-deb")
            .arg("-x")
            .arg(deb.path())
            .arg(dir.join("root"))
            .status()
            .expect("dpkg-deb");
        assert!(st.success(), "dpkg-deb -x");
    }
    bin
}

/// A busybox root file system as an erofs image, made once under target/containers.
fn busybox_image() -> PathBuf {
    let dir = target_dir().join("containers");
    let img = dir.join("busybox.erofs");
    if img.is_file() {
        return img;
    }
    let root = dir.join("busybox-rootfs");
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "dev", "etc", "proc", "sys", "tmp", "root"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    std::fs::copy(busybox(), root.join("bin/busybox")).expect("busybox");
    let list = Command::new(root.join("bin/busybox"))
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet");
        }
    }
    std::fs::write(root.join("etc/image-marker"), "busybox image\n").expect("marker");
    let tmp = dir.join("busybox.erofs.tmp");
    let st = Command::new("mkfs.erofs")
        .arg("--quiet")
        .arg(&tmp)
        .arg(&root)
        .status()
        .expect("mkfs.erofs (apt-get install erofs-utils)");
    assert!(st.success(), "mkfs.erofs");
    std::fs::rename(&tmp, &img).expect("image");
    img
}

/// A spec as containerd would write it for `args`, with hostname `host`.
fn spec(host: &str, args: &[&str]) -> Spec {
    let json = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "FOO=bar"],
            "cwd": "/",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": host,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    serde_json::from_value(json).expect("spec")
}

/// Drains a process's stdout and stderr and waits for it.
async fn finish(mut p: Process) -> (ExitStatus, String, String) {
    drop(p.stdin());
    let (mut o, mut e) = (p.stdout().expect("stdout"), p.stderr().expect("stderr"));
    let (mut out, mut err) = (String::new(), String::new());
    let (ro, re) = tokio::join!(o.read_to_string(&mut out), e.read_to_string(&mut err));
    ro.expect("stdout");
    re.expect("stderr");
    (p.wait().await.expect("wait"), out, err)
}

/// Runs `script` in container `id`, expecting exit 0; its stdout.
async fn ok_inside(v: &Vm, id: &str, exec_id: &str, script: &str) -> String {
    let p = v
        .exec_in(id, exec_id, ProcessSpec::new(["sh", "-c", script]))
        .await
        .expect("exec in");
    let (st, out, err) = finish(p).await;
    assert_eq!(st, ExitStatus::Code(0), "{script}: {err}");
    out
}

/// Nothing of container `id` is left: no mount in the guest, no disk in QEMU, no directory.
async fn assert_gone(v: &Vm, id: &str) {
    let mounts = ok(v, "cat /proc/mounts").await;
    let dir = format!("/run/vmfactory/containers/{id}/");
    assert!(!mounts.contains(&dir), "mounts left: {mounts}");
    let dirs = ok(v, "ls /run/vmfactory/containers/ 2>/dev/null; true").await;
    assert!(
        !dirs.split_whitespace().any(|d| d == id),
        "dir left: {dirs}"
    );
    let others = v.containers().await.len();
    assert_eq!(
        v.hypervisor().disks().await.len(),
        others,
        "one disk per container left, none for {id}"
    );
    // QEMU deleted the device (the unplug waits for it): the guest sees its block devices go.
    let vd = ok(v, "ls /sys/block | grep -c '^vd' || true").await;
    assert_eq!(vd.trim(), others.to_string(), "block devices in the guest");
    assert!(!v.containers().await.contains(&id.to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_in_a_clone() {
    let root = RunRoot::new();
    let Some(env) = guest_env() else {
        return;
    };
    let img = busybox_image();
    let cfg = vm::template_factory_config(&env, root.path());
    let factory = Factory::new(&cfg).await.expect("template factory");
    let v = factory.get_vm(&cfg.vm).await.expect("clone");
    let release = ok(&v, "uname -r").await;

    // One run: PID 1 is sh, the spec's hostname and env, busybox's root, /proc mounted,
    // the exit code back.
    let script = "uname -r; hostname; echo $FOO; tr '\\0' ' ' < /proc/1/cmdline; echo; \
                  ls /; cat /etc/image-marker; exit 3";
    let mut init = v
        .create_container(&ContainerConfig::new(
            "c1",
            spec("box-one", &["sh", "-c", script]),
            &img,
        ))
        .await
        .expect("create");
    let stdout = init.stdout().expect("stdout");
    v.start_container("c1").await.expect("start");
    let mut out = String::new();
    drop(init.stdin());
    let mut stdout = stdout;
    stdout.read_to_string(&mut out).await.expect("read");
    assert_eq!(init.wait().await.expect("wait"), ExitStatus::Code(3));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], release.trim(), "the guest kernel: {out}");
    assert_eq!(lines[1], "box-one", "{out}");
    assert_eq!(lines[2], "bar", "{out}");
    assert_eq!(lines[3].trim(), format!("sh -c {script}"), "PID 1: {out}");
    assert!(out.contains("busybox image"), "{out}");
    assert!(!out.contains("init\n"), "the guest's own root shows: {out}");
    assert!(
        ok(&v, "hostname").await.trim() != "box-one",
        "the VM's hostname changed"
    );
    v.remove_container("c1").await.expect("remove");
    assert_gone(&v, "c1").await;

    // A running one: exec into it, stats, pids, writes in tmpfs, a terminal, a signal.
    let init = v
        .create_container(&ContainerConfig::new(
            "c2",
            spec(
                "box-two",
                &["sh", "-c", "echo written > /written; exec sleep 1000"],
            ),
            &img,
        ))
        .await
        .expect("create c2");
    v.start_container("c2").await.expect("start c2");
    let ps = ok_inside(
        &v,
        "c2",
        "e1",
        "sleep 0.2; cat /written; hostname; ps -o pid,args",
    )
    .await;
    assert!(ps.starts_with("written\nbox-two\n"), "{ps}");
    assert!(
        ps.lines().any(|l| l.trim() == "1 sleep 1000"),
        "PID 1 is the init in the exec's PID namespace: {ps}"
    );
    let upper = ok(&v, "cat /run/vmfactory/containers/c2/scratch/upper/written").await;
    assert_eq!(
        upper, "written\n",
        "the write is in the overlay's tmpfs upper"
    );
    let image_side = ok(&v, "ls /run/vmfactory/containers/c2/storage-0/").await;
    assert!(!image_side.contains("written"), "the image is untouched");
    let pids = v.container_pids("c2").await.expect("pids");
    assert!(!pids.is_empty(), "{pids:?}");
    let stats = v.container_stats("c2").await.expect("stats");
    assert!(stats.pids >= 1 && stats.memory_usage_bytes > 0, "{stats:?}");
    let mut tty = ProcessSpec::new(["sh", "-c", "test -t 0 && test -t 1 && echo isatty"]);
    tty.terminal = true;
    tty.console_size = Some((24, 80));
    let mut t = v.exec_in("c2", "tty", tty).await.expect("terminal");
    let mut tout = String::new();
    t.stdout()
        .expect("stdout")
        .read_to_string(&mut tout)
        .await
        .expect("read tty");
    assert_eq!(t.wait().await.expect("wait"), ExitStatus::Code(0));
    assert!(tout.contains("isatty"), "{tout:?}");
    let e = v
        .exec_in("c2", "bad", ProcessSpec::new(["/no/such/program"]))
        .await
        .expect_err("no program");
    assert!(matches!(e, ContainerError::Vm { .. }), "{e}");
    v.signal_container("c2", 9).await.expect("kill all");
    assert_eq!(init.wait().await.expect("wait"), ExitStatus::Signal(9));
    v.remove_container("c2").await.expect("remove c2");
    assert_gone(&v, "c2").await;
    v.remove_container("c2").await.expect("idempotent");

    // Two at once: separate PID and UTS namespaces, and a fresh tmpfs (c2's write is gone).
    let mut inits = Vec::new();
    // b's init traps SIGTERM: an init gets only the signals it handles (SIGKILL aside).
    let b_script = "trap 'exit 7' TERM; while true; do sleep 1; done";
    for (id, host, args) in [
        ("a", "host-a", vec!["sleep", "1000"]),
        ("b", "host-b", vec!["sh", "-c", b_script]),
    ] {
        let p = v
            .create_container(&ContainerConfig::new(id, spec(host, &args), &img))
            .await
            .expect("create");
        v.start_container(id).await.expect("start");
        inits.push(p);
    }
    let a = ok_inside(&v, "a", "x", "hostname; readlink /proc/self/ns/pid; ls /proc | grep -c '^[0-9]'; test -e /written || echo clean").await;
    let b = ok_inside(&v, "b", "x", "hostname; readlink /proc/self/ns/pid; ls /proc | grep -c '^[0-9]'; test -e /written || echo clean").await;
    let (al, bl): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    assert_eq!((al[0], bl[0]), ("host-a", "host-b"));
    assert_ne!(al[1], bl[1], "one PID namespace each");
    for l in [&al, &bl] {
        let n: u32 = l[2].parse().expect("count");
        assert!(n <= 6, "only the container's own processes: {l:?}");
        assert_eq!(l[3], "clean");
    }
    // b: signalled and waited for, as containerd does before Delete; a: removed running,
    // which kills it and forgets its processes.
    v.signal_container("b", 15).await.expect("SIGTERM b");
    let waited = tokio::time::timeout(std::time::Duration::from_secs(20), inits[1].wait()).await;
    if waited.is_err() {
        let dump = ok(&v, "ps -o pid,ppid,stat,args; cat /sys/fs/cgroup/vmfactory/b/cgroup.procs; for p in $(cat /sys/fs/cgroup/vmfactory/b/cgroup.procs); do grep -E 'Sig|State|PPid' /proc/$p/status; tr '\\0' ' ' < /proc/$p/cmdline; echo; readlink /proc/$p/ns/pid; done; readlink /proc/1/ns/pid").await;
        panic!("b did not end on SIGTERM:\n{dump}");
    }
    assert_eq!(
        waited.ok().map(|w| w.expect("wait b")),
        Some(ExitStatus::Code(7))
    );
    for id in ["b", "a"] {
        v.remove_container(id).await.expect("remove");
        assert_gone(&v, id).await;
    }
    let e = inits[0]
        .wait()
        .await
        .expect_err("forgotten with its container");
    assert!(e.to_string().contains("wait_process"), "{e}");
    let left = ok(&v, "ps -o args | grep -c '^sleep 1000' || true").await;
    assert_eq!(
        left.trim(),
        "0",
        "the removed container's processes are gone"
    );

    // A bad spec: refused by the guest, nothing left mounted or plugged.
    let mut bad = spec("bad", &["sh"]);
    if let Some(m) = bad.mounts_mut().as_mut() {
        m[0].set_destination("relative/proc".into());
    }
    let e = v
        .create_container(&ContainerConfig::new("bad", bad, &img))
        .await
        .expect_err("relative mount destination");
    assert!(matches!(e, ContainerError::InvalidSpec { .. }), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
    assert_gone(&v, "bad").await;
    let mut unknown_ns = spec("bad", &["sh"]);
    if let Some(l) = unknown_ns.linux_mut().as_mut() {
        let mut ns = l.namespaces().clone().unwrap_or_default();
        ns.push(serde_json::from_value(serde_json::json!({"type": "user"})).expect("namespace"));
        l.set_namespaces(Some(ns));
    }
    let e = v
        .create_container(&ContainerConfig::new("bad", unknown_ns, &img))
        .await
        .expect_err("user namespace");
    assert!(matches!(e, ContainerError::InvalidSpec { .. }), "{e}");
    assert_gone(&v, "bad").await;

    // Stop takes any container with it.
    v.create_container(&ContainerConfig::new(
        "last",
        spec("l", &["sleep", "1000"]),
        &img,
    ))
    .await
    .expect("create last");
    v.start_container("last").await.expect("start last");
    v.stop().await.expect("stop");
    factory.close().await.expect("close");
    root.assert_no_leaks();
}
