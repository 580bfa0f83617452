//! The webhook door: `POST`/`GET /webhooks/{ns}/{agent}[/{token}]`. Every check answers
//! from the watched [`Index`](crate::index::Index); an accepted webhook makes exactly one
//! API call, the Session create (plus one read when a keyed create collides).
//!
//! A webhook goes from socket to Session through one file per step:
//! [`routes`] (the dispatch, the handlers, the access log line) → [`checks`] (Agent,
//! address, token, signature) → [`intake`] (body, idempotency, limits, the Session
//! create) → [`hold`] (a wait-mode request held until its Session finishes).
//!
//! Order of checks: 404 unknown Agent or no webhook → 403 address → 401 token → 429
//! rate (replays included) → 401 missing signature → 413 body → 401 bad signature → 500
//! an expression that does not compile → 413 payload budget (with expressions) → 202
//! filtered (the rate token given back, no API call) → 400
//! body (env names outside the Agent's `allowedEnv` included) → 422 idempotency conflict
//! → 413 a part over its storage budget → 429 stored Sessions or concurrency → 400 when
//! the cluster refuses the Session itself, 503 when it cannot store it. The rate token is
//! taken as soon as the token is known, so a client over its rate costs no body read or
//! HMAC; a request refused by a later check gives it back. The signature is checked after
//! the body is read (it signs the body), so an oversized body with a wrong signature is
//! 413.

use std::sync::{Arc, Mutex};

use crate::client_ip::TrustedProxies;
use crate::hub::SessionHub;
use crate::index::{AgentKey, SharedIndex};
use crate::metrics::Metrics;
use crate::rate_limit::RateLimiter;
use crate::store::SessionStore;

mod checks;
mod expressions;
mod hold;
mod intake;
mod keyed;
mod routes;

pub use routes::{Routes, app};

/// What the public router shares.
#[derive(Clone)]
pub struct AppState {
    pub index: SharedIndex,
    pub sessions: Arc<dyn SessionStore>,
    pub trusted_proxies: Arc<TrustedProxies>,
    pub max_body_bytes: usize,
    pub rate_limiter: Arc<Mutex<RateLimiter<AgentKey>>>,
    pub metrics: Arc<Metrics>,
    /// Session changes, for requests held in wait mode.
    pub hub: Arc<SessionHub>,
}

#[cfg(test)]
mod tests;
