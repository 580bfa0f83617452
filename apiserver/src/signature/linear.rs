//! Linear webhooks: `Linear-Signature` is the hex HMAC-SHA256 of the raw body, the body's
//! `webhookTimestamp` (milliseconds) must be within 60 s, and `Linear-Delivery` names the
//! delivery.

use crate::body::RequestBody;

use super::{
    SignatureError, SignedRequest, Verified, Verifier, check_window, delivery_id, required_header,
    verify_hex,
};

const SCHEME: &str = "Linear";
const SIGNATURE: &str = "Linear-Signature";
const DELIVERY: &str = "Linear-Delivery";
const TIMESTAMP: &str = "webhookTimestamp";
const EXPECTED_SIGNATURE: &str = "the hex HMAC-SHA256 of the raw body (64 hex digits)";
const EXPECTED_TIMESTAMP: &str =
    "a JSON body whose webhookTimestamp is the send time in milliseconds since the epoch";

/// How far `webhookTimestamp` may be from the server's clock.
pub(crate) const WINDOW_SECONDS: u64 = 60;

/// Linear's webhook signatures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Linear;

impl Verifier for Linear {
    fn source(&self) -> &'static str {
        "linear"
    }

    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError> {
        let presented = required_header(SCHEME, request.headers, SIGNATURE, EXPECTED_SIGNATURE)?;
        let matches = verify_hex(secret, &[request.body.bytes()], presented).map_err(|()| {
            SignatureError::MalformedHeader {
                scheme: SCHEME,
                header: SIGNATURE,
                expected: EXPECTED_SIGNATURE,
            }
        })?;
        if !matches {
            return Err(SignatureError::Mismatch {
                scheme: SCHEME,
                header: SIGNATURE,
                signed: "the raw body",
                secret_field: "linearSignatureSecret",
            });
        }
        // The timestamp is inside the signed body: read it only once the body is
        // authentic, so the replay window cannot be argued with.
        let timestamp_ms = webhook_timestamp(request.body).ok_or(SignatureError::BadTimestamp {
            scheme: SCHEME,
            field: TIMESTAMP,
            expected: EXPECTED_TIMESTAMP,
        })?;
        check_window(SCHEME, TIMESTAMP, timestamp_ms, request.now, WINDOW_SECONDS)?;
        Ok(Verified {
            dedup_key: delivery_id(SCHEME, request.headers, DELIVERY)?,
            source: self.source(),
        })
    }
}

/// The body's `webhookTimestamp` in milliseconds: an integer, or a number with no
/// fractional part.
fn webhook_timestamp(body: &RequestBody<'_>) -> Option<i128> {
    let ts = body.json().ok()?.get(TIMESTAMP)?;
    if let Some(i) = ts.as_i64() {
        return Some(i128::from(i));
    }
    if let Some(u) = ts.as_u64() {
        return Some(i128::from(u));
    }
    let f = ts.as_f64()?;
    (f.is_finite() && f.fract() == 0.0 && f.abs() < 1e18).then_some(f as i128)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const SECRET: &[u8] = b"lin_wh_test_secret";
    const BODY: &str = r#"{"action":"create","type":"Issue","data":{"title":"Hello"},"webhookTimestamp":1700000000000}"#;
    /// Computed with OpenSSL, not with this code:
    /// `printf '%s' "$BODY" | openssl dgst -sha256 -hmac 'lin_wh_test_secret'`
    const SIGNATURE_HEX: &str = "407ccf26a112b5d2ae8282bbe53c97738c8514fdcd3f9479d758e6ab3868e2cf";
    const SENT_MS: u64 = 1_700_000_000_000;

    fn verify(pairs: &[(&str, &str)], body: &str, now_ms: u64) -> Result<Verified, SignatureError> {
        let headers = headers(pairs);
        let request = SignedRequest {
            headers: &headers,
            body: &RequestBody::new(body.as_bytes()),
            now: at_ms(now_ms),
        };
        Linear.verify(&request, SECRET)
    }

    #[test]
    fn accepts_the_independent_vector_and_dedups_on_the_delivery() {
        let got = verify(
            &[
                ("linear-signature", SIGNATURE_HEX),
                ("linear-delivery", "234d1a4e-b617-4388-90fe-adc3633d6b72"),
            ],
            BODY,
            SENT_MS + 1_000,
        );
        assert_eq!(
            got,
            Ok(Verified {
                dedup_key: Some("234d1a4e-b617-4388-90fe-adc3633d6b72".into()),
                source: "linear",
            })
        );
    }

    #[test]
    fn uppercase_hex_and_no_delivery_are_fine() {
        let got = verify(
            &[("Linear-Signature", &SIGNATURE_HEX.to_uppercase())],
            BODY,
            SENT_MS,
        )
        .expect("the signature matches");
        assert_eq!(got.dedup_key, None);
    }

    #[test]
    fn window_edges() {
        let sig = [("linear-signature", SIGNATURE_HEX)];
        assert!(verify(&sig, BODY, SENT_MS + 60_000).is_ok());
        assert!(verify(&sig, BODY, SENT_MS - 60_000).is_ok());
        let err = verify(&sig, BODY, SENT_MS + 60_001).expect_err("too old");
        assert_eq!(err.code(), "stale_timestamp");
        assert!(err.to_string().contains("webhookTimestamp"), "{err}");
        assert!(err.to_string().contains("60 s"), "{err}");
        assert!(verify(&sig, BODY, SENT_MS - 60_001).is_err());
    }

    #[test]
    fn tampered_body_is_a_mismatch_without_echoing_signatures() {
        let tampered = BODY.replace("Hello", "Hellp");
        let err = verify(&[("linear-signature", SIGNATURE_HEX)], &tampered, SENT_MS)
            .expect_err("tampered");
        assert_eq!(err.code(), "bad_signature");
        let message = err.to_string();
        assert!(message.contains("Linear-Signature"), "{message}");
        assert!(!message.contains(SIGNATURE_HEX), "{message}");
        assert!(!message.contains("lin_wh_test_secret"), "{message}");
    }

    #[test]
    fn missing_and_malformed_signatures() {
        let err = verify(&[], BODY, SENT_MS).expect_err("missing");
        assert!(matches!(
            err,
            SignatureError::MissingHeader {
                header: "Linear-Signature",
                ..
            }
        ));
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        for bad in ["sha256=abc", "xyz", &SIGNATURE_HEX[..62], ""] {
            let err = verify(&[("linear-signature", bad)], BODY, SENT_MS).expect_err(bad);
            assert!(
                matches!(err, SignatureError::MalformedHeader { .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn wrong_secret_is_a_mismatch() {
        let headers = headers(&[("linear-signature", SIGNATURE_HEX)]);
        let request = SignedRequest {
            headers: &headers,
            body: &RequestBody::new(BODY.as_bytes()),
            now: at_ms(SENT_MS),
        };
        let err = Linear.verify(&request, b"other").expect_err("wrong secret");
        assert_eq!(err.code(), "bad_signature");
    }

    #[test]
    fn timestamp_must_be_in_the_signed_body() {
        // Signed (OpenSSL, same secret) but without webhookTimestamp:
        // printf '%s' '{"action":"create"}' | openssl dgst -sha256 -hmac 'lin_wh_test_secret'
        let body = r#"{"action":"create"}"#;
        let sig = "74926b1f5585e27bb047ea53199f0911bd883901cd0ccf3665d35cd55fcf627e";
        let err = verify(&[("linear-signature", sig)], body, SENT_MS).expect_err("no timestamp");
        assert_eq!(err.code(), "bad_timestamp");
        assert!(err.to_string().contains("webhookTimestamp"), "{err}");
    }

    #[test]
    fn timestamp_forms() {
        assert_eq!(
            webhook_timestamp(&RequestBody::new(br#"{"webhookTimestamp":5}"#)),
            Some(5)
        );
        assert_eq!(
            webhook_timestamp(&RequestBody::new(br#"{"webhookTimestamp":5.0}"#)),
            Some(5)
        );
        assert_eq!(
            webhook_timestamp(&RequestBody::new(br#"{"webhookTimestamp":5.5}"#)),
            None
        );
        assert_eq!(
            webhook_timestamp(&RequestBody::new(br#"{"webhookTimestamp":"5"}"#)),
            None
        );
        assert_eq!(webhook_timestamp(&RequestBody::new(b"not json")), None);
    }
}
