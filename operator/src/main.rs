//! `hookrun-operator`: parse the flags, run until SIGTERM.

use clap::Parser;

/// One thread runs everything: the operator waits on the API far more than it computes,
/// and every extra worker thread costs its stack and, with glibc, a malloc arena of its
/// own whose freed pages are seldom given back.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = hookrun_operator::cli::Args::parse();
    hookrun_operator::init_tracing(args.log_format);
    hookrun_operator::run(args).await?;
    Ok(())
}
