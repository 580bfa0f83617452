//! OpenAI-compatible chat completions (`POST {base}/chat/completions`): OpenAI itself,
//! vLLM, Ollama, LiteLLM and the like. The request, and lenient readers for the answer
//! and for the error bodies these servers send.

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiKey;

/// The default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The endpoint under a base URL (which carries the `/v1`, as every compatible server's
/// documentation writes it).
pub fn url(base: &str) -> String {
    format!("{}/chat/completions", base.trim_end_matches('/'))
}

/// `Authorization: Bearer <key>` when a key is set (local servers often need none).
pub fn headers(key: Option<&ApiKey>) -> Vec<(HeaderName, HeaderValue)> {
    key.map(|key| (http::header::AUTHORIZATION, key.bearer_header_value()))
        .into_iter()
        .collect()
}

/// The system prompt as a `system` message, then the conversation so far (the title
/// first, then each turn's reply and the next input).
pub fn request_body(
    model: &str,
    system: Option<&str>,
    conversation: &[super::ChatMessage],
) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = system.filter(|s| !s.trim().is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.extend(conversation.iter().map(super::ChatMessage::to_json));
    json!({"model": model, "messages": messages})
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    refusal: Option<String>,
}

/// `choices[0].message.content` of a 200 answer (a string, or a list of text parts as
/// some compatible servers send). A refusal or an empty answer is an error saying so.
pub fn answer(body: &[u8]) -> Result<String, String> {
    let completion: Completion = serde_json::from_slice(body).map_err(|error| {
        format!(
            "the answer is not a chat completion: {}",
            super::quote_cut(&error.to_string())
        )
    })?;
    let choice = completion
        .choices
        .into_iter()
        .next()
        .ok_or("the answer has no choices")?;
    let message = choice.message.ok_or("the first choice has no message")?;
    let text = match message.content {
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    if text.trim().is_empty() {
        if let Some(refusal) = message.refusal.filter(|r| !r.is_empty()) {
            return Err(format!("the model refused: {}", super::quote_cut(&refusal)));
        }
        return Err(format!(
            "the model answered with no text (finish_reason: {})",
            super::quote_cut(choice.finish_reason.as_deref().unwrap_or("none"))
        ));
    }
    Ok(text)
}

/// The message of an error body: OpenAI's `{"error":{"message","type","code"}}`,
/// Ollama's `{"error":"..."}` or vLLM's `{"object":"error","message":...}`.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    match value.get("error") {
        Some(Value::String(message)) => Some(message.clone()),
        Some(error) => {
            let message = error.get("message")?.as_str()?;
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .or_else(|| error.get("type").and_then(Value::as_str));
            Some(match code {
                Some(code) => format!("{code}: {message}"),
                None => message.to_string(),
            })
        }
        None => value
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string),
    }
}

/// OpenAI answers 429 `insufficient_quota` when the account has no credit: waiting does
/// not help, so it is not retried.
pub fn is_permanent_429(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|value| {
            value
                .pointer("/error/code")
                .and_then(Value::as_str)
                .map(|code| code == "insufficient_quota")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_has_the_documented_shape() {
        assert_eq!(
            request_body(
                "gpt-4o-mini",
                Some("Be brief."),
                &[super::super::ChatMessage::user("hello")]
            ),
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "hello"}
                ]
            })
        );
        assert_eq!(
            request_body("llama3", None, &[super::super::ChatMessage::user("hi")]),
            json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
        );
    }

    #[test]
    fn a_later_turn_carries_the_conversation() {
        use super::super::ChatMessage;
        let conversation = [
            ChatMessage::user("first"),
            ChatMessage::assistant("reply one"),
            ChatMessage::user("second"),
        ];
        assert_eq!(
            request_body("m", Some("sys"), &conversation)["messages"],
            json!([
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "reply one"},
                {"role": "user", "content": "second"}
            ])
        );
    }

    #[test]
    fn answer_reads_the_first_choice() {
        let body = json!({
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "object": "chat.completion",
            "created": 1741569952,
            "model": "gpt-4.1-2025-04-14",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
        });
        assert_eq!(
            answer(body.to_string().as_bytes()).expect("text"),
            "Hello! How can I assist you today?"
        );
        let parts = json!({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]});
        assert_eq!(answer(parts.to_string().as_bytes()).expect("text"), "ab");
    }

    #[test]
    fn refusals_and_empty_answers_are_errors() {
        let refusal = json!({"choices": [{"message": {"content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}]});
        let error = answer(refusal.to_string().as_bytes()).expect_err("refusal");
        assert!(error.contains("can't help"), "{error}");
        let empty = json!({"choices": []});
        assert!(answer(empty.to_string().as_bytes()).is_err());
    }

    #[test]
    fn error_bodies_of_compatible_servers() {
        let openai = json!({"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}});
        assert_eq!(
            error_message(openai.to_string().as_bytes()).as_deref(),
            Some(
                "model_not_found: The model `gpt-9` does not exist or you do not have access to it."
            )
        );
        let ollama = json!({"error": "model \"llama9\" not found, try pulling it first"});
        assert_eq!(
            error_message(ollama.to_string().as_bytes()).as_deref(),
            Some("model \"llama9\" not found, try pulling it first")
        );
        let vllm = json!({"object": "error", "message": "max_tokens is too large", "type": "BadRequestError", "code": 400});
        assert_eq!(
            error_message(vllm.to_string().as_bytes()).as_deref(),
            Some("max_tokens is too large")
        );
    }

    #[test]
    fn insufficient_quota_is_permanent() {
        let quota = json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}});
        assert!(is_permanent_429(quota.to_string().as_bytes()));
        let rate = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
        assert!(!is_permanent_429(rate.to_string().as_bytes()));
    }
}
