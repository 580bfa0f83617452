//! The webhook door: `POST`/`GET /webhooks/{ns}/{agent}[/{token}]`. Every check answers
//! from the watched [`Index`](crate::index::Index); an accepted webhook makes exactly one
//! API call, the Session create (plus one read when a keyed create collides).
//!
//! Order of checks: 404 unknown Agent or no webhook → 403 address → 401 token → 401
//! missing signature → 413 body → 401 bad signature → 400 body (env names outside the
//! Agent's `allowedEnv` included) → 422 idempotency conflict → 413 a part over its
//! storage budget → 429 stored Sessions, concurrency or rate (replays included) → 400
//! when the cluster refuses the Session itself, 503 when it cannot store it. The
//! signature is checked after the body is read (it signs the body), so an oversized body
//! with a wrong signature is 413.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::names;
use hookrun_crds::session::SessionTrigger;
use hookrun_crds::{Session, SessionSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::access_log::{self, UNMATCHED_ROUTE};
use crate::body::{self, BodyError, WaitMode};
use crate::client_ip::{self, TrustedProxies};
use crate::error::{HttpError, JSON};
use crate::http_limits;
use crate::hub::SessionHub;
use crate::idempotency;
use crate::index::{AgentKey, Reservation, SecretEntry, SharedIndex, WebhookTarget};
use crate::metrics::Metrics;
use crate::rate_limit::{RateLimiter, rate_limit_headers};
use crate::signature::{self, SignedRequest, Verified};
use crate::store::{SessionStore, StoreError};
use crate::title;
use crate::wait;

/// `Idempotent-Replayed: true` on an answer that repeats an earlier one.
pub const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Random names drawn before giving up on a run of collisions.
const RANDOM_NAME_ATTEMPTS: usize = 3;

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

/// The header a scheme's signature rides in: its presence picks the scheme.
pub fn signature_header(scheme: SignatureScheme) -> &'static str {
    match scheme {
        SignatureScheme::Linear => "linear-signature",
        SignatureScheme::Github => "x-hub-signature-256",
        SignatureScheme::Slack => "x-slack-signature",
        SignatureScheme::StandardWebhooks => "webhook-signature",
        SignatureScheme::Hmac => "x-signature",
    }
}

/// The route template with the token in the path.
pub const TOKEN_ROUTE: &str = "/webhooks/{namespace}/{agent}/{token}";
/// The route template with the token in `Authorization: Bearer`.
pub const BEARER_ROUTE: &str = "/webhooks/{namespace}/{agent}";

/// The public router. Each handler writes its own access log line and metrics (by route
/// template, never the path: it holds the token); no middleware wraps them, so a refusal
/// costs no boxed future and no per-request allocation for labels.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route(
            TOKEN_ROUTE,
            get(ping_handler)
                .post(post_handler)
                .fallback(method_not_allowed),
        )
        .route(
            BEARER_ROUTE,
            get(ping_handler)
                .post(post_handler)
                .fallback(method_not_allowed),
        )
        .fallback(not_found)
        .with_state(state)
}

/// An answer and its outcome code, for the access log and metrics.
type Answered = (Response, &'static str);

/// Which of the door's templates matched.
fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    access_log::route_label(matched, &[TOKEN_ROUTE, BEARER_ROUTE])
}

/// Access log and metrics of one answered request.
fn record(
    state: &AppState,
    route: &'static str,
    method: &Method,
    started: Instant,
    agent: Option<&AgentKey>,
    (response, outcome): Answered,
) -> Response {
    let status = response.status().as_u16();
    access_log::record_webhook(
        &state.metrics,
        route,
        method,
        started,
        agent,
        outcome,
        status,
    );
    response
}

fn refused(error: HttpError) -> Answered {
    let code = error.code();
    (error.into_response(), code)
}

async fn not_found(State(state): State<AppState>, method: Method) -> Response {
    let started = Instant::now();
    let answered = refused(HttpError::NotFound);
    record(&state, UNMATCHED_ROUTE, &method, started, None, answered)
}

async fn method_not_allowed(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    method: Method,
) -> Response {
    let started = Instant::now();
    let answered = refused(HttpError::MethodNotAllowed);
    let route = route_label(matched.as_ref());
    record(&state, route, &method, started, None, answered)
}

/// The two door routes' path: the token rides in it, or in `Authorization: Bearer`.
#[derive(serde::Deserialize)]
struct DoorPath {
    namespace: String,
    agent: String,
    token: Option<String>,
}

/// Which Agent's door is knocked on, and the token presented.
struct Knock {
    key: AgentKey,
    token: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Knock {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        let Path(path) = Path::<DoorPath>::from_request_parts(parts, state)
            .await
            .map_err(|_| HttpError::NotFound)?;
        let token = path
            .token
            .or_else(|| crate::api::bearer_token(&parts.headers).map(str::to_owned));
        Ok(Knock {
            key: AgentKey::new(path.namespace, path.agent),
            token,
        })
    }
}

/// The token in `Authorization: Bearer <token>`.
async fn ping_handler(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    method: Method,
    knock: Result<Knock, HttpError>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let route = route_label(matched.as_ref());
    let knock = match knock {
        Ok(knock) => knock,
        Err(error) => return record(&state, route, &method, started, None, refused(error)),
    };
    let answered = match ping(&state, &knock.key, knock.token.as_deref(), peer, &headers) {
        Ok(()) => (ping_ok(), "ping"),
        Err(error) => refused(error),
    };
    record(&state, route, &method, started, Some(&knock.key), answered)
}

/// `{"ok": true}`.
fn ping_ok() -> Response {
    static BODY: Bytes = Bytes::from_static(br#"{"ok":true}"#);
    ([(header::CONTENT_TYPE, JSON)], BODY.clone()).into_response()
}

async fn post_handler(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    method: Method,
    knock: Result<Knock, HttpError>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let route = route_label(matched.as_ref());
    let knock = match knock {
        Ok(knock) => knock,
        Err(error) => return record(&state, route, &method, started, None, refused(error)),
    };
    // Boxed, so its state (the body, the Session it built) is freed once it is done and
    // is not part of a held request's memory.
    let result = Box::pin(accept(
        &state,
        &knock.key,
        knock.token.as_deref(),
        peer,
        &headers,
        body,
    ))
    .await;
    // Nothing of the request is kept while a wait-mode request is held.
    drop(headers);
    let answered = match result {
        Ok(Accepted::Now(answered)) => answered,
        Ok(Accepted::Hold(hold)) => Box::pin(hold.answer(&state, &knock.key)).await,
        Err(error) => refused(error),
    };
    record(&state, route, &method, started, Some(&knock.key), answered)
}

/// An accepted webhook: answered now, or held until its Session finishes.
enum Accepted {
    Now(Answered),
    Hold(Box<Hold>),
}

/// A wait-mode request whose Session is stored (or replayed).
struct Hold {
    name: String,
    replayed: bool,
    rate: Option<(u32, u32)>,
    /// What to wait with, or the answer already known (finished, or gone).
    waiting: Result<wait::Waiting, wait::Held>,
}

impl Hold {
    async fn answer(self, state: &AppState, key: &AgentKey) -> Answered {
        let Hold {
            name,
            replayed,
            rate,
            waiting,
        } = self;
        let held = match waiting {
            Ok(waiting) => wait::wait_for_end(waiting, &state.metrics).await,
            Err(held) => held,
        };
        let waited = wait::Waited {
            namespace: &key.namespace,
            session: &name,
            agent: &key.name,
        };
        let (response, outcome) = wait::answer(waited, held);
        decorate(response, outcome, replayed, rate)
    }
}

/// The checks before the body: Agent, address, token.
fn authenticate(
    state: &AppState,
    key: &AgentKey,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<WebhookTarget, HttpError> {
    let target = {
        let index = state
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !index.is_synced() {
            return Err(HttpError::NotReady);
        }
        index.target(key).ok_or(HttpError::NotFound)?
    };
    if state.trusted_proxies.is_empty() && headers.contains_key("x-forwarded-for") {
        tracing::debug!("X-Forwarded-For ignored: no --trusted-proxies are configured");
    }
    if target.agent.deny_all {
        return Err(HttpError::AddressNotAllowed);
    }
    if !target.agent.allow_cidrs.is_empty() {
        let forwarded = client_ip::forwarded_for_values(headers);
        let client = client_ip::resolve_client_ip(peer.ip(), &forwarded, &state.trusted_proxies)
            .map_err(HttpError::BadForwardedFor)?;
        if !client_ip::is_allowed(client, &target.agent.allow_cidrs) {
            return Err(HttpError::AddressNotAllowed);
        }
    }
    if !token_matches(&target.secret, token, SystemTime::now()) {
        return Err(HttpError::BadToken);
    }
    Ok(target)
}

/// Whether `presented` is the current token, or the previous one before it expires.
/// Digests are compared in constant time, both always.
pub fn token_matches(secret: &SecretEntry, presented: Option<&str>, now: SystemTime) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let digest = hookrun_crds::token::digest(presented);
    let current = secret
        .token
        .map_or(subtle::Choice::from(0), |t| t.ct_eq(&digest));
    let previous = secret
        .previous
        .as_ref()
        .map_or(subtle::Choice::from(0), |p| {
            p.digest.ct_eq(&digest) & subtle::Choice::from(u8::from(now < p.expires_at))
        });
    bool::from(current | previous)
}

fn ping(
    state: &AppState,
    key: &AgentKey,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), HttpError> {
    authenticate(state, key, token, peer, headers).map(drop)
}

/// The schemes whose signature header the request carries, or 401 when the Agent
/// requires signatures and none is there.
fn signature_candidates(
    target: &WebhookTarget,
    headers: &HeaderMap,
) -> Result<Vec<SignatureScheme>, HttpError> {
    let schemes = &target.agent.schemes;
    if schemes.is_empty() {
        return Ok(vec![]);
    }
    let present: Vec<_> = schemes
        .iter()
        .copied()
        .filter(|s| headers.contains_key(signature_header(*s)))
        .collect();
    if present.is_empty() {
        let expected = schemes
            .iter()
            .map(|s| signature_header(*s))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(HttpError::MissingSignature { expected });
    }
    Ok(present)
}

/// Verifies the request with the first candidate scheme that accepts it.
fn verify_signature(
    target: &WebhookTarget,
    candidates: &[SignatureScheme],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Option<(SignatureScheme, Verified)>, HttpError> {
    let request = SignedRequest {
        headers,
        body,
        now: SystemTime::now(),
    };
    let mut first_error = None;
    for scheme in candidates {
        let Some(secret) = target.secret.signing.get(scheme) else {
            first_error.get_or_insert(HttpError::SigningSecretPending);
            continue;
        };
        match signature::verifier(*scheme).verify(&request, secret) {
            Ok(verified) => return Ok(Some((*scheme, verified))),
            Err(error) if !error.is_caller_error() => {
                first_error.get_or_insert(HttpError::Misconfigured(error));
            }
            Err(error) => {
                first_error.get_or_insert(HttpError::Signature(error));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(None),
    }
}

/// A Slack `url_verification` request's challenge.
fn slack_challenge(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    Some(value.get("challenge")?.as_str()?.to_owned())
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HttpError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            HttpError::BadBody(BodyError {
                field: name.to_owned(),
                message: "must be visible ASCII".to_owned(),
            })
        }),
    }
}

/// A POST: every check, then the Session create.
async fn accept(
    state: &AppState,
    key: &AgentKey,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, HttpError> {
    let target = authenticate(state, key, token, peer, headers)?;
    let candidates = signature_candidates(&target, headers)?;
    let raw = http_limits::read_body(headers, body, state.max_body_bytes).await?;
    let verified = verify_signature(&target, &candidates, headers, &raw)?;

    if let Some((SignatureScheme::Slack, _)) = verified
        && let Some(challenge) = slack_challenge(&raw)
    {
        let response = Json(json!({"challenge": challenge})).into_response();
        return Ok(Accepted::Now((response, "challenge")));
    }

    let parsed = body::parse_webhook_body(&raw).map_err(HttpError::BadBody)?;
    let input = &target.agent.input;
    input.check_env(&parsed.env).map_err(HttpError::BadBody)?;
    let wait = match parsed.wait {
        WaitMode::FireAndForget => header_text(headers, "prefer")?
            .and_then(body::parse_prefer_wait)
            .unwrap_or_default(),
        wait => wait,
    };
    let budget = match wait {
        WaitMode::Wait(budget) => Some(budget),
        WaitMode::FireAndForget => None,
    };
    if budget.is_some() && parsed.title.is_none() {
        return Err(HttpError::BadBody(BodyError {
            field: "title".to_owned(),
            message: "wait requires title: send a title with wait, or leave wait out (or \
                      false) to be answered as soon as the Session is stored"
                .to_owned(),
        }));
    }
    let delivery = verified
        .as_ref()
        .and_then(|(_, v)| v.dedup_key.as_deref().map(|id| (v.source, id)));
    let digest = body::payload_digest(&raw);
    // What the signature covers names the Session before anything a replayer can choose:
    // a signature without a timestamp never expires, so the signed body itself is the key.
    let signed_key = verified.as_ref().and_then(|(scheme, v)| {
        if !signature::signs_timestamp(*scheme) {
            Some(idempotency::SignedKey::Body {
                source: v.source,
                digest: &digest,
            })
        } else if signature::signs_delivery_id(*scheme) {
            v.dedup_key
                .as_deref()
                .map(|id| idempotency::SignedKey::Delivery {
                    source: v.source,
                    id,
                })
        } else {
            None
        }
    });
    let key_choice = idempotency::choose_key(
        header_text(headers, "idempotency-key")?,
        parsed.idempotency_key.as_deref(),
        delivery,
        signed_key,
    )
    .map_err(HttpError::Idempotency)?;

    if let Some(chosen) = &key_choice {
        let name = idempotency::keyed_session_name(&key.namespace, &key.name, &chosen.value);
        let known = state
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .session_digest(&key.namespace, &name);
        if let Some(stored) = known {
            idempotency::replay_or_conflict(chosen.source, stored.as_deref(), &digest)
                .map_err(HttpError::Idempotency)?;
            // A replay is a request like any other: it costs the Agent's rate limit, so
            // a captured request cannot be answered (or held) without bound.
            let rate = Some(take_rate(state, key)?);
            let Some(budget) = budget else {
                return Ok(Accepted::Now(created(key, &name, true, rate)));
            };
            // Wait on the original Session: follow it first, then read where it is.
            let subscription = state.hub.subscribe(&key.namespace, &name);
            let current = state
                .sessions
                .get(&key.namespace, &name)
                .await
                .map_err(|error| store_failure(key, &error))?;
            return Ok(Accepted::Hold(Box::new(Hold {
                name,
                replayed: true,
                rate,
                waiting: wait::begin(wait::HeldRequest {
                    subscription,
                    current,
                    budget,
                }),
            })));
        }
    }

    let verified_scheme = verified.as_ref().map(|(s, _)| *s);
    let title = match parsed.title.clone() {
        Some(title) => title,
        None => input.fit_title(
            verified_scheme
                .and_then(|s| title::provider_title(s, headers, &raw))
                .unwrap_or_else(|| title::default_title(&key.name)),
        ),
    };
    let payload = body::payload_text(&raw);
    input
        .check_parts(parsed.title.as_deref(), &payload, &parsed.env)
        .map_err(HttpError::OverBudget)?;
    let trigger = SessionTrigger {
        source: verified
            .as_ref()
            .map_or("webhook", |(_, v)| v.source)
            .to_owned(),
        delivery_id: verified.as_ref().and_then(|(_, v)| v.dedup_key.clone()),
        idempotency_key: key_choice.as_ref().map(|k| k.value.clone()),
        payload_digest: Some(digest.clone()),
        payload: Some(payload),
        payload_truncated: false,
    };
    let spec = SessionSpec {
        agent: key.name.clone(),
        title,
        env: parsed.env.clone(),
        trigger: Some(trigger),
    };
    tracing::debug!(agent = %key.name, ?wait, "storing a webhook Session");

    let keyed_name = key_choice
        .as_ref()
        .map(|chosen| idempotency::keyed_session_name(&key.namespace, &key.name, &chosen.value));
    let max = target.agent.max_concurrent;
    let mut name = keyed_name
        .clone()
        .unwrap_or_else(|| idempotency::random_session_name(&key.name));
    // The whole object as it will be sent; names drawn again on a collision are as long.
    input
        .budgets
        .check_session(&build_session(key, &target, &name, spec.clone()))
        .map_err(HttpError::OverBudget)?;
    let mut reservation = reserve(state, key, &name, max)?;
    let rate = match take_rate(state, key) {
        Ok(rate) => Some(rate),
        Err(error) => {
            release(state, key, &name, reservation);
            return Err(error);
        }
    };
    let mut attempts = 1;
    loop {
        let session = build_session(key, &target, &name, spec.clone());
        // A waiting caller follows the Session before it exists, so no change is missed.
        let subscription = budget.map(|_| state.hub.subscribe(&key.namespace, &name));
        match state.sessions.create(&session).await {
            Ok(stored) => {
                state
                    .index
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .confirm(&key.namespace, &name, &digest);
                return Ok(match (subscription, budget) {
                    (Some(subscription), Some(budget)) => Accepted::Hold(Box::new(Hold {
                        name,
                        replayed: false,
                        rate,
                        waiting: wait::begin(wait::HeldRequest {
                            subscription,
                            current: Some(stored),
                            budget,
                        }),
                    })),
                    _ => Accepted::Now(created(key, &name, false, rate)),
                });
            }
            Err(StoreError::AlreadyExists) if keyed_name.is_some() => {
                release(state, key, &name, reservation);
                let existing = state
                    .sessions
                    .get(&key.namespace, &name)
                    .await
                    .map_err(|error| store_failure(key, &error))?;
                // Deleted between the create and the read: the caller retries.
                let existing = existing.ok_or(HttpError::Unavailable)?;
                let stored = existing
                    .spec
                    .trigger
                    .as_ref()
                    .and_then(|t| t.payload_digest.as_deref());
                let source = key_choice
                    .as_ref()
                    .map_or(idempotency::KeySource::Header, |k| k.source);
                idempotency::replay_or_conflict(source, stored, &digest)
                    .map_err(HttpError::Idempotency)?;
                // The replay keeps the rate token it took: replays are charged too.
                return Ok(match (subscription, budget) {
                    (Some(subscription), Some(budget)) => Accepted::Hold(Box::new(Hold {
                        name,
                        replayed: true,
                        rate,
                        waiting: wait::begin(wait::HeldRequest {
                            subscription,
                            current: Some(existing),
                            budget,
                        }),
                    })),
                    _ => Accepted::Now(created(key, &name, true, rate)),
                });
            }
            Err(StoreError::AlreadyExists) if attempts < RANDOM_NAME_ATTEMPTS => {
                release(state, key, &name, reservation);
                attempts += 1;
                name = idempotency::random_session_name(&key.name);
                reservation = reserve(state, key, &name, max)?;
            }
            Err(error) => {
                release(state, key, &name, reservation);
                return Err(store_failure(key, &error));
            }
        }
    }
}

/// Holds a `maxConcurrent` slot and a stored-Session slot for the Session `name` (429
/// when either is spent).
fn reserve(
    state: &AppState,
    key: &AgentKey,
    name: &str,
    max: Option<u32>,
) -> Result<Reservation, HttpError> {
    let reservation = state
        .index
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .reserve(key, name, max);
    match reservation {
        Reservation::Full { max } => Err(HttpError::TooManySessions { max }),
        Reservation::StoreFull { max } => Err(HttpError::TooManyStoredSessions { max }),
        other => Ok(other),
    }
}

fn release(state: &AppState, key: &AgentKey, name: &str, reservation: Reservation) {
    if reservation == Reservation::Reserved {
        state
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .release(&key.namespace, name);
    }
}

/// Takes a token from the Agent's bucket: `(limit, remaining)` for the headers.
fn take_rate(state: &AppState, key: &AgentKey) -> Result<(u32, u32), HttpError> {
    let mut limiter = state
        .rate_limiter
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let limit = limiter.limit().capacity();
    let remaining = limiter
        .try_acquire(key.clone(), Instant::now())
        .map_err(|retry| HttpError::RateLimited { retry, limit })?;
    Ok((limit, remaining.0))
}

/// The answer to a failed Session create or read: 400 with the reason when the cluster
/// refused the object itself (retrying cannot help), else 503. The log names the reason
/// only: a Kubernetes message can quote the Session's title or env.
fn store_failure(key: &AgentKey, error: &StoreError) -> HttpError {
    match error {
        StoreError::Rejected { reason, message } => {
            tracing::warn!(agent = %key.name, namespace = %key.namespace, %reason, "the cluster refused a webhook Session");
            HttpError::Rejected {
                reason: reason.clone(),
                message: message.clone(),
            }
        }
        error => {
            tracing::warn!(agent = %key.name, namespace = %key.namespace, %error, "cannot store a webhook Session");
            HttpError::Unavailable
        }
    }
}

/// The Session of an accepted webhook, owned by its Agent.
pub fn build_session(
    key: &AgentKey,
    target: &WebhookTarget,
    name: &str,
    spec: SessionSpec,
) -> Session {
    Session {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(key.namespace.clone()),
            labels: Some(
                [
                    (names::AGENT_LABEL.to_owned(), names::label_value(&key.name)),
                    (
                        names::MANAGED_BY_LABEL.to_owned(),
                        names::MANAGED_BY.to_owned(),
                    ),
                ]
                .into(),
            ),
            owner_references: Some(vec![OwnerReference {
                api_version: "hookrun.dev/v1alpha1".to_owned(),
                kind: "Agent".to_owned(),
                name: key.name.clone(),
                uid: target.agent.uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// 200 `{"session", "agentDefinition"}`.
fn created(key: &AgentKey, name: &str, replayed: bool, rate: Option<(u32, u32)>) -> Answered {
    let response = Json(json!({"session": name, "agentDefinition": key.name})).into_response();
    let outcome = if replayed { "replayed" } else { "created" };
    decorate(response, outcome, replayed, rate)
}

/// Adds the replay and rate-limit headers and the outcome to an accepted answer.
fn decorate(
    mut response: Response,
    outcome: &'static str,
    replayed: bool,
    rate: Option<(u32, u32)>,
) -> Answered {
    let headers = response.headers_mut();
    if replayed {
        headers.insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    if let Some((limit, remaining)) = rate {
        for (name, value) in rate_limit_headers(limit, remaining) {
            headers.insert(name, value);
        }
    }
    (response, outcome)
}

#[cfg(test)]
mod tests;
