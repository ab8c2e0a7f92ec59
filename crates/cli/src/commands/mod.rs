//! The subcommands.

mod attach;
mod config;
pub mod containerd;
mod destroy;
mod get;
mod init;
mod inspect;
mod leftovers;
mod list;
mod logs;
pub mod run;
mod status;
mod stop;

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use clap::CommandFactory as _;
use vmfactory_vm::ProcessSpec;

use crate::cli::{Cli, Command, ConfigCommand, InspectCommand, ProcessArgs};
use crate::config_file::{self, DEFAULT_TOML};
use crate::failure::{CmdResult, Failure};

/// Runs the command `cli` asks for; the exit code on success (0, or the code of the command
/// `run` or `exec` ran).
pub async fn run(cli: Cli) -> Result<u8, Failure> {
    if cli.version {
        print!("{}", crate::version::text(cli.config.as_deref()).await);
        return Ok(0);
    }
    let Some(cmd) = cli.cmd else {
        return Err(Failure::usage(anyhow::anyhow!(
            "A subcommand is required (see --help)"
        )));
    };
    match cmd {
        Command::Run(args) => {
            let (spec, stdio) = process(args.process);
            let req = run::RunRequest {
                vcpus: args.vcpus,
                memory: args.memory,
                copies: args.copy,
                disks: args.disk,
                net: args.net || !args.publish.is_empty(),
                publish: args.publish,
                spec,
                stdio,
            };
            let t = std::time::Instant::now();
            let settings = load(cli.config.as_deref()).await?;
            run::step_took("config", t);
            run::run(&settings, req).await
        }
        Command::Exec { id, process: p } => {
            let (spec, stdio) = process(p);
            let settings = load(cli.config.as_deref()).await?;
            run::exec(&settings, &id, spec, stdio).await
        }
        cmd => run::code_of(run_other(cmd, cli.config.as_deref()).await),
    }
}

/// The process and stdio `run` and `exec` were asked for.
fn process(p: ProcessArgs) -> (ProcessSpec, attach::Stdio) {
    let (uid, gid) = p.user.unwrap_or((0, 0));
    let spec = ProcessSpec {
        args: p.cmd,
        env: p.env,
        cwd: p.workdir.unwrap_or_default(),
        uid,
        gid,
        ..Default::default()
    };
    let stdio = attach::Stdio {
        interactive: p.interactive,
        tty: p.tty,
    };
    (spec, stdio)
}

async fn load(path: Option<&std::path::Path>) -> Result<config_file::Settings, Failure> {
    let source = config_file::choose(path).await;
    let settings = config_file::load(&source).await?;
    tracing::debug!(config = %settings.origin, "configuration loaded");
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    Ok(settings)
}

/// The commands without an exit code of their own.
async fn run_other(cmd: Command, config: Option<&Path>) -> CmdResult {
    // What needs no configuration file (a wire form carries its own config).
    match &cmd {
        Command::Config {
            cmd: ConfigCommand::Default,
        } => {
            print!("{DEFAULT_TOML}");
            return Ok(());
        }
        Command::Inspect {
            what: InspectCommand::Wire { file },
        } => return inspect::wire(file).await,
        Command::Completions { shell } => {
            let mut out = std::io::stdout();
            clap_complete::generate(*shell, &mut Cli::command(), "vmfactory", &mut out);
            return Ok(());
        }
        Command::Man { subcommand } => return man(subcommand.as_deref()),
        _ => {}
    }
    // Needs no vmfactory configuration either; takes `cmd` by value.
    let cmd = match cmd {
        Command::Containerd { cmd } => return containerd::run(cmd).await,
        cmd => cmd,
    };
    // Prints the warnings itself, and every problem on its own line.
    if let Command::Config {
        cmd: ConfigCommand::Check,
    } = cmd
    {
        return config::check(config).await;
    }
    let settings = load(config).await?;
    match cmd {
        Command::Run(_)
        | Command::Exec { .. }
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Containerd { .. } => Ok(()),
        Command::List { json } => list::run(&settings, json).await,
        Command::Stop { id } => stop::run(&settings, &id).await,
        Command::Init => init::run(&settings).await,
        Command::Status { json } => status::run(&settings, json).await,
        Command::Destroy => destroy::run(&settings).await,
        Command::Get {
            vcpus,
            memory,
            hold,
        } => get::run(&settings, vcpus, memory, hold).await,
        Command::Logs { id, follow } => logs::run(&settings, &id, follow).await,
        Command::Inspect { what } => match what {
            InspectCommand::Template => inspect::template(&settings).await,
            InspectCommand::Vm { id } => inspect::vm(&settings, &id).await,
            InspectCommand::Wire { file } => inspect::wire(&file).await,
        },
        Command::Config { .. } => Ok(()),
    }
}

/// `vmfactory man [SUBCOMMAND]`: the manual page of `vmfactory`, or of `vmfactory-SUBCOMMAND`.
fn man(sub: Option<&str>) -> CmdResult {
    let mut top = Cli::command();
    // Built, the subcommands carry the global options (`--config`, `--verbose`, ...) too.
    top.build();
    let page = match sub {
        None => top,
        Some(name) => {
            let found = top
                .get_subcommands()
                .find(|s| s.get_name() == name || s.get_all_aliases().any(|a| a == name))
                .cloned();
            let Some(cmd) = found else {
                return Err(Failure::usage(anyhow::anyhow!(
                    "No subcommand {name:?} (see `vmfactory --help`)"
                )));
            };
            let full = format!("vmfactory-{}", cmd.get_name());
            cmd.name(full.clone())
                .bin_name(full.replace('-', " "))
                .version(crate::version::PACKAGE)
        }
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .context("Cannot render the manual page")?;
    std::io::stdout()
        .write_all(&out)
        .context("Cannot write the manual page")?;
    Ok(())
}
