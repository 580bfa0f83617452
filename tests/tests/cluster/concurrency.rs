//! `spec.session.maxConcurrent` held across the cluster: two apiserver replicas admit
//! webhooks of one Agent (each counts only what its own watch has seen, so together they
//! may admit more than the limit), and the operator starts at most `maxConcurrent` pods
//! at a time; the other Sessions wait `Queued` and start, oldest first, as slots free.
//! Pods run for real: the local stand-in for the kubelet runs the harness binary.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, future::join_all};
use hookrun_crds::{Agent, Session, SessionPhase, names};
use hookrun_tests::control_plane::workspace_root;
use hookrun_tests::door::{ApiServer, Operator, is_known, request, webhook_path};
use hookrun_tests::pod_runner::PodRunner;
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually, workspace_binary};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;

const HARNESS_IMAGE: &str = "hookrun-harness:concurrency";
const MAX_CONCURRENT: usize = 2;
const WEBHOOKS: usize = 12;

/// What the watches saw over the whole test.
#[derive(Default)]
struct Seen {
    /// Pods of the Agent that had not ended, by name, at the latest event.
    live: BTreeSet<String>,
    /// The most live pods at any moment.
    most_live: usize,
    /// Pods in the order they appeared.
    pod_order: Vec<String>,
    /// Sessions ever seen `Queued`, with the message they had then.
    queued: BTreeMap<String, String>,
    /// Session name → creation time (seconds).
    created: HashMap<String, i64>,
}

#[tokio::test]
async fn max_concurrent_holds_across_two_apiservers_and_queued_sessions_start_in_turn() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let kubeconfig = cluster.kubeconfig_path();
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());

    let doors = [
        ApiServer::start(&kubeconfig, ns.name(), &format!("conc-a-{}", ns.name())).await,
        ApiServer::start(&kubeconfig, ns.name(), &format!("conc-b-{}", ns.name())).await,
    ];
    let runner_url = format!("http://{}", doors[0].runner);
    let _operator = Operator::start_with(
        &kubeconfig,
        ns.name(),
        &format!("conc-{}", ns.name()),
        &[
            "--runner-url",
            &runner_url,
            "--default-harness-image",
            HARNESS_IMAGE,
        ],
    )
    .await;
    let work_dir: PathBuf = workspace_root()
        .join("target/test-clusters")
        .join(format!("concurrency-{}", ns.name()));
    std::fs::create_dir_all(&work_dir).expect("the pod runner's directory");
    let pod_runner = PodRunner::new(
        client.clone(),
        HARNESS_IMAGE,
        workspace_binary("hookrun-harness"),
        work_dir,
    )
    .in_namespace(ns.name());
    let pod_runner_task = tokio::spawn(pod_runner.clone().run());

    apply_agent(
        &agents,
        "capped",
        json!({"spec": {
            "exec": {"command": ["sh", "-c", "sleep 1; echo done"]},
            "triggers": [{"webhook": {}}],
            "session": {"maxConcurrent": MAX_CONCURRENT}
        }}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "capped").await;
    for door in &doors {
        let known = eventually(Duration::from_secs(30), || async {
            is_known(&door.public, &path).await.then_some(())
        })
        .await;
        assert!(known.is_some(), "an apiserver never learnt the token");
    }

    // Watch pods and Sessions from before the first webhook to the end.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let pod_watch = {
        let seen = seen.clone();
        let config = watcher::Config::default().labels(names::SESSION_LABEL);
        tokio::spawn(async move {
            let mut events = watcher(pods, config).boxed();
            while let Some(event) = events.next().await {
                let mut seen = seen.lock().expect("lock");
                match event {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                        let name = pod.name_any();
                        if !seen.pod_order.contains(&name) {
                            seen.pod_order.push(name.clone());
                        }
                        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                        if matches!(phase, Some("Succeeded" | "Failed")) {
                            seen.live.remove(&name);
                        } else {
                            seen.live.insert(name);
                        }
                        seen.most_live = seen.most_live.max(seen.live.len());
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        seen.live.remove(&pod.name_any());
                    }
                    _ => {}
                }
            }
        })
    };
    let session_watch = {
        let seen = seen.clone();
        let sessions = sessions.clone();
        tokio::spawn(async move {
            let mut events = watcher(sessions, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(session) | watcher::Event::InitApply(session)) =
                    event
                {
                    let mut seen = seen.lock().expect("lock");
                    let name = session.name_any();
                    if let Some(created) = session.creation_timestamp() {
                        seen.created.insert(name.clone(), created.0.as_second());
                    }
                    if let Some(status) = &session.status
                        && status.phase == Some(SessionPhase::Queued)
                    {
                        seen.queued
                            .insert(name, status.message.clone().unwrap_or_default());
                    }
                }
            }
        })
    };

    // Twelve webhooks at once, half to each replica; one refused with 429 (its replica
    // counts the Agent full) is sent again until it is taken.
    let posts = (0..WEBHOOKS).map(|i| {
        let (door, path) = (doors[i % 2].public.clone(), path.clone());
        async move {
            let body = json!({"title": format!("webhook {i}")}).to_string();
            for _ in 0..1200 {
                let answer = request(&door, "POST", &path, &[], &body).await;
                match answer.status {
                    200 => {
                        return answer.json["session"]
                            .as_str()
                            .expect("a Session name")
                            .to_owned();
                    }
                    429 => tokio::time::sleep(Duration::from_millis(100)).await,
                    _ => panic!("webhook {i}: {answer:?}"),
                }
            }
            panic!("webhook {i} was never taken");
        }
    });
    let accepted: BTreeSet<String> = join_all(posts).await.into_iter().collect();
    assert_eq!(
        accepted.len(),
        WEBHOOKS,
        "each webhook made its own Session"
    );

    // Every accepted Session runs to the end.
    let complete = eventually(Duration::from_secs(180), || async {
        let list = sessions.list(&Default::default()).await.ok()?;
        let done = list
            .items
            .iter()
            .filter(|s| accepted.contains(&s.name_any()))
            .filter(|s| {
                s.status
                    .as_ref()
                    .is_some_and(|st| st.phase == Some(SessionPhase::Complete))
            })
            .count();
        (done == WEBHOOKS).then_some(())
    })
    .await;
    let list = sessions.list(&Default::default()).await.expect("Sessions");
    let phases: Vec<(String, Option<SessionPhase>, Option<String>)> = list
        .items
        .iter()
        .map(|s| {
            let status = s.status.clone().unwrap_or_default();
            (s.name_any(), status.phase, status.message)
        })
        .collect();
    assert!(
        complete.is_some(),
        "not every accepted Session completed: {phases:?}"
    );
    // The last pod's end reaches the pod watch after its Session's completion.
    let ended = eventually(Duration::from_secs(30), || async {
        seen.lock().expect("lock").live.is_empty().then_some(())
    })
    .await;
    pod_watch.abort();
    session_watch.abort();
    pod_runner.stop_all();
    pod_runner_task.abort();

    let seen = seen.lock().expect("lock");
    assert!(ended.is_some(), "pods still live: {:?}", seen.live);
    assert!(
        seen.most_live <= MAX_CONCURRENT,
        "{} pods of the Agent lived at once; maxConcurrent is {MAX_CONCURRENT}",
        seen.most_live
    );
    assert_eq!(
        seen.most_live, MAX_CONCURRENT,
        "the Agent never used its {MAX_CONCURRENT} slots"
    );
    assert_eq!(seen.pod_order.len(), WEBHOOKS, "one pod per Session");
    assert!(
        !seen.queued.is_empty(),
        "the two replicas together never admitted more than the Agent may run, so \
         nothing waited"
    );
    for (name, message) in &seen.queued {
        assert!(
            accepted.contains(name),
            "{name} was queued but never accepted"
        );
        assert!(
            message.contains("spec.session.maxConcurrent") && message.contains("allows 2"),
            "{name}: {message}"
        );
    }
    // Queued Sessions got their pods oldest first.
    let started: Vec<i64> = seen
        .pod_order
        .iter()
        .filter(|name| seen.queued.contains_key(*name))
        .map(|name| seen.created[name])
        .collect();
    assert!(
        started.is_sorted(),
        "queued Sessions started out of creation order: {started:?}"
    );
}
