//! Completion callbacks: the Agent's `spec.callbacks` and `spec.callbackPolicy`, the
//! record of each delivery kept in a Session's `status.callbacks`, and the pure pieces of
//! a delivery both binaries share: the `webhook-id`, the JSON body, the Standard Webhooks
//! signature, the URL as it may be shown, and the per-request URL's prefix check.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::agent::SecretKeyRef;
use crate::budget::cut_encoded;

/// The events a callback can subscribe to.
pub mod events {
    /// The Session ended in `Complete`.
    pub const SESSION_COMPLETED: &str = "session.completed";
    /// The Session ended in `Error`.
    pub const SESSION_FAILED: &str = "session.failed";
    /// A live Session finished a turn (its harness posted `agent.turn_complete`).
    pub const SESSION_TURN_COMPLETED: &str = "session.turn_completed";
    /// Every `agent.message` (opt-in: chatty).
    pub const AGENT_MESSAGE: &str = "agent.message";
    /// Every event name a callback may list.
    pub const ALL: [&str; 4] = [
        SESSION_COMPLETED,
        SESSION_FAILED,
        SESSION_TURN_COMPLETED,
        AGENT_MESSAGE,
    ];
    /// What a callback without `events`, and a per-request `callbackUrl`, is sent for.
    pub const DEFAULT: [&str; 2] = [SESSION_COMPLETED, SESSION_FAILED];
}

/// The most callbacks one Agent may list.
pub const MAX_CALLBACKS: usize = 4;
/// The longest callback URL (an Agent's or a per-request `callbackUrl`).
pub const MAX_CALLBACK_URL_LEN: usize = 2048;
/// The most delivery records one Session keeps; deliveries past it are not made.
pub const MAX_DELIVERY_RECORDS: usize = 64;
/// The largest `response` in a callback body, JSON-encoded; a longer one is cut.
pub const MAX_CALLBACK_RESPONSE_BYTES: usize = 32 * 1024;
/// The longest reason kept in a delivery record.
pub const MAX_DELIVERY_MESSAGE_BYTES: usize = 512;

/// One callback of an Agent: where to POST, with which key to sign, for which events.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentCallback {
    /// An absolute `http` or `https` URL. Its query string is never logged or shown in
    /// status.
    #[schemars(length(min = 1, max = 2048))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.startsWith('https://') || self.startsWith('http://')",
        "message": "must be an absolute http:// or https:// URL"
    }]))]
    pub url: String,
    /// The Standard Webhooks key (`whsec_<base64>`) the deliveries are signed with, read
    /// from a Secret in the Agent's namespace.
    pub secret_ref: SecretKeyRef,
    /// `session.completed`, `session.failed`, `session.turn_completed`, `agent.message`;
    /// empty means `session.completed` and `session.failed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[schemars(extend("items" = {
        "type": "string",
        "enum": ["session.completed", "session.failed", "session.turn_completed", "agent.message"]
    }))]
    pub events: Vec<String>,
}

impl AgentCallback {
    /// The events this callback is sent for.
    pub fn event_names(&self) -> Vec<&str> {
        if self.events.is_empty() {
            events::DEFAULT.to_vec()
        } else {
            self.events.iter().map(String::as_str).collect()
        }
    }
}

/// Whether, and where, a webhook request may ask for its own callback (`callbackUrl`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbackPolicy {
    /// URL prefixes a request's `callbackUrl` must start with (e.g.
    /// `https://ci.example.com/hooks/`). A prefix matches at a `/`, `?` or `#` boundary
    /// or at its own trailing `/`. Empty: no request may name a callback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("items" = {"type": "string", "maxLength": 2048}))]
    pub allowed_url_prefixes: Vec<String>,
    /// The key per-request callbacks are signed with; without it, the first
    /// `spec.callbacks[].secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

impl CallbackPolicy {
    /// Whether `url` may be a request's `callbackUrl` under these prefixes.
    pub fn allows(&self, url: &str) -> bool {
        self.allowed_url_prefixes
            .iter()
            .any(|prefix| url_has_prefix(url, prefix))
    }
}

/// Whether `url` starts with `prefix` at a boundary: `https://a.example` must not admit
/// `https://a.example.evil.net/`. The prefix must itself be an http(s) URL.
pub fn url_has_prefix(url: &str, prefix: &str) -> bool {
    if prefix.is_empty()
        || !(prefix.starts_with("https://") || prefix.starts_with("http://"))
        || url.len() > MAX_CALLBACK_URL_LEN
    {
        return false;
    }
    let Some(rest) = url.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

/// Where one delivery stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeliveryState {
    /// Not delivered yet; `nextAttemptTime` says when it is tried again.
    #[default]
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Given up: a 4xx answer (410 included), or the retry schedule ran out.
    Failed,
    /// Never sent: the destination is not allowed (loopback, link-local, a denied
    /// network, a redirect) or the signing key is missing. Not retried.
    Refused,
}

impl DeliveryState {
    /// Whether nothing more will be done for the delivery.
    pub fn is_final(self) -> bool {
        !matches!(self, DeliveryState::Pending)
    }

    /// The state as written in status and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "Pending",
            DeliveryState::Delivered => "Delivered",
            DeliveryState::Failed => "Failed",
            DeliveryState::Refused => "Refused",
        }
    }
}

/// One callback delivery of a Session, as kept in `status.callbacks`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallbackDelivery {
    /// The `webhook-id` of every attempt: stable for this Session, target and event.
    #[schemars(length(max = 64))]
    pub id: String,
    /// The target, without its query string, fragment or credentials.
    #[schemars(length(max = 2048))]
    pub url: String,
    /// The event (`session.completed`, ...).
    #[schemars(length(max = 64))]
    pub event: String,
    /// `Pending`, `Delivered`, `Failed` or `Refused`.
    pub state: DeliveryState,
    /// Attempts made so far.
    #[serde(default)]
    pub attempts: i32,
    /// The HTTP status of the last answer, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status_code: Option<i32>,
    /// When the last attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_time: Option<Time>,
    /// When the next attempt is due (`Pending` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// When the receiver accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_time: Option<Time>,
    /// Why the last attempt failed or the delivery was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    pub message: Option<String>,
}

impl CallbackDelivery {
    /// Sets the reason, cut to its bound.
    pub fn set_message(&mut self, message: &str) {
        self.message = Some(
            cut_encoded(message, MAX_DELIVERY_MESSAGE_BYTES)
                .0
                .to_owned(),
        );
    }
}

/// The `webhook-id` of one delivery: stable for the Session (its uid), the target URL and
/// the event (and, for events that repeat, the Session event's id), so a receiver
/// dedupes every retry, and an operator restart or a new leader sends the same id.
pub fn webhook_id(session_uid: &str, url: &str, event: &str, occurrence: Option<u64>) -> String {
    let mut hash = Sha256::new();
    for part in [session_uid, url, event] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    if let Some(n) = occurrence {
        hash.update(n.to_be_bytes());
    }
    let digest = hash.finalize();
    format!("msg_{}", hex::encode(&digest[..16]))
}

/// `url` as it may be shown in status, logs and Events: scheme, host, port and path,
/// without credentials, query string or fragment.
pub fn display_url(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..cut];
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let shown = format!("{scheme}://{host}{path}");
    crate::session::truncate_utf8(&shown, MAX_CALLBACK_URL_LEN)
        .0
        .to_owned()
}

/// What a delivery says: the JSON body of every attempt (stable across attempts).
#[derive(Clone, Debug, PartialEq)]
pub struct CallbackBody<'a> {
    pub event: &'a str,
    pub session: &'a str,
    pub namespace: &'a str,
    pub agent: &'a str,
    pub phase: &'a str,
    pub response: Option<&'a str>,
    /// When the event happened.
    pub timestamp: &'a Time,
}

impl CallbackBody<'_> {
    /// `{type, session, namespace, agentDefinition, phase, response, timestamp}`, the
    /// response cut to [`MAX_CALLBACK_RESPONSE_BYTES`].
    pub fn to_json(&self) -> Value {
        let response = self
            .response
            .map(|r| cut_encoded(r, MAX_CALLBACK_RESPONSE_BYTES).0);
        json!({
            "type": self.event,
            "session": self.session,
            "namespace": self.namespace,
            "agentDefinition": self.agent,
            "phase": self.phase,
            "response": response,
            "timestamp": self.timestamp,
        })
    }
}

/// A Standard Webhooks key that cannot be used; says what would be accepted, never the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the callback signing key {0}: use whsec_<base64 of 24 to 64 bytes>")]
pub struct UnusableKey(&'static str);

/// The HMAC key of a Standard Webhooks secret (`whsec_<base64>`; the prefix may be left
/// out, as the reference libraries allow).
pub fn decode_key(secret: &[u8]) -> Result<Vec<u8>, UnusableKey> {
    let text = std::str::from_utf8(secret)
        .map_err(|_| UnusableKey("is not text"))?
        .trim();
    let encoded = text.strip_prefix("whsec_").unwrap_or(text);
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| UnusableKey("is not base64 after whsec_"))?;
    if key.is_empty() {
        return Err(UnusableKey("is empty"));
    }
    Ok(key)
}

/// The `webhook-signature` header of one attempt: `v1,<base64 HMAC-SHA256 of
/// <id>.<timestamp>.<body>>` under `key` (already decoded).
pub fn sign(key: &[u8], id: &str, timestamp_seconds: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_seconds.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_example_signs_the_same() {
        // The example published with the Standard Webhooks specification.
        let key = decode_key(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("a key");
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(decode_key(b"whsec_").is_err());
        assert!(decode_key(b"whsec_!!").is_err());
    }

    #[test]
    fn ids_are_stable_per_session_target_and_event() {
        let a = webhook_id("uid-1", "https://r.example/x", "session.completed", None);
        assert_eq!(
            a,
            webhook_id("uid-1", "https://r.example/x", "session.completed", None)
        );
        assert!(a.starts_with("msg_") && a.len() == 36, "{a}");
        for other in [
            webhook_id("uid-2", "https://r.example/x", "session.completed", None),
            webhook_id("uid-1", "https://r.example/y", "session.completed", None),
            webhook_id("uid-1", "https://r.example/x", "session.failed", None),
            webhook_id("uid-1", "https://r.example/x", "session.completed", Some(1)),
        ] {
            assert_ne!(a, other);
        }
    }

    #[test]
    fn shown_urls_lose_credentials_and_queries() {
        assert_eq!(
            display_url("https://user:pw@r.example:8443/hooks/a?token=s3cret#frag"),
            "https://r.example:8443/hooks/a"
        );
        assert_eq!(display_url("http://r.example"), "http://r.example");
        assert_eq!(display_url("nonsense"), "");
    }

    #[test]
    fn prefixes_match_at_a_boundary() {
        let policy = CallbackPolicy {
            allowed_url_prefixes: vec![
                "https://ci.example.com/hooks/".into(),
                "https://b.example".into(),
            ],
            secret_ref: None,
        };
        for ok in [
            "https://ci.example.com/hooks/42",
            "https://b.example",
            "https://b.example/x",
            "https://b.example?x=1",
        ] {
            assert!(policy.allows(ok), "{ok}");
        }
        for bad in [
            "https://ci.example.com/other",
            "https://b.example.evil.net/",
            "https://b.examplex",
            "http://ci.example.com/hooks/42",
            "",
        ] {
            assert!(!policy.allows(bad), "{bad}");
        }
        assert!(!CallbackPolicy::default().allows("https://b.example/"));
        assert!(!url_has_prefix("https://x/", ""));
    }

    #[test]
    fn bodies_carry_the_documented_fields_and_cut_the_response() {
        let at = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let long = "x".repeat(MAX_CALLBACK_RESPONSE_BYTES + 10);
        let body = CallbackBody {
            event: events::SESSION_COMPLETED,
            session: "a-wh-1",
            namespace: "team",
            agent: "a",
            phase: "Complete",
            response: Some(&long),
            timestamp: &at,
        }
        .to_json();
        assert_eq!(body["type"], "session.completed");
        assert_eq!(body["agentDefinition"], "a");
        assert_eq!(body["phase"], "Complete");
        assert_eq!(
            body["response"].as_str().map(str::len),
            Some(MAX_CALLBACK_RESPONSE_BYTES)
        );
        assert_eq!(body["timestamp"], "1970-01-01T00:00:00Z");
    }
}
