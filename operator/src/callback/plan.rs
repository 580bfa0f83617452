//! What the callback sender decides, as plain functions: which deliveries a Session owes
//! (targets × events that happened), which are due now, what an attempt's outcome makes
//! of a delivery record, and whether a finished Session's TTL deletion waits for one.
//! No client, no clock of its own: `now` and the jitter are given.

use std::time::Duration;

use hookrun_crds::agent::SecretKeyRef;
use hookrun_crds::callback::{
    CallbackBody, CallbackDelivery, DeliveryState, MAX_DELIVERY_RECORDS, display_url, events,
    webhook_id,
};
use hookrun_crds::session::event_types;
use hookrun_crds::{AgentSpec, SessionPhase, SessionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::Value;

/// The longest a finished Session's TTL deletion waits for pending deliveries.
pub const MAX_TTL_HOLD: Duration = Duration::from_secs(26 * 3600);
/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How much a retry's delay may grow at random (a fraction of it), so that receivers
/// that failed together are not retried together.
pub const JITTER: f64 = 0.2;

/// The delays between attempts: after attempt `n` fails, the next waits `delays[n-1]`
/// (plus jitter); once they are spent the delivery is given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySchedule {
    pub delays: Vec<Duration>,
}

impl Default for RetrySchedule {
    /// 12 attempts over about 22 hours.
    fn default() -> Self {
        let secs = [10, 30, 60, 300, 900, 1800, 3600, 7200, 14400, 21600, 28800];
        RetrySchedule {
            delays: secs.into_iter().map(Duration::from_secs).collect(),
        }
    }
}

impl RetrySchedule {
    /// How long the whole schedule takes at most (jitter and `Retry-After` included):
    /// events older than this are never delivered for the first time, and a finished
    /// Session's deletion waits at most this long for its deliveries.
    pub fn horizon(&self) -> Duration {
        self.delays
            .iter()
            .map(|d| (*d).max(MAX_RETRY_AFTER).mul_f64(1.0 + JITTER))
            .sum::<Duration>()
            + Duration::from_secs(60)
    }
}

/// Where one delivery goes and with which key it is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    /// `None`: the Agent names no key for it (the delivery is refused and recorded).
    pub secret: Option<SecretKeyRef>,
    pub events: Vec<String>,
    /// A request's own `callbackUrl` (checked again against the Agent's prefixes).
    pub per_request: bool,
}

/// The targets of a Session: its Agent's callbacks, then the request's `callbackUrl`.
pub fn targets(agent: &AgentSpec, callback_url: Option<&str>) -> Vec<Target> {
    let mut targets: Vec<Target> = agent
        .callbacks
        .iter()
        .map(|c| Target {
            url: c.url.clone(),
            secret: Some(c.secret_ref.clone()),
            events: c.event_names().into_iter().map(str::to_owned).collect(),
            per_request: false,
        })
        .collect();
    if let Some(url) = callback_url {
        let secret = agent
            .callback_policy
            .as_ref()
            .and_then(|p| p.secret_ref.clone())
            .or_else(|| agent.callbacks.first().map(|c| c.secret_ref.clone()));
        targets.push(Target {
            url: url.to_owned(),
            secret,
            events: events::DEFAULT.iter().map(|e| (*e).to_owned()).collect(),
            per_request: true,
        });
    }
    targets
}

/// Whether the Agent's callbacks subscribe to events that happen while a Session runs.
pub fn wants_running_events(agent: &AgentSpec) -> bool {
    agent.callbacks.iter().any(|c| {
        c.events
            .iter()
            .any(|e| e == events::SESSION_TURN_COMPLETED || e == events::AGENT_MESSAGE)
    })
}

/// Something that happened to a Session that a callback can be sent for.
#[derive(Clone, Debug, PartialEq)]
pub struct Occurrence<'a> {
    pub event: &'static str,
    /// The Session event's id, for events that repeat.
    pub number: Option<u64>,
    pub phase: SessionPhase,
    pub response: Option<&'a str>,
    pub at: Time,
}

/// What happened to a Session so far that callbacks are sent for: its end, and each kept
/// `agent.turn_complete` and `agent.message`.
pub fn occurrences(status: &SessionStatus) -> Vec<Occurrence<'_>> {
    let mut found = Vec::new();
    let first = status.first_event_id();
    for (i, event) in status.events.iter().enumerate() {
        let event_name = match event.type_.as_str() {
            event_types::TURN_COMPLETE => events::SESSION_TURN_COMPLETED,
            event_types::AGENT_MESSAGE => events::AGENT_MESSAGE,
            _ => continue,
        };
        found.push(Occurrence {
            event: event_name,
            number: Some(first + i as u64),
            phase: SessionPhase::Running,
            response: Some(event.content.as_str()),
            at: event.timestamp.clone(),
        });
    }
    if status.is_finished() {
        let phase = status.phase();
        let (event, response) = if phase == SessionPhase::Complete {
            (
                events::SESSION_COMPLETED,
                status
                    .response
                    .as_deref()
                    .or_else(|| status.last_agent_message()),
            )
        } else {
            (
                events::SESSION_FAILED,
                status.response.as_deref().or(status.message.as_deref()),
            )
        };
        let at = status
            .completion_time
            .clone()
            .unwrap_or(Time(Timestamp::UNIX_EPOCH));
        found.push(Occurrence {
            event,
            number: None,
            phase,
            response,
            at,
        });
    }
    found
}

/// One delivery a Session owes now.
#[derive(Clone, Debug, PartialEq)]
pub struct Due<'a> {
    pub target: &'a Target,
    pub occurrence: Occurrence<'a>,
    /// The record so far (a new `Pending` one for a first attempt).
    pub record: CallbackDelivery,
}

impl Due<'_> {
    /// The body of every attempt of this delivery.
    pub fn body(&self, session: &str, namespace: &str, agent: &str) -> Value {
        CallbackBody {
            event: self.occurrence.event,
            session,
            namespace,
            agent,
            phase: self.occurrence.phase.as_str(),
            response: self.occurrence.response,
            timestamp: &self.occurrence.at,
        }
        .to_json()
    }
}

/// The deliveries of a Session that are due at `now`, and the earliest time a pending
/// one becomes due. Events older than `horizon` that no record mentions are not
/// delivered (a callback added to an Agent does not replay its old Sessions); records
/// beyond [`MAX_DELIVERY_RECORDS`] are not started.
pub fn due<'a>(
    session_uid: &str,
    targets: &'a [Target],
    status: &'a SessionStatus,
    now: Timestamp,
    horizon: Duration,
) -> (Vec<Due<'a>>, Option<Timestamp>) {
    let mut due = Vec::new();
    let mut next: Option<Timestamp> = None;
    let mut records = status.callbacks.len();
    let oldest = now
        .checked_sub(SignedDuration::try_from(horizon).unwrap_or(SignedDuration::MAX))
        .unwrap_or(Timestamp::MIN);
    for occurrence in occurrences(status) {
        for target in targets {
            if !target.events.iter().any(|e| e == occurrence.event) {
                continue;
            }
            let id = webhook_id(
                session_uid,
                &target.url,
                occurrence.event,
                occurrence.number,
            );
            let record = match status.callbacks.iter().find(|r| r.id == id) {
                Some(record) if record.state.is_final() => continue,
                Some(record) => {
                    let at = record.next_attempt_time.as_ref().map(|t| t.0);
                    if let Some(at) = at.filter(|at| *at > now) {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        continue;
                    }
                    record.clone()
                }
                None => {
                    if occurrence.at.0 < oldest || records >= MAX_DELIVERY_RECORDS {
                        continue;
                    }
                    records += 1;
                    CallbackDelivery {
                        id,
                        url: display_url(&target.url),
                        event: occurrence.event.to_owned(),
                        state: DeliveryState::Pending,
                        ..CallbackDelivery::default()
                    }
                }
            };
            due.push(Due {
                target,
                occurrence: occurrence.clone(),
                record,
            });
        }
    }
    (due, next)
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered with this status.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: the connection failed, dropped or timed out (the reason has no URL).
    Unanswered(String),
    /// Not sent: the destination or the key is not allowed.
    Refused(String),
}

/// `record` after one more attempt that ended in `outcome` at `now`; `jitter` in [0, 1)
/// picks where in the jitter band a retry falls.
pub fn after_attempt(
    mut record: CallbackDelivery,
    outcome: &Outcome,
    now: Timestamp,
    schedule: &RetrySchedule,
    jitter: f64,
) -> CallbackDelivery {
    let at = Time(Timestamp::from_second(now.as_second()).unwrap_or(now));
    let retry = |record: &mut CallbackDelivery, floor: Option<Duration>, why: String| {
        let attempts = usize::try_from(record.attempts).unwrap_or(usize::MAX);
        match schedule.delays.get(attempts.saturating_sub(1)) {
            Some(delay) => {
                let mut wait = delay.mul_f64(1.0 + JITTER * jitter.clamp(0.0, 1.0));
                if let Some(floor) = floor {
                    wait = wait.max(floor.min(MAX_RETRY_AFTER));
                }
                // Rounded up to a whole second, as status stores it: never earlier
                // than the delay.
                let next = SignedDuration::try_from(wait)
                    .ok()
                    .and_then(|d| now.checked_add(d).ok())
                    .map(|t| {
                        let second = t.as_second() + i64::from(t.subsec_nanosecond() > 0);
                        Timestamp::from_second(second).unwrap_or(t)
                    })
                    .unwrap_or(Timestamp::MAX);
                record.state = DeliveryState::Pending;
                record.next_attempt_time = Some(Time(next));
                record.set_message(&why);
            }
            None => {
                record.state = DeliveryState::Failed;
                record.next_attempt_time = None;
                let message = format!(
                    "gave up after {} attempts; the last: {why}",
                    record.attempts
                );
                record.set_message(&message);
            }
        }
    };
    match outcome {
        Outcome::Refused(why) => {
            record.state = DeliveryState::Refused;
            record.next_attempt_time = None;
            record.set_message(why);
            return record;
        }
        Outcome::Answered { status, .. } => {
            record.attempts = record.attempts.saturating_add(1);
            record.last_status_code = Some(i32::from(*status));
        }
        Outcome::Unanswered(_) => {
            record.attempts = record.attempts.saturating_add(1);
            record.last_status_code = None;
        }
    }
    record.last_attempt_time = Some(at.clone());
    match outcome {
        Outcome::Answered { status, .. } if (200..300).contains(status) => {
            record.state = DeliveryState::Delivered;
            record.delivered_time = Some(at);
            record.next_attempt_time = None;
            record.message = None;
        }
        Outcome::Answered { status, .. } if (300..400).contains(status) => {
            record.state = DeliveryState::Refused;
            record.next_attempt_time = None;
            record.set_message(&format!(
                "the receiver answered {status}, a redirect: callbacks follow no redirects"
            ));
        }
        Outcome::Answered { status: 410, .. } => {
            record.state = DeliveryState::Failed;
            record.next_attempt_time = None;
            record.set_message("the receiver answered 410 Gone: it asked not to be called again");
        }
        Outcome::Answered {
            status,
            retry_after,
        } if *status == 408 || *status == 429 || *status >= 500 => {
            retry(
                &mut record,
                *retry_after,
                format!("the receiver answered {status}"),
            );
        }
        Outcome::Answered { status, .. } => {
            record.state = DeliveryState::Failed;
            record.next_attempt_time = None;
            record.set_message(&format!(
                "the receiver answered {status}: not retried (only network errors, 408, \
                 429 and 5xx are)"
            ));
        }
        Outcome::Unanswered(why) => retry(&mut record, None, why.clone()),
        Outcome::Refused(_) => {}
    }
    record
}

/// Puts `record` into `status.callbacks`, replacing the one with its id. False when the
/// status already holds exactly it.
pub fn upsert(status: &mut SessionStatus, record: &CallbackDelivery) -> bool {
    let full = status.callbacks.len() >= MAX_DELIVERY_RECORDS;
    match status.callbacks.iter_mut().find(|r| r.id == record.id) {
        Some(kept) if kept == record => false,
        // A record that is already final is not overwritten by a late attempt.
        Some(kept) if kept.state.is_final() => false,
        Some(kept) => {
            *kept = record.clone();
            true
        }
        None if full => false,
        None => {
            status.callbacks.push(record.clone());
            true
        }
    }
}

/// Whether a finished Session's TTL deletion waits for its deliveries: while one is
/// still pending, for at most `horizon` after its TTL ran out (`expired_at`).
pub fn ttl_held(
    status: &SessionStatus,
    expired_at: Timestamp,
    now: Timestamp,
    horizon: Duration,
) -> bool {
    let pending = status
        .callbacks
        .iter()
        .any(|r| r.state == DeliveryState::Pending);
    pending
        && SignedDuration::try_from(horizon)
            .ok()
            .and_then(|h| expired_at.checked_add(h).ok())
            .is_some_and(|until| now < until)
}

#[cfg(test)]
mod tests;
