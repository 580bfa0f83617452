//! Cluster tests of wait mode: the real apiserver holds a webhook until the
//! Session it stored finishes. No harness runs here, so the test plays it by writing the
//! Session's status the way the runner API does (a merge patch of the status
//! subresource carrying `metadata.resourceVersion`, retried on 409).

use std::time::{Duration, Instant};

use hookrun_crds::session::event_types;
use hookrun_crds::{Session, SessionPhase};
use hookrun_tests::door::{BUDGET, Door, metric, metrics, request, webhook_path};
use hookrun_tests::{
    TestNamespace, apply_agent, cluster, eventually, fixtures::update_session_status,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

/// The door, an Agent with a webhook, and its path once the apiserver knows its token.
async fn door_with_agent(ns: &TestNamespace) -> (Door, String) {
    let cluster = cluster().await;
    let client = cluster.client().await;
    let door = Door::start(cluster, ns).await;
    let agents: Api<hookrun_crds::Agent> = Api::namespaced(client, ns.name());
    apply_agent(
        &agents,
        "asker",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "asker").await;
    door.wait_until_known(&path).await;
    (door, path)
}

/// Finishes the Session as the harness would through the runner API.
async fn finish(sessions: &Api<Session>, name: &str, response: &str) {
    update_session_status(sessions, name, |status| {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        status.push_event(event_types::AGENT_MESSAGE, response, now.clone());
        assert!(status.finish(SessionPhase::Complete, Some(response), None, now));
    })
    .await;
}

#[tokio::test]
async fn a_waiting_webhook_gets_the_harness_reply() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let (door, path) = door_with_agent(&ns).await;
    let sessions: Api<Session> = Api::namespaced(cluster.client().await, ns.name());

    let public = door.public.clone();
    let held = tokio::spawn(async move {
        request(
            &public,
            "POST",
            &path,
            &[],
            r#"{"title":"what is 6 times 7?","wait":60}"#,
        )
        .await
    });
    let name = eventually(BUDGET, || async {
        let list = sessions.list(&ListParams::default()).await.ok()?;
        list.items.first()?.metadata.name.clone()
    })
    .await
    .expect("the webhook stored a Session");
    // The apiserver counts the request as held: it must not have answered yet.
    let held_count = eventually(BUDGET, || async {
        let text = metrics(&door.admin).await;
        (metric(&text, "hookrun_apiserver_waiting_requests") >= 1.0).then_some(())
    })
    .await;
    assert!(
        held_count.is_some(),
        "the request was never counted as held"
    );
    assert!(!held.is_finished(), "answered before the Session finished");

    let finished = Instant::now();
    finish(&sessions, &name, "42").await;
    let answer = tokio::time::timeout(BUDGET, held)
        .await
        .expect("the held request is answered")
        .expect("the request task");
    assert_eq!(answer.status, 200, "{:?}", answer);
    assert_eq!(answer.json["session"], name.as_str());
    assert_eq!(answer.json["agentDefinition"], "asker");
    assert_eq!(answer.json["response"], "42");
    assert_eq!(answer.json["phase"], "Complete");
    assert!(
        finished.elapsed() < Duration::from_secs(5),
        "the answer came {:?} after the status patch",
        finished.elapsed()
    );
}

#[tokio::test]
async fn a_wait_that_runs_out_is_202_with_a_poll_url() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let (door, path) = door_with_agent(&ns).await;
    let sessions: Api<Session> = Api::namespaced(cluster.client().await, ns.name());

    let started = Instant::now();
    let answer = door.post(&path, &[], r#"{"title":"slow","wait":2}"#).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 202, "{:?}", answer);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let name = answer.json["session"].as_str().expect("a Session name");
    let poll = format!(
        "/agents/{name}/events?event_type=agent.message&namespace={}",
        ns.name()
    );
    assert_eq!(answer.json["pollUrl"], poll.as_str());
    assert_eq!(answer.header("location"), Some(poll.as_str()));
    assert_eq!(answer.json["timedOut"], true);
    assert_eq!(answer.json["response"], serde_json::Value::Null);
    // The Session runs on, and the pollUrl answers once it has.
    assert!(sessions.get_opt(name).await.expect("reads").is_some());
    finish(&sessions, name, "late but here").await;
    let token = ns.session_reader_token();
    let bearer = format!("Bearer {token}");
    let events = request(
        &door.public,
        "GET",
        &poll,
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(events.status, 200, "{:?}", events);
    assert_eq!(events.json["count"], 1, "{:?}", events.json);
    assert_eq!(events.json["events"][0]["type"], "agent.message");
    assert_eq!(events.json["events"][0]["content"], "late but here");
}
