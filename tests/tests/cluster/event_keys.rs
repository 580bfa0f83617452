//! Cluster test of event idempotency on the real `hookrun-apiserver`: a session pod that
//! posts the same event twice with one `idempotencyKey` (a retry after a lost answer),
//! through two replicas, finds it stored once and gets the same id both times; and what
//! a read, an append and a context call cost the cluster, from the apiserver's own count
//! of its Kubernetes API calls (Sessions being read are served from the read cache), and
//! that a read right after an append shows it.

use hookrun_crds::{Session, SessionSpec};
use hookrun_tests::door::{ApiServer, BUDGET, metrics, request};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn an_event_posted_twice_with_one_key_is_stored_once() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let kubeconfig = cluster.kubeconfig_path();
    let first = ApiServer::start(&kubeconfig, ns.name(), "keys-1").await;
    let second = ApiServer::start(&kubeconfig, ns.name(), "keys-2").await;
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns.name());

    // Play the operator: a Session, its Pod, and the status naming the pod.
    let name = "k-wh-1";
    let session = Session {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: SessionSpec {
            agent: "k".to_owned(),
            title: "keys".to_owned(),
            ..SessionSpec::default()
        },
        status: None,
    };
    sessions
        .create(&PostParams::default(), &session)
        .await
        .expect("the Session is created");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never",
                 "containers": [{"name": "agent", "image": "example.invalid/harness:1"}]}
    }))
    .expect("a pod");
    let uid = Api::<Pod>::namespaced(client, ns.name())
        .create(&PostParams::default(), &pod)
        .await
        .expect("the Pod is created")
        .metadata
        .uid
        .expect("a uid");
    let status = json!({"status": {"podName": name, "podUid": uid, "phase": "Running"}});
    sessions
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("the status is written");
    let output = ns.kubectl(
        &[
            "create",
            "token",
            "default",
            "--audience",
            "hookrun",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            name,
            "--bound-object-uid",
            &uid,
        ],
        None,
    );
    assert!(output.status.success(), "kubectl create token");
    let auth = format!("Bearer {}", String::from_utf8_lossy(&output.stdout).trim());

    let post = |address: String, body: String| {
        let auth = auth.clone();
        async move {
            request(
                &address,
                "POST",
                "/runner/v1/events",
                &[("Authorization", &auth)],
                &body,
            )
            .await
        }
    };
    let keyed =
        json!({"type": "agent.message", "content": "once", "idempotencyKey": "e-1"}).to_string();
    // Each replica answers once it reached the cluster.
    for runner in [&first.runner, &second.runner] {
        let ready = eventually(BUDGET, || async {
            let answer = request(
                runner,
                "GET",
                "/runner/v1/session",
                &[("Authorization", &auth)],
                "",
            )
            .await;
            (answer.status == 200).then_some(())
        })
        .await;
        assert!(ready.is_some(), "the apiserver at {runner} never answered");
    }
    let one = post(first.runner.clone(), keyed.clone()).await;
    let again = post(second.runner.clone(), keyed.clone()).await;
    let third = post(first.runner.clone(), keyed).await;
    assert_eq!((one.status, again.status, third.status), (200, 200, 200));
    assert_eq!(one.json["id"], 1, "{:?}", one.json);
    assert_eq!(
        again.json["id"], one.json["id"],
        "the repeat answers the same id"
    );
    assert_eq!(third.json["id"], one.json["id"]);
    let other =
        json!({"type": "agent.message", "content": "another", "idempotencyKey": "e-2"}).to_string();
    assert_eq!(post(second.runner.clone(), other).await.json["id"], 2);

    let stored = sessions.get(name).await.expect("the Session");
    let contents: Vec<String> = stored
        .status
        .iter()
        .flat_map(|s| &s.events)
        .map(|e| e.content.clone())
        .collect();
    assert_eq!(contents, ["once", "another"]);

    // What one call costs the cluster, from the apiserver's own count of its calls
    // (review caches warm: the calls above used the same tokens).
    let reader = format!("Bearer {}", ns.session_reader_token());
    let read_path = format!("/agents/{name}/events?namespace={}", ns.name());
    let read_events = || async {
        request(
            &first.public,
            "GET",
            &read_path,
            &[("Authorization", &reader)],
            "",
        )
        .await
    };
    // Warm: the first replica has seen the second's write (its watch delivered it).
    let warm = eventually(BUDGET, || async {
        let answer = read_events().await;
        (answer.status == 200 && answer.json["count"] == 2).then_some(())
    })
    .await;
    assert!(warm.is_some(), "the first replica never showed both events");
    let calls = || async { kube_calls(&metrics(&first.admin).await) };
    let before = calls().await;
    let read = read_events().await;
    assert_eq!(read.status, 200);
    let again = read_events().await;
    assert_eq!(again.status, 200);
    let after_read = calls().await;
    let append =
        json!({"type": "agent.message", "content": "x", "idempotencyKey": "e-3"}).to_string();
    assert_eq!(post(first.runner.clone(), append).await.status, 200);
    let after_post = calls().await;
    // A read right after the append sees it, from the cache, at no cost.
    let fresh = read_events().await;
    assert_eq!(
        fresh.json["count"], 3,
        "a stale read after the append: {:?}",
        fresh.json
    );
    assert_eq!(fresh.json["events"][2]["content"], "x");
    let after_fresh = calls().await;
    // The Session's Agent appears: the context shows it once the watch brought it.
    let agents: Api<hookrun_crds::Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "k",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "system": "keys system"}}),
    )
    .await;
    let shown = eventually(BUDGET, || async {
        let answer = request(
            &first.runner,
            "GET",
            "/runner/v1/session",
            &[("Authorization", &auth)],
            "",
        )
        .await;
        (answer.json["system"] == "keys system").then_some(())
    })
    .await;
    assert!(shown.is_some(), "the context never showed the Agent");
    let after_append = calls().await;
    let context = request(
        &first.runner,
        "GET",
        "/runner/v1/session",
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(context.status, 200);
    let after_context = calls().await;
    let delta = |a: &[(String, f64)], b: &[(String, f64)]| -> Vec<String> {
        b.iter()
            .filter_map(|(series, n)| {
                let was = a.iter().find(|(s, _)| s == series).map_or(0.0, |(_, n)| *n);
                (*n > was).then(|| format!("{series} +{}", n - was))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let read_calls = delta(&before, &after_read);
    let append_calls = delta(&after_read, &after_post);
    let fresh_calls = delta(&after_post, &after_fresh);
    let context_calls = delta(&after_append, &after_context);
    eprintln!(
        "kube calls per request: read events {read_calls:?}; runner append {append_calls:?}; \
         runner context {context_calls:?}"
    );
    // Repeated reads of a Session come from the read cache, and the caller's review
    // from the review cache: no Kubernetes API call at all.
    assert!(
        read_calls.is_empty(),
        "repeated reads called the cluster: {read_calls:?}"
    );
    assert!(
        fresh_calls.is_empty(),
        "the read after the append: {fresh_calls:?}"
    );
    // An append of a cached Session writes it once (the cached Session gives the
    // write's resourceVersion); no read, no review while the caches are warm.
    assert_eq!(
        append_calls,
        [r#"verb="patch",resource="sessions/status" +1"#],
        "{append_calls:?}"
    );
    // The context reads its Session from the read cache and its Agent from the index.
    assert!(context_calls.is_empty(), "{context_calls:?}");
    assert_eq!(context.json["system"], "keys system");
}

/// `hookrun_apiserver_kube_requests_total` series (labels, value) in a metrics text.
fn kube_calls(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("hookrun_apiserver_kube_requests_total{"))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once("} ")?;
            Some((labels.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
