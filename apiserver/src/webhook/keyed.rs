//! Requests of an Agent whose webhook trigger has a `sessionKey`: follow-ups find their
//! conversation. The key names the Session deterministically (agent, key hash,
//! generation; see [`names::keyed_session_name`]), so every replica tries the same name
//! and the cluster's AlreadyExists decides which request creates it: exactly one live
//! Session per key without any lock. A request that finds the Session live appends its
//! title as a `user.message` (200 `delivered` while Running, 202 `buffered` while it
//! waits for its pod); one that finds it finished moves on to the next generation.
//!
//! A retried delivery is one input: the event key is a hash of the request's idempotency
//! key (delivery id, `Idempotency-Key`...), and a retry of the request that created the
//! Session is recognised by the key its trigger carries.

use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookrun_crds::SessionPhase;
use hookrun_crds::SessionSpec;
use hookrun_crds::names;
use hookrun_crds::session::MAX_SESSION_KEY_BYTES;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::body::BodyError;
use crate::error::HttpError;
use crate::index::{AgentKey, Reservation, WebhookTarget};
use crate::store::{Delivery, StoreError};
use crate::wait;

use super::AppState;
use super::hold::Hold;
use super::intake::{Accepted, build_session, decorate, release, reserve, store_failure};

/// How many generations one request moves past (each a finished Session of the key)
/// before it answers 503: finished Sessions are deleted after their TTL, so a key that
/// has more stored than this is a key hammered faster than its Sessions end.
const MAX_GENERATIONS_WALKED: u32 = 8;

/// Room for `,"history":` and the labels a keyed Session has beyond the object
/// measured to size its carried-over history.
const HISTORY_FIELD_BYTES: usize = 512;

/// A request of a keyed Agent, parsed and within its budgets.
pub(super) struct KeyedRequest {
    /// The `sessionKey`'s value.
    pub(super) session_key: String,
    /// The Session to create when the key has no live one (its `sessionKey` unset).
    pub(super) spec: SessionSpec,
    /// The request's idempotency key (delivery id, header...), when it has one.
    pub(super) request_key: Option<String>,
    /// The wait-mode budget, when the caller waits.
    pub(super) budget: Option<Duration>,
    /// The rate-limit headers' `(limit, remaining)`.
    pub(super) rate: (u32, u32),
}

/// The event key of an input: 32 hex of SHA-256 of the request's idempotency key, so
/// that a retry finds the input it stored (and any key fits the event key's alphabet),
/// or 32 random hex when the request has none.
pub(crate) fn input_event_key(request_key: Option<&str>) -> String {
    match request_key {
        Some(key) => {
            let digest = Sha256::digest(key.as_bytes());
            format!("in-{}", hex::encode(&digest[..16]))
        }
        None => format!("in-{:032x}", rand::random::<u128>()),
    }
}

/// Checks a session key's size: 400 naming `sessionKey` when over its bound.
pub(crate) fn check_session_key(session_key: &str) -> Result<(), BodyError> {
    if session_key.len() > MAX_SESSION_KEY_BYTES {
        return Err(BodyError {
            field: "sessionKey".to_owned(),
            message: format!(
                "the Agent's sessionKey expression made a key of {} bytes: keys are at most \
                 {MAX_SESSION_KEY_BYTES} bytes",
                session_key.len()
            ),
        });
    }
    Ok(())
}

/// Whether an input into a Session in `phase` was delivered (its pod runs) or buffered
/// (the pod has not started).
pub(crate) fn delivery_word(phase: SessionPhase) -> &'static str {
    match phase {
        SessionPhase::Running => "delivered",
        _ => "buffered",
    }
}

/// Delivers the request into the key's live Session, or creates it.
pub(super) async fn deliver(
    state: &AppState,
    key: &AgentKey,
    target: &WebhookTarget,
    request: KeyedRequest,
) -> Result<Accepted, HttpError> {
    let KeyedRequest {
        session_key,
        mut spec,
        request_key,
        budget,
        rate,
    } = request;
    check_session_key(&session_key).map_err(HttpError::BadBody)?;
    let hash = names::session_key_hash(&key.namespace, &key.name, &session_key);
    let event_key = input_event_key(request_key.as_deref());
    spec.session_key = Some(session_key);
    let content = spec.title.clone();
    let rate = Some(rate);
    let mut generation = state
        .index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .latest_key_generation(&key.namespace, &hash)
        .unwrap_or(0);
    let max = target.agent.max_concurrent;
    let budgets = &target.agent.input.budgets;
    for _ in 0..MAX_GENERATIONS_WALKED {
        let name = names::keyed_session_name(&key.name, &hash, generation);
        // A waiting caller follows the Session before it exists, so no change is missed.
        let subscription = budget.map(|_| state.hub.subscribe(&key.namespace, &name));
        let mut session = build_session(key, target, &name, spec.clone());
        let labels = session.metadata.labels.get_or_insert_with(Default::default);
        labels.insert(names::SESSION_KEY_LABEL.to_owned(), hash.clone());
        labels.insert(
            names::SESSION_KEY_GENERATION_LABEL.to_owned(),
            generation.to_string(),
        );
        budgets
            .check_session(&session)
            .map_err(HttpError::OverBudget)?;
        let reservation = reserve(state, key, &name, max)?;
        let created = if reservation == Reservation::Shared {
            // The index knows the Session (or a create of it is in flight here): deliver.
            Err(StoreError::AlreadyExists)
        } else {
            state.sessions.create(&session).await
        };
        match created {
            Ok(stored) => {
                let digest = spec
                    .trigger
                    .as_ref()
                    .and_then(|t| t.payload_digest.clone())
                    .unwrap_or_default();
                state
                    .index
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .confirm(&key.namespace, &name, &digest);
                tracing::debug!(agent = %key.name, session = %name, generation, "started the Session of a session key");
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
                    _ => Accepted::Now(answered(key, &name, None, false, rate)),
                });
            }
            Err(StoreError::AlreadyExists) => {
                release(state, key, &name, reservation);
            }
            Err(error) => {
                release(state, key, &name, reservation);
                return Err(store_failure(key, &error));
            }
        }
        let delivered = state
            .sessions
            .append_input(
                &key.namespace,
                &name,
                &content,
                &event_key,
                request_key.as_deref(),
            )
            .await
            .map_err(|error| store_failure(key, &error))?;
        match delivered {
            Delivery::Appended { input, session } => {
                let phase = session
                    .status
                    .as_ref()
                    .map(|s| s.phase())
                    .unwrap_or_default();
                // The request that created the Session, retried: answered as that one.
                let delivery = (input.id != 0).then(|| delivery_word(phase));
                tracing::debug!(agent = %key.name, session = %name, input = input.id, replayed = input.replayed, "delivered a follow-up");
                return Ok(match (subscription, budget) {
                    (Some(subscription), Some(budget)) => Accepted::Hold(Box::new(Hold {
                        name,
                        replayed: input.replayed,
                        rate,
                        waiting: wait::begin_turn(
                            wait::HeldRequest {
                                subscription,
                                current: Some(*session),
                                budget,
                            },
                            Some(input.id),
                        ),
                        delivery,
                    })),
                    _ => Accepted::Now(answered(key, &name, delivery, input.replayed, rate)),
                });
            }
            // The key's Session has ended: the next generation starts the conversation
            // again, from the turns the Agent carries over.
            Delivery::Finished(previous) => {
                generation += 1;
                spec.history = match (previous, target.agent.carry_over_turns) {
                    (Some(previous), turns @ 1..) => {
                        // The room the Session budget leaves once the rest is in.
                        let next = names::keyed_session_name(&key.name, &hash, generation);
                        let bare = SessionSpec {
                            history: Vec::new(),
                            ..spec.clone()
                        };
                        let bare = build_session(key, target, &next, bare);
                        let rest = hookrun_crds::budget::encoded_len(&bare) + HISTORY_FIELD_BYTES;
                        let room = budgets.session.saturating_sub(rest);
                        hookrun_crds::session::carried_history(&previous, turns, room)
                    }
                    _ => Vec::new(),
                };
            }
            // Deleted between the create and the append: its name is free again.
            Delivery::Gone => {}
        }
    }
    tracing::warn!(agent = %key.name, namespace = %key.namespace, "a session key moved past too many finished Sessions");
    Err(HttpError::Unavailable)
}

/// 200 `{"session", "agentDefinition"}` for a created Session; with `"delivered": true`
/// for an input into a Running one, or 202 with `"buffered": true` while it waits for
/// its pod.
fn answered(
    key: &AgentKey,
    name: &str,
    delivery: Option<&'static str>,
    replayed: bool,
    rate: Option<(u32, u32)>,
) -> super::routes::Answered {
    let mut body = json!({"session": name, "agentDefinition": key.name});
    let status = match delivery {
        Some(word) => {
            body[word] = true.into();
            if word == "buffered" {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            }
        }
        None => StatusCode::OK,
    };
    let outcome = match (delivery, replayed) {
        (_, true) => "replayed",
        (Some("buffered"), _) => "buffered",
        (Some(_), _) => "delivered",
        (None, _) => "created",
    };
    decorate(
        (status, Json(body)).into_response(),
        outcome,
        replayed,
        rate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_keys_of_inputs_are_stable_per_request_and_valid() {
        let key = input_event_key(Some("github:72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert_eq!(
            key,
            input_event_key(Some("github:72d3162e-cc78-11e3-81ab-4c9367dc0958"))
        );
        assert!(hookrun_crds::session::valid_event_key(&key), "{key}");
        assert_ne!(key, input_event_key(Some("other")));
        let random = input_event_key(None);
        assert!(hookrun_crds::session::valid_event_key(&random));
        assert_ne!(random, input_event_key(None));
    }

    #[test]
    fn keys_are_bounded_and_phases_name_the_delivery() {
        assert!(check_session_key(&"k".repeat(MAX_SESSION_KEY_BYTES)).is_ok());
        let error = check_session_key(&"k".repeat(MAX_SESSION_KEY_BYTES + 1)).expect_err("long");
        assert_eq!(error.field, "sessionKey");
        assert_eq!(delivery_word(SessionPhase::Running), "delivered");
        assert_eq!(delivery_word(SessionPhase::Pending), "buffered");
        assert_eq!(delivery_word(SessionPhase::Queued), "buffered");
    }
}
