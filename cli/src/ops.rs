//! The operations the commands and the console share: start a Session, put input into a
//! live one, follow one from a watch. All of them act as the user's kubeconfig identity
//! through the Kubernetes API; a refusal names the RBAC verb and resource that is missing.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use futures::{Stream, StreamExt};
use hookrun_crds::grant::{Grant, GrantSpec, GrantVerb};
use hookrun_crds::names;
use hookrun_crds::session::{SessionEnvVar, SessionEvent, SessionTrigger};
use hookrun_crds::{Agent, Session, SessionPhase, SessionSpec};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::context::Context;

/// How long `send_input` waits for the operator to mint its Grant's URL and token.
const GRANT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The lifetime of the Grant `send_input` creates for one message: long enough to mint
/// and use it, short enough that a crash between create and delete leaves nothing useful.
const SEND_GRANT_TTL_SECONDS: i64 = 60;
/// The label of the Grants `send_input` creates, so `kubectl get grants` says what they are.
pub const SEND_GRANT_LABEL: &str = "kubectl hookrun send";
/// The trigger source of Sessions started from the command line or the console.
pub const TRIGGER_SOURCE: &str = "cli";

/// A Kubernetes API error turned into a message a person can act on: a refusal names the
/// RBAC verb, resource and namespace that are missing; a missing object names itself.
/// An empty `namespace` stands for all namespaces (`-A`).
pub fn explain(error: kube::Error, verb: &str, resource: &str, namespace: &str) -> anyhow::Error {
    let scope = if namespace.is_empty() {
        "in all namespaces".to_owned()
    } else {
        format!("in namespace {namespace}")
    };
    match &error {
        kube::Error::Api(status) if status.is_forbidden() => anyhow::anyhow!(
            "forbidden: your kubeconfig identity may not {verb} {resource} {scope} \
             (ask for an RBAC Role granting the verb \"{verb}\" on \"{resource}\"): {}",
            status.message
        ),
        kube::Error::Api(status) if status.code == 401 => anyhow::anyhow!(
            "unauthorized: the cluster did not accept your kubeconfig credentials ({})",
            status.message
        ),
        _ => anyhow::Error::new(error).context(format!("{verb} {resource} {scope}")),
    }
}

/// Whether a Kubernetes API error is a 404.
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.is_not_found())
}

/// A fresh random suffix of `len` hex digits.
pub fn random_hex(len: usize) -> String {
    (0..len)
        .map(|_| char::from_digit(rand::random_range(0..16u32), 16).unwrap_or('0'))
        .collect()
}

/// Starts a Session of `agent` with `title` and per-session `env`, through the Kubernetes
/// API as the user (RBAC: `create sessions.hookrun.dev`), after checking that the Agent
/// exists (`get agents.hookrun.dev`). The Session is owned by its Agent, as webhook
/// Sessions are, and carries the trigger source `cli`.
pub async fn invoke(
    ctx: &Context,
    agent: &str,
    title: &str,
    env: &[(String, String)],
) -> anyhow::Result<Session> {
    let ns = &ctx.namespace;
    let agents: Api<Agent> = Api::namespaced(ctx.client.clone(), ns);
    let found = agents
        .get_opt(agent)
        .await
        .map_err(|e| explain(e, "get", "agents.hookrun.dev", ns))?
        .with_context(|| format!("no Agent {agent:?} in namespace {ns}"))?;
    let session = new_session(&found, ns, title, env);
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    sessions
        .create(&PostParams::default(), &session)
        .await
        .map_err(|e| explain(e, "create", "sessions.hookrun.dev", ns))
}

/// The Session `invoke` creates for `agent` (pure, so it is tested without a cluster).
fn new_session(agent: &Agent, namespace: &str, title: &str, env: &[(String, String)]) -> Session {
    let name = agent.name_any();
    let owner = agent.uid().map(|uid| OwnerReference {
        api_version: Agent::api_version(&()).into_owned(),
        kind: Agent::kind(&()).into_owned(),
        name: name.clone(),
        uid,
        controller: Some(true),
        // Not blocking the owner's deletion: that would need `update agents/finalizers`
        // where OwnerReferencesPermissionEnforcement runs, a right users rarely hold.
        block_owner_deletion: None,
    });
    Session {
        metadata: ObjectMeta {
            name: Some(names::session_name(
                &name,
                &format!("{TRIGGER_SOURCE}-{}", random_hex(8)),
            )),
            namespace: Some(namespace.to_owned()),
            labels: Some(
                [
                    (names::AGENT_LABEL.to_owned(), names::label_value(&name)),
                    (
                        names::MANAGED_BY_LABEL.to_owned(),
                        names::MANAGED_BY.to_owned(),
                    ),
                ]
                .into(),
            ),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: SessionSpec {
            agent: name,
            title: title.to_owned(),
            env: env
                .iter()
                .map(|(name, value)| SessionEnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            trigger: Some(SessionTrigger {
                source: TRIGGER_SOURCE.to_owned(),
                ..SessionTrigger::default()
            }),
            session_key: None,
            history: Vec::new(),
        },
        status: None,
    }
}

/// What a new Grant looks like: one verb, a TTL, a label (pure).
pub fn new_grant(
    name: &str,
    namespace: &str,
    session: &str,
    ttl_seconds: Option<i64>,
    label: Option<&str>,
) -> Grant {
    let mut grant = Grant::new(
        name,
        GrantSpec {
            session: session.to_owned(),
            verbs: vec![GrantVerb::SendInput],
            ttl_seconds,
            label: label.map(str::to_owned),
            revoked: false,
        },
    );
    grant.metadata.namespace = Some(namespace.to_owned());
    grant
}

/// Creates a Grant (RBAC: `create grants.hookrun.dev`) and waits until the operator has
/// written its URL into status; returns the Grant as it then is.
pub async fn create_grant(
    ctx: &Context,
    session: &str,
    ttl_seconds: Option<i64>,
    label: Option<&str>,
) -> anyhow::Result<Grant> {
    let ns = &ctx.namespace;
    let grants: Api<Grant> = Api::namespaced(ctx.client.clone(), ns);
    let name = format!(
        "{}-{}",
        names::label_value(session)
            .chars()
            .take(40)
            .collect::<String>()
            .trim_end_matches('-'),
        random_hex(6)
    );
    let grant = new_grant(&name, ns, session, ttl_seconds, label);
    grants
        .create(&PostParams::default(), &grant)
        .await
        .map_err(|e| explain(e, "create", "grants.hookrun.dev", ns))?;
    wait_for_grant_url(&grants, &name, ns).await
}

/// Waits (on a watch of that one Grant) until its status holds a URL, or says why not.
async fn wait_for_grant_url(grants: &Api<Grant>, name: &str, ns: &str) -> anyhow::Result<Grant> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher::watcher(grants.clone(), config));
    let wait = async {
        while let Some(event) = stream.next().await {
            let grant = match event {
                Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) => g,
                Ok(watcher::Event::Delete(_)) => {
                    anyhow::bail!("the Grant {name} was deleted before it got a URL")
                }
                Ok(_) => continue,
                Err(error) => return Err(watch_error(error, "grants.hookrun.dev", ns)),
            };
            let status = grant.status.clone().unwrap_or_default();
            if status.url.is_some() {
                return Ok(grant);
            }
            if let Some(refused) = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == "False")
            {
                anyhow::bail!(
                    "the operator did not activate the Grant {name}: {} ({})",
                    refused.message,
                    refused.reason
                );
            }
        }
        anyhow::bail!("the watch of the Grant {name} ended")
    };
    tokio::time::timeout(GRANT_READY_TIMEOUT, wait)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the Grant {name} got no URL within {}s: is the hookrun operator running?",
                GRANT_READY_TIMEOUT.as_secs()
            )
        })?
}

/// The full URL (token included) of a Grant, from its token Secret (RBAC: `get secrets`).
/// Waits for the Secret briefly: the operator creates it before it writes the status.
pub async fn grant_url(ctx: &Context, grant: &str) -> anyhow::Result<String> {
    let ns = &ctx.namespace;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let secret_name = names::grant_secret_name(grant);
    let deadline = tokio::time::Instant::now() + GRANT_READY_TIMEOUT;
    loop {
        let secret = secrets
            .get_opt(&secret_name)
            .await
            .map_err(|e| explain(e, "get", "secrets", ns))?;
        if let Some(url) = secret
            .as_ref()
            .and_then(|s| secret_value(s, names::secret_keys::URL))
        {
            return Ok(url);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the Grant {grant}'s token Secret {secret_name} has no url yet"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One key of a Secret as text.
pub fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    let data = secret.data.as_ref()?.get(key)?;
    String::from_utf8(data.0.clone()).ok()
}

/// Puts `message` into the live Session `session` as the user. Users hold no right to
/// write Session status (that would let them forge agent events); a short-lived Grant is
/// the path that respects RBAC: create it (`create grants.hookrun.dev`), read its token
/// Secret (`get secrets`), POST the message to its URL, delete it. Answers the hookrun
/// apiserver's JSON (`delivered` while the Session runs, `buffered` while it is pending).
pub async fn send_input(
    ctx: &Context,
    session: &str,
    message: &str,
) -> anyhow::Result<serde_json::Value> {
    let ns = &ctx.namespace;
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let current = sessions
        .get_opt(session)
        .await
        .map_err(|e| explain(e, "get", "sessions.hookrun.dev", ns))?
        .with_context(|| format!("no Session {session:?} in namespace {ns}"))?;
    if let Some(phase) = current.status.as_ref().map(|s| s.phase())
        && phase.is_finished()
    {
        anyhow::bail!(
            "the Session {session} has finished ({}): it takes no more input",
            phase.as_str()
        );
    }
    let grant = create_grant(
        ctx,
        session,
        Some(SEND_GRANT_TTL_SECONDS),
        Some(SEND_GRANT_LABEL),
    )
    .await?;
    let grant_name = grant.name_any();
    let answer = async {
        let url = grant_url(ctx, &grant_name).await?;
        post_message(&url, message).await
    }
    .await;
    let grants: Api<Grant> = Api::namespaced(ctx.client.clone(), ns);
    let deleted = grants.delete(&grant_name, &DeleteParams::default()).await;
    let answer = answer?;
    if let Err(error) = deleted
        && !is_not_found(&error)
    {
        eprintln!(
            "warning: could not delete the Grant {grant_name} (it expires in {SEND_GRANT_TTL_SECONDS}s): {:#}",
            explain(error, "delete", "grants.hookrun.dev", ns)
        );
    }
    Ok(answer)
}

/// POSTs `{"message"}` to a Grant URL; 200 and 202 answer its JSON, the rest a clear error.
async fn post_message(url: &str, message: &str) -> anyhow::Result<serde_json::Value> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("build an HTTP client")?;
    let response = client
        .post(url)
        .json(&serde_json::json!({ "message": message }))
        .send()
        .await
        // The URL holds the token: name only the host.
        .map_err(|e| {
            anyhow::anyhow!(
                "could not reach the hookrun apiserver at {}: {}",
                host_of(url),
                e.without_url()
            )
        })?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    let said = body["message"].as_str().unwrap_or_default().to_owned();
    match status.as_u16() {
        200 | 202 => Ok(body),
        404 => anyhow::bail!("the Session no longer exists (404){}", suffix(&said)),
        410 => anyhow::bail!(
            "the Session has finished and takes no more input (410){}",
            suffix(&said)
        ),
        code => anyhow::bail!(
            "the hookrun apiserver refused the input ({code}){}",
            suffix(&said)
        ),
    }
}

fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// `scheme://host[:port]` of a URL, without its path (which may hold a token).
pub fn host_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(end) => &url[..after_scheme + end],
        None => url,
    }
}

/// What following a Session yields.
// `Finished` is large, but it comes once per stream: boxing it would only burden callers.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Followed {
    /// A new event, with its id (ids count every event ever appended, from 1).
    Event { id: u64, event: SessionEvent },
    /// The Session's phase, when first seen and at each change.
    Phase(SessionPhase),
    /// The Session has finished and its last events were yielded; the stream ends.
    Finished(Session),
}

/// Turns successive copies of one Session into what is new in each: events not yielded
/// yet, a changed phase, the end.
#[derive(Debug, Default)]
pub struct FollowTracker {
    next_id: u64,
    phase: Option<SessionPhase>,
    finished: bool,
}

impl FollowTracker {
    /// A tracker that yields events from id `from` on (1: all of them).
    pub fn from_id(from: u64) -> Self {
        Self {
            next_id: from.max(1),
            ..Self::default()
        }
    }

    /// What `session` adds to what was yielded before, in order.
    pub fn observe(&mut self, session: &Session) -> Vec<Followed> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        let status = session.status.clone().unwrap_or_default();
        let first = status.first_event_id();
        for (i, event) in status.events.iter().enumerate() {
            let id = first + i as u64;
            if id >= self.next_id {
                out.push(Followed::Event {
                    id,
                    event: event.clone(),
                });
                self.next_id = id + 1;
            }
        }
        let phase = status.phase();
        if self.phase != Some(phase) {
            self.phase = Some(phase);
            out.push(Followed::Phase(phase));
        }
        if phase.is_finished() {
            self.finished = true;
            out.push(Followed::Finished(session.clone()));
        }
        out
    }

    /// Whether the Session was seen finished.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// A watcher error as a message: a refusal names `watch` on the resource.
fn watch_error(error: watcher::Error, resource: &str, ns: &str) -> anyhow::Error {
    match error {
        watcher::Error::InitialListFailed(e) => explain(e, "list", resource, ns),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            explain(e, "watch", resource, ns)
        }
        watcher::Error::WatchError(status) => {
            explain(kube::Error::Api(status), "watch", resource, ns)
        }
        other => anyhow::Error::new(other).context(format!("watch {resource} in namespace {ns}")),
    }
}

/// Whether a watcher error is permanent (a refusal), as opposed to one the watcher
/// recovers from by listing again.
fn is_permanent(error: &watcher::Error) -> bool {
    let api_status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s),
        _ => None,
    };
    api_status.is_some_and(|s| s.code == 401 || s.code == 403)
}

/// Follows the Session `session` from a Kubernetes watch of that one object (RBAC:
/// `list` and `watch sessions.hookrun.dev`): yields each event once, in order, each
/// phase change, and `Finished` after the Session ended and its last events were
/// yielded. A Session that does not exist or is deleted ends the stream with an error.
pub fn follow(
    ctx: &Context,
    session: &str,
) -> impl Stream<Item = anyhow::Result<Followed>> + Send + use<> {
    let ns = ctx.namespace.clone();
    let name = session.to_owned();
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), &ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let watch = watcher::watcher(sessions, config).boxed();
    struct State {
        watch: futures::stream::BoxStream<'static, watcher::Result<watcher::Event<Session>>>,
        tracker: FollowTracker,
        pending: VecDeque<anyhow::Result<Followed>>,
        seen: bool,
        done: bool,
        ns: String,
        name: String,
    }
    let state = State {
        watch,
        tracker: FollowTracker::from_id(1),
        pending: VecDeque::new(),
        seen: false,
        done: false,
        ns,
        name,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(item) = state.pending.pop_front() {
                return Some((item, state));
            }
            if state.done {
                return None;
            }
            let Some(event) = state.watch.next().await else {
                state.done = true;
                continue;
            };
            match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                    state.seen = true;
                    state
                        .pending
                        .extend(state.tracker.observe(&s).into_iter().map(Ok));
                    state.done = state.tracker.is_finished();
                }
                Ok(watcher::Event::Delete(_)) => {
                    state.pending.push_back(Err(anyhow::anyhow!(
                        "the Session {} was deleted before it finished",
                        state.name
                    )));
                    state.done = true;
                }
                Ok(watcher::Event::InitDone) if !state.seen => {
                    state.pending.push_back(Err(anyhow::anyhow!(
                        "no Session {:?} in namespace {}",
                        state.name,
                        state.ns
                    )));
                    state.done = true;
                }
                Ok(_) => {}
                Err(error) if is_permanent(&error) => {
                    state.pending.push_back(Err(watch_error(
                        error,
                        "sessions.hookrun.dev",
                        &state.ns,
                    )));
                    state.done = true;
                }
                // The watcher lists again by itself; wait a moment so a cluster that
                // is away is not asked in a tight loop.
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookrun_crds::SessionStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn session(events: &[&str], dropped: i64, phase: SessionPhase) -> Session {
        let mut s = Session::new("s", SessionSpec::default());
        s.status = Some(SessionStatus {
            phase: Some(phase),
            dropped_events: (dropped > 0).then_some(dropped),
            events: events
                .iter()
                .map(|c| SessionEvent {
                    type_: "agent.message".into(),
                    content: (*c).into(),
                    timestamp: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                    key: None,
                })
                .collect(),
            ..SessionStatus::default()
        });
        s
    }

    fn ids(out: &[Followed]) -> Vec<u64> {
        out.iter()
            .filter_map(|f| match f {
                Followed::Event { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_event_is_yielded_once_in_order_then_the_end() {
        let mut t = FollowTracker::from_id(1);
        let out = t.observe(&session(&["a"], 0, SessionPhase::Pending));
        assert_eq!(ids(&out), [1]);
        assert!(matches!(
            out.last(),
            Some(Followed::Phase(SessionPhase::Pending))
        ));
        let out = t.observe(&session(&["a", "b"], 0, SessionPhase::Running));
        assert_eq!(ids(&out), [2]);
        assert!(matches!(
            out.last(),
            Some(Followed::Phase(SessionPhase::Running))
        ));
        // The same copy again adds nothing.
        assert!(
            t.observe(&session(&["a", "b"], 0, SessionPhase::Running))
                .is_empty()
        );
        // Old events dropped from the front: ids stay stable.
        let out = t.observe(&session(&["b", "c", "d"], 1, SessionPhase::Complete));
        assert_eq!(ids(&out), [3, 4]);
        assert!(matches!(out.last(), Some(Followed::Finished(_))));
        assert!(t.is_finished());
        assert!(
            t.observe(&session(&["e"], 4, SessionPhase::Complete))
                .is_empty()
        );
    }

    #[test]
    fn new_sessions_belong_to_their_agent_and_say_where_they_came_from() {
        let mut agent = Agent::new("echo", hookrun_crds::AgentSpec::default());
        agent.metadata.uid = Some("uid-1".into());
        let s = new_session(&agent, "team", "hi", &[("A".into(), "1".into())]);
        let name = s.metadata.name.clone().expect("named");
        assert!(
            name.starts_with("echo-wh-cli-") && name.len() == "echo-wh-cli-".len() + 8,
            "{name}"
        );
        assert_eq!(s.spec.agent, "echo");
        assert_eq!(s.spec.env[0].name, "A");
        assert_eq!(
            s.spec.trigger.as_ref().map(|t| t.source.as_str()),
            Some("cli")
        );
        let owner = &s.metadata.owner_references.expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Agent", "uid-1")
        );
        assert_eq!(
            s.metadata.labels.expect("labels")[names::AGENT_LABEL],
            "echo"
        );
    }

    #[test]
    fn hosts_drop_the_path_that_holds_the_token() {
        assert_eq!(
            host_of("http://127.0.0.1:8080/hook/secret"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(host_of("https://h.example"), "https://h.example");
    }
}
