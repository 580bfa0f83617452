//! The console's gatekeeping, as plain functions: the per-run token and its constant-time
//! check, the `Host` check against DNS rebinding, and the checks of what the page sends
//! (names, titles, messages, env) before any of it reaches Kubernetes.

use rand::RngCore;
use serde::Deserialize;
use subtle::ConstantTimeEq;

/// Bytes of randomness in a console token (256 bits).
pub const TOKEN_BYTES: usize = 32;
/// The longest title an invoke from the page may carry, in bytes.
pub const MAX_TITLE_BYTES: usize = 16 * 1024;
/// The longest message sent into a live Session from the page, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// The most env entries an invoke from the page may set.
pub const MAX_ENV: usize = 16;
/// The longest env value an invoke from the page may set, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 4 * 1024;
/// The largest request body the console reads; more is refused unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The longest Kubernetes object name (a DNS-1123 subdomain).
const MAX_NAME_LEN: usize = 253;

/// The secret of one console run: whoever holds it may use the console, so it lives only
/// in the URL printed on stdout and in the page that URL opens.
#[derive(Clone)]
pub struct ConsoleToken(String);

impl ConsoleToken {
    /// A fresh token from the thread's cryptographic generator (seeded by the operating
    /// system), as 64 hex digits.
    pub fn generate() -> Self {
        let mut bytes = [0u8; TOKEN_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// The token as it goes into URLs (hex, nothing to escape).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is this token, compared in constant time so a caller cannot
    /// learn it byte by byte from response timings.
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl std::fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleToken(..)")
    }
}

/// The `token` parameter of a query string, if there is exactly one.
pub fn token_in_query(query: Option<&str>) -> Option<&str> {
    let mut found = None;
    for pair in query?.split('&') {
        if let Some(value) = pair.strip_prefix("token=") {
            if found.is_some() {
                return None;
            }
            found = Some(value);
        }
    }
    found
}

/// Whether a request's `Host` header names this console itself (`127.0.0.1:PORT` or
/// `localhost:PORT`). A page on another site that rebinds its own DNS name to 127.0.0.1
/// sends its own name here, so it is refused even though it reached the port.
pub fn host_allowed(host: Option<&str>, port: u16) -> bool {
    let Some(host) = host else {
        return false;
    };
    let Some((name, given_port)) = host.rsplit_once(':') else {
        return false;
    };
    given_port == port.to_string()
        && (name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost"))
}

/// A request the console refuses before talking to Kubernetes; the message names the
/// field and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Checks a Kubernetes object name (Agent, Session): a DNS-1123 subdomain, that is at
/// most 253 lowercase letters, digits, `-` and `.`, starting and ending with a letter or
/// digit.
pub fn check_name(field: &str, name: &str) -> Result<(), Invalid> {
    let accepted = "must be a Kubernetes name: 1 to 253 lowercase letters, digits, '-' or '.', \
                    starting and ending with a letter or digit";
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && edge_ok(name.chars().next())
        && edge_ok(name.chars().last());
    if ok {
        Ok(())
    } else {
        Err(invalid(field, accepted))
    }
}

/// One env entry of an invoke.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvEntry {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// `POST /api/invoke`: start a Session of `agent`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRequest {
    pub agent: String,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub env: Vec<EnvEntry>,
}

impl InvokeRequest {
    /// Checks every field; the env as `(name, value)` pairs for the invoke.
    pub fn check(&self) -> Result<Vec<(String, String)>, Invalid> {
        check_name("agent", &self.agent)?;
        if self.title.len() > MAX_TITLE_BYTES {
            return Err(invalid("title", format!("at most {MAX_TITLE_BYTES} bytes")));
        }
        if self.env.len() > MAX_ENV {
            return Err(invalid("env", format!("at most {MAX_ENV} entries")));
        }
        let mut env = Vec::with_capacity(self.env.len());
        for entry in &self.env {
            check_env_name(&entry.name)?;
            if entry.value.len() > MAX_ENV_VALUE_BYTES {
                return Err(invalid(
                    &format!("env.{}", entry.name),
                    format!("at most {MAX_ENV_VALUE_BYTES} bytes"),
                ));
            }
            env.push((entry.name.clone(), entry.value.clone()));
        }
        Ok(env)
    }
}

fn check_env_name(name: &str) -> Result<(), Invalid> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.starts_with("HOOKRUN_");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "env.name",
            "letters, digits and '_', not starting with a digit, at most 256 characters; \
             the HOOKRUN_ prefix is reserved",
        ))
    }
}

/// `POST /api/sessions/{name}/input`: a message into a live Session.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRequest {
    pub message: String,
}

impl InputRequest {
    /// Checks the message: not blank, within [`MAX_MESSAGE_BYTES`].
    pub fn check(&self) -> Result<&str, Invalid> {
        if self.message.trim().is_empty() {
            return Err(invalid("message", "must not be blank"));
        }
        if self.message.len() > MAX_MESSAGE_BYTES {
            return Err(invalid(
                "message",
                format!("at most {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        Ok(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_256_random_bits_in_hex_and_matches_only_itself() {
        let token = ConsoleToken::generate();
        assert_eq!(token.as_str().len(), 2 * TOKEN_BYTES);
        assert!(token.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(token.matches(token.as_str()));
        assert!(!token.matches(""));
        assert!(!token.matches(&token.as_str()[1..]));
        let mut flipped = token.as_str().to_owned();
        flipped.replace_range(0..1, if flipped.starts_with('0') { "1" } else { "0" });
        assert!(!token.matches(&flipped));
        assert!(!token.matches(&format!("{}0", token.as_str())));
        assert_ne!(token.as_str(), ConsoleToken::generate().as_str());
        assert_eq!(format!("{token:?}"), "ConsoleToken(..)");
    }

    #[test]
    fn the_token_is_read_from_the_query_only_when_given_once() {
        assert_eq!(token_in_query(Some("token=abc")), Some("abc"));
        assert_eq!(token_in_query(Some("x=1&token=abc&y=2")), Some("abc"));
        assert_eq!(token_in_query(Some("token=abc&token=abd")), None);
        assert_eq!(token_in_query(Some("xtoken=abc")), None);
        assert_eq!(token_in_query(Some("")), None);
        assert_eq!(token_in_query(None), None);
    }

    #[test]
    fn only_the_consoles_own_host_and_port_are_allowed() {
        assert!(host_allowed(Some("127.0.0.1:8080"), 8080));
        assert!(host_allowed(Some("localhost:8080"), 8080));
        assert!(host_allowed(Some("LocalHost:8080"), 8080));
        assert!(!host_allowed(Some("127.0.0.1:8081"), 8080));
        assert!(!host_allowed(Some("127.0.0.1"), 8080));
        assert!(!host_allowed(Some("evil.example:8080"), 8080));
        assert!(!host_allowed(Some("localhost.evil.example:8080"), 8080));
        assert!(!host_allowed(Some("127.0.0.1:08080"), 8080));
        assert!(!host_allowed(Some("[::1]:8080"), 8080));
        assert!(!host_allowed(None, 8080));
    }

    #[test]
    fn names_must_be_dns_1123_subdomains() {
        for good in ["echo", "a", "my-agent.v2", "0abc", &"a".repeat(253)] {
            assert_eq!(check_name("agent", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "Echo",
            "-echo",
            "echo-",
            "ec ho",
            "ec/ho",
            "../x",
            "echo\n",
            &"a".repeat(254),
        ] {
            let error = check_name("agent", bad).expect_err(bad);
            assert_eq!(error.field, "agent");
            assert!(error.message.contains("Kubernetes name"), "{error}");
        }
    }

    fn invoke(json: &str) -> InvokeRequest {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn an_invoke_is_bounded_and_its_env_checked() {
        let ok = invoke(r#"{"agent":"echo","title":"hi","env":[{"name":"A_1","value":"x"}]}"#);
        assert_eq!(ok.check(), Ok(vec![("A_1".to_owned(), "x".to_owned())]));
        assert_eq!(invoke(r#"{"agent":"echo"}"#).check(), Ok(vec![]));

        let long = InvokeRequest {
            title: "x".repeat(MAX_TITLE_BYTES + 1),
            ..invoke(r#"{"agent":"echo"}"#)
        };
        assert_eq!(long.check().expect_err("too long").field, "title");
        let at_limit = InvokeRequest {
            title: "x".repeat(MAX_TITLE_BYTES),
            ..invoke(r#"{"agent":"echo"}"#)
        };
        assert!(at_limit.check().is_ok());

        assert_eq!(
            invoke(r#"{"agent":"Bad Name"}"#)
                .check()
                .expect_err("bad")
                .field,
            "agent"
        );
        for name in ["1A", "A-B", "", "HOOKRUN_SESSION"] {
            let request = InvokeRequest {
                env: vec![EnvEntry {
                    name: name.to_owned(),
                    value: String::new(),
                }],
                ..invoke(r#"{"agent":"echo"}"#)
            };
            assert_eq!(request.check().expect_err(name).field, "env.name");
        }
        let many = InvokeRequest {
            env: (0..=MAX_ENV)
                .map(|i| EnvEntry {
                    name: format!("V{i}"),
                    value: String::new(),
                })
                .collect(),
            ..invoke(r#"{"agent":"echo"}"#)
        };
        assert_eq!(many.check().expect_err("too many").field, "env");
        let big = InvokeRequest {
            env: vec![EnvEntry {
                name: "BIG".into(),
                value: "x".repeat(MAX_ENV_VALUE_BYTES + 1),
            }],
            ..invoke(r#"{"agent":"echo"}"#)
        };
        assert_eq!(big.check().expect_err("too big").field, "env.BIG");
        assert!(serde_json::from_str::<InvokeRequest>(r#"{"agent":"a","titel":"x"}"#).is_err());
    }

    #[test]
    fn a_message_is_not_blank_and_bounded() {
        let message = |m: &str| InputRequest {
            message: m.to_owned(),
        };
        assert_eq!(message("hello").check(), Ok("hello"));
        assert_eq!(message("  \n").check().expect_err("blank").field, "message");
        let long = message(&"x".repeat(MAX_MESSAGE_BYTES + 1));
        assert_eq!(long.check().expect_err("long").field, "message");
        assert!(serde_json::from_str::<InputRequest>(r#"{"mesage":"x"}"#).is_err());
    }
}
