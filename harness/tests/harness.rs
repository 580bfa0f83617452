//! The harness end to end, in-process, against a fake runner API and a fake model server
//! that speak the real formats (fixtures follow the providers' documentation).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hookrun_harness::provider::ApiKey;
use hookrun_harness::{Args, Outcome};
use hookrun_tests::fake_model::{
    FakeModel, Seen, anthropic_message, openai_completion, record, serve,
};
use serde_json::{Value, json};

const TOKEN: &str = "pod-bound-token-1";
const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789";
const OPENAI_KEY: &str = "sk-proj-test-0123456789";

/// The runner API as the apiserver serves it.
#[derive(Default)]
struct RunnerState {
    context: Value,
    seen: Mutex<Vec<Seen>>,
    /// Events accepted before the session counts as finished (409).
    events_before_finished: Option<usize>,
    /// Answer every call with this status and error code.
    refuse: Option<(StatusCode, &'static str)>,
    /// Written into the token file after the context is read: later calls must use it.
    rotate_token_to: Option<(PathBuf, &'static str)>,
    /// The first event post answers 503, as if its answer was lost.
    lose_first_event_answer: bool,
}

struct FakeRunner {
    url: String,
    state: Arc<RunnerState>,
}

impl FakeRunner {
    async fn start(state: RunnerState) -> Self {
        let state = Arc::new(state);
        let shared = state.clone();
        let router = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = shared.clone();
                async move { state.answer(method, uri, headers, body) }
            },
        );
        Self {
            url: serve(router).await,
            state,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }

    fn events(&self) -> Vec<String> {
        self.seen()
            .iter()
            .filter(|s| s.path == "/runner/v1/events")
            .map(|s| {
                assert_eq!(s.body["type"], "agent.message");
                s.body["content"].as_str().expect("content").to_string()
            })
            .collect()
    }

    fn completion(&self) -> Value {
        let completes: Vec<_> = self
            .seen()
            .into_iter()
            .filter(|s| s.path == "/runner/v1/complete")
            .collect();
        assert_eq!(completes.len(), 1, "exactly one completion");
        completes[0].body.clone()
    }
}

impl RunnerState {
    fn answer(&self, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        record(&self.seen, method.clone(), &uri, headers, &body);
        if let Some((status, code)) = self.refuse {
            return (
                status,
                axum::Json(json!({"error": code, "message": "refused"})),
            )
                .into_response();
        }
        match (method, uri.path()) {
            (Method::GET, "/runner/v1/session") => {
                if let Some((path, token)) = &self.rotate_token_to {
                    std::fs::write(path, token).expect("rotate the token");
                }
                axum::Json(self.context.clone()).into_response()
            }
            (Method::POST, "/runner/v1/events") => {
                let posted = self
                    .seen
                    .lock()
                    .expect("lock")
                    .iter()
                    .filter(|s| s.path == "/runner/v1/events")
                    .count();
                if self.lose_first_event_answer && posted == 1 {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "0")],
                        axum::Json(json!({"error": "unavailable", "message": "try again"})),
                    )
                        .into_response();
                }
                if self.events_before_finished.is_some_and(|n| posted > n) {
                    return (
                        StatusCode::CONFLICT,
                        axum::Json(json!({"error": "session_finished", "message": "done"})),
                    )
                        .into_response();
                }
                axum::Json(json!({"id": posted + 1})).into_response()
            }
            // Nothing came in while the turn ran: the inputs close.
            (Method::POST, "/runner/v1/inputs/close") => {
                axum::Json(json!({"closed": true, "inputs": []})).into_response()
            }
            (Method::POST, "/runner/v1/complete") => {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let phase = if body["status"] == "complete" {
                    "Complete"
                } else {
                    "Error"
                };
                axum::Json(json!({"phase": phase})).into_response()
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

fn token_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hookrun-harness-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join(name);
    std::fs::write(&path, format!("{TOKEN}\n")).expect("a token file");
    path
}

fn args(runner: &FakeRunner, token: PathBuf, model_url: &str) -> Args {
    Args {
        runner_url: runner.url.clone(),
        token_file: token,
        anthropic_base_url: model_url.to_string(),
        anthropic_api_key: Some(ApiKey::new(ANTHROPIC_KEY)),
        openai_base_url: format!("{model_url}/v1"),
        openai_api_key: Some(ApiKey::new(OPENAI_KEY)),
        max_tokens: 1024,
        model_timeout_seconds: 10,
        retry_attempts: 4,
        retry_seconds: 30,
        turn_gap_ms: 200,
        turn_seconds: 10,
        log_filter: "debug".into(),
    }
}

fn context(title: &str, models: &[&str], exec: Value) -> Value {
    json!({
        "session": "echo-wh-0a1b2c3d",
        "namespace": "default",
        "agent": "echo",
        "title": title,
        "system": "Be brief.",
        "models": models,
        "exec": exec,
        "env": [{"name": "GREETING", "value": "hi from the session"}],
        "trigger": {"source": "webhook"},
        "phase": "Pending"
    })
}

fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.header(name)
}

#[tokio::test]
async fn anthropic_answer_becomes_an_event_and_the_response() {
    let model = FakeModel::start(vec![(200, vec![], anthropic_message("Hello back!"))]).await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["anthropic/claude-sonnet-4-6"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("a1"), &model.url)).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(outcome.exit_code(), 0);

    let calls = model.seen();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, Method::POST);
    assert_eq!(calls[0].path, "/v1/messages");
    assert_eq!(header(&calls[0], "x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(header(&calls[0], "anthropic-version"), Some("2023-06-01"));
    assert_eq!(header(&calls[0], "content-type"), Some("application/json"));
    assert_eq!(
        calls[0].body,
        json!({
            "model": "claude-sonnet-4-6",
            "max_tokens": 1024,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "hello"}]
        })
    );

    let seen = runner.seen();
    let route: Vec<_> = seen
        .iter()
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        route,
        [
            "GET /runner/v1/session",
            "POST /runner/v1/events",
            "POST /runner/v1/inputs/close",
            "POST /runner/v1/complete"
        ]
    );
    for call in &seen {
        assert_eq!(
            header(call, "authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }
    assert_eq!(runner.events(), ["Hello back!"]);
    assert_eq!(
        runner.completion(),
        json!({"status": "complete", "response": "Hello back!"})
    );
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out() {
    let rate_limited = json!({
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"}
    });
    let model = FakeModel::start(vec![
        (429, vec![("retry-after", "1")], rate_limited),
        (200, vec![], anthropic_message("after the wait")),
    ])
    .await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["anthropic/claude-sonnet-4-6"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let started = Instant::now();
    let outcome = hookrun_harness::run(args(&runner, token_file("a2"), &model.url)).await;
    assert_eq!(outcome, Outcome::Completed);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was honoured ({:?})",
        started.elapsed()
    );
    assert_eq!(model.seen().len(), 2);
    assert_eq!(runner.completion()["response"], "after the wait");
}

#[tokio::test]
async fn overload_until_the_budget_runs_out_is_an_error_completion() {
    let overloaded =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    let model = FakeModel::start(vec![
        (529, vec![("retry-after", "0")], overloaded.clone()),
        (529, vec![("retry-after", "0")], overloaded.clone()),
        (529, vec![("retry-after", "0")], overloaded),
    ])
    .await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["anthropic/claude-sonnet-4-6"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let mut args = args(&runner, token_file("a3"), &model.url);
    args.retry_attempts = 3;
    let outcome = hookrun_harness::run(args).await;
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(model.seen().len(), 3);
    let completion = runner.completion();
    assert_eq!(completion["status"], "error");
    let message = completion["message"].as_str().expect("a message");
    assert!(message.contains("3 attempts"), "{message}");
    assert!(
        message.contains("overloaded_error: Overloaded"),
        "{message}"
    );
}

#[tokio::test]
async fn openai_400_is_an_error_with_the_providers_message_and_no_key() {
    let invalid = json!({
        "error": {
            "message": format!("Incorrect API key provided: {OPENAI_KEY}. You can find your API key at https://platform.openai.com/account/api-keys."),
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key"
        }
    });
    let model = FakeModel::start(vec![(400, vec![], invalid)]).await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["openai/gpt-4o-mini"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("o1"), &model.url)).await;
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(outcome.exit_code(), 1);
    assert_eq!(model.seen().len(), 1, "a 400 is not retried");
    let completion = runner.completion();
    assert_eq!(completion["status"], "error");
    let message = completion["message"].as_str().expect("a message");
    assert!(
        message.contains("openai rejected the request (400)"),
        "{message}"
    );
    assert!(
        message.contains("invalid_api_key: Incorrect API key provided"),
        "{message}"
    );
    assert!(!message.contains(OPENAI_KEY), "the key leaked: {message}");
    assert!(runner.events().is_empty());
}

#[tokio::test]
async fn openai_compatible_request_shape_and_no_key_for_local_servers() {
    let model = FakeModel::start(vec![(
        200,
        vec![],
        openai_completion("Hi! How can I help?"),
    )])
    .await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["openai/llama3.1"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let mut args = args(&runner, token_file("o2"), &model.url);
    args.openai_api_key = None;
    let outcome = hookrun_harness::run(args).await;
    assert_eq!(outcome, Outcome::Completed);
    let calls = model.seen();
    assert_eq!(calls[0].path, "/v1/chat/completions");
    assert_eq!(header(&calls[0], "authorization"), None);
    assert_eq!(
        calls[0].body,
        json!({
            "model": "llama3.1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"}
            ]
        })
    );
    assert_eq!(runner.completion()["response"], "Hi! How can I help?");
}

#[tokio::test]
async fn openai_sends_the_bearer_key() {
    let model = FakeModel::start(vec![(200, vec![], openai_completion("ok"))]).await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["openai/gpt-4o-mini"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("o3"), &model.url)).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        header(&model.seen()[0], "authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
}

#[tokio::test]
async fn missing_key_and_missing_models_say_what_to_set() {
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["anthropic/claude-sonnet-4-6"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let mut no_key = args(&runner, token_file("m1"), "http://127.0.0.1:9");
    no_key.anthropic_api_key = Some(ApiKey::new(""));
    assert_eq!(hookrun_harness::run(no_key).await, Outcome::Failed);
    let message = runner.completion()["message"].to_string();
    assert!(
        message.contains("ANTHROPIC_API_KEY is not set"),
        "{message}"
    );

    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &[], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("m2"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Failed);
    let message = runner.completion()["message"].to_string();
    assert!(
        message.contains("spec.models") && message.contains("spec.exec"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unreachable_model_api_is_an_error_completion() {
    // Bind then drop: nothing listens on the port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("an address")
        .port();
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["openai/gpt-4o-mini"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let mut args = args(
        &runner,
        token_file("u1"),
        &format!("http://127.0.0.1:{port}"),
    );
    args.retry_attempts = 2;
    assert_eq!(hookrun_harness::run(args).await, Outcome::Failed);
    let message = runner.completion()["message"].to_string();
    assert!(
        message.contains("did not answer after 2 attempts"),
        "{message}"
    );
}

#[tokio::test]
async fn exec_streams_lines_and_completes_with_the_whole_output() {
    let runner = FakeRunner::start(RunnerState {
        context: context(
            "hello",
            &[],
            json!({"command": ["sh", "-c", "echo one; echo two; sleep 0.6; echo three; printf '%s' \"$GREETING\""]}),
        ),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("e1"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    // Lines printed together travel together; the pause splits them.
    let events = runner.events();
    assert_eq!(events.join("\n"), "one\ntwo\nthree\nhi from the session");
    assert!((2..=4).contains(&events.len()), "{events:?}");
    assert!(!events[0].contains("three"), "{events:?}");
    assert_eq!(
        runner.completion(),
        json!({"status": "complete", "response": "one\ntwo\nthree\nhi from the session"})
    );
}

#[tokio::test]
async fn a_retried_event_post_resends_the_same_idempotency_key() {
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &[], json!({"command": ["sh", "-c", "echo one"]})),
        lose_first_event_answer: true,
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("k1"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    let keys: Vec<Value> = runner
        .seen()
        .iter()
        .filter(|s| s.path == "/runner/v1/events")
        .map(|s| s.body["idempotencyKey"].clone())
        .collect();
    assert_eq!(keys.len(), 2, "the lost post was retried: {keys:?}");
    assert!(keys[0].as_str().is_some_and(|k| k.len() == 32), "{keys:?}");
    assert_eq!(
        keys[0], keys[1],
        "the retry carries the first attempt's key"
    );
}

#[tokio::test]
async fn exec_cat_answers_with_the_title() {
    let runner = FakeRunner::start(RunnerState {
        context: context("hello there\n", &[], json!({"command": ["cat"]})),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("e2"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(runner.events(), ["hello there"]);
    assert_eq!(runner.completion()["response"], "hello there");
}

#[tokio::test]
async fn the_built_in_echo_model_answers_with_the_title_without_a_program_or_a_model_api() {
    let runner = FakeRunner::start(RunnerState {
        context: context("hello there\n", &["hookrun/echo"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    // No key, and a model URL nothing listens on: echo needs neither, nor any program.
    let outcome =
        hookrun_harness::run(args(&runner, token_file("echo"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(runner.events(), ["hello there"]);
    assert_eq!(
        runner.completion(),
        json!({"status": "complete", "response": "hello there"})
    );
}

#[tokio::test]
async fn exec_runs_in_its_working_dir() {
    let dir = std::env::temp_dir().canonicalize().expect("a temp dir");
    let runner = FakeRunner::start(RunnerState {
        context: context(
            "x",
            &[],
            json!({"command": ["pwd"], "workingDir": dir.to_str().expect("utf-8")}),
        ),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("e3"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        runner.completion()["response"],
        dir.to_str().expect("utf-8")
    );
}

#[tokio::test]
async fn a_failing_command_is_an_error_with_its_code_and_stderr() {
    let runner = FakeRunner::start(RunnerState {
        context: context(
            "x",
            &[],
            json!({"command": ["sh", "-c", "echo partial; echo 'disk on fire' >&2; exit 3"]}),
        ),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("e4"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Failed);
    assert_eq!(runner.events(), ["partial"]);
    assert_eq!(
        runner.completion(),
        json!({"status": "error", "message": "the command exited with code 3; end of stderr:\ndisk on fire"})
    );
}

#[tokio::test]
async fn a_missing_program_is_an_error_that_names_it() {
    let runner = FakeRunner::start(RunnerState {
        context: context("x", &[], json!({"command": ["/no/such/program", "--flag"]})),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("e5"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Failed);
    let message = runner.completion()["message"].to_string();
    assert!(
        message.contains("cannot start \\\"/no/such/program\\\""),
        "{message}"
    );
}

#[tokio::test]
async fn a_session_finished_elsewhere_stops_the_command() {
    let runner = FakeRunner::start(RunnerState {
        context: context(
            "x",
            &[],
            json!({"command": ["sh", "-c", "echo first; sleep 0.5; echo second; sleep 30"]}),
        ),
        events_before_finished: Some(1),
        ..RunnerState::default()
    })
    .await;
    let started = Instant::now();
    let outcome = hookrun_harness::run(args(&runner, token_file("e6"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Interrupted);
    assert_eq!(outcome.exit_code(), 3);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the command was stopped"
    );
    assert!(
        runner
            .seen()
            .iter()
            .all(|s| s.path != "/runner/v1/complete"),
        "no completion after the session finished"
    );
}

#[tokio::test]
async fn the_token_is_read_again_for_every_request() {
    let path = token_file("t1");
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &[], json!({"command": ["cat"]})),
        rotate_token_to: Some((path.clone(), "rotated-token")),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, path, "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Completed);
    let tokens: Vec<_> = runner
        .seen()
        .iter()
        .map(|s| header(s, "authorization").unwrap_or("").to_string())
        .collect();
    assert_eq!(
        tokens,
        [
            format!("Bearer {TOKEN}"),
            "Bearer rotated-token".to_string(),
            "Bearer rotated-token".to_string()
        ]
    );
}

#[tokio::test]
async fn an_unauthorized_token_exits_non_zero_without_retrying() {
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &[], json!({"command": ["cat"]})),
        refuse: Some((StatusCode::UNAUTHORIZED, "unauthorized")),
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("t2"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::Unreported);
    assert_eq!(outcome.exit_code(), 2);
    assert_eq!(runner.seen().len(), 1);
}

#[tokio::test]
async fn an_already_finished_session_runs_nothing() {
    let mut finished = context("hello", &[], json!({"command": ["cat"]}));
    finished["phase"] = json!("Complete");
    let runner = FakeRunner::start(RunnerState {
        context: finished,
        ..RunnerState::default()
    })
    .await;
    let outcome = hookrun_harness::run(args(&runner, token_file("t3"), "http://127.0.0.1:9")).await;
    assert_eq!(outcome, Outcome::NothingToDo);
    assert_eq!(runner.seen().len(), 1);
}

#[test]
fn version_flag_prints_the_version() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookrun-harness"))
        .arg("--version")
        .output()
        .expect("the binary runs");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("hookrun-harness {}", env!("CARGO_PKG_VERSION"))
    );
}

/// The binary as a pod runs it, with an egress proxy in its environment: the model API
/// (a name that resolves nowhere) is reached through the proxy, the runner API directly.
#[tokio::test]
async fn the_model_api_goes_through_the_proxy_of_the_environment_and_the_runner_api_does_not() {
    // The fake model server is the proxy: a proxied plain-HTTP request names the target
    // in its request line and Host header, and the path routes as usual.
    let proxy = FakeModel::start(vec![(200, vec![], openai_completion("via the proxy"))]).await;
    let runner = FakeRunner::start(RunnerState {
        context: context("hello", &["openai/gpt-4o-mini"], Value::Null),
        ..RunnerState::default()
    })
    .await;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookrun-harness"));
    for name in [
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HTTPS_PROXY",
        "https_proxy",
    ] {
        command.env_remove(name);
    }
    let output = command
        .arg("--runner-url")
        .arg(&runner.url)
        .arg("--token-file")
        .arg(token_file("p1"))
        .args(["--openai-base-url", "http://models.proxy-test.invalid/v1"])
        .args(["--retry-attempts", "1", "--model-timeout-seconds", "10"])
        .env("OPENAI_API_KEY", OPENAI_KEY)
        .env("HTTP_PROXY", &proxy.url)
        .env("http_proxy", &proxy.url)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the harness finishes within 30 s")
        .expect("the harness runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let calls = proxy.seen();
    assert_eq!(calls.len(), 1, "only the model call goes through the proxy");
    assert_eq!(calls[0].path, "/v1/chat/completions");
    assert_eq!(header(&calls[0], "host"), Some("models.proxy-test.invalid"));
    assert_eq!(runner.completion()["response"], "via the proxy");
}
