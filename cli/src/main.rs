//! `kubectl hookrun`: everyday use of hookrun from a terminal, acting as the user's own
//! kubeconfig identity (no new credentials, nothing public).

use std::process::ExitCode;

use clap::Parser;

mod agents;
mod cli;
mod console;
mod context;
mod grants;
pub mod ops;
mod output;
mod parse;
mod sessions;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
