//! Stand-in for the shared operations (invoke, send input, follow) until the plugin's
//! own `ops` module lands; the console calls only these signatures.

use std::collections::BTreeMap;

use anyhow::Context as _;
use futures::{Stream, StreamExt};
use hookrun_crds::session::{SessionEvent, SessionTrigger};
use hookrun_crds::{Agent, Session, SessionPhase, SessionSpec, names};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher;
use rand::RngCore;

use crate::context::Context;

/// What following a Session yields.
#[derive(Debug, Clone)]
pub enum Followed {
    Event { id: u64, event: SessionEvent },
    Phase(SessionPhase),
    Finished(Box<Session>),
}

/// Creates a Session of `agent` through the Kubernetes API as the user.
pub async fn invoke(
    ctx: &Context,
    agent: &str,
    title: &str,
    env: &[(String, String)],
) -> anyhow::Result<Session> {
    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    agents
        .get(agent)
        .await
        .with_context(|| format!("read Agent {agent}"))?;
    let mut suffix = [0u8; 4];
    rand::rng().fill_bytes(&mut suffix);
    let session = Session {
        metadata: ObjectMeta {
            name: Some(names::session_name(
                agent,
                &format!("cli-{}", hex::encode(suffix)),
            )),
            labels: Some(BTreeMap::from([(
                names::AGENT_LABEL.to_owned(),
                names::label_value(agent),
            )])),
            ..ObjectMeta::default()
        },
        spec: SessionSpec {
            agent: agent.to_owned(),
            title: title.to_owned(),
            env: env
                .iter()
                .map(|(name, value)| hookrun_crds::session::SessionEnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            trigger: Some(SessionTrigger {
                source: "cli".to_owned(),
                ..SessionTrigger::default()
            }),
            ..SessionSpec::default()
        },
        status: None,
    };
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    sessions
        .create(&PostParams::default(), &session)
        .await
        .with_context(|| format!("create a Session of Agent {agent}"))
}

/// Puts a message into a live Session as the user.
pub async fn send_input(
    ctx: &Context,
    session: &str,
    message: &str,
) -> anyhow::Result<serde_json::Value> {
    let _ = (ctx, session, message);
    anyhow::bail!("sending input is not available in this build")
}

/// Follows one Session from a watch: its new events once each, in order, its phase
/// changes, and its end.
pub fn follow(
    ctx: &Context,
    session: &str,
) -> impl Stream<Item = anyhow::Result<Followed>> + Send + use<> {
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={session}"));
    let mut next_id = 1u64;
    let mut phase = None;
    watcher::watcher(sessions, config)
        .flat_map(move |event| {
            let mut out = Vec::new();
            match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    let status = s.status.clone().unwrap_or_default();
                    let first = status.first_event_id();
                    for (i, event) in status.events.iter().enumerate() {
                        let id = first + i as u64;
                        if id >= next_id {
                            out.push(Ok(Followed::Event {
                                id,
                                event: event.clone(),
                            }));
                            next_id = id + 1;
                        }
                    }
                    if phase != Some(status.phase()) {
                        phase = Some(status.phase());
                        out.push(Ok(Followed::Phase(status.phase())));
                    }
                    if status.is_finished() {
                        out.push(Ok(Followed::Finished(Box::new(s))));
                    }
                }
                Ok(_) => {}
                Err(error) => out.push(Err(anyhow::Error::new(error).context("watch the Session"))),
            }
            futures::stream::iter(out)
        })
        .scan(false, |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            *ended = matches!(item, Ok(Followed::Finished(_)));
            futures::future::ready(Some(item))
        })
}
