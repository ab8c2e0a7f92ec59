//! The subcommands.

mod attach;
mod config;
mod destroy;
mod get;
mod init;
mod inspect;
mod leftovers;
pub mod run;
mod status;

use vmfactory_vm::ProcessSpec;

use crate::cli::{Cli, Command, ConfigCommand, InspectCommand, ProcessArgs};
use crate::config_file::{self, DEFAULT_TOML};
use crate::failure::{CmdResult, Failure};

/// Runs the command `cli` asks for; the exit code on success (0, or the code of the command
/// `run` or `exec` ran).
pub async fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.cmd {
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
        cmd => run::code_of(
            run_other(Cli {
                cmd,
                config: cli.config,
                verbose: cli.verbose,
                log_format: cli.log_format,
            })
            .await,
        ),
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
async fn run_other(cli: Cli) -> CmdResult {
    if let Command::Config {
        cmd: ConfigCommand::Default,
    } = cli.cmd
    {
        print!("{DEFAULT_TOML}");
        return Ok(());
    }
    // Prints the warnings itself, and every problem on its own line.
    if let Command::Config {
        cmd: ConfigCommand::Check,
    } = cli.cmd
    {
        return config::check(cli.config.as_deref()).await;
    }
    // A wire form carries its own config: checking one needs no configuration file.
    if let Command::Inspect {
        what: InspectCommand::Wire { file },
    } = &cli.cmd
    {
        return inspect::wire(file).await;
    }
    let settings = load(cli.config.as_deref()).await?;
    match cli.cmd {
        Command::Run(_) | Command::Exec { .. } => Ok(()),
        Command::Init => init::run(&settings).await,
        Command::Status { json } => status::run(&settings, json).await,
        Command::Destroy => destroy::run(&settings).await,
        Command::Get {
            vcpus,
            memory,
            hold,
        } => get::run(&settings, vcpus, memory, hold).await,
        Command::Inspect { what } => match what {
            InspectCommand::Template => inspect::template(&settings).await,
            InspectCommand::Vm { id } => inspect::vm(&settings, &id).await,
            InspectCommand::Wire { file } => inspect::wire(&file).await,
        },
        Command::Config { .. } => Ok(()),
    }
}
