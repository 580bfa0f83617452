//! The `Session` resource: one run of an agent, started by a webhook, carried out by one
//! pod, and holding the agent's events and final answer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::budget::{cut_encoded, encoded_str_len};

/// The largest title (the initial prompt) a Session carries.
pub const MAX_TITLE_BYTES: usize = 64 * 1024;
/// The largest request body kept on a Session for the harness (the ceiling of the
/// Agent's `limits.payloadBytes`).
pub const MAX_PAYLOAD_BYTES: usize = crate::budget::CEILING_PAYLOAD_BYTES;
/// How many events a Session keeps; older ones are dropped and counted.
pub const MAX_EVENTS: usize = 200;
/// The most bytes the kept events take in the stored object, JSON-encoded (control
/// characters count 6 bytes), all events together.
pub const MAX_EVENTS_BYTES: usize = 256 * 1024;
/// The largest content of one event, JSON-encoded; longer content is cut.
pub const MAX_EVENT_CONTENT_BYTES: usize = 32 * 1024;
/// The largest final answer kept in `status.response`, JSON-encoded; a longer one is cut.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The largest `status.message`, JSON-encoded.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024;
/// `status.message` of a Session that the cluster refused to store a status write of.
pub const OVERSIZE_MESSAGE: &str = "the cluster refused to store this Session's status as too \
     large; hookrun ended the Session without the write (events or answer may be missing)";

/// Event types hookrun itself writes or reads.
pub mod event_types {
    /// Text from the agent; the last one is the answer when the harness gives none.
    pub const AGENT_MESSAGE: &str = "agent.message";
    /// Input into a live (running or still pending) Session: a follow-up webhook's title
    /// or a Grant's message, prefixed `[from] ` when a sender is named. The initial
    /// title is the first input; it lives in `spec.title`.
    pub const USER_MESSAGE: &str = "user.message";
    /// The session's pod started running.
    pub const STATUS_RUNNING: &str = "session.status_running";
    /// The session ended; the content is the final phase (`Complete` or `Error`).
    pub const STATUS_CLOSED: &str = "session.status_closed";
    /// The harness finished a turn; the content is the turn's reply (may be empty). Its
    /// key is [`super::turn_key`] of the input the turn answered.
    pub const TURN_COMPLETE: &str = "agent.turn_complete";
}

/// The longest session key a Session carries, in bytes.
pub const MAX_SESSION_KEY_BYTES: usize = 1024;

/// The event key of the `agent.turn_complete` that answers input `input_id` (0 for the
/// initial title): a waiting caller finds its own turn's reply by it.
pub fn turn_key(input_id: u64) -> String {
    format!("turn-{input_id}")
}

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
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
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

    /// The session key (the webhook trigger's `sessionKey`) whose follow-ups this
    /// Session receives; its hash is the `hookrun.dev/session-key` label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub session_key: Option<String>,

    /// The answered turns of the previous Session of the same `sessionKey`, oldest
    /// first, when the Agent carries conversations over
    /// (`spec.session.carryOverTurns`); the harness starts from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub history: Vec<HistoryTurn>,
}

/// One answered turn of an earlier Session: what the user said and what the agent
/// answered.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct HistoryTurn {
    /// The turn's input (the title, or a follow-up).
    #[schemars(length(max = 65536))]
    pub user: String,
    /// The agent's reply.
    #[schemars(length(max = 65536))]
    pub assistant: String,
}

/// The most turns a Session carries over from its key's previous Session.
pub const MAX_HISTORY_TURNS: usize = 50;
/// The most a carried-over history may take, JSON-encoded.
pub const MAX_HISTORY_BYTES: usize = 64 * 1024;

/// The conversation of a finished Session, as answered turns, oldest first: its own
/// history, then the title with its reply, then each input with its reply. A turn's
/// reply is its `agent.turn_complete`, or for a Session of one turn its response.
/// Inputs the agent never answered, and turns whose events were dropped from the
/// bounded log, are left out.
pub fn conversation(session: &Session) -> Vec<HistoryTurn> {
    let mut turns = session.spec.history.clone();
    let Some(status) = session.status.as_ref() else {
        return turns;
    };
    // A Session that ran one turn posts no `agent.turn_complete`: its response answers
    // the title. Otherwise every answered turn has one.
    let one_turn = !status
        .events
        .iter()
        .any(|e| e.type_ == event_types::TURN_COMPLETE);
    let reply = |input_id: u64| {
        status.turn_reply(input_id).or_else(|| {
            (one_turn && input_id == 0)
                .then_some(status.response.as_deref())
                .flatten()
        })
    };
    let inputs = status.inputs_after(0);
    let asked = std::iter::once((0, session.spec.title.as_str())).chain(inputs);
    for (id, user) in asked {
        if let Some(assistant) = reply(id) {
            turns.push(HistoryTurn {
                user: user.to_owned(),
                assistant: assistant.to_owned(),
            });
        }
    }
    turns
}

/// The last `max_turns` turns of `previous`'s conversation (at most
/// [`MAX_HISTORY_TURNS`]) that fit `max_bytes` JSON-encoded (at most
/// [`MAX_HISTORY_BYTES`]): older turns are dropped first, and a newest turn that alone
/// does not fit is cut.
pub fn carried_history(previous: &Session, max_turns: u32, max_bytes: usize) -> Vec<HistoryTurn> {
    let max_bytes = max_bytes.min(MAX_HISTORY_BYTES);
    let max_turns = usize::try_from(max_turns)
        .unwrap_or(usize::MAX)
        .min(MAX_HISTORY_TURNS);
    let mut turns = conversation(previous);
    let skip = turns.len().saturating_sub(max_turns);
    turns.drain(..skip);
    // A turn costs its two strings plus `{"user":,"assistant":}` and a comma.
    let cost = |t: &HistoryTurn| encoded_str_len(&t.user) + encoded_str_len(&t.assistant) + 23;
    let mut used = 2;
    let mut kept = 0;
    for turn in turns.iter().rev() {
        if used + cost(turn) > max_bytes {
            break;
        }
        used += cost(turn);
        kept += 1;
    }
    if kept == 0 {
        // Not even the newest turn fits whole: keep as much of it as does, the reply
        // first (it is what the next turn builds on).
        let Some(mut newest) = turns.pop() else {
            return Vec::new();
        };
        let room = max_bytes.saturating_sub(2 + 26);
        let (assistant, _) = cut_encoded(&newest.assistant, room);
        newest.assistant = assistant.to_owned();
        let room = room.saturating_sub(encoded_str_len(&newest.assistant) - 2);
        newest.user = cut_encoded(&newest.user, room).0.to_owned();
        return if newest.assistant.is_empty() {
            Vec::new()
        } else {
            vec![newest]
        };
    }
    turns.split_off(turns.len() - kept)
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
    /// The request body, within the Agent's payload budget (at most 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub payload: Option<String>,
    /// Whether `payload` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// The request's own `callbackUrl`, within the Agent's
    /// `spec.callbackPolicy.allowedUrlPrefixes`: sent `session.completed` and
    /// `session.failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub callback_url: Option<String>,
}

/// Where a session is in its life.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum SessionPhase {
    /// Stored, its pod not running yet.
    #[default]
    Pending,
    /// Stored, waiting for its pod: the Agent already runs `spec.session.maxConcurrent`
    /// Sessions. Started oldest first when a slot frees; `status.message` says why.
    Queued,
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
    /// The idempotency key its sender gave it: a repeat of the same post (a retry after
    /// a timeout) finds it and is not stored again.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "key")]
    pub key: Option<String>,
}

/// The longest idempotency key an event may carry.
pub const MAX_EVENT_KEY_LEN: usize = 64;

impl SessionEvent {
    /// The bytes this event takes in the stored list, JSON-encoded, with its comma.
    pub fn encoded_len(&self) -> usize {
        // {"type":,"content":,"timestamp":"2006-01-02T15:04:05Z"},
        const FRAME: usize = r#"{"type":,"content":,"timestamp":""},"#.len();
        const TIMESTAMP: usize = "2006-01-02T15:04:05Z".len();
        // ,"key":
        const KEY_FRAME: usize = r#","key":"#.len();
        let key = self
            .key
            .as_deref()
            .map_or(0, |key| KEY_FRAME + encoded_str_len(key));
        FRAME + TIMESTAMP + encoded_str_len(&self.type_) + encoded_str_len(&self.content) + key
    }
}

/// Checks an event's idempotency key: 1 to [`MAX_EVENT_KEY_LEN`] ASCII letters, digits,
/// `-`, `_` or `.`.
pub fn valid_event_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_EVENT_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// What happened to a session so far.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// `Pending`, `Queued`, `Running`, `Complete` or `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// The pod running this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The uid of that pod: the runner API serves only tokens bound to this very pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
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
    /// Why the session failed, when it did; why it waits, while it is `Queued`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The callback deliveries of this session (written by the operator only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub callbacks: Vec<crate::callback::CallbackDelivery>,
    /// The harness has read every input and takes no more: a later input is refused as
    /// if the Session had finished (a follow-up starts the key's next Session), so no
    /// input is accepted that nobody will read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inputs_closed: bool,
}

/// `text` cut to at most `max` bytes at a character boundary; whether it was cut.
pub fn truncate_utf8(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

impl SessionPhase {
    /// The phase as written in `status.phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionPhase::Pending => "Pending",
            SessionPhase::Queued => "Queued",
            SessionPhase::Running => "Running",
            SessionPhase::Complete => "Complete",
            SessionPhase::Error => "Error",
        }
    }
}

impl SessionStatus {
    /// The phase, `Pending` when none is written yet.
    pub fn phase(&self) -> SessionPhase {
        self.phase.unwrap_or_default()
    }

    /// Whether the session has ended.
    pub fn is_finished(&self) -> bool {
        self.phase().is_finished()
    }

    /// The id of `events[0]`: ids count every event ever appended, from 1, so they stay
    /// stable while old events are dropped (SSE's `Last-Event-ID` relies on that).
    pub fn first_event_id(&self) -> u64 {
        self.dropped_events.unwrap_or(0).max(0) as u64 + 1
    }

    /// The id the next appended event gets.
    pub fn next_event_id(&self) -> u64 {
        self.first_event_id() + self.events.len() as u64
    }

    /// Appends an event, cutting its content at [`MAX_EVENT_CONTENT_BYTES`] and dropping
    /// the oldest events (counted in `droppedEvents`) to stay within [`MAX_EVENTS`] and
    /// [`MAX_EVENTS_BYTES`], both measured as stored (JSON-encoded). Returns the new
    /// event's id.
    pub fn push_event(&mut self, type_: &str, content: &str, at: Time) -> u64 {
        self.push_keyed_event(type_, content, None, at)
    }

    /// The id of the kept event that carries idempotency key `key`.
    pub fn event_with_key(&self, key: &str) -> Option<u64> {
        self.events
            .iter()
            .position(|e| e.key.as_deref() == Some(key))
            .map(|i| self.first_event_id() + i as u64)
    }

    /// [`SessionStatus::push_event`] with the sender's idempotency `key`, unless an event
    /// with that key is already kept: then nothing changes and its id is returned.
    pub fn push_event_once(&mut self, type_: &str, content: &str, key: &str, at: Time) -> u64 {
        match self.event_with_key(key) {
            Some(id) => id,
            None => self.push_keyed_event(type_, content, Some(key), at),
        }
    }

    fn push_keyed_event(&mut self, type_: &str, content: &str, key: Option<&str>, at: Time) -> u64 {
        let (content, _) = cut_encoded(content, MAX_EVENT_CONTENT_BYTES);
        self.events.push(SessionEvent {
            type_: type_.to_owned(),
            content: content.to_owned(),
            timestamp: at,
            key: key.map(str::to_owned),
        });
        let mut bytes: usize = self.events.iter().map(SessionEvent::encoded_len).sum();
        let mut drop = 0;
        while self.events.len() - drop > MAX_EVENTS
            || (bytes > MAX_EVENTS_BYTES && self.events.len() - drop > 1)
        {
            bytes -= self.events[drop].encoded_len();
            drop += 1;
        }
        if drop > 0 {
            self.events.drain(..drop);
            self.dropped_events = Some(self.dropped_events.unwrap_or(0) + drop as i64);
        }
        self.next_event_id() - 1
    }

    /// The `user.message` events after event id `after`, oldest first, as (id, content).
    pub fn inputs_after(&self, after: u64) -> Vec<(u64, &str)> {
        let first = self.first_event_id();
        self.events
            .iter()
            .enumerate()
            .map(|(i, e)| (first + i as u64, e))
            .filter(|(id, e)| *id > after && e.type_ == event_types::USER_MESSAGE)
            .map(|(id, e)| (id, e.content.as_str()))
            .collect()
    }

    /// The reply of the turn that answered input `input_id` (0: the initial title), once
    /// the harness posted it.
    pub fn turn_reply(&self, input_id: u64) -> Option<&str> {
        let key = turn_key(input_id);
        self.events
            .iter()
            .find(|e| e.type_ == event_types::TURN_COMPLETE && e.key.as_deref() == Some(&key))
            .map(|e| e.content.as_str())
    }

    /// Appends input `content` as a `user.message` carrying event key `key` (a hash of
    /// the delivery id or idempotency key), unless one with that key is kept already:
    /// then it is a retry, answered with the first one's id. [`Finished`] when the
    /// Session has finished (and the input is not a retry).
    pub fn append_input(&mut self, content: &str, key: &str, at: Time) -> Result<Input, Finished> {
        if let Some(id) = self.event_with_key(key) {
            return Ok(Input { id, replayed: true });
        }
        if !self.takes_input() {
            return Err(Finished);
        }
        let id = self.push_event_once(event_types::USER_MESSAGE, content, key, at);
        Ok(Input {
            id,
            replayed: false,
        })
    }

    /// Whether an input may still be appended: the Session has not finished and its
    /// harness has not closed its inputs.
    pub fn takes_input(&self) -> bool {
        !self.is_finished() && !self.inputs_closed
    }

    /// Closes the inputs once the harness has read every input up to event id `read`:
    /// the unread inputs after it (and nothing changed) when there are some, so that the
    /// harness answers them first; otherwise none, and the inputs are closed.
    pub fn close_inputs(&mut self, read: u64) -> Vec<(u64, String)> {
        let unread: Vec<(u64, String)> = self
            .inputs_after(read)
            .into_iter()
            .map(|(id, content)| (id, content.to_owned()))
            .collect();
        if unread.is_empty() {
            self.inputs_closed = true;
        }
        unread
    }

    /// The content of the last `agent.message` still kept.
    pub fn last_agent_message(&self) -> Option<&str> {
        self.events
            .iter()
            .rev()
            .find(|e| e.type_ == event_types::AGENT_MESSAGE)
            .map(|e| e.content.as_str())
    }

    /// Moves a Pending session to Running and records `session.status_running`; false
    /// (and nothing changed) when it was not Pending.
    pub fn mark_running(&mut self, at: Time) -> bool {
        if self.phase() != SessionPhase::Pending {
            return false;
        }
        self.phase = Some(SessionPhase::Running);
        self.start_time.get_or_insert_with(|| at.clone());
        self.push_event(event_types::STATUS_RUNNING, "", at);
        true
    }

    /// Ends the session in `phase` (`Complete` or `Error`) with its answer and message,
    /// each cut to its bound, and records `session.status_closed` carrying the phase.
    /// False (and nothing changed) when it had already ended: the first ending wins.
    pub fn finish(
        &mut self,
        phase: SessionPhase,
        response: Option<&str>,
        message: Option<&str>,
        at: Time,
    ) -> bool {
        debug_assert!(phase.is_finished());
        if self.is_finished() {
            return false;
        }
        self.phase = Some(phase);
        self.response = response.map(|r| cut_encoded(r, MAX_RESPONSE_BYTES).0.to_owned());
        self.message = message.map(|m| cut_encoded(m, MAX_MESSAGE_BYTES).0.to_owned());
        self.completion_time = Some(at.clone());
        self.push_event(event_types::STATUS_CLOSED, phase.as_str(), at);
        true
    }
}

/// The Session has finished: it takes no more input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finished;

/// An input appended to (or found in) a Session's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    /// Its event id.
    pub id: u64,
    /// It was there already (a retried delivery).
    pub replayed: bool,
}

/// Whether the kube-apiserver refused a write because the request or the object it would
/// store is too large: its own body limit (413, "Request entity too large"), a patched
/// object past that limit, or etcd's request size limit ("etcdserver: request is too
/// large", which arrives as a 500).
pub fn is_too_large_refusal(code: u16, message: &str) -> bool {
    if code == 413 {
        return true;
    }
    let message = message.to_ascii_lowercase();
    matches!(code, 400 | 422 | 500)
        && (message.contains("too large") || message.contains("exceeds the maximum"))
}

/// The merge patch that ends a Session whose status write the cluster refused as too
/// large: `Error`, [`OVERSIZE_MESSAGE`] and the completion time, nothing that grows.
/// `shed` also removes the kept events and answer (counted in `droppedEvents`), for an
/// object so close to the limit that even that small write does not fit. `None` when
/// the Session had already finished: the first ending wins.
pub fn oversize_finish_patch(
    current: &SessionStatus,
    resource_version: &str,
    at: &Time,
    shed: bool,
) -> Option<Value> {
    if current.is_finished() {
        return None;
    }
    let mut status = json!({
        "phase": SessionPhase::Error.as_str(),
        "message": OVERSIZE_MESSAGE,
        "completionTime": at,
    });
    if shed {
        status["events"] = Value::Null;
        status["response"] = Value::Null;
        status["droppedEvents"] =
            json!(current.dropped_events.unwrap_or(0) + current.events.len() as i64);
    }
    Some(json!({"metadata": {"resourceVersion": resource_version}, "status": status}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(user: &str, assistant: &str) -> HistoryTurn {
        HistoryTurn {
            user: user.to_owned(),
            assistant: assistant.to_owned(),
        }
    }

    /// A finished live Session: title "hi" answered "hello", input "more" answered
    /// "sure", an input never answered (its program exited), completed with `response`.
    fn finished_conversation(response: &str) -> Session {
        let mut session = Session::new(
            "a-k-0",
            SessionSpec {
                agent: "a".into(),
                title: "hi".into(),
                history: vec![turn("before", "earlier")],
                ..SessionSpec::default()
            },
        );
        let mut status = SessionStatus::default();
        status.push_event_once(event_types::TURN_COMPLETE, "hello", &turn_key(0), at());
        let more = status.append_input("more", "k1", at()).expect("live").id;
        status.push_event_once(event_types::TURN_COMPLETE, "sure", &turn_key(more), at());
        status.append_input("ignored?", "k2", at()).expect("live");
        status.finish(SessionPhase::Complete, Some(response), None, at());
        session.status = Some(status);
        session
    }

    #[test]
    fn inputs_close_only_once_every_input_was_read() {
        let mut status = SessionStatus::default();
        let first = status.append_input("one", "k1", at()).expect("open").id;
        assert_eq!(status.close_inputs(0), vec![(first, "one".to_owned())]);
        assert!(status.takes_input(), "unread inputs keep it open");
        assert_eq!(status.close_inputs(first), vec![]);
        assert!(!status.takes_input());
        assert_eq!(status.append_input("two", "k2", at()), Err(Finished));
        // A retry of an input already stored is still answered as stored.
        assert_eq!(
            status.append_input("one", "k1", at()),
            Ok(Input {
                id: first,
                replayed: true
            })
        );
    }

    #[test]
    fn a_conversation_is_its_history_then_its_answered_turns() {
        let session = finished_conversation("sure");
        assert_eq!(
            conversation(&session),
            vec![
                turn("before", "earlier"),
                turn("hi", "hello"),
                turn("more", "sure"),
            ]
        );
        // A one-turn Session: the title and its response.
        let mut one = Session::new("a-1", SessionSpec::default());
        one.spec.title = "t".into();
        let mut status = SessionStatus::default();
        status.finish(SessionPhase::Complete, Some("r"), None, at());
        one.status = Some(status);
        assert_eq!(conversation(&one), vec![turn("t", "r")]);
        // Nothing answered: nothing to carry.
        let mut failed = Session::new("a-2", SessionSpec::default());
        let mut status = SessionStatus::default();
        status.finish(SessionPhase::Error, None, Some("boom"), at());
        failed.status = Some(status);
        assert_eq!(conversation(&failed), vec![]);
    }

    #[test]
    fn carried_history_keeps_the_newest_turns_within_its_bounds() {
        let session = finished_conversation("sure");
        assert_eq!(
            carried_history(&session, 2, MAX_HISTORY_BYTES),
            vec![turn("hi", "hello"), turn("more", "sure")]
        );
        assert_eq!(carried_history(&session, 0, MAX_HISTORY_BYTES), vec![]);
        assert_eq!(carried_history(&session, 99, MAX_HISTORY_BYTES).len(), 3);
        // Bytes: what is kept, as stored, fits; the oldest go first.
        for max in [40, 60, 80, 100, 200] {
            let kept = carried_history(&session, 50, max);
            assert!(crate::budget::encoded_len(&kept) <= max, "{max}: {kept:?}");
            let all = conversation(&session);
            assert_eq!(kept[..], all[all.len() - kept.len()..], "{max}");
        }
        // A newest turn larger than the whole budget is cut, its reply first.
        let mut huge = Session::new("a-3", SessionSpec::default());
        huge.spec.title = "y".repeat(MAX_HISTORY_BYTES);
        huge.status = Some(SessionStatus {
            response: Some("x".repeat(MAX_HISTORY_BYTES * 2)),
            phase: Some(SessionPhase::Complete),
            ..SessionStatus::default()
        });
        let kept = carried_history(&huge, 50, MAX_HISTORY_BYTES);
        assert_eq!(kept.len(), 1);
        assert!(crate::budget::encoded_len(&kept) <= MAX_HISTORY_BYTES);
        assert!(kept[0].assistant.len() > MAX_HISTORY_BYTES - 100);
    }

    #[test]
    fn event_bytes_are_measured_encoded() {
        let mut status = SessionStatus::default();
        // Raw, 200 events of 2 KiB control characters are 400 KiB; encoded 2.4 MiB.
        let controls = "\u{1}".repeat(2 * 1024);
        for _ in 0..MAX_EVENTS {
            status.push_event("agent.message", &controls, at());
        }
        let stored = serde_json::to_vec(&status.events).expect("json").len();
        assert!(stored <= MAX_EVENTS_BYTES, "{stored}");
        // The measure counts a comma after every event, the list's brackets aside.
        let measured: usize = status.events.iter().map(SessionEvent::encoded_len).sum();
        assert!(measured + 1 >= stored, "{measured} < {stored}");
        // Content over its bound is cut by its encoded size.
        status.push_event(
            "agent.message",
            &"\u{1}".repeat(MAX_EVENT_CONTENT_BYTES),
            at(),
        );
        let last = status.events.last().expect("an event");
        assert_eq!(last.content.len(), MAX_EVENT_CONTENT_BYTES / 6);
    }

    #[test]
    fn an_event_posted_twice_with_one_key_is_kept_once() {
        let mut status = SessionStatus::default();
        let first = status.push_event_once("agent.message", "hi", "k-1", at());
        let again = status.push_event_once("agent.message", "hi", "k-1", at());
        assert_eq!((first, again), (1, 1));
        assert_eq!(status.events.len(), 1);
        assert_eq!(
            status.push_event_once("agent.message", "hi", "k-2", at()),
            2
        );
        assert_eq!(status.push_event("agent.message", "no key", at()), 3);
        assert_eq!(status.event_with_key("k-2"), Some(2));
        // The key is counted in the stored size.
        let stored = serde_json::to_vec(&status.events[0]).expect("json").len();
        assert_eq!(status.events[0].encoded_len(), stored + 1);
        assert!(valid_event_key("0f3a-b_c.d"));
        for bad in ["", "a b", "é", &"a".repeat(MAX_EVENT_KEY_LEN + 1)] {
            assert!(!valid_event_key(bad), "{bad}");
        }
    }

    #[test]
    fn answers_and_messages_are_cut_encoded() {
        let mut status = SessionStatus::default();
        let answer = "<".repeat(MAX_RESPONSE_BYTES);
        assert!(status.finish(SessionPhase::Complete, Some(&answer), Some(&answer), at()));
        assert_eq!(
            status.response.as_ref().map(String::len),
            Some(MAX_RESPONSE_BYTES / 6)
        );
        assert_eq!(
            status.message.as_ref().map(String::len),
            Some(MAX_MESSAGE_BYTES / 6)
        );
    }

    #[test]
    fn too_large_refusals() {
        assert!(is_too_large_refusal(
            413,
            "Request entity too large: limit is 3145728"
        ));
        assert!(is_too_large_refusal(
            500,
            "etcdserver: request is too large"
        ));
        assert!(is_too_large_refusal(422, "The request is too large"));
        assert!(!is_too_large_refusal(409, "too large"));
        assert!(!is_too_large_refusal(500, "etcd is down"));
        assert!(!is_too_large_refusal(422, "spec.title: Too long"));
    }

    #[test]
    fn the_oversize_patch_ends_without_growing() {
        let mut status = SessionStatus::default();
        status.mark_running(at());
        status.push_event("agent.message", "hi", at());
        let patch = oversize_finish_patch(&status, "7", &at(), false).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(patch["status"]["phase"], "Error");
        assert_eq!(patch["status"]["message"], OVERSIZE_MESSAGE);
        assert!(patch["status"].get("events").is_none());
        let shed = oversize_finish_patch(&status, "7", &at(), true).expect("a patch");
        assert_eq!(shed["status"]["events"], Value::Null);
        assert_eq!(shed["status"]["droppedEvents"], 2);
        status.finish(SessionPhase::Complete, None, None, at());
        assert_eq!(oversize_finish_patch(&status, "8", &at(), false), None);
    }

    fn at() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn inputs_are_appended_once_and_turns_found_by_their_input() {
        let mut status = SessionStatus::default();
        status.mark_running(at());
        let first = status.append_input("again", "d-1", at()).expect("live");
        assert_eq!(
            first,
            Input {
                id: 2,
                replayed: false
            }
        );
        // A retried delivery is the same input.
        let retry = status.append_input("again", "d-1", at()).expect("live");
        assert_eq!(
            retry,
            Input {
                id: 2,
                replayed: true
            }
        );
        status.push_event_once(
            event_types::TURN_COMPLETE,
            "first reply",
            &turn_key(0),
            at(),
        );
        let second = status.append_input("third", "d-2", at()).expect("live");
        assert_eq!(second.id, 4);
        assert_eq!(status.inputs_after(0), [(2, "again"), (4, "third")]);
        assert_eq!(status.inputs_after(2), [(4, "third")]);
        assert!(status.inputs_after(4).is_empty());
        assert_eq!(status.turn_reply(0), Some("first reply"));
        assert_eq!(status.turn_reply(2), None);
        status.push_event_once(event_types::TURN_COMPLETE, "to again", &turn_key(2), at());
        assert_eq!(status.turn_reply(2), Some("to again"));
        assert_eq!(status.turn_reply(4), None);
        status.finish(SessionPhase::Complete, None, None, at());
        assert_eq!(status.append_input("late", "d-3", at()), Err(Finished));
        // A retry of an input it took is still answered after it finished.
        assert!(
            status
                .append_input("again", "d-1", at())
                .is_ok_and(|i| i.replayed)
        );
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("héllo", 2), ("h", true));
        assert_eq!(truncate_utf8("héllo", 3), ("hé", true));
        assert_eq!(truncate_utf8("hi", 2), ("hi", false));
    }

    #[test]
    fn events_are_bounded_by_count_and_ids_stay_stable() {
        let mut status = SessionStatus::default();
        for i in 0..(MAX_EVENTS + 5) {
            let id = status.push_event("agent.message", &i.to_string(), at());
            assert_eq!(id, i as u64 + 1);
        }
        assert_eq!(status.events.len(), MAX_EVENTS);
        assert_eq!(status.dropped_events, Some(5));
        assert_eq!(status.first_event_id(), 6);
        assert_eq!(status.events[0].content, "5");
        assert_eq!(
            status.last_agent_message(),
            Some((MAX_EVENTS + 4).to_string().as_str())
        );
    }

    #[test]
    fn events_are_bounded_by_bytes_but_the_newest_is_kept() {
        let mut status = SessionStatus::default();
        let big = "x".repeat(MAX_EVENT_CONTENT_BYTES + 10);
        for _ in 0..20 {
            status.push_event("agent.message", &big, at());
        }
        let bytes: usize = status.events.iter().map(|e| e.content.len()).sum();
        assert!(bytes <= MAX_EVENTS_BYTES, "{bytes}");
        assert_eq!(status.events[0].content.len(), MAX_EVENT_CONTENT_BYTES);
        assert_eq!(
            status.dropped_events.unwrap_or(0) as usize + status.events.len(),
            20
        );
    }

    #[test]
    fn running_then_finished_once() {
        let mut status = SessionStatus::default();
        assert!(status.mark_running(at()));
        assert!(!status.mark_running(at()));
        assert_eq!(status.phase(), SessionPhase::Running);
        assert!(status.finish(SessionPhase::Complete, Some("done"), None, at()));
        assert!(!status.finish(SessionPhase::Error, None, Some("late"), at()));
        assert_eq!(status.phase(), SessionPhase::Complete);
        assert_eq!(status.response.as_deref(), Some("done"));
        let types: Vec<_> = status.events.iter().map(|e| e.type_.as_str()).collect();
        assert_eq!(
            types,
            [event_types::STATUS_RUNNING, event_types::STATUS_CLOSED]
        );
        assert_eq!(status.events[1].content, "Complete");
        assert!(!status.mark_running(at()));
    }
}
