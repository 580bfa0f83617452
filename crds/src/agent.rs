//! The `Agent` resource: what an agent is (models, system prompt), how the outside world
//! reaches it (webhook triggers) and how its session pods run.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest system prompt accepted (256 KiB keeps an Agent well inside etcd's limits).
pub const MAX_SYSTEM_BYTES: usize = 256 * 1024;
/// Bounds of `spec.session.timeoutSeconds`: one second to seven days.
pub const TIMEOUT_SECONDS_RANGE: (i64, i64) = (1, 7 * 24 * 3600);
/// Bounds of `spec.session.ttlSecondsAfterFinished`: zero to thirty days.
pub const TTL_SECONDS_RANGE: (i64, i64) = (0, 30 * 24 * 3600);
/// Bounds of `spec.session.idleTimeoutSeconds`: zero (one turn, then done) to one day.
pub const IDLE_TIMEOUT_SECONDS_RANGE: (i64, i64) = (0, 24 * 3600);
/// Bounds of `spec.session.carryOverTurns`: none to [`crate::session::MAX_HISTORY_TURNS`].
pub const CARRY_OVER_TURNS_RANGE: (i64, i64) = (0, crate::session::MAX_HISTORY_TURNS as i64);
/// Bounds of `spec.session.maxConcurrent`.
pub const MAX_CONCURRENT_RANGE: (i64, i64) = (1, 10_000);
/// Bounds of `spec.session.maxStoredSessions`.
pub const MAX_STORED_SESSIONS_RANGE: (i64, i64) = (1, 100_000);
/// How many Sessions of one Agent are stored, finished ones included, when
/// `spec.session.maxStoredSessions` is not set.
pub const DEFAULT_MAX_STORED_SESSIONS: u32 = 1000;
/// How many `allowCIDRs` entries one trigger may carry.
pub const MAX_ALLOW_CIDRS: usize = 256;
/// How many env entries `spec.session.env` may carry.
pub const MAX_ENV: usize = 128;
/// How many `allowedEnv` entries one trigger may carry.
pub const MAX_ALLOWED_ENV: usize = 64;

/// An AI agent that the outside world can start through a secret webhook URL.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "hookrun.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    status = "AgentStatus",
    shortname = "hra",
    category = "hookrun",
    doc = "An AI agent with an optional secret webhook URL that starts sessions of it.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.webhookUrl",
        priority = "1"
    ),
    printcolumn(
        name = "Next Run",
        type_ = "string",
        json_path = ".status.nextScheduleTime",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Model identifiers in order of preference, as `<provider>/<model>`
    /// (e.g. `anthropic/claude-sonnet-4-6`). The harness uses the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub models: Vec<String>,

    /// The system prompt every session of this agent starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub system: Option<String>,

    /// How sessions of this agent are started: a `webhook` and any number of `schedule`s.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.filter(t, has(t.webhook)).size() <= 1",
        "message": "at most one webhook trigger: an Agent has one URL"
    }, {
        "rule": "self.all(a, !has(a.schedule) || self.filter(b, has(b.schedule) && b.schedule.name == a.schedule.name).size() == 1)",
        "message": "schedule trigger names must be unique within an Agent"
    }]))]
    pub triggers: Vec<Trigger>,

    /// How session pods of this agent run.
    // Boxed, like `exec`: the template holds two Kubernetes security contexts inline
    // (over a kilobyte), and every cached Agent would carry that room unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Box<SessionTemplate>>,

    /// Makes the agent a program: the harness runs this command instead of calling a
    /// model (`models` is then ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Box<ExecSpec>>,

    /// Signed (Standard Webhooks) POSTs the operator sends when this agent's Sessions
    /// end, finish a turn or speak. At most 4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    pub callbacks: Vec<crate::callback::AgentCallback>,

    /// Whether a webhook request may name its own `callbackUrl`, and where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_policy: Option<crate::callback::CallbackPolicy>,
}

/// One way of starting sessions.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// A secret webhook URL: anyone holding it can start a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTrigger>,
    /// A clock: the operator starts a session at every slot of a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleTrigger>,
}

/// The longest schedule trigger name (it appears in Session trigger metadata and status).
pub const MAX_SCHEDULE_NAME_LEN: usize = 24;
/// How many skipped-slot records one schedule trigger's status keeps.
pub const MAX_SKIPPED_RECORDS: usize = 10;

/// A schedule trigger: CronJob's semantics, one Session per slot.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleTrigger {
    /// The trigger's name, unique within the Agent: lower-case letters, digits and `-`
    /// (1 to 24 characters). Sessions it starts carry `schedule/<name>` as their source.
    #[schemars(
        length(min = 1, max = 24),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// A cron pattern: 5 fields (minute hour day-of-month month day-of-week), 6 with a
    /// leading seconds field, or a macro (`@hourly`, `@daily`, `@weekly`, `@monthly`,
    /// `@yearly`).
    #[schemars(length(min = 1, max = 256))]
    pub cron: String,
    /// The IANA time zone the pattern is read in (`Europe/Paris`); UTC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: Option<String>,
    /// The initial prompt of each Session; a default naming the trigger and slot when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub title: Option<String>,
    /// Environment variables set on each Session (over the Agent's `spec.session.env`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<crate::session::SessionEnvVar>,
    /// `Allow` (default): slots run whatever else runs. `Forbid`: a slot is skipped while
    /// a Session of this trigger still runs. `Replace`: the running one is ended first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,
    /// A slot missed (operator down) by more than this many seconds is skipped instead of
    /// run late. Without it a missed slot always runs once, late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31536000))]
    pub starting_deadline_seconds: Option<i64>,
    /// Stops new runs; slots passed while suspended are skipped, not caught up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// What a schedule trigger does when a slot comes while its previous Session still runs.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ConcurrencyPolicy {
    /// Start the new Session anyway.
    #[default]
    Allow,
    /// Skip the slot (recorded in status).
    Forbid,
    /// End the running Session, then start the new one.
    Replace,
}

/// The webhook trigger: the operator mints a token and publishes the URL in
/// `status.webhookUrl`; the apiserver checks the token, the caller's address and,
/// when a signing secret is set, the provider's signature.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.linearSignatureSecret) && has(self.linearSignatureSecretRef))",
        "message": "set linearSignatureSecret or linearSignatureSecretRef, not both",
        "fieldPath": ".linearSignatureSecretRef"
    },
    {
        "rule": "!(has(self.githubSecret) && has(self.githubSecretRef))",
        "message": "set githubSecret or githubSecretRef, not both",
        "fieldPath": ".githubSecretRef"
    },
    {
        "rule": "!(has(self.slackSigningSecret) && has(self.slackSigningSecretRef))",
        "message": "set slackSigningSecret or slackSigningSecretRef, not both",
        "fieldPath": ".slackSigningSecretRef"
    },
    {
        "rule": "!(has(self.standardWebhooksSecret) && has(self.standardWebhooksSecretRef))",
        "message": "set standardWebhooksSecret or standardWebhooksSecretRef, not both",
        "fieldPath": ".standardWebhooksSecretRef"
    },
    {
        "rule": "!(has(self.hmacSecret) && has(self.hmacSecretRef))",
        "message": "set hmacSecret or hmacSecretRef, not both",
        "fieldPath": ".hmacSecretRef"
    }
]))]
pub struct WebhookTrigger {
    /// Client networks allowed to call the webhook, in CIDR notation
    /// (`203.0.113.0/24`, `2001:db8::/32`). Empty allows every address.
    #[serde(rename = "allowCIDRs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 64,
        "x-kubernetes-validations": [{
            "rule": "isCIDR(self)",
            "message": "must be a CIDR such as 203.0.113.0/24 or 2001:db8::/32"
        }]
    }))]
    pub allow_cidrs: Vec<String>,

    /// Linear's webhook signing secret, inline. Requests must then carry a valid
    /// `Linear-Signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub linear_signature_secret: Option<String>,
    /// Linear's webhook signing secret, read from a Secret in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linear_signature_secret_ref: Option<SecretKeyRef>,

    /// GitHub's webhook secret, inline (`X-Hub-Signature-256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub github_secret: Option<String>,
    /// GitHub's webhook secret, read from a Secret in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_secret_ref: Option<SecretKeyRef>,

    /// Slack's signing secret, inline (`X-Slack-Signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub slack_signing_secret: Option<String>,
    /// Slack's signing secret, read from a Secret in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack_signing_secret_ref: Option<SecretKeyRef>,

    /// A Standard Webhooks secret (`whsec_...`), inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub standard_webhooks_secret: Option<String>,
    /// A Standard Webhooks secret, read from a Secret in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standard_webhooks_secret_ref: Option<SecretKeyRef>,

    /// A generic HMAC-SHA256 secret, inline (`X-Signature: sha256=<hex>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub hmac_secret: Option<String>,
    /// A generic HMAC-SHA256 secret, read from a Secret in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_ref: Option<SecretKeyRef>,

    /// The environment variables a webhook body's `env` may set: names (`TICKET`) or
    /// name prefixes ending in `*` (`GITHUB_*`). Empty (the default) lets a webhook set
    /// none. A variable the Agent sets in `spec.session.env` can never be set by a
    /// webhook, and `HOOKRUN_*` names are reserved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[schemars(extend("items" = {
        "type": "string",
        "maxLength": 257,
        "pattern": "^[A-Za-z_][A-Za-z0-9_]*[*]?$",
        "x-kubernetes-validations": [{
            "rule": "!self.startsWith('HOOKRUN_') && !(self.endsWith('*') && 'HOOKRUN_'.startsWith(self.substring(0, self.size() - 1)))",
            "message": "names and prefixes that cover HOOKRUN_ are reserved for the variables hookrun sets"
        }]
    }))]
    pub allowed_env: Vec<String>,

    /// Storage budgets of the Sessions this webhook stores, in JSON-encoded bytes
    /// (defaults: title 16 KiB, payload 64 KiB, env 16 KiB, whole Session 128 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WebhookLimits>,

    /// A CEL expression returning a bool, evaluated on each signed request before
    /// anything is stored: false answers 202 `{"filtered": true}` and starts nothing.
    /// Variables: `body` (the JSON payload, or a form's fields), `headers` (lower-cased
    /// names), `provider` (the verified signature scheme, or `none`) and `agent`
    /// (`name`, `namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub filter: Option<String>,

    /// A CEL expression returning a string, used as the Session's title instead of the
    /// built-in one when the caller sends none; an error falls back to the built-in title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub title: Option<String>,

    /// Session variables mapped from the payload by CEL expressions, under the same name
    /// rules and env budget as a webhook's own `env`. An expression that errors or
    /// returns null leaves its variable unset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvExpression>,

    /// A CEL expression returning a string that names the conversation a request
    /// belongs to (a GitHub issue, a Slack thread, a Linear issue), e.g.
    /// `"github/" + body.repository.full_name + "#" + string(body.issue.number)`. A
    /// request whose key matches a live Session of this Agent is delivered into it as a
    /// `user.message` (200 `delivered`, or 202 `buffered` while it is Pending); without
    /// one, a new Session carrying the key starts. An error, or an empty key, starts an
    /// unkeyed Session as if the expression were absent. Keys longer than 1024 bytes are
    /// refused (400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub session_key: Option<String>,

    /// What a filter that fails at run time (a missing field, a wrong type) means:
    /// `Reject` (the default) answers 202 filtered with the error, `Accept` lets the
    /// request through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_error_policy: Option<FilterErrorPolicy>,
}

/// One session variable mapped from the payload.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvExpression {
    /// The variable's name: letters, digits and `_`, not starting with a digit, not
    /// `HOOKRUN_*`, and not one `spec.session.env` sets.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// A CEL expression returning the value (a string; numbers and bools become text).
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
}

/// What a filter that fails at run time means.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FilterErrorPolicy {
    /// The request is filtered (202, nothing stored) and the answer carries the error.
    #[default]
    Reject,
    /// The request goes through as if the filter had returned true.
    Accept,
}

/// Storage budgets of one webhook's Sessions, each in bytes of the JSON that reaches
/// etcd (control characters and `<`, `>`, `&` count 6 bytes). A request over a budget is
/// answered 413 naming the part.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookLimits {
    /// The caller's `title` (1024 to 65536; default 16384). A title composed from a
    /// provider's payload is cut to it instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65536))]
    pub title_bytes: Option<i64>,
    /// The request body kept on the Session for the harness (1024 to 262144; default
    /// 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 262144))]
    pub payload_bytes: Option<i64>,
    /// The body's `env`, all entries together (1024 to 65536; default 16384).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 65536))]
    pub env_bytes: Option<i64>,
    /// The whole Session object (1024 to 524288; default 131072, or the parts' budgets
    /// plus 16 KiB when they are raised past it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 524288))]
    pub session_bytes: Option<i64>,
}

/// A key of a Secret in the same namespace as the Agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the Secret's `data`.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// How session pods of an agent run. Every field is optional.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionTemplate {
    /// The harness image; the operator's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: Option<String>,

    /// Environment of the session pod. A webhook can never replace these; it may add
    /// only the names the webhook trigger's `allowedEnv` lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,

    /// Hard limit on one session's run time, in seconds (1 to 604800).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<i64>,

    /// How long a Session waits for more input after a turn, in seconds (0 to 86400;
    /// default 0: the Session completes after its first turn). Input arrives as
    /// `user.message` events (a webhook whose `sessionKey` matches the Session); each
    /// starts another turn and the wait starts over. `timeoutSeconds` still bounds the
    /// whole Session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub idle_timeout_seconds: Option<i64>,

    /// How many answered turns of a finished Session a follow-up with the same
    /// `sessionKey` carries into the key's next Session (0 to 50; default 0: the next
    /// Session starts a new conversation). The turns are kept in the new Session's
    /// `spec.history`, at most 64 KiB and within the Session budget, newest first kept;
    /// the harness starts the conversation from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 50))]
    pub carry_over_turns: Option<i64>,

    /// How long a finished Session is kept, in seconds (0 to 2592000; default 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2592000))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// How many sessions of this agent may run at once (1 to 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent: Option<i64>,

    /// How many Sessions of this agent may be stored at once, finished ones included
    /// (1 to 100000; default 1000). A webhook beyond it is answered 429; when it is
    /// lowered, the operator deletes the oldest finished Sessions down to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_stored_sessions: Option<i64>,

    /// The ServiceAccount session pods run as; the namespace's `default` when absent.
    /// Its token is never mounted: pods get a short-lived token for hookrun only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,

    /// CPU and memory requests and limits of the session container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels a session pod must be scheduled on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints session pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,

    /// Secrets used to pull the session image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Replaces the pod security context hookrun sets (non-root, RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,

    /// Replaces the container security context hookrun sets (non-root, no privilege
    /// escalation, every capability dropped, RuntimeDefault seccomp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
}

/// An agent that is a program rather than a model: the harness runs `command` with the
/// session's title on stdin, reports each line it prints as an `agent.message`, and
/// completes with its output when it exits 0 (an error with the tail of stderr otherwise).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecSpec {
    /// The program and its arguments, run without a shell (`["sh", "-c", "..."]` for one).
    #[schemars(length(min = 1, max = 64))]
    pub command: Vec<String>,
    /// The working directory; the harness's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub working_dir: Option<String>,
}

/// An environment variable of a session pod: a literal value or one read from a Secret
/// or ConfigMap key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!(has(self.value) && has(self.valueFrom))",
        "message": "set value or valueFrom, not both",
        "fieldPath": ".valueFrom"
    },
    {
        "rule": "!self.name.startsWith('HOOKRUN_')",
        "message": "names starting with HOOKRUN_ are reserved for the variables hookrun sets",
        "fieldPath": ".name"
    }
]))]
pub struct EnvVar {
    /// The variable's name: letters, digits and `_`, not starting with a digit.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")
    )]
    pub name: String,
    /// A literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub value: Option<String>,
    /// A value read from a key of a Secret or ConfigMap in the Agent's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<EnvVarSource>,
}

/// Where an environment variable's value comes from.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.secretKeyRef) != has(self.configMapKeyRef)",
    "message": "set exactly one of secretKeyRef or configMapKeyRef"
}]))]
pub struct EnvVarSource {
    /// A key of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// A key of a ConfigMap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<SecretKeyRef>,
}

/// What the operator observed and did for an Agent.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The URL that starts a session: `<public base>/webhooks/<namespace>/<agent>/<token>`.
    /// The token is replaced by a placeholder when the operator redacts URLs in status;
    /// the full URL is then only in the managed Secret's `url` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// The generation of the spec that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and its reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The earliest next slot of the Agent's schedule triggers (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// One entry per schedule trigger, written by the elected operator's scheduler.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleStatus>,
}

/// What a schedule trigger did last and will do next.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    /// The trigger's name.
    pub name: String,
    /// The slot of the last Session started (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The next slot (RFC 3339, UTC); absent while suspended or invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
    /// The Session started for `lastScheduleTime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_session_name: Option<String>,
    /// The most recent skipped slots, oldest first; a run of skips for the same reason is
    /// one record with a count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedSlot>,
}

/// Slots a schedule trigger did not run, and why.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SkippedSlot {
    /// The last skipped slot of this record (RFC 3339, UTC), or for a local time that
    /// does not exist, that local time and its zone.
    pub time: String,
    /// `Missed` (the operator was down: only the latest missed slot runs),
    /// `MissedDeadline` (later than `startingDeadlineSeconds`), `Forbid` (the previous
    /// Session still ran), `Suspended`, or `NonexistentLocalTime` (a DST gap).
    pub reason: String,
    /// How many slots this record stands for.
    pub count: i64,
}

impl AgentSpec {
    /// The agent's webhook trigger, if it has one (the first one wins).
    pub fn webhook(&self) -> Option<&WebhookTrigger> {
        self.triggers.iter().find_map(|t| t.webhook.as_ref())
    }

    /// The agent's schedule triggers with their index in `spec.triggers`.
    pub fn schedules(&self) -> impl Iterator<Item = (usize, &ScheduleTrigger)> {
        self.triggers
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.schedule.as_ref().map(|s| (i, s)))
    }

    /// `spec.session.idleTimeoutSeconds` (0 when absent), clamped into its range.
    pub fn idle_timeout_seconds(&self) -> u32 {
        let (min, max) = IDLE_TIMEOUT_SECONDS_RANGE;
        self.session
            .as_ref()
            .and_then(|s| s.idle_timeout_seconds)
            .map_or(0, |n| u32::try_from(n.clamp(min, max)).unwrap_or(0))
    }

    /// `spec.session.carryOverTurns` (0 when absent), clamped into its range.
    pub fn carry_over_turns(&self) -> u32 {
        let (min, max) = CARRY_OVER_TURNS_RANGE;
        self.session
            .as_ref()
            .and_then(|s| s.carry_over_turns)
            .map_or(0, |n| u32::try_from(n.clamp(min, max)).unwrap_or(0))
    }

    /// `spec.session.maxStoredSessions`, or its default; a value outside its range is
    /// clamped into it (validation refuses such specs).
    pub fn max_stored_sessions(&self) -> u32 {
        let (min, max) = MAX_STORED_SESSIONS_RANGE;
        self.session
            .as_ref()
            .and_then(|s| s.max_stored_sessions)
            .map_or(DEFAULT_MAX_STORED_SESSIONS, |n| {
                u32::try_from(n.clamp(min, max)).unwrap_or(DEFAULT_MAX_STORED_SESSIONS)
            })
    }
}

/// A signing scheme that a webhook trigger can require, with the spec fields that set its
/// secret and the key under which the operator copies it into the managed Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SignatureScheme {
    Linear,
    Github,
    Slack,
    StandardWebhooks,
    Hmac,
}

impl SignatureScheme {
    /// Every scheme, in the order the apiserver checks them.
    pub const ALL: [SignatureScheme; 5] = [
        SignatureScheme::Linear,
        SignatureScheme::Github,
        SignatureScheme::Slack,
        SignatureScheme::StandardWebhooks,
        SignatureScheme::Hmac,
    ];

    /// The key of the managed Secret that holds this scheme's resolved secret.
    pub fn secret_key(self) -> &'static str {
        match self {
            SignatureScheme::Linear => "linear-signing-secret",
            SignatureScheme::Github => "github-secret",
            SignatureScheme::Slack => "slack-signing-secret",
            SignatureScheme::StandardWebhooks => "standard-webhooks-secret",
            SignatureScheme::Hmac => "hmac-secret",
        }
    }

    /// The spec field of the inline secret, for messages.
    pub fn inline_field(self) -> &'static str {
        match self {
            SignatureScheme::Linear => "linearSignatureSecret",
            SignatureScheme::Github => "githubSecret",
            SignatureScheme::Slack => "slackSigningSecret",
            SignatureScheme::StandardWebhooks => "standardWebhooksSecret",
            SignatureScheme::Hmac => "hmacSecret",
        }
    }

    /// The spec field of the Secret reference, for messages.
    pub fn ref_field(self) -> &'static str {
        match self {
            SignatureScheme::Linear => "linearSignatureSecretRef",
            SignatureScheme::Github => "githubSecretRef",
            SignatureScheme::Slack => "slackSigningSecretRef",
            SignatureScheme::StandardWebhooks => "standardWebhooksSecretRef",
            SignatureScheme::Hmac => "hmacSecretRef",
        }
    }
}

/// Where a scheme's secret comes from, as the spec says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretSource<'a> {
    Inline(&'a str),
    Ref(&'a SecretKeyRef),
}

impl WebhookTrigger {
    /// The inline value and the reference the spec gives for one scheme.
    pub fn secret_fields(&self, scheme: SignatureScheme) -> (Option<&str>, Option<&SecretKeyRef>) {
        let (inline, reference) = match scheme {
            SignatureScheme::Linear => (
                &self.linear_signature_secret,
                &self.linear_signature_secret_ref,
            ),
            SignatureScheme::Github => (&self.github_secret, &self.github_secret_ref),
            SignatureScheme::Slack => (&self.slack_signing_secret, &self.slack_signing_secret_ref),
            SignatureScheme::StandardWebhooks => (
                &self.standard_webhooks_secret,
                &self.standard_webhooks_secret_ref,
            ),
            SignatureScheme::Hmac => (&self.hmac_secret, &self.hmac_secret_ref),
        };
        (inline.as_deref(), reference.as_ref())
    }

    /// The secret source of every scheme this trigger configures. Call after
    /// validation, which rejects a scheme set both inline and by reference.
    pub fn signing_secrets(&self) -> Vec<(SignatureScheme, SecretSource<'_>)> {
        SignatureScheme::ALL
            .into_iter()
            .filter_map(|scheme| match self.secret_fields(scheme) {
                (Some(value), _) => Some((scheme, SecretSource::Inline(value))),
                (None, Some(reference)) => Some((scheme, SecretSource::Ref(reference))),
                (None, None) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator and the apiserver cache every Agent of the cluster; what an Agent
    /// does not set must not cost room in each of them.
    #[test]
    fn an_agent_keeps_its_rarely_set_parts_out_of_line() {
        let size = std::mem::size_of::<Agent>();
        assert!(size <= 800, "an Agent is {size} bytes inline");
    }
}
