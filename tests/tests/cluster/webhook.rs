//! Cluster tests of the webhook door: the real `hookrun-operator` mints the
//! token and the managed Secret, the real `hookrun-apiserver` watches them and stores
//! Sessions. Each test runs both binaries on its own namespace.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use hookrun_crds::{Agent, Session, names};
use hookrun_tests::door::{BUDGET, Door, metrics, request, webhook_path, webhook_path_other_than};
use hookrun_tests::fixtures::session_count;
use hookrun_tests::{TestNamespace, cluster, control_plane::workspace_root, eventually};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use sha2::Sha256;

const LINEAR_SECRET: &str = "linear-test-secret";

async fn apply_agent(agents: &Api<Agent>, name: &str, webhook: Value) {
    apply_manifest(
        agents,
        name,
        json!({"triggers": [{"webhook": webhook}]}),
        json!({}),
    )
    .await;
}

async fn apply_manifest(agents: &Api<Agent>, name: &str, spec: Value, annotations: Value) {
    let mut spec = spec;
    spec["models"] = json!(["anthropic/claude-sonnet-4-6"]);
    hookrun_tests::apply_agent(
        agents,
        name,
        json!({"metadata": {"annotations": annotations}, "spec": spec}),
    )
    .await;
}

async fn session(sessions: &Api<Session>, name: &str) -> Session {
    sessions
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("Session {name}: {e}"))
}

#[tokio::test]
async fn a_webhook_creates_a_session_with_its_contents_and_default_title() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;

    apply_agent(&agents, "my-agent", json!({"allowedEnv": ["TICKET"]})).await;
    let path = webhook_path(&agents, ns.name(), "my-agent").await;
    door.wait_until_known(&path).await;

    let body = r#"{"title":"Fix the flaky test","env":[{"name":"TICKET","value":"42"}]}"#;
    let answer = door.post(&path, &[], body).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.json["agentDefinition"], "my-agent");
    let name = answer.json["session"].as_str().expect("a Session name");
    let stored = session(&sessions, name).await;
    assert_eq!(stored.spec.agent, "my-agent");
    assert_eq!(stored.spec.title, "Fix the flaky test");
    assert_eq!(stored.spec.env[0].name, "TICKET");
    assert_eq!(stored.spec.env[0].value, "42");
    let trigger = stored.spec.trigger.clone().expect("a trigger");
    assert_eq!(trigger.source, "webhook");
    assert_eq!(trigger.payload.as_deref(), Some(body));
    assert!(
        trigger
            .payload_digest
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(
        stored.labels().get(names::AGENT_LABEL).map(String::as_str),
        Some("my-agent")
    );
    let agent = agents.get("my-agent").await.expect("the Agent");
    let owner = &stored.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Agent", "my-agent")
    );
    assert_eq!(Some(owner.uid.clone()), agent.metadata.uid);

    let answer = door.post(&path, &[], "").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let name = answer.json["session"].as_str().expect("a Session name");
    assert_eq!(
        session(&sessions, name).await.spec.title,
        "Webhook trigger — my-agent"
    );

    // Refusals store nothing.
    let before = sessions
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .len();
    let bad = door
        .post(
            &format!("/webhooks/{}/my-agent/wrong", ns.name()),
            &[],
            "{}",
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(bad.json["error"], "bad_token");
    let missing = door
        .post(&format!("/webhooks/{}/ghost/x", ns.name()), &[], "{}")
        .await;
    assert_eq!(missing.status, 404);
    let after = sessions
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .len();
    assert_eq!(before, after);
}

#[tokio::test]
async fn a_signed_linear_webhook_gets_a_linear_title() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;

    apply_agent(
        &agents,
        "linear-agent",
        json!({"linearSignatureSecret": LINEAR_SECRET}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "linear-agent").await;
    door.wait_until_known(&path).await;

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let body = format!(
        r#"{{"action":"create","type":"Project","data":{{"name":"WhatsApp Provider"}},"webhookTimestamp":{now_ms}}}"#
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(LINEAR_SECRET.as_bytes()).expect("any key");
    mac.update(body.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());

    let unsigned = door.post(&path, &[], &body).await;
    assert_eq!(unsigned.status, 401, "{unsigned:?}");
    // The signing secret reaches the apiserver through the operator's Secret.
    let answer = eventually(BUDGET, || async {
        let answer = door
            .post(
                &path,
                &[
                    ("Linear-Signature", &signature),
                    ("Linear-Delivery", "delivery-1"),
                ],
                &body,
            )
            .await;
        (answer.status == 200).then_some(answer)
    })
    .await
    .expect("the signed Linear webhook is accepted");
    let name = answer.json["session"].as_str().expect("a Session name");
    let stored = session(&sessions, name).await;
    assert_eq!(stored.spec.title, "Project created: WhatsApp Provider");
    let trigger = stored.spec.trigger.expect("a trigger");
    assert_eq!(trigger.source, "linear");
    assert_eq!(trigger.delivery_id.as_deref(), Some("delivery-1"));
}

#[tokio::test]
async fn duplicates_make_exactly_one_session_and_a_different_body_is_422() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;

    apply_agent(&agents, "dedup", json!({})).await;
    let path = webhook_path(&agents, ns.name(), "dedup").await;
    door.wait_until_known(&path).await;

    // Sequential.
    let key = [("Idempotency-Key", "order-1")];
    let first = door.post(&path, &key, r#"{"title":"one"}"#).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.header("idempotent-replayed"), None);
    let again = door.post(&path, &key, r#"{"title":"one"}"#).await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.json, first.json);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    let conflict = door.post(&path, &key, r#"{"title":"two"}"#).await;
    assert_eq!(conflict.status, 422, "{conflict:?}");
    assert_eq!(conflict.json["error"], "idempotency_conflict");

    // 100 at once.
    let door = &door;
    let path = path.as_str();
    let answers = futures::future::join_all((0..100).map(|_| async move {
        door.post(
            path,
            &[("Idempotency-Key", "burst")],
            r#"{"title":"burst"}"#,
        )
        .await
    }))
    .await;
    let names: std::collections::BTreeSet<_> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{a:?}");
            a.json["session"].as_str().expect("a name").to_owned()
        })
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let fresh = answers
        .iter()
        .filter(|a| a.header("idempotent-replayed").is_none())
        .count();
    assert_eq!(fresh, 1, "exactly one answer is not a replay");
    let stored: Vec<_> = sessions
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter(|s| {
            s.spec
                .trigger
                .as_ref()
                .and_then(|t| t.idempotency_key.as_deref())
                == Some("burst")
        })
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(session_count(&sessions).await, 2);
}

#[tokio::test]
async fn the_index_follows_a_rotation_and_a_removed_trigger() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;

    apply_agent(&agents, "rotating", json!({})).await;
    let old = webhook_path(&agents, ns.name(), "rotating").await;
    door.wait_until_known(&old).await;

    apply_manifest(
        &agents,
        "rotating",
        json!({"triggers": [{"webhook": {}}]}),
        json!({
            names::ROTATE_TOKEN_ANNOTATION: "first",
            names::ROTATION_GRACE_ANNOTATION: "5m",
        }),
    )
    .await;
    let old_url = format!("https://hooks.example.test{old}");
    let new = webhook_path_other_than(&agents, ns.name(), "rotating", Some(&old_url)).await;
    assert_ne!(old, new);
    door.wait_until_known(&new).await;
    // The previous token stays valid for its grace period.
    let ping = request(&door.public, "GET", &old, &[], "").await;
    assert_eq!(ping.status, 200, "{ping:?}");
    let created = door.post(&old, &[], "{}").await;
    assert_eq!(created.status, 200, "{created:?}");

    // Without the trigger the URL is unknown.
    apply_manifest(&agents, "rotating", json!({}), json!({})).await;
    let gone = eventually(BUDGET, || async {
        (request(&door.public, "GET", &new, &[], "").await.status == 404).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the removed trigger still answers");
    let post = door.post(&new, &[], "{}").await;
    assert_eq!(post.status, 404, "{post:?}");
    assert_eq!(post.json["error"], "not_found");
}

/// A TCP proxy in front of the kube-apiserver that the test can cut (every connection
/// dropped, new ones refused) and restore.
struct CuttableProxy {
    address: String,
    up: tokio::sync::watch::Sender<bool>,
}

impl CuttableProxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("an address").to_string();
        let (up, watch_up) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !*watch_up.borrow() {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = watch_up.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        CuttableProxy { address, up }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

#[tokio::test]
async fn while_the_cluster_is_unreachable_the_answer_is_503_and_then_it_recovers() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());

    // The apiserver's kubeconfig points at a proxy the test can cut.
    let kubeconfig = std::fs::read_to_string(cluster.kubeconfig_path()).expect("kubeconfig");
    let server = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("a server line")
        .trim()
        .to_owned();
    let upstream = server
        .strip_prefix("https://")
        .expect("an https server")
        .to_owned();
    let proxy = CuttableProxy::start(upstream).await;
    let proxied = kubeconfig.replace(&server, &format!("https://{}", proxy.address));
    let proxied_path =
        workspace_root().join(format!("target/test-clusters/{}.kubeconfig", ns.name()));
    std::fs::write(&proxied_path, proxied).expect("the proxied kubeconfig");
    let door = Door::start_with(cluster, &ns, &proxied_path).await;

    apply_agent(&agents, "flaky", json!({})).await;
    let path = webhook_path(&agents, ns.name(), "flaky").await;
    door.wait_until_known(&path).await;

    proxy.set_up(false);
    for _ in 0..5 {
        let answer = door.post(&path, &[], r#"{"title":"while down"}"#).await;
        assert_eq!(answer.status, 503, "{answer:?}");
        assert_eq!(answer.json["error"], "unavailable");
        assert!(answer.header("retry-after").is_some(), "{answer:?}");
    }
    // Authentication still answers from the index.
    let bad = door
        .post(&format!("/webhooks/{}/flaky/wrong", ns.name()), &[], "{}")
        .await;
    assert_eq!(bad.status, 401);

    proxy.set_up(true);
    let recovered = eventually(Duration::from_secs(30), || async {
        let answer = door.post(&path, &[], r#"{"title":"after"}"#).await;
        (answer.status == 200).then_some(answer)
    })
    .await
    .expect("the apiserver recovers once the cluster is back");
    let name = recovered.json["session"].as_str().expect("a name");
    assert_eq!(session(&sessions, name).await.spec.title, "after");
    let stored = sessions
        .list(&Default::default())
        .await
        .expect("list")
        .items;
    assert!(
        stored.iter().all(|s| s.spec.title != "while down"),
        "a Session was stored while the answer was 503"
    );
    let _ = std::fs::remove_file(&proxied_path);
}

#[tokio::test]
async fn max_concurrent_counts_the_watched_sessions_and_metrics_are_on_the_admin_port() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;

    apply_manifest(
        &agents,
        "capped",
        json!({"triggers": [{"webhook": {}}], "session": {"maxConcurrent": 2}}),
        json!({}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "capped").await;
    door.wait_until_known(&path).await;
    let ready = request(&door.admin, "GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 200);

    // Nothing runs these Sessions yet, so they stay unfinished and count.
    for _ in 0..2 {
        assert_eq!(door.post(&path, &[], "{}").await.status, 200);
    }
    let refused = door.post(&path, &[], "{}").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.json["error"], "too_many_sessions");
    assert!(refused.header("retry-after").is_some());

    let public_metrics = request(&door.public, "GET", "/metrics", &[], "").await;
    assert_eq!(public_metrics.status, 404);
    let text = metrics(&door.admin).await;
    assert!(text.contains("outcome=\"too_many_sessions\""), "{text}");
    assert!(!text.contains(&path), "metrics hold no paths: {text}");
    let token = path.rsplit('/').next().expect("a token");
    assert!(
        !door.apiserver.log_text().contains(token),
        "the log holds the token"
    );
}
