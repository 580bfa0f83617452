//! The `Session` resource: one run of an agent, started by a webhook, carried out by one
//! pod, and holding the agent's events and final answer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The largest title (the initial prompt) a Session carries.
pub const MAX_TITLE_BYTES: usize = 64 * 1024;
/// The largest provider payload kept on a Session for the harness.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// One run of an agent.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "hookrun.dev",
    version = "v1alpha1",
    kind = "Session",
    namespaced,
    status = "SessionStatus",
    shortname = "hrs",
    category = "hookrun",
    doc = "One run of an agent, started by a webhook and carried out by one pod.",
    printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Pod",
        type_ = "string",
        json_path = ".status.podName",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// The Agent (same namespace) this session runs.
    #[schemars(length(min = 1, max = 253))]
    pub agent: String,

    /// The initial prompt.
    #[schemars(length(max = 65536))]
    pub title: String,

    /// Per-session environment overrides, applied over the Agent's `spec.session.env`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<SessionEnvVar>,

    /// What started this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<SessionTrigger>,
}

/// A literal environment variable for one session.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SessionEnvVar {
    /// Letters, digits and `_`, not starting with a digit; `HOOKRUN_` is reserved.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// The value.
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// What started a session, for the harness and for deduplication.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionTrigger {
    /// `webhook`, `linear`, `github`, `slack`, `standard-webhooks` or `hmac`.
    #[schemars(length(max = 64))]
    pub source: String,
    /// The provider's delivery id, when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub delivery_id: Option<String>,
    /// The idempotency key the caller or provider supplied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub idempotency_key: Option<String>,
    /// `sha256:<hex>` of the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 80))]
    pub payload_digest: Option<String>,
    /// The raw provider payload, cut at 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub payload: Option<String>,
    /// Whether `payload` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
}

/// Where a session is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum SessionPhase {
    /// Stored, its pod not running yet.
    #[default]
    Pending,
    /// The pod runs.
    Running,
    /// The agent finished and answered.
    Complete,
    /// The agent, its pod or the platform failed; `status.message` says which.
    Error,
}

impl SessionPhase {
    /// Whether the session has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, SessionPhase::Complete | SessionPhase::Error)
    }
}

/// One event of a session (`agent.message`, `session.status_running`, ...).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SessionEvent {
    /// The event's type, e.g. `agent.message`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The event's text.
    #[serde(default)]
    pub content: String,
    /// When it was recorded.
    pub timestamp: Time,
}

/// What happened to a session so far.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// `Pending`, `Running`, `Complete` or `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// The pod running this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the pod started running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the session finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The agent's final answer: the last `agent.message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// The most recent events, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<SessionEvent>,
    /// How many older events were dropped to keep the list bounded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_events: Option<i64>,
    /// Why the session failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
