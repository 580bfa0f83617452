//! `hookrun-operator`: parse the flags, run until SIGTERM.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = hookrun_operator::cli::Args::parse();
    hookrun_operator::init_tracing(args.log_format);
    hookrun_operator::run(args).await?;
    Ok(())
}
