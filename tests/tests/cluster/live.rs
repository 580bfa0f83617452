//! Live sessions: follow-ups found by the webhook trigger's `sessionKey` go into the
//! Session already handling that key as `user.message` inputs, the harness runs one turn
//! per input and finishes after the Agent's idle timeout, and a waiting caller is
//! answered with its own turn's reply. Pods run for real where a harness is needed (the
//! local stand-in for the kubelet runs the harness binary); two apiserver replicas race
//! for one key.

use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use hookrun_crds::session::event_types;
use hookrun_crds::{Agent, Session, SessionPhase, names};
use hookrun_tests::control_plane::workspace_root;
use hookrun_tests::door::{ApiServer, Operator, is_known, request, webhook_path};
use hookrun_tests::fake_model::{FakeModel, openai_completion};
use hookrun_tests::pod_runner::PodRunner;
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually, workspace_binary};
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};

const HARNESS_IMAGE: &str = "hookrun-harness:live";
const BUDGET: Duration = Duration::from_secs(60);

/// An apiserver, the operator (pointing session pods at that apiserver) and, when
/// `run_pods`, the pod runner, all on `ns` (the console's browser test runs on it too).
pub(crate) struct Live {
    apiservers: Vec<ApiServer>,
    _operator: Operator,
    pod_runner: Option<(PodRunner, tokio::task::JoinHandle<()>)>,
}

impl Live {
    pub(crate) async fn start(ns: &TestNamespace, replicas: usize, run_pods: bool) -> Self {
        Self::start_with(ns, replicas, run_pods, false).await
    }

    /// [`Live::start`]; with `public_url`, the operator writes the first apiserver's own
    /// public address into statuses, so Grant URLs reach it.
    pub(crate) async fn start_with(
        ns: &TestNamespace,
        replicas: usize,
        run_pods: bool,
        public_url: bool,
    ) -> Self {
        let cluster = cluster().await;
        let kubeconfig = cluster.kubeconfig_path();
        let mut apiservers = Vec::new();
        for i in 0..replicas {
            let tag = format!("live-{i}-{}", ns.name());
            apiservers.push(ApiServer::start(&kubeconfig, ns.name(), &tag).await);
        }
        let runner_url = format!("http://{}", apiservers[0].runner);
        let own_public_url = format!("http://{}", apiservers[0].public);
        let mut operator_args = vec![
            "--runner-url",
            &runner_url,
            "--default-harness-image",
            HARNESS_IMAGE,
        ];
        if public_url {
            operator_args.extend(["--public-url", own_public_url.as_str()]);
        }
        let operator = Operator::start_with(
            &kubeconfig,
            ns.name(),
            &format!("live-{}", ns.name()),
            &operator_args,
        )
        .await;
        let pod_runner = if run_pods {
            let work_dir: PathBuf = workspace_root()
                .join("target/test-clusters")
                .join(format!("live-{}", ns.name()));
            std::fs::create_dir_all(&work_dir).expect("the pod runner's directory");
            let runner = PodRunner::new(
                cluster.client().await,
                HARNESS_IMAGE,
                workspace_binary("hookrun-harness"),
                work_dir,
            )
            .in_namespace(ns.name());
            let task = tokio::spawn(runner.clone().run());
            Some((runner, task))
        } else {
            None
        };
        Live {
            apiservers,
            _operator: operator,
            pod_runner,
        }
    }

    /// Applies the Agent and waits until every replica accepts its webhook.
    pub(crate) async fn agent(
        &self,
        agents: &Api<Agent>,
        ns: &str,
        name: &str,
        spec: Value,
    ) -> String {
        apply_agent(agents, name, json!({ "spec": spec })).await;
        let path = webhook_path(agents, ns, name).await;
        for apiserver in &self.apiservers {
            let known = eventually(BUDGET, || async {
                is_known(&apiserver.public, &path).await.then_some(())
            })
            .await;
            assert!(known.is_some(), "an apiserver never learnt the token");
        }
        path
    }

    /// The public address of replica `i` (modulo the replicas).
    pub(crate) fn public(&self, i: usize) -> &str {
        &self.apiservers[i % self.apiservers.len()].public
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some((runner, task)) = self.pod_runner.take() {
            runner.stop_all();
            task.abort();
        }
    }
}

/// The Agent's Sessions.
async fn sessions_of(sessions: &Api<Session>) -> Vec<Session> {
    sessions
        .list(&ListParams::default())
        .await
        .expect("lists Sessions")
        .items
}

fn inputs(session: &Session) -> Vec<String> {
    session
        .status
        .as_ref()
        .map(|s| {
            s.events
                .iter()
                .filter(|e| e.type_ == event_types::USER_MESSAGE)
                .map(|e| e.content.clone())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn an_interactive_echo_agent_answers_each_follow_up_with_its_own_turn() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let live = Live::start(&ns, 1, true).await;
    let path = live
        .agent(
            &agents,
            ns.name(),
            "echo",
            json!({
                "exec": {"command": ["cat"]},
                "triggers": [{"webhook": {"sessionKey": "'thread/' + body.thread"}}],
                "session": {
                    "idleTimeoutSeconds": 4,
                    "timeoutSeconds": 120,
                    "env": [{"name": "HARNESS_TURN_GAP_MS", "value": "200"}]
                }
            }),
        )
        .await;

    let post = |title: &str| {
        let body = json!({"title": title, "thread": "t-1", "wait": 60}).to_string();
        let public = live.public(0).to_owned();
        let path = path.clone();
        async move { request(&public, "POST", &path, &[], &body).await }
    };
    let first = post("first question").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json["response"], "first question", "{first:?}");
    let name = first.json["session"]
        .as_str()
        .expect("a Session")
        .to_owned();
    let hash = names::session_key_hash(ns.name(), "echo", "thread/t-1");
    assert_eq!(name, names::keyed_session_name("echo", &hash, 0));

    for follow_up in ["second question", "third question"] {
        let answer = post(follow_up).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.json["session"], name.as_str(), "{answer:?}");
        assert_eq!(answer.json["delivered"], true, "{answer:?}");
        assert_eq!(answer.json["response"], follow_up, "{answer:?}");
        assert_eq!(answer.json["phase"], "Running", "{answer:?}");
    }

    // No more input: the Session completes after its idle timeout, with the last reply.
    let finished = eventually(BUDGET, || async {
        let session = sessions.get(&name).await.ok()?;
        let status = session.status.clone()?;
        status.is_finished().then_some(session)
    })
    .await
    .expect("the Session finished after its idle timeout");
    let status = finished.status.clone().unwrap_or_default();
    assert_eq!(status.phase(), SessionPhase::Complete, "{status:?}");
    assert_eq!(status.response.as_deref(), Some("third question"));
    assert_eq!(inputs(&finished), ["second question", "third question"]);
    let turns = status
        .events
        .iter()
        .filter(|e| e.type_ == event_types::TURN_COMPLETE)
        .count();
    assert_eq!(turns, 3, "{:?}", status.events);
    assert_eq!(sessions_of(&sessions).await.len(), 1, "one Session per key");

    // A follow-up after it finished starts the key's next Session.
    let later = post("after the end").await;
    assert_eq!(later.status, 200, "{later:?}");
    assert_eq!(
        later.json["session"],
        names::keyed_session_name("echo", &hash, 1).as_str()
    );
    assert_eq!(later.json["response"], "after the end", "{later:?}");
}

#[tokio::test]
async fn fifty_concurrent_webhooks_with_one_new_key_make_one_session_and_49_inputs() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    // No pod runs: the Session stays Pending, so every follow-up is buffered.
    let live = Live::start(&ns, 2, false).await;
    let path = live
        .agent(
            &agents,
            ns.name(),
            "triage",
            json!({
                "models": ["anthropic/claude-sonnet-4-6"],
                "triggers": [{"webhook": {"sessionKey": "body.issue"}}],
                "session": {"idleTimeoutSeconds": 60}
            }),
        )
        .await;

    let answers = join_all((0..50).map(|i| {
        let public = live.public(i).to_owned();
        let path = path.clone();
        async move {
            let body = json!({"title": format!("comment {i}"), "issue": "octo/hello#7"});
            request(&public, "POST", &path, &[], &body.to_string()).await
        }
    }))
    .await;
    let created: Vec<_> = answers.iter().filter(|a| a.status == 200).collect();
    let buffered: Vec<_> = answers
        .iter()
        .filter(|a| a.status == 202 && a.json["buffered"] == true)
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert_eq!(buffered.len(), 49, "{answers:?}");
    let name = created[0].json["session"].as_str().expect("a Session");
    assert!(
        answers.iter().all(|a| a.json["session"] == name),
        "{answers:?}"
    );

    let stored = sessions_of(&sessions).await;
    assert_eq!(stored.len(), 1, "exactly one Session for the key");
    let session = &stored[0];
    assert_eq!(session.spec.session_key.as_deref(), Some("octo/hello#7"));
    let labels = session.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get(names::SESSION_KEY_LABEL).map(String::as_str),
        Some(names::session_key_hash(ns.name(), "triage", "octo/hello#7").as_str())
    );
    let mut got = inputs(session);
    got.push(session.spec.title.clone());
    got.sort();
    let mut sent: Vec<String> = (0..50).map(|i| format!("comment {i}")).collect();
    sent.sort();
    assert_eq!(got, sent, "every comment is the title or one input, once");
}

#[tokio::test]
async fn a_retried_follow_up_is_one_input() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let live = Live::start(&ns, 2, false).await;
    let path = live
        .agent(
            &agents,
            ns.name(),
            "triage",
            json!({
                "models": ["anthropic/claude-sonnet-4-6"],
                "triggers": [{"webhook": {"sessionKey": "body.issue"}}],
                "session": {"idleTimeoutSeconds": 60}
            }),
        )
        .await;
    let post = |i: usize, title: &'static str, key: &'static str| {
        let public = live.public(i).to_owned();
        let path = path.clone();
        async move {
            let body = json!({"title": title, "issue": "7"}).to_string();
            request(&public, "POST", &path, &[("idempotency-key", key)], &body).await
        }
    };
    let first = post(0, "opened", "d-1").await;
    assert_eq!(first.status, 200, "{first:?}");
    // The creating request again, on the other replica: the same Session, no input.
    let again = post(1, "opened", "d-1").await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    for i in 0..3 {
        let follow_up = post(i, "a comment", "d-2").await;
        assert_eq!(follow_up.status, 202, "{follow_up:?}");
        assert_eq!(follow_up.json["buffered"], true);
        assert_eq!(
            follow_up.header("idempotent-replayed"),
            (i > 0).then_some("true")
        );
    }
    let stored = sessions_of(&sessions).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(inputs(&stored[0]), ["a comment"]);
}

#[tokio::test]
async fn a_model_agent_sees_the_first_turn_in_the_second_turns_request() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let model = FakeModel::start(vec![
        (200, vec![], openai_completion("the first reply")),
        (200, vec![], openai_completion("the second reply")),
    ])
    .await;
    let live = Live::start(&ns, 1, true).await;
    let path = live
        .agent(
            &agents,
            ns.name(),
            "chat",
            json!({
                "models": ["openai/gpt-4o-mini"],
                "system": "Be brief.",
                "triggers": [{"webhook": {"sessionKey": "body.thread"}}],
                "session": {
                    "idleTimeoutSeconds": 3,
                    "env": [{"name": "OPENAI_BASE_URL", "value": format!("{}/v1", model.url)}]
                }
            }),
        )
        .await;
    let post = |title: &'static str| {
        let public = live.public(0).to_owned();
        let path = path.clone();
        async move {
            let body = json!({"title": title, "thread": "s-1", "wait": 60}).to_string();
            request(&public, "POST", &path, &[], &body).await
        }
    };
    let first = post("hello").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json["response"], "the first reply");
    let second = post("and then?").await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(second.json["response"], "the second reply");
    assert_eq!(second.json["delivered"], true);

    let seen = model.seen();
    assert_eq!(seen.len(), 2, "one model request per turn");
    assert_eq!(
        seen[1].body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the first reply"},
            {"role": "user", "content": "and then?"}
        ])
    );
}

#[tokio::test]
async fn a_follow_up_after_the_session_finished_carries_the_conversation_over() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let model = FakeModel::start(vec![
        (200, vec![], openai_completion("the first reply")),
        (200, vec![], openai_completion("the second reply")),
    ])
    .await;
    let live = Live::start(&ns, 1, true).await;
    // One turn per Session (no idle timeout): every follow-up starts the key's next
    // Session, which starts from the previous one's turns.
    let path = live
        .agent(
            &agents,
            ns.name(),
            "chat",
            json!({
                "models": ["openai/gpt-4o-mini"],
                "triggers": [{"webhook": {"sessionKey": "body.thread"}}],
                "session": {
                    "carryOverTurns": 5,
                    "env": [{"name": "OPENAI_BASE_URL", "value": format!("{}/v1", model.url)}]
                }
            }),
        )
        .await;
    let post = |title: &'static str| {
        let public = live.public(0).to_owned();
        let path = path.clone();
        async move {
            let body = json!({"title": title, "thread": "s-1", "wait": 60}).to_string();
            request(&public, "POST", &path, &[], &body).await
        }
    };
    let first = post("hello").await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json["response"], "the first reply");
    assert_eq!(first.json["phase"], "Complete", "{first:?}");
    let hash = names::session_key_hash(ns.name(), "chat", "s-1");
    assert_eq!(
        first.json["session"],
        names::keyed_session_name("chat", &hash, 0)
    );

    let second = post("and then?").await;
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(second.json["response"], "the second reply");
    let next = names::keyed_session_name("chat", &hash, 1);
    assert_eq!(second.json["session"], next.as_str(), "{second:?}");
    let stored = sessions.get(&next).await.expect("the key's next Session");
    assert_eq!(
        serde_json::to_value(&stored.spec.history).expect("json"),
        json!([{"user": "hello", "assistant": "the first reply"}])
    );
    let seen = model.seen();
    assert_eq!(seen.len(), 2, "one model request per Session");
    assert_eq!(
        seen[1].body["messages"],
        json!([
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "the first reply"},
            {"role": "user", "content": "and then?"}
        ])
    );
}

/// A model that answers "reply to: <the last user message>", holding its first answer
/// until `release` is notified.
async fn gated_model(release: std::sync::Arc<tokio::sync::Notify>) -> String {
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let router = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let (release, first) = (release.clone(), first.clone());
        async move {
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                release.notified().await;
            }
            let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let last = request["messages"]
                .as_array()
                .and_then(|m| m.last())
                .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            axum::Json(openai_completion(&format!("reply to: {last}")))
        }
    });
    hookrun_tests::fake_model::serve(router).await
}

#[tokio::test]
async fn a_follow_up_that_arrives_while_a_one_turn_session_runs_is_answered_not_lost() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let model = gated_model(release.clone()).await;
    let live = Live::start(&ns, 1, true).await;
    // No idle timeout: a Session runs one turn, unless input came while it ran.
    let path = live
        .agent(
            &agents,
            ns.name(),
            "chat",
            json!({
                "models": ["openai/gpt-4o-mini"],
                "triggers": [{"webhook": {"sessionKey": "body.thread"}}],
                "session": {
                    "env": [{"name": "OPENAI_BASE_URL", "value": format!("{model}/v1")}]
                }
            }),
        )
        .await;
    let post = |title: &'static str| {
        let public = live.public(0).to_owned();
        let path = path.clone();
        async move {
            let body = json!({"title": title, "thread": "t", "wait": 60}).to_string();
            request(&public, "POST", &path, &[], &body).await
        }
    };
    let hash = names::session_key_hash(ns.name(), "chat", "t");
    let name = names::keyed_session_name("chat", &hash, 0);
    let first = tokio::spawn(post("first"));
    // The first turn is under way (the model holds it): a follow-up goes in.
    eventually(BUDGET, || async {
        let status = sessions.get(&name).await.ok()?.status?;
        (status.phase() == SessionPhase::Running).then_some(())
    })
    .await
    .expect("the Session runs");
    let second = tokio::spawn(post("second"));
    eventually(BUDGET, || async {
        let session = sessions.get(&name).await.ok()?;
        (inputs(&session) == ["second"]).then_some(())
    })
    .await
    .expect("the follow-up is stored as an input");
    release.notify_one();

    let first = first.await.expect("the first request");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.json["response"], "reply to: first", "{first:?}");
    let second = second.await.expect("the follow-up");
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(second.json["session"], name.as_str(), "{second:?}");
    assert_eq!(second.json["response"], "reply to: second", "{second:?}");
    let finished = sessions.get(&name).await.expect("the Session");
    let status = finished.status.clone().unwrap_or_default();
    assert_eq!(status.phase(), SessionPhase::Complete, "{status:?}");
    assert!(status.inputs_closed, "the harness closed its inputs");

    // After it closed, a follow-up starts the key's next Session.
    let third = post("third").await;
    assert_eq!(third.status, 200, "{third:?}");
    assert_eq!(
        third.json["session"],
        names::keyed_session_name("chat", &hash, 1).as_str()
    );
    assert_eq!(third.json["response"], "reply to: third", "{third:?}");
}
