//! Webhook signature schemes behind one trait: each checks a request's signature and
//! replay window and names the delivery id that deduplicates provider redeliveries.
//!
//! Every comparison of a presented signature with the expected one is constant-time, and
//! no error message repeats the secret, the expected signature or the presented one.

use std::time::{SystemTime, UNIX_EPOCH};

use ::hmac::{Hmac, Mac};
use hookrun_crds::agent::SignatureScheme;
use http::HeaderMap;
use sha2::Sha256;

pub(crate) mod github;
pub(crate) mod hmac;
pub(crate) mod linear;
pub mod slack;
pub(crate) mod standard_webhooks;

pub(crate) use self::hmac::GenericHmac;
pub(crate) use github::Github;
pub(crate) use linear::Linear;
pub(crate) use slack::Slack;
pub(crate) use standard_webhooks::StandardWebhooks;

/// The longest delivery id kept (the Session's `trigger.deliveryId` holds 256).
pub(crate) const MAX_DELIVERY_ID_LEN: usize = 256;

/// What a verifier reads from a request.
#[derive(Clone, Copy, Debug)]
pub struct SignedRequest<'a> {
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// The body, exactly as received, and its JSON value once someone parsed it.
    pub body: &'a crate::body::RequestBody<'a>,
    /// The server's clock, for replay windows.
    pub now: SystemTime,
}

/// A request whose signature checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// What identifies this delivery across the provider's retries, when the scheme has
    /// one; equal keys mean the same event.
    pub dedup_key: Option<String>,
    /// The scheme, as written to the Session's `trigger.source`.
    pub source: &'static str,
}

/// One signature scheme.
pub trait Verifier: Send + Sync {
    /// The scheme's name, as written to the Session's `trigger.source`.
    fn source(&self) -> &'static str;

    /// Checks the signature (and the timestamp, where the scheme signs one) of `request`
    /// with the Agent's `secret`.
    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError>;
}

/// The verifier of a scheme the Agent's webhook trigger requires.
pub fn verifier(scheme: SignatureScheme) -> &'static dyn Verifier {
    match scheme {
        SignatureScheme::Linear => &Linear,
        SignatureScheme::Github => &Github,
        SignatureScheme::Slack => &Slack,
        SignatureScheme::StandardWebhooks => &StandardWebhooks,
        SignatureScheme::Hmac => &GenericHmac,
    }
}

/// The header a scheme's signature rides in: its presence picks the scheme.
pub(crate) fn signature_header(scheme: SignatureScheme) -> &'static str {
    match scheme {
        SignatureScheme::Linear => "linear-signature",
        SignatureScheme::Github => "x-hub-signature-256",
        SignatureScheme::Slack => "x-slack-signature",
        SignatureScheme::StandardWebhooks => "webhook-signature",
        SignatureScheme::Hmac => "x-signature",
    }
}

/// Whether the scheme's signature covers a timestamp, so a captured request stops
/// verifying once its replay window passes. GitHub and the generic HMAC sign the body
/// alone, and their delivery id (if any) rides in an unsigned header: a request of theirs
/// is deduplicated by the digest of its signed body instead.
pub(crate) fn signs_timestamp(scheme: SignatureScheme) -> bool {
    match scheme {
        SignatureScheme::Linear | SignatureScheme::Slack | SignatureScheme::StandardWebhooks => {
            true
        }
        SignatureScheme::Github | SignatureScheme::Hmac => false,
    }
}

/// Whether the scheme's delivery id is covered by its signature (Standard Webhooks signs
/// `webhook-id`; Slack's id is the digest of the signed body), so no one without the
/// signing secret can choose it. Linear's and GitHub's delivery headers are not signed.
pub(crate) fn signs_delivery_id(scheme: SignatureScheme) -> bool {
    matches!(
        scheme,
        SignatureScheme::Slack | SignatureScheme::StandardWebhooks
    )
}

/// Why a request's signature was refused. Messages name the header or field and say what
/// would be accepted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SignatureError {
    /// A header the scheme needs is absent.
    #[error("the {header} header is missing: {scheme} webhooks must send {expected}")]
    MissingHeader {
        scheme: &'static str,
        header: &'static str,
        expected: &'static str,
    },
    /// A header is there but cannot be read.
    #[error("the {header} header is malformed: {scheme} webhooks must send {expected}")]
    MalformedHeader {
        scheme: &'static str,
        header: &'static str,
        expected: &'static str,
    },
    /// The signature is well-formed but does not match the body.
    #[error(
        "the {header} header does not match the request: {scheme} webhooks must sign {signed} \
         with HMAC-SHA256 and the Agent's {secret_field}"
    )]
    Mismatch {
        scheme: &'static str,
        header: &'static str,
        signed: &'static str,
        secret_field: &'static str,
    },
    /// The signed timestamp is missing or unreadable.
    #[error("{field} is missing or malformed: {scheme} webhooks must send {expected}")]
    BadTimestamp {
        scheme: &'static str,
        field: &'static str,
        expected: &'static str,
    },
    /// The signed timestamp is outside the replay window.
    #[error(
        "{field} is {skew_seconds} s away from the server's clock: {scheme} webhooks are \
         accepted within {window_seconds} s; resend the event, or check the sender's clock"
    )]
    Stale {
        scheme: &'static str,
        field: &'static str,
        skew_seconds: u64,
        window_seconds: u64,
    },
    /// The Agent's secret cannot be used by the scheme: a configuration error, not the
    /// caller's.
    #[error("the Agent's {secret_field} is unusable: {reason}")]
    UnusableSecret {
        secret_field: &'static str,
        reason: &'static str,
    },
}

impl SignatureError {
    /// A short code for error bodies and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::MissingHeader { .. } | SignatureError::MalformedHeader { .. } => {
                "missing_signature"
            }
            SignatureError::Mismatch { .. } => "bad_signature",
            SignatureError::BadTimestamp { .. } => "bad_timestamp",
            SignatureError::Stale { .. } => "stale_timestamp",
            SignatureError::UnusableSecret { .. } => "unusable_secret",
        }
    }

    /// Whether the caller can fix it (401); otherwise the Agent's configuration is wrong.
    pub(crate) fn is_caller_error(&self) -> bool {
        !matches!(self, SignatureError::UnusableSecret { .. })
    }
}

/// The value of a header as text: `None` when absent, an error when it is not visible
/// ASCII or appears more than once (two signatures would make "which one" ambiguous).
fn header<'a>(
    scheme: &'static str,
    headers: &'a HeaderMap,
    name: &'static str,
    expected: &'static str,
) -> Result<Option<&'a str>, SignatureError> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let malformed = SignatureError::MalformedHeader {
        scheme,
        header: name,
        expected,
    };
    if values.next().is_some() {
        return Err(malformed);
    }
    value
        .to_str()
        .map(|v| Some(v.trim()))
        .map_err(|_| malformed)
}

/// Like [`header`], but absence is an error too.
fn required_header<'a>(
    scheme: &'static str,
    headers: &'a HeaderMap,
    name: &'static str,
    expected: &'static str,
) -> Result<&'a str, SignatureError> {
    header(scheme, headers, name, expected)?.ok_or(SignatureError::MissingHeader {
        scheme,
        header: name,
        expected,
    })
}

/// A provider's delivery id: absent is fine (no dedup), but when present it must be
/// visible ASCII and fit on the Session.
fn delivery_id(
    scheme: &'static str,
    headers: &HeaderMap,
    name: &'static str,
) -> Result<Option<String>, SignatureError> {
    const EXPECTED: &str = "a delivery id of 1 to 256 visible ASCII characters";
    let Some(value) = header(scheme, headers, name, EXPECTED)? else {
        return Ok(None);
    };
    if value.is_empty() || value.len() > MAX_DELIVERY_ID_LEN {
        return Err(SignatureError::MalformedHeader {
            scheme,
            header: name,
            expected: EXPECTED,
        });
    }
    Ok(Some(value.to_owned()))
}

/// A signature header that carries `<prefix><hex HMAC-SHA256>` (GitHub, Slack, the
/// generic scheme), with the words its errors use.
struct PrefixedHexHeader {
    scheme: &'static str,
    header: &'static str,
    prefix: &'static str,
    expected: &'static str,
    signed: &'static str,
    secret_field: &'static str,
}

impl PrefixedHexHeader {
    /// Reads the header and checks its HMAC over `parts` in constant time.
    fn verify(
        &self,
        headers: &HeaderMap,
        secret: &[u8],
        parts: &[&[u8]],
    ) -> Result<(), SignatureError> {
        let malformed = SignatureError::MalformedHeader {
            scheme: self.scheme,
            header: self.header,
            expected: self.expected,
        };
        let presented = required_header(self.scheme, headers, self.header, self.expected)?;
        let hex = presented
            .strip_prefix(self.prefix)
            .ok_or(malformed.clone())?;
        if verify_hex(secret, parts, hex).map_err(|()| malformed)? {
            Ok(())
        } else {
            Err(SignatureError::Mismatch {
                scheme: self.scheme,
                header: self.header,
                signed: self.signed,
                secret_field: self.secret_field,
            })
        }
    }
}

/// An HMAC-SHA256 over the concatenation of `parts`.
fn hmac_sha256(secret: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of every length"));
    for part in parts {
        mac.update(part);
    }
    mac
}

/// Checks a lowercase or uppercase hex HMAC-SHA256 against `parts`, in constant time.
/// `Ok(false)` is a mismatch; `Err(())` is a value that is not 64 hex digits.
fn verify_hex(secret: &[u8], parts: &[&[u8]], presented_hex: &str) -> Result<bool, ()> {
    let mut presented = [0u8; 32];
    hex::decode_to_slice(presented_hex, &mut presented).map_err(|_| ())?;
    Ok(hmac_sha256(secret, parts).verify_slice(&presented).is_ok())
}

/// Checks that `timestamp_ms` is within `window_seconds` of `now`, both ways (a clock
/// ahead of ours is as suspicious as one behind). The edge itself is accepted.
fn check_window(
    scheme: &'static str,
    field: &'static str,
    timestamp_ms: i128,
    now: SystemTime,
    window_seconds: u64,
) -> Result<(), SignatureError> {
    let now_ms = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        Err(before) => -(before.duration().as_millis() as i128),
    };
    let skew_ms = (now_ms - timestamp_ms).unsigned_abs();
    if skew_ms > u128::from(window_seconds) * 1000 {
        return Err(SignatureError::Stale {
            scheme,
            field,
            // Rounded up, so a refusal never reads as "60 s away" for a 60 s window.
            skew_seconds: u64::try_from(skew_ms.div_ceil(1000)).unwrap_or(u64::MAX),
            window_seconds,
        });
    }
    Ok(())
}

/// A timestamp header in whole seconds since the epoch.
fn seconds_header(
    scheme: &'static str,
    headers: &HeaderMap,
    name: &'static str,
    expected: &'static str,
) -> Result<(i64, String), SignatureError> {
    let missing = SignatureError::BadTimestamp {
        scheme,
        field: name,
        expected,
    };
    let value = header(scheme, headers, name, expected)
        .map_err(|_| missing.clone())?
        .ok_or_else(|| missing.clone())?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(missing);
    }
    let seconds = value.parse::<i64>().map_err(|_| missing)?;
    Ok((seconds, value.to_owned()))
}

#[cfg(test)]
pub(crate) mod test_support {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use http::{HeaderMap, HeaderName, HeaderValue};

    /// Headers from `(name, value)` pairs.
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name is valid"),
                HeaderValue::from_str(value).expect("test header value is valid"),
            );
        }
        map
    }

    /// A clock reading `seconds` after the epoch.
    pub(crate) fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn every_scheme_has_a_verifier_with_its_source() {
        let sources: Vec<_> = SignatureScheme::ALL
            .iter()
            .map(|s| verifier(*s).source())
            .collect();
        assert_eq!(
            sources,
            ["linear", "github", "slack", "standard-webhooks", "hmac"]
        );
    }

    #[test]
    fn header_lookup_ignores_case_and_refuses_duplicates() {
        let h = headers(&[("Linear-Signature", "abc")]);
        assert_eq!(
            header("linear", &h, "linear-signature", "x"),
            Ok(Some("abc"))
        );
        let h = headers(&[("x-signature", "a"), ("X-Signature", "b")]);
        assert!(matches!(
            header("hmac", &h, "x-signature", "x"),
            Err(SignatureError::MalformedHeader { .. })
        ));
    }

    #[test]
    fn window_edges_are_inclusive_both_ways() {
        let now = at_ms(1_700_000_000_000);
        let check = |ts| check_window("t", "ts", ts, now, 60);
        assert_eq!(check(1_700_000_000_000), Ok(()));
        assert_eq!(check(1_700_000_000_000 - 60_000), Ok(()));
        assert_eq!(check(1_700_000_000_000 + 60_000), Ok(()));
        let err = check(1_700_000_000_000 - 60_001).expect_err("one ms too old");
        assert!(matches!(
            err,
            SignatureError::Stale {
                skew_seconds: 61,
                window_seconds: 60,
                ..
            }
        ));
        assert!(check(1_700_000_000_000 + 60_001).is_err());
        assert!(check(0).is_err());
        assert!(check(i128::from(i64::MAX)).is_err());
    }

    #[test]
    fn delivery_ids_are_bounded() {
        let long = "a".repeat(MAX_DELIVERY_ID_LEN + 1);
        let h = headers(&[("x-github-delivery", &long)]);
        assert!(delivery_id("github", &h, "x-github-delivery").is_err());
        let h = headers(&[]);
        assert_eq!(delivery_id("github", &h, "x-github-delivery"), Ok(None));
    }

    #[test]
    fn verify_hex_refuses_non_digests() {
        assert_eq!(verify_hex(b"k", &[b"m"], "zz"), Err(()));
        assert_eq!(verify_hex(b"k", &[b"m"], "abcd"), Err(()));
        assert_eq!(verify_hex(b"k", &[b"m"], &"00".repeat(31)), Err(()));
        assert_eq!(verify_hex(b"k", &[b"m"], &"00".repeat(33)), Err(()));
        assert_eq!(verify_hex(b"k", &[b"m"], &"00".repeat(32)), Ok(false));
    }
}
