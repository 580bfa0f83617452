//! Grants: `POST /hook/<token>` (or `POST /hook` with `Authorization: Bearer <token>`)
//! puts one message into the one Session a Grant names, and does nothing else.
//!
//! A request goes: token checked against the watched [`index`] (no API call; a refused
//! token takes one attempt from its address's bucket, and a spent address gets 429) →
//! the Grant's rate limit → the body ([`body`], at most 64 KiB) → one conditional status
//! write of the Session ([`delivery`]): 200 delivered (Running), 202 buffered (Pending),
//! 404 the Session is gone, 410 it has finished, 503 the cluster cannot store it.

pub mod body;
pub(crate) mod delivery;
pub mod index;
mod routes;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;

use crate::auth_limit::ReviewLimiter;
use crate::client_ip::TrustedProxies;
use crate::index::AgentKey;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::session_status::StatusWriter;

pub use index::{GrantIndex, SharedGrantIndex, run_watches, stream_count};
pub use routes::router;

/// What the `/hook` routes share.
#[derive(Clone)]
pub struct HookState {
    pub(crate) index: SharedGrantIndex,
    pub(crate) client: Client,
    pub(crate) status: Arc<StatusWriter>,
    pub(crate) trusted_proxies: Arc<TrustedProxies>,
    /// Messages per Grant, by (namespace, Grant name).
    pub(crate) rate_limiter: Arc<Mutex<RateLimiter<AgentKey>>>,
    /// Refused tokens per client address.
    pub(crate) refusals: Arc<Mutex<ReviewLimiter>>,
    pub(crate) metrics: Arc<Metrics>,
    /// How long the Session write may take before the answer is 503.
    pub(crate) store_timeout: Duration,
}
