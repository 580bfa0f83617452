//! The Anthropic Messages API (`POST {base}/v1/messages`): the request the harness sends
//! and how it reads the answer and the error body. Pure functions over JSON.

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiKey;

/// The API version header value the request and response shapes below follow.
pub const API_VERSION: &str = "2023-06-01";
/// The default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The endpoint under a base URL.
pub fn url(base: &str) -> String {
    format!("{}/v1/messages", base.trim_end_matches('/'))
}

/// `x-api-key` (marked sensitive) and `anthropic-version`.
pub fn headers(key: &ApiKey) -> Vec<(HeaderName, HeaderValue)> {
    vec![
        (HeaderName::from_static("x-api-key"), key.header_value()),
        (
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        ),
    ]
}

/// The conversation so far (the title first, then each turn's reply and the next
/// input) under the Agent's system prompt.
pub fn request_body(
    model: &str,
    system: Option<&str>,
    messages: &[super::ChatMessage],
    max_tokens: u32,
) -> Value {
    let messages: Vec<Value> = messages.iter().map(super::ChatMessage::to_json).collect();
    let mut body = json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": messages,
    });
    if let Some(system) = system.filter(|s| !s.trim().is_empty()) {
        body["system"] = Value::String(system.to_string());
    }
    body
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Vec<ContentBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// The text of a 200 answer: its `text` content blocks joined; other blocks (thinking,
/// tool use) are skipped. An answer with no text is an error that says why.
pub fn answer(body: &[u8]) -> Result<String, String> {
    let message: Message = serde_json::from_slice(body).map_err(|error| {
        format!(
            "the answer is not a Messages API message: {}",
            super::quote_cut(&error.to_string())
        )
    })?;
    let text: String = message
        .content
        .iter()
        .filter(|block| block.kind == "text")
        .filter_map(|block| block.text.as_deref())
        .collect();
    if text.trim().is_empty() {
        return Err(format!(
            "the model answered with no text (stop_reason: {})",
            super::quote_cut(message.stop_reason.as_deref().unwrap_or("none"))
        ));
    }
    Ok(text)
}

/// `"<error.type>: <error.message>"` from an error body
/// (`{"type":"error","error":{"type":...,"message":...}}`).
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?;
    let message = error.get("message")?.as_str()?;
    Some(match error.get("type").and_then(Value::as_str) {
        Some(kind) => format!("{kind}: {message}"),
        None => message.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_has_the_documented_shape() {
        let body = request_body(
            "claude-sonnet-4-6",
            Some("Be brief."),
            &[super::super::ChatMessage::user("hello")],
            1024,
        );
        assert_eq!(
            body,
            json!({
                "model": "claude-sonnet-4-6",
                "max_tokens": 1024,
                "system": "Be brief.",
                "messages": [{"role": "user", "content": "hello"}]
            })
        );
        let body = request_body("m", None, &[super::super::ChatMessage::user("t")], 1);
        assert!(body.get("system").is_none());
        let body = request_body(
            "m",
            Some("  \n"),
            &[super::super::ChatMessage::user("t")],
            1,
        );
        assert!(body.get("system").is_none());
    }

    #[test]
    fn answer_joins_text_blocks_and_skips_others() {
        let body = json!({
            "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "x"},
                {"type": "text", "text": "Hi! "},
                {"type": "text", "text": "My name is Claude."}
            ],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 2095, "output_tokens": 503}
        });
        let text = answer(body.to_string().as_bytes()).expect("text");
        assert_eq!(text, "Hi! My name is Claude.");
    }

    #[test]
    fn an_answer_without_text_says_why() {
        let body = json!({"type": "message", "content": [], "stop_reason": "refusal"});
        let error = answer(body.to_string().as_bytes()).expect_err("no text");
        assert!(error.contains("refusal"), "{error}");
        assert!(answer(b"not json").is_err());
    }

    #[test]
    fn error_body_gives_type_and_message() {
        let body = json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"
        });
        assert_eq!(
            error_message(body.to_string().as_bytes()).as_deref(),
            Some("invalid_request_error: max_tokens: Field required")
        );
        assert_eq!(error_message(b"<html>bad gateway</html>"), None);
    }
}
