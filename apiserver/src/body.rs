//! The JSON body of a generic webhook (`title`, `env`, `wait`, `idempotency_key`), the
//! `Prefer: wait=` header, and what a Session keeps of the raw body (digest and a bounded
//! copy). A request's body is read once and parsed as JSON at most once
//! ([`RequestBody`]): the signature schemes, the Slack challenge, the generic fields and
//! the provider titles all read the same parsed value.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::time::Duration;

use hookrun_crds::session::SessionEnvVar;
use hookrun_crds::validation::check_env_name;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The most `env` entries a webhook may set.
pub const MAX_ENV_ENTRIES: usize = 64;
/// The longest `env[].value`, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// The longest idempotency key, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 256;
/// How long `"wait": true` waits.
pub(crate) const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The longest wait a caller may ask for; longer asks are cut to it.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// Whether the caller waits for the agent's answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitMode {
    /// Answer as soon as the Session is stored.
    #[default]
    FireAndForget,
    /// Hold the request up to this long for the answer.
    Wait(Duration),
}

impl WaitMode {
    /// `0` is fire-and-forget; anything longer than [`MAX_WAIT`] is cut to it.
    pub(crate) fn from_seconds(seconds: u64) -> Self {
        if seconds == 0 {
            WaitMode::FireAndForget
        } else {
            WaitMode::Wait(Duration::from_secs(seconds).min(MAX_WAIT))
        }
    }
}

/// What a generic webhook's body asks for. Unknown fields are ignored, because platforms
/// send their own.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WebhookBody {
    /// The Session's title, when the caller gave a non-blank one.
    pub title: Option<String>,
    /// Per-session environment variables.
    pub env: Vec<SessionEnvVar>,
    /// Whether to wait for the answer.
    pub wait: WaitMode,
    /// The caller's idempotency key.
    pub idempotency_key: Option<String>,
    /// Where the caller wants the signed completion callback (checked against the
    /// Agent's `spec.callbackPolicy` by the caller of this parser).
    pub callback_url: Option<String>,
}

/// A body field that cannot be accepted: the field's path (`env[2].name`, or `body` for
/// the whole) and what would be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BodyError {
    /// The path of the field.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl BodyError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A request's raw body and its JSON value, parsed on first use and then shared by every
/// reader, so a body is parsed at most once however many steps read its fields. Bytes
/// that are not JSON parse once too: the error is kept.
pub struct RequestBody<'a> {
    raw: &'a [u8],
    json: OnceCell<Result<Value, serde_json::Error>>,
}

impl<'a> RequestBody<'a> {
    /// The body as received; nothing is parsed yet.
    pub fn new(raw: &'a [u8]) -> Self {
        Self {
            raw,
            json: OnceCell::new(),
        }
    }

    /// `raw` with what [`Self::into_parsed`] gave of an earlier view of the same bytes.
    pub(crate) fn with_parsed(
        raw: &'a [u8],
        parsed: Option<Result<Value, serde_json::Error>>,
    ) -> Self {
        let json = OnceCell::new();
        if let Some(parsed) = parsed {
            let _ = json.set(parsed);
        }
        Self { raw, json }
    }

    /// What has been parsed so far, to hand to the next view of the same bytes.
    pub(crate) fn into_parsed(self) -> Option<Result<Value, serde_json::Error>> {
        self.json.into_inner()
    }

    /// The bytes as received (what signatures cover).
    pub fn bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// The body as JSON, parsed on the first call.
    pub fn json(&self) -> Result<&Value, &serde_json::Error> {
        self.json
            .get_or_init(|| serde_json::from_slice(self.raw))
            .as_ref()
    }

    /// Whether the body has been parsed.
    #[cfg(test)]
    pub(crate) fn is_parsed(&self) -> bool {
        self.json.get().is_some()
    }
}

impl std::fmt::Debug for RequestBody<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The content can be anything a caller sent: its size only.
        f.debug_struct("RequestBody")
            .field("bytes", &self.raw.len())
            .finish()
    }
}

/// Parses a generic webhook body. An empty (or all-whitespace) body is all defaults;
/// `null` field values count as absent. The first problem is reported.
pub fn parse_webhook_body(body: &[u8]) -> Result<WebhookBody, BodyError> {
    webhook_fields(&RequestBody::new(body))
}

/// [`parse_webhook_body`] of a body whose JSON other steps read too.
pub fn webhook_fields(body: &RequestBody<'_>) -> Result<WebhookBody, BodyError> {
    if body.bytes().iter().all(u8::is_ascii_whitespace) {
        return Ok(WebhookBody::default());
    }
    let value = body.json().map_err(|e| {
        BodyError::new(
            "body",
            format!(
                "is not valid JSON ({e}): send a JSON object such as \
                 {{\"title\": \"...\"}}, or an empty body"
            ),
        )
    })?;
    let Value::Object(object) = value else {
        return Err(BodyError::new(
            "body",
            "must be a JSON object such as {\"title\": \"...\"}, or empty",
        ));
    };
    Ok(WebhookBody {
        title: parse_title(object)?,
        env: parse_env(object)?,
        wait: parse_wait(object)?,
        idempotency_key: match field(object, "idempotency_key") {
            None => None,
            Some(Value::String(key)) => Some(check_idempotency_key("idempotency_key", key)?),
            Some(_) => {
                return Err(BodyError::new(
                    "idempotency_key",
                    "must be a string of 1 to 256 characters",
                ));
            }
        },
        callback_url: parse_callback_url(object)?,
    })
}

fn parse_callback_url(object: &Map<String, Value>) -> Result<Option<String>, BodyError> {
    use hookrun_crds::callback::MAX_CALLBACK_URL_LEN;
    match field(object, "callbackUrl") {
        None => Ok(None),
        Some(Value::String(url))
            if !url.is_empty()
                && url.len() <= MAX_CALLBACK_URL_LEN
                && !url.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            Ok(Some(url.clone()))
        }
        Some(_) => Err(BodyError::new(
            "callbackUrl",
            format!(
                "must be an http(s) URL of 1 to {MAX_CALLBACK_URL_LEN} characters without                  spaces, within the Agent's spec.callbackPolicy.allowedUrlPrefixes"
            ),
        )),
    }
}

/// Checks an idempotency key from the body or the `Idempotency-Key` header (`field` names
/// which): 1 to 256 characters, no control characters.
pub fn check_idempotency_key(field: &str, key: &str) -> Result<String, BodyError> {
    let count = key.chars().count();
    if count == 0 || count > MAX_IDEMPOTENCY_KEY_CHARS {
        return Err(BodyError::new(
            field,
            format!("has {count} characters: use 1 to {MAX_IDEMPOTENCY_KEY_CHARS}"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(BodyError::new(
            field,
            "contains control characters: use printable text such as a UUID",
        ));
    }
    Ok(key.to_owned())
}

/// A field's value, with `null` meaning absent.
fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    object.get(name).filter(|v| !v.is_null())
}

fn parse_title(object: &Map<String, Value>) -> Result<Option<String>, BodyError> {
    match field(object, "title") {
        None => Ok(None),
        Some(Value::String(title)) if title.trim().is_empty() => Ok(None),
        Some(Value::String(title)) => Ok(Some(title.clone())),
        Some(_) => Err(BodyError::new("title", "must be a string")),
    }
}

fn parse_env(object: &Map<String, Value>) -> Result<Vec<SessionEnvVar>, BodyError> {
    let entries = match field(object, "env") {
        None => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(BodyError::new(
                "env",
                "must be a list such as [{\"name\": \"LOG_LEVEL\", \"value\": \"debug\"}]",
            ));
        }
    };
    if entries.len() > MAX_ENV_ENTRIES {
        return Err(BodyError::new(
            "env",
            format!(
                "has {} entries: at most {MAX_ENV_ENTRIES} are accepted",
                entries.len()
            ),
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut env = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("env[{i}]");
        let Value::Object(entry) = entry else {
            return Err(BodyError::new(
                at,
                "must be an object such as {\"name\": \"LOG_LEVEL\", \"value\": \"debug\"}",
            ));
        };
        let name = match entry.get("name") {
            Some(Value::String(name)) => name,
            _ => {
                return Err(BodyError::new(
                    format!("{at}.name"),
                    "must be a string: letters, digits and _, not starting with a digit",
                ));
            }
        };
        check_env_name(name).map_err(|message| BodyError::new(format!("{at}.name"), message))?;
        if let Some(first) = seen.insert(name, i) {
            return Err(BodyError::new(
                format!("{at}.name"),
                format!("{name:?} is already set by env[{first}]: set each variable once"),
            ));
        }
        let value = match entry.get("value") {
            Some(Value::String(value)) => value,
            _ => {
                return Err(BodyError::new(
                    format!("{at}.value"),
                    "must be a string (quote numbers and booleans)",
                ));
            }
        };
        if value.len() > MAX_ENV_VALUE_BYTES {
            return Err(BodyError::new(
                format!("{at}.value"),
                format!(
                    "is {} bytes: at most {MAX_ENV_VALUE_BYTES} are accepted",
                    value.len()
                ),
            ));
        }
        env.push(SessionEnvVar {
            name: name.clone(),
            value: value.clone(),
        });
    }
    Ok(env)
}

fn parse_wait(object: &Map<String, Value>) -> Result<WaitMode, BodyError> {
    const ACCEPTED: &str = "use true (wait 300 s), a whole number of seconds from 0 to 600, \
                            or false for fire-and-forget";
    match field(object, "wait") {
        None | Some(Value::Bool(false)) => Ok(WaitMode::FireAndForget),
        Some(Value::Bool(true)) => Ok(WaitMode::Wait(DEFAULT_WAIT)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(seconds) => Ok(WaitMode::from_seconds(seconds)),
            None => Err(BodyError::new(
                "wait",
                format!("{n} is not accepted: {ACCEPTED}"),
            )),
        },
        Some(_) => Err(BodyError::new(
            "wait",
            format!("must be a boolean or a number: {ACCEPTED}"),
        )),
    }
}

/// The wait an RFC 7240 `Prefer` header asks for (`Prefer: wait=30`, possibly among other
/// preferences such as `respond-async, wait=30`). `None` when there is no readable
/// `wait` preference: per the RFC, a preference that cannot be honoured is ignored.
pub fn parse_prefer_wait(value: &str) -> Option<WaitMode> {
    value.split(',').find_map(|preference| {
        // Parameters after `;` belong to the preference and do not change its value.
        let head = preference.split(';').next()?.trim();
        let (token, seconds) = head.split_once('=')?;
        if !token.trim().eq_ignore_ascii_case("wait") {
            return None;
        }
        let seconds = seconds.trim().trim_matches('"');
        if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Huge values are still a wish to wait long: saturate rather than ignore.
        let seconds = seconds.parse::<u64>().unwrap_or(u64::MAX);
        Some(WaitMode::from_seconds(seconds))
    })
}

/// `sha256:<hex>` of the raw body: what tells a replay from a conflicting reuse of an
/// idempotency key.
pub(crate) fn payload_digest(body: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(body)))
}

/// The body as the text a Session keeps for the harness: bytes that are not UTF-8 are
/// replaced with U+FFFD. Its size is checked against the Agent's payload budget.
pub(crate) fn payload_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<WebhookBody, BodyError> {
        parse_webhook_body(body.as_bytes())
    }

    fn field_of(body: &str) -> String {
        parse(body).expect_err("the body is refused").field
    }

    #[test]
    fn empty_body_is_all_defaults() {
        assert_eq!(parse(""), Ok(WebhookBody::default()));
        assert_eq!(parse(" \n"), Ok(WebhookBody::default()));
        assert_eq!(parse("{}"), Ok(WebhookBody::default()));
    }

    #[test]
    fn full_body() {
        let got = parse(
            r#"{"title":"Summarize","env":[{"name":"LOG_LEVEL","value":"debug"}],
                "wait":30,"idempotency_key":"k-1","extra":{"ignored":true}}"#,
        )
        .expect("accepted");
        assert_eq!(got.title.as_deref(), Some("Summarize"));
        assert_eq!(
            got.env,
            [SessionEnvVar {
                name: "LOG_LEVEL".into(),
                value: "debug".into()
            }]
        );
        assert_eq!(got.wait, WaitMode::Wait(Duration::from_secs(30)));
        assert_eq!(got.idempotency_key.as_deref(), Some("k-1"));
    }

    #[test]
    fn nulls_and_blank_titles_are_absent() {
        let got = parse(r#"{"title":null,"env":null,"wait":null,"idempotency_key":null}"#);
        assert_eq!(got, Ok(WebhookBody::default()));
        assert_eq!(parse(r#"{"title":"  "}"#), Ok(WebhookBody::default()));
    }

    #[test]
    fn non_json_and_non_objects_name_the_body() {
        for body in ["not json", "{", "[1]", "\"x\"", "null", "42"] {
            let err = parse(body).expect_err(body);
            assert_eq!(err.field, "body", "{body}");
            assert!(err.message.contains("JSON object"), "{err}");
        }
        assert_eq!(
            parse_webhook_body(b"\xff\xfe").expect_err("binary").field,
            "body"
        );
    }

    #[test]
    fn wait_forms() {
        let wait = |v: &str| parse(&format!(r#"{{"wait":{v}}}"#)).map(|b| b.wait);
        assert_eq!(wait("true"), Ok(WaitMode::Wait(DEFAULT_WAIT)));
        assert_eq!(wait("false"), Ok(WaitMode::FireAndForget));
        assert_eq!(wait("0"), Ok(WaitMode::FireAndForget));
        assert_eq!(wait("1"), Ok(WaitMode::Wait(Duration::from_secs(1))));
        assert_eq!(wait("600"), Ok(WaitMode::Wait(MAX_WAIT)));
        assert_eq!(wait("601"), Ok(WaitMode::Wait(MAX_WAIT)));
        assert_eq!(wait("18446744073709551615"), Ok(WaitMode::Wait(MAX_WAIT)));
        for bad in ["-1", "1.5", "\"30\"", "[]", "{}", "1e3"] {
            let err = wait(bad).expect_err(bad);
            assert_eq!(err.field, "wait", "{bad}");
            assert!(err.message.contains("true"), "{err}");
        }
    }

    #[test]
    fn title_type() {
        assert_eq!(field_of(r#"{"title":5}"#), "title");
        // Its size is the Agent's title budget's business (413), not the parser's.
        let long = format!(r#"{{"title":"{}"}}"#, "x".repeat(100_000));
        assert!(parse(&long).is_ok());
    }

    #[test]
    fn env_errors_name_the_entry() {
        let cases = [
            (r#"{"env":{}}"#, "env"),
            (r#"{"env":[1]}"#, "env[0]"),
            (r#"{"env":[{"value":"x"}]}"#, "env[0].name"),
            (
                r#"{"env":[{"name":"OK","value":"x"},{"name":"OK2","value":"y"},{"name":"1X","value":"z"}]}"#,
                "env[2].name",
            ),
            (
                r#"{"env":[{"name":"HOOKRUN_TOKEN","value":"x"}]}"#,
                "env[0].name",
            ),
            (r#"{"env":[{"name":"A","value":1}]}"#, "env[0].value"),
            (r#"{"env":[{"name":"A"}]}"#, "env[0].value"),
            (
                r#"{"env":[{"name":"A","value":"1"},{"name":"A","value":"2"}]}"#,
                "env[1].name",
            ),
        ];
        for (body, want) in cases {
            assert_eq!(field_of(body), want, "{body}");
        }
        let err = parse(r#"{"env":[{"name":"HOOKRUN_X","value":"x"}]}"#).expect_err("reserved");
        assert!(err.message.contains("reserved"), "{err}");
    }

    #[test]
    fn env_bounds() {
        let entries: Vec<String> = (0..=MAX_ENV_ENTRIES)
            .map(|i| format!(r#"{{"name":"V{i}","value":""}}"#))
            .collect();
        let too_many = format!(r#"{{"env":[{}]}}"#, entries.join(","));
        assert_eq!(field_of(&too_many), "env");
        let just_enough = format!(r#"{{"env":[{}]}}"#, entries[1..].join(","));
        assert_eq!(
            parse(&just_enough).map(|b| b.env.len()),
            Ok(MAX_ENV_ENTRIES)
        );

        let big = format!(
            r#"{{"env":[{{"name":"A","value":"{}"}}]}}"#,
            "v".repeat(MAX_ENV_VALUE_BYTES + 1)
        );
        assert_eq!(field_of(&big), "env[0].value");
        let fits = format!(
            r#"{{"env":[{{"name":"A","value":"{}"}}]}}"#,
            "v".repeat(MAX_ENV_VALUE_BYTES)
        );
        assert!(parse(&fits).is_ok());
    }

    #[test]
    fn idempotency_key_bounds() {
        assert_eq!(field_of(r#"{"idempotency_key":""}"#), "idempotency_key");
        assert_eq!(field_of(r#"{"idempotency_key":7}"#), "idempotency_key");
        assert_eq!(field_of(r#"{"idempotency_key":"a\nb"}"#), "idempotency_key");
        let max = "é".repeat(MAX_IDEMPOTENCY_KEY_CHARS);
        assert!(parse(&format!(r#"{{"idempotency_key":"{max}"}}"#)).is_ok());
        let over = "é".repeat(MAX_IDEMPOTENCY_KEY_CHARS + 1);
        assert_eq!(
            field_of(&format!(r#"{{"idempotency_key":"{over}"}}"#)),
            "idempotency_key"
        );
        let err = check_idempotency_key("Idempotency-Key", "").expect_err("empty");
        assert_eq!(err.field, "Idempotency-Key");
    }

    #[test]
    fn prefer_wait() {
        let secs = |s| Some(WaitMode::Wait(Duration::from_secs(s)));
        assert_eq!(parse_prefer_wait("wait=30"), secs(30));
        assert_eq!(parse_prefer_wait("respond-async, wait=100"), secs(100));
        assert_eq!(parse_prefer_wait("WAIT = 5"), secs(5));
        assert_eq!(parse_prefer_wait("wait=\"7\""), secs(7));
        assert_eq!(parse_prefer_wait("wait=9; foo=bar"), secs(9));
        assert_eq!(parse_prefer_wait("wait=0"), Some(WaitMode::FireAndForget));
        assert_eq!(
            parse_prefer_wait("wait=100000"),
            Some(WaitMode::Wait(MAX_WAIT))
        );
        assert_eq!(
            parse_prefer_wait("wait=99999999999999999999999"),
            Some(WaitMode::Wait(MAX_WAIT))
        );
        assert_eq!(parse_prefer_wait("respond-async"), None);
        assert_eq!(parse_prefer_wait("wait=-1"), None);
        assert_eq!(parse_prefer_wait("wait=soon"), None);
        assert_eq!(parse_prefer_wait("wait="), None);
        assert_eq!(parse_prefer_wait("handling=lenient"), None);
        assert_eq!(parse_prefer_wait("wait=x, wait=3"), secs(3));
    }

    #[test]
    fn a_body_is_parsed_once_and_only_when_read() {
        let body = RequestBody::new(br#"{"title":"t","webhookTimestamp":5}"#);
        assert!(!body.is_parsed(), "nothing is parsed before a reader asks");
        assert_eq!(body.bytes(), br#"{"title":"t","webhookTimestamp":5}"#);
        assert!(!body.is_parsed());
        let first = body.json().expect("JSON") as *const Value;
        assert!(body.is_parsed());
        let fields = webhook_fields(&body).expect("accepted");
        assert_eq!(fields.title.as_deref(), Some("t"));
        // Every later reader gets the same parsed value, not a new parse.
        assert_eq!(body.json().expect("JSON") as *const Value, first);
        // Bytes that are not JSON are parsed once too, and the error kept.
        let junk = RequestBody::new(b"{nope");
        assert!(junk.json().is_err());
        assert!(junk.is_parsed());
        assert_eq!(webhook_fields(&junk).expect_err("refused").field, "body");
        // An empty body is all defaults without parsing.
        let empty = RequestBody::new(b"  ");
        assert_eq!(webhook_fields(&empty), Ok(WebhookBody::default()));
        assert!(!empty.is_parsed());
    }

    #[test]
    fn digest_matches_sha256sum() {
        // printf '%s' '{"title":"nightly"}' | sha256sum
        assert_eq!(
            payload_digest(br#"{"title":"nightly"}"#),
            "sha256:ddcae1bd8f74db67a19810d5c2d0cf21c9aa0d0dc3576d29df29fcf9fc3411fb"
        );
        // printf '' | sha256sum
        assert_eq!(
            payload_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn payload_text_keeps_the_whole_body() {
        assert_eq!(payload_text(br#"{"a":1}"#), r#"{"a":1}"#);
        assert_eq!(payload_text(b"ok\xffok"), "ok\u{FFFD}ok");
        let big = "é".repeat(100_000);
        assert_eq!(payload_text(big.as_bytes()), big);
    }
}
