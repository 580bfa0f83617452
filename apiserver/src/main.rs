//! `hookrun-apiserver`: the webhook front door (see lib.rs).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = hookrun_apiserver::Args::parse();
    let _log_writer = hookrun_apiserver::init_tracing(&args.log_filter, args.log_format);
    hookrun_apiserver::run(args).await?;
    Ok(())
}
