//! containerd runs OCI containers in factory VMs through `containerd-shim-vmfactory-v2`: a
//! private containerd (Debian's 1.6), the busybox image built here, the node's vmfactory
//! configuration with a template made by `vmfactory init`, and `ctr` as a user runs it.
//! After each scenario nothing is left: no VM, disk, mount, image file or socket.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use vmfactory_e2e::cli::{ok, run, Setup};
use vmfactory_e2e::containerd::{shim_bin, Containerd, ContainerdConfig, VMFACTORY_RUNTIME};
use vmfactory_e2e::processes_mentioning;

/// The guest kernel's release, from the guest image's manifest.
fn guest_release() -> String {
    let dir = std::env::var_os("VMFACTORY_GUEST_DIR").expect("VMFACTORY_GUEST_DIR");
    let text = std::fs::read_to_string(Path::new(&dir).join("manifest.json")).expect("manifest");
    let m: serde_json::Value = serde_json::from_str(&text).expect("manifest JSON");
    m["kernel_release"]
        .as_str()
        .expect("kernel_release")
        .to_owned()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A node: the CLI's setup (template, no VM cache), its template made, and a containerd whose
/// shims read that configuration.
struct Node {
    setup: Setup,
    ctrd: Option<Containerd>,
    image: String,
}

impl Node {
    fn new() -> Option<Self> {
        let setup = Setup::new(0)?;
        let shim = shim_bin();
        ok(&run(&setup.bin, &setup.cfg, &["init"]), "init (template)");
        let cfg = ContainerdConfig::new(setup.root.path().join("ctrd"))
            .shim_dir(shim.parent().expect("shim dir"))
            .env("VMFACTORY_CONFIG", setup.cfg.display().to_string());
        let ctrd = Containerd::start_or_skip(&cfg)?;
        let image = ctrd.import_busybox().expect("import busybox");
        Some(Self {
            setup,
            ctrd: Some(ctrd),
            image,
        })
    }

    fn ctrd(&self) -> &Containerd {
        self.ctrd.as_ref().expect("containerd running")
    }

    /// `ctr run --rm --runtime vmfactory IMAGE ID ARGS…`.
    fn run(&self, id: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut all = vec![
            "run",
            "--rm",
            "--runtime",
            VMFACTORY_RUNTIME,
            &self.image,
            id,
        ];
        all.extend_from_slice(args);
        self.ctrd().ctr_with_stdin(&all, stdin)
    }

    /// Every shim so far took its VM from the template: none fell back to a direct boot.
    fn assert_template_clones(&self) {
        let log = self.ctrd().log();
        let from = |choice: &str| log.matches(&format!("choice={choice}")).count();
        assert!(
            from("Template") > 0 && from("Direct") == 0,
            "shims on the template: {}, on direct VMs: {}\n{}",
            from("Template"),
            from("Direct"),
            log.lines()
                .filter(|l| ["accelerator", "factory", "template", "WARN", "ERROR"]
                    .iter()
                    .any(|k| l.contains(k)))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    /// Stops containerd; with `clean`, checks no VM is left (no QEMU, `list` empty); then
    /// `destroy` removes the template and the rootfs cache and nothing at all is left.
    fn finish(mut self, clean: bool) {
        if let Some(ctrd) = self.ctrd.take() {
            let stopped = ctrd.stop();
            if clean {
                stopped.expect("containerd stopped with nothing left");
            }
        }
        if clean {
            let root = self.setup.root.path().to_string_lossy().into_owned();
            let left = processes_mentioning(&root);
            assert!(left.is_empty(), "{left:#?}");
            let listed = ok(&run(&self.setup.bin, &self.setup.cfg, &["list"]), "list");
            assert_eq!(listed.lines().count(), 1, "no VM is left: {listed}");
        }
        ok(
            &run(&self.setup.bin, &self.setup.cfg, &["destroy"]),
            "destroy",
        );
        self.setup.root.assert_no_leaks();
    }
}

#[test]
fn ctr_runs_execs_kills_and_cleans_up_containers_in_template_clones() {
    let Some(node) = Node::new() else { return };

    // The guest's kernel, not the host's; stdout and stderr both reach ctr.
    let out = node.run(
        "hello",
        &["sh", "-c", "uname -r; echo hello; echo err >&2"],
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        err(&out),
        node.ctrd().log()
    );
    let release = guest_release();
    assert_eq!(text(&out), format!("{release}\nhello\n"));
    node.assert_template_clones();
    assert!(err(&out).contains("err"), "{}", err(&out));

    // The exit code propagates; the image's config (PATH, cwd) holds; PID 1 is the container's.
    let out = node.run("code", &["sh", "-c", "exit 7"], None);
    assert_eq!(out.status.code(), Some(7), "{}", err(&out));
    let out = node.run(
        "env",
        &[
            "sh",
            "-c",
            "echo $PATH; pwd; tr '\\0' ' ' </proc/1/cmdline; echo; grep MemTotal /proc/meminfo",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    let lines: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert_eq!(
        lines[0],
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    );
    assert_eq!(lines[1], "/");
    assert!(
        lines[2].starts_with("sh -c"),
        "PID 1 is the container's own: {lines:?}"
    );
    // The VM's memory (256 MiB), not the host's: the release alone cannot tell them apart
    // where the host runs the guest's kernel too (the nested KVM host does).
    let kib: u64 = lines[3]
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .expect("MemTotal");
    assert!(
        kib < 512 * 1024,
        "the container sees the VM's memory: {lines:?}"
    );

    // stdin reaches the container (ctr 1.6 forwards its stdin; the script reads one line).
    let out = node.run(
        "stdin",
        &["sh", "-c", "read l; echo got $l"],
        Some(b"a line\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", err(&out));
    assert_eq!(text(&out), "got a line\n");

    // A terminal (`-t` needs one on ctr's side too: `script` gives it a pty, sized here so
    // that ctr's ResizePty carries a size the container must see).
    let ctr = node.ctrd().ctr_command();
    let line = format!(
        "stty rows 31 cols 101; {} run --rm -t --runtime {VMFACTORY_RUNTIME} {} tty \
         sh -c 'tty; stty size; exit 3'",
        shell_words(&ctr),
        node.image
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let seen = text(&out);
    assert!(
        seen.contains("/dev/pts/"),
        "a terminal in the container: {seen}"
    );
    assert!(seen.contains("31 101"), "the terminal's size: {seen}");
    assert_eq!(out.status.code(), Some(3), "{seen}");

    // A detached container: exec into it, then kill and wait.
    let c = node.ctrd();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        VMFACTORY_RUNTIME,
        &node.image,
        "bg",
        "sleep",
        "600",
    ])
    .expect("run -d");
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "bg",
        "sh",
        "-c",
        "cat /proc/1/cmdline; echo; echo in; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "{}", err(&out));
    assert_eq!(
        text(&out),
        "sleep\x00600\x00\nin\n",
        "the exec shares the container's PID namespace"
    );
    let ps = c.ctr_ok(&["task", "ps", "bg"]).expect("task ps");
    assert!(ps.lines().count() >= 2, "the container's pids: {ps}");
    // Stats: the guest's cgroup figures through the task API's metrics.
    let metrics = c.ctr_ok(&["task", "metrics", "bg"]).expect("task metrics");
    assert!(
        metrics.contains("memory") || metrics.contains("pids"),
        "{metrics}"
    );
    // ctr 1.6 has no `task wait`; `task attach` waits (the shim's Wait), exits with the
    // task's status (128 + 9 after a SIGKILL) and deletes the task.
    let waiter = c
        .ctr_command()
        .args(["task", "attach", "bg"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task attach");
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.ctr_ok(&["task", "kill", "-s", "SIGKILL", "bg"])
        .expect("task kill");
    let waited = waiter.wait_with_output().expect("attach output");
    assert_eq!(waited.status.code(), Some(137), "{}", err(&waited));
    let tasks = c.ctr_ok(&["task", "ls"]).expect("task ls");
    assert_eq!(tasks.lines().count(), 1, "attach deleted the task: {tasks}");
    c.ctr_ok(&["container", "delete", "bg"])
        .expect("container delete");

    // Eight at once, each in its own VM.
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut cmd = c.ctr_command();
            cmd.args(["run", "--rm", "--runtime", VMFACTORY_RUNTIME, &node.image])
                .arg(format!("par{i}"))
                .args(["sh", "-c", &format!("echo par{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().expect("ctr run")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("ctr run output");
        assert_eq!(
            out.status.code(),
            Some(0),
            "par{i}: {}\n{}",
            err(&out),
            c.log_problems()
        );
        assert_eq!(text(&out), format!("par{i}\n"));
    }
    assert!(c.containers().expect("containers").is_empty());
    node.assert_template_clones();
    node.finish(true);
}

#[test]
fn a_killed_shim_leaves_nothing_destroy_cannot_clean() {
    let Some(node) = Node::new() else { return };
    let c = node.ctrd();
    c.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        VMFACTORY_RUNTIME,
        &node.image,
        "victim",
        "sleep",
        "600",
    ])
    .expect("run -d");
    let root = node.setup.root.path().to_string_lossy().into_owned();
    let shims: Vec<i32> = processes_mentioning("containerd-shim-vmfactory-v2")
        .into_iter()
        .filter(|p| p.contains(&root))
        .filter_map(|p| p.strip_prefix("process ")?.split(':').next()?.parse().ok())
        .collect();
    assert_eq!(shims.len(), 1, "one shim for the container");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the shim");
    // containerd sees its shim die and runs `shim delete` on the bundle; whatever that cannot
    // reach is `vmfactory destroy`'s.
    let _ = c.ctr(&["task", "delete", "-f", "victim"]);
    let _ = c.ctr(&["container", "delete", "victim"]);
    node.finish(false);
}

/// `cmd` as one shell line (the `script` test runs `ctr` under a pty).
fn shell_words(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}
