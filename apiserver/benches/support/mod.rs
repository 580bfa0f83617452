//! What both apiserver benches share: the door's real dispatch and HTTP/1 server over an
//! index built in memory (Agents `plain` and `linear` in namespace `bench`), a Session
//! store that keeps nothing (the cluster's storage is not the door's cost), a task that
//! drops created Sessions' reservations as the watch would, and no rate limit.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use hookrun_apiserver::{
    client_ip::TrustedProxies,
    hub::SessionHub,
    index::{
        Index,
        test_support::{agent, secret},
    },
    metrics::Metrics,
    rate_limit::{RateLimit, RateLimiter},
    serve_public,
    store::MemorySessionStore,
    webhook::{AppState, app},
};
use hookrun_crds::token::WebhookToken;
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};

pub const NS: &str = "bench";
pub const LINEAR_SECRET: &str = "bench-linear-signing-secret";

/// An Agent spec with the webhook trigger `webhook`, its cap on stored Sessions raised
/// out of the way: the store keeps nothing, but reservations count until swept.
pub fn bench_spec(webhook: serde_json::Value) -> serde_json::Value {
    json!({
        "triggers": [{"webhook": webhook}],
        "session": {"maxStoredSessions": 100_000},
    })
}

/// A door serving on loopback, and what a bench needs to reach and observe it.
#[allow(dead_code)] // Each bench reads a different part.
pub struct BenchDoor {
    pub addr: SocketAddr,
    pub token: WebhookToken,
    pub state: AppState,
    pub store: Arc<MemorySessionStore>,
    _stop: watch::Sender<bool>,
}

impl BenchDoor {
    /// Starts the door on `127.0.0.1:0`.
    pub async fn start() -> Self {
        let token = WebhookToken::generate().expect("randomness");
        let hub = SessionHub::new();
        let mut index = Index::new(1);
        index.apply_agent(&agent(NS, "plain", bench_spec(json!({}))));
        index.apply_agent(&agent(
            NS,
            "linear",
            bench_spec(json!({"linearSignatureSecret": LINEAR_SECRET})),
        ));
        index.apply_secret(&secret(NS, "plain", &[("token", token.expose())]));
        index.apply_secret(&secret(
            NS,
            "linear",
            &[
                ("token", token.expose()),
                ("linear-signing-secret", LINEAR_SECRET),
            ],
        ));
        index.mark_synced();

        let unlimited = RateLimit::new(u32::MAX, 1e12).expect("a valid limit");
        let store = Arc::new(MemorySessionStore::forgetful());
        let state = AppState {
            index: Arc::new(RwLock::new(index)),
            sessions: store.clone(),
            trusted_proxies: Arc::new(TrustedProxies::none()),
            max_body_bytes: 1024 * 1024,
            rate_limiter: Arc::new(Mutex::new(RateLimiter::new(unlimited))),
            metrics: Arc::new(Metrics::default()),
            hub,
        };
        // Plays the watch: a created Session's reservation is dropped when the watch
        // delivers it, which this store never does. Between two sweeps (20 ms) the door
        // accepts a few hundred; the Agents' cap on stored Sessions is raised far above
        // that (see `bench_spec`).
        let index = state.index.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                index
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .forget_created_reservations();
            }
        });
        let (stop, stopped) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("an address");
        tokio::spawn(serve_public(
            listener,
            app(state.clone()),
            Duration::from_secs(10),
            stopped,
        ));
        BenchDoor {
            addr,
            token,
            state,
            store,
            _stop: stop,
        }
    }

    /// The path of `agent`'s door with `token`.
    pub fn path(&self, agent: &str, token: &str) -> String {
        format!("/webhooks/{NS}/{agent}/{token}")
    }
}
