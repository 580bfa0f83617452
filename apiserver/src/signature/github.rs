//! GitHub webhooks: `X-Hub-Signature-256: sha256=<hex>` over the raw body, deduplicated on
//! `X-GitHub-Delivery`. GitHub signs no timestamp, so there is no replay window; the
//! delivery id is what stops a replay from opening a second Session.

use super::{PrefixedHexHeader, SignatureError, SignedRequest, Verified, Verifier, delivery_id};

const SCHEME: &str = "GitHub";
const DELIVERY: &str = "X-GitHub-Delivery";
const SIGNATURE: PrefixedHexHeader = PrefixedHexHeader {
    scheme: SCHEME,
    header: "X-Hub-Signature-256",
    prefix: "sha256=",
    expected: "sha256=<hex HMAC-SHA256 of the raw body>",
    signed: "the raw body",
    secret_field: "githubSecret",
};

/// GitHub's webhook signatures.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Github;

impl Verifier for Github {
    fn source(&self) -> &'static str {
        "github"
    }

    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError> {
        SIGNATURE.verify(request.headers, secret, &[request.body.bytes()])?;
        Ok(Verified {
            dedup_key: delivery_id(SCHEME, request.headers, DELIVERY)?,
            source: self.source(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    /// GitHub's published example ("Validating webhook deliveries"): secret
    /// `It's a Secret to Everybody`, payload `Hello, World!`. Rechecked with
    /// `printf '%s' 'Hello, World!' | openssl dgst -sha256 -hmac "It's a Secret to Everybody"`.
    const DOC_SECRET: &[u8] = b"It's a Secret to Everybody";
    const DOC_BODY: &[u8] = b"Hello, World!";
    const DOC_SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    fn verify(pairs: &[(&str, &str)], body: &[u8]) -> Result<Verified, SignatureError> {
        let headers = headers(pairs);
        let request = SignedRequest {
            headers: &headers,
            body: &crate::body::RequestBody::new(body),
            now: at_ms(0),
        };
        Github.verify(&request, DOC_SECRET)
    }

    #[test]
    fn accepts_githubs_published_example() {
        let got = verify(
            &[
                ("X-Hub-Signature-256", DOC_SIGNATURE),
                ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            ],
            DOC_BODY,
        );
        assert_eq!(
            got,
            Ok(Verified {
                dedup_key: Some("72d3162e-cc78-11e3-81ab-4c9367dc0958".into()),
                source: "github",
            })
        );
    }

    #[test]
    fn a_second_independent_vector() {
        // printf '%s' '{"action":"opened","number":1}' \
        //   | openssl dgst -sha256 -hmac "It's a Secret to Everybody"
        let sig = "sha256=1a763b1f352d220a314db46b42b1cbc50b0032b00015fd3d038d42c3666b7217";
        assert!(
            verify(
                &[("x-hub-signature-256", sig)],
                br#"{"action":"opened","number":1}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn tampered_body_is_refused() {
        let err = verify(&[("x-hub-signature-256", DOC_SIGNATURE)], b"Hello, World?")
            .expect_err("tampered");
        assert_eq!(err.code(), "bad_signature");
        assert!(!err.to_string().contains("757107ea"), "{err}");
    }

    #[test]
    fn missing_or_malformed_header() {
        let err = verify(&[], DOC_BODY).expect_err("missing");
        assert!(err.to_string().contains("X-Hub-Signature-256"), "{err}");
        assert!(err.to_string().contains("sha256=<hex"), "{err}");
        // The SHA-1 header alone is not accepted.
        let err = verify(
            &[(
                "x-hub-signature",
                "sha1=0000000000000000000000000000000000000000",
            )],
            DOC_BODY,
        )
        .expect_err("sha1 only");
        assert_eq!(err.code(), "missing_signature");
        for bad in [
            &DOC_SIGNATURE[7..],
            "sha1=757107ea",
            "sha256=",
            "sha256=xyz",
        ] {
            let err = verify(&[("x-hub-signature-256", bad)], DOC_BODY).expect_err(bad);
            assert!(
                matches!(err, SignatureError::MalformedHeader { .. }),
                "{bad}"
            );
        }
    }
}
