//! Cluster tests of what a webhook may store (the real `hookrun-operator` and
//! `hookrun-apiserver` against the real kube-apiserver and etcd): env names outside the
//! Agent's `allowedEnv` are refused, parts over their storage budget are 413 and store
//! nothing, and a Session whose status the cluster refuses as too large is ended in
//! `Error` by the apiserver's runner API and by the operator instead of staying Running.

use hookrun_crds::session::OVERSIZE_MESSAGE;
use hookrun_crds::{Session, SessionPhase, SessionSpec, session::SessionEnvVar};
use hookrun_tests::door::{Answer, ApiServer, BUDGET, Door, Operator, request, webhook_path};
use hookrun_tests::fixtures::{agent_namespace, session_count};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn env_body(names: &[&str]) -> String {
    let env: Vec<Value> = names
        .iter()
        .map(|n| json!({"name": n, "value": "http://attacker.example/v1"}))
        .collect();
    json!({"title": "hello", "env": env}).to_string()
}

fn message(answer: &Answer) -> &str {
    answer.json["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn webhook_env_is_refused_unless_the_agent_allows_the_name() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let door = Door::start(cluster, &ns).await;

    apply_agent(
        &agents,
        "closed",
        json!({"spec": {"models": ["openai/gpt"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    apply_agent(
        &agents,
        "opted-in",
        json!({"spec": {
            "models": ["openai/gpt"],
            "triggers": [{"webhook": {"allowedEnv": ["TICKET", "GITHUB_*"]}}],
            "session": {"env": [
                {"name": "OPENAI_BASE_URL", "value": "https://api.openai.com/v1"},
                {"name": "GITHUB_TOKEN", "value": "from-the-agent"}
            ]}
        }}),
    )
    .await;
    let closed = webhook_path(&agents, ns.name(), "closed").await;
    let opted_in = webhook_path(&agents, ns.name(), "opted-in").await;
    door.wait_until_known(&closed).await;
    door.wait_until_known(&opted_in).await;

    let answer = door.post(&closed, &[], &env_body(&["TICKET"])).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(message(&answer).starts_with("env[0].name:"), "{answer:?}");
    assert!(
        message(&answer).contains("allowedEnv is empty"),
        "{answer:?}"
    );

    for names in [
        &["OPENAI_BASE_URL"][..],
        &["LD_PRELOAD"][..],
        &["GITHUB_TOKEN"][..],
        &["HTTPS_PROXY"][..],
    ] {
        let answer = door.post(&opted_in, &[], &env_body(names)).await;
        assert_eq!(answer.status, 400, "{names:?}: {answer:?}");
        assert_eq!(answer.json["error"], "bad_body");
        assert!(message(&answer).starts_with("env[0].name:"), "{answer:?}");
        assert!(message(&answer).contains("TICKET, GITHUB_*"), "{answer:?}");
    }
    assert_eq!(
        session_count(&sessions).await,
        0,
        "a refused webhook stored a Session"
    );

    let body = json!({"title": "triage", "env": [
        {"name": "TICKET", "value": "42"},
        {"name": "GITHUB_REPOSITORY", "value": "org/repo"}
    ]});
    let answer = door.post(&opted_in, &[], &body.to_string()).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let name = answer.json["session"].as_str().expect("a Session name");
    let stored = sessions.get(name).await.expect("the Session");
    assert_eq!(
        stored.spec.env,
        [
            SessionEnvVar {
                name: "TICKET".into(),
                value: "42".into()
            },
            SessionEnvVar {
                name: "GITHUB_REPOSITORY".into(),
                value: "org/repo".into()
            }
        ]
    );
}

#[tokio::test]
async fn the_schema_refuses_allowed_env_that_covers_everything_or_hookrun() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    for (webhook, expected) in [
        ("{allowedEnv: ['*']}", "allowedEnv[0]"),
        ("{allowedEnv: [OK, 'HOOKRUN_*']}", "allowedEnv[1]"),
        ("{allowedEnv: ['HOOK*']}", "allowedEnv[0]"),
        ("{allowedEnv: ['A-B']}", "allowedEnv[0]"),
        ("{limits: {titleBytes: 99999999}}", "limits.titleBytes"),
    ] {
        let manifest = format!(
            "apiVersion: hookrun.dev/v1alpha1\nkind: Agent\nmetadata: {{name: bad}}\n\
             spec:\n  triggers: [{{webhook: {webhook}}}]\n"
        );
        let out = ns.kubectl(&["apply", "-f", "-"], Some(&manifest));
        assert!(!out.status.success(), "accepted: {manifest}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{webhook}: {stderr}");
    }
}

#[tokio::test]
async fn parts_over_their_budget_are_413_and_store_nothing() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let door = Door::start(cluster, &ns).await;

    apply_agent(
        &agents,
        "budgeted",
        json!({"spec": {"triggers": [{"webhook": {
            "allowedEnv": ["TICKET"],
            "limits": {"titleBytes": 4096, "payloadBytes": 16384, "envBytes": 1024}
        }}]}}),
    )
    .await;
    apply_agent(
        &agents,
        "defaults",
        json!({"spec": {"triggers": [{"webhook": {}}]}}),
    )
    .await;
    let budgeted = webhook_path(&agents, ns.name(), "budgeted").await;
    let defaults = webhook_path(&agents, ns.name(), "defaults").await;
    door.wait_until_known(&budgeted).await;
    door.wait_until_known(&defaults).await;

    // 1000 control characters: 1000 bytes raw, 6000 in etcd.
    let cases = [
        (
            &budgeted,
            json!({"title": "\u{1}".repeat(1000)}),
            "title_too_large",
            "4096",
        ),
        (
            &budgeted,
            json!({"title": "t", "env": [{"name": "TICKET", "value": "&".repeat(300)}]}),
            "env_too_large",
            "1024",
        ),
        (
            &budgeted,
            json!({"title": "t", "attachment": "\u{0}".repeat(3000)}),
            "payload_too_large",
            "16384",
        ),
        (
            &defaults,
            json!({"title": "x".repeat(16 * 1024 + 1)}),
            "title_too_large",
            "16384",
        ),
    ];
    for (path, body, code, limit) in cases {
        let answer = door.post(path, &[], &body.to_string()).await;
        assert_eq!(answer.status, 413, "{code}: {answer:?}");
        assert_eq!(answer.json["error"], code, "{answer:?}");
        assert!(message(&answer).contains(limit), "{answer:?}");
    }
    assert_eq!(
        session_count(&sessions).await,
        0,
        "an over-budget webhook stored a Session"
    );

    let answer = door
        .post(
            &defaults,
            &[],
            &json!({"title": "x".repeat(16 * 1024)}).to_string(),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// A Session of `agent` whose spec carries `padding` bytes of env values: the bulk that
/// brings the stored object near etcd's request limit.
fn padded_session(name: &str, agent: &str, padding: usize) -> Session {
    const VALUE: usize = 32 * 1024;
    let env = (0..padding.div_ceil(VALUE))
        .map(|i| SessionEnvVar {
            name: format!("PAD_{i}"),
            value: "p".repeat(VALUE.min(padding - i * VALUE)),
        })
        .collect();
    Session {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: SessionSpec {
            agent: agent.to_owned(),
            title: "a big one".to_owned(),
            env,
            trigger: None,
            session_key: None,
            history: Vec::new(),
        },
        status: None,
    }
}

/// etcd's refusal of a request over its size limit, as the kube-apiserver passes it on.
fn is_too_large(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.message.contains("too large"))
}

/// Grows the Session's status (`base` plus one padding event) to the largest size the
/// cluster still stores, less `room` bytes, by bisection on real writes. Returns the
/// padding event's length.
async fn fill_to_the_limit(sessions: &Api<Session>, name: &str, base: Value, room: usize) -> usize {
    let write = |content: usize| {
        let mut status = base.clone();
        status["events"] = json!([{
            "type": "agent.message",
            "content": "e".repeat(content),
            "timestamp": "2026-01-01T00:00:00Z"
        }]);
        async move {
            sessions
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(&json!({"status": status})),
                )
                .await
        }
    };
    let (mut fits, mut refused) = (0usize, 400 * 1024usize);
    match write(refused).await {
        Err(error) if is_too_large(&error) => {}
        other => {
            panic!("a status of {refused} bytes over a padded spec was not refused: {other:?}")
        }
    }
    write(fits)
        .await
        .expect("the padded Session takes a small status");
    while refused - fits > 16 {
        let middle = (fits + refused) / 2;
        match write(middle).await {
            Ok(_) => fits = middle,
            Err(error) if is_too_large(&error) => refused = middle,
            Err(error) => panic!("status write: {error}"),
        }
    }
    let content = fits.saturating_sub(room);
    write(content).await.expect("the filled status is stored");
    content
}

/// The padding that leaves `status_room` bytes for the status under etcd's limit
/// (1.5 MiB per request by default).
const SPEC_PADDING: usize = 1_400 * 1024;

#[tokio::test]
async fn a_runner_write_refused_as_too_large_ends_the_session() {
    let (cluster, ns, client, _, sessions) = agent_namespace().await;
    let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), ns.name()).await;

    let name = "big-wh-00000001";
    sessions
        .create(
            &PostParams::default(),
            &padded_session(name, "big", SPEC_PADDING),
        )
        .await
        .expect("a padded Session under etcd's limit is stored");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "agent", "image": "example.invalid/harness:1"}]}
    }))
    .expect("a pod");
    let pod = Api::<Pod>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &pod)
        .await
        .expect("the Pod is created");
    let uid = pod.metadata.uid.expect("a uid");
    let base = json!({"podName": name, "podUid": uid, "phase": "Running"});
    // 20 KiB of room: one 8 KiB event fits, a 30 KiB one does not.
    fill_to_the_limit(&sessions, name, base, 20 * 1024).await;

    let token = ns.pod_token(name, &uid);
    let event = |content: String| {
        let body = json!({"type": "agent.message", "content": content}).to_string();
        let auth = format!("Bearer {token}");
        let runner = apiserver.runner.clone();
        async move {
            request(
                &runner,
                "POST",
                "/runner/v1/events",
                &[("Authorization", &auth)],
                &body,
            )
            .await
        }
    };
    let small = eventually(BUDGET, || async {
        let answer = event("a small step".to_owned()).await;
        (answer.status != 503).then_some(answer)
    })
    .await
    .expect("the apiserver reached the cluster");
    assert_eq!(small.status, 200, "{small:?}");
    let refused = event("r".repeat(30 * 1024)).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert_eq!(refused.json["error"], "status_too_large", "{refused:?}");

    let stored = sessions.get(name).await.expect("the Session");
    let status = stored.status.expect("a status");
    assert_eq!(status.phase(), SessionPhase::Error);
    assert_eq!(status.message.as_deref(), Some(OVERSIZE_MESSAGE));
    assert!(status.completion_time.is_some());
    assert!(
        status.events.iter().all(|e| !e.content.starts_with('r')),
        "the refused event was stored"
    );
    // Finished: the runner API takes nothing more.
    let late = event("late".to_owned()).await;
    assert_eq!(late.status, 409, "{late:?}");
    assert!(
        apiserver.process.log_text().contains("too large"),
        "the apiserver did not log the refusal"
    );
}

#[tokio::test]
async fn an_operator_write_refused_as_too_large_ends_the_session() {
    let (cluster, ns, _, _, sessions) = agent_namespace().await;

    let name = "big-wh-00000002";
    sessions
        .create(
            &PostParams::default(),
            &padded_session(name, "big", SPEC_PADDING),
        )
        .await
        .expect("a padded Session under etcd's limit is stored");
    // Running on a pod that is gone: the operator's next write ends it (PodDeleted), and
    // that write does not fit.
    let base = json!({"podName": name, "podUid": "gone", "phase": "Running"});
    let padding = fill_to_the_limit(&sessions, name, base, 0).await;
    assert!(padding > 1024, "the status has events to shed: {padding}");

    let operator = Operator::start(cluster, ns.name(), &[]).await;
    let ended = eventually(BUDGET, || async {
        let status = sessions.get(name).await.ok()?.status?;
        status.is_finished().then_some(status)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the Session stayed Running; operator log: {}",
            operator.log_text()
        )
    });
    assert_eq!(ended.phase(), SessionPhase::Error);
    assert_eq!(ended.message.as_deref(), Some(OVERSIZE_MESSAGE));
    assert!(ended.completion_time.is_some());
    assert!(
        operator.log_text().contains("too large"),
        "{}",
        operator.log_text()
    );
}
