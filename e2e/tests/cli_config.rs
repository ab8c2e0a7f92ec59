//! `vmfactory config check` on real QEMU: a Kata user's file passes with its Kata keys as
//! warnings, names QEMU's real version and the accelerator `auto` resolves to here, and leaves
//! nothing in the run root (no probe cache either); a QEMU path that does not exist is one
//! error line with exit 2.

use std::fs;

use vmfactory_e2e::cli::{ok, run, Setup};

#[test]
fn config_check_runs_the_real_qemu_and_leaves_nothing() {
    let Some(Setup {
        bin,
        root,
        scratch: _scratch,
        cfg,
    }) = Setup::new(0)
    else {
        return;
    };
    let text = fs::read_to_string(&cfg).expect("config");
    // Kata keys we do not read, in Kata's sections: warnings, not errors.
    let kata = text.replace(
        "accel = \"auto\"",
        "accel = \"auto\"\nuse_vsock = true\nenable_iothreads = true",
    ) + "\n[proxy.kata]\npath = \"/usr/libexec/kata-containers/kata-proxy\"\n";
    fs::write(&cfg, &kata).expect("write");
    let o = run(&bin, &cfg, &["config", "check"]);
    let out = ok(&o, "config check");
    let err = String::from_utf8_lossy(&o.stderr);
    // (A failed KVM probe boot may log a line of its own.)
    let warnings = err
        .lines()
        .filter(|l| l.starts_with("vmfactory: warning: "));
    assert_eq!(warnings.count(), 3, "three warnings: {err}");
    let qemu = out
        .lines()
        .find(|l| l.starts_with("qemu: "))
        .expect("qemu line");
    assert!(qemu.contains("(QEMU emulator version "), "{out}");
    let accel = out
        .lines()
        .find(|l| l.starts_with("accel: "))
        .expect("accel line");
    assert!(
        accel.starts_with("accel: kvm (") || accel.starts_with("accel: tcg ("),
        "{out}"
    );
    assert!(out.trim_end().ends_with(": OK"), "{out}");
    root.assert_no_leaks();

    let missing = kata.replace(
        &text
            .lines()
            .find(|l| l.starts_with("path = "))
            .expect("path")
            .to_owned(),
        "path = \"/nonexistent/qemu-system-x86_64\"",
    );
    fs::write(&cfg, missing).expect("write");
    let o = run(&bin, &cfg, &["config", "check"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| !l.contains(": warning: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(
        errors[0].contains("line 2: QEMU /nonexistent/qemu-system-x86_64 cannot be run"),
        "{err}"
    );
    assert!(o.stdout.is_empty());
    root.assert_no_leaks();
}
