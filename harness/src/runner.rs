//! The client of the runner API (`/runner/v1/...` on the apiserver): fetch the session's
//! context, post events, complete. The pod-bound token is read from its file on every
//! request, because the kubelet rotates it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hookrun_crds::agent::ExecSpec;
use hookrun_crds::session::{MAX_MESSAGE_BYTES, MAX_RESPONSE_BYTES, truncate_utf8};
use http::{HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::http::{HttpClient, HttpResponse, TransportError};
use crate::redact;
use crate::retry::{self, RetryPolicy};

/// How long one runner call may take.
const RUNNER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `GET /runner/v1/session` answers: everything the harness needs to run.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionContext {
    /// The Session's name.
    pub session: String,
    /// Its namespace.
    pub namespace: String,
    /// The Agent's name.
    pub agent: String,
    /// The initial prompt.
    pub title: String,
    /// The Agent's system prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// The Agent's models, first preferred.
    #[serde(default)]
    pub models: Vec<String>,
    /// Set when the Agent is a program rather than a model.
    #[serde(default)]
    pub exec: Option<ExecSpec>,
    /// Environment overrides the Session was started with.
    #[serde(default)]
    pub env: Vec<ContextEnv>,
    /// The Session's phase when the context was read.
    #[serde(default)]
    pub phase: Option<String>,
    /// How long to wait for more input after a turn (0: one turn, then done).
    #[serde(default)]
    pub idle_timeout_seconds: u64,
    /// Answered turns of the previous Session of the same session key, oldest first:
    /// the conversation starts from them.
    #[serde(default)]
    pub history: Vec<hookrun_crds::session::HistoryTurn>,
}

/// One input into a live Session (a follow-up's text), as `GET /runner/v1/inputs`
/// answers it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SessionInput {
    /// Its event id: the cursor to ask after next, and what its turn's reply names.
    pub id: u64,
    /// The text.
    #[serde(default)]
    pub content: String,
}

/// The answer of an input poll.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct InputPoll {
    /// The inputs after the cursor, oldest first (empty when the wait ran out).
    #[serde(default)]
    pub inputs: Vec<SessionInput>,
    /// The Session has ended: no input will come.
    #[serde(default)]
    pub finished: bool,
}

/// The answer of closing a Session's inputs.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CloseAnswer {
    /// The inputs are closed: no more will be accepted.
    #[serde(default)]
    pub closed: bool,
    /// Inputs that arrived after the cursor, unread, oldest first: answer them, then
    /// close again.
    #[serde(default)]
    pub inputs: Vec<SessionInput>,
}

/// The longest a poll for input asks the apiserver to hold it, in seconds (inside
/// [`RUNNER_TIMEOUT`]).
pub const MAX_POLL_SECONDS: u64 = 25;

impl SessionContext {
    /// Whether the Session has already ended (nothing left to do).
    pub fn is_finished(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Complete" | "Error"))
    }
}

/// One environment override of a Session.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ContextEnv {
    /// The variable's name.
    pub name: String,
    /// Its value.
    #[serde(default)]
    pub value: String,
}

/// The end of a run, as `POST /runner/v1/complete` takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Completion {
    /// The agent answered.
    Complete {
        /// The answer.
        response: String,
    },
    /// The agent failed.
    Error {
        /// What went wrong, for a person to act on.
        message: String,
    },
}

impl Completion {
    /// A successful ending, secrets scrubbed, cut to the size a Session keeps.
    pub fn complete(response: &str) -> Self {
        let response = redact::scrub(response);
        Self::Complete {
            response: truncate_utf8(&response, MAX_RESPONSE_BYTES).0.to_string(),
        }
    }

    /// A failed ending, secrets scrubbed, cut to the size a Session keeps.
    pub fn error(message: &str) -> Self {
        let message = redact::scrub(message);
        Self::Error {
            message: truncate_utf8(&message, MAX_MESSAGE_BYTES).0.to_string(),
        }
    }
}

/// Why a runner call failed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The token file could not be read (its content never appears here).
    #[error("cannot read the token file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// No answer, even after retries.
    #[error("the runner API at {url} did not answer: {source}")]
    Transport {
        /// The URL called.
        url: String,
        /// What happened.
        #[source]
        source: TransportError,
    },
    /// The Session has already ended: nothing more can be posted.
    #[error("the session has already finished")]
    Finished,
    /// Any other non-2xx answer.
    #[error("the runner API answered {status} {code}: {message}")]
    Status {
        /// The status code.
        status: StatusCode,
        /// The `error` code of the body.
        code: String,
        /// The `message` of the body.
        message: String,
    },
    /// A 2xx answer whose body is not what the contract says.
    #[error("the runner API answered something unexpected: {0}")]
    Decode(String),
}

/// A runner API client bound to one base URL and token file.
#[derive(Clone)]
pub struct RunnerClient {
    http: HttpClient,
    base: String,
    token_file: PathBuf,
    retry: RetryPolicy,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct EventAnswer {
    id: u64,
}

#[derive(Deserialize)]
struct CompleteAnswer {
    phase: String,
}

impl RunnerClient {
    /// A client for the runner API under `base` (e.g. `http://hookrun-apiserver:8080`).
    pub fn new(http: HttpClient, base: &str, token_file: PathBuf, retry: RetryPolicy) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token_file,
            retry,
        }
    }

    fn authorization(&self) -> Result<HeaderValue, RunnerError> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|error| RunnerError::Token {
                path: self.token_file.clone(),
                reason: error.to_string(),
            })?;
        let mut value =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                RunnerError::Token {
                    path: self.token_file.clone(),
                    reason: "the token is not a valid header value".to_string(),
                }
            })?;
        value.set_sensitive(true);
        redact::remember(|secrets| secrets.add(token.trim()));
        Ok(value)
    }

    /// One call, retried on no answer, 429 and 5xx; other answers are returned as they
    /// are.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<HttpResponse, RunnerError> {
        let url = format!("{}{path}", self.base);
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let headers = [(http::header::AUTHORIZATION, self.authorization()?)];
            let (retry_after, failure) = match self
                .http
                .send(method.clone(), &url, &headers, body, RUNNER_TIMEOUT)
                .await
            {
                Ok(response) if retry::is_retryable_status(response.status) => {
                    let wait = retry::retry_after(&response.headers);
                    (wait, status_error(&response))
                }
                Ok(response) => return Ok(response),
                Err(source) if source.is_transient() => (
                    None,
                    RunnerError::Transport {
                        url: url.clone(),
                        source,
                    },
                ),
                Err(source) => return Err(RunnerError::Transport { url, source }),
            };
            let Some(delay) =
                self.retry
                    .next_delay(attempt, started.elapsed(), retry_after, retry::jitter())
            else {
                return Err(failure);
            };
            tracing::warn!(
                failure = %redact::scrub(&failure.to_string()),
                attempt,
                ?delay,
                "runner call failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// `GET /runner/v1/session`.
    pub async fn session(&self) -> Result<SessionContext, RunnerError> {
        let response = self.call(Method::GET, "/runner/v1/session", None).await?;
        decode(&response)
    }

    /// `POST /runner/v1/events` with an `agent.message`, secrets scrubbed; answers the
    /// event id.
    pub async fn post_message(&self, content: &str) -> Result<u64, RunnerError> {
        let content = redact::scrub(content);
        // One key per event, resent unchanged on every retry of this post: the apiserver
        // stores the event once even when an earlier attempt's answer was lost.
        let key = event_key();
        let body =
            serde_json::json!({"type": "agent.message", "content": content, "idempotencyKey": key});
        let response = self
            .call(Method::POST, "/runner/v1/events", Some(&body))
            .await?;
        decode::<EventAnswer>(&response).map(|answer| answer.id)
    }

    /// `GET /runner/v1/inputs?after=<cursor>&wait=<seconds>`: the inputs after `after`,
    /// waiting up to `wait` seconds (at most [`MAX_POLL_SECONDS`]) for one.
    pub async fn inputs(&self, after: u64, wait: u64) -> Result<InputPoll, RunnerError> {
        let wait = wait.min(MAX_POLL_SECONDS);
        let path = format!("/runner/v1/inputs?after={after}&wait={wait}");
        let response = self.call(Method::GET, &path, None).await?;
        decode(&response)
    }

    /// `POST /runner/v1/inputs/close`: takes no more input once every input up to event
    /// id `after` has been read; answers the unread ones instead while there are some.
    pub async fn close_inputs(&self, after: u64) -> Result<CloseAnswer, RunnerError> {
        let body = serde_json::json!({ "after": after });
        let response = self
            .call(Method::POST, "/runner/v1/inputs/close", Some(&body))
            .await?;
        decode(&response)
    }

    /// `POST /runner/v1/events` with the `agent.turn_complete` of the turn that answered
    /// input `input_id` (0: the title), secrets scrubbed; its key names that input, so a
    /// retry is stored once and a waiting caller finds its own turn's reply.
    pub async fn post_turn_complete(&self, reply: &str, input_id: u64) -> Result<u64, RunnerError> {
        let content = redact::scrub(reply);
        let content = truncate_utf8(&content, hookrun_crds::session::MAX_EVENT_CONTENT_BYTES / 2).0;
        let body = serde_json::json!({
            "type": hookrun_crds::session::event_types::TURN_COMPLETE,
            "content": content,
            "idempotencyKey": hookrun_crds::session::turn_key(input_id),
        });
        let response = self
            .call(Method::POST, "/runner/v1/events", Some(&body))
            .await?;
        decode::<EventAnswer>(&response).map(|answer| answer.id)
    }

    /// `POST /runner/v1/complete`; answers the Session's phase.
    pub async fn complete(&self, completion: &Completion) -> Result<String, RunnerError> {
        let body = serde_json::to_value(completion)
            .map_err(|error| RunnerError::Decode(error.to_string()))?;
        let response = self
            .call(Method::POST, "/runner/v1/complete", Some(&body))
            .await?;
        decode::<CompleteAnswer>(&response).map(|answer| answer.phase)
    }
}

/// A fresh idempotency key for one event: 128 random bits, hex.
fn event_key() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

fn status_error(response: &HttpResponse) -> RunnerError {
    let body: Option<ErrorBody> = serde_json::from_slice(&response.body).ok();
    let (code, message) = match body {
        Some(body) => (body.error, body.message),
        None => (
            String::new(),
            truncate_utf8(&String::from_utf8_lossy(&response.body), 512)
                .0
                .to_string(),
        ),
    };
    if response.status == StatusCode::CONFLICT && code == "session_finished" {
        return RunnerError::Finished;
    }
    RunnerError::Status {
        status: response.status,
        code,
        message,
    }
}

fn decode<T: serde::de::DeserializeOwned>(response: &HttpResponse) -> Result<T, RunnerError> {
    if !response.status.is_success() {
        return Err(status_error(response));
    }
    serde_json::from_slice(&response.body).map_err(|error| RunnerError::Decode(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_serialize_as_the_contract_says() {
        assert_eq!(
            serde_json::to_value(Completion::complete("hi")).expect("json"),
            serde_json::json!({"status": "complete", "response": "hi"})
        );
        assert_eq!(
            serde_json::to_value(Completion::error("boom")).expect("json"),
            serde_json::json!({"status": "error", "message": "boom"})
        );
    }

    #[test]
    fn completions_are_cut_to_the_session_bounds() {
        let Completion::Error { message } = Completion::error(&"é".repeat(MAX_MESSAGE_BYTES))
        else {
            panic!("an error completion");
        };
        assert!(message.len() <= MAX_MESSAGE_BYTES);
        let Completion::Complete { response } = Completion::complete(&"x".repeat(1 << 20)) else {
            panic!("a complete completion");
        };
        assert_eq!(response.len(), MAX_RESPONSE_BYTES);
    }

    #[test]
    fn context_reads_the_contract_shape() {
        let context: SessionContext = serde_json::from_value(serde_json::json!({
            "session": "echo-wh-0a1b2c3d",
            "namespace": "default",
            "agent": "echo",
            "title": "hello",
            "system": null,
            "models": [],
            "exec": {"command": ["cat"], "workingDir": "/tmp"},
            "env": [{"name": "A", "value": "1"}],
            "trigger": {"source": "webhook"},
            "phase": "Pending"
        }))
        .expect("the contract's context");
        assert_eq!(context.title, "hello");
        let exec = context.exec.as_ref().expect("exec");
        assert_eq!(exec.command, ["cat"]);
        assert_eq!(exec.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(context.env[0].name, "A");
        assert!(!context.is_finished());
    }

    #[test]
    fn a_finished_session_is_recognised_from_409() {
        let response = HttpResponse {
            status: StatusCode::CONFLICT,
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(br#"{"error":"session_finished","message":"x"}"#),
        };
        assert!(matches!(status_error(&response), RunnerError::Finished));
    }
}
