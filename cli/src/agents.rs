//! `agents`, `url` and `rotate`: what Agents there are, how they are reached, and a
//! new token for one.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use hookrun_crds::{Agent, Session, names};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::cli::{AgentsArgs, RotateArgs, UrlArgs};
use crate::context::{Context, Output};
use crate::ops::{explain, random_hex, secret_value};
use crate::output::{Style, mask_token, print_value, render_table};

/// One row of `agents`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentRow {
    pub namespace: String,
    pub name: String,
    /// `True`, `False` or `Unknown` (no condition yet).
    pub ready: String,
    pub reason: String,
    pub message: String,
    /// `webhook`, `schedule`.
    pub triggers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_schedule: Option<String>,
    /// Sessions of this Agent not finished yet (pending, queued or running).
    pub running: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The row of one Agent, given how many of its Sessions are unfinished (pure).
pub fn agent_row(agent: &Agent, running: usize, show_url: bool) -> AgentRow {
    let status = agent.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    let mut triggers: Vec<String> = Vec::new();
    for trigger in &agent.spec.triggers {
        for (kind, present) in [
            ("webhook", trigger.webhook.is_some()),
            ("schedule", trigger.schedule.is_some()),
        ] {
            if present && !triggers.iter().any(|t| t == kind) {
                triggers.push(kind.to_owned());
            }
        }
    }
    AgentRow {
        namespace: agent.namespace().unwrap_or_default(),
        name: agent.name_any(),
        ready: ready.map_or("Unknown".to_owned(), |c| c.status.clone()),
        reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
        message: ready.map(|c| c.message.clone()).unwrap_or_default(),
        triggers,
        next_schedule: status.next_schedule_time,
        running,
        url: show_url
            .then(|| status.webhook_url.as_deref().map(mask_token))
            .flatten(),
    }
}

/// The table of `agents`.
pub fn agents_table(
    rows: &[AgentRow],
    all_namespaces: bool,
    show_url: bool,
    style: Style,
) -> String {
    let mut headers = Vec::new();
    if all_namespaces {
        headers.push("NAMESPACE");
    }
    headers.extend(["NAME", "READY", "REASON", "TRIGGERS", "NEXT RUN", "RUNNING"]);
    if show_url {
        headers.push("URL");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = Vec::new();
            if all_namespaces {
                row.push(r.namespace.clone());
            }
            row.extend([
                r.name.clone(),
                r.ready.clone(),
                r.reason.clone(),
                if r.triggers.is_empty() {
                    "-".to_owned()
                } else {
                    r.triggers.join(",")
                },
                r.next_schedule.clone().unwrap_or_else(|| "-".to_owned()),
                r.running.to_string(),
            ]);
            if show_url {
                row.push(r.url.clone().unwrap_or_else(|| "-".to_owned()));
            }
            row
        })
        .collect();
    render_table(&headers, &cells, style)
}

/// `kubectl hookrun agents`.
pub async fn list(ctx: &Context, args: &AgentsArgs) -> anyhow::Result<ExitCode> {
    // explain() reads "" as all namespaces.
    let scope = if args.all_namespaces {
        ""
    } else {
        ctx.namespace.as_str()
    };
    let (agents, sessions): (Api<Agent>, Api<Session>) = if args.all_namespaces {
        (Api::all(ctx.client.clone()), Api::all(ctx.client.clone()))
    } else {
        (
            Api::namespaced(ctx.client.clone(), &ctx.namespace),
            Api::namespaced(ctx.client.clone(), &ctx.namespace),
        )
    };
    let agents = agents
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, "list", "agents.hookrun.dev", scope))?
        .items;
    let sessions = sessions
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, "list", "sessions.hookrun.dev", scope))?
        .items;
    let mut running: BTreeMap<(String, String), usize> = BTreeMap::new();
    for session in &sessions {
        if !session.status.as_ref().is_some_and(|s| s.is_finished()) {
            *running
                .entry((
                    session.namespace().unwrap_or_default(),
                    session.spec.agent.clone(),
                ))
                .or_default() += 1;
        }
    }
    let rows: Vec<AgentRow> = agents
        .iter()
        .map(|a| {
            let key = (a.namespace().unwrap_or_default(), a.name_any());
            agent_row(a, running.get(&key).copied().unwrap_or(0), args.show_url)
        })
        .collect();
    match ctx.output {
        Output::Table if rows.is_empty() => eprintln!(
            "No Agents in {}.",
            if args.all_namespaces {
                "any namespace"
            } else {
                scope
            }
        ),
        Output::Table => print!(
            "{}",
            agents_table(&rows, args.all_namespaces, args.show_url, Style::detect())
        ),
        output => print_value(output, &rows)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn get_agent(ctx: &Context, name: &str) -> anyhow::Result<Agent> {
    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    agents
        .get_opt(name)
        .await
        .map_err(|e| explain(e, "get", "agents.hookrun.dev", &ctx.namespace))?
        .with_context(|| format!("no Agent {name:?} in namespace {}", ctx.namespace))
}

/// Why an Agent has no URL, from its Ready condition.
fn no_url(agent: &Agent) -> anyhow::Error {
    let status = agent.status.clone().unwrap_or_default();
    match status.conditions.iter().find(|c| c.type_ == "Ready") {
        Some(c) => anyhow::anyhow!(
            "the Agent {} has no webhook URL: {} ({})",
            agent.name_any(),
            c.message,
            c.reason
        ),
        None => anyhow::anyhow!(
            "the Agent {} has no webhook URL yet: is the hookrun operator running and watching namespace {}?",
            agent.name_any(),
            agent.namespace().unwrap_or_default()
        ),
    }
}

/// The Agent's managed Secret, which holds the full URL.
async fn webhook_secret(ctx: &Context, agent: &str) -> anyhow::Result<Option<Secret>> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    secrets
        .get_opt(&names::webhook_secret_name(agent))
        .await
        .map_err(|e| explain(e, "get", "secrets", &ctx.namespace))
}

/// The URL to print: from status, masked; or with its token, from the managed Secret
/// (also when status is redacted and the token is asked for).
async fn shown_url(ctx: &Context, agent: &Agent, show_token: bool) -> anyhow::Result<String> {
    let status_url = agent
        .status
        .as_ref()
        .and_then(|s| s.webhook_url.clone())
        .ok_or_else(|| no_url(agent))?;
    if !show_token {
        return Ok(mask_token(&status_url));
    }
    let secret = webhook_secret(ctx, &agent.name_any()).await?;
    secret
        .as_ref()
        .and_then(|s| secret_value(s, names::secret_keys::URL))
        .with_context(|| {
            format!(
                "the Agent's Secret {} holds no url",
                names::webhook_secret_name(&agent.name_any())
            )
        })
}

fn print_url(ctx: &Context, agent: &str, url: &str, masked: bool) -> anyhow::Result<()> {
    match ctx.output {
        Output::Table => {
            println!("{url}");
            if masked && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprintln!("(token masked: --show-token prints it)");
            }
            Ok(())
        }
        output => print_value(
            output,
            &json!({"agent": agent, "namespace": ctx.namespace, "url": url}),
        ),
    }
}

/// `kubectl hookrun url AGENT`.
pub async fn url(ctx: &Context, args: &UrlArgs) -> anyhow::Result<ExitCode> {
    let agent = get_agent(ctx, &args.agent).await?;
    let url = shown_url(ctx, &agent, args.show_token).await?;
    print_url(ctx, &args.agent, &url, !args.show_token)?;
    Ok(ExitCode::SUCCESS)
}

/// `kubectl hookrun rotate AGENT`: sets a fresh `hookrun.dev/rotate-token` (and with
/// `--grace`, `hookrun.dev/rotation-grace`), then waits until the operator answered that
/// value with a new token and URL.
pub async fn rotate(ctx: &Context, args: &RotateArgs) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let before = get_agent(ctx, &args.agent).await?;
    if before.spec.webhook().is_none() {
        anyhow::bail!(
            "the Agent {} has no webhook trigger: there is no token to rotate",
            args.agent
        );
    }
    let old_url = before.status.as_ref().and_then(|s| s.webhook_url.clone());
    let value = format!("{}-{}", Timestamp::now().as_second(), random_hex(6));
    let mut annotations = serde_json::Map::new();
    annotations.insert(names::ROTATE_TOKEN_ANNOTATION.into(), value.clone().into());
    if let Some(grace) = args.grace {
        annotations.insert(
            names::ROTATION_GRACE_ANNOTATION.into(),
            format!("{}s", grace.as_secs()).into(),
        );
    }
    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), ns);
    agents
        .patch(
            &args.agent,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .map_err(|e| explain(e, "patch", "agents.hookrun.dev", ns))?;
    let redacted = old_url
        .as_deref()
        .is_none_or(|u| u.ends_with(names::REDACTED_TOKEN));
    let rotated = if redacted {
        // Status never shows the token: the Secret says when it answers our value.
        wait_for_secret_rotation(ctx, &args.agent, &value, args.timeout).await?;
        get_agent(ctx, &args.agent).await?
    } else {
        wait_for_new_url(&agents, &args.agent, old_url.as_deref(), ns, args.timeout).await?
    };
    let url = shown_url(ctx, &rotated, args.show_token).await?;
    if ctx.output == Output::Table {
        let grace = match args.grace {
            Some(g) if g.is_zero() => "the previous token no longer works".to_owned(),
            Some(g) => format!("the previous token works for {}s more", g.as_secs()),
            None => "the previous token works for the Agent's rotation grace".to_owned(),
        };
        eprintln!("rotated agent/{} ({grace}); the new URL:", args.agent);
    }
    print_url(ctx, &args.agent, &url, !args.show_token)?;
    Ok(ExitCode::SUCCESS)
}

/// Waits on a watch of the Agent until its status URL differs from `old`.
async fn wait_for_new_url(
    agents: &Api<Agent>,
    name: &str,
    old: Option<&str>,
    ns: &str,
    timeout: Duration,
) -> anyhow::Result<Agent> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher::watcher(agents.clone(), config));
    let wait = async {
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => {
                    let url = a.status.as_ref().and_then(|s| s.webhook_url.as_deref());
                    if url.is_some() && url != old {
                        return Ok(a);
                    }
                }
                Ok(watcher::Event::Delete(_)) => anyhow::bail!("the Agent {name} was deleted"),
                Ok(_) => {}
                Err(error) => {
                    return Err(anyhow::Error::new(error)
                        .context(format!("watch agents.hookrun.dev in namespace {ns}")));
                }
            }
        }
        anyhow::bail!("the watch of the Agent {name} ended")
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        anyhow::anyhow!(
            "the operator wrote no new URL for the Agent {name} within {}s (the rotation is \
             requested and happens when the operator runs)",
            timeout.as_secs()
        )
    })?
}

/// Waits until the Agent's Secret says its token answers rotation `value`.
async fn wait_for_secret_rotation(
    ctx: &Context,
    agent: &str,
    value: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let secret = webhook_secret(ctx, agent).await?;
        let answered = secret.as_ref().and_then(|s| {
            s.meta()
                .annotations
                .as_ref()?
                .get(names::ROTATED_FOR_ANNOTATION)
                .cloned()
        });
        if answered.as_deref() == Some(value) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the operator minted no new token for the Agent {agent} within {}s",
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(yaml: &str) -> Agent {
        serde_yaml::from_str(yaml).expect("an Agent")
    }

    #[test]
    fn rows_say_ready_triggers_and_mask_the_url() {
        let a = agent(
            "apiVersion: hookrun.dev/v1alpha1\nkind: Agent\nmetadata: {name: echo, namespace: team}\n\
             spec:\n  models: [hookrun/echo]\n  triggers:\n  - webhook: {}\n  - schedule: {name: nightly, cron: '0 3 * * *'}\n\
             status:\n  webhookUrl: http://h/webhooks/team/echo/tok\n  nextScheduleTime: '2026-01-02T03:00:00Z'\n\
             \x20 conditions: [{type: Ready, status: 'True', reason: WebhookReady, message: ok, lastTransitionTime: '2026-01-01T00:00:00Z'}]\n",
        );
        let row = agent_row(&a, 2, true);
        assert_eq!(row.ready, "True");
        assert_eq!(row.reason, "WebhookReady");
        assert_eq!(row.triggers, ["webhook", "schedule"]);
        assert_eq!(row.url.as_deref(), Some("http://h/webhooks/team/echo/****"));
        assert_eq!(agent_row(&a, 2, false).url, None);
        let table = agents_table(&[row], false, false, Style { colour: false });
        assert_eq!(
            table,
            "NAME   READY   REASON         TRIGGERS           NEXT RUN               RUNNING\n\
             echo   True    WebhookReady   webhook,schedule   2026-01-02T03:00:00Z   2\n"
        );
    }

    #[test]
    fn an_agent_without_status_is_unknown() {
        let a = agent(
            "apiVersion: hookrun.dev/v1alpha1\nkind: Agent\nmetadata: {name: new}\nspec: {models: [hookrun/echo]}\n",
        );
        let row = agent_row(&a, 0, true);
        assert_eq!((row.ready.as_str(), row.url), ("Unknown", None));
        assert!(row.triggers.is_empty());
    }
}
