//! The command line: the global options and one subcommand per verb.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::console;
use crate::context::{Context, Global};

/// Agents, webhook URLs, Sessions and Grants of hookrun, as your kubeconfig identity.
#[derive(Debug, Parser)]
#[command(name = "kubectl-hookrun", bin_name = "kubectl hookrun", version)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a local web console (loopback only) for watching and starting Sessions.
    Console(console::Args),
}

/// Runs a command; the exit code says how it ended.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Console(args) => {
            let context = Context::connect(&cli.global).await?;
            console::run(context, args).await
        }
    }
}
