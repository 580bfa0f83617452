//! The webhook token: 256 bits from the operating system's CSPRNG, written in URL-safe
//! base64 without padding (43 characters). It never appears in `Debug` output.

use std::fmt;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::{TryRngCore, rngs::OsRng};
use sha2::{Digest, Sha256};

/// Bytes of randomness in a token.
pub const TOKEN_BYTES: usize = 32;
/// Characters of an encoded token.
pub const TOKEN_LEN: usize = 43;

/// A webhook token. `Display` writes the secret; `Debug` does not.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookToken(String);

/// The operating system could not supply randomness.
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomnessError(String);

impl WebhookToken {
    /// Mints a new token from the OS CSPRNG.
    pub fn generate() -> Result<Self, RandomnessError> {
        let mut bytes = [0u8; TOKEN_BYTES];
        OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| RandomnessError(e.to_string()))?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Wraps a stored token, if it has the shape this crate mints.
    pub fn parse(s: &str) -> Option<Self> {
        is_well_formed(s).then(|| Self(s.to_owned()))
    }

    /// The token as it goes into a URL.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// SHA-256 of the token, the form the apiserver keeps and compares in constant time.
    pub fn digest(&self) -> [u8; 32] {
        digest(&self.0)
    }
}

impl fmt::Debug for WebhookToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookToken(..)")
    }
}

/// Whether `s` looks like a token this crate mints: 43 URL-safe base64 characters.
pub fn is_well_formed(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// SHA-256 of a presented token. Comparing digests rather than the strings keeps the
/// comparison's time independent of where the strings differ and of their lengths.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed_and_distinct() {
        let a = WebhookToken::generate().expect("randomness");
        let b = WebhookToken::generate().expect("randomness");
        assert!(is_well_formed(a.expose()));
        assert_eq!(a.expose().len(), TOKEN_LEN);
        assert_ne!(a, b);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(a.expose()).expect("base64").len(),
            TOKEN_BYTES
        );
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let token = WebhookToken::generate().expect("randomness");
        assert!(!format!("{token:?}").contains(token.expose()));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert!(WebhookToken::parse("short").is_none());
        assert!(WebhookToken::parse(&"a".repeat(42)).is_none());
        assert!(WebhookToken::parse(&format!("{}=", "a".repeat(42))).is_none());
        assert!(WebhookToken::parse(&"a".repeat(43)).is_some());
    }
}
