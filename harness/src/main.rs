//! `hookrun-harness`: runs one session from a session pod (see lib.rs).

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = hookrun_harness::Args::parse();
    hookrun_harness::init_tracing(&args.log_filter);
    ExitCode::from(hookrun_harness::run(args).await.exit_code())
}
