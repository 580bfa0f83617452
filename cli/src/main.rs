//! `kubectl hookrun`: everyday use of hookrun from a terminal, acting as the user's own
//! kubeconfig identity (no new credentials, nothing public).

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod console;
mod context;
pub mod ops;

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
