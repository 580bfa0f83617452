//! hookrun's operator: the wiring of the Agent and Session controllers, leader election,
//! the admin server and shutdown. The controllers' logic lives in their modules.

pub mod admin;
pub mod agent_controller;
pub mod callback;
pub mod cli;
pub mod error;
pub mod events;
pub mod grant_controller;
pub mod leader;
pub mod metrics;
pub mod pod_policy;
pub mod policy_guard;
pub mod schedule;
pub mod session_controller;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::future::join_all;
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use error::{Error, Result};

use crate::{
    admin::AdminState,
    agent_controller::Context,
    cli::{Args, LogFormat},
    events::{Recorder, Reporter},
    leader::{LeaderElector, Leadership},
    metrics::Metrics,
    policy_guard::{EnvSecrets, PolicyGuard},
    session_controller::pod::PodSettings,
};

/// Sets up logging to stdout: `RUST_LOG` filters (default `info`), text or JSON lines.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// A future that resolves once `rx` sees `true`. Written out rather than `async fn`
/// because the controller needs the future to be `Sync`, which `async fn` cannot promise.
#[allow(clippy::manual_async_fn)]
fn stopped(mut rx: watch::Receiver<bool>) -> impl Future<Output = ()> + Send + Sync + 'static {
    async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// A tick every `period`, the first one `period` from now: a controller's periodic look
/// at everything it caches (see `Controller::reconcile_all_on`).
pub(crate) fn ticks(period: std::time::Duration) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold((), move |()| async move {
        tokio::time::sleep(period).await;
        Some(((), ()))
    })
}

/// Runs the operator until SIGTERM/SIGINT, or until leadership is lost (an error: the
/// process should restart and campaign again).
pub async fn run(args: Args) -> Result<()> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    // The elector renews through its own client; everything else goes through one whose
    // writes are refused whenever this process does not hold the Lease.
    let leadership = Arc::new(Leadership::default());
    let callback_settings = args.callback_settings().map_err(Error::Config)?;
    let callback_leadership = args.leader_elect.then(|| leadership.clone());
    let lease_client = Client::try_from(config.clone())?;
    let client = if args.leader_elect {
        let gate = leadership.clone();
        kube::client::ClientBuilder::try_from(config)?
            .with_layer(&tower::filter::FilterLayer::new(move |request| {
                gate.admit(request)
            }))
            .build()
    } else {
        lease_client.clone()
    };
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .map_err(Error::Admin)?;
    let admin_addr = listener.local_addr().map_err(Error::Admin)?;
    tracing::info!(address = %admin_addr, "admin server listening");
    let admin = axum::serve(
        listener,
        admin::app(AdminState {
            registry: Arc::new(registry),
            ready: ready.clone(),
        }),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let admin = tokio::spawn(async move {
        if let Err(error) = admin.await {
            tracing::error!(%error, "admin server failed");
        }
    });

    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = signal_tx.send(true);
    });

    let elector = if args.leader_elect {
        let namespace = args
            .leader_election_namespace
            .clone()
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
            })
            .map(|ns| ns.trim().to_owned())
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let elector = Arc::new(LeaderElector::new(
            lease_client,
            &namespace,
            &args.leader_election_id,
            leader::default_identity(),
            args.leader_election_lease_duration.0,
            leadership,
        ));
        // A standby is healthy and ready to take over.
        ready.store(true, Ordering::Release);
        tracing::info!(identity = elector.identity(), %namespace, lease = %args.leader_election_id, "waiting for leadership");
        let retry = elector.renew_interval();
        let mut stop = stop_rx.clone();
        tokio::select! {
            () = elector.acquire(retry) => {},
            _ = stop.wait_for(|s| *s) => {
                let _ = admin.await;
                return Ok(());
            }
        }
        tracing::info!(identity = elector.identity(), "became the leader");
        ready.store(false, Ordering::Release);
        Some(elector)
    } else {
        None
    };

    let lost_leadership = Arc::new(AtomicBool::new(false));
    if let Some(elector) = &elector {
        let elector = elector.clone();
        let lost = lost_leadership.clone();
        let stop_tx = stop_tx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = elector.hold() => {
                    lost.store(true, Ordering::Release);
                    let _ = stop_tx.send(true);
                }
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }

    let reporter = Reporter {
        controller: "hookrun-operator".into(),
        instance: Some(leader::default_identity()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    // `HOOKRUN_NAMESPACES=""` means all namespaces, like leaving the flag out.
    let listed: BTreeSet<&str> = args
        .namespaces
        .iter()
        .map(|ns| ns.trim())
        .filter(|ns| !ns.is_empty())
        .collect();
    let scopes: Vec<Option<&str>> = if listed.is_empty() {
        vec![None]
    } else {
        listed.into_iter().map(Some).collect()
    };
    let (env_secret_stores, env_secret_changes): (Vec<_>, Vec<_>) = scopes
        .iter()
        .map(|scope| policy_guard::watch(client.clone(), *scope))
        .unzip();
    let policy = args.pod_policy();
    tracing::info!(?policy, "pod policy");
    let guard = Arc::new(PolicyGuard {
        policy,
        env_secrets: EnvSecrets::new(env_secret_stores),
    });
    let ctx = Arc::new(Context::new(
        client.clone(),
        args.public_url.clone(),
        args.redact_url_in_status,
        metrics.clone(),
        recorder.clone(),
        guard.clone(),
    ));
    let pod_settings = PodSettings {
        default_image: args.default_harness_image.clone(),
        runner_url: args.runner_url.to_string(),
    };
    let grant_ctx = Arc::new(grant_controller::Context {
        client: client.clone(),
        public_url: args.public_url.clone(),
        redact_url_in_status: args.redact_url_in_status,
        // A default above the maximum is cut to it, like any TTL.
        default_ttl: args.grant_default_ttl.0.min(args.grant_max_ttl.0),
        max_ttl: args.grant_max_ttl.0,
        metrics: metrics.clone(),
    });
    let mut grant_runners = Vec::new();
    let mut stores = Vec::new();
    let mut session_stores = Vec::new();
    let mut runners = Vec::new();
    for (scope, env_secret_changes) in scopes.into_iter().zip(env_secret_changes) {
        let (store, runner) = agent_controller::run(
            ctx.clone(),
            scope,
            env_secret_changes,
            stopped(stop_rx.clone()),
        );
        let (sessions, session_runner) = session_controller::run(
            client.clone(),
            scope,
            store.clone(),
            pod_settings.clone(),
            guard.clone(),
            args.pending_timeout.0,
            metrics.clone(),
            recorder.clone(),
            stopped(stop_rx.clone()),
        );
        grant_runners.push(grant_controller::run(
            grant_ctx.clone(),
            scope,
            stopped(stop_rx.clone()),
        ));
        stores.push(store);
        session_stores.push(sessions);
        runners.push(futures::future::join(runner, session_runner));
    }
    // The scheduler runs here, past the election: only the leader starts scheduled Sessions.
    let scheduler =
        schedule::controller::Scheduler::new(client.clone(), stores.clone(), metrics.clone());
    let scheduler = scheduler.run(stopped(stop_rx.clone()));
    // The callback sender runs past the election too: one sender per cluster.
    let callbacks = callback::run(
        client.clone(),
        session_stores
            .iter()
            .cloned()
            .zip(stores.iter().cloned())
            .collect(),
        callback_settings,
        metrics.clone(),
        recorder.clone(),
        callback_leadership,
        stopped(stop_rx.clone()),
    );
    tracing::info!(namespaces = ?args.namespaces, public_url = %args.public_url, runner_url = %args.runner_url, "agent and session controllers starting");
    let readiness = {
        let ready = ready.clone();
        async move {
            for store in stores {
                if store.wait_until_ready().await.is_err() {
                    return;
                }
            }
            for store in session_stores {
                if store.wait_until_ready().await.is_err() {
                    return;
                }
            }
            // Every Session with a pod template waits for these before its pod.
            guard.env_secrets.wait_until_ready().await;
            tracing::info!("caches synced: ready");
            ready.store(true, Ordering::Release);
        }
    };
    tokio::join!(
        join_all(runners),
        join_all(grant_runners),
        readiness,
        scheduler,
        callbacks
    );

    let _ = stop_tx.send(true);
    if let Some(elector) = &elector
        && !lost_leadership.load(Ordering::Acquire)
    {
        // Bounded: a successor can still take over by expiry if this fails.
        match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not release the lease"),
            Err(_) => tracing::warn!("releasing the lease timed out"),
        }
    }
    let _ = admin.await;
    if lost_leadership.load(Ordering::Acquire) {
        return Err(Error::LeaderElection(
            "lost the lease; exiting so that a restart campaigns again".into(),
        ));
    }
    tracing::info!("stopped");
    Ok(())
}
