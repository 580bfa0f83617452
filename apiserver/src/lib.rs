//! The hookrun apiserver: authenticates webhooks from a watched index and opens Sessions
//! (issue 4), holds wait-mode requests and serves the read and runner APIs (issue 5).
//! Today it serves its admin endpoints and shuts down cleanly.

pub mod body;
pub mod client_ip;
pub mod idempotency;
pub mod rate_limit;
pub mod signature;
pub mod title;

use std::net::SocketAddr;

use axum::{Router, routing::get};
use tokio::net::TcpListener;

/// Command-line flags; each can also come from the environment.
#[derive(clap::Parser, Debug, Clone)]
#[command(version, about = "hookrun's webhook front door and session API")]
pub struct Args {
    /// Address of the public listener (webhooks, read API, runner API).
    #[arg(long, env = "HOOKRUN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics; never the public port.
    #[arg(long, env = "HOOKRUN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Log filter in `RUST_LOG` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

/// What stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// Structured logs to stderr, filtered by `filter`.
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// The admin router: liveness and readiness.
pub fn admin_app() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Serves until SIGTERM.
pub async fn run(args: Args) -> Result<(), Error> {
    let admin = TcpListener::bind(args.admin_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: args.admin_listen,
            source,
        })?;
    tracing::info!(admin = %args.admin_listen, "hookrun-apiserver started");
    axum::serve(admin, admin_app())
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(Error::Serve)?;
    tracing::info!("hookrun-apiserver stopped");
    Ok(())
}
