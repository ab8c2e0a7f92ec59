//! `cargo xtask demo`: the first of the README's two commands. After the prerequisites (QEMU,
//! the guest image, done by the caller) it builds the `vmfactory` CLI and drives it as a user
//! would: `init` makes a template, two `get`s hand out clones of it, a `get` with the template
//! switched off is the cold boot they are compared with, `run` runs a command in a clone and
//! prints its output, then `status` and `destroy`.
//!
//! Everything runs from a generated config whose paths all lie under a private run root
//! ([`RUN_ROOT`]), so the demo never touches a user's `/run/vc`. It ends by checking, from
//! /proc, that no QEMU process and no mount is left there, and removes the directory.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use vmfactory_e2e::{mounts_under, processes_mentioning};

use crate::guest;
use crate::util::{run as run_cmd, workspace_root};

/// The demo's run root: its VMs, its template and its cache socket, nothing else.
const RUN_ROOT: &str = "/run/vmfactory-demo";
/// The CLI, relative to the workspace root (commands run there and are shown as they run).
const BIN: &str = "target/release/vmfactory";
/// The demo config: the embedded default with absolute guest paths, under [`RUN_ROOT`].
const CONFIG: &str = "target/demo/config.toml";
/// The same with `enable_template = false`: every `get` is a cold boot.
const COLD_CONFIG: &str = "target/demo/cold.toml";

/// Runs the demo; on failure it still destroys what it made and checks nothing is left.
pub fn run() -> Result<()> {
    let root = workspace_root();
    build_cli(&root)?;
    write_configs(&root)?;
    if Path::new(RUN_ROOT).exists() {
        println!("\n# {RUN_ROOT} is left from an earlier run; destroying it first.");
        print!("{}", vmfactory(&root, &["--config", CONFIG, "destroy"])?.0);
        leave_nothing()?;
    }
    let steps = steps(&root);
    if steps.is_err() {
        eprintln!("the demo failed; destroying what it made");
        match vmfactory(&root, &["--config", CONFIG, "destroy"]) {
            Ok((out, _)) => print!("{out}"),
            Err(e) => eprintln!("{e:#}"),
        }
    }
    let left = leave_nothing();
    match (&steps, &left) {
        (Err(_), Ok(())) => eprintln!("nothing left behind under {RUN_ROOT} (checked in /proc)"),
        (Err(_), Err(left)) => eprintln!("{left:#}"),
        _ => {}
    }
    let timings = steps?;
    left?;
    summary(&timings);
    Ok(())
}

/// The user's session, each command printed before it runs. Returns the wall times of
/// `init`, the two clones, the cold boot and the `run`.
fn steps(root: &Path) -> Result<[Duration; 5]> {
    let shown = |args: &[&str]| {
        let (out, took) = vmfactory(root, &[&["--config", CONFIG], args].concat())?;
        print!("{out}");
        anyhow::Ok(took)
    };
    println!("\n# Check the config: guest kernel and initramfs readable, values usable.");
    shown(&["config", "check"])?;
    println!("\n# Make the template: boot a VM, save its memory and device state.");
    let init = shown(&["init"])?;

    println!("\n# Hand out VMs: clones of the template, grown to the requested size.");
    println!("# `get` prints the VM as JSON and stops it before exiting (unless --hold).");
    let sized = get(root, CONFIG, &["--vcpus", "2", "--memory", "512"])?;
    let default = get(root, CONFIG, &[])?;
    println!("\n# For comparison, a cold boot: the same `get` with the template switched off.");
    let cold = get(root, COLD_CONFIG, &[])?;

    println!("\n# Run a command in a clone, as `docker run` runs one in a container: its output");
    println!("# and exit code are the command's, and the VM is stopped when it ends.");
    let ran = shown(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo \"hello from $(uname -sr), up $(cut -d' ' -f1 /proc/uptime) s, $(ls /bin | wc -l) commands in /bin\"",
    ])?;
    println!(
        "  -> ran in {:.0} ms (clone taken, command run, VM stopped)",
        ms(ran)
    );

    println!();
    shown(&["status"])?;
    println!();
    shown(&["destroy"])?;
    Ok([init, sized, default, cold, ran])
}

/// `vmfactory --config CONFIG get SIZE…`: checks the VM came from where `config` says, shows
/// it in one line.
fn get(root: &Path, config: &str, size: &[&str]) -> Result<Duration> {
    let want = if config == CONFIG {
        "template"
    } else {
        "direct"
    };
    let (out, took) = vmfactory(root, &[&["--config", config, "get"], size].concat())?;
    let vm: Value = serde_json::from_str(&out)
        .with_context(|| format!("`vmfactory get` printed no VM as JSON:\n{out}"))?;
    let field = |key: &str| vm.get(key).cloned().unwrap_or(Value::Null);
    ensure!(
        field("source").as_str() == Some(want),
        "`vmfactory get` handed out a VM with source {}, expected \"{want}\"",
        field("source")
    );
    println!(
        "  -> VM {} (QEMU pid {}, vcpus {}, memory {} MiB, source {want}) in {:.0} ms",
        field("id").as_str().unwrap_or("?"),
        field("pid"),
        field("vcpus"),
        field("memory_mib"),
        ms(took)
    );
    Ok(took)
}

/// Prints and runs `BIN ARGS…` in the workspace root; returns its stdout and wall time. A
/// failure names the command and ends with the tail of its stderr.
fn vmfactory(root: &Path, args: &[&str]) -> Result<(String, Duration)> {
    let line = format!("{BIN} {}", shell_words(args));
    println!("$ {line}");
    let t0 = Instant::now();
    let out = Command::new(root.join(BIN))
        .current_dir(root)
        .args(args)
        .output()
        .with_context(|| format!("Cannot run `{line}`"))?;
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        bail!("`{line}` failed ({}); its stderr ends:\n{tail}", out.status);
    }
    // Warnings only: the progress spinner is off when stderr is not a terminal.
    eprint!("{stderr}");
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

/// `cargo build --release -p vmfactory` into the workspace's target.
fn build_cli(root: &Path) -> Result<()> {
    println!("building the CLI: cargo build --release -p vmfactory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "-p", "vmfactory"])
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    ensure!(root.join(BIN).is_file(), "The build left no {BIN}");
    Ok(())
}

/// Writes [`CONFIG`] and [`COLD_CONFIG`] from `vmfactory config default`.
fn write_configs(root: &Path) -> Result<()> {
    println!("\n# The demo config: the embedded default, edited, in {CONFIG}.");
    let (default, _) = vmfactory(root, &["config", "default"])?;
    let guest = guest::guest_dir();
    let run_root = Path::new(RUN_ROOT);
    let demo = set(
        &default,
        &[
            ("kernel", quoted(&guest.join("vmlinuz"))?),
            ("initrd", quoted(&guest.join("initramfs.cpio"))?),
            ("template_path", quoted(&run_root.join("vm/template"))?),
            ("vm_cache_endpoint", quoted(&run_root.join("cache.sock"))?),
            ("run_root", quoted(run_root)?),
        ],
    )?;
    let cold = set(&demo, &[("enable_template", "false".to_owned())])?;
    let header = format!(
        "# Written by `cargo xtask demo` (on every run) from `vmfactory config default`:\n\
         # absolute guest paths, and everything under {RUN_ROOT} instead of /run/vc.\n"
    );
    let dir = root.join("target/demo");
    fs::create_dir_all(&dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    let cold_note = "# enable_template = false: every `get` boots cold (the demo's comparison).\n";
    for (name, text) in [(CONFIG, demo), (COLD_CONFIG, format!("{cold_note}{cold}"))] {
        let path = root.join(name);
        fs::write(&path, format!("{header}{text}"))
            .with_context(|| format!("Cannot write {}", path.display()))?;
    }
    Ok(())
}

/// `text` with the line setting each key replaced by `key = value`. Each key must be set
/// exactly once, so a change in the default's shape fails here rather than half-applied.
fn set(text: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut seen = vec![0usize; values.len()];
    for line in text.lines() {
        let key = line
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|k| !k.starts_with('#'));
        match values.iter().position(|(k, _)| Some(*k) == key) {
            Some(i) => {
                seen[i] += 1;
                out.push_str(&format!("{} = {}\n", values[i].0, values[i].1));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    for ((key, _), n) in values.iter().zip(seen) {
        ensure!(n == 1, "The default config sets `{key}` {n} times");
    }
    Ok(out)
}

/// A TOML basic string holding `path` (a JSON string is one).
fn quoted(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(serde_json::to_string(text)?)
}

/// Fails naming what is left if a QEMU process names [`RUN_ROOT`] or anything is mounted under
/// it (read from /proc); otherwise removes the directory (`destroy` leaves the run root).
fn leave_nothing() -> Result<()> {
    let mut left: Vec<String> = processes_mentioning(RUN_ROOT)
        .into_iter()
        .filter(|p| p.contains("qemu"))
        .collect();
    left.extend(mounts_under(RUN_ROOT));
    ensure!(left.is_empty(), "Left behind: {}", left.join("; "));
    if Path::new(RUN_ROOT).exists() {
        fs::remove_dir_all(RUN_ROOT).with_context(|| format!("Cannot remove {RUN_ROOT}"))?;
    }
    Ok(())
}

fn summary(&[init, sized, default, cold, ran]: &[Duration; 5]) {
    println!(
        "\nSummary (wall time of each command, start to exit; a `get` includes stopping its VM):"
    );
    let rows = [
        ("the template, `vmfactory init`", init),
        ("a cold boot, `vmfactory get` (template off)", cold),
        ("`vmfactory get --vcpus 2 --memory 512`", sized),
        ("`vmfactory get` (default size)", default),
        ("`vmfactory run -- sh -c …` in a clone", ran),
    ];
    for (i, (what, d)) in rows.into_iter().enumerate() {
        let faster = cold.as_secs_f64() / d.as_secs_f64().max(1e-9);
        let vs = match i {
            0 | 1 => String::new(),
            _ => format!(", {faster:.1}x faster than the cold boot"),
        };
        println!("  {:<45} {:>6.0} ms{vs}", format!("{what}:"), ms(d));
    }
    println!(
        "Nothing left behind (checked in /proc): no QEMU process names {RUN_ROOT}, no mount \
         under it, directory removed."
    );
    println!("\nNext, try (as root; `destroy` when done):");
    for cmd in [
        "init",
        "get --vcpus 2 --memory 512 --hold    # Ctrl-C stops the VM",
        "run -it -- sh                         # a shell in a clone; exit ends it",
        "status",
        "inspect template",
        "destroy",
    ] {
        println!("  {BIN} --config {CONFIG} {cmd}");
    }
}

/// `args` as a shell would need them typed: single-quoted when they hold anything special.
fn shell_words(args: &[&str]) -> String {
    let plain = |a: &str| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    };
    args.iter()
        .map(|a| {
            if plain(a) {
                (*a).to_owned()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::{set, shell_words};

    #[test]
    fn shell_words_quote_what_needs_it() {
        assert_eq!(
            shell_words(&["run", "--", "sh", "-c", "echo 'a' $(b)"]),
            r"run -- sh -c 'echo '\''a'\'' $(b)'"
        );
    }

    #[test]
    fn set_replaces_each_key_once() {
        let text = "# kernel = no\nkernel = \"a\"\nkernel_params = \"\"\n[x]\nrun_root = 1\n";
        let out = set(text, &[("kernel", "2".into()), ("run_root", "3".into())]);
        let want = "# kernel = no\nkernel = 2\nkernel_params = \"\"\n[x]\nrun_root = 3\n";
        assert_eq!(out.unwrap(), want);
        assert!(set(text, &[("missing", "1".into())]).is_err());
    }
}
