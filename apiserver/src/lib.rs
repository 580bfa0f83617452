//! The hookrun apiserver: authenticates webhooks from a watched index and opens Sessions,
//! holds wait-mode requests and serves the read and runner APIs.
//! It serves the webhook door and the read API on the public port, the runner API on
//! the runner port (reached only by session pods), and `/healthz`, `/readyz` and
//! `/metrics` on the admin port.

pub(crate) mod access_log;
pub mod api;
pub(crate) mod auth;
pub(crate) mod auth_limit;
pub mod body;
pub mod client_ip;
pub(crate) mod dns_name;
pub mod drain;
pub mod error;
pub mod grant;
pub(crate) mod http_limits;
pub mod hub;
pub mod idempotency;
pub mod index;
pub(crate) mod kube_calls;
pub mod metrics;
pub mod rate_limit;
pub mod read;
pub mod runner;
pub(crate) mod session_cache;
pub(crate) mod session_status;
pub mod signature;
pub mod store;
pub mod title;
pub(crate) mod wait;
pub mod webhook;
pub(crate) mod webhook_input;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Router, routing::get};
use hookrun_crds::duration::FlagDuration;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::client_ip::TrustedProxies;
use crate::drain::Drain;
use crate::index::{Index, SharedIndex};
use crate::metrics::Metrics;
use crate::rate_limit::{RateLimit, RateLimiter};
use crate::store::KubeSessionStore;
use crate::webhook::AppState;

/// Command-line flags; each can also come from the environment.
#[derive(clap::Parser, Debug, Clone)]
#[command(version, about = "hookrun's webhook front door and session API")]
pub struct Args {
    /// Address of the public listener (webhooks, read API).
    #[arg(long, env = "HOOKRUN_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the runner API (`/runner/v1/...`), which only session pods call; never
    /// the public port.
    #[arg(long, env = "HOOKRUN_RUNNER_LISTEN", default_value = "0.0.0.0:8081")]
    pub runner_listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics; never the public port.
    #[arg(long, env = "HOOKRUN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Log filter in `RUST_LOG` syntax; `kube_client` is held to `error` unless named.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Log format: `text` lines or one JSON object per line.
    #[arg(long, env = "HOOKRUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Comma-separated CIDRs of proxies whose `X-Forwarded-For` is believed.
    #[arg(long, env = "HOOKRUN_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,
    /// The largest webhook body accepted, in bytes.
    #[arg(long, env = "HOOKRUN_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Webhooks per second per Agent once the burst is spent.
    #[arg(long, env = "HOOKRUN_RATE_LIMIT_PER_SECOND", default_value_t = 10.0)]
    pub rate_limit_per_second: f64,
    /// Webhooks an Agent may receive at once.
    #[arg(long, env = "HOOKRUN_RATE_LIMIT_BURST", default_value_t = 50)]
    pub rate_limit_burst: u32,
    /// How long a client may take to send a request's headers (`10s`, `500ms`, `1m`; a
    /// bare number is seconds; zero is refused).
    #[arg(
        long,
        env = "HOOKRUN_HEADER_READ_TIMEOUT",
        default_value = "10s",
        value_parser = FlagDuration::parse_positive
    )]
    pub header_read_timeout: FlagDuration,
    /// How long the create of a webhook's Session may take before the webhook is
    /// answered 503 with Retry-After (same grammar as `--header-read-timeout`).
    #[arg(
        long,
        env = "HOOKRUN_SESSION_STORE_TIMEOUT",
        default_value = "5s",
        value_parser = FlagDuration::parse_positive
    )]
    pub session_store_timeout: FlagDuration,
    /// TokenReviews and SubjectAccessReviews per second that read API callers from one
    /// address may cause once the burst is spent, unless they are allowed.
    #[arg(long, env = "HOOKRUN_REVIEW_LIMIT_PER_SECOND", default_value_t = 1.0)]
    pub review_limit_per_second: f64,
    /// Reviews one address may cause at once before it gets 429.
    #[arg(long, env = "HOOKRUN_REVIEW_LIMIT_BURST", default_value_t = 20)]
    pub review_limit_burst: u32,
    /// Comma-separated namespaces to serve; every namespace when absent.
    #[arg(long, env = "HOOKRUN_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// After SIGTERM, how long `/readyz` fails while the server keeps serving, before
    /// held wait-mode requests get their 202 and the listeners close (`15s`, `0s`; a
    /// bare number is seconds). The pod's grace period must exceed this plus 15 s.
    #[arg(long, env = "HOOKRUN_DRAIN_PERIOD", default_value = "15s")]
    pub drain_period: FlagDuration,
    /// Bytes of whole Sessions the read and runner APIs keep while they are being read
    /// (recently read ones, kept current by the Session watch); 0 reads the cluster
    /// every time.
    #[arg(long, env = "HOOKRUN_READ_CACHE_BYTES", default_value_t = session_cache::DEFAULT_READ_CACHE_BYTES)]
    pub read_cache_bytes: u64,
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
    #[error("cannot build a Kubernetes client (no in-cluster config or kubeconfig?): {0}")]
    Client(#[source] kube::Error),
    #[error("the rate limit flags are invalid: {0}")]
    RateLimit(#[from] rate_limit::RateLimitError),
}

/// What the admin router reads.
#[derive(Clone)]
pub struct AdminState {
    pub(crate) index: SharedIndex,
    pub(crate) metrics: Arc<Metrics>,
    /// `/readyz` fails once shutdown begins.
    pub(crate) drain: Drain,
}

/// The Kubernetes client's log target. At WARN it writes whole response bodies it cannot
/// parse (Session titles, env values), so it is held to ERROR unless the filter names it.
const KUBE_CLIENT_TARGET: &str = "kube_client";

/// The log filter in effect for the user's `filter`: theirs, with the Kubernetes client
/// held to errors unless they set its level themselves.
pub fn log_filter(filter: &str) -> String {
    let filter = filter.trim();
    if filter.contains(KUBE_CLIENT_TARGET) {
        return filter.to_owned();
    }
    let base = if filter.is_empty() { "info" } else { filter };
    format!("{base},{KUBE_CLIENT_TARGET}=error")
}

/// Lines the log queue holds before a request waits for the writer. The queue's slots are
/// allocated and touched at start (32 bytes each): the library's default of 128,000
/// lines is 4 MiB of resident memory in an idle process. 8,192 lines (256 KiB) absorb a
/// burst of refusals, which are folded per source anyway.
pub const LOG_QUEUE_LINES: usize = 8192;

/// Structured logs to stderr, filtered by `filter` (see [`log_filter`]). Lines are
/// written by a thread of their own: a request formats its line and queues it, and waits
/// for the terminal or the log collector only when the queue ([`LOG_QUEUE_LINES`]) is
/// full, so no line is ever dropped. Keep the guard until the process ends: dropping it
/// flushes.
#[must_use = "dropping the guard stops the log writer"]
pub fn init_tracing(
    filter: &str,
    format: LogFormat,
) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter("info")));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("hookrun-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The admin router: liveness, readiness (503 until the index has listed once) and
/// metrics.
pub fn admin_app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> axum::response::Response {
    if state.drain.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let synced = state
        .index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_synced();
    if synced {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the index is loading").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> axum::response::Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// The public router: the webhook door and the read API. The runner API is not here: it
/// has its own listener ([`runner::router`]), so `/runner/v1/...` is 404 on this port.
pub fn public_app(webhooks: AppState, api: api::ApiState) -> webhook::Routes {
    webhook::app(webhooks).merge(read::router(api))
}

/// Serves `app` over HTTP/1 on `listener` until `shutdown` flips, within the limits of
/// [`http_limits`] (header count and bytes, target length, buffers, header read
/// timeout), with the client's address for the handlers (`ConnectInfo` for routers).
pub async fn serve_public(
    listener: TcpListener,
    app: impl Into<webhook::Routes>,
    header_read_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    serve(
        listener,
        app.into(),
        header_read_timeout,
        stop,
        Drain::new(),
    )
    .await;
}

/// Like [`serve_public`], stopping as `drain` says: while it drains, every answer carries
/// `Connection: close`; once it closes, no new connection is accepted, and requests in
/// flight get [`drain::FINISH_BUDGET`] to finish.
pub async fn serve_draining(
    listener: TcpListener,
    app: impl Into<webhook::Routes>,
    header_read_timeout: Duration,
    drain: Drain,
) {
    let closing = drain.clone();
    let stop = async move { closing.reached(drain::Stage::Closing).await };
    serve(listener, app.into(), header_read_timeout, stop, drain).await;
}

async fn serve(
    listener: TcpListener,
    app: webhook::Routes,
    header_read_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
    drain: Drain,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let app = Arc::new(app);
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let routes = app.clone();
                let drain = drain.clone();
                let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let refused = http_limits::refuse_long_target(request.uri());
                    let routes = routes.clone();
                    let drain = drain.clone();
                    async move {
                        let mut response = match refused {
                            Some(response) => response,
                            None => routes.answer(request, peer).await,
                        };
                        // Draining: clients open their next request elsewhere.
                        if drain.is_draining() {
                            response.headers_mut().insert(
                                axum::http::header::CONNECTION,
                                axum::http::HeaderValue::from_static("close"),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let builder = http_limits::http1_builder(header_read_timeout);
                let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                });
            }
            () = &mut stop => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain::FINISH_BUDGET, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            budget_ms = drain::FINISH_BUDGET.as_millis() as u64,
            "connections still open after the finish budget; closing them"
        );
    }
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

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Serves until SIGTERM.
pub async fn run(args: Args) -> Result<(), Error> {
    let limit = RateLimit::new(args.rate_limit_burst, args.rate_limit_per_second)?;
    let review_limit = RateLimit::new(args.review_limit_burst, args.review_limit_per_second)?;
    let public = bind(args.listen).await?;
    let runner_listener = bind(args.runner_listen).await?;
    let admin = bind(args.admin_listen).await?;
    let public_addr = public.local_addr().map_err(Error::Serve)?;
    let runner_addr = runner_listener.local_addr().map_err(Error::Serve)?;
    let admin_addr = admin.local_addr().map_err(Error::Serve)?;

    let hub = hub::SessionHub::with_read_cache_bytes(args.read_cache_bytes);
    let drain = Drain::new();
    tokio::spawn(
        drain
            .clone()
            .run(shutdown_signal(), args.drain_period.0, hub.clone()),
    );
    let index: SharedIndex = Arc::new(RwLock::new(Index::new(index::stream_count(
        &args.namespaces,
    ))));
    // Building the client reads the kubeconfig or the in-cluster config and contacts
    // nothing: the watches retry while the cluster is unreachable, and the server stays
    // unready meanwhile.
    let metrics = Arc::new(Metrics::default());
    let client = kube_calls::counted_client(metrics.clone())
        .await
        .map_err(Error::Client)?;
    tokio::spawn(index::run_watches(
        client.clone(),
        args.namespaces.clone(),
        index.clone(),
        hub.clone(),
    ));
    let store = KubeSessionStore::new(client.clone()).with_timeout(args.session_store_timeout.0);
    let api_state = api::ApiState::new(client.clone(), hub.clone(), metrics.clone())
        .with_review_limit(args.trusted_proxies.clone(), review_limit)
        .with_index(index.clone());
    let store = store.with_status_writer(api_state.status.clone());
    let grant_index: grant::SharedGrantIndex = Arc::new(RwLock::new(grant::GrantIndex::new(
        grant::stream_count(&args.namespaces),
    )));
    tokio::spawn(grant::run_watches(
        client.clone(),
        args.namespaces.clone(),
        grant_index.clone(),
    ));
    let hooks = grant::HookState {
        index: grant_index,
        client: client.clone(),
        status: api_state.status.clone(),
        trusted_proxies: Arc::new(args.trusted_proxies.clone()),
        rate_limiter: Arc::new(Mutex::new(RateLimiter::new(limit))),
        refusals: Arc::new(Mutex::new(auth_limit::ReviewLimiter::new(
            review_limit,
            auth_limit::DEFAULT_CAPACITY,
            std::time::Instant::now(),
        ))),
        metrics: metrics.clone(),
        store_timeout: args.session_store_timeout.0,
    };
    let rate_limiter = Arc::new(Mutex::new(RateLimiter::new(limit)));
    let state = AppState {
        index: index.clone(),
        sessions: Arc::new(store),
        trusted_proxies: Arc::new(args.trusted_proxies.clone()),
        max_body_bytes: args.max_body_bytes,
        rate_limiter: rate_limiter.clone(),
        metrics: metrics.clone(),
        hub,
    };
    // Buckets that refilled are forgotten, so deleted Agents do not pile up.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            rate_limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .prune(std::time::Instant::now());
        }
    });

    tracing::info!(public = %public_addr, runner = %runner_addr, admin = %admin_addr, "hookrun-apiserver started");
    let runner_server = serve_draining(
        runner_listener,
        runner::router(api_state.clone()),
        args.header_read_timeout.0,
        drain.clone(),
    );
    let public_server = serve_draining(
        public,
        public_app(state, api_state).merge(grant::router(hooks)),
        args.header_read_timeout.0,
        drain.clone(),
    );
    // The admin port answers (`/readyz` 503) until the public and runner ports are done.
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let admin_server = axum::serve(
        admin,
        admin_app(AdminState {
            index,
            metrics,
            drain,
        }),
    )
    .with_graceful_shutdown(async move {
        let _ = finished.await;
    });
    let serving = async move {
        tokio::join!(public_server, runner_server);
        let _ = done.send(());
    };
    let (admin_result, ()) = tokio::join!(admin_server, serving);
    admin_result.map_err(Error::Serve)?;
    tracing::info!("hookrun-apiserver stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get_admin(state: &AdminState, path: &str) -> (StatusCode, String) {
        let response = admin_app(state.clone())
            .oneshot(Request::get(path).body(Body::empty()).expect("a request"))
            .await
            .expect("infallible");
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_waits_for_the_index_and_metrics_are_served() {
        let state = AdminState {
            index: Arc::new(RwLock::new(Index::new(1))),
            metrics: Arc::new(Metrics::default()),
            drain: Drain::new(),
        };
        assert_eq!(get_admin(&state, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get_admin(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        state
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .mark_synced();
        assert_eq!(get_admin(&state, "/readyz").await.0, StatusCode::OK);
        // Shutdown begins: not ready at once, still alive.
        let serving = state.clone();
        state.drain.advance(drain::Stage::Draining);
        assert_eq!(
            get_admin(&state, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(get_admin(&serving, "/healthz").await.0, StatusCode::OK);
        state
            .metrics
            .observe("/webhooks/{namespace}/{agent}", "GET", "ping", 200, 0.001);
        let (status, text) = get_admin(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("hookrun_apiserver_requests_total"), "{text}");
    }

    #[test]
    fn the_kube_client_logs_errors_only_unless_the_filter_names_it() {
        assert_eq!(log_filter("info"), "info,kube_client=error");
        assert_eq!(log_filter(""), "info,kube_client=error");
        assert_eq!(
            log_filter("warn,hookrun_apiserver=debug"),
            "warn,hookrun_apiserver=debug,kube_client=error"
        );
        assert_eq!(
            log_filter("info,kube_client=debug"),
            "info,kube_client=debug"
        );
        for filter in ["info", "", "debug,hyper=info"] {
            assert!(
                tracing_subscriber::EnvFilter::try_new(log_filter(filter)).is_ok(),
                "{filter}"
            );
        }
    }

    #[test]
    fn header_read_timeout_takes_the_shared_duration_grammar() {
        use clap::Parser;
        let timeout = |s: &str| {
            Args::try_parse_from(["hookrun-apiserver", "--header-read-timeout", s])
                .map(|a| a.header_read_timeout.0)
        };
        assert_eq!(timeout("10s").ok(), Some(Duration::from_secs(10)));
        assert_eq!(timeout("7").ok(), Some(Duration::from_secs(7)));
        assert_eq!(timeout("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(timeout("2m").ok(), Some(Duration::from_secs(120)));
        assert_eq!(timeout("1h").ok(), Some(Duration::from_secs(3600)));
        assert!(timeout("0s").is_err());
        assert!(timeout("0").is_err());
        assert!(timeout("ten").is_err());
    }

    #[test]
    fn flags_parse() {
        use clap::Parser;
        let args = Args::try_parse_from([
            "hookrun-apiserver",
            "--trusted-proxies",
            "10.0.0.0/8,192.0.2.1/32",
            "--max-body-bytes",
            "2048",
            "--rate-limit-per-second",
            "2.5",
            "--rate-limit-burst",
            "7",
            "--header-read-timeout",
            "3s",
            "--namespaces",
            "a,b",
        ])
        .expect("valid flags");
        assert_eq!(args.trusted_proxies.nets().len(), 2);
        assert_eq!(args.max_body_bytes, 2048);
        assert_eq!(args.rate_limit_burst, 7);
        assert_eq!(args.header_read_timeout.0, Duration::from_secs(3));
        assert_eq!(args.namespaces, ["a", "b"]);
        let defaults = Args::try_parse_from(["hookrun-apiserver"]).expect("defaults");
        assert!(defaults.trusted_proxies.is_empty());
        assert_eq!(defaults.max_body_bytes, 1024 * 1024);
        assert!(defaults.namespaces.is_empty());
        // The runner API has a port of its own, never the public one.
        assert_eq!(defaults.runner_listen.port(), 8081);
        assert_ne!(defaults.runner_listen, defaults.listen);
        assert_eq!(defaults.review_limit_burst, 20);
        assert_eq!(defaults.review_limit_per_second, 1.0);
        assert_eq!(defaults.drain_period.0, Duration::from_secs(15));
        let drain = Args::try_parse_from(["hookrun-apiserver", "--drain-period", "0s"])
            .expect("a zero drain period");
        assert_eq!(drain.drain_period.0, Duration::ZERO);
        assert!(Args::try_parse_from(["hookrun-apiserver", "--drain-period", "soon"]).is_err());
    }
}
