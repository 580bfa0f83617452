//! What the page is sent about Agents and Sessions: small JSON views built from the
//! Kubernetes objects by pure functions, so the page never sees secrets (webhook URLs,
//! payloads, env values) and the shapes are tested without a cluster.

use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::session::{SessionEvent, truncate_utf8};
use hookrun_crds::{Agent, Session};
use serde::Serialize;

/// How many recent Sessions an Agent's entry lists.
pub const RECENT_SESSIONS: usize = 5;
/// The longest title preview in the Session list, in bytes.
pub const TITLE_PREVIEW_BYTES: usize = 160;

/// One Agent in the sidebar.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentView {
    pub name: String,
    /// Whether its `Ready` condition is `True`.
    pub ready: bool,
    /// The `Ready` condition's reason and message, when there is one.
    pub reason: Option<String>,
    pub message: Option<String>,
    /// `webhook`, `webhook (github)`, `schedule nightly (0 3 * * *)`, ...
    pub triggers: Vec<String>,
    pub next_schedule: Option<String>,
    /// Sessions not finished yet.
    pub running: usize,
    /// Its newest Sessions, newest first.
    pub recent: Vec<SessionView>,
}

/// One Session in the table (and the head of a transcript).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub name: String,
    pub agent: String,
    pub phase: &'static str,
    /// The title, cut to [`TITLE_PREVIEW_BYTES`] in lists.
    pub title: String,
    pub title_cut: bool,
    /// What started it (`webhook`, `schedule`, `cli`, ...).
    pub source: Option<String>,
    pub created: Option<String>,
    pub completed: Option<String>,
    /// Why it failed or waits.
    pub message: Option<String>,
}

/// One event of a transcript.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub id: u64,
    #[serde(rename = "type")]
    pub type_: String,
    pub content: String,
    pub timestamp: String,
}

fn scheme_name(scheme: SignatureScheme) -> &'static str {
    match scheme {
        SignatureScheme::Linear => "linear",
        SignatureScheme::Github => "github",
        SignatureScheme::Slack => "slack",
        SignatureScheme::StandardWebhooks => "standard-webhooks",
        SignatureScheme::Hmac => "hmac",
    }
}

/// The Session's view; `preview` cuts the title for lists.
pub fn session_view(session: &Session, preview: bool) -> SessionView {
    let status = session.status.clone().unwrap_or_default();
    let (title, title_cut) = if preview {
        let (cut, was_cut) = truncate_utf8(&session.spec.title, TITLE_PREVIEW_BYTES);
        (cut.to_owned(), was_cut)
    } else {
        (session.spec.title.clone(), false)
    };
    SessionView {
        name: session.metadata.name.clone().unwrap_or_default(),
        agent: session.spec.agent.clone(),
        phase: status.phase().as_str(),
        title,
        title_cut,
        source: session.spec.trigger.as_ref().map(|t| t.source.clone()),
        created: session
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        completed: status.completion_time.as_ref().map(|t| t.0.to_string()),
        message: status.message.clone(),
    }
}

/// The view of event `id`.
pub fn event_view(id: u64, event: &SessionEvent) -> EventView {
    EventView {
        id,
        type_: event.type_.clone(),
        content: event.content.clone(),
        timestamp: event.timestamp.0.to_string(),
    }
}

/// Sessions newest first (by creation time, then name for a stable order).
pub fn newest_first(sessions: &mut [Session]) {
    sessions.sort_by(|a, b| {
        let at = |s: &Session| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at(b)
            .cmp(&at(a))
            .then_with(|| b.metadata.name.cmp(&a.metadata.name))
    });
}

/// The Agent's view, given the namespace's Sessions newest first.
pub fn agent_view(agent: &Agent, sessions_newest_first: &[Session]) -> AgentView {
    let name = agent.metadata.name.clone().unwrap_or_default();
    let status = agent.status.clone().unwrap_or_default();
    let ready_condition = status.conditions.iter().find(|c| c.type_ == "Ready");
    let mut triggers = Vec::new();
    for trigger in &agent.spec.triggers {
        if let Some(webhook) = &trigger.webhook {
            let schemes: Vec<_> = webhook
                .signing_secrets()
                .into_iter()
                .map(|(scheme, _)| scheme_name(scheme))
                .collect();
            if schemes.is_empty() {
                triggers.push("webhook".to_owned());
            } else {
                triggers.push(format!("webhook ({})", schemes.join(", ")));
            }
        }
        if let Some(schedule) = &trigger.schedule {
            let suspended = if schedule.suspend { ", suspended" } else { "" };
            triggers.push(format!(
                "schedule {} ({}{suspended})",
                schedule.name, schedule.cron
            ));
        }
    }
    let own: Vec<&Session> = sessions_newest_first
        .iter()
        .filter(|s| s.spec.agent == name)
        .collect();
    AgentView {
        ready: ready_condition.is_some_and(|c| c.status == "True"),
        reason: ready_condition.map(|c| c.reason.clone()),
        message: ready_condition
            .map(|c| c.message.clone())
            .filter(|m| !m.is_empty()),
        triggers,
        next_schedule: status.next_schedule_time.clone(),
        running: own
            .iter()
            .filter(|s| !s.status.clone().unwrap_or_default().is_finished())
            .count(),
        recent: own
            .iter()
            .take(RECENT_SESSIONS)
            .map(|s| session_view(s, true))
            .collect(),
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(value: serde_json::Value) -> Agent {
        serde_json::from_value(value).expect("an Agent")
    }

    fn session(name: &str, agent: &str, created: &str, phase: Option<&str>) -> Session {
        let mut value = json!({
            "apiVersion": "hookrun.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"agent": agent, "title": format!("title of {name}"),
                     "trigger": {"source": "webhook", "payload": "secret payload"}}
        });
        if let Some(phase) = phase {
            value["status"] = json!({"phase": phase});
        }
        serde_json::from_value(value).expect("a Session")
    }

    #[test]
    fn an_agent_shows_readiness_triggers_and_its_own_recent_sessions() {
        let echo = agent(json!({
            "apiVersion": "hookrun.dev/v1alpha1", "kind": "Agent",
            "metadata": {"name": "echo"},
            "spec": {
                "models": ["hookrun/echo"],
                "triggers": [
                    {"webhook": {"githubSecret": "s3cret"}},
                    {"schedule": {"name": "nightly", "cron": "0 3 * * *"}}
                ]
            },
            "status": {
                "webhookUrl": "https://hooks.example/h/TOKEN",
                "nextScheduleTime": "2026-01-01T03:00:00Z",
                "conditions": [{"type": "Ready", "status": "True", "reason": "WebhookReady",
                                "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }));
        let mut sessions: Vec<Session> = (0..7)
            .map(|i| {
                session(
                    &format!("echo-{i}"),
                    "echo",
                    &format!("2026-01-01T00:00:0{i}Z"),
                    Some(if i < 5 { "Complete" } else { "Running" }),
                )
            })
            .chain([session("other-1", "other", "2026-01-01T00:01:00Z", None)])
            .collect();
        newest_first(&mut sessions);
        let view = agent_view(&echo, &sessions);
        assert_eq!(view.name, "echo");
        assert!(view.ready);
        assert_eq!(view.reason.as_deref(), Some("WebhookReady"));
        assert_eq!(view.message, None);
        assert_eq!(
            view.triggers,
            ["webhook (github)", "schedule nightly (0 3 * * *)"]
        );
        assert_eq!(view.next_schedule.as_deref(), Some("2026-01-01T03:00:00Z"));
        assert_eq!(view.running, 2);
        let recent: Vec<_> = view.recent.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(recent, ["echo-6", "echo-5", "echo-4", "echo-3", "echo-2"]);
        // Neither the webhook URL nor the signing secret reach the page.
        let text = serde_json::to_string(&view).expect("serialises");
        assert!(
            !text.contains("TOKEN") && !text.contains("s3cret"),
            "{text}"
        );
    }

    #[test]
    fn an_agent_without_status_is_not_ready() {
        let view = agent_view(
            &agent(json!({
                "apiVersion": "hookrun.dev/v1alpha1", "kind": "Agent",
                "metadata": {"name": "new"}, "spec": {"triggers": [{"webhook": {}}]}
            })),
            &[],
        );
        assert!(!view.ready);
        assert_eq!(view.reason, None);
        assert_eq!(view.triggers, ["webhook"]);
        assert_eq!(view.running, 0);
    }

    #[test]
    fn a_session_view_cuts_long_titles_in_lists_and_leaves_the_payload_out() {
        let mut long = session("s", "echo", "2026-01-01T00:00:00Z", None);
        long.spec.title = "é".repeat(TITLE_PREVIEW_BYTES);
        let listed = session_view(&long, true);
        assert!(listed.title_cut);
        assert!(listed.title.len() <= TITLE_PREVIEW_BYTES);
        assert_eq!(listed.phase, "Pending");
        assert_eq!(listed.source.as_deref(), Some("webhook"));
        let whole = session_view(&long, false);
        assert!(!whole.title_cut);
        assert_eq!(whole.title, long.spec.title);
        let text = serde_json::to_string(&whole).expect("serialises");
        assert!(!text.contains("secret payload"), "{text}");
    }
}
