//! The callback sender: signed (Standard Webhooks) POSTs about Sessions to the URLs their
//! Agents (or the requests that started them) name. It runs only in the elected operator,
//! so a cluster has one sender. It reads the Session controller's cache once a second;
//! a Session that owes a delivery is read live, the due attempts are made, and each
//! outcome is written to `status.callbacks` with the `resourceVersion` read (a merge
//! patch of that one field, retried on conflict), so a restart or a new leader resumes
//! the schedule with the same `webhook-id`s. Delivery is at-least-once.

pub mod destination;
pub mod plan;
pub mod send;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use hookrun_crds::callback::{CallbackDelivery, DeliveryState, decode_key, webhook_id};
use hookrun_crds::retry::ConflictRetry;
use hookrun_crds::{Agent, Session};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::reflector::{ObjectRef, Store},
};
use rand::Rng;
use serde_json::json;

use self::destination::DestinationPolicy;
use self::plan::{Outcome, RetrySchedule};
use crate::{
    error::{Error, Result},
    events::{Event, EventType, Recorder},
    leader::Leadership,
    metrics::Metrics,
    session_controller::cache::CachedSession,
};

/// How often the cache is looked at for deliveries that became due.
const TICK: Duration = Duration::from_secs(1);
/// Sessions whose deliveries run at once.
const MAX_IN_FLIGHT: usize = 32;
/// How one record write retries when it meets other writers (the apiserver appends
/// events to the same status).
const RECORD_WRITE: ConflictRetry = ConflictRetry {
    max_attempts: 8,
    budget: Duration::MAX,
};

/// How the sender behaves (from the operator's flags).
#[derive(Clone, Debug)]
pub struct CallbackSettings {
    pub destinations: DestinationPolicy,
    pub schedule: RetrySchedule,
    pub timeout: Duration,
}

/// The sender's shared parts.
struct Sender {
    client: Client,
    settings: CallbackSettings,
    metrics: Metrics,
    recorder: Recorder,
    /// `None` when the operator runs without leader election.
    leadership: Option<Arc<Leadership>>,
    in_flight: Mutex<HashSet<String>>,
}

/// Runs the sender over the given caches (one pair per watch scope) until `shutdown`.
pub async fn run(
    client: Client,
    scopes: Vec<(Store<CachedSession>, Store<Agent>)>,
    settings: CallbackSettings,
    metrics: Metrics,
    recorder: Recorder,
    leadership: Option<Arc<Leadership>>,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(
        allow_loopback = settings.destinations.allow_loopback,
        denied = ?settings.destinations.denied,
        retry_delays = ?settings.schedule.delays,
        "callback sender starting"
    );
    let sender = Arc::new(Sender {
        client,
        settings,
        metrics,
        recorder,
        leadership,
        in_flight: Mutex::default(),
    });
    // The event count each Session had when it was last looked at, for callbacks on
    // running events.
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut ticks: u64 = 0;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(TICK) => {}
        }
        ticks += 1;
        let now = Timestamp::now();
        let horizon = sender.settings.schedule.horizon();
        let mut present = HashSet::new();
        for (sessions, agents) in &scopes {
            for session in sessions.state() {
                let (Some(namespace), Some(uid)) = (session.namespace(), session.uid()) else {
                    continue;
                };
                if session.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let Some(agent) =
                    agents.get(&ObjectRef::new(&session.spec.agent).within(&namespace))
                else {
                    continue;
                };
                if agent.spec.callbacks.is_empty() && !session.spec.has_callback_url {
                    continue;
                }
                present.insert(uid.clone());
                let last_seen = seen.get(&uid).copied();
                if !needs_look(&session, &agent, last_seen, now, horizon) {
                    continue;
                }
                {
                    let mut in_flight = sender
                        .in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    if in_flight.len() >= MAX_IN_FLIGHT || !in_flight.insert(uid.clone()) {
                        continue;
                    }
                }
                seen.insert(uid.clone(), session.next_event_id);
                let sender = sender.clone();
                tokio::spawn(async move {
                    let name = session.name_any();
                    if let Err(error) = sender.deliver(&namespace, &name, &uid, &agent).await {
                        tracing::warn!(session = %name, %namespace, %error, "callback deliveries of a session failed; retrying");
                    }
                    sender
                        .in_flight
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&uid);
                });
            }
        }
        if ticks.is_multiple_of(60) {
            seen.retain(|uid, _| present.contains(uid));
        }
    }
}

/// Whether a cached Session may owe a delivery now: a pending one came due, it finished
/// and a target of its end has no record yet, or it appended events since it was last
/// looked at and its Agent's callbacks follow running events.
fn needs_look(
    session: &CachedSession,
    agent: &Agent,
    last_seen: Option<u64>,
    now: Timestamp,
    horizon: Duration,
) -> bool {
    let Some(status) = session.status.as_ref() else {
        return false;
    };
    let due_record = status.callbacks.iter().any(|r| {
        r.state == DeliveryState::Pending && r.next_attempt_time.as_ref().is_none_or(|t| t.0 <= now)
    });
    if due_record {
        return true;
    }
    if plan::wants_running_events(&agent.spec) && last_seen != Some(session.next_event_id) {
        return true;
    }
    if !status.is_finished()
        || status.callbacks.len() >= hookrun_crds::callback::MAX_DELIVERY_RECORDS
    {
        return false;
    }
    let recent = status.completion_time.as_ref().is_some_and(|t| {
        k8s_openapi::jiff::SignedDuration::try_from(horizon)
            .ok()
            .and_then(|h| t.0.checked_add(h).ok())
            .is_some_and(|until| now < until)
    });
    if !recent {
        return false;
    }
    let event = if status.phase() == hookrun_crds::SessionPhase::Complete {
        hookrun_crds::callback::events::SESSION_COMPLETED
    } else {
        hookrun_crds::callback::events::SESSION_FAILED
    };
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    let subscribed: Vec<_> = agent
        .spec
        .callbacks
        .iter()
        .filter(|c| c.event_names().contains(&event))
        .collect();
    let unrecorded = subscribed.iter().any(|c| {
        let id = webhook_id(uid, &c.url, event, None);
        !status.callbacks.iter().any(|r| r.id == id)
    });
    // The request's own URL is not cached, only that there is one: count the records.
    let recorded = status.callbacks.iter().filter(|r| r.event == event).count();
    unrecorded || recorded < subscribed.len() + usize::from(session.spec.has_callback_url)
}

impl Sender {
    /// Reads the Session live and makes its due attempts, one after the other.
    async fn deliver(&self, namespace: &str, name: &str, uid: &str, agent: &Agent) -> Result<()> {
        let sessions: Api<Session> = Api::namespaced(self.client.clone(), namespace);
        let Some(live) = sessions.get_opt(name).await? else {
            return Ok(());
        };
        if live.uid().as_deref() != Some(uid) {
            return Ok(());
        }
        let status = live.status.clone().unwrap_or_default();
        let callback_url = live
            .spec
            .trigger
            .as_ref()
            .and_then(|t| t.callback_url.as_deref());
        let targets = plan::targets(&agent.spec, callback_url);
        let (due, _) = plan::due(
            uid,
            &targets,
            &status,
            Timestamp::now(),
            self.settings.schedule.horizon(),
        );
        for item in due {
            if self.leadership.as_ref().is_some_and(|l| !l.is_held()) {
                return Ok(());
            }
            let body = item.body(name, namespace, &agent.name_any());
            let body = serde_json::to_vec(&body).map_err(|source| Error::Serialize {
                what: "a callback body",
                source,
            })?;
            let outcome = match self.key_for(namespace, agent, item.target).await? {
                Err(refusal) => Outcome::Refused(refusal),
                Ok(key) => {
                    let attempt = send::Attempt {
                        url: &item.target.url,
                        id: &item.record.id,
                        body: &body,
                        key: &key,
                        timestamp_seconds: Timestamp::now().as_second(),
                    };
                    send::attempt(&self.settings.destinations, &attempt, self.settings.timeout)
                        .await
                }
            };
            let jitter = rand::rng().random_range(0.0..1.0);
            let record = plan::after_attempt(
                item.record,
                &outcome,
                Timestamp::now(),
                &self.settings.schedule,
                jitter,
            );
            self.report(&live, agent, &record);
            if write_record(&sessions, name, uid, &record).await? {
                self.metrics.wrote("callback", "status_patch");
            }
            self.publish(&live, &record).await;
        }
        Ok(())
    }

    /// The decoded signing key of `target`, or why the delivery is refused. An API
    /// failure is an error (the delivery is tried again next tick).
    async fn key_for(
        &self,
        namespace: &str,
        agent: &Agent,
        target: &plan::Target,
    ) -> Result<Result<Vec<u8>, String>> {
        if target.per_request
            && !agent
                .spec
                .callback_policy
                .as_ref()
                .is_some_and(|p| p.allows(&target.url))
        {
            return Ok(Err(
                "the request's callbackUrl is no longer within the Agent's \
                 spec.callbackPolicy.allowedUrlPrefixes"
                    .to_owned(),
            ));
        }
        let Some(secret_ref) = &target.secret else {
            return Ok(Err(
                "no signing key: set spec.callbackPolicy.secretRef or a \
                 spec.callbacks[].secretRef"
                    .to_owned(),
            ));
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let Some(secret) = secrets.get_opt(&secret_ref.name).await? else {
            return Ok(Err(format!(
                "the signing key's Secret {:?} does not exist",
                secret_ref.name
            )));
        };
        let Some(value) = secret.data.as_ref().and_then(|d| d.get(&secret_ref.key)) else {
            return Ok(Err(format!(
                "the Secret {:?} has no key {:?}",
                secret_ref.name, secret_ref.key
            )));
        };
        Ok(decode_key(&value.0).map_err(|e| {
            format!(
                "the Secret {:?} key {:?}: {e}",
                secret_ref.name, secret_ref.key
            )
        }))
    }

    /// Logs and counts one attempt's outcome.
    fn report(&self, session: &Session, agent: &Agent, record: &CallbackDelivery) {
        let outcome = match record.state {
            DeliveryState::Delivered => "delivered",
            DeliveryState::Pending => "retry",
            DeliveryState::Failed => "failed",
            DeliveryState::Refused => "refused",
        };
        let namespace = session.namespace().unwrap_or_default();
        self.metrics
            .callback_delivery(&namespace, &agent.name_any(), outcome);
        tracing::info!(
            session = %session.name_any(),
            %namespace,
            agent = %agent.name_any(),
            url = %record.url,
            event = %record.event,
            webhook_id = %record.id,
            attempts = record.attempts,
            status_code = ?record.last_status_code,
            outcome,
            reason = record.message.as_deref().unwrap_or(""),
            "callback attempt"
        );
    }

    /// An Event on the Session for a delivery, a retry, a give-up or a refusal.
    async fn publish(&self, session: &Session, record: &CallbackDelivery) {
        let (type_, reason) = match record.state {
            DeliveryState::Delivered => (EventType::Normal, "CallbackDelivered"),
            DeliveryState::Pending => (EventType::Warning, "CallbackRetrying"),
            DeliveryState::Failed => (EventType::Warning, "CallbackFailed"),
            DeliveryState::Refused => (EventType::Warning, "CallbackRefused"),
        };
        let mut note = format!(
            "{} to {} (attempt {})",
            record.event, record.url, record.attempts
        );
        if let Some(message) = &record.message {
            note.push_str(": ");
            note.push_str(message);
        }
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(
                hookrun_crds::session::truncate_utf8(&note, 1024)
                    .0
                    .to_owned(),
            ),
            action: "Callback".to_owned(),
            secondary: None,
        };
        if let Err(error) = self
            .recorder
            .publish(&event, &session.object_ref(&()))
            .await
        {
            tracing::warn!(session = %session.name_any(), %error, "could not publish a callback event");
        }
    }
}

/// Writes `record` into the Session's `status.callbacks`: reads the Session, merges the
/// record in, and merge-patches only `status.callbacks` with the `resourceVersion` read,
/// reading again on a conflict. False when there was nothing to write.
pub async fn write_record(
    sessions: &Api<Session>,
    name: &str,
    uid: &str,
    record: &CallbackDelivery,
) -> Result<bool> {
    RECORD_WRITE
        .run(is_conflict, tokio::time::sleep, |_| async {
            let Some(session) = sessions.get_opt(name).await? else {
                return Ok(false);
            };
            if session.uid().as_deref() != Some(uid) {
                return Ok(false);
            }
            let mut status = session.status.clone().unwrap_or_default();
            if !plan::upsert(&mut status, record) {
                return Ok(false);
            }
            let patch = json!({
                "metadata": {"resourceVersion": session.resource_version()},
                "status": {"callbacks": status.callbacks},
            });
            sessions
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok(true)
        })
        .await
}

fn is_conflict(error: &Error) -> bool {
    matches!(error, Error::Kube(kube::Error::Api(status)) if status.code == 409)
}

#[cfg(test)]
mod tests {
    use hookrun_crds::callback::{events, webhook_id};
    use serde_json::json;

    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).expect("a time")
    }

    fn agent(spec: serde_json::Value) -> Agent {
        serde_json::from_value(json!({
            "apiVersion": "hookrun.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "a", "namespace": "n"},
            "spec": spec,
        }))
        .expect("an Agent")
    }

    fn cached(trigger: serde_json::Value, status: serde_json::Value) -> CachedSession {
        serde_json::from_value(json!({
            "apiVersion": "hookrun.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": "s", "namespace": "n", "uid": "u-1"},
            "spec": {"agent": "a", "title": "t", "trigger": trigger},
            "status": status,
        }))
        .expect("a cached Session")
    }

    const URL: &str = "https://r.example/x";

    #[test]
    fn the_cache_keeps_what_the_sender_looks_at() {
        let session = cached(
            json!({"source": "webhook", "callbackUrl": "https://ci.example/1"}),
            json!({"phase": "Running", "droppedEvents": 3,
                   "events": [{"type": "agent.message", "content": "x", "timestamp": "2027-01-15T08:00:00Z"}],
                   "callbacks": [{"id": "msg_1", "url": URL, "event": "agent.message", "state": "Delivered", "attempts": 1}]}),
        );
        assert!(session.spec.has_callback_url);
        assert_eq!(session.next_event_id, 5);
        let status = session.status.expect("a status");
        assert!(status.events.is_empty());
        assert_eq!(status.callbacks.len(), 1);
        let plain = cached(json!({"source": "webhook"}), json!({}));
        assert!(!plain.spec.has_callback_url);
        assert_eq!(plain.next_event_id, 1);
    }

    #[test]
    fn a_finished_session_is_looked_at_until_each_target_has_a_record() {
        let horizon = Duration::from_secs(3600);
        let agent =
            agent(json!({"callbacks": [{"url": URL, "secretRef": {"name": "k", "key": "k"}}]}));
        let done = json!({"phase": "Complete", "completionTime": "2027-01-15T08:00:00Z"});
        let now: Timestamp = "2027-01-15T08:00:05Z".parse().expect("a time");
        let session = cached(json!(null), done.clone());
        assert!(needs_look(&session, &agent, None, now, horizon));
        // Long after the end, nothing new is started.
        let later: Timestamp = "2027-01-16T08:00:05Z".parse().expect("a time");
        assert!(!needs_look(&session, &agent, None, later, horizon));
        let id = webhook_id("u-1", URL, events::SESSION_COMPLETED, None);
        let mut recorded = done.clone();
        recorded["callbacks"] = json!([{"id": id, "url": URL, "event": "session.completed",
            "state": "Pending", "attempts": 1, "nextAttemptTime": "2027-01-15T08:00:10Z"}]);
        let waiting = cached(json!(null), recorded.clone());
        assert!(!needs_look(&waiting, &agent, None, now, horizon));
        // Due once its time has come.
        let due_at: Timestamp = "2027-01-15T08:00:10Z".parse().expect("a time");
        assert!(needs_look(&waiting, &agent, None, due_at, horizon));
        // A request's own URL needs a record of its own.
        let own = cached(
            json!({"source": "webhook", "callbackUrl": "https://ci.example/1"}),
            recorded,
        );
        assert!(needs_look(&own, &agent, None, now, horizon));
        let _ = at(0);
    }

    #[test]
    fn running_events_are_looked_at_when_the_count_moves() {
        let horizon = Duration::from_secs(3600);
        let turns = agent(
            json!({"callbacks": [{"url": URL, "secretRef": {"name": "k", "key": "k"},
            "events": ["session.turn_completed"]}]}),
        );
        let running = cached(
            json!(null),
            json!({"phase": "Running",
            "events": [{"type": "agent.turn_complete", "content": "x", "timestamp": "2027-01-15T08:00:00Z"}]}),
        );
        let now = at(0);
        assert!(needs_look(&running, &turns, None, now, horizon));
        assert!(!needs_look(
            &running,
            &turns,
            Some(running.next_event_id),
            now,
            horizon
        ));
        let plain =
            agent(json!({"callbacks": [{"url": URL, "secretRef": {"name": "k", "key": "k"}}]}));
        assert!(!needs_look(&running, &plain, None, now, horizon));
    }
}
