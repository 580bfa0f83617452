//! Standard Webhooks (standardwebhooks.com, used by Svix and others): `webhook-id`,
//! `webhook-timestamp` (seconds) and `webhook-signature`, a space-separated list of
//! `v1,<base64>` HMAC-SHA256 signatures of `<id>.<timestamp>.<body>` made with the
//! base64 key after `whsec_`. Within 300 s; deduplicated on `webhook-id`.

use ::hmac::Mac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use subtle::{Choice, ConstantTimeEq};

use super::{
    MAX_DELIVERY_ID_LEN, SignatureError, SignedRequest, Verified, Verifier, check_window,
    hmac_sha256, required_header, seconds_header,
};

const SCHEME: &str = "Standard Webhooks";
const ID: &str = "webhook-id";
const TIMESTAMP: &str = "webhook-timestamp";
const SIGNATURE: &str = "webhook-signature";
const SECRET_FIELD: &str = "standardWebhooksSecret";
const EXPECTED_ID: &str = "a message id of 1 to 256 visible ASCII characters";
const EXPECTED_TIMESTAMP: &str = "the send time in whole seconds since the epoch";
const EXPECTED_SIGNATURE: &str = "space-separated v1,<base64 HMAC-SHA256 of \
     <webhook-id>.<webhook-timestamp>.<raw body>> signatures";
/// Keys start with this; the rest is base64.
const KEY_PREFIX: &str = "whsec_";

/// How far `webhook-timestamp` may be from the server's clock.
pub(crate) const WINDOW_SECONDS: u64 = 300;

/// Standard Webhooks signatures (symmetric `v1` only).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct StandardWebhooks;

impl Verifier for StandardWebhooks {
    fn source(&self) -> &'static str {
        "standard-webhooks"
    }

    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError> {
        let key = decode_key(secret)?;
        let id = required_header(SCHEME, request.headers, ID, EXPECTED_ID)?;
        if id.is_empty() || id.len() > MAX_DELIVERY_ID_LEN {
            return Err(SignatureError::MalformedHeader {
                scheme: SCHEME,
                header: ID,
                expected: EXPECTED_ID,
            });
        }
        let (seconds, timestamp) =
            seconds_header(SCHEME, request.headers, TIMESTAMP, EXPECTED_TIMESTAMP)?;
        let presented = required_header(SCHEME, request.headers, SIGNATURE, EXPECTED_SIGNATURE)?;
        let candidates = v1_signatures(presented).ok_or(SignatureError::MalformedHeader {
            scheme: SCHEME,
            header: SIGNATURE,
            expected: EXPECTED_SIGNATURE,
        })?;

        let parts: [&[u8]; 5] = [
            id.as_bytes(),
            b".",
            timestamp.as_bytes(),
            b".",
            request.body.bytes(),
        ];
        let expected = hmac_sha256(&key, &parts).finalize().into_bytes();
        // Every candidate is compared, in constant time, so timing says nothing about
        // which (if any) matched.
        let matched = candidates.iter().fold(Choice::from(0), |acc, c| {
            acc | c.as_slice().ct_eq(&expected)
        });
        if !bool::from(matched) {
            return Err(SignatureError::Mismatch {
                scheme: SCHEME,
                header: SIGNATURE,
                signed: "<webhook-id>.<webhook-timestamp>.<raw body>",
                secret_field: SECRET_FIELD,
            });
        }
        check_window(
            SCHEME,
            TIMESTAMP,
            i128::from(seconds) * 1000,
            request.now,
            WINDOW_SECONDS,
        )?;
        Ok(Verified {
            dedup_key: Some(id.to_owned()),
            source: self.source(),
        })
    }
}

/// The HMAC key: the base64 after `whsec_` (the prefix may be left out, as the
/// reference libraries allow).
fn decode_key(secret: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let unusable = |reason| SignatureError::UnusableSecret {
        secret_field: SECRET_FIELD,
        reason,
    };
    let text = std::str::from_utf8(secret)
        .map_err(|_| unusable("it is not text: use whsec_<base64>"))?
        .trim();
    let encoded = text.strip_prefix(KEY_PREFIX).unwrap_or(text);
    let key = STANDARD
        .decode(encoded)
        .map_err(|_| unusable("the part after whsec_ is not base64: use whsec_<base64>"))?;
    if key.is_empty() {
        return Err(unusable(
            "the key is empty: use whsec_<base64 of 24 to 64 bytes>",
        ));
    }
    Ok(key)
}

/// The decoded `v1` signatures of the header; entries of other versions (`v1a`, ...) are
/// skipped. `None` when there is no readable `v1` entry at all.
fn v1_signatures(header: &str) -> Option<Vec<Vec<u8>>> {
    let found: Vec<Vec<u8>> = header
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, sig)| STANDARD.decode(sig).ok())
        .collect();
    (!found.is_empty()).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    // The example published with the Standard Webhooks specification. Rechecked with
    // Python (`base64.b64encode(hmac.new(base64.b64decode(key), f"{id}.{ts}.{body}",
    // sha256).digest())`) and with `openssl dgst -sha256 -hmac <decoded key> -binary | base64`.
    const SECRET: &[u8] = b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: &str = "1614265330";
    const SENT: u64 = 1_614_265_330;
    const BODY: &str = r#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn verify_with(
        secret: &[u8],
        id: &str,
        ts: &str,
        signature: &str,
        body: &str,
        now_s: u64,
    ) -> Result<Verified, SignatureError> {
        let headers = headers(&[
            ("webhook-id", id),
            ("webhook-timestamp", ts),
            ("webhook-signature", signature),
        ]);
        let request = SignedRequest {
            headers: &headers,
            body: &crate::body::RequestBody::new(body.as_bytes()),
            now: at_ms(now_s * 1000),
        };
        StandardWebhooks.verify(&request, secret)
    }

    fn verify(signature: &str, body: &str, now_s: u64) -> Result<Verified, SignatureError> {
        verify_with(SECRET, MSG_ID, TS, signature, body, now_s)
    }

    #[test]
    fn what_the_operator_signs_for_a_callback_verifies_here() {
        let key = hookrun_crds::callback::decode_key(SECRET).expect("a key");
        let body = r#"{"type":"session.completed","response":"42"}"#;
        let signature = hookrun_crds::callback::sign(&key, MSG_ID, SENT as i64, body.as_bytes());
        let verified = verify(&signature, body, SENT).expect("verified");
        assert_eq!(verified.dedup_key.as_deref(), Some(MSG_ID));
        // Any other body, id or key fails.
        assert!(verify(&signature, r#"{"type":"session.failed"}"#, SENT).is_err());
        let other = hookrun_crds::callback::sign(&key, "msg_other", SENT as i64, body.as_bytes());
        assert!(verify(&other, body, SENT).is_err());
        let wrong =
            hookrun_crds::callback::sign(b"another key", MSG_ID, SENT as i64, body.as_bytes());
        assert!(verify(&wrong, body, SENT).is_err());
    }

    #[test]
    fn accepts_the_published_example() {
        assert_eq!(
            verify(SIGNATURE, BODY, SENT),
            Ok(Verified {
                dedup_key: Some(MSG_ID.into()),
                source: "standard-webhooks",
            })
        );
    }

    #[test]
    fn accepts_any_of_several_signatures_and_skips_other_versions() {
        let several = format!("v1a,AAAA v1,bm90IGl0 {SIGNATURE} v2,xyz");
        assert!(verify(&several, BODY, SENT).is_ok());
        // A key without the prefix is the same key.
        let bare = &SECRET[KEY_PREFIX.len()..];
        assert!(verify_with(bare, MSG_ID, TS, SIGNATURE, BODY, SENT).is_ok());
    }

    #[test]
    fn window_edges() {
        assert!(verify(SIGNATURE, BODY, SENT + 300).is_ok());
        assert!(verify(SIGNATURE, BODY, SENT - 300).is_ok());
        let err = verify(SIGNATURE, BODY, SENT + 301).expect_err("too old");
        assert_eq!(err.code(), "stale_timestamp");
        assert!(err.to_string().contains("webhook-timestamp"), "{err}");
        assert!(verify(SIGNATURE, BODY, SENT - 301).is_err());
    }

    #[test]
    fn id_timestamp_and_body_are_all_signed() {
        let tampered = [
            verify_with(SECRET, "msg_other", TS, SIGNATURE, BODY, SENT),
            verify_with(SECRET, MSG_ID, "1614265331", SIGNATURE, BODY, SENT),
            verify_with(
                SECRET,
                MSG_ID,
                TS,
                SIGNATURE,
                r#"{"test": 2432232315}"#,
                SENT,
            ),
            verify_with(
                b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSx",
                MSG_ID,
                TS,
                SIGNATURE,
                BODY,
                SENT,
            ),
        ];
        for result in tampered {
            let err = result.expect_err("tampered");
            assert_eq!(err.code(), "bad_signature", "{err}");
            assert!(!err.to_string().contains("g0hM9SsE"), "{err}");
        }
    }

    #[test]
    fn malformed_headers_say_what_is_accepted() {
        for bad in [
            "",
            "v1",
            "v1a,AAAA",
            "v1,!!!",
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ] {
            let err = verify(bad, BODY, SENT).expect_err(bad);
            assert!(
                matches!(err, SignatureError::MalformedHeader { .. }),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("v1,<base64"), "{err}");
        }
        let err = verify_with(SECRET, MSG_ID, "soon", SIGNATURE, BODY, SENT).expect_err("ts");
        assert_eq!(err.code(), "bad_timestamp");
        let long = "m".repeat(300);
        let err = verify_with(SECRET, &long, TS, SIGNATURE, BODY, SENT).expect_err("long id");
        assert!(err.to_string().contains("webhook-id"), "{err}");
    }

    #[test]
    fn missing_headers() {
        let headers = headers(&[("webhook-timestamp", TS), ("webhook-signature", SIGNATURE)]);
        let request = SignedRequest {
            headers: &headers,
            body: &crate::body::RequestBody::new(BODY.as_bytes()),
            now: at_ms(SENT * 1000),
        };
        let err = StandardWebhooks
            .verify(&request, SECRET)
            .expect_err("no id");
        assert!(matches!(
            err,
            SignatureError::MissingHeader {
                header: "webhook-id",
                ..
            }
        ));
    }

    #[test]
    fn unusable_keys_are_a_configuration_error() {
        for key in [&b"whsec_***"[..], b"whsec_", b"\xff\xfe"] {
            let err = verify_with(key, MSG_ID, TS, SIGNATURE, BODY, SENT).expect_err("bad key");
            assert_eq!(err.code(), "unusable_secret");
            assert!(!err.is_caller_error());
        }
    }
}
