//! `invoke`, `sessions`, `logs` and `send`: starting Sessions, watching them, and
//! talking into live ones.

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures::{AsyncBufReadExt, StreamExt, TryStreamExt};
use hookrun_crds::session::SessionEvent;
use hookrun_crds::{Session, SessionPhase, names};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, LogParams};
use serde::Serialize;
use serde_json::{Value, json};

use crate::cli::{InvokeArgs, LogsArgs, SendArgs, SessionsArgs};
use crate::context::{Context, Output};
use crate::ops::{self, Followed, explain};
use crate::output::{Style, age, print_value, render_table};

/// Exit code of a Session that ended in Error.
const EXIT_ERROR: u8 = 1;
/// Exit code of a wait that ran out before the Session ended.
const EXIT_TIMEOUT: u8 = 2;

/// The answer object, shaped like the HTTP API's wait-mode answer:
/// `{session, agentDefinition, response, phase[, message]}`, plus `timedOut: true` when
/// the wait ran out first.
pub fn answer(session: &Session, timed_out: bool) -> Value {
    let status = session.status.clone().unwrap_or_default();
    let mut body = json!({
        "session": session.name_any(),
        "agentDefinition": session.spec.agent,
        "response": if timed_out { None } else { status.response.clone() },
        "phase": status.phase().as_str(),
    });
    if let Some(message) = status.message.filter(|_| !timed_out) {
        body["message"] = message.into();
    }
    if timed_out {
        body["timedOut"] = true.into();
    }
    body
}

/// The exit code of an ended (or timed-out) wait.
pub fn exit_code(phase: SessionPhase, timed_out: bool) -> ExitCode {
    match (timed_out, phase) {
        (true, _) => ExitCode::from(EXIT_TIMEOUT),
        (false, SessionPhase::Error) => ExitCode::from(EXIT_ERROR),
        _ => ExitCode::SUCCESS,
    }
}

/// One event as a line: `time  type  content`.
pub fn event_line(event: &SessionEvent, style: Style) -> String {
    let time = event.timestamp.0.strftime("%H:%M:%S").to_string();
    format!(
        "{}  {:<24} {}",
        style.dim(&time),
        event.type_,
        event.content.trim_end()
    )
}

/// One event as a JSON line, with its id.
fn event_json(id: u64, event: &SessionEvent) -> Value {
    json!({"id": id, "type": event.type_, "content": event.content, "timestamp": event.timestamp})
}

/// Reads a `-` argument's text from stdin.
fn text_or_stdin(text: String, what: &str) -> anyhow::Result<String> {
    if text != "-" {
        return Ok(text);
    }
    let mut read = String::new();
    std::io::stdin()
        .read_to_string(&mut read)
        .with_context(|| format!("read the {what} from stdin"))?;
    Ok(read)
}

/// `kubectl hookrun invoke AGENT [TITLE]`.
pub async fn invoke(ctx: &Context, args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let title = match args.title {
        Some(title) => text_or_stdin(title, "title")?,
        None => format!("kubectl hookrun invoke — {}", args.agent),
    };
    let session = ops::invoke(ctx, &args.agent, &title, &args.env).await?;
    let name = session.name_any();
    if args.wait.is_none() && !args.follow {
        match ctx.output {
            Output::Table => println!("session/{name} created"),
            output => print_value(
                output,
                &json!({"session": name, "agentDefinition": args.agent}),
            )?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.output == Output::Table {
        eprintln!("session/{name} created");
    }
    let (last, timed_out) = watch_until_end(ctx, &name, args.follow, args.wait).await?;
    let last = last.unwrap_or(session);
    let phase = last.status.as_ref().map(|s| s.phase()).unwrap_or_default();
    match ctx.output {
        Output::Table => print_outcome(&last, timed_out, args.wait),
        output => print_value(output, &answer(&last, timed_out))?,
    }
    Ok(exit_code(phase, timed_out))
}

/// Follows `name` until it ends or `budget` runs out, printing events and phases when
/// `print` (as lines, or JSON lines with `-o json|yaml`). Returns the last copy seen and
/// whether the budget ran out first.
async fn watch_until_end(
    ctx: &Context,
    name: &str,
    print: bool,
    budget: Option<Duration>,
) -> anyhow::Result<(Option<Session>, bool)> {
    let style = Style::detect();
    let output = ctx.output;
    let stream = ops::follow(ctx, name);
    let mut last: Option<Session> = None;
    let mut phase = SessionPhase::Pending;
    let walk = async {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item? {
                Followed::Event { id, event } if print => match output {
                    Output::Table => println!("{}", event_line(&event, style)),
                    _ => println!("{}", event_json(id, &event)),
                },
                Followed::Phase(p) => {
                    phase = p;
                    if print && output == Output::Table {
                        eprintln!(
                            "{}",
                            style.dim(&format!("phase {}", style.paint(p.as_str())))
                        );
                    }
                }
                Followed::Finished(session) => {
                    last = Some(session);
                    break;
                }
                Followed::Event { .. } => {}
            }
        }
        anyhow::Ok(())
    };
    let timed_out = match budget {
        Some(budget) => match tokio::time::timeout(budget, walk).await {
            Ok(walked) => {
                walked?;
                false
            }
            Err(_) => true,
        },
        None => {
            walk.await?;
            false
        }
    };
    if timed_out {
        // The last copy, for the answer's phase.
        let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
        last = sessions.get_opt(name).await.ok().flatten();
        if last.is_none() {
            eprintln!("(last phase seen: {})", phase.as_str());
        }
    }
    Ok((last, timed_out))
}

fn print_outcome(session: &Session, timed_out: bool, budget: Option<Duration>) {
    let status = session.status.clone().unwrap_or_default();
    let name = session.name_any();
    if timed_out {
        eprintln!(
            "session/{name} is still {} after {}s; it runs on (`kubectl hookrun logs {name} -f`)",
            status.phase().as_str(),
            budget.map_or(0, |b| b.as_secs())
        );
        return;
    }
    match status.phase() {
        SessionPhase::Error => eprintln!(
            "session/{name} ended in Error: {}",
            status.message.as_deref().unwrap_or("no message")
        ),
        _ => {
            if let Some(response) = status.response {
                println!("{}", response.trim_end());
            }
        }
    }
}

/// One row of `sessions`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRow {
    pub name: String,
    pub agent: String,
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

fn session_row(s: &Session) -> SessionRow {
    let status = s.status.clone().unwrap_or_default();
    SessionRow {
        name: s.name_any(),
        agent: s.spec.agent.clone(),
        phase: status.phase().as_str().to_owned(),
        created: s.creation_timestamp().map(|t| t.0.to_string()),
        source: s.spec.trigger.as_ref().map(|t| t.source.clone()),
        message: status.message,
        response: status.response,
    }
}

/// `kubectl hookrun sessions [AGENT]`.
pub async fn list(ctx: &Context, args: &SessionsArgs) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let params = match &args.agent {
        Some(agent) => ListParams::default().labels(&format!(
            "{}={}",
            names::AGENT_LABEL,
            names::label_value(agent)
        )),
        None => ListParams::default(),
    };
    let mut items: Vec<Session> = sessions
        .list(&params)
        .await
        .map_err(|e| explain(e, "list", "sessions.hookrun.dev", ns))?
        .items
        .into_iter()
        // The label may be a hash of a long name: the spec says for certain.
        .filter(|s| args.agent.as_ref().is_none_or(|a| &s.spec.agent == a))
        .collect();
    items.sort_by_key(|s| (s.creation_timestamp().map(|t| t.0), s.name_any()));
    match ctx.output {
        Output::Table if items.is_empty() => eprintln!("No Sessions in {ns}."),
        Output::Table => {
            let now = Timestamp::now();
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|s| {
                    let r = session_row(s);
                    vec![
                        r.name,
                        r.agent,
                        r.phase,
                        s.creation_timestamp()
                            .map_or("-".to_owned(), |t| age(t.0, now)),
                        r.source.unwrap_or_else(|| "-".to_owned()),
                        r.message.unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &["NAME", "AGENT", "PHASE", "AGE", "SOURCE", "MESSAGE"],
                    &rows,
                    Style::detect()
                )
            );
        }
        output => print_value(output, &items.iter().map(session_row).collect::<Vec<_>>())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kubectl hookrun logs SESSION [-f] [--pod]`.
pub async fn logs(ctx: &Context, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    if args.pod {
        return pod_log(ctx, args).await;
    }
    let ns = &ctx.namespace;
    let style = Style::detect();
    if args.follow {
        let mut stream = std::pin::pin!(ops::follow(ctx, &args.session));
        let mut last_phase = None;
        while let Some(item) = stream.next().await {
            match item? {
                Followed::Event { id, event } => match ctx.output {
                    Output::Table => println!("{}", event_line(&event, style)),
                    _ => println!("{}", event_json(id, &event)),
                },
                Followed::Phase(p) => last_phase = Some(p),
                Followed::Finished(_) => break,
            }
        }
        return Ok(exit_code(last_phase.unwrap_or_default(), false));
    }
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let session = sessions
        .get_opt(&args.session)
        .await
        .map_err(|e| explain(e, "get", "sessions.hookrun.dev", ns))?
        .with_context(|| format!("no Session {:?} in namespace {ns}", args.session))?;
    let status = session.status.clone().unwrap_or_default();
    let first = status.first_event_id();
    match ctx.output {
        Output::Table => {
            if first > 1 {
                eprintln!("({} older events were dropped)", first - 1);
            }
            for event in &status.events {
                println!("{}", event_line(event, style));
            }
        }
        output => {
            let events: Vec<Value> = status
                .events
                .iter()
                .enumerate()
                .map(|(i, e)| event_json(first + i as u64, e))
                .collect();
            print_value(
                output,
                &json!({"session": args.session, "events": events, "count": events.len()}),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The session pod's container log, through `pods/log`. Clusters without a kubelet for
/// the pod (or where it is gone) cannot serve it: that is said plainly.
async fn pod_log(ctx: &Context, args: &LogsArgs) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let pod_name = sessions
        .get_opt(&args.session)
        .await
        .map_err(|e| explain(e, "get", "sessions.hookrun.dev", ns))?
        .with_context(|| format!("no Session {:?} in namespace {ns}", args.session))?
        .status
        .and_then(|s| s.pod_name)
        .unwrap_or_else(|| args.session.clone());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    // A pod no kubelet runs has no log: the API then answers 200 with nothing, which
    // would read as an empty log. Looking at the pod first tells the two apart (skipped
    // when `get pods` is not allowed: pods/log alone may be).
    match pods.get_opt(&pod_name).await {
        Ok(None) => anyhow::bail!(
            "the pod {pod_name} of session/{} no longer exists, so its log is gone; \
             `kubectl hookrun logs {}` (without --pod) shows the Session's events",
            args.session,
            args.session
        ),
        Ok(Some(pod)) if pod.spec.as_ref().is_none_or(|s| s.node_name.is_none()) => {
            anyhow::bail!(
                "the cluster cannot serve the log of pod {pod_name}: it was never scheduled to \
                 a node, so no kubelet holds its log (under `make dev` the local pod runner \
                 writes it to target/dev-logs/sessions/); `kubectl hookrun logs {}` (without \
                 --pod) shows the Session's events",
                args.session
            )
        }
        _ => {}
    }
    let params = LogParams {
        follow: args.follow,
        ..LogParams::default()
    };
    let unavailable = |e: kube::Error| match &e {
        kube::Error::Api(s) if s.is_forbidden() => explain(e, "get", "pods/log", ns),
        _ => anyhow::anyhow!(
            "the cluster cannot serve the log of pod {pod_name} ({}). pods/log needs the \
             pod to be on a node whose kubelet is reachable; `kubectl hookrun logs {}` (without \
             --pod) shows the Session's events instead",
            short_error(&e),
            args.session
        ),
    };
    let reader = pods
        .log_stream(&pod_name, &params)
        .await
        .map_err(unavailable)?;
    let mut lines = std::pin::pin!(reader.lines());
    let mut any = false;
    while let Some(line) = lines.try_next().await.context("read the pod's log")? {
        any = true;
        println!("{line}");
    }
    if !any {
        eprintln!("(the cluster returned an empty log for pod {pod_name})");
    }
    Ok(ExitCode::SUCCESS)
}

/// A kube error's message, without a long chain.
fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

/// `kubectl hookrun send SESSION MESSAGE`.
pub async fn send(ctx: &Context, args: SendArgs) -> anyhow::Result<ExitCode> {
    let message = text_or_stdin(args.message, "message")?;
    let answer = ops::send_input(ctx, &args.session, &message).await?;
    match ctx.output {
        Output::Table => {
            let how = if answer["buffered"] == true {
                "buffered (the Session's pod has not started; it reads it when it does)"
            } else {
                "delivered"
            };
            let id = answer["eventId"]
                .as_u64()
                .map(|id| format!(" as event {id}"))
                .unwrap_or_default();
            println!("{how}{id} to session/{}", args.session);
        }
        output => print_value(output, &answer)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookrun_crds::{SessionSpec, SessionStatus};

    fn session(phase: SessionPhase, response: Option<&str>, message: Option<&str>) -> Session {
        let mut s = Session::new(
            "echo-wh-cli-1",
            SessionSpec {
                agent: "echo".into(),
                ..SessionSpec::default()
            },
        );
        s.status = Some(SessionStatus {
            phase: Some(phase),
            response: response.map(str::to_owned),
            message: message.map(str::to_owned),
            ..SessionStatus::default()
        });
        s
    }

    #[test]
    fn answers_have_the_http_api_shape() {
        assert_eq!(
            answer(&session(SessionPhase::Complete, Some("hi"), None), false),
            json!({"session": "echo-wh-cli-1", "agentDefinition": "echo", "response": "hi", "phase": "Complete"})
        );
        assert_eq!(
            answer(&session(SessionPhase::Error, None, Some("exit 3")), false),
            json!({"session": "echo-wh-cli-1", "agentDefinition": "echo", "response": null, "phase": "Error", "message": "exit 3"})
        );
        assert_eq!(
            answer(&session(SessionPhase::Running, None, None), true),
            json!({"session": "echo-wh-cli-1", "agentDefinition": "echo", "response": null, "phase": "Running", "timedOut": true})
        );
    }

    #[test]
    fn exit_codes_say_how_it_ended() {
        assert_eq!(exit_code(SessionPhase::Complete, false), ExitCode::SUCCESS);
        assert_eq!(exit_code(SessionPhase::Error, false), ExitCode::from(1));
        assert_eq!(exit_code(SessionPhase::Running, true), ExitCode::from(2));
    }

    #[test]
    fn event_lines_are_plain_without_colour() {
        let event = SessionEvent {
            type_: "agent.message".into(),
            content: "hello\n".into(),
            timestamp: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T12:34:56Z".parse().expect("a time"),
            ),
            key: None,
        };
        assert_eq!(
            event_line(&event, Style { colour: false }),
            "12:34:56  agent.message            hello"
        );
    }
}
