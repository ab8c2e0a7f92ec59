//! Project automation:
//! `cargo xtask <guest|tools|oci-image|lint|package|test|e2e|kvm-host|bench|demo>`.

mod bench;
mod bench_concurrent;
mod bench_ctr;
mod bench_factory;
mod bench_kernels;
mod bench_memfloor;
mod bench_net;
mod bench_run;
mod demo;
mod guest;
mod kvm_host;
mod lint;
mod package;
mod smaps;
mod stat;
mod tools;
mod util;

use std::process::Command;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::util::{is_ci, run, workspace_root};

#[derive(Parser)]
#[command(about = "vmfactory project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The README's first command: install QEMU if missing, build the guest image and the
    /// `vmfactory` CLI, make a template with `vmfactory init`, hand out two VMs with
    /// `vmfactory get`, compare with a cold boot, destroy it all and check nothing is left.
    Demo,
    /// Build the guest image (kernel + initramfs with the static agent, busybox and any extra
    /// Debian packages) into target/guest.
    Guest {
        /// Extra Debian packages (with their Depends/Pre-Depends), added to the config file's;
        /// repeatable or comma-separated.
        #[arg(long = "package", value_name = "NAME", num_args = 1.., value_delimiter = ',')]
        packages: Vec<String>,
        /// Configuration file with `[guest] kernel = "6.1" | "6.12"` and `packages = [...]`
        /// (default: vmfactory-guest.toml at the workspace root, if it exists).
        #[arg(long, value_name = "PATH")]
        config: Option<std::path::PathBuf>,
        /// The Debian cloud kernel series, over the config file's (default: 6.1).
        #[arg(long, value_enum)]
        kernel: Option<guest::GuestKernel>,
    },
    /// Install what the tests need: QEMU, containerd, runc, erofs-utils, busybox-static
    /// (apt), vhost-device-vsock (crates.io), the guest image and the busybox OCI image.
    Tools,
    /// Build the busybox OCI image tarball (from Debian's busybox-static) that the container
    /// tests and bench import with `ctr image import`, into target/oci/busybox.tar.
    OciImage,
    /// Fail on any lint problem: `cargo fmt --check`, clippy and rustdoc with `-D warnings`.
    Lint,
    /// `cargo package` every publishable crate in dependency order, each verified by building
    /// it from its `.crate` file; fails on any error.
    Package,
    /// Run the lints (as `lint`) and the packaging check (as `package`), then every test:
    /// unit, protocol and real-QEMU end-to-end, the VMGenID scenarios again on the 6.12
    /// kernel's image, then the e2e suite again on the nested KVM host (as `kvm-host`).
    Test {
        /// Leave out the nested KVM host (a quicker local run; CI never does).
        #[arg(long)]
        no_kvm_host: bool,
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run only the real-QEMU end-to-end suite (and its VMGenID scenarios again on the 6.12
    /// kernel's image).
    E2e {
        /// Extra arguments for the test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the real-QEMU e2e suite (or the bench) on a nested KVM host: an L1 VM under TCG
    /// with emulated AMD SVM, QEMU 10 inside; fails unless L1 resolves KVM and all pass.
    KvmHost {
        /// What L1 runs.
        #[arg(long, value_enum, default_value = "test")]
        mode: kvm_host::Mode,
        /// Each L1's memory in MiB.
        #[arg(long, default_value_t = 4096)]
        memory: u32,
        /// Each L1's vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// The L2 guests' CPU model (`host` is the product's default under KVM).
        #[arg(long, default_value = kvm_host::CI_L2_CPU)]
        l2_cpu: String,
        /// L1 VMs at a time, each running one scenario (or, with --all or a filter, one test
        /// binary).
        #[arg(long, default_value_t = 2)]
        hosts: u32,
        /// The whole e2e suite, not only the CI scenarios (see `kvm_host::CI_SCENARIOS`).
        #[arg(long)]
        all: bool,
        /// Bound on the nested run, in minutes.
        #[arg(long, default_value_t = 30)]
        timeout_min: u64,
        /// Extra arguments for each test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Inside the nested KVM host only: run what its manifest says.
    #[command(hide = true)]
    KvmHostInside {
        /// `/kvm-host/manifest.json`.
        manifest: std::path::PathBuf,
    },
    /// Compare the guest kernels (Debian's cloud 6.1 and 6.12) and what VMGenID changes:
    /// cold boot, template clone `get_vm`, image sizes, idle PSS; table +
    /// target/bench/kernels.json.
    BenchKernels {
        /// Rounds, each timing one of every kind (medians are reported).
        #[arg(long, default_value_t = 12)]
        runs: usize,
        /// Idle VMs of each kind to measure PSS with.
        #[arg(long, default_value_t = 4)]
        pss: usize,
    },
    /// Measure clones against cold boots (time to ready, PSS), `vmfactory run`, exec and
    /// stdout throughput; table + target/bench/bench.json.
    Bench {
        /// Timed runs of each kind (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Numbers of idle VMs to measure PSS with.
        #[arg(long, value_delimiter = ',', default_value = "4,8")]
        pss: Vec<usize>,
        /// Instead of the bench: the memory floor of an idle clone, cut by cut (each cut's
        /// PSS by part and time to ready, side by side; target/bench/memfloor.json).
        #[arg(long)]
        memfloor: bool,
        /// Instead of the bench: only the concurrency rows (clones started at once by phase,
        /// then `--runs` rounds of 8 template and 8 direct `get_vm` at once, with where the
        /// CPU went; target/bench/concurrency.json).
        #[arg(long, conflicts_with = "memfloor")]
        concurrency: bool,
        /// Instead of the bench: only the network rows (what a network adds to `get_vm`,
        /// its setup, host<->clone throughput; target/bench/net.json).
        #[arg(long, conflicts_with_all = ["memfloor", "concurrency"])]
        net: bool,
        /// Instead of the bench: only the container rows (`ctr run --rm IMG ID true` with
        /// runc, the vmfactory shim on a template and on a direct VM; the shim's steps;
        /// target/bench/ctr.json). Fails without the shim.
        #[arg(long, conflicts_with_all = ["memfloor", "concurrency", "net"])]
        ctr: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The libraries' logs (e.g. why `accel = auto` chose TCG) on stderr; `RUST_LOG` filters.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Demo => {
            tools::ensure_qemu()?;
            guest::build(false)?;
            demo::run()
        }
        Cmd::Guest {
            packages,
            config,
            kernel,
        } => {
            let spec = guest::ImageSpec::load(config.as_deref(), &packages, kernel)?;
            guest::build_with(&spec, false).map(drop)
        }
        Cmd::Tools => prerequisites(),
        Cmd::OciImage => {
            let out = vmfactory_e2e::oci::ensure_image(&vmfactory_e2e::oci::cache_dir(), false)?;
            println!("{}", out.display());
            Ok(())
        }
        Cmd::Lint => lint::run(),
        Cmd::Package => package::run(),
        Cmd::Test { no_kvm_host, args } => {
            lint::run()?;
            package::run()?;
            prerequisites()?;
            cargo_test(&["--workspace"], &args)?;
            vmgenid_e2e(&args)?;
            if no_kvm_host {
                anyhow::ensure!(!is_ci(), "CI runs the nested KVM host; drop --no-kvm-host");
                return Ok(());
            }
            kvm_host::run_nested(&kvm_host::Options::default())
        }
        Cmd::E2e { args } => {
            prerequisites()?;
            e2e_with_summary(&args)?;
            vmgenid_e2e(&args)
        }
        Cmd::KvmHost {
            mode,
            memory,
            vcpus,
            hosts,
            l2_cpu,
            timeout_min,
            all,
            args,
        } => kvm_host::run_nested(&kvm_host::Options {
            l2_cpu: Some(l2_cpu),
            mode,
            args,
            all,
            memory_mib: memory,
            vcpus,
            hosts,
            timeout: std::time::Duration::from_secs(timeout_min * 60),
        }),
        Cmd::KvmHostInside { manifest } => kvm_host::inside::run(&manifest),
        Cmd::BenchKernels { runs, pss } => {
            tools::ensure_qemu()?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench_kernels::run(runs.max(1), pss.max(1)))?;
            bench_kernels::report(&report).map(drop)
        }
        Cmd::Bench {
            runs,
            pss,
            memfloor: true,
            ..
        } => {
            tools::ensure_qemu()?;
            guest::build(true)?;
            let n = pss.first().copied().unwrap_or(4).max(1);
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench_memfloor::run(n, runs.max(1)))?;
            bench_memfloor::report(&report).map(drop)
        }
        Cmd::Bench {
            runs,
            concurrency: true,
            ..
        } => {
            tools::ensure_qemu()?;
            guest::build(true)?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench_concurrent::run(runs.max(1)))?;
            bench_concurrent::report(&report).map(drop)
        }
        Cmd::Bench {
            runs, ctr: true, ..
        } => {
            // The shim first: without it the bench fails before anything slow.
            let shim = bench_ctr::shim_bin()?;
            tools::ensure_qemu()?;
            tools::ensure_containers()?;
            guest::build(true)?;
            vmfactory_e2e::oci::ensure_image(&vmfactory_e2e::oci::cache_dir(), true)?;
            let env = vmfactory_e2e::guest_env().context("Prerequisites missing")?;
            let report = bench_ctr::run(&env, shim, runs.max(1))?;
            bench_ctr::report(&report).map(drop)
        }
        Cmd::Bench {
            runs, net: true, ..
        } => {
            tools::ensure_qemu()?;
            let env = {
                guest::build(true)?;
                vmfactory_e2e::guest_env().context("Prerequisites missing")?
            };
            let root = tempfile::Builder::new()
                .prefix("vmf-bench-net-")
                .tempdir_in("/dev/shm")?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench_net::run(&env, root.path(), runs.max(1)))?;
            bench_net::report(&report);
            let out = workspace_root().join("target/bench/net.json");
            std::fs::create_dir_all(out.parent().context("bench dir")?)?;
            std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
            println!("JSON: {}", out.display());
            Ok(())
        }
        Cmd::Bench { runs, pss, .. } => {
            tools::ensure_qemu()?;
            guest::build(true)?;
            // The stdout throughput over hybrid vsock needs its backend.
            tools::ensure_vhost_device_vsock()?;
            let rt = tokio::runtime::Runtime::new()?;
            let report = rt.block_on(bench::run(runs.max(1), &pss))?;
            bench::report(&report).map(drop)
        }
    }
}

/// QEMU, the guest image and the vhost-user vsock backend: everything real VMs need; and
/// containerd, runc, erofs-utils and the busybox OCI image for the container tests.
fn prerequisites() -> Result<()> {
    tools::ensure_qemu()?;
    guest::build(false)?;
    tools::ensure_vhost_device_vsock()?;
    tools::ensure_containers()?;
    vmfactory_e2e::oci::ensure_image(&vmfactory_e2e::oci::cache_dir(), false)?;
    Ok(())
}

/// `cargo test` with the guest image and host tools that [`prerequisites`] provided, and
/// real-QEMU tests that fail instead of skipping when one is missing anyway
/// (`vmfactory_e2e::REQUIRE_ENV`).
fn test_command() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .arg("test")
        .env("VMFACTORY_GUEST_DIR", guest::guest_dir())
        .env("VMFACTORY_VHOST_DEVICE_VSOCK", tools::vhost_device_vsock())
        .env(
            vmfactory_e2e::oci::IMAGE_ENV,
            vmfactory_e2e::oci::cache_dir().join("busybox.tar"),
        )
        .env("VMFACTORY_E2E_REQUIRE", "1");
    if is_ci() {
        cmd.env("CI", "true");
    }
    cmd
}

fn cargo_test(selection: &[&str], extra: &[String]) -> Result<()> {
    let mut cmd = test_command();
    cmd.args(selection);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run(&mut cmd)
}

/// The VMGenID scenarios (`e2e/tests/vmgenid.rs`) again on an image with the 6.12 kernel, when
/// the default image has another: only a kernel with a VMGenID driver takes the path where
/// clones reseed themselves and `get_vm` leaves out the host's reseed.
fn vmgenid_e2e(extra: &[String]) -> Result<()> {
    if guest::ImageSpec::load(None, &[], None)?.kernel == guest::GuestKernel::V6_12 {
        return Ok(());
    }
    let (_, dir) = guest::build_kernel_image(guest::GuestKernel::V6_12, false)?;
    let mut cmd = test_command();
    cmd.env("VMFACTORY_GUEST_DIR", dir)
        .args(["-p", "vmfactory-e2e", "--test", "vmgenid"]);
    if !extra.is_empty() {
        cmd.arg("--").args(extra);
    }
    run(&mut cmd)
}

/// Runs the real-QEMU suite, printing one line per scenario (`ok`/`FAIL` and its name) as it
/// finishes; everything else the tests print goes to stderr.
fn e2e_with_summary(extra: &[String]) -> Result<()> {
    use std::io::{BufRead, BufReader};
    println!("e2e: real QEMU, accelerator {}", e2e_accel()?);
    let mut cmd = test_command();
    cmd.args(["-p", "vmfactory-e2e", "--"])
        .args(extra)
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let (mut passed, mut failed) = (0, 0);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            match scenario_result(&line) {
                Some((name, true)) => {
                    passed += 1;
                    println!("ok    {name}");
                }
                Some((name, false)) => {
                    failed += 1;
                    println!("FAIL  {name}");
                }
                None => eprintln!("{line}"),
            }
        }
    }
    let status = child.wait()?;
    println!("e2e: {passed} passed, {failed} failed");
    anyhow::ensure!(status.success(), "The e2e suite failed ({status})");
    Ok(())
}

/// What `accel = auto` (the suite's setting) resolves to on this host: the same probe the
/// library runs (`vmfactory_hypervisor::resolve_accel`, which logs why at `info`).
fn e2e_accel() -> Result<String> {
    use vmfactory_hypervisor::{resolve_accel, Accel, HypervisorConfig};
    let guest = guest::guest_dir();
    let cfg = HypervisorConfig::new(guest.join("vmlinuz"), Some(guest.join("initramfs.cpio")));
    let rt = tokio::runtime::Runtime::new()?;
    Ok(match rt.block_on(resolve_accel(&cfg)) {
        Accel::Kvm => "kvm (a probe boot under /dev/kvm worked)".to_string(),
        other => format!(
            "{} (KVM unusable here; `RUST_LOG=info cargo xtask e2e` says why)",
            other.as_str()
        ),
    })
}

/// `test NAME ... ok` → `(NAME, true)`, `test NAME ... FAILED` → `(NAME, false)`.
pub(crate) fn scenario_result(line: &str) -> Option<(&str, bool)> {
    let rest = line.strip_prefix("test ")?;
    let (name, outcome) = rest.rsplit_once(" ... ")?;
    match outcome.trim() {
        "ok" => Some((name, true)),
        "FAILED" => Some((name, false)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::scenario_result;

    #[test]
    fn scenario_lines() {
        assert_eq!(scenario_result("test boot ... ok"), Some(("boot", true)));
        assert_eq!(
            scenario_result("test a::b ... FAILED"),
            Some(("a::b", false))
        );
        assert_eq!(scenario_result("test result: ok. 3 passed"), None);
        assert_eq!(scenario_result("running 3 tests"), None);
    }

    /// docs/architecture.md lists every internal crate dependency (normal and build) in one
    /// block; `cargo metadata` must report exactly those, so the picture cannot drift.
    #[test]
    fn architecture_md_lists_the_crate_graph() {
        use std::collections::{BTreeMap, BTreeSet};
        let root = crate::util::workspace_root();
        let doc = std::fs::read_to_string(root.join("docs/architecture.md")).expect("doc");
        let block = crate::util::text_block(&doc, "## The crate graph (checked)")
            .expect("docs/architecture.md has no crate-graph block");
        let documented: BTreeMap<String, BTreeSet<String>> = block
            .lines()
            .map(|line| {
                let (name, deps) = line.split_once("->").expect("`crate -> deps` lines");
                let deps = deps
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(String::from)
                    .collect();
                (name.trim().to_owned(), deps)
            })
            .collect();

        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .current_dir(&root)
            .output()
            .expect("cargo metadata");
        assert!(out.status.success(), "cargo metadata failed");
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata");
        let packages = meta["packages"].as_array().expect("packages");
        let names: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
        let actual: BTreeMap<String, BTreeSet<String>> = packages
            .iter()
            .map(|p| {
                let deps = p["dependencies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|d| d["kind"].is_null() || d["kind"] == "build")
                    .filter_map(|d| d["name"].as_str())
                    .filter(|d| names.contains(d))
                    .map(String::from)
                    .collect();
                (p["name"].as_str().unwrap_or_default().to_owned(), deps)
            })
            .collect();
        assert_eq!(
            documented, actual,
            "docs/architecture.md's crate graph differs from the manifests"
        );
    }

    /// The README's library examples are `ignore`d there; each crate's docs carry the same
    /// lines as a compiled doc test. This keeps the two from drifting apart.
    #[test]
    fn readme_examples_are_the_compiled_doc_tests() {
        let root = crate::util::workspace_root();
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
        for krate in ["hypervisor", "agent"] {
            let heading = format!("### Using the {krate} crate alone");
            let after = readme
                .split_once(&heading)
                .unwrap_or_else(|| panic!("README has no {heading:?}"))
                .1;
            let block = after
                .split_once("```rust,ignore\n")
                .and_then(|(_, rest)| rest.split_once("```"))
                .unwrap_or_else(|| panic!("no example under {heading:?}"))
                .0;
            let lib_path = root.join("crates").join(krate).join("src/lib.rs");
            let lib = std::fs::read_to_string(&lib_path).expect("lib.rs");
            let doc: Vec<&str> = lib
                .lines()
                .filter_map(|l| l.strip_prefix("//! ").or(l.strip_prefix("//!")))
                .collect();
            let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
            assert!(lines.len() >= 4, "{krate}: example too short: {block}");
            for line in lines {
                assert!(
                    doc.contains(&line),
                    "{krate}: README line {line:?} is not in {}'s doc test",
                    lib_path.display()
                );
            }
        }
    }
}
