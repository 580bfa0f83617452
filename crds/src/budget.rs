//! Storage budgets of a Session, measured as the JSON bytes that reach etcd.
//!
//! The kube-apiserver stores custom resources as JSON written by Go's encoder, which
//! escapes more than most: control characters become `\u00XX` (6 bytes), and so do `<`,
//! `>`, `&`, U+2028 and U+2029. Every length here is the worst case of that encoder and
//! serde_json's, so a text that fits its budget here fits it in etcd too.

use std::fmt;

use serde_json::Value;

use crate::agent::WebhookLimits;

/// Default budget of a webhook Session's title, in encoded bytes.
pub const DEFAULT_TITLE_BYTES: usize = 16 * 1024;
/// The most `limits.titleBytes` may raise the title budget to.
pub const CEILING_TITLE_BYTES: usize = 64 * 1024;
/// Default budget of the request body kept as the Session's payload, in encoded bytes.
pub const DEFAULT_PAYLOAD_BYTES: usize = 64 * 1024;
/// The most `limits.payloadBytes` may raise the payload budget to.
pub const CEILING_PAYLOAD_BYTES: usize = 256 * 1024;
/// Default budget of a webhook Session's `env` (the whole list), in encoded bytes.
pub const DEFAULT_ENV_BYTES: usize = 16 * 1024;
/// The most `limits.envBytes` may raise the env budget to.
pub const CEILING_ENV_BYTES: usize = 64 * 1024;
/// Default budget of a whole webhook Session object as sent to the cluster.
pub const DEFAULT_SESSION_BYTES: usize = 128 * 1024;
/// The most `limits.sessionBytes` may raise the Session budget to. With the status
/// bounds (events, answer, message) the object stays far below etcd's 1.5 MiB.
pub const CEILING_SESSION_BYTES: usize = 512 * 1024;
/// The smallest value any `limits` field accepts.
pub const MIN_LIMIT_BYTES: usize = 1024;
/// Room for the Session's metadata, trigger and JSON structure around its parts, when
/// the Session budget is derived from the parts' budgets.
const SESSION_OVERHEAD_BYTES: usize = 16 * 1024;

/// The encoded length of one character inside a JSON string.
fn encoded_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => 6,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The bytes of `text` as a JSON string literal, quotes included.
pub fn encoded_str_len(text: &str) -> usize {
    2 + text.chars().map(encoded_char_len).sum::<usize>()
}

/// The bytes of `value` as compact JSON.
pub fn encoded_value_len(value: &Value) -> usize {
    match value {
        Value::Null => 4,
        Value::Bool(true) => 4,
        Value::Bool(false) => 5,
        Value::Number(n) => n.to_string().len(),
        Value::String(s) => encoded_str_len(s),
        Value::Array(items) => {
            2 + items.iter().map(encoded_value_len).sum::<usize>() + items.len().saturating_sub(1)
        }
        Value::Object(fields) => {
            2 + fields
                .iter()
                .map(|(k, v)| encoded_str_len(k) + 1 + encoded_value_len(v))
                .sum::<usize>()
                + fields.len().saturating_sub(1)
        }
    }
}

/// The bytes of any serializable value as compact JSON (`usize::MAX` if it does not
/// serialize, so that it never fits a budget).
pub fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    serde_json::to_value(value).map_or(usize::MAX, |v| encoded_value_len(&v))
}

/// The longest prefix of `text` whose encoded length, quotes excluded, is at most `max`,
/// cut at a character boundary; whether it was cut.
pub fn cut_encoded(text: &str, max: usize) -> (&str, bool) {
    // Fast path: no character costs more than 6 bytes.
    if text.len().saturating_mul(6) <= max {
        return (text, false);
    }
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += encoded_char_len(c);
        if used > max {
            return (&text[..i], true);
        }
    }
    (text, false)
}

/// A part of a Session that has its own budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPart {
    Title,
    Payload,
    Env,
    /// The whole Session object.
    Session,
}

impl BudgetPart {
    /// The part's name in error messages and bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPart::Title => "title",
            BudgetPart::Payload => "payload",
            BudgetPart::Env => "env",
            BudgetPart::Session => "session",
        }
    }

    /// The `limits` field that sets the part's budget.
    pub fn limit_field(self) -> &'static str {
        match self {
            BudgetPart::Title => "titleBytes",
            BudgetPart::Payload => "payloadBytes",
            BudgetPart::Env => "envBytes",
            BudgetPart::Session => "sessionBytes",
        }
    }

    /// The most the part's budget can be raised to.
    pub fn ceiling(self) -> usize {
        match self {
            BudgetPart::Title => CEILING_TITLE_BYTES,
            BudgetPart::Payload => CEILING_PAYLOAD_BYTES,
            BudgetPart::Env => CEILING_ENV_BYTES,
            BudgetPart::Session => CEILING_SESSION_BYTES,
        }
    }
}

/// A part over its budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverBudget {
    pub part: BudgetPart,
    /// The part's encoded size.
    pub bytes: usize,
    /// Its budget.
    pub limit: usize,
}

impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = self.part;
        write!(
            f,
            "{} is {} bytes as stored (JSON-encoded; control characters and <>& take 6 bytes \
             each): at most {} are accepted; the Agent's \
             spec.triggers[].webhook.limits.{} raises this up to {}",
            part.as_str(),
            self.bytes,
            self.limit,
            part.limit_field(),
            part.ceiling()
        )
    }
}

impl std::error::Error for OverBudget {}

/// The budgets of one Agent's webhook Sessions, in encoded bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionBudgets {
    pub title: usize,
    pub payload: usize,
    pub env: usize,
    pub session: usize,
}

impl Default for SessionBudgets {
    fn default() -> Self {
        Self::from_limits(None)
    }
}

impl SessionBudgets {
    /// The budgets an Agent's `limits` ask for, each clamped to its ceiling (the schema
    /// and the validation refuse values outside, so clamping only guards old objects).
    /// Without `sessionBytes` the Session budget is the default or, when the parts were
    /// raised, their sum plus room for the rest of the object.
    pub fn from_limits(limits: Option<&WebhookLimits>) -> Self {
        let pick = |value: Option<i64>, default: usize, ceiling: usize| {
            value
                .and_then(|v| usize::try_from(v).ok())
                .map_or(default, |v| v.clamp(MIN_LIMIT_BYTES, ceiling))
        };
        let title = pick(
            limits.and_then(|l| l.title_bytes),
            DEFAULT_TITLE_BYTES,
            CEILING_TITLE_BYTES,
        );
        let payload = pick(
            limits.and_then(|l| l.payload_bytes),
            DEFAULT_PAYLOAD_BYTES,
            CEILING_PAYLOAD_BYTES,
        );
        let env = pick(
            limits.and_then(|l| l.env_bytes),
            DEFAULT_ENV_BYTES,
            CEILING_ENV_BYTES,
        );
        let derived = (title + payload + env + SESSION_OVERHEAD_BYTES)
            .clamp(DEFAULT_SESSION_BYTES, CEILING_SESSION_BYTES);
        let session = pick(
            limits.and_then(|l| l.session_bytes),
            derived,
            CEILING_SESSION_BYTES,
        );
        Self {
            title,
            payload,
            env,
            session,
        }
    }

    fn check(part: BudgetPart, bytes: usize, limit: usize) -> Result<(), OverBudget> {
        if bytes > limit {
            Err(OverBudget { part, bytes, limit })
        } else {
            Ok(())
        }
    }

    /// Checks a caller's title (its encoded length, quotes excluded).
    pub fn check_title(&self, title: &str) -> Result<(), OverBudget> {
        Self::check(BudgetPart::Title, encoded_str_len(title) - 2, self.title)
    }

    /// Checks the payload kept on the Session (its encoded length, quotes excluded).
    pub fn check_payload(&self, payload: &str) -> Result<(), OverBudget> {
        Self::check(
            BudgetPart::Payload,
            encoded_str_len(payload) - 2,
            self.payload,
        )
    }

    /// Checks a Session's env list, as encoded in the object.
    pub fn check_env<T: serde::Serialize>(&self, env: &[T]) -> Result<(), OverBudget> {
        if env.is_empty() {
            return Ok(());
        }
        Self::check(BudgetPart::Env, encoded_len(&env), self.env)
    }

    /// Checks the whole object as it is sent to the cluster.
    pub fn check_session<T: serde::Serialize>(&self, session: &T) -> Result<(), OverBudget> {
        Self::check(BudgetPart::Session, encoded_len(session), self.session)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn escapes_cost_what_go_writes() {
        assert_eq!(encoded_str_len(""), 2);
        assert_eq!(encoded_str_len("abc"), 5);
        assert_eq!(encoded_str_len("\u{1}"), 8);
        assert_eq!(encoded_str_len("\n\"\\"), 8);
        assert_eq!(encoded_str_len("<&>"), 20);
        assert_eq!(encoded_str_len("é"), 4);
        assert_eq!(encoded_str_len("\u{2028}"), 8);
        let controls = "\u{0}".repeat(1000);
        assert_eq!(encoded_str_len(&controls), 6002);
    }

    #[test]
    fn values_are_measured_compactly() {
        let value = json!({"a": [1, true, null, "x"], "b": {"c": false}});
        assert_eq!(
            encoded_value_len(&value),
            serde_json::to_vec(&value).expect("json").len()
        );
    }

    #[test]
    fn cut_keeps_whole_characters_within_the_budget() {
        assert_eq!(cut_encoded("hello", 3), ("hel", true));
        assert_eq!(cut_encoded("hello", 5), ("hello", false));
        assert_eq!(cut_encoded("a\u{1}b", 6), ("a", true));
        assert_eq!(cut_encoded("a\u{1}b", 7), ("a\u{1}", true));
        assert_eq!(cut_encoded("éé", 3), ("é", true));
    }

    #[test]
    fn defaults_and_limits() {
        let budgets = SessionBudgets::default();
        assert_eq!(
            budgets,
            SessionBudgets {
                title: DEFAULT_TITLE_BYTES,
                payload: DEFAULT_PAYLOAD_BYTES,
                env: DEFAULT_ENV_BYTES,
                session: DEFAULT_SESSION_BYTES,
            }
        );
        let raised = SessionBudgets::from_limits(Some(&WebhookLimits {
            title_bytes: Some(CEILING_TITLE_BYTES as i64),
            payload_bytes: Some(CEILING_PAYLOAD_BYTES as i64),
            env_bytes: Some(i64::MAX),
            session_bytes: None,
        }));
        assert_eq!(raised.env, CEILING_ENV_BYTES);
        // The parts at their ceilings, plus room for the rest of the object.
        assert_eq!(raised.session, 400 * 1024);
        let lowered = SessionBudgets::from_limits(Some(&WebhookLimits {
            title_bytes: Some(2048),
            session_bytes: Some(1),
            ..WebhookLimits::default()
        }));
        assert_eq!(lowered.title, 2048);
        assert_eq!(lowered.session, MIN_LIMIT_BYTES);
    }

    #[test]
    fn the_schema_bounds_are_the_ceilings() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(crate::Agent::crd()).expect("json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let webhook = &spec["properties"]["triggers"]["items"]["properties"]["webhook"];
        let limits = &webhook["properties"]["limits"]["properties"];
        for part in [
            BudgetPart::Title,
            BudgetPart::Payload,
            BudgetPart::Env,
            BudgetPart::Session,
        ] {
            let field = &limits[part.limit_field()];
            assert_eq!(field["maximum"].as_f64(), Some(part.ceiling() as f64));
            assert_eq!(field["minimum"].as_f64(), Some(MIN_LIMIT_BYTES as f64));
        }
        let allowed = &webhook["properties"]["allowedEnv"];
        assert_eq!(
            allowed["maxItems"].as_u64(),
            Some(crate::agent::MAX_ALLOWED_ENV as u64)
        );
    }

    #[test]
    fn a_title_of_control_characters_is_measured_encoded() {
        let budgets = SessionBudgets::default();
        // 4 KiB of raw bytes, 24 KiB in etcd.
        let title = "\u{7}".repeat(4096);
        let err = budgets.check_title(&title).expect_err("over budget");
        assert_eq!(err.part, BudgetPart::Title);
        assert_eq!(err.bytes, 6 * 4096);
        assert!(err.to_string().contains("titleBytes"), "{err}");
        assert!(
            budgets
                .check_title(&"x".repeat(DEFAULT_TITLE_BYTES))
                .is_ok()
        );
    }

    proptest! {
        #[test]
        fn never_below_what_serde_json_writes(text in ".{0,64}", raw in proptest::collection::vec(any::<char>(), 0..64)) {
            let raw: String = raw.into_iter().collect();
            for s in [text, raw] {
                let serde = serde_json::to_string(&s).expect("json").len();
                prop_assert!(encoded_str_len(&s) >= serde);
                let (cut, was_cut) = cut_encoded(&s, 17);
                prop_assert!(encoded_str_len(cut) - 2 <= 17);
                prop_assert!(s.starts_with(cut));
                prop_assert_eq!(was_cut, cut.len() < s.len());
            }
        }
    }
}
