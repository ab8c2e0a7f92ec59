//! The containerd harness and the busybox OCI image, proven with runc: `ctr run` of the
//! image prints, propagates an exit code and reads stdin, and nothing is left afterwards.
//! (The same harness runs the vmfactory shim in the container tests.)

use vmfactory_e2e::containerd::{Containerd, ContainerdConfig, RUNC_RUNTIME};
use vmfactory_e2e::RunRoot;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn runc_runs_the_busybox_image() {
    let root = RunRoot::new();
    let Some(ctrd) = Containerd::start_or_skip(&ContainerdConfig::new(root.path().join("ctrd")))
    else {
        return;
    };
    let image = ctrd.import_busybox().expect("import the busybox image");
    // A second import of the same tarball is a no-op.
    assert_eq!(ctrd.import_busybox().expect("again"), image);

    let run = |id: &str, script: &str, stdin: Option<&[u8]>| {
        let args = [
            "run",
            "--rm",
            "--runtime",
            RUNC_RUNTIME,
            &image,
            id,
            "sh",
            "-c",
            script,
        ];
        ctrd.ctr_with_stdin(&args, stdin)
    };

    let out = run(
        "runc-hello",
        "echo hello; id -u; cat /etc/hostname 2>/dev/null; true",
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert_eq!(text.lines().next(), Some("hello"), "{text}");
    assert_eq!(text.lines().nth(1), Some("0"), "runs as root: {text}");

    // The image's config: PATH from its Env, the applets through /bin/busybox links.
    let out = run(
        "runc-env",
        "echo $PATH; readlink /bin/sh; test -d /tmp -a -d /proc",
        None,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/bin/busybox\n"
    );

    let out = run("runc-exit", "echo bye >&2; exit 7", None);
    assert_eq!(out.status.code(), Some(7), "the exit code propagates");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bye"));

    // ctr 1.6 has no `-i`: `ctr run` forwards its stdin. It closes the task's stdin on EOF
    // only if the EOF comes after the task started (a race in ctr), so the script reads one
    // line rather than waiting for EOF.
    let out = run(
        "runc-stdin",
        "read line; echo got $line",
        Some(b"from stdin\n"),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "got from stdin\n");

    assert_eq!(
        ctrd.containers().expect("ls"),
        Vec::<String>::new(),
        "--rm removed them"
    );
    ctrd.stop().expect("clean stop");
    root.assert_no_leaks();
}

#[test]
fn drop_cleans_up_a_running_container() {
    let root = RunRoot::new();
    let Some(ctrd) = Containerd::start_or_skip(&ContainerdConfig::new(root.path().join("ctrd")))
    else {
        return;
    };
    let image = ctrd.import_busybox().expect("import");
    ctrd.ctr_ok(&["run", "-d", &image, "runc-left", "sleep", "600"])
        .expect("start a detached container");
    assert_eq!(
        ctrd.containers().expect("ls"),
        vec!["runc-left".to_string()]
    );
    drop(ctrd);
    root.assert_no_leaks();
}

/// containerd runs `containerd-shim-vmfactory-v2` from the harness's shim directory, with the
/// environment the harness gave containerd: a stand-in shim records how it was called and
/// refuses, and `ctr run` fails with nothing left behind.
#[test]
fn the_shim_comes_from_the_shim_dir_with_the_given_environment() {
    use std::os::unix::fs::PermissionsExt as _;
    use vmfactory_e2e::containerd::{SHIM_BINARY, VMFACTORY_RUNTIME};

    let root = RunRoot::new();
    let bin = tempfile::tempdir().expect("shim dir");
    let calls = bin.path().join("calls");
    let shim = bin.path().join(SHIM_BINARY);
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\necho \"$VMFACTORY_TEST_MARK $*\" >> {}\nexit 1\n",
            calls.display()
        ),
    )
    .expect("stand-in shim");
    std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg = ContainerdConfig::new(root.path().join("ctrd"))
        .shim_dir(bin.path())
        .env("VMFACTORY_TEST_MARK", "marked");
    let Some(ctrd) = Containerd::start_or_skip(&cfg) else {
        return;
    };
    let image = ctrd.import_busybox().expect("import");
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        VMFACTORY_RUNTIME,
        &image,
        "vmf-1",
        "true",
    ]);
    assert!(!out.status.success(), "the stand-in shim refuses");
    let calls = std::fs::read_to_string(&calls).expect("the shim was run");
    let first = calls.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("marked "),
        "environment passed on: {calls}"
    );
    assert!(
        first.contains(" start"),
        "containerd's `shim start`: {calls}"
    );
    assert!(first.contains("-id vmf-1"), "{calls}");
    ctrd.stop().expect("clean stop");
    root.assert_no_leaks();
}
