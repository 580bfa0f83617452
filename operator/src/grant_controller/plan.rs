//! What a Grant's token Secret and status should be, built as pure functions of the
//! Grant, the Secret that exists now and the clock.
//!
//! The token rules: a Grant gets one token, minted once into a Secret it controls, with
//! the Session and the expiry fixed at that moment (an edit of `spec.session` or
//! `spec.ttlSeconds` later changes neither: the apiserver refuses a token whose Session
//! no longer matches). A revoked Grant loses its Secret; an expired one is deleted.

use std::collections::BTreeMap;

use hookrun_crds::{
    GrantStatus,
    grant::GrantState,
    names::{self, grant_secret_keys, secret_keys},
    token::WebhookToken,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};

/// The `Ready` condition's type.
pub const READY: &str = "Ready";

/// What the token Secret is built from, taken from the Grant.
#[derive(Clone, Debug)]
pub struct GrantFacts<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub session: &'a str,
    /// The controller owner reference to the Grant.
    pub owner: OwnerReference,
    pub expires_at: Timestamp,
}

/// The token Secret of a Grant, holding `token`.
pub fn token_secret(facts: &GrantFacts<'_>, token: &WebhookToken, public_url: &str) -> Secret {
    let labels = BTreeMap::from([
        (
            names::MANAGED_BY_LABEL.to_owned(),
            names::MANAGED_BY.to_owned(),
        ),
        (
            names::GRANT_LABEL.to_owned(),
            names::label_value(facts.name),
        ),
    ]);
    let text = |s: &str| ByteString(s.as_bytes().to_vec());
    let data = BTreeMap::from([
        (secret_keys::TOKEN.to_owned(), text(token.expose())),
        (
            secret_keys::URL.to_owned(),
            text(&names::hook_url(public_url, token.expose())),
        ),
        (grant_secret_keys::SESSION.to_owned(), text(facts.session)),
        (
            grant_secret_keys::EXPIRES_AT.to_owned(),
            text(&facts.expires_at.to_string()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(names::grant_secret_name(facts.name)),
            namespace: Some(facts.namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                names::GRANT_LABEL.to_owned(),
                facts.name.to_owned(),
            )])),
            owner_references: Some(vec![facts.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The token and expiry an existing Secret of this Grant holds; `None` when the Secret is
/// not the Grant's (no managed label, another controller) or unreadable.
pub fn existing_token(secret: &Secret, grant_uid: &str) -> Option<(WebhookToken, Timestamp)> {
    let managed = secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(names::MANAGED_BY_LABEL))
        .is_some_and(|v| v == names::MANAGED_BY);
    let controlled = secret
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && !grant_uid.is_empty() && o.uid == grant_uid);
    if !managed || !controlled {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |key: &str| std::str::from_utf8(&data.get(key)?.0).ok();
    let token = WebhookToken::parse(text(secret_keys::TOKEN)?)?;
    let expires_at = text(grant_secret_keys::EXPIRES_AT)?.parse().ok()?;
    Some((token, expires_at))
}

/// Why a Grant is or is not usable, for its `Ready` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The token works; the URL is in status (redacted or not) and in the Secret.
    Active { url: String },
    /// Revoked: the token is gone; listed until expiry.
    Revoked,
    /// The spec cannot be acted on; no token was minted.
    InvalidSpec { message: String },
    /// The name of the token Secret is taken by an object hookrun does not control.
    SecretNameTaken { secret_name: String },
}

impl Outcome {
    /// The outcome of a Grant in `state` whose token is published as `url`.
    pub fn of(state: GrantState, url: String) -> Self {
        match state {
            GrantState::Active => Outcome::Active { url },
            GrantState::Revoked | GrantState::Expired => Outcome::Revoked,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Outcome::Active { .. } => "Active",
            Outcome::Revoked => "Revoked",
            Outcome::InvalidSpec { .. } => "InvalidSpec",
            Outcome::SecretNameTaken { .. } => "SecretNameTaken",
        }
    }

    fn message(&self) -> String {
        match self {
            Outcome::Active { .. } => {
                "the URL in status.url (and in the Grant's Secret, key url) puts input into the \
                 Session until status.expiresAt"
                    .to_owned()
            }
            Outcome::Revoked => {
                "revoked: the token is refused; the Grant is deleted at status.expiresAt".to_owned()
            }
            Outcome::InvalidSpec { message } => message.clone(),
            Outcome::SecretNameTaken { secret_name } => format!(
                "a Secret named {secret_name:?} exists and is not this Grant's; delete or \
                 rename it, then the operator mints the token"
            ),
        }
    }
}

/// The status as it should be: URL while active, the expiry once known, and `Ready`
/// whose `lastTransitionTime` moves only when its status flips.
pub fn desired_status(
    existing: Option<&GrantStatus>,
    outcome: &Outcome,
    expires_at: Option<Timestamp>,
    generation: Option<i64>,
    now: Timestamp,
) -> GrantStatus {
    let status = if matches!(outcome, Outcome::Active { .. }) {
        "True"
    } else {
        "False"
    };
    let previous = existing.and_then(|s| s.conditions.iter().find(|c| c.type_ == READY));
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Time(Timestamp::from_second(now.as_second()).unwrap_or(now)),
    };
    GrantStatus {
        url: match outcome {
            Outcome::Active { url } => Some(url.clone()),
            _ => None,
        },
        expires_at: expires_at.map(Time),
        conditions: vec![Condition {
            type_: READY.to_owned(),
            status: status.to_owned(),
            reason: outcome.reason().to_owned(),
            message: outcome.message(),
            observed_generation: generation,
            last_transition_time,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "hookrun.dev/v1alpha1".into(),
            kind: "Grant".into(),
            name: "ci".into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn facts(uid: &str) -> GrantFacts<'static> {
        GrantFacts {
            name: "ci",
            namespace: "ns",
            session: "s-1",
            owner: owner(uid),
            expires_at: "2026-01-01T01:00:00Z".parse().expect("a time"),
        }
    }

    #[test]
    fn the_secret_carries_token_url_session_and_expiry_and_reads_back() {
        let token = WebhookToken::generate().expect("randomness");
        let secret = token_secret(&facts("u1"), &token, "https://h.example.com/");
        assert_eq!(secret.metadata.name.as_deref(), Some("ci-grant"));
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(names::GRANT_LABEL).map(String::as_str),
            Some("ci")
        );
        assert_eq!(
            labels.get(names::MANAGED_BY_LABEL).map(String::as_str),
            Some("hookrun")
        );
        let data = secret.data.clone().unwrap_or_default();
        assert_eq!(
            data.get("url").map(|v| v.0.clone()),
            Some(format!("https://h.example.com/hook/{}", token.expose()).into_bytes())
        );
        assert_eq!(
            data.get("session").map(|v| v.0.clone()),
            Some(b"s-1".to_vec())
        );
        let (read, expires) = existing_token(&secret, "u1").expect("the Grant's own Secret");
        assert_eq!(read, token);
        assert_eq!(expires, facts("u1").expires_at);
        // Another Grant's Secret, or one without the managed label, is nobody's token.
        assert!(existing_token(&secret, "u2").is_none());
        assert!(existing_token(&secret, "").is_none());
        let mut unmanaged = secret.clone();
        unmanaged.metadata.labels = None;
        assert!(existing_token(&unmanaged, "u1").is_none());
    }

    #[test]
    fn status_shows_the_url_only_while_active_and_keeps_transition_times() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().expect("a time");
        let later: Timestamp = "2026-01-01T00:10:00Z".parse().expect("a time");
        let expires = Some(facts("u").expires_at);
        let active = Outcome::Active {
            url: "https://h/hook/REDACTED".into(),
        };
        let first = desired_status(None, &active, expires, Some(1), now);
        assert_eq!(first.url.as_deref(), Some("https://h/hook/REDACTED"));
        assert_eq!(first.conditions[0].status, "True");
        let again = desired_status(Some(&first), &active, expires, Some(1), later);
        assert_eq!(
            again, first,
            "a reconcile that changes nothing writes nothing"
        );
        let revoked = desired_status(Some(&first), &Outcome::Revoked, expires, Some(2), later);
        assert_eq!(revoked.url, None);
        assert_eq!(revoked.conditions[0].reason, "Revoked");
        assert_ne!(
            revoked.conditions[0].last_transition_time,
            first.conditions[0].last_transition_time
        );
        assert_eq!(revoked.expires_at, expires.map(Time));
    }
}
