//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands::run::{
    parse_copy, parse_disk, parse_env, parse_publish, parse_user, CopyArg, DiskArg,
};
use vmfactory_net::proxy::PortSpec;

/// Boot, template and clone QEMU micro-VMs, and hand them out sized to each request.
#[derive(Debug, Parser)]
#[command(
    name = "vmfactory",
    version = crate::version::PACKAGE,
    disable_version_flag = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The configuration file [default: /etc/vmfactory/config.toml if it exists, else the
    /// embedded default (`vmfactory config default`)].
    #[arg(long, global = true, value_name = "PATH", env = crate::config_file::CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// On failure, print the whole error chain, one cause per line.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to log on stderr: a level (`error`, `warn`, `info`, `debug`, `trace`) or a
    /// `RUST_LOG`-style filter such as `vmfactory_vm=debug` [default: `$RUST_LOG`, else
    /// `warn`].
    #[arg(long, global = true, value_name = "LEVEL|FILTER")]
    pub log_level: Option<String>,
    /// When to colour logs: `auto` colours only on a terminal, and never with `NO_COLOR` set.
    #[arg(long, global = true, value_enum, default_value_t = ColorWhen::Auto)]
    pub color: ColorWhen,
    /// Print the version, the commit it was built from, and the QEMU and guest image the
    /// configuration points at.
    #[arg(long, short = 'V')]
    pub version: bool,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Option<Command>,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// When to colour output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorWhen {
    /// On a terminal, unless `NO_COLOR` is set.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the template (`[factory] enable_template`) and, with `vm_cache_number > 0`, run
    /// the VM-cache server in the foreground until Ctrl-C, SIGTERM or `vmfactory destroy`.
    /// VMs left by killed commands are ended first.
    Init,
    /// Show whether the factory is on: the template and its metadata, the VM-cache server's
    /// pid and its ready VMs, and what killed commands left (VMs no process owns, a stale
    /// template tmpfs).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop the VM-cache server and remove the template. Succeeds when there is nothing left.
    Destroy,
    /// Get a VM sized to the request and print it as JSON; it is stopped before exit unless
    /// `--hold` is given.
    Get {
        /// vCPUs, from `default_vcpus` to `default_maxvcpus` [default: `default_vcpus`].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        vcpus: Option<u32>,
        /// Memory in MiB, from `default_memory` to `default_maxmemory` (above `default_memory`
        /// only with `memory_slots`) [default: `default_memory`].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        memory: Option<u64>,
        /// Keep the VM running until Ctrl-C or SIGTERM, then stop it.
        #[arg(long)]
        hold: bool,
    },
    /// Run a command in a VM from the factory (the VM-cache server if one runs, else the
    /// template, else a VM booted for it), streaming its stdin, stdout and stderr; exit with
    /// its status (128+N for signal N) and stop the VM. Ctrl-C sends SIGINT to the command, a
    /// second one stops the VM.
    Run(RunArgs),
    /// Run a command in a VM held by `vmfactory get --hold` (its agent is free for others).
    Exec {
        /// The VM id `get` printed.
        id: String,
        /// Options of the process.
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Print the guest console log of a VM: one held by `get --hold` (or served by the
    /// VM-cache server), or one that failed to come up (kept under `<run_root>/failed/<ID>`
    /// until `destroy`).
    Logs {
        /// The VM id (`get` prints it; a failed VM's error names it).
        id: String,
        /// Keep printing new lines until the VM stops (or Ctrl-C).
        #[arg(short, long)]
        follow: bool,
    },
    /// The configuration.
    Config {
        /// What to do with it.
        #[command(subcommand)]
        cmd: ConfigCommand,
    },
    /// List the VMs under `[runtime] run_root`: id, source, size, QEMU pid, age and owner.
    #[command(visible_alias = "ps")]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM: ask the command that holds it (`get --hold`, `run`) to stop it, or end it
    /// when no process owns it any more. VMs of the VM-cache server are stopped with it
    /// (`vmfactory destroy`).
    Stop {
        /// The VM id (`vmfactory list`).
        id: String,
    },
    /// Print a shell completion script for `vmfactory` on stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff) on stdout: `vmfactory man | man -l -`.
    Man {
        /// The subcommand whose page to print (`vmfactory-SUBCOMMAND`) [default: the page of
        /// `vmfactory`].
        subcommand: Option<String>,
    },
    /// Set up containerd to run OCI containers in vmfactory VMs: `vmfactory containerd
    /// install` (docs/containers.md).
    Containerd {
        /// What to do.
        #[command(subcommand)]
        cmd: crate::commands::containerd::ContainerdCommand,
    },
    /// Check and print what vmfactory stores, as JSON: the template metadata, a VM's saved
    /// state, a VM wire form. Read-only: takes no lock and changes nothing.
    Inspect {
        /// What to inspect.
        #[command(subcommand)]
        what: InspectCommand,
    },
}

/// What `run` and `exec` start, and how.
#[derive(Debug, Args)]
pub struct ProcessArgs {
    /// Set an environment variable (`K=V`, or `K` to pass ours); repeatable.
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<String>,
    /// Working directory in the guest [default: /].
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as this user (numeric `UID[:GID]`) [default: 0:0].
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]", value_parser = parse_user)]
    pub user: Option<(u32, u32)>,
    /// Keep stdin open and forward it.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Run on a terminal in the guest (our terminal goes raw; its size follows ours).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// `run`'s arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// vCPUs [default: `default_vcpus`].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: Option<u32>,
    /// Memory in MiB [default: `default_memory`].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub memory: Option<u64>,
    /// Copy a host file into the guest before the command runs (`SRC:DST`, DST absolute);
    /// repeatable.
    #[arg(long = "copy", value_name = "SRC:DST", value_parser = parse_copy)]
    pub copy: Vec<CopyArg>,
    /// Attach an ext4 image (raw or qcow2) and mount it in the guest (`PATH[:ro]:MOUNTPOINT`);
    /// repeatable. One read-only image can serve many VMs at once.
    #[arg(long = "disk", value_name = "PATH[:ro]:MOUNTPOINT", value_parser = parse_disk)]
    pub disk: Vec<DiskArg>,
    /// Give the VM a network (`[network]`'s subnet and egress), even where `[network]
    /// enable` is off.
    #[arg(long)]
    pub net: bool,
    /// Forward a host TCP port to a guest port (`[HOST_IP:]HOST_PORT:GUEST_PORT`, as `docker
    /// run -p`); implies `--net`; repeatable.
    #[arg(short = 'p', long = "publish", value_name = "[IP:]HOST_PORT:GUEST_PORT", value_parser = parse_publish)]
    pub publish: Vec<PortSpec>,
    /// Options of the process.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `inspect` subcommands.
#[derive(Debug, Subcommand)]
pub enum InspectCommand {
    /// The template metadata under `[factory] template_path`.
    Template,
    /// The saved state of a VM under `[runtime] run_root`, and whether its QEMU still runs.
    Vm {
        /// The VM id (the name of its directory `<run_root>/vm/<ID>`).
        id: String,
    },
    /// A VM wire form (what the VM-cache server hands out); needs no configuration.
    Wire {
        /// The file holding it, or `-` for standard input.
        file: PathBuf,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the embedded default configuration.
    Default,
    /// Load and check the configuration (including that the guest files are readable) and
    /// print where it came from.
    Check,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The shipped unit: `Type=notify` (what `init` speaks) and every vmfactory command it
    /// runs parses with this command line.
    #[test]
    fn systemd_unit_runs_commands_that_exist() {
        let unit = include_str!("../../../contrib/systemd/vmfactory.service");
        assert!(unit.lines().any(|l| l == "Type=notify"), "{unit}");
        let mut commands = 0;
        for line in unit.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if !key.starts_with("Exec") {
                continue;
            }
            // `-` before the path: a failure does not fail the unit.
            let words: Vec<&str> = value.trim_start_matches('-').split_whitespace().collect();
            assert_eq!(words.first(), Some(&"/usr/local/bin/vmfactory"), "{line}");
            let cli = Cli::try_parse_from(&words).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(cli.cmd.is_some(), "{line}");
            commands += 1;
        }
        assert_eq!(commands, 3, "ExecStartPre, ExecStart, ExecStopPost");
    }
}
