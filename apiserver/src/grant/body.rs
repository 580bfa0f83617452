//! The JSON body of `POST /hook`: `{"message": required, "from": optional,
//! "idempotency_key": optional}`, checked field by field. Unknown fields are refused, so
//! a typo (`mesage`) is not silently an empty input.

use hookrun_crds::budget::encoded_str_len;
use hookrun_crds::grant::input_content;
use hookrun_crds::session::MAX_EVENT_CONTENT_BYTES;
use serde_json::Value;

use crate::body::{BodyError, check_idempotency_key};

/// The largest `/hook` body read; more is 413 without reading further.
pub const MAX_HOOK_BODY_BYTES: usize = 64 * 1024;
/// The longest `from`, in characters.
pub const MAX_FROM_CHARS: usize = 128;

/// What a hook body asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookBody {
    /// The message, not blank.
    pub message: String,
    /// The sender shown as `[from] message`.
    pub from: Option<String>,
    /// The caller's idempotency key: the same key is one input.
    pub idempotency_key: Option<String>,
}

impl HookBody {
    /// The Session event content: the message, prefixed `[from] ` when a sender is named.
    pub fn content(&self) -> String {
        input_content(&self.message, self.from.as_deref())
    }
}

/// Why a hook body cannot be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookBodyError {
    /// 400: a field is missing or wrong; the error names it.
    #[error(transparent)]
    Bad(BodyError),
    /// 413: `field` is larger than the Session stores.
    #[error(
        "{field}: larger than {limit} bytes as stored (JSON-encoded, with the sender); send less"
    )]
    TooLarge { field: &'static str, limit: usize },
}

fn bad(field: &str, message: &str) -> HookBodyError {
    HookBodyError::Bad(BodyError {
        field: field.to_owned(),
        message: message.to_owned(),
    })
}

/// Parses and checks a hook body.
pub fn parse_hook_body(bytes: &[u8]) -> Result<HookBody, HookBodyError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| {
        bad(
            "body",
            "is not JSON: send an object such as {\"message\": \"hello\"}",
        )
    })?;
    let Value::Object(object) = value else {
        return Err(bad(
            "body",
            "must be a JSON object such as {\"message\": \"hello\"}",
        ));
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "message" | "from" | "idempotency_key"))
    {
        return Err(bad(
            "body",
            &format!(
                "unknown field {:?}: accepted are message, from and idempotency_key",
                unknown.chars().take(64).collect::<String>()
            ),
        ));
    }
    let message = match object.get("message") {
        None | Some(Value::Null) => {
            return Err(bad("message", "is required: a non-empty string"));
        }
        Some(Value::String(m)) if m.trim().is_empty() => {
            return Err(bad("message", "is blank: send a non-empty string"));
        }
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(bad("message", "must be a string")),
    };
    let from = match object.get("from") {
        None | Some(Value::Null) => None,
        Some(Value::String(f)) if f.chars().count() > MAX_FROM_CHARS => {
            return Err(bad(
                "from",
                &format!("is longer than {MAX_FROM_CHARS} characters"),
            ));
        }
        Some(Value::String(f)) if f.chars().any(char::is_control) => {
            return Err(bad("from", "contains control characters"));
        }
        Some(Value::String(f)) if f.trim().is_empty() => None,
        Some(Value::String(f)) => Some(f.trim().to_owned()),
        Some(_) => return Err(bad("from", "must be a string")),
    };
    let idempotency_key = match object.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => {
            Some(check_idempotency_key("idempotency_key", k).map_err(HookBodyError::Bad)?)
        }
        Some(_) => {
            return Err(bad(
                "idempotency_key",
                "must be a string of 1 to 256 characters",
            ));
        }
    };
    let body = HookBody {
        message,
        from,
        idempotency_key,
    };
    if encoded_str_len(&body.content()) > MAX_EVENT_CONTENT_BYTES {
        return Err(HookBodyError::TooLarge {
            field: "message",
            limit: MAX_EVENT_CONTENT_BYTES,
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(error: HookBodyError) -> String {
        match error {
            HookBodyError::Bad(e) => e.field,
            HookBodyError::TooLarge { field, .. } => field.to_owned(),
        }
    }

    #[test]
    fn a_message_with_sender_and_key_parses() {
        let body = parse_hook_body(
            br#"{"message": "deploy done", "from": " ci ", "idempotency_key": "run-7"}"#,
        )
        .expect("valid");
        assert_eq!(body.message, "deploy done");
        assert_eq!(body.from.as_deref(), Some("ci"));
        assert_eq!(body.idempotency_key.as_deref(), Some("run-7"));
        assert_eq!(body.content(), "[ci] deploy done");
        let bare = parse_hook_body(br#"{"message": "hi", "from": null}"#).expect("valid");
        assert_eq!(bare.content(), "hi");
    }

    #[test]
    fn each_refusal_names_its_field() {
        for (body, field) in [
            (&b"not json"[..], "body"),
            (br#"["message"]"#, "body"),
            (br#"{}"#, "message"),
            (br#"{"message": null}"#, "message"),
            (br#"{"message": "  "}"#, "message"),
            (br#"{"message": 7}"#, "message"),
            (br#"{"message": "a", "from": 1}"#, "from"),
            (br#"{"message": "a", "from": "a\nb"}"#, "from"),
            (
                br#"{"message": "a", "idempotency_key": ""}"#,
                "idempotency_key",
            ),
            (
                br#"{"message": "a", "idempotency_key": 5}"#,
                "idempotency_key",
            ),
            (br#"{"message": "a", "title": "x"}"#, "body"),
        ] {
            let error = parse_hook_body(body).expect_err("refused");
            assert!(matches!(error, HookBodyError::Bad(_)), "{error:?}");
            assert_eq!(field_of(error), field, "{}", String::from_utf8_lossy(body));
        }
        let long_from = format!(r#"{{"message": "a", "from": "{}"}}"#, "f".repeat(129));
        assert_eq!(
            field_of(parse_hook_body(long_from.as_bytes()).expect_err("refused")),
            "from"
        );
    }

    #[test]
    fn a_message_over_the_event_budget_is_too_large() {
        let fits = "m".repeat(MAX_EVENT_CONTENT_BYTES - 2);
        assert!(
            parse_hook_body(serde_json::json!({"message": fits}).to_string().as_bytes()).is_ok()
        );
        let over = "m".repeat(MAX_EVENT_CONTENT_BYTES - 1);
        assert_eq!(
            parse_hook_body(serde_json::json!({"message": over}).to_string().as_bytes()),
            Err(HookBodyError::TooLarge {
                field: "message",
                limit: MAX_EVENT_CONTENT_BYTES
            })
        );
        // Control characters cost six bytes each as stored.
        let escaped = "\u{1}".repeat(MAX_EVENT_CONTENT_BYTES / 6 + 1);
        assert!(matches!(
            parse_hook_body(
                serde_json::json!({"message": escaped})
                    .to_string()
                    .as_bytes()
            ),
            Err(HookBodyError::TooLarge { .. })
        ));
    }
}
