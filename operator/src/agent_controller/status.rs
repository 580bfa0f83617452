//! The Agent's status as it should be: the webhook URL (or its redacted form),
//! `observedGeneration` and the kstatus-style `Ready` condition.

use hookrun_crds::AgentStatus;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// The condition type this controller owns.
pub const READY: &str = "Ready";

/// Why an Agent is or is not ready; the `reason` of its `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadyReason {
    WebhookReady,
    NoWebhookTrigger,
    SecretRefMissing,
    InvalidSpec,
    InvalidSchedule,
    SecretNameTaken,
    PolicyViolation,
    InvalidExpression,
}

impl ReadyReason {
    /// The condition's `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyReason::WebhookReady => "WebhookReady",
            ReadyReason::NoWebhookTrigger => "NoWebhookTrigger",
            ReadyReason::SecretRefMissing => "SecretRefMissing",
            ReadyReason::InvalidSpec => "InvalidSpec",
            ReadyReason::InvalidSchedule => "InvalidSchedule",
            ReadyReason::SecretNameTaken => "SecretNameTaken",
            ReadyReason::PolicyViolation => "PolicyViolation",
            ReadyReason::InvalidExpression => "InvalidExpression",
        }
    }

    /// Whether the Agent is ready with this reason.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            ReadyReason::WebhookReady | ReadyReason::NoWebhookTrigger
        )
    }
}

/// What the reconcile concluded, as the status reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The Secret is right; `status_url` is the URL to publish (token possibly redacted).
    WebhookReady {
        status_url: String,
        secret_name: String,
        redacted: bool,
    },
    /// No webhook trigger: no Secret, no URL.
    NoWebhookTrigger,
    /// A referenced signing secret cannot be read; the message names it.
    SecretRefMissing { message: String },
    /// The spec fails validation; the message names the fields.
    InvalidSpec { message: String },
    /// A schedule trigger's cron or time zone cannot be read; the message names the field.
    InvalidSchedule { message: String },
    /// A Secret the operator did not create has the managed Secret's name.
    SecretNameTaken { secret_name: String },
    /// The spec asks for pods outside the operator's pod policy; the message names the
    /// fields and what the policy allows. The webhook URL (if any) is still published:
    /// its Sessions end in Error with the same message, and no pod is created.
    PolicyViolation {
        message: String,
        status_url: Option<String>,
    },
    /// A CEL expression of the webhook trigger does not compile; the message names the
    /// field, the parser's message and position. The URL stays published: the webhook
    /// answers 500 `agent_misconfigured` naming the field until it is fixed.
    InvalidExpression {
        message: String,
        status_url: Option<String>,
    },
}

impl Outcome {
    pub fn reason(&self) -> ReadyReason {
        match self {
            Outcome::WebhookReady { .. } => ReadyReason::WebhookReady,
            Outcome::NoWebhookTrigger => ReadyReason::NoWebhookTrigger,
            Outcome::SecretRefMissing { .. } => ReadyReason::SecretRefMissing,
            Outcome::InvalidSpec { .. } => ReadyReason::InvalidSpec,
            Outcome::InvalidSchedule { .. } => ReadyReason::InvalidSchedule,
            Outcome::SecretNameTaken { .. } => ReadyReason::SecretNameTaken,
            Outcome::PolicyViolation { .. } => ReadyReason::PolicyViolation,
            Outcome::InvalidExpression { .. } => ReadyReason::InvalidExpression,
        }
    }

    /// The condition's message: what is the case and what to do about it.
    pub fn message(&self) -> String {
        match self {
            Outcome::WebhookReady { secret_name, redacted: false, .. } => format!(
                "the webhook URL is in status.webhookUrl and in Secret {secret_name:?}, key \"url\""
            ),
            Outcome::WebhookReady { secret_name, redacted: true, .. } => format!(
                "the webhook URL is in Secret {secret_name:?}, key \"url\" (the token is redacted in status)"
            ),
            Outcome::NoWebhookTrigger => {
                "the Agent has no webhook trigger: add `triggers: [{webhook: {}}]` to its spec to get a URL"
                    .to_owned()
            }
            Outcome::SecretRefMissing { message } => message.clone(),
            Outcome::InvalidSpec { message } => format!("the spec is invalid: {message}"),
            Outcome::InvalidSchedule { message } => {
                format!("a schedule trigger is invalid and does not run: {message}")
            }
            Outcome::SecretNameTaken { secret_name } => format!(
                "Secret {secret_name:?} already exists and was not created by hookrun (it lacks \
                 the label {}={}); the operator leaves it alone: rename or delete it so the \
                 operator can create the Agent's webhook Secret under that name",
                hookrun_crds::names::MANAGED_BY_LABEL,
                hookrun_crds::names::MANAGED_BY
            ),
            Outcome::PolicyViolation { message, .. } => message.clone(),
            Outcome::InvalidExpression { message, .. } => format!(
                "an expression does not compile: {message}; until it is fixed the webhook \
                 answers 500 agent_misconfigured"
            ),
        }
    }
}

/// The `Ready` condition for `outcome`. Its `lastTransitionTime` moves only when its
/// status flips, so that a reconcile that changes nothing writes nothing.
pub fn ready_condition(
    existing: &[Condition],
    outcome: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let reason = outcome.reason();
    let status = if reason.is_ready() { "True" } else { "False" };
    let previous = existing.iter().find(|c| c.type_ == READY);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        // The API keeps whole seconds; so do we, so that what we write reads back equal.
        _ => Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    };
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.as_str().to_owned(),
        message: outcome.message(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status as it should be. A spec that cannot be acted on leaves the URL as it was:
/// the Secret is not touched either, so the URL keeps working.
pub fn desired_status(
    existing: Option<&AgentStatus>,
    outcome: &Outcome,
    generation: Option<i64>,
    now: Timestamp,
) -> AgentStatus {
    let existing_conditions = existing
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let webhook_url = match outcome {
        Outcome::WebhookReady { status_url, .. } => Some(status_url.clone()),
        // The name is somebody else's: no Secret of ours carries a URL.
        Outcome::NoWebhookTrigger | Outcome::SecretNameTaken { .. } => None,
        Outcome::PolicyViolation { status_url, .. }
        | Outcome::InvalidExpression { status_url, .. } => status_url.clone(),
        Outcome::SecretRefMissing { .. }
        | Outcome::InvalidSpec { .. }
        | Outcome::InvalidSchedule { .. } => existing.and_then(|s| s.webhook_url.clone()),
    };
    // Replace `Ready` where it stands, so that the list's order never causes a write.
    let ready = ready_condition(existing_conditions, outcome, generation, now);
    let mut conditions = existing_conditions.to_vec();
    match conditions.iter_mut().find(|c| c.type_ == READY) {
        Some(slot) => *slot = ready,
        None => conditions.push(ready),
    }
    AgentStatus {
        webhook_url,
        observed_generation: generation,
        conditions,
        // The scheduler owns these; kept as they are so that they never cause a write.
        next_schedule_time: existing.and_then(|s| s.next_schedule_time.clone()),
        schedules: existing.map(|s| s.schedules.clone()).unwrap_or_default(),
    }
}

/// Whether the status must be patched.
/// The status a new one is compared with: our own last write (with the resourceVersion
/// it replaced) while the cache still shows that version, else what the cache shows.
/// Comparing with the cache alone would write again, differing only in the clock of
/// `lastTransitionTime`, whenever the cache lags behind our own write.
pub fn baseline<'a>(
    cached_version: &str,
    cached: Option<&'a AgentStatus>,
    last_written: Option<&'a (String, AgentStatus)>,
) -> Option<&'a AgentStatus> {
    match last_written {
        Some((replaced_version, status)) if replaced_version == cached_version => Some(status),
        _ => cached,
    }
}

pub fn status_needs_write(desired: &AgentStatus, existing: Option<&AgentStatus>) -> bool {
    existing != Some(desired)
}
