//! `kubectl hookrun console`: a small web page on loopback, served with a per-run random
//! token in its URL, backed by this process's kubeconfig identity.

use std::process::ExitCode;

use crate::context::Context;

/// Options of `kubectl hookrun console`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The loopback port to listen on (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
}

/// Serves the console until interrupted.
pub async fn run(context: Context, args: Args) -> anyhow::Result<ExitCode> {
    let _ = (context, args);
    anyhow::bail!("the console is not built yet")
}
