//! What a session runs (a program or a model, chosen from the Agent) and the model call
//! itself: one request, retried on 429/5xx and lost connections, its answer's text.

pub mod anthropic;
pub mod openai;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hookrun_crds::agent::ExecSpec;
use http::{HeaderValue, Method};

use crate::http::HttpClient;
use crate::redact;
use crate::retry::{self, RetryPolicy};
use crate::runner::SessionContext;

/// What the harness does for a session.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Run a program (`spec.exec`).
    Exec(ExecSpec),
    /// Ask a model (the first of `spec.models`).
    Model(ModelTarget),
    /// Answer with the title itself ([`ECHO_MODEL`]): no model, no program, no network.
    Echo,
}

/// The built-in model that answers every session with its title: an agent that works
/// offline in the harness image, which has no shell and no programs besides the harness.
pub const ECHO_MODEL: &str = "hookrun/echo";

/// The model APIs the harness speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The Anthropic Messages API.
    Anthropic,
    /// OpenAI-compatible chat completions.
    OpenAi,
}

impl Provider {
    /// The name used in model ids and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::OpenAi => "openai",
        }
    }
}

/// A model id split into its provider and the provider's model name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTarget {
    /// Whose API.
    pub provider: Provider,
    /// The model name that API knows (`claude-sonnet-4-6`, `gpt-4o-mini`, `llama3.1`).
    pub model: String,
}

impl FromStr for ModelTarget {
    type Err = PlanError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| PlanError::BadModel {
            model: id.to_string(),
            reason: reason.to_string(),
        };
        let (provider, model) = id
            .split_once('/')
            .ok_or_else(|| bad("expected <provider>/<model>"))?;
        let provider = match provider {
            "anthropic" => Provider::Anthropic,
            "openai" => Provider::OpenAi,
            _ => {
                return Err(bad(
                    "the harness knows the providers anthropic and openai, and hookrun/echo",
                ));
            }
        };
        if model.trim().is_empty() {
            return Err(bad("the model name after the provider is empty"));
        }
        Ok(Self {
            provider,
            model: model.to_string(),
        })
    }
}

/// A session the harness cannot run as configured.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// Neither `spec.exec` nor `spec.models`.
    #[error(
        "the Agent has nothing to run: set spec.models (e.g. [anthropic/claude-sonnet-4-6] \
         or [openai/gpt-4o-mini]) or spec.exec.command (a program that reads the title on stdin)"
    )]
    NothingToRun,
    /// `spec.exec.command` is empty.
    #[error("spec.exec.command is empty: give the program and its arguments")]
    EmptyCommand,
    /// A model id the harness cannot use.
    #[error("model {model:?}: {reason} (use anthropic/<model>, openai/<model> or hookrun/echo)")]
    BadModel {
        /// The id as written.
        model: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Chooses what to run: `exec` wins; otherwise the first model.
pub fn plan(context: &SessionContext) -> Result<Plan, PlanError> {
    if let Some(exec) = &context.exec {
        if exec.command.is_empty() {
            return Err(PlanError::EmptyCommand);
        }
        return Ok(Plan::Exec(exec.clone()));
    }
    let first = context.models.first().ok_or(PlanError::NothingToRun)?;
    if first.trim() == ECHO_MODEL {
        return Ok(Plan::Echo);
    }
    first.parse().map(Plan::Model)
}

/// Who said a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    /// The title or an input.
    User,
    /// A turn's reply.
    Assistant,
}

/// One message of a session's conversation, as both providers take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who said it.
    pub role: ChatRole,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A user message (the title, or an input).
    pub fn user(content: &str) -> Self {
        Self {
            role: ChatRole::User,
            content: content.to_string(),
        }
    }

    /// An assistant message (a turn's reply).
    pub fn assistant(content: &str) -> Self {
        Self {
            role: ChatRole::Assistant,
            content: content.to_string(),
        }
    }

    /// `{"role", "content"}`, the shape both APIs read.
    pub fn to_json(&self) -> serde_json::Value {
        let role = match self.role {
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        };
        serde_json::json!({"role": role, "content": self.content})
    }
}

/// The longest piece of a model server's answer an error message quotes.
pub const MAX_QUOTED_BYTES: usize = 300;

/// `text` cut to [`MAX_QUOTED_BYTES`]: a decoding error can quote the server's answer
/// (serde quotes a string of the wrong type whole), and a message must not grow with it.
pub fn quote_cut(text: &str) -> String {
    let (head, cut) = hookrun_crds::session::truncate_utf8(text, MAX_QUOTED_BYTES);
    if cut {
        format!("{head}…")
    } else {
        head.to_string()
    }
}

/// An API key: never printed, marked sensitive in headers.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key (surrounding whitespace from a Secret file is dropped).
    pub fn new(key: &str) -> Self {
        Self(key.trim().to_string())
    }

    fn sensitive(value: &str) -> HeaderValue {
        // A key with bytes a header cannot carry is sent empty: the provider then
        // answers 401, which says what is wrong without echoing the key.
        let mut value = HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }

    /// The key as a header value.
    pub fn header_value(&self) -> HeaderValue {
        Self::sensitive(&self.0)
    }

    /// `Bearer <key>` as a header value.
    pub fn bearer_header_value(&self) -> HeaderValue {
        Self::sensitive(&format!("Bearer {}", self.0))
    }

    /// The key itself, for [`crate::redact`] to recognise it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(key))
    }
}

/// Where the model APIs are and how to call them.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Base of the Anthropic API.
    pub anthropic_base_url: String,
    /// `ANTHROPIC_API_KEY`.
    pub anthropic_api_key: Option<ApiKey>,
    /// Base of the OpenAI-compatible API (with its `/v1`).
    pub openai_base_url: String,
    /// `OPENAI_API_KEY`.
    pub openai_api_key: Option<ApiKey>,
    /// `max_tokens` of an Anthropic request.
    pub max_tokens: u32,
    /// How long one model request may take.
    pub timeout: Duration,
    /// Retries of 429, 5xx and lost connections.
    pub retry: RetryPolicy,
}

/// Why the model gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The key the provider needs is not set.
    #[error(
        "{variable} is not set: give the Agent a spec.session.env entry {variable} \
         (valueFrom.secretKeyRef pointing at a Secret that holds the key)"
    )]
    MissingKey {
        /// The variable to set.
        variable: &'static str,
    },
    /// A 4xx that retrying will not change.
    #[error("{provider} rejected the request ({status}): {message}")]
    Rejected {
        /// The provider's name.
        provider: &'static str,
        /// The status code.
        status: u16,
        /// The provider's error message, secrets scrubbed.
        message: String,
    },
    /// 429/5xx/no answer until the retry budget ran out.
    #[error("{provider} did not answer after {attempts} attempts over {elapsed:?}: {last}")]
    GaveUp {
        /// The provider's name.
        provider: &'static str,
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last failure.
        last: String,
    },
    /// A 200 whose body has no usable answer.
    #[error("{provider} answered, but: {reason}")]
    Answer {
        /// The provider's name.
        provider: &'static str,
        /// What was wrong with the answer.
        reason: String,
    },
}

/// Asks the model for the next reply of `conversation` and answers its text.
pub async fn call_model(
    http: &HttpClient,
    config: &ModelConfig,
    target: &ModelTarget,
    context: &SessionContext,
    conversation: &[ChatMessage],
) -> Result<String, ModelError> {
    let provider = target.provider.as_str();
    let system = context.system.as_deref();
    let (url, headers, body, key) = match target.provider {
        Provider::Anthropic => {
            let key = config
                .anthropic_api_key
                .as_ref()
                .ok_or(ModelError::MissingKey {
                    variable: "ANTHROPIC_API_KEY",
                })?;
            (
                anthropic::url(&config.anthropic_base_url),
                anthropic::headers(key),
                anthropic::request_body(&target.model, system, conversation, config.max_tokens),
                Some(key),
            )
        }
        Provider::OpenAi => (
            openai::url(&config.openai_base_url),
            openai::headers(config.openai_api_key.as_ref()),
            openai::request_body(&target.model, system, conversation),
            config.openai_api_key.as_ref(),
        ),
    };
    if let Some(key) = key {
        redact::remember(|secrets| secrets.add(key.expose()));
    }
    let scrub = |text: String| redact::scrub(&text);
    let error_message = |body: &[u8]| {
        let message = match target.provider {
            Provider::Anthropic => anthropic::error_message(body),
            Provider::OpenAi => openai::error_message(body),
        };
        message.map(scrub).unwrap_or_else(|| {
            // Scrubbed before it is cut, so that no prefix of a secret survives the cut.
            let raw = scrub(String::from_utf8_lossy(body).into_owned());
            let (head, _) = hookrun_crds::session::truncate_utf8(raw.trim(), 300);
            if head.is_empty() {
                "(empty body)".to_string()
            } else {
                head.to_string()
            }
        })
    };

    let started = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let sent = http
            .send(Method::POST, &url, &headers, Some(&body), config.timeout)
            .await;
        let (last, retry_after) = match sent {
            Ok(response) if response.status.is_success() => {
                let text = match target.provider {
                    Provider::Anthropic => anthropic::answer(&response.body),
                    Provider::OpenAi => openai::answer(&response.body),
                };
                return text.map_err(|reason| ModelError::Answer {
                    provider,
                    reason: scrub(reason),
                });
            }
            Ok(response)
                if retry::is_retryable_status(response.status)
                    && !(target.provider == Provider::OpenAi
                        && openai::is_permanent_429(&response.body)) =>
            {
                (
                    format!(
                        "{} {}",
                        response.status.as_u16(),
                        error_message(&response.body)
                    ),
                    retry::retry_after(&response.headers),
                )
            }
            Ok(response) => {
                return Err(ModelError::Rejected {
                    provider,
                    status: response.status.as_u16(),
                    message: error_message(&response.body),
                });
            }
            Err(error) if error.is_transient() => (scrub(error.to_string()), None),
            Err(error) => {
                return Err(ModelError::GaveUp {
                    provider,
                    attempts: attempt,
                    elapsed: started.elapsed(),
                    last: scrub(error.to_string()),
                });
            }
        };
        let Some(delay) =
            config
                .retry
                .next_delay(attempt, started.elapsed(), retry_after, retry::jitter())
        else {
            return Err(ModelError::GaveUp {
                provider,
                attempts: attempt,
                elapsed: started.elapsed(),
                last,
            });
        };
        tracing::warn!(provider, attempt, ?delay, failure = %last, "model call failed; retrying");
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(models: &[&str], exec: Option<Vec<&str>>) -> SessionContext {
        SessionContext {
            title: "t".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            exec: exec.map(|command| ExecSpec {
                command: command.into_iter().map(str::to_string).collect(),
                working_dir: None,
            }),
            ..SessionContext::default()
        }
    }

    #[test]
    fn exec_wins_over_models() {
        let chosen = plan(&context(&["anthropic/x"], Some(vec!["cat"]))).expect("a plan");
        assert!(matches!(chosen, Plan::Exec(spec) if spec.command == ["cat"]));
    }

    #[test]
    fn the_first_model_is_used() {
        let first = plan(&context(&["openai/gpt-4o-mini", "anthropic/x"], None)).expect("plan");
        assert_eq!(
            first,
            Plan::Model(ModelTarget {
                provider: Provider::OpenAi,
                model: "gpt-4o-mini".into()
            })
        );
        // Model names may themselves contain slashes (Hugging Face ids on vLLM).
        let slashed = plan(&context(&["openai/meta-llama/Llama-3.1-8B"], None)).expect("plan");
        assert!(matches!(slashed, Plan::Model(t) if t.model == "meta-llama/Llama-3.1-8B"));
    }

    #[test]
    fn hookrun_echo_is_the_built_in_echo() {
        assert_eq!(plan(&context(&["hookrun/echo"], None)), Ok(Plan::Echo));
        // Only as the first model, and exec still wins.
        assert!(matches!(
            plan(&context(&["anthropic/x", "hookrun/echo"], None)),
            Ok(Plan::Model(_))
        ));
        assert!(matches!(
            plan(&context(&["hookrun/echo"], Some(vec!["cat"]))),
            Ok(Plan::Exec(_))
        ));
        let unknown = plan(&context(&["hookrun/other"], None)).expect_err("unknown");
        assert!(unknown.to_string().contains("hookrun/echo"), "{unknown}");
    }

    #[test]
    fn nothing_to_run_says_what_to_set() {
        let error = plan(&context(&[], None)).expect_err("nothing");
        assert_eq!(error, PlanError::NothingToRun);
        let text = error.to_string();
        assert!(
            text.contains("spec.models") && text.contains("spec.exec"),
            "{text}"
        );
        assert_eq!(
            plan(&context(&[], Some(vec![]))).expect_err("empty"),
            PlanError::EmptyCommand
        );
    }

    #[test]
    fn bad_model_ids_are_named() {
        for id in ["claude", "google/gemini", "anthropic/"] {
            let error = plan(&context(&[id], None)).expect_err(id);
            assert!(error.to_string().contains(id), "{error}");
        }
    }

    #[test]
    fn decoding_errors_of_answers_are_cut() {
        let body = serde_json::json!({"content": "x".repeat(10_000)}).to_string();
        let error = anthropic::answer(body.as_bytes()).expect_err("not a message");
        assert!(error.len() < 400, "{} bytes", error.len());
        let body = serde_json::json!({"choices": "x".repeat(10_000)}).to_string();
        let error = openai::answer(body.as_bytes()).expect_err("not a completion");
        assert!(error.len() < 400, "{} bytes", error.len());
    }

    #[test]
    fn keys_never_print() {
        let key = ApiKey::new(" sk-ant-secret-123 \n");
        assert_eq!(format!("{key:?}"), "ApiKey([redacted])");
        assert!(key.header_value().is_sensitive());
        assert_eq!(key.expose(), "sk-ant-secret-123");
        assert_eq!(
            key.bearer_header_value().to_str().expect("ascii"),
            "Bearer sk-ant-secret-123"
        );
    }
}
