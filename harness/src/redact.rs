//! Keeping secrets out of everything the harness writes: the session's events, its
//! completion (response and error message) and the pod log. Provider error bodies can
//! quote the key, transport errors can print a URL with credentials in it, and a
//! program's stderr can print its environment; all of it passes through [`scrub`] first.
//!
//! Two passes: every known secret (the model keys, credentials found in configured URLs,
//! values of secret-looking variables) is replaced in its raw, percent-encoded, base64
//! and hex forms; then credentials of any URL left in the text (userinfo, and query
//! parameters named like credentials) and `Bearer` tokens are replaced too, so a secret
//! the harness was never told about does not get through in the usual shapes either.

use std::sync::RwLock;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};

/// What a secret is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Secrets shorter than this are not remembered: replacing every `abc` in a message would
/// destroy it and protect nothing.
pub const MIN_SECRET_LEN: usize = 8;

/// Query parameter names whose values are credentials (compared in lowercase).
const SECRET_PARAMS: &[&str] = &[
    "key",
    "api_key",
    "api-key",
    "apikey",
    "token",
    "access_token",
    "auth",
    "password",
    "secret",
    "client_secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-goog-signature",
];

/// The secrets one harness process knows, in every form they might be written in.
#[derive(Debug, Default, Clone)]
pub struct Redactor {
    /// Longest first, so that a secret containing another is replaced whole.
    forms: Vec<String>,
}

impl Redactor {
    /// Remembers `secret` (trimmed) and its encoded forms; short ones are ignored.
    pub fn add(&mut self, secret: &str) {
        let secret = secret.trim();
        if secret.len() < MIN_SECRET_LEN {
            return;
        }
        let bytes = secret.as_bytes();
        let mut forms = vec![
            secret.to_string(),
            percent_encode(secret),
            STANDARD.encode(bytes),
            STANDARD_NO_PAD.encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            hex_lower(bytes),
            hex_lower(bytes).to_uppercase(),
        ];
        forms.retain(|form| form.len() >= MIN_SECRET_LEN);
        for form in forms {
            if !self.forms.contains(&form) {
                self.forms.push(form);
            }
        }
        self.forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
    }

    /// Remembers the credentials a URL carries: its userinfo (user, password, and the
    /// `user:password` pair as Basic authentication would encode it) and the values of
    /// query parameters named like credentials.
    pub fn add_url(&mut self, url: &str) {
        if let Some(userinfo) = userinfo(url) {
            self.add(userinfo);
            let decoded = percent_decode(userinfo);
            self.add(&decoded);
            if let Some((user, password)) = decoded.split_once(':') {
                self.add(user);
                self.add(password);
            }
        }
        if let Some((_, query)) = url.split_once('?') {
            let query = query.split('#').next().unwrap_or("");
            for pair in query.split('&') {
                if let Some((name, value)) = pair.split_once('=')
                    && is_secret_param(name)
                {
                    self.add(value);
                    self.add(&percent_decode(value));
                }
            }
        }
    }

    /// Remembers the secrets of a process environment: values of variables named like
    /// keys, tokens, secrets and passwords, and the credentials of any URL-valued one.
    pub fn add_env<I, K, V>(&mut self, vars: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (name, value) in vars {
            let (name, value) = (name.as_ref().to_ascii_uppercase(), value.as_ref());
            if is_secret_variable(&name) {
                self.add(value);
            }
            if value.contains("://") {
                self.add_url(value);
            }
        }
    }

    /// `text` with every known secret and every URL credential or bearer token replaced by
    /// [`REDACTED`]. Idempotent.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for form in &self.forms {
            if text.contains(form.as_str()) {
                text = text.replace(form.as_str(), REDACTED);
            }
        }
        let text = scrub_userinfo(&text);
        let text = scrub_query_params(&text);
        scrub_bearer(&text)
    }
}

/// Whether an environment variable (upper case) holds a credential by its name.
fn is_secret_variable(name: &str) -> bool {
    ["_KEY", "_TOKEN", "_SECRET", "_PASSWORD", "_PASS"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
        || ["API_KEY", "SECRET", "PASSWORD", "CREDENTIAL"]
            .iter()
            .any(|part| name.contains(part))
}

fn is_secret_param(name: &str) -> bool {
    let name = percent_decode(name).to_ascii_lowercase();
    SECRET_PARAMS.contains(&name.as_str())
}

/// The userinfo of a `scheme://userinfo@host/...` URL.
fn userinfo(url: &str) -> Option<&str> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
}

/// Characters that end a URL embedded in text.
fn ends_url(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '"' | '\'' | '<' | '>' | '`' | '\\' | ')' | ']' | '}' | ','
        )
}

/// Replaces the userinfo of every `scheme://userinfo@host` in `text`.
fn scrub_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let authority_len = after
            .find(|c: char| ends_url(c) || matches!(c, '/' | '?' | '#'))
            .unwrap_or(after.len());
        let authority = &after[..authority_len];
        match authority.rfind('@') {
            Some(at) if at > 0 => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &after[authority_len..];
    }
    out.push_str(rest);
    out
}

/// Replaces the values of credential-named query parameters (`?key=`, `&token=`, ...).
fn scrub_query_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['?', '&']) {
        let (before, after) = rest.split_at(at + 1);
        out.push_str(before);
        let name_len = after
            .find(|c: char| c == '=' || c == '&' || c == '?' || ends_url(c))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let tail = &after[name_len..];
        if is_secret_param(name) && tail.starts_with('=') {
            out.push_str(name);
            out.push('=');
            let value = &tail[1..];
            let value_len = if value.starts_with(REDACTED) {
                REDACTED.len()
            } else {
                value
                    .find(|c: char| c == '&' || c == '#' || ends_url(c))
                    .unwrap_or(value.len())
            };
            if value_len > 0 {
                out.push_str(REDACTED);
            }
            rest = &value[value_len..];
        } else {
            out.push_str(name);
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// Replaces the token of `Bearer <token>` (any case).
fn scrub_bearer(text: &str) -> String {
    const WORD: &str = "bearer ";
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut from = 0;
    while let Some(found) = lower[from..].find(WORD) {
        let start = from + found + WORD.len();
        out.push_str(&text[from..start]);
        // Only the word itself: "forbearer " is not a token's prefix.
        let word_start = from + found;
        if text[..word_start]
            .chars()
            .next_back()
            .is_some_and(char::is_alphanumeric)
        {
            from = start;
            continue;
        }
        let token_len = text[start..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';'))
            .unwrap_or(text.len() - start);
        if token_len > 0 && &text[start..start + token_len] != REDACTED {
            out.push_str(REDACTED);
        } else {
            out.push_str(&text[start..start + token_len]);
        }
        from = start + token_len;
    }
    out.push_str(&text[from..]);
    out
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

static SECRETS: RwLock<Redactor> = RwLock::new(Redactor { forms: Vec::new() });

/// Adds secrets to the process-wide set that [`scrub`] removes.
pub fn remember(add: impl FnOnce(&mut Redactor)) {
    let mut secrets = SECRETS
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    add(&mut secrets);
}

/// `text` with every secret this process knows, and every URL credential and bearer
/// token, replaced by [`REDACTED`]. Everything the harness writes goes through this.
pub fn scrub(text: &str) -> String {
    SECRETS
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .scrub(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-proj-Abc123_secret";

    fn with_key() -> Redactor {
        let mut redactor = Redactor::default();
        redactor.add(KEY);
        redactor
    }

    #[test]
    fn a_known_key_is_removed_in_every_form() {
        let redactor = with_key();
        for form in [
            KEY.to_string(),
            STANDARD.encode(KEY),
            URL_SAFE_NO_PAD.encode(KEY),
            hex_lower(KEY.as_bytes()),
            percent_encode(&format!("{KEY}+/")),
        ] {
            let text = format!("Incorrect API key provided: {form}. See the docs.");
            let scrubbed = redactor.scrub(&text);
            assert!(!scrubbed.contains(KEY), "{scrubbed}");
            assert!(!scrubbed.contains(&form), "{form} in {scrubbed}");
            assert!(scrubbed.contains(REDACTED), "{scrubbed}");
        }
        assert_eq!(redactor.scrub("nothing secret here"), "nothing secret here");
    }

    #[test]
    fn short_values_are_not_secrets() {
        let mut redactor = Redactor::default();
        redactor.add("ollama");
        redactor.add("  ");
        assert_eq!(redactor.scrub("ollama ollama"), "ollama ollama");
    }

    #[test]
    fn url_credentials_are_removed_even_when_unknown() {
        let redactor = Redactor::default();
        assert_eq!(
            redactor.scrub("invalid URL \"http://alice:s3cr3t-pw@model.example:8080/v1\": bad"),
            "invalid URL \"http://[redacted]@model.example:8080/v1\": bad"
        );
        assert_eq!(
            redactor.scrub("GET https://x.example/v1?api-key=abcdef123&model=gpt#frag"),
            "GET https://x.example/v1?api-key=[redacted]&model=gpt#frag"
        );
        assert_eq!(
            redactor.scrub("https://x.example/?Token=t0k3n-value, then"),
            "https://x.example/?Token=[redacted], then"
        );
        assert_eq!(
            redactor.scrub("Authorization: Bearer eyJhbGciOi.abc.def rest"),
            "Authorization: Bearer [redacted] rest"
        );
        // Emails and paths are not URLs with userinfo; "bearer" inside a word is no token.
        assert_eq!(
            redactor.scrub("mail bob@example.com at /a?b=c&keys=1, the forbearer said"),
            "mail bob@example.com at /a?b=c&keys=1, the forbearer said"
        );
    }

    #[test]
    fn url_credentials_are_remembered_in_every_form() {
        let mut redactor = Redactor::default();
        redactor.add_url("https://alice:p%40ss-word-9@llm.example/v1?key=qk-123456&x=1");
        let basic = STANDARD.encode("alice:p@ss-word-9");
        for leaked in [
            "p@ss-word-9",
            "p%40ss-word-9",
            "alice:p@ss-word-9",
            basic.as_str(),
            "qk-123456",
        ] {
            let scrubbed = redactor.scrub(&format!("echo: {leaked} end"));
            assert_eq!(scrubbed, format!("echo: {REDACTED} end"), "{leaked}");
        }
    }

    #[test]
    fn secret_looking_variables_are_remembered() {
        let mut redactor = Redactor::default();
        redactor.add_env([
            ("OPENAI_API_KEY", "sk-0123456789"),
            ("GITHUB_TOKEN", "ghp_abcdefgh"),
            ("DB_PASSWORD", "hunter2hunter2"),
            ("HTTPS_PROXY", "http://proxy-user:proxy-pw-1@proxy:3128"),
            ("LOG_LEVEL", "debug-verbose"),
            ("HOME", "/home/agent"),
        ]);
        let text = "sk-0123456789 ghp_abcdefgh hunter2hunter2 proxy-pw-1 debug-verbose /home/agent";
        assert_eq!(
            redactor.scrub(text),
            "[redacted] [redacted] [redacted] [redacted] debug-verbose /home/agent"
        );
    }

    #[test]
    fn scrubbing_is_idempotent_and_keeps_utf8() {
        let redactor = with_key();
        let text = format!("é {KEY} ü http://u:pw@h/ ?token=x Bearer y");
        let once = redactor.scrub(&text);
        assert_eq!(redactor.scrub(&once), once);
        assert_eq!(
            once,
            "é [redacted] ü http://[redacted]@h/ ?token=[redacted] Bearer [redacted]"
        );
    }

    #[test]
    fn the_process_wide_set_scrubs() {
        remember(|secrets| secrets.add("process-wide-secret-1"));
        assert_eq!(scrub("x process-wide-secret-1 y"), "x [redacted] y");
    }
}
