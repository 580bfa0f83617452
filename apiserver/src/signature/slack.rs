//! Slack requests: `X-Slack-Signature: v0=<hex>`, the HMAC-SHA256 of
//! `v0:<X-Slack-Request-Timestamp>:<body>`, within 300 s. Slack's retries of one event
//! carry the same body, so the dedup key is a digest of the body. Also reads the
//! `url_verification` handshake that Slack sends when an Events API URL is set.

use sha2::{Digest, Sha256};

use super::{
    PrefixedHexHeader, SignatureError, SignedRequest, Verified, Verifier, check_window,
    seconds_header,
};

const SCHEME: &str = "Slack";
const TIMESTAMP: &str = "X-Slack-Request-Timestamp";
const SIGNATURE: PrefixedHexHeader = PrefixedHexHeader {
    scheme: SCHEME,
    header: "X-Slack-Signature",
    prefix: "v0=",
    expected: "v0=<hex HMAC-SHA256 of v0:<X-Slack-Request-Timestamp>:<raw body>>",
    signed: "v0:<X-Slack-Request-Timestamp>:<raw body>",
    secret_field: "slackSigningSecret",
};
const EXPECTED_TIMESTAMP: &str = "the send time in whole seconds since the epoch";

/// How far `X-Slack-Request-Timestamp` may be from the server's clock.
pub(crate) const WINDOW_SECONDS: u64 = 300;

/// Slack's request signatures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Slack;

impl Verifier for Slack {
    fn source(&self) -> &'static str {
        "slack"
    }

    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError> {
        let (seconds, timestamp) =
            seconds_header(SCHEME, request.headers, TIMESTAMP, EXPECTED_TIMESTAMP)?;
        let parts: [&[u8]; 4] = [b"v0:", timestamp.as_bytes(), b":", request.body.bytes()];
        SIGNATURE.verify(request.headers, secret, &parts)?;
        check_window(
            SCHEME,
            TIMESTAMP,
            i128::from(seconds) * 1000,
            request.now,
            WINDOW_SECONDS,
        )?;
        // Slack's retries (X-Slack-Retry-Num 1, 2, 3) resend the same body with a new
        // timestamp and signature: only the body identifies the event.
        Ok(Verified {
            dedup_key: Some(format!(
                "sha256:{}",
                hex::encode(Sha256::digest(request.body.bytes()))
            )),
            source: self.source(),
        })
    }
}

/// The `challenge` of a Slack `url_verification` request, which must be answered with
/// it instead of opening a Session; `None` for every other body.
pub fn url_verification_challenge(body: &crate::body::RequestBody<'_>) -> Option<String> {
    let value = body.json().ok()?;
    if value.get("type")?.as_str()? != "url_verification" {
        return None;
    }
    value.get("challenge")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const SECRET: &[u8] = b"slack_test_secret";
    const BODY: &str =
        r#"{"type":"event_callback","event":{"type":"app_mention","text":"deploy please"}}"#;
    const SENT: u64 = 1_700_000_000;
    /// `printf '%s' "v0:1700000000:$BODY" | openssl dgst -sha256 -hmac 'slack_test_secret'`
    const SIGNATURE: &str = "v0=9de1417dbb0bacab497832a4e98606ade15476745717e61765b8b181e0644f14";
    /// `printf '%s' "$BODY" | sha256sum`
    const BODY_SHA256: &str = "df223115bb9be06cc40ed8ba5fcfc21ff09de7910cc00eaa6f04e14e4ef8b8e2";

    fn verify(pairs: &[(&str, &str)], body: &str, now_s: u64) -> Result<Verified, SignatureError> {
        let headers = headers(pairs);
        let request = SignedRequest {
            headers: &headers,
            body: &crate::body::RequestBody::new(body.as_bytes()),
            now: at_ms(now_s * 1000),
        };
        Slack.verify(&request, SECRET)
    }

    fn signed() -> [(&'static str, &'static str); 2] {
        [
            ("X-Slack-Signature", SIGNATURE),
            ("X-Slack-Request-Timestamp", "1700000000"),
        ]
    }

    #[test]
    fn accepts_the_independent_vector_and_dedups_on_the_body() {
        assert_eq!(
            verify(&signed(), BODY, SENT + 10),
            Ok(Verified {
                dedup_key: Some(format!("sha256:{BODY_SHA256}")),
                source: "slack",
            })
        );
    }

    #[test]
    fn window_edges() {
        assert!(verify(&signed(), BODY, SENT + 300).is_ok());
        assert!(verify(&signed(), BODY, SENT - 300).is_ok());
        let err = verify(&signed(), BODY, SENT + 301).expect_err("too old");
        assert_eq!(err.code(), "stale_timestamp");
        assert!(
            err.to_string().contains("X-Slack-Request-Timestamp"),
            "{err}"
        );
        assert!(verify(&signed(), BODY, SENT - 301).is_err());
    }

    #[test]
    fn the_timestamp_is_signed() {
        // Moving the timestamp into the window breaks the signature.
        let err = verify(
            &[
                ("X-Slack-Signature", SIGNATURE),
                ("X-Slack-Request-Timestamp", "1700000500"),
            ],
            BODY,
            SENT + 500,
        )
        .expect_err("re-dated");
        assert_eq!(err.code(), "bad_signature");
    }

    #[test]
    fn tampered_missing_and_malformed() {
        let err = verify(&signed(), &BODY.replace("deploy", "delete"), SENT).expect_err("x");
        assert_eq!(err.code(), "bad_signature");
        assert!(!err.to_string().contains("9de1417d"), "{err}");

        let err = verify(&[("X-Slack-Request-Timestamp", "1700000000")], BODY, SENT)
            .expect_err("no signature");
        assert!(err.to_string().contains("X-Slack-Signature"), "{err}");

        let err = verify(&[("X-Slack-Signature", SIGNATURE)], BODY, SENT).expect_err("no ts");
        assert_eq!(err.code(), "bad_timestamp");

        for ts in ["", "-5", "1.5", "soon", "99999999999999999999999"] {
            let err = verify(
                &[
                    ("X-Slack-Signature", SIGNATURE),
                    ("X-Slack-Request-Timestamp", ts),
                ],
                BODY,
                SENT,
            )
            .expect_err(ts);
            assert_eq!(err.code(), "bad_timestamp", "{ts}");
        }
        let err = verify(
            &[
                ("X-Slack-Signature", &SIGNATURE[3..]),
                ("X-Slack-Request-Timestamp", "1700000000"),
            ],
            BODY,
            SENT,
        )
        .expect_err("no v0=");
        assert!(matches!(err, SignatureError::MalformedHeader { .. }));
    }

    #[test]
    fn url_verification() {
        let body = br#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        assert_eq!(
            url_verification_challenge(&crate::body::RequestBody::new(body)).as_deref(),
            Some("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
        );
        assert_eq!(
            url_verification_challenge(&crate::body::RequestBody::new(BODY.as_bytes())),
            None
        );
        assert_eq!(
            url_verification_challenge(&crate::body::RequestBody::new(b"token=x&text=y")),
            None
        );
    }
}
