//! Cluster tests of what a namespace user who may create Agents can ask for, on the real
//! `hookrun-operator` and `hookrun-apiserver`: the cap on stored Sessions per Agent
//! (429 at the door, oldest finished Sessions deleted when the cap is lowered) and the
//! operator's pod policy (`PolicyViolation`, no pod, unless a flag allows it).

use std::time::Duration;

use hookrun_crds::{Agent, Session, SessionSpec, session::SessionPhase};
use hookrun_tests::{
    Cluster, TestNamespace, apply_agent,
    door::{self, ApiServer, Operator},
    eventually,
    fixtures::{agent_namespace, ready_condition},
};
use k8s_openapi::{
    api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Condition, jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const BUDGET: Duration = Duration::from_secs(30);

/// The operator alone, watching `ns`, with extra flags.
async fn operator(cluster: &Cluster, ns: &TestNamespace, flags: &[&str]) -> Operator {
    let mut args = vec!["--runner-url", "http://runner.hookrun.test:8080"];
    args.extend_from_slice(flags);
    Operator::start(cluster, ns.name(), &args).await
}

/// Waits until the Agent's `Ready` condition has `reason`, and returns it.
async fn ready_reason(agents: &Api<Agent>, name: &str, reason: &str, log: &Operator) -> Condition {
    let found = eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        ready_condition(&agent)
            .filter(|c| c.reason == reason)
            .cloned()
    })
    .await;
    match found {
        Some(condition) => condition,
        None => {
            let now = agents
                .get(name)
                .await
                .ok()
                .and_then(|a| ready_condition(&a).cloned());
            panic!(
                "agent {name} never got reason {reason}; Ready is {now:?}\n{}",
                log.log_text()
            )
        }
    }
}

async fn create_session(sessions: &Api<Session>, name: &str, agent: &str) -> Session {
    let session = Session::new(
        name,
        SessionSpec {
            agent: agent.to_owned(),
            title: "hello".to_owned(),
            ..Default::default()
        },
    );
    sessions
        .create(&PostParams::default(), &session)
        .await
        .expect("the Session is created")
}

/// Waits until the Session is in `phase`, and returns it.
async fn session_in(sessions: &Api<Session>, name: &str, phase: SessionPhase) -> Session {
    let found = eventually(BUDGET, || async {
        let session = sessions.get(name).await.ok()?;
        (session.status.as_ref()?.phase == Some(phase)).then_some(session)
    })
    .await;
    match found {
        Some(session) => session,
        None => {
            let now = sessions
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|s| s.status);
            panic!("session {name} never reached {phase:?}; its status: {now:?}")
        }
    }
}

fn kubectl_ok(ns: &TestNamespace, args: &[&str]) {
    let out = ns.kubectl(args, None);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The session templates that leave the default policy, with the field each is refused
/// for, and whether a flag of [`OPEN_FLAGS`] allows it.
fn outside_the_policy() -> Vec<(&'static str, Value, &'static str, bool)> {
    vec![
        (
            "privileged",
            json!({"securityContext": {"privileged": true}}),
            "spec.session.securityContext.privileged",
            true,
        ),
        (
            "root",
            json!({"securityContext": {"runAsUser": 0}}),
            "spec.session.securityContext.runAsUser",
            true,
        ),
        (
            "other-account",
            json!({"serviceAccountName": "deployer"}),
            "spec.session.serviceAccountName",
            true,
        ),
        (
            "control-plane",
            json!({"tolerations": [{
                "key": "node-role.kubernetes.io/control-plane",
                "operator": "Exists",
                "effect": "NoSchedule"
            }]}),
            "spec.session.tolerations[0].key",
            true,
        ),
        (
            "unlabelled-secret",
            json!({"env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]}),
            "spec.session.env[0].valueFrom.secretKeyRef.name",
            false,
        ),
    ]
}

/// Flags that allow every refusal of [`outside_the_policy`] except Secret env.
const OPEN_FLAGS: [&str; 6] = [
    "--allow-privileged",
    "--allow-root",
    "--allowed-service-accounts",
    "deployer",
    "--allowed-toleration-keys",
    "node-role.kubernetes.io/control-plane",
];

/// Creates the Secret `db` without the opt-in label and the ServiceAccount `deployer`.
async fn namespace_objects(ns: &TestNamespace) {
    kubectl_ok(
        ns,
        &[
            "create",
            "secret",
            "generic",
            "db",
            "--from-literal=password=hunter2",
        ],
    );
    kubectl_ok(ns, &["create", "serviceaccount", "deployer"]);
}

async fn apply_policy_agents(agents: &Api<Agent>) {
    for (name, session, _, _) in outside_the_policy() {
        apply_agent(
            agents,
            name,
            json!({"spec": {
                "models": ["anthropic/claude-sonnet-4-6"],
                "triggers": [{"webhook": {}}],
                "session": session
            }}),
        )
        .await;
    }
}

#[tokio::test]
async fn agents_outside_the_pod_policy_get_policy_violation_and_no_pod() {
    let (cluster, ns, client, agents, sessions) = agent_namespace().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    namespace_objects(&ns).await;
    let operator = operator(cluster, &ns, &[]).await;
    apply_policy_agents(&agents).await;

    for (name, _, field, _) in outside_the_policy() {
        let condition = ready_reason(&agents, name, "PolicyViolation", &operator).await;
        assert_eq!(condition.status, "False");
        assert!(
            condition.message.contains(&format!("{field}: ")),
            "{name}: {}",
            condition.message
        );
        // The webhook URL is still published: its Sessions explain the refusal.
        let agent = agents.get(name).await.expect("the Agent");
        assert!(agent.status.and_then(|s| s.webhook_url).is_some());

        let session_name = format!("{name}-wh-00000001");
        create_session(&sessions, &session_name, name).await;
        let failed = session_in(&sessions, &session_name, SessionPhase::Error).await;
        let message = failed.status.and_then(|s| s.message).unwrap_or_default();
        assert!(message.contains(field), "{name}: {message}");
        assert!(
            pods.get_opt(&session_name)
                .await
                .expect("pods read")
                .is_none(),
            "{name}: a pod was created"
        );
    }
    // The Secret's value never reaches a message.
    let all = sessions.list(&ListParams::default()).await.expect("list");
    assert!(
        !serde_json::to_string(&all.items)
            .unwrap_or_default()
            .contains("hunter2")
    );

    // A Secret that opts in makes its Agent Ready (the label change brings it back), and
    // its next Session gets a pod.
    kubectl_ok(
        &ns,
        &["label", "secret", "db", "hookrun.dev/agent-env=true"],
    );
    ready_reason(&agents, "unlabelled-secret", "WebhookReady", &operator).await;
    create_session(
        &sessions,
        "unlabelled-secret-wh-00000002",
        "unlabelled-secret",
    )
    .await;
    let pod = eventually(BUDGET, || async {
        pods.get_opt("unlabelled-secret-wh-00000002")
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(pod.is_some(), "no pod once the Secret opted in");

    // Taking the label away closes it again, for the next Session too.
    kubectl_ok(&ns, &["label", "secret", "db", "hookrun.dev/agent-env-"]);
    ready_reason(&agents, "unlabelled-secret", "PolicyViolation", &operator).await;
    create_session(
        &sessions,
        "unlabelled-secret-wh-00000003",
        "unlabelled-secret",
    )
    .await;
    session_in(
        &sessions,
        "unlabelled-secret-wh-00000003",
        SessionPhase::Error,
    )
    .await;
    assert!(
        pods.get_opt("unlabelled-secret-wh-00000003")
            .await
            .expect("pods read")
            .is_none()
    );
}

#[tokio::test]
async fn the_operators_flags_open_the_pod_policy_but_never_secret_env() {
    let (cluster, ns, client, agents, sessions) = agent_namespace().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    namespace_objects(&ns).await;
    let operator = operator(cluster, &ns, &OPEN_FLAGS).await;
    apply_policy_agents(&agents).await;

    for (name, _, field, allowed) in outside_the_policy() {
        let session_name = format!("{name}-wh-00000001");
        if allowed {
            ready_reason(&agents, name, "WebhookReady", &operator).await;
            create_session(&sessions, &session_name, name).await;
            let pod = eventually(BUDGET, || async {
                pods.get_opt(&session_name).await.ok().flatten()
            })
            .await
            .unwrap_or_else(|| panic!("{name}: no pod\n{}", operator.log_text()));
            let spec = pod.spec.expect("spec");
            let container = spec.containers[0]
                .security_context
                .clone()
                .unwrap_or_default();
            match name {
                "privileged" => assert_eq!(container.privileged, Some(true)),
                "root" => assert_eq!(container.run_as_user, Some(0)),
                "other-account" => {
                    assert_eq!(spec.service_account_name.as_deref(), Some("deployer"))
                }
                _ => assert!(spec.tolerations.is_some_and(|t| !t.is_empty())),
            }
        } else {
            let condition = ready_reason(&agents, name, "PolicyViolation", &operator).await;
            assert!(condition.message.contains(field), "{}", condition.message);
            create_session(&sessions, &session_name, name).await;
            session_in(&sessions, &session_name, SessionPhase::Error).await;
            assert!(pods.get_opt(&session_name).await.expect("pods").is_none());
        }
    }
}

#[tokio::test]
async fn an_agent_at_its_stored_sessions_cap_is_429_before_any_create() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let _operator = operator(cluster, &ns, &[]).await;
    let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), ns.name()).await;
    let keeper = |cap: u32| {
        json!({"spec": {
            "triggers": [{"webhook": {}}],
            "session": {"maxStoredSessions": cap}
        }})
    };
    apply_agent(&agents, "keeper", keeper(2)).await;
    let path = door::webhook_path(&agents, ns.name(), "keeper").await;
    assert!(door::is_known(&apiserver.public, &path).await);

    for i in 0..2 {
        let answer = door::request(
            &apiserver.public,
            "POST",
            &path,
            &[],
            &format!(r#"{{"title":"{i}"}}"#),
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.json);
    }
    // Finish both: finished Sessions still count until they are deleted.
    for session in sessions
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
    {
        finish(&sessions, &session.name_any(), Timestamp::now()).await;
    }
    let refused = door::request(
        &apiserver.public,
        "POST",
        &path,
        &[],
        r#"{"title":"third"}"#,
    )
    .await;
    assert_eq!(refused.status, 429, "{:?}", refused.json);
    assert_eq!(refused.json["error"], "too_many_stored_sessions");
    assert_eq!(refused.header("retry-after"), Some("60"));
    let message = refused.json["message"].as_str().unwrap_or_default();
    assert!(message.contains("stores 2 Sessions"), "{message}");
    assert!(
        message.contains("spec.session.maxStoredSessions"),
        "{message}"
    );
    assert!(
        message.contains("spec.session.ttlSecondsAfterFinished"),
        "{message}"
    );
    let stored = sessions.list(&ListParams::default()).await.expect("list");
    assert_eq!(stored.items.len(), 2, "no Session was created");

    // Raising the cap lets the next one in.
    apply_agent(&agents, "keeper", keeper(3)).await;
    let admitted = eventually(BUDGET, || async {
        let answer = door::request(
            &apiserver.public,
            "POST",
            &path,
            &[],
            r#"{"title":"third"}"#,
        )
        .await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert!(admitted.is_some(), "{}", apiserver.process.log_text());
}

/// Writes a finished status, as the runner API would.
async fn finish(sessions: &Api<Session>, name: &str, at: Timestamp) {
    let patch = json!({"status": {
        "phase": "Complete",
        "completionTime": Timestamp::from_second(at.as_second()).unwrap_or(at),
    }});
    sessions
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the status is written");
}

#[tokio::test]
async fn lowering_the_cap_deletes_the_oldest_finished_sessions_first() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let operator = operator(cluster, &ns, &[]).await;
    let agent = |cap: u32| json!({"spec": {"session": {"maxStoredSessions": cap}}});
    apply_agent(&agents, "hoarder", agent(10)).await;
    ready_reason(&agents, "hoarder", "NoWebhookTrigger", &operator).await;

    let now = Timestamp::now().as_second();
    let names = [
        "hoarder-1",
        "hoarder-2",
        "hoarder-3",
        "hoarder-4",
        "hoarder-5",
    ];
    for name in names {
        create_session(&sessions, name, "hoarder").await;
    }
    // 1, 2 and 3 finished (1 first); 4 and 5 still run.
    for (i, name) in names[..3].iter().enumerate() {
        let at = Timestamp::from_second(now - 300 + 100 * i64::try_from(i).unwrap_or(0))
            .expect("a time");
        finish(&sessions, name, at).await;
        session_in(&sessions, name, SessionPhase::Complete).await;
    }
    let stored = || async {
        let mut left: Vec<String> = sessions
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .map(ResourceExt::name_any)
            .collect();
        left.sort();
        left
    };
    assert_eq!(stored().await.len(), 5, "within the cap nothing goes");

    apply_agent(&agents, "hoarder", agent(3)).await;
    let after = eventually(BUDGET, || async {
        let left = stored().await;
        (left.len() <= 3).then_some(left)
    })
    .await
    .unwrap_or_else(|| panic!("nothing was deleted\n{}", operator.log_text()));
    assert_eq!(after, ["hoarder-3", "hoarder-4", "hoarder-5"]);

    // Below what runs: every finished one goes, the running ones stay.
    apply_agent(&agents, "hoarder", agent(1)).await;
    let after = eventually(BUDGET, || async {
        let left = stored().await;
        (left.len() <= 2).then_some(left)
    })
    .await
    .unwrap_or_else(|| panic!("hoarder-3 was not deleted\n{}", operator.log_text()));
    assert_eq!(after, ["hoarder-4", "hoarder-5"]);
}
