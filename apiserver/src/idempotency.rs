//! Session names that make duplicates collide: a name derived from the idempotency key (the
//! provider's delivery id, or the digest of a signed body that carries no timestamp), so a
//! repeated create hits AlreadyExists; a random name without a key; and the
//! replay-or-conflict decision on a collision.

use rand::Rng;
use sha2::{Digest, Sha256};

use crate::body::{BodyError, check_idempotency_key};

/// Hex digits of the key hash in a keyed Session name: 64 bits, so two different keys of
/// one Agent practically never share a name (a shared name would answer one caller with
/// the other's Session, or refuse it with 422).
pub(crate) const KEYED_SUFFIX_HEX: usize = 16;

/// The longest key stored on a Session (`trigger.idempotencyKey` holds 256 characters);
/// a longer one is stored, and named by, its digest.
pub(crate) const MAX_STORED_KEY_LEN: usize = 256;

/// Where an idempotency key came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// The `Idempotency-Key` header.
    Header,
    /// The body's `idempotency_key`.
    Body,
    /// A provider's delivery id (the named scheme's dedup key).
    Delivery(&'static str),
    /// The digest of a body signed by a scheme that signs no timestamp (GitHub, the
    /// generic HMAC): replaying the same signed body names the same Session, whatever
    /// unsigned delivery id or key rides beside it.
    SignedBody(&'static str),
}

/// The key that names a Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdempotencyKey {
    /// The key. A delivery id is prefixed with its scheme (`github:<id>`) so it cannot
    /// collide with a caller's own key.
    pub(crate) value: String,
    /// Where it came from.
    pub(crate) source: KeySource,
}

/// Why a request's idempotency cannot be honoured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdempotencyError {
    /// A key is malformed (400).
    #[error(transparent)]
    Invalid(#[from] BodyError),
    /// The header and the body name different keys (400).
    #[error(
        "the Idempotency-Key header and the body's idempotency_key differ: send the key once, \
         or the same key in both"
    )]
    Disagree,
    /// The key was used before with a different body (422).
    #[error(
        "this idempotency key was already used with a different body: reuse a key only to \
         retry the identical request, or send a new key"
    )]
    Conflict,
}

impl IdempotencyError {
    /// A short code for error bodies and metric labels.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            IdempotencyError::Invalid(_) | IdempotencyError::Disagree => "bad_idempotency_key",
            IdempotencyError::Conflict => "idempotency_conflict",
        }
    }
}

/// A key that the request's signature covers, so only the holder of the signing secret
/// chooses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SignedKey<'a> {
    /// The digest of a body signed without a timestamp (GitHub, the generic HMAC).
    Body {
        source: &'static str,
        digest: &'a str,
    },
    /// A delivery id inside the signature (Standard Webhooks, Slack).
    Delivery { source: &'static str, id: &'a str },
}

/// The key of a request: a key the signature covers first (nothing unsigned may open a
/// second Session for a captured request); else the `Idempotency-Key` header, else the
/// body's `idempotency_key` (when both are sent they must agree), else the provider's
/// unsigned delivery id as `(source, id)`; `None` when there is none. The caller's keys
/// are checked even when a signed key wins.
pub(crate) fn choose_key(
    header: Option<&str>,
    body: Option<&str>,
    delivery: Option<(&'static str, &str)>,
    signed: Option<SignedKey<'_>>,
) -> Result<Option<IdempotencyKey>, IdempotencyError> {
    let header = header
        .map(|h| check_idempotency_key("Idempotency-Key", h))
        .transpose()?;
    if let (Some(h), Some(b)) = (&header, body)
        && h != b
    {
        return Err(IdempotencyError::Disagree);
    }
    match signed {
        Some(SignedKey::Body { source, digest }) => {
            return Ok(Some(IdempotencyKey {
                value: bounded_key(format!("{source}:body:{digest}")),
                source: KeySource::SignedBody(source),
            }));
        }
        Some(SignedKey::Delivery { source, id }) => {
            return Ok(Some(IdempotencyKey {
                value: bounded_key(format!("{source}:{id}")),
                source: KeySource::Delivery(source),
            }));
        }
        None => {}
    }
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(IdempotencyError::Disagree),
        (Some(value), _) => Ok(Some(IdempotencyKey {
            value,
            source: KeySource::Header,
        })),
        (None, Some(b)) => Ok(Some(IdempotencyKey {
            value: b.to_owned(),
            source: KeySource::Body,
        })),
        (None, None) => Ok(delivery.map(|(source, id)| IdempotencyKey {
            value: bounded_key(format!("{source}:{id}")),
            source: KeySource::Delivery(source),
        })),
    }
}

/// `key` itself when it fits on a Session, else `sha256:<hex>` of it: a 256-character
/// delivery id with its scheme prefix must not make the cluster refuse the Session.
pub(crate) fn bounded_key(key: String) -> String {
    if key.len() <= MAX_STORED_KEY_LEN {
        key
    } else {
        format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// The Session name for a key: `<agent>-wh-<16 hex>`, the hex from
/// `sha256("<namespace>/<agent>/<key>")`. Deterministic, so every replica names a
/// duplicate the same; namespaces and Agent names hold no `/`, so the input is unambiguous.
pub(crate) fn keyed_session_name(namespace: &str, agent: &str, key: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{agent}/{key}").as_bytes());
    let suffix = hex::encode(digest);
    hookrun_crds::names::session_name(agent, &suffix[..KEYED_SUFFIX_HEX])
}

/// A fresh Session name without a key: `<agent>-wh-<8 random hex>`. On the rare
/// AlreadyExists the caller draws again.
pub(crate) fn random_session_name(agent: &str) -> String {
    random_session_name_with(agent, &mut rand::rng())
}

/// [`random_session_name`] with a given random source.
pub(crate) fn random_session_name_with(agent: &str, rng: &mut impl Rng) -> String {
    let suffix: u32 = rng.random();
    hookrun_crds::names::session_name(agent, &format!("{suffix:08x}"))
}

/// The keyed Session that already exists was made by this same request: answer with it
/// (200, the original body, `Idempotent-Replayed: true`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Replay;

/// Decides between a replay and a conflict from where the key came from, the payload
/// digest stored on the existing Session and the digest of the request at hand.
///
/// A provider's delivery id names one event whatever the body: a redelivery may carry a
/// fresh signed timestamp inside the body (Linear's `webhookTimestamp`), so it replays.
/// For a caller's own key, a Session without a digest was not made by an identical
/// request, so it conflicts, as does a different body.
pub(crate) fn replay_or_conflict(
    source: KeySource,
    stored_digest: Option<&str>,
    presented_digest: &str,
) -> Result<Replay, IdempotencyError> {
    match (source, stored_digest) {
        (KeySource::Delivery(_), _) => Ok(Replay),
        (_, Some(stored)) if stored == presented_digest => Ok(Replay),
        _ => Err(IdempotencyError::Conflict),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;
    use crate::body::payload_digest;

    #[test]
    fn keyed_names_are_deterministic_and_independent_of_the_process() {
        let a = keyed_session_name("team-a", "my-agent", "order-42");
        assert_eq!(a, keyed_session_name("team-a", "my-agent", "order-42"));
        // printf '%s' 'team-a/my-agent/order-42' | sha256sum | cut -c1-16
        assert_eq!(a, "my-agent-wh-f6e2484e2f685fc6");
    }

    #[test]
    fn keyed_names_differ_by_namespace_agent_and_key() {
        let base = keyed_session_name("ns", "agent", "k");
        assert_ne!(base, keyed_session_name("ns2", "agent", "k"));
        assert_ne!(base, keyed_session_name("ns", "agent", "k2"));
        assert_ne!(
            keyed_session_name("ns", "agent", "k"),
            keyed_session_name("ns", "agent2", "k")
        );
    }

    #[test]
    fn keyed_names_fit_a_label_for_long_agents() {
        let long = "a".repeat(253);
        let name = keyed_session_name("ns", &long, "k");
        assert!(name.len() <= hookrun_crds::names::MAX_LABEL_LEN, "{name}");
        assert!(name.contains("-wh-"));
    }

    #[test]
    fn random_names() {
        let mut rng = StdRng::seed_from_u64(7);
        let a = random_session_name_with("my-agent", &mut rng);
        let b = random_session_name_with("my-agent", &mut rng);
        assert_ne!(a, b);
        for name in [&a, &b] {
            let suffix = name.strip_prefix("my-agent-wh-").expect("prefix");
            assert_eq!(suffix.len(), 8);
            assert!(
                suffix
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
            );
        }
        assert!(random_session_name("x").starts_with("x-wh-"));
    }

    #[test]
    fn key_precedence() {
        let key = |h, b, d| choose_key(h, b, d, None).expect("accepted");
        assert_eq!(
            key(Some("h"), None, Some(("github", "d"))),
            Some(IdempotencyKey {
                value: "h".into(),
                source: KeySource::Header
            })
        );
        assert_eq!(
            key(Some("same"), Some("same"), None).map(|k| k.source),
            Some(KeySource::Header)
        );
        assert_eq!(
            key(None, Some("b"), Some(("github", "d"))).map(|k| k.source),
            Some(KeySource::Body)
        );
        assert_eq!(
            key(None, None, Some(("github", "72d3162e"))),
            Some(IdempotencyKey {
                value: "github:72d3162e".into(),
                source: KeySource::Delivery("github")
            })
        );
        assert_eq!(key(None, None, None), None);
    }

    #[test]
    fn key_errors() {
        assert_eq!(
            choose_key(Some("a"), Some("b"), None, None),
            Err(IdempotencyError::Disagree)
        );
        let err = choose_key(Some(""), None, None, None).expect_err("empty header");
        assert_eq!(err.code(), "bad_idempotency_key");
        assert!(err.to_string().contains("Idempotency-Key"), "{err}");
        let long = "k".repeat(257);
        assert!(choose_key(Some(&long), None, None, None).is_err());
        // Checked even when a signed body names the Session.
        let signed = Some(SignedKey::Body {
            source: "github",
            digest: "sha256:00",
        });
        assert!(choose_key(Some(""), None, None, signed).is_err());
        assert_eq!(
            choose_key(Some("a"), Some("b"), None, signed),
            Err(IdempotencyError::Disagree)
        );
    }

    #[test]
    fn a_signed_body_wins_over_every_unsigned_key() {
        let digest = payload_digest(b"{}");
        let body = SignedKey::Body {
            source: "github",
            digest: &digest,
        };
        let got = choose_key(
            Some("fresh-key"),
            None,
            Some(("github", "fresh-delivery")),
            Some(body),
        )
        .expect("accepted")
        .expect("a key");
        assert_eq!(got.source, KeySource::SignedBody("github"));
        assert_eq!(got.value, format!("github:body:{digest}"));
        let other_ids =
            choose_key(None, None, Some(("github", "x")), Some(body)).expect("accepted");
        assert_eq!(other_ids, Some(got));
        // A signed delivery id beats the caller's key too.
        let signed_id = SignedKey::Delivery {
            source: "standard-webhooks",
            id: "msg_1",
        };
        let got = choose_key(Some("fresh-key"), Some("fresh-key"), None, Some(signed_id))
            .expect("accepted")
            .expect("a key");
        assert_eq!(got.source, KeySource::Delivery("standard-webhooks"));
        assert_eq!(got.value, "standard-webhooks:msg_1");
    }

    #[test]
    fn long_keys_are_stored_as_their_digest() {
        let id = "d".repeat(250);
        let got = choose_key(None, None, Some(("linear", &id)), None)
            .expect("accepted")
            .expect("a key");
        assert!(got.value.len() <= MAX_STORED_KEY_LEN, "{}", got.value.len());
        assert!(got.value.starts_with("sha256:"), "{}", got.value);
        let again = choose_key(None, None, Some(("linear", &id)), None).expect("accepted");
        assert_eq!(again.map(|k| k.value), Some(got.value.clone()));
        let other =
            choose_key(None, None, Some(("linear", &"e".repeat(250))), None).expect("accepted");
        assert_ne!(other.map(|k| k.value), Some(got.value));
        let short = format!("linear:{}", "d".repeat(249));
        assert_eq!(bounded_key(short.clone()), short);
    }

    #[test]
    fn replay_or_conflict_compares_digests() {
        let body = payload_digest(b"{\"title\":\"x\"}");
        let other = payload_digest(b"{\"title\":\"y\"}");
        for source in [
            KeySource::Header,
            KeySource::Body,
            KeySource::SignedBody("hmac"),
        ] {
            assert_eq!(replay_or_conflict(source, Some(&body), &body), Ok(Replay));
            let err = replay_or_conflict(source, Some(&body), &other).expect_err("conflict");
            assert_eq!(err.code(), "idempotency_conflict");
            assert!(err.to_string().contains("different body"), "{err}");
            assert_eq!(
                replay_or_conflict(source, None, &body),
                Err(IdempotencyError::Conflict)
            );
        }
        // A provider's redelivery of one event may differ in its signed timestamp.
        let delivery = KeySource::Delivery("linear");
        assert_eq!(
            replay_or_conflict(delivery, Some(&body), &other),
            Ok(Replay)
        );
        assert_eq!(replay_or_conflict(delivery, None, &other), Ok(Replay));
    }
}
