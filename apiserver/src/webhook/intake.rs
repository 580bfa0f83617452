//! The intake of a POST that passed the checks: the body is parsed and fitted to the
//! Agent's input policy, the idempotency key chosen (a replay is answered from the index
//! or the stored Session), the Agent's limits reserved, and the one Session create made.
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::names;
use hookrun_crds::session::SessionTrigger;
use hookrun_crds::{Session, SessionSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde_json::json;

use crate::body::{self, BodyError, RequestBody, WaitMode};
use crate::error::HttpError;
use crate::http_limits;
use crate::idempotency;
use crate::index::{AgentKey, Reservation, WebhookTarget};
use crate::rate_limit::rate_limit_headers;
use crate::signature;
use crate::signature::Verified;
use crate::store::StoreError;
use crate::title;
use crate::wait;

use super::AppState;
use super::checks::{require_signature_header, verify_signature};
use super::expressions::{self, Decision};
use super::hold::Hold;
use super::routes::Answered;

/// `Idempotent-Replayed: true` on an answer that repeats an earlier one.
pub(crate) const REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");
/// Random names drawn before giving up on a run of collisions.
const RANDOM_NAME_ATTEMPTS: usize = 3;

/// An accepted webhook: answered now, or held until its Session finishes.
pub(super) enum Accepted {
    Now(Answered),
    Hold(Box<Hold>),
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

/// A POST's body, read within its limit and verified with the Agent's schemes, and the
/// rate token it took: what the intake starts from. A request refused before this point
/// costs its checks and nothing of the intake.
pub(super) struct Received<'a> {
    rate: RateToken<'a>,
    raw: Bytes,
    /// The body's JSON when a verifier parsed it (to read a signed timestamp).
    parsed: Option<Result<serde_json::Value, serde_json::Error>>,
    verified: Option<(SignatureScheme, Verified)>,
}

/// The checks of a POST whose Agent, address and token passed
/// [`authenticate`](super::checks::authenticate): the rate, the signature header, the
/// body and its signature.
pub(super) async fn receive<'a>(
    state: &'a AppState,
    key: &'a AgentKey,
    target: &WebhookTarget,
    headers: &HeaderMap,
    body: Body,
) -> Result<Received<'a>, HttpError> {
    // The Agent's bucket is checked as soon as the token is known, before the body is
    // read or its signature computed; a later refusal gives the token back.
    let rate = RateToken::take(state, key)?;
    require_signature_header(target, headers)?;
    let raw = http_limits::read_body(headers, body, state.max_body_bytes).await?;
    let request_body = RequestBody::new(&raw);
    let verified = verify_signature(target, headers, &request_body)?;
    let parsed = request_body.into_parsed();
    Ok(Received {
        rate,
        raw,
        parsed,
        verified,
    })
}

/// A received POST: the body fitted to the Agent's input policy, then the Session create.
pub(super) async fn accept(
    state: &AppState,
    key: &AgentKey,
    target: WebhookTarget,
    headers: &HeaderMap,
    received: Received<'_>,
) -> Result<Accepted, HttpError> {
    let Received {
        mut rate,
        raw,
        parsed,
        verified,
    } = received;
    let request_body = RequestBody::with_parsed(&raw, parsed);

    if let Some((SignatureScheme::Slack, _)) = verified
        && let Some(challenge) = signature::slack::url_verification_challenge(&request_body)
    {
        let response = Json(json!({"challenge": challenge})).into_response();
        return Ok(Accepted::Now((response, "challenge")));
    }

    let payload = body::payload_text(&raw);
    let provider = verified.as_ref().map(|(_, v)| v.source);
    let mut mapped = match expressions::decide(
        state,
        key,
        &target,
        headers,
        &request_body,
        &payload,
        provider,
    )? {
        // The rate token goes back as `rate` drops: a filtered event costs none.
        Decision::Filtered(answered) => return Ok(Accepted::Now(answered)),
        Decision::Pass(mapped) => mapped,
    };

    let session_key = mapped.session_key.take();
    let mut parsed = body::webhook_fields(&request_body).map_err(HttpError::BadBody)?;
    let input = &target.agent.input;
    input.check_env(&parsed.env).map_err(HttpError::BadBody)?;
    if let Some(url) = &parsed.callback_url {
        input.check_callback_url(url).map_err(HttpError::BadBody)?;
    }
    expressions::merge_env(&mut parsed.env, mapped.env);
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
    // The keyed name is hashed once, for the replay lookup and for the create. With a
    // session key, the session key names the Session and the idempotency key the input.
    let keyed_name = key_choice
        .as_ref()
        .filter(|_| session_key.is_none())
        .map(|chosen| idempotency::keyed_session_name(&key.namespace, &key.name, &chosen.value));

    if let (Some(chosen), Some(name)) = (&key_choice, &keyed_name) {
        let known = state
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .session_digest(&key.namespace, name);
        if let Some(stored) = known {
            idempotency::replay_or_conflict(chosen.source, stored.as_deref(), &digest)
                .map_err(HttpError::Idempotency)?;
            // A replay is a request like any other: it costs the Agent's rate limit, so
            // a captured request cannot be answered (or held) without bound.
            let rate = Some(rate.keep());
            let Some(budget) = budget else {
                return Ok(Accepted::Now(created(key, name, true, rate)));
            };
            // Wait on the original Session: follow it first, then read where it is.
            let subscription = state.hub.subscribe(&key.namespace, name);
            let current = state
                .sessions
                .get(&key.namespace, name)
                .await
                .map_err(|error| store_failure(key, &error))?;
            return Ok(Accepted::Hold(Box::new(Hold {
                name: name.clone(),
                replayed: true,
                rate,
                waiting: super::hold::begin(wait::HeldRequest {
                    subscription,
                    current,
                    budget,
                }),
                delivery: None,
            })));
        }
    }

    input
        .check_parts(parsed.title.as_deref(), &payload, &parsed.env)
        .map_err(HttpError::OverBudget)?;
    let verified_scheme = verified.as_ref().map(|(s, _)| *s);
    let title = match parsed.title {
        Some(title) => title,
        None => input.fit_title(
            mapped
                .title
                .or_else(|| {
                    verified_scheme.and_then(|s| title::provider_title(s, headers, &request_body))
                })
                .unwrap_or_else(|| title::default_title(&key.name)),
        ),
    };
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
        callback_url: parsed.callback_url,
    };
    let spec = SessionSpec {
        agent: key.name.clone(),
        title,
        env: parsed.env,
        trigger: Some(trigger),
        session_key: None,
        history: Vec::new(),
    };
    tracing::debug!(agent = %key.name, ?wait, "storing a webhook Session");
    if let Some(session_key) = session_key {
        let request = super::keyed::KeyedRequest {
            session_key,
            spec,
            request_key: key_choice.map(|k| k.value),
            budget,
            rate: rate.keep(),
        };
        return super::keyed::deliver(state, key, &target, request).await;
    }

    let max = target.agent.max_concurrent;
    let mut name = keyed_name
        .clone()
        .unwrap_or_else(|| idempotency::random_session_name(&key.name));
    // The whole object as it will be sent, built once: a name drawn again on a collision
    // is as long and replaces the old one in place.
    let mut session = build_session(key, &target, &name, spec);
    input
        .budgets
        .check_session(&session)
        .map_err(HttpError::OverBudget)?;
    let mut reservation = reserve(state, key, &name, max)?;
    // From here on the request counts against the Agent's rate, whatever the cluster says.
    let rate = Some(rate.keep());
    let mut attempts = 1;
    loop {
        // A waiting caller follows the Session before it exists, so no change is missed.
        let subscription = budget.map(|_| state.hub.subscribe(&key.namespace, &name));
        match state.sessions.create(&session).await {
            Ok(stored) => {
                state
                    .index
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .confirm(&key.namespace, &name, &digest);
                return Ok(match (subscription, budget) {
                    (Some(subscription), Some(budget)) => Accepted::Hold(Box::new(Hold {
                        name,
                        replayed: false,
                        rate,
                        waiting: super::hold::begin(wait::HeldRequest {
                            subscription,
                            current: Some(stored),
                            budget,
                        }),
                        delivery: None,
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
                        waiting: super::hold::begin(wait::HeldRequest {
                            subscription,
                            current: Some(existing),
                            budget,
                        }),
                        delivery: None,
                    })),
                    _ => Accepted::Now(created(key, &name, true, rate)),
                });
            }
            Err(StoreError::AlreadyExists) if attempts < RANDOM_NAME_ATTEMPTS => {
                release(state, key, &name, reservation);
                attempts += 1;
                name = idempotency::random_session_name(&key.name);
                session.metadata.name = Some(name.clone());
                reservation = reserve(state, key, &name, max)?;
            }
            Err(error) => {
                release(state, key, &name, reservation);
                return Err(store_failure(key, &error));
            }
        }
    }
}

/// A token taken from the Agent's bucket for a request still being checked: dropped
/// without [`RateToken::keep`] (a later check refused the request, or the request was
/// cancelled before its Session create), it goes back to the bucket.
struct RateToken<'a> {
    state: &'a AppState,
    key: &'a AgentKey,
    /// `(limit, remaining)` for the headers; `None` once kept.
    taken: Option<(u32, u32)>,
}

impl<'a> RateToken<'a> {
    /// Takes a token from the Agent's bucket, or 429.
    fn take(state: &'a AppState, key: &'a AgentKey) -> Result<Self, HttpError> {
        let taken = take_rate(state, key)?;
        Ok(Self {
            state,
            key,
            taken: Some(taken),
        })
    }

    /// The request counts: the token stays spent. `(limit, remaining)` for the headers.
    fn keep(&mut self) -> (u32, u32) {
        self.taken.take().unwrap_or_default()
    }
}

impl Drop for RateToken<'_> {
    fn drop(&mut self) {
        if self.taken.is_some() {
            self.state
                .rate_limiter
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .give_back(self.key);
        }
    }
}

/// Holds a `maxConcurrent` slot and a stored-Session slot for the Session `name` (429
/// when either is spent).
pub(super) fn reserve(
    state: &AppState,
    key: &AgentKey,
    name: &str,
    max: Option<u32>,
) -> Result<Reservation, HttpError> {
    let reservation = state
        .index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .reserve(key, name, max);
    match reservation {
        Reservation::Full { max } => Err(HttpError::TooManySessions { max }),
        Reservation::StoreFull { max } => Err(HttpError::TooManyStoredSessions { max }),
        other => Ok(other),
    }
}

pub(super) fn release(state: &AppState, key: &AgentKey, name: &str, reservation: Reservation) {
    if reservation == Reservation::Reserved {
        state
            .index
            .read()
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
        .try_acquire(key, Instant::now())
        .map_err(|retry| HttpError::RateLimited { retry, limit })?;
    Ok((limit, remaining.0))
}

/// The answer to a failed Session create or read: 400 with the reason when the cluster
/// refused the object itself (retrying cannot help), else 503. The log names the reason
/// only: a Kubernetes message can quote the Session's title or env.
pub(super) fn store_failure(key: &AgentKey, error: &StoreError) -> HttpError {
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
pub(crate) fn build_session(
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
pub(super) fn decorate(
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
