//! The generic HMAC scheme for senders without their own: `X-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the raw body. No timestamp and no delivery id; callers that retry send
//! an `Idempotency-Key`.

use super::{PrefixedHexHeader, SignatureError, SignedRequest, Verified, Verifier};

const SIGNATURE: PrefixedHexHeader = PrefixedHexHeader {
    scheme: "HMAC-signed",
    header: "X-Signature",
    prefix: "sha256=",
    expected: "sha256=<hex HMAC-SHA256 of the raw body>",
    signed: "the raw body",
    secret_field: "hmacSecret",
};

/// A plain HMAC-SHA256 of the body.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GenericHmac;

impl Verifier for GenericHmac {
    fn source(&self) -> &'static str {
        "hmac"
    }

    fn verify(
        &self,
        request: &SignedRequest<'_>,
        secret: &[u8],
    ) -> Result<Verified, SignatureError> {
        SIGNATURE.verify(request.headers, secret, &[request.body.bytes()])?;
        Ok(Verified {
            dedup_key: None,
            source: self.source(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    const SECRET: &[u8] = b"generic_test_secret";
    const BODY: &[u8] = br#"{"title":"nightly"}"#;
    /// `printf '%s' '{"title":"nightly"}' | openssl dgst -sha256 -hmac 'generic_test_secret'`
    const SIGNATURE: &str =
        "sha256=04c7c91b1b8b57d2dfc996fb08247ccf8e85c68fc1aca45ef4994215bfaf0ffb";

    fn verify(pairs: &[(&str, &str)], body: &[u8]) -> Result<Verified, SignatureError> {
        let headers = headers(pairs);
        let request = SignedRequest {
            headers: &headers,
            body: &crate::body::RequestBody::new(body),
            now: at_ms(0),
        };
        GenericHmac.verify(&request, SECRET)
    }

    #[test]
    fn accepts_the_independent_vector() {
        assert_eq!(
            verify(&[("X-Signature", SIGNATURE)], BODY),
            Ok(Verified {
                dedup_key: None,
                source: "hmac"
            })
        );
    }

    #[test]
    fn refuses_tampering_absence_and_bare_hex() {
        let err =
            verify(&[("x-signature", SIGNATURE)], br#"{"title":"nightlY"}"#).expect_err("tampered");
        assert_eq!(err.code(), "bad_signature");
        assert!(err.to_string().contains("hmacSecret"), "{err}");
        let err = verify(&[], BODY).expect_err("missing");
        assert!(err.to_string().contains("X-Signature"), "{err}");
        let err = verify(&[("x-signature", &SIGNATURE[7..])], BODY).expect_err("bare hex");
        assert!(matches!(err, SignatureError::MalformedHeader { .. }));
    }
}
