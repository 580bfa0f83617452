//! The `Grant` resource: a capability URL that can do one thing (put a message into one
//! live Session) until its TTL passes or it is revoked, and the pure rules both binaries
//! apply to it (its expiry, whether it is usable, the body of `POST /hook`).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The longest `spec.label`.
pub const MAX_LABEL_CHARS: usize = 253;
/// The smallest `spec.ttlSeconds`.
pub const MIN_TTL_SECONDS: i64 = 1;

/// A capability to speak into one Session: whoever holds its URL may send that Session
/// input (`POST /hook/<token>`) until the Grant expires or is revoked, and nothing else.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "hookrun.dev",
    version = "v1alpha1",
    kind = "Grant",
    namespaced,
    status = "GrantStatus",
    shortname = "hrgrant",
    category = "hookrun",
    doc = "A capability URL that can put input into one Session until its TTL passes or it is revoked.",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.session"),
    printcolumn(name = "Verb", type_ = "string", json_path = ".spec.verbs[*]"),
    printcolumn(name = "Label", type_ = "string", json_path = ".spec.label"),
    printcolumn(name = "Expires", type_ = "date", json_path = ".status.expiresAt"),
    printcolumn(name = "Revoked", type_ = "boolean", json_path = ".spec.revoked"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        priority = "1"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GrantSpec {
    /// The Session (same namespace) this Grant speaks into.
    #[schemars(length(min = 1, max = 253))]
    pub session: String,

    /// What the holder may do; `send_input` is the one verb there is.
    #[schemars(length(min = 1, max = 1))]
    pub verbs: Vec<GrantVerb>,

    /// Seconds from the Grant's creation until it stops working and is deleted. Absent:
    /// the operator's default; more than the operator's maximum is cut to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ttl_seconds: Option<i64>,

    /// Free text saying who or what holds the URL (e.g. `ci: release pipeline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub label: Option<String>,

    /// `true` revokes the Grant at once; it is listed until its TTL passes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

/// What a Grant lets its holder do.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum GrantVerb {
    /// Put a message into the Session (`POST /hook/<token>`).
    #[serde(rename = "send_input")]
    SendInput,
}

/// What the operator observed and did for a Grant.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantStatus {
    /// `<public base>/hook/<token>`; the token is replaced by a placeholder when the
    /// operator redacts URLs in status (the full URL is then only in the Grant's Secret).
    /// Cleared once the Grant is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the token stops working and the Grant is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// `Ready` and its reason (`Active`, `Revoked`, `InvalidSpec`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How long a Grant lives: its `ttlSeconds`, or `default` when absent, never more than
/// `max`.
pub fn effective_ttl(ttl_seconds: Option<i64>, default: Duration, max: Duration) -> Duration {
    let asked = match ttl_seconds {
        Some(seconds) => {
            Duration::from_secs(u64::try_from(seconds.max(MIN_TTL_SECONDS)).unwrap_or(1))
        }
        None => default,
    };
    asked.min(max)
}

/// When a Grant created at `created` with `ttl` expires (whole seconds, as the API keeps
/// times).
pub fn expires_at(created: Timestamp, ttl: Duration) -> Timestamp {
    let ttl = SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX);
    let at = created.checked_add(ttl).unwrap_or(Timestamp::MAX);
    Timestamp::from_second(at.as_second()).unwrap_or(at)
}

/// Where a Grant is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantState {
    /// Its token works.
    Active,
    /// Revoked: listed, refused, deleted at expiry.
    Revoked,
    /// Past its expiry: refused and deleted.
    Expired,
}

/// The state of a Grant with `spec` that expires at `expires_at`, at `now`.
pub fn grant_state(spec: &GrantSpec, expires_at: Timestamp, now: Timestamp) -> GrantState {
    if now >= expires_at {
        GrantState::Expired
    } else if spec.revoked {
        GrantState::Revoked
    } else {
        GrantState::Active
    }
}

/// Checks a Grant's spec beyond its schema: a Session name and the one verb.
pub fn validate_grant_spec(spec: &GrantSpec) -> Result<(), String> {
    if spec.session.trim().is_empty() {
        return Err(
            "spec.session: name the Session (same namespace) this Grant speaks into".into(),
        );
    }
    if spec.verbs != [GrantVerb::SendInput] {
        return Err("spec.verbs: must be [send_input], the one verb a Grant has".into());
    }
    if spec.ttl_seconds.is_some_and(|t| t < MIN_TTL_SECONDS) {
        return Err("spec.ttlSeconds: must be at least 1".into());
    }
    if spec
        .label
        .as_ref()
        .is_some_and(|l| l.chars().count() > MAX_LABEL_CHARS)
    {
        return Err(format!("spec.label: at most {MAX_LABEL_CHARS} characters"));
    }
    Ok(())
}

/// The Session event content of one input: the message, prefixed `[from] ` when the
/// sender is named.
pub fn input_content(message: &str, from: Option<&str>) -> String {
    match from {
        Some(from) if !from.trim().is_empty() => format!("[{}] {message}", from.trim()),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GrantSpec {
        GrantSpec {
            session: "s".into(),
            verbs: vec![GrantVerb::SendInput],
            ttl_seconds: Some(60),
            label: None,
            revoked: false,
        }
    }

    #[test]
    fn ttl_takes_the_default_and_is_bounded_by_the_maximum() {
        let (default, max) = (Duration::from_secs(3600), Duration::from_secs(86_400));
        assert_eq!(effective_ttl(None, default, max), default);
        assert_eq!(
            effective_ttl(Some(60), default, max),
            Duration::from_secs(60)
        );
        assert_eq!(effective_ttl(Some(10_000_000), default, max), max);
        assert_eq!(
            effective_ttl(Some(-5), default, max),
            Duration::from_secs(1)
        );
        assert_eq!(
            effective_ttl(None, default, Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn expiry_is_whole_seconds_after_creation() {
        let created: Timestamp = "2026-01-01T00:00:00.700Z".parse().expect("a time");
        let at = expires_at(created, Duration::from_secs(60));
        assert_eq!(at.to_string(), "2026-01-01T00:01:00Z");
        assert_eq!(
            expires_at(created, Duration::MAX),
            Timestamp::from_second(Timestamp::MAX.as_second()).expect("a time")
        );
    }

    #[test]
    fn state_expired_wins_over_revoked() {
        let at: Timestamp = "2026-01-01T00:01:00Z".parse().expect("a time");
        let before: Timestamp = "2026-01-01T00:00:59Z".parse().expect("a time");
        let mut s = spec();
        assert_eq!(grant_state(&s, at, before), GrantState::Active);
        assert_eq!(grant_state(&s, at, at), GrantState::Expired);
        s.revoked = true;
        assert_eq!(grant_state(&s, at, before), GrantState::Revoked);
        assert_eq!(grant_state(&s, at, at), GrantState::Expired);
    }

    #[test]
    fn specs_are_checked_and_name_the_field() {
        assert_eq!(validate_grant_spec(&spec()), Ok(()));
        let mut s = spec();
        s.session = " ".into();
        assert!(
            validate_grant_spec(&s)
                .expect_err("refused")
                .starts_with("spec.session")
        );
        let mut s = spec();
        s.verbs = vec![];
        assert!(
            validate_grant_spec(&s)
                .expect_err("refused")
                .starts_with("spec.verbs")
        );
        let mut s = spec();
        s.ttl_seconds = Some(0);
        assert!(
            validate_grant_spec(&s)
                .expect_err("refused")
                .starts_with("spec.ttlSeconds")
        );
        let mut s = spec();
        s.label = Some("x".repeat(254));
        assert!(
            validate_grant_spec(&s)
                .expect_err("refused")
                .starts_with("spec.label")
        );
    }

    #[test]
    fn verbs_are_spelled_as_in_the_manifest() {
        let s: GrantSpec =
            serde_json::from_value(serde_json::json!({"session": "a", "verbs": ["send_input"]}))
                .expect("parses");
        assert_eq!(s.verbs, [GrantVerb::SendInput]);
        assert!(!s.revoked);
        assert!(
            serde_json::from_value::<GrantSpec>(
                serde_json::json!({"session": "a", "verbs": ["read"]})
            )
            .is_err()
        );
    }

    #[test]
    fn the_sender_prefixes_the_message() {
        assert_eq!(input_content("hi", Some("ci")), "[ci] hi");
        assert_eq!(input_content("hi", Some("  ")), "hi");
        assert_eq!(input_content("hi", None), "hi");
    }
}
