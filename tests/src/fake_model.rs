//! A model API server that answers from a script, speaking the Anthropic and
//! OpenAI-compatible formats, for tests of the harness: in-process ones and cluster ones
//! where the harness runs as a child process. It records every request it sees.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{Value, json};

/// One request a fake server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The request headers.
    pub headers: HeaderMap,
    /// The body as JSON (`null` when it is not JSON).
    pub body: Value,
}

impl Seen {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Serves `router` on a free port of 127.0.0.1 and answers its base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let addr = listener.local_addr().expect("an address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}

/// Appends a request to `seen`.
pub fn record(
    seen: &Mutex<Vec<Seen>>,
    method: Method,
    uri: &Uri,
    headers: HeaderMap,
    body: &Bytes,
) {
    seen.lock().expect("lock").push(Seen {
        method,
        path: uri.path().to_string(),
        headers,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    });
}

/// One scripted answer: status, extra headers, JSON body.
pub type Scripted = (u16, Vec<(&'static str, &'static str)>, Value);

/// A model server that answers from a script, one response per request; when the script
/// runs out it repeats `then` if set, else answers 418.
pub struct FakeModel {
    /// Its base URL (`http://127.0.0.1:<port>`).
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeModel {
    /// Starts a server that plays `script` once.
    pub async fn start(script: Vec<Scripted>) -> Self {
        Self::start_then(script, None).await
    }

    /// Starts a server that plays `script`, then answers `then` forever.
    pub async fn start_then(script: Vec<Scripted>, then: Option<(u16, Value)>) -> Self {
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let router = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let script = script.clone();
                let seen = recorded.clone();
                let then = then.clone();
                async move {
                    record(&seen, method, &uri, headers, &body);
                    let next = script.lock().expect("lock").pop_front();
                    let (status, headers, body) = match (next, then) {
                        (Some(next), _) => next,
                        (None, Some((status, body))) => (status, vec![], body),
                        (None, None) => {
                            return (StatusCode::IM_A_TEAPOT, "script exhausted").into_response();
                        }
                    };
                    let mut response = (
                        StatusCode::from_u16(status).expect("a status"),
                        axum::Json(body),
                    )
                        .into_response();
                    for (name, value) in headers {
                        response
                            .headers_mut()
                            .insert(name, value.parse().expect("a header value"));
                    }
                    response
                }
            },
        );
        Self {
            url: serve(router).await,
            seen,
        }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

/// A 200 answer of the Anthropic Messages API with `text`.
pub fn anthropic_message(text: &str) -> Value {
    json!({
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": 6}
    })
}

/// A 200 chat completion of an OpenAI-compatible API with `text`.
pub fn openai_completion(text: &str) -> Value {
    json!({
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion",
        "created": 1741569952,
        "model": "gpt-4o-mini",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29}
    })
}
