//! hookrun's reference agent harness. It runs in a session pod: reads its session from
//! the runner API, asks a model (Anthropic or OpenAI-compatible) or runs a program, posts
//! what it produces as `agent.message` events, and completes the session with the answer
//! or with an error that says what went wrong. It never exits without trying to report.

#![forbid(unsafe_code)]

pub mod exec;
pub mod http;
pub mod provider;
pub mod redact;
pub mod retry;
pub mod runner;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hookrun_crds::names;
use tokio::sync::mpsc;

use crate::http::HttpClient;
use crate::provider::{ApiKey, ModelConfig, ModelTarget, Plan, anthropic, openai};
use crate::retry::RetryPolicy;
use crate::runner::{Completion, RunnerClient, RunnerError, SessionContext};

/// Command-line flags; every one can also come from the environment, which is how a
/// session pod configures it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "hookrun-harness",
    version,
    about = "hookrun's reference agent harness: runs one session from a session pod"
)]
pub struct Args {
    /// Base URL of the runner API (the apiserver as pods reach it).
    #[arg(long, env = names::env::RUNNER_URL)]
    pub runner_url: String,
    /// File holding the pod-bound token; read again before every request.
    #[arg(long, env = names::env::TOKEN_FILE, default_value = names::TOKEN_FILE)]
    pub token_file: PathBuf,
    /// Base URL of the Anthropic API.
    #[arg(long, env = "ANTHROPIC_BASE_URL", default_value = anthropic::DEFAULT_BASE_URL)]
    pub anthropic_base_url: String,
    /// The Anthropic API key (set it through the environment, never on a command line).
    #[arg(long, env = "ANTHROPIC_API_KEY", hide = true, hide_env_values = true)]
    pub anthropic_api_key: Option<ApiKey>,
    /// Base URL of the OpenAI-compatible API, `/v1` included.
    #[arg(long, env = "OPENAI_BASE_URL", default_value = openai::DEFAULT_BASE_URL)]
    pub openai_base_url: String,
    /// The OpenAI-compatible API key; optional for local servers.
    #[arg(long, env = "OPENAI_API_KEY", hide = true, hide_env_values = true)]
    pub openai_api_key: Option<ApiKey>,
    /// `max_tokens` of Anthropic requests.
    #[arg(long, env = "HARNESS_MAX_TOKENS", default_value_t = 8192)]
    pub max_tokens: u32,
    /// Seconds one model request may take.
    #[arg(long, env = "HARNESS_MODEL_TIMEOUT_SECONDS", default_value_t = 600)]
    pub model_timeout_seconds: u64,
    /// Attempts per model request, retries of 429/5xx/lost connections included.
    #[arg(long, env = "HARNESS_RETRY_ATTEMPTS", default_value_t = RetryPolicy::MODEL.max_attempts)]
    pub retry_attempts: u32,
    /// Seconds after which no further retry of a model request starts.
    #[arg(long, env = "HARNESS_RETRY_SECONDS", default_value_t = RetryPolicy::MODEL.max_elapsed.as_secs())]
    pub retry_seconds: u64,
    /// Log filter (`info`, `debug`, `hookrun_harness=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
}

impl Args {
    /// The model configuration these flags describe (empty keys count as unset).
    pub fn model_config(&self) -> ModelConfig {
        let key = |key: &Option<ApiKey>| key.clone().filter(|k| *k != ApiKey::new(""));
        ModelConfig {
            anthropic_base_url: self.anthropic_base_url.clone(),
            anthropic_api_key: key(&self.anthropic_api_key),
            openai_base_url: self.openai_base_url.clone(),
            openai_api_key: key(&self.openai_api_key),
            max_tokens: self.max_tokens,
            timeout: Duration::from_secs(self.model_timeout_seconds.max(1)),
            retry: RetryPolicy {
                max_attempts: self.retry_attempts.max(1),
                max_elapsed: Duration::from_secs(self.retry_seconds),
                ..RetryPolicy::MODEL
            },
        }
    }
}

/// How a run ended; [`Outcome::exit_code`] is the process's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The session completed with an answer.
    Completed,
    /// The session was already finished when the harness started: nothing to do.
    NothingToDo,
    /// The agent failed and the session was completed with an error.
    Failed,
    /// The runner API could not be told how the run ended.
    Unreported,
    /// The session was ended by someone else (timeout, cancel) while the harness ran.
    Interrupted,
}

impl Outcome {
    /// 0 for success or nothing to do, otherwise non-zero and distinct per cause.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Completed | Self::NothingToDo => 0,
            Self::Failed => 1,
            Self::Unreported => 2,
            Self::Interrupted => 3,
        }
    }
}

/// Sets up logging to stderr (the pod log).
pub fn init_tracing(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: pod logs and log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Why a run produced no answer.
enum Failure {
    /// The agent failed: complete the session with this message.
    Agent(String),
    /// The session ended elsewhere.
    Interrupted,
}

/// Runs the session the pod was started for, start to end.
pub async fn run(args: Args) -> Outcome {
    remember_secrets(&args);
    let http = HttpClient::new();
    let runner = RunnerClient::new(
        HttpClient::direct(),
        &args.runner_url,
        args.token_file.clone(),
        RetryPolicy::RUNNER,
    );
    let context = match runner.session().await {
        Ok(context) => context,
        Err(error) => {
            tracing::error!(error = %redact::scrub(&error.to_string()), "cannot read the session from the runner API");
            // When the API answered but its answer was unusable, the session can still
            // be told; without a token or an answer it cannot.
            let reachable = match &error {
                RunnerError::Decode(_) => true,
                RunnerError::Status { status, .. } => !matches!(status.as_u16(), 401 | 403),
                _ => false,
            };
            if reachable {
                let message = format!("the harness could not read its session: {error}");
                return finish(&runner, Completion::error(&message), Outcome::Failed).await;
            }
            return Outcome::Unreported;
        }
    };
    if context.is_finished() {
        tracing::info!(session = %context.session, "the session has already finished; nothing to do");
        return Outcome::NothingToDo;
    }
    tracing::info!(
        session = %context.session,
        namespace = %context.namespace,
        agent = %context.agent,
        "running the session"
    );
    let result = match provider::plan(&context) {
        Err(error) => Err(Failure::Agent(error.to_string())),
        Ok(Plan::Exec(spec)) => run_exec(&runner, &spec, &context).await,
        Ok(Plan::Echo) => run_echo(&runner, &context).await,
        Ok(Plan::Model(target)) => {
            run_model(&http, &runner, &args.model_config(), &target, &context).await
        }
    };
    match result {
        Ok(response) => finish(&runner, Completion::complete(&response), Outcome::Completed).await,
        Err(Failure::Agent(message)) => {
            let message = redact::scrub(&message);
            tracing::error!(%message, "the agent failed");
            finish(&runner, Completion::error(&message), Outcome::Failed).await
        }
        Err(Failure::Interrupted) => {
            tracing::warn!("the session ended while the harness was running it");
            Outcome::Interrupted
        }
    }
}

/// Tells [`redact`] every secret this run knows of: the model keys, the credentials in
/// the configured URLs, and secret-looking variables of the environment (what an exec
/// program inherits and might print).
fn remember_secrets(args: &Args) {
    redact::remember(|secrets| {
        for key in [&args.anthropic_api_key, &args.openai_api_key]
            .into_iter()
            .flatten()
        {
            secrets.add(key.expose());
        }
        for url in [
            &args.anthropic_base_url,
            &args.openai_base_url,
            &args.runner_url,
        ] {
            secrets.add_url(url);
        }
        secrets.add_env(std::env::vars());
    });
}

async fn finish(runner: &RunnerClient, completion: Completion, outcome: Outcome) -> Outcome {
    match runner.complete(&completion).await {
        Ok(phase) => {
            tracing::info!(%phase, "session completed");
            outcome
        }
        Err(RunnerError::Finished) => {
            tracing::warn!("the session was already finished when the harness completed it");
            Outcome::Interrupted
        }
        Err(error) => {
            tracing::error!(error = %redact::scrub(&error.to_string()), "cannot complete the session");
            Outcome::Unreported
        }
    }
}

async fn run_model(
    http: &HttpClient,
    runner: &RunnerClient,
    config: &ModelConfig,
    target: &ModelTarget,
    context: &SessionContext,
) -> Result<String, Failure> {
    tracing::info!(provider = target.provider.as_str(), model = %target.model, "asking the model");
    let text = provider::call_model(http, config, target, context)
        .await
        .map_err(|error| Failure::Agent(error.to_string()))?;
    match runner.post_message(&text).await {
        Ok(_) => {}
        Err(RunnerError::Finished) => return Err(Failure::Interrupted),
        // The completion below still carries the answer.
        Err(error) => tracing::warn!(
            error = %redact::scrub(&error.to_string()),
            "cannot post the answer as an event"
        ),
    }
    Ok(text)
}

/// The built-in echo agent: the title is the answer, posted as one event.
async fn run_echo(runner: &RunnerClient, context: &SessionContext) -> Result<String, Failure> {
    tracing::info!("answering with the title (hookrun/echo)");
    let text = context.title.trim().to_string();
    match runner.post_message(&text).await {
        Ok(_) => {}
        Err(RunnerError::Finished) => return Err(Failure::Interrupted),
        Err(error) => tracing::warn!(
            error = %redact::scrub(&error.to_string()),
            "cannot post the answer as an event"
        ),
    }
    Ok(text)
}

async fn run_exec(
    runner: &RunnerClient,
    spec: &hookrun_crds::agent::ExecSpec,
    context: &SessionContext,
) -> Result<String, Failure> {
    tracing::info!(command = ?spec.command, "running the agent's command");
    let (messages, mut batches) = mpsc::channel::<String>(64);
    let poster = {
        let runner = runner.clone();
        tokio::spawn(async move {
            while let Some(text) = batches.recv().await {
                match runner.post_message(&text).await {
                    Ok(_) => {}
                    // Dropping the receiver stops the command.
                    Err(RunnerError::Finished) => return false,
                    Err(error) => tracing::warn!(
                        error = %redact::scrub(&error.to_string()),
                        "cannot post an event; going on"
                    ),
                }
            }
            true
        })
    };
    let env: Vec<(String, String)> = context
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    let ran = exec::run(spec, &context.title, &env, messages).await;
    // Every event is posted before the completion.
    let open = poster.await.unwrap_or(true);
    let outcome = match ran {
        Ok(outcome) => outcome,
        Err(exec::ExecError::Cancelled) => return Err(Failure::Interrupted),
        Err(error) => return Err(Failure::Agent(error.to_string())),
    };
    if !open {
        return Err(Failure::Interrupted);
    }
    if outcome.succeeded() {
        Ok(outcome.stdout.trim().to_string())
    } else {
        Err(Failure::Agent(outcome.failure_message()))
    }
}
