//! `kubectl hookrun console`: a small web page on loopback, served with a per-run random
//! token in its URL, backed by this process's kubeconfig identity.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::context::Context;

mod guard;
mod server;
mod view;

/// Options of `kubectl hookrun console`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  # Serve the console for namespace team-a and open it in the browser
  kubectl hookrun console -n team-a --open

  # A fixed port (still loopback only); the URL with its token is printed first
  kubectl hookrun console --port 8717")]
pub struct Args {
    /// The loopback port to listen on (0: any free port).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Open the console in the default browser (xdg-open, or open on macOS).
    #[arg(long)]
    pub open: bool,
}

/// Serves the console until interrupted.
pub async fn run(context: Context, args: Args) -> anyhow::Result<ExitCode> {
    // Loopback only: nothing beyond this machine can reach the console.
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, args.port));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listen on {address} (--port)"))?;
    let port = listener
        .local_addr()
        .context("read the console's own address")?
        .port();
    let token = guard::ConsoleToken::generate();
    let url = format!("http://127.0.0.1:{port}/?token={}", token.as_str());
    let namespace = context.namespace.clone();
    let console = Arc::new(server::Console {
        context,
        token,
        port,
    });
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "console: {url}").context("print the console's URL")?;
        stdout.flush().context("print the console's URL")?;
    }
    eprintln!(
        "Serving namespace {namespace} as your kubeconfig identity; anyone with the URL above \
         can act as you here. Ctrl-C stops it."
    );
    if args.open {
        open_browser(&url);
    }
    let serve = axum::serve(listener, server::app(console));
    tokio::select! {
        served = serve => served.context("serve the console")?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the desktop to open `url`; says so on stderr when it cannot, the URL is printed
/// anyway.
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let started = std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match started {
        // Reaped on its own thread, so no zombie is left behind.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(error) => {
            eprintln!("could not run {opener} to open the browser ({error}); open the URL above")
        }
    }
}
