//! Replays and redeliveries through the real `hookrun-operator` and `hookrun-apiserver`:
//! a captured signed delivery sent again with fresh unsigned ids is the original Session,
//! a provider's redelivery with a fresh signed timestamp is too, a 250-character delivery
//! id is stored, and a Session the cluster refuses is the caller's 400, never a 503 that
//! a provider would retry forever.

use std::time::{SystemTime, UNIX_EPOCH};

use hookrun_tests::door::{BUDGET, Door, webhook_path};
use hookrun_tests::eventually;
use hookrun_tests::fixtures::{
    agent_namespace, apply_webhook_agent, hex_hmac_sha256, session_count,
};
use k8s_openapi::api::core::v1::ResourceQuota;
use kube::Api;
use serde_json::json;

const GITHUB_SECRET: &str = "github-replay-secret";
const LINEAR_SECRET: &str = "linear-replay-secret";

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis()
}

#[tokio::test]
async fn a_captured_github_delivery_sent_again_with_fresh_ids_is_the_original_session() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let door = Door::start(cluster, &ns).await;
    apply_webhook_agent(&agents, "gh", json!({"githubSecret": GITHUB_SECRET})).await;
    let path = webhook_path(&agents, ns.name(), "gh").await;
    door.wait_until_known(&path).await;

    let body = r#"{"action":"opened","issue":{"number":7,"title":"Crash on start"}}"#;
    let signature = format!("sha256={}", hex_hmac_sha256(GITHUB_SECRET, body));
    // The signing secret reaches the apiserver through the operator's Secret.
    let first = eventually(BUDGET, || async {
        let answer = door
            .post(
                &path,
                &[
                    ("X-Hub-Signature-256", &signature),
                    ("X-GitHub-Delivery", "delivery-1"),
                    ("X-GitHub-Event", "issues"),
                ],
                body,
            )
            .await;
        (answer.status == 200).then_some(answer)
    })
    .await
    .expect("the signed GitHub delivery is accepted");
    assert_eq!(first.header("idempotent-replayed"), None);

    for (i, fresh) in [
        ("X-GitHub-Delivery", "delivery-2"),
        ("Idempotency-Key", "fresh-key"),
        ("X-GitHub-Delivery", "delivery-3"),
    ]
    .into_iter()
    .enumerate()
    {
        let replay = door
            .post(&path, &[("X-Hub-Signature-256", &signature), fresh], body)
            .await;
        assert_eq!(replay.status, 200, "replay {i}: {replay:?}");
        assert_eq!(replay.header("idempotent-replayed"), Some("true"), "{i}");
        assert_eq!(replay.json["session"], first.json["session"], "{i}");
    }
    assert_eq!(session_count(&sessions).await, 1);
}

#[tokio::test]
async fn a_linear_redelivery_and_a_250_character_delivery_id_are_one_session() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let door = Door::start(cluster, &ns).await;
    apply_webhook_agent(
        &agents,
        "lin",
        json!({"linearSignatureSecret": LINEAR_SECRET}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "lin").await;
    door.wait_until_known(&path).await;

    let delivery = "d".repeat(250);
    let send = |sent_ms: u128| {
        let body = format!(
            r#"{{"action":"create","type":"Issue","data":{{"title":"Crash"}},"webhookTimestamp":{sent_ms}}}"#
        );
        let signature = hex_hmac_sha256(LINEAR_SECRET, &body);
        let (door, path, delivery) = (&door, &path, &delivery);
        async move {
            door.post(
                path,
                &[
                    ("Linear-Signature", signature.as_str()),
                    ("Linear-Delivery", delivery.as_str()),
                ],
                &body,
            )
            .await
        }
    };
    let first = eventually(BUDGET, || async {
        let answer = send(now_ms()).await;
        // Refused until the operator's Secret with the signing secret is loaded.
        let loading = answer.status == 401 || answer.json["error"] == "signing_secret_pending";
        (!loading).then_some(answer)
    })
    .await
    .expect("the signing secret is loaded");
    assert_eq!(first.status, 200, "{first:?}");
    let name = first.json["session"].as_str().expect("a name").to_owned();
    let stored = sessions.get(&name).await.expect("the Session is stored");
    let trigger = stored.spec.trigger.expect("a trigger");
    assert_eq!(trigger.delivery_id.as_deref(), Some(delivery.as_str()));

    // Linear redelivers with the same id and a new webhookTimestamp in the signed body.
    let redelivered = send(now_ms() + 1).await;
    assert_eq!(redelivered.status, 200, "{redelivered:?}");
    assert_eq!(redelivered.header("idempotent-replayed"), Some("true"));
    assert_eq!(redelivered.json["session"], name.as_str());
    assert_eq!(session_count(&sessions).await, 1);
}

#[tokio::test]
async fn a_session_the_cluster_refuses_is_400_with_the_reason_not_503() {
    let (cluster, ns, client, agents, _) = agent_namespace().await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client, ns.name());
    let door = Door::start(cluster, &ns).await;
    apply_webhook_agent(&agents, "quota", json!({})).await;
    let path = webhook_path(&agents, ns.name(), "quota").await;
    door.wait_until_known(&path).await;

    // A namespace quota of no Sessions: the Kubernetes API answers 403 Forbidden.
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-sessions"},
        "spec": {"hard": {"count/sessions.hookrun.dev": "0"}},
    }))
    .expect("a quota");
    quotas
        .create(&Default::default(), &quota)
        .await
        .expect("the quota is created");
    let refused = eventually(BUDGET, || async {
        let answer = door.post(&path, &[], r#"{"title":"over quota"}"#).await;
        (answer.status != 200).then_some(answer)
    })
    .await
    .expect("the quota is enforced");
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(refused.json["error"], "session_rejected", "{refused:?}");
    let message = refused.json["message"].as_str().unwrap_or_default();
    assert!(message.contains("Forbidden"), "{message}");
    assert!(message.contains("quota"), "{message}");
    assert_eq!(refused.header("retry-after"), None);
    // Keyed requests too: no 503 loop for a provider's retries.
    let keyed = door
        .post(&path, &[("Idempotency-Key", "k-1")], r#"{"title":"over"}"#)
        .await;
    assert_eq!(keyed.status, 400, "{keyed:?}");
}
