//! The subcommands.

mod destroy;
mod get;
mod init;
mod inspect;
mod leftovers;
mod status;

use crate::cli::{Cli, Command, ConfigCommand, InspectCommand};
use crate::config_file::{self, DEFAULT_TOML};
use crate::failure::CmdResult;

/// Runs the command `cli` asks for.
pub async fn run(cli: Cli) -> CmdResult {
    if let Command::Config {
        cmd: ConfigCommand::Default,
    } = cli.cmd
    {
        print!("{DEFAULT_TOML}");
        return Ok(());
    }
    // A wire form carries its own config: checking one needs no configuration file.
    if let Command::Inspect {
        what: InspectCommand::Wire { file },
    } = &cli.cmd
    {
        return inspect::wire(file).await;
    }
    let source = config_file::choose(cli.config.as_deref()).await;
    let settings = config_file::load(&source).await?;
    tracing::debug!(config = %settings.origin, "configuration loaded");
    match cli.cmd {
        Command::Init => init::run(&settings).await,
        Command::Status { json } => status::run(&settings, json).await,
        Command::Destroy => destroy::run(&settings).await,
        Command::Get {
            vcpus,
            memory,
            hold,
        } => get::run(&settings, vcpus, memory, hold).await,
        Command::Config {
            cmd: ConfigCommand::Check,
        } => {
            settings.check_files().await?;
            println!("{}: OK", settings.origin);
            Ok(())
        }
        Command::Inspect { what } => match what {
            InspectCommand::Template => inspect::template(&settings).await,
            InspectCommand::Vm { id } => inspect::vm(&settings, &id).await,
            InspectCommand::Wire { file } => inspect::wire(&file).await,
        },
        Command::Config {
            cmd: ConfigCommand::Default,
        } => Ok(()),
    }
}
