//! hookrun's reference agent harness. It runs in a session pod: reads its session from
//! the runner API, asks a model (Anthropic or OpenAI-compatible) or runs a program, posts
//! what it produces as `agent.message` events, and completes the session with the answer
//! or with an error that says what went wrong. It never exits without trying to report.
//!
//! When the Agent's `idleTimeoutSeconds` is above 0 the session is live: after each turn
//! the harness posts `agent.turn_complete` (the turn's reply), long-polls the runner API
//! for the next `user.message`, and runs another turn with it (a model sees the whole
//! conversation so far); once no input came for the idle timeout it completes with the
//! last reply.

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
use crate::provider::{ApiKey, ChatMessage, ModelConfig, ModelTarget, Plan, anthropic, openai};
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
    /// Milliseconds an interactive program (exec mode in a live session) must be quiet
    /// after printing for its turn to be over.
    #[arg(long, env = "HARNESS_TURN_GAP_MS", default_value_t = exec::DEFAULT_TURN_GAP.as_millis() as u64)]
    pub turn_gap_ms: u64,
    /// Seconds one turn of an interactive program may take.
    #[arg(long, env = "HARNESS_TURN_SECONDS", default_value_t = 600)]
    pub turn_seconds: u64,
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
    let live = context.idle_timeout_seconds > 0;
    let result = match provider::plan(&context) {
        Err(error) => Err(Failure::Agent(error.to_string())),
        Ok(Plan::Exec(spec)) if live => run_interactive(&runner, &spec, &context, &args).await,
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
    converse(runner, context, async |conversation: &[ChatMessage]| {
        provider::call_model(http, config, target, context, conversation)
            .await
            .map_err(|error| Failure::Agent(error.to_string()))
    })
    .await
}

/// The built-in echo agent: each turn's answer is its input (the title first).
async fn run_echo(runner: &RunnerClient, context: &SessionContext) -> Result<String, Failure> {
    tracing::info!("answering with each input (hookrun/echo)");
    converse(runner, context, async |conversation: &[ChatMessage]| {
        Ok(conversation
            .last()
            .map(|message| message.content.trim().to_owned())
            .unwrap_or_default())
    })
    .await
}

/// Runs the turns of a session: `answer` gets the conversation so far (the title, then
/// each reply and input) and gives the turn's reply, which is posted as an
/// `agent.message`. A one-shot session ends after the first turn; a live one posts
/// `agent.turn_complete` and waits for the next input, until the idle timeout. Returns
/// the last reply.
async fn converse(
    runner: &RunnerClient,
    context: &SessionContext,
    mut answer: impl AsyncFnMut(&[ChatMessage]) -> Result<String, Failure>,
) -> Result<String, Failure> {
    let mut conversation: Vec<ChatMessage> = context
        .history
        .iter()
        .flat_map(|turn| {
            [
                ChatMessage::user(&turn.user),
                ChatMessage::assistant(&turn.assistant),
            ]
        })
        .collect();
    conversation.push(ChatMessage::user(&context.title));
    let mut inbox = Inbox::new(context.idle_timeout_seconds);
    let mut input_id = 0;
    loop {
        let text = answer(&conversation).await?;
        conversation.push(ChatMessage::assistant(&text));
        match runner.post_message(&text).await {
            Ok(_) => {}
            Err(RunnerError::Finished) => return Err(Failure::Interrupted),
            // The completion below still carries the answer.
            Err(error) => tracing::warn!(
                error = %redact::scrub(&error.to_string()),
                "cannot post the answer as an event"
            ),
        }
        if inbox.is_live() {
            end_turn(runner, &text, input_id).await?;
        }
        match inbox.next(runner).await? {
            Some(input) => {
                // A one-turn Session that got input while it ran answers it too: the
                // turn before it ends like a live Session's.
                if !inbox.is_live() {
                    end_turn(runner, &text, input_id).await?;
                }
                input_id = input.id;
                conversation.push(ChatMessage::user(&input.content));
            }
            None => return Ok(text),
        }
    }
}

/// Posts `agent.turn_complete` for the turn that answered input `input_id`.
async fn end_turn(runner: &RunnerClient, reply: &str, input_id: u64) -> Result<(), Failure> {
    match runner.post_turn_complete(reply, input_id).await {
        Ok(_) => Ok(()),
        Err(RunnerError::Finished) => Err(Failure::Interrupted),
        Err(error) => {
            tracing::warn!(
                error = %redact::scrub(&error.to_string()),
                "cannot post the end of a turn; going on"
            );
            Ok(())
        }
    }
}

/// Where a live session's inputs come from: the runner API's long-poll, from a cursor,
/// until no input came for the idle timeout.
struct Inbox {
    idle: Duration,
    cursor: u64,
    pending: std::collections::VecDeque<runner::SessionInput>,
}

impl Inbox {
    fn new(idle_timeout_seconds: u64) -> Self {
        Self {
            idle: Duration::from_secs(idle_timeout_seconds),
            cursor: 0,
            pending: Default::default(),
        }
    }

    /// Whether the session takes input after its first turn.
    fn is_live(&self) -> bool {
        !self.idle.is_zero()
    }

    /// Closes the Session's inputs: true once closed; false when unread inputs came
    /// (they are pending now). An apiserver that cannot close them (an older one, or
    /// one that keeps failing) is taken as closed, as before there was a close.
    async fn close(&mut self, runner: &RunnerClient) -> Result<bool, Failure> {
        for attempt in 1..=3 {
            match runner.close_inputs(self.cursor).await {
                Ok(answer) => {
                    if let Some(last) = answer.inputs.last() {
                        self.cursor = self.cursor.max(last.id);
                    }
                    let closed = answer.inputs.is_empty();
                    self.pending.extend(answer.inputs);
                    return Ok(closed);
                }
                Err(RunnerError::Finished) => return Err(Failure::Interrupted),
                Err(error) => {
                    tracing::warn!(
                        attempt,
                        error = %redact::scrub(&error.to_string()),
                        "cannot close the session's inputs"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Ok(true)
    }

    /// The next input, `None` once none came for the idle timeout;
    /// [`Failure::Interrupted`] when the session ended meanwhile.
    async fn next(
        &mut self,
        runner: &RunnerClient,
    ) -> Result<Option<runner::SessionInput>, Failure> {
        let deadline = tokio::time::Instant::now() + self.idle;
        loop {
            if let Some(input) = self.pending.pop_front() {
                return Ok(Some(input));
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                if self.close(runner).await? {
                    tracing::info!(idle = ?self.idle, "no input within the idle timeout; completing");
                    return Ok(None);
                }
                // Inputs came in meanwhile: answer them first.
                continue;
            }
            // Whole seconds, at least one, within what is left (rounded up).
            let wait = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            match runner.inputs(self.cursor, wait).await {
                Ok(poll) => {
                    if let Some(last) = poll.inputs.last() {
                        self.cursor = self.cursor.max(last.id);
                    }
                    self.pending.extend(poll.inputs);
                    if poll.finished && self.pending.is_empty() {
                        return Err(Failure::Interrupted);
                    }
                }
                Err(RunnerError::Finished) => return Err(Failure::Interrupted),
                Err(error) => {
                    tracing::warn!(
                        error = %redact::scrub(&error.to_string()),
                        "cannot poll for input; trying again"
                    );
                    let pause = Duration::from_secs(1).min(left);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

/// The program's environment: the Session's overrides and, when the Session carries
/// an earlier conversation over, `HOOKRUN_HISTORY` (its turns as JSON,
/// `[{"user", "assistant"}]`, oldest first).
fn program_env(context: &SessionContext) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = context
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    if !context.history.is_empty()
        && let Ok(history) = serde_json::to_string(&context.history)
    {
        env.push(("HOOKRUN_HISTORY".to_owned(), history));
    }
    env
}

/// Exec mode in a live session: the program takes the title, then each input, as a line
/// on stdin, and each turn's reply is what it prints until it is quiet for the turn gap.
async fn run_interactive(
    runner: &RunnerClient,
    spec: &hookrun_crds::agent::ExecSpec,
    context: &SessionContext,
    args: &Args,
) -> Result<String, Failure> {
    tracing::info!(command = ?spec.command, "running the agent's command, one turn per input");
    let env = program_env(context);
    let gap = Duration::from_millis(args.turn_gap_ms.max(1));
    let limit = Duration::from_secs(args.turn_seconds.max(1));
    let mut program = exec::Interactive::start(spec, &env, gap)
        .map_err(|error| Failure::Agent(error.to_string()))?;
    let mut inbox = Inbox::new(context.idle_timeout_seconds);
    let (mut input_id, mut input) = (0, context.title.clone());
    let last = loop {
        let turn = program
            .turn(&input, limit)
            .await
            .map_err(|error| Failure::Agent(error.to_string()))?;
        if !turn.reply.trim().is_empty() {
            let (text, _) =
                hookrun_crds::session::truncate_utf8(&turn.reply, exec::BATCH_MAX_BYTES);
            match runner.post_message(text).await {
                Ok(_) => {}
                Err(RunnerError::Finished) => return Err(Failure::Interrupted),
                Err(error) => tracing::warn!(
                    error = %redact::scrub(&error.to_string()),
                    "cannot post an event; going on"
                ),
            }
        }
        end_turn(runner, &turn.reply, input_id).await?;
        if turn.ended {
            break turn.reply;
        }
        match inbox.next(runner).await? {
            Some(next) => (input_id, input) = (next.id, next.content),
            None => break turn.reply,
        }
    };
    let outcome = program
        .finish(limit)
        .await
        .map_err(|error| Failure::Agent(error.to_string()))?;
    if outcome.succeeded() {
        Ok(last)
    } else {
        Err(Failure::Agent(outcome.failure_message()))
    }
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
    let env = program_env(context);
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
