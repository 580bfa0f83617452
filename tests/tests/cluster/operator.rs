//! Cluster tests of the operator's Agent controller. Each test runs the real
//! `hookrun-operator` binary against the test control plane, watching only the test's
//! own namespace.

use std::time::Duration;

use hookrun_crds::{
    Agent,
    names::{self, secret_keys},
};
use hookrun_tests::{
    TestNamespace, apply_agent, cluster,
    door::{Operator, elected_pair, get, lease_holder},
    eventually,
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

const BUDGET: Duration = Duration::from_secs(10);

/// A readiness probe of the admin listener answers 200.
async fn is_ready(operator: &Operator) -> bool {
    eventually(BUDGET, || async {
        (get(&operator.admin, "/readyz").await.status == 200).then_some(())
    })
    .await
    .is_some()
}

fn webhook_agent() -> serde_json::Value {
    json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}})
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn ready_reason(agent: &Agent) -> Option<(String, String)> {
    agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the Agent's status URL ends in a token that differs from `not`, and
/// returns that token.
async fn wait_for_token(agents: &Api<Agent>, name: &str, not: Option<&str>) -> String {
    eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        let url = agent.status?.webhook_url?;
        let token = url.rsplit('/').next()?.to_owned();
        (Some(token.as_str()) != not && token.len() == 43).then_some(token)
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} got no (new) webhook URL within {BUDGET:?}"))
}

async fn wait_for_reason(agents: &Api<Agent>, name: &str, status: &str, reason: &str) -> Agent {
    eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        (ready_reason(&agent) == Some((status.to_owned(), reason.to_owned()))).then_some(agent)
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} did not reach Ready={status}/{reason}"))
}

#[tokio::test]
async fn apply_gives_a_url_and_a_secret_and_a_restart_keeps_them() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let operator = Operator::start(cluster, ns.name(), &[]).await;

    let started = std::time::Instant::now();
    apply_agent(&agents, "my-agent", webhook_agent()).await;
    let token = wait_for_token(&agents, "my-agent", None).await;
    eprintln!("apply to URL: {:?}", started.elapsed());

    let agent = wait_for_reason(&agents, "my-agent", "True", "WebhookReady").await;
    let status = agent.status.clone().expect("status");
    assert_eq!(
        status.webhook_url.as_deref(),
        Some(
            format!(
                "https://hooks.example.test/webhooks/{}/my-agent/{token}",
                ns.name()
            )
            .as_str()
        )
    );
    assert_eq!(status.observed_generation, agent.metadata.generation);

    let secret = secrets
        .get(&names::webhook_secret_name("my-agent"))
        .await
        .expect("the managed Secret exists");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(token.as_str())
    );
    assert_eq!(data(&secret, secret_keys::URL), status.webhook_url);
    assert_eq!(
        secret
            .labels()
            .get(names::MANAGED_BY_LABEL)
            .map(String::as_str),
        Some("hookrun")
    );
    assert_eq!(
        secret.labels().get(names::AGENT_LABEL).map(String::as_str),
        Some("my-agent")
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Agent", Some(true))
    );
    assert_eq!(Some(&owner.uid), agent.metadata.uid.as_ref());

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client().await, ns.name());
    let created = eventually(BUDGET, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("TokenCreated"))
            .then_some(())
    })
    .await;
    assert!(created.is_some(), "no TokenCreated event");

    // Nothing to do: a reconcile writes nothing. Touching the Agent's metadata triggers
    // a reconcile without changing what it should produce.
    let settled = operator.settled_after("agent", 0.0).await;
    let writes_before = operator.writes("agent").await;
    let secret_rv = secrets
        .get(&names::webhook_secret_name("my-agent"))
        .await
        .expect("secret")
        .resource_version();
    agents
        .patch(
            "my-agent",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("label patch");
    let agent_rv = agents
        .get("my-agent")
        .await
        .expect("agent")
        .resource_version();
    operator.settled_after("agent", settled).await;
    let reconciles = operator
        .metric("hookrun_operator_reconciles_total{controller=\"agent\"}")
        .await;
    assert!(reconciles >= 2.0, "reconciles: {reconciles}");
    assert_eq!(
        operator.writes("agent").await,
        writes_before,
        "a no-op reconcile wrote"
    );
    assert_eq!(
        agents
            .get("my-agent")
            .await
            .expect("agent")
            .resource_version(),
        agent_rv
    );
    assert_eq!(
        secrets
            .get(&names::webhook_secret_name("my-agent"))
            .await
            .expect("secret")
            .resource_version(),
        secret_rv
    );

    // A restart keeps the token and writes nothing.
    drop(operator);
    let operator = Operator::start(cluster, ns.name(), &[]).await;
    assert!(
        is_ready(&operator).await,
        "the restarted operator never became ready"
    );
    operator.settled_after("agent", 0.0).await;
    assert_eq!(wait_for_token(&agents, "my-agent", None).await, token);
    assert_eq!(
        agents
            .get("my-agent")
            .await
            .expect("agent")
            .resource_version(),
        agent_rv
    );
    assert_eq!(
        operator.writes("agent").await,
        0.0,
        "the restarted operator wrote"
    );
}

#[tokio::test]
async fn deleting_the_secret_gives_a_new_token_and_removing_the_trigger_clears_everything() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, ns.name(), &[]).await;
    let secret_name = names::webhook_secret_name("rotating");

    apply_agent(&agents, "rotating", webhook_agent()).await;
    let first = wait_for_token(&agents, "rotating", None).await;
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .expect("the Secret deletes");
    let second = wait_for_token(&agents, "rotating", Some(&first)).await;
    assert_ne!(first, second);
    let secret = secrets.get(&secret_name).await.expect("a new Secret");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(second.as_str())
    );

    // Remove the trigger: the Secret goes, the URL is cleared.
    apply_agent(
        &agents,
        "rotating",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "rotating", "True", "NoWebhookTrigger").await;
    assert_eq!(agent.status.and_then(|s| s.webhook_url), None);
    let gone = eventually(BUDGET, || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the Secret was not deleted");

    // Put it back, then delete the Agent: garbage collection removes the Secret.
    apply_agent(&agents, "rotating", webhook_agent()).await;
    wait_for_token(&agents, "rotating", None).await;
    agents
        .delete("rotating", &DeleteParams::default())
        .await
        .expect("the Agent deletes");
    // Garbage collection can take a discovery resync (30 s) to learn a new CRD's kind.
    let collected = eventually(Duration::from_secs(90), || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(collected.is_some(), "the Secret was not garbage-collected");
}

#[tokio::test]
async fn a_missing_secret_ref_waits_for_the_secret_and_follows_its_changes() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, ns.name(), &[]).await;

    apply_agent(
        &agents,
        "signed",
        json!({"spec": {"triggers": [{"webhook": {
            "linearSignatureSecretRef": {"name": "linear", "key": "signing-secret"}
        }}]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "signed", "False", "SecretRefMissing").await;
    let message = agent
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("\"linear\"") && message.contains("\"signing-secret\""),
        "{message}"
    );

    let linear = |value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "linear"},
               "stringData": {"signing-secret": value}})
    };
    secrets
        .patch(
            "linear",
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(linear("one")),
        )
        .await
        .expect("the referenced Secret applies");
    wait_for_reason(&agents, "signed", "True", "WebhookReady").await;
    let managed = names::webhook_secret_name("signed");
    let copied = eventually(BUDGET, || async {
        let s = secrets.get(&managed).await.ok()?;
        (data(&s, "linear-signing-secret").as_deref() == Some("one")).then_some(())
    })
    .await;
    assert!(copied.is_some(), "the signing secret was not copied");

    secrets
        .patch(
            "linear",
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(linear("two")),
        )
        .await
        .expect("the referenced Secret changes");
    let followed = eventually(BUDGET, || async {
        let s = secrets.get(&managed).await.ok()?;
        (data(&s, "linear-signing-secret").as_deref() == Some("two")).then_some(())
    })
    .await;
    assert!(
        followed.is_some(),
        "the copy did not follow the referenced Secret"
    );
}

#[tokio::test]
async fn graceful_rotation_keeps_the_previous_token_for_the_grace_period() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let operator = Operator::start(cluster, ns.name(), &[]).await;
    let managed = names::webhook_secret_name("graceful");

    apply_agent(&agents, "graceful", webhook_agent()).await;
    let old = wait_for_token(&agents, "graceful", None).await;

    let mut rotated = webhook_agent();
    rotated["metadata"]["annotations"] = json!({
        names::ROTATE_TOKEN_ANNOTATION: "2030-01-01",
        names::ROTATION_GRACE_ANNOTATION: "3s",
    });
    apply_agent(&agents, "graceful", rotated).await;
    let new = wait_for_token(&agents, "graceful", Some(&old)).await;
    let secret = secrets.get(&managed).await.expect("secret");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(new.as_str())
    );
    assert_eq!(
        data(&secret, secret_keys::PREVIOUS_TOKEN).as_deref(),
        Some(old.as_str())
    );
    assert!(data(&secret, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT).is_some());

    let dropped = eventually(Duration::from_secs(10), || async {
        let s = secrets.get(&managed).await.ok()?;
        data(&s, secret_keys::PREVIOUS_TOKEN).is_none().then_some(s)
    })
    .await
    .expect("the previous token was not dropped after its grace period");
    assert_eq!(
        data(&dropped, secret_keys::TOKEN).as_deref(),
        Some(new.as_str())
    );
    assert!(data(&dropped, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT).is_none());
    // The same annotation does not rotate again: a reconcile after the drop keeps the
    // token.
    let settled = operator.settled_after("agent", 0.0).await;
    agents
        .patch(
            "graceful",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("label patch");
    operator.settled_after("agent", settled).await;
    assert_eq!(wait_for_token(&agents, "graceful", None).await, new);
}

#[tokio::test]
async fn an_invalid_spec_says_which_field_and_redaction_hides_the_token() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, ns.name(), &["--redact-url-in-status"]).await;

    apply_agent(
        &agents,
        "bad",
        json!({"spec": {"models": [""], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "bad", "False", "InvalidSpec").await;
    let message = agent
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(message.contains("spec.models[0]"), "{message}");

    apply_agent(&agents, "hidden", webhook_agent()).await;
    let agent = wait_for_reason(&agents, "hidden", "True", "WebhookReady").await;
    let url = agent.status.and_then(|s| s.webhook_url).expect("a URL");
    assert!(
        url.ends_with(&format!("/hidden/{}", names::REDACTED_TOKEN)),
        "{url}"
    );
    let secret = secrets
        .get(&names::webhook_secret_name("hidden"))
        .await
        .expect("secret");
    let full = data(&secret, secret_keys::URL).expect("url key");
    assert!(
        !full.contains(names::REDACTED_TOKEN) && full.contains("/hidden/"),
        "{full}"
    );
}

#[tokio::test]
async fn with_leader_election_only_one_operator_writes() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let election = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-lease-duration",
        "3s",
    ];
    let a = Operator::start(cluster, ns.name(), &election).await;
    let b = Operator::start(cluster, ns.name(), &election).await;

    apply_agent(&agents, "elected", webhook_agent()).await;
    let token = wait_for_token(&agents, "elected", None).await;
    let holder = eventually(BUDGET, || async {
        leases
            .get_opt("hookrun-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await
    .expect("a lease holder");
    let (leader, standby) = if holder.ends_with(&format!("-{}", a.pid())) {
        (a, b)
    } else {
        assert!(
            holder.ends_with(&format!("-{}", b.pid())),
            "holder {holder}"
        );
        (b, a)
    };
    assert!(leader.writes("agent").await >= 2.0);
    assert_eq!(standby.writes("agent").await, 0.0, "the standby wrote");
    assert_eq!(get(&standby.admin, "/readyz").await.status, 200);

    // The leader dies without stepping down: the standby takes over after the lease
    // expires, and then it writes.
    drop(leader);
    let secrets: Api<Secret> = Api::namespaced(cluster.client().await, ns.name());
    secrets
        .delete(
            &names::webhook_secret_name("elected"),
            &DeleteParams::default(),
        )
        .await
        .expect("the Secret deletes");
    let next = eventually(Duration::from_secs(20), || async {
        let agent = agents.get("elected").await.ok()?;
        let url = agent.status?.webhook_url?;
        let t = url.rsplit('/').next()?.to_owned();
        (t != token).then_some(t)
    })
    .await;
    assert!(next.is_some(), "the standby did not take over");
    assert!(standby.writes("agent").await >= 2.0);

    // SIGTERM: the new leader stops cleanly and steps down.
    let mut standby = standby;
    let status = standby.process.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit on SIGTERM");
    let lease = leases.get("hookrun-operator").await.expect("the lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "the lease was not released"
    );
}

#[tokio::test]
async fn a_frozen_leader_writes_nothing_after_a_successor_took_over() {
    const OLD: &str = "https://old-leader.example.test/";
    const NEW: &str = "https://new-leader.example.test/";
    const LEASE: Duration = Duration::from_secs(3);
    const MARKER: &str = "test.hookrun.dev/after-exit";
    const AGENTS: usize = 40;
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let (old, new) = elected_pair(cluster, ns.name(), "3s", OLD, NEW).await;
    let new_pid = format!("-{}", new.pid());
    let urls = |agents: &Api<Agent>| {
        let agents = agents.clone();
        async move {
            agents
                .list(&Default::default())
                .await
                .map(|list| {
                    list.items
                        .into_iter()
                        .filter_map(|a| a.status?.webhook_url)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };

    // Freeze the leader in the middle of a burst of work, so that it holds reconciles
    // that are past every check of their own when it stops.
    let burst = {
        let agents = agents.clone();
        tokio::spawn(async move {
            futures::future::join_all((0..AGENTS).map(|i| {
                let agents = agents.clone();
                async move { apply_agent(&agents, &format!("a{i}"), webhook_agent()).await }
            }))
            .await
        })
    };
    eventually(BUDGET, || async {
        urls(&agents)
            .await
            .iter()
            .any(|u| u.starts_with(OLD))
            .then_some(())
    })
    .await
    .expect("the first leader starts on the burst");
    old.process.signal("STOP");
    let frozen_at = std::time::Instant::now();
    burst.await.expect("the burst is applied");

    // The standby takes over within the lease duration and a few seconds, judged by its
    // own clock, and writes its own URL everywhere.
    eventually(LEASE + Duration::from_secs(10), || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&new_pid))
    })
    .await
    .expect("the standby takes over from a frozen leader");
    let takeover = frozen_at.elapsed();
    assert!(
        takeover <= LEASE + Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    eventually(Duration::from_secs(30), || async {
        let urls = urls(&agents).await;
        (urls.len() == AGENTS && urls.iter().all(|u| u.starts_with(NEW))).then_some(())
    })
    .await
    .expect("the new leader writes every URL");

    // Record every Agent change from now on, then wake the old leader.
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let watch = {
        let recorded = recorded.clone();
        let stream =
            kube::runtime::watcher(agents.clone(), kube::runtime::watcher::Config::default());
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(event)) = stream.next().await {
                if let kube::runtime::watcher::Event::Apply(agent)
                | kube::runtime::watcher::Event::InitApply(agent) = event
                {
                    let marked = agent.annotations().contains_key(MARKER);
                    if let Some(url) = agent.status.and_then(|s| s.webhook_url) {
                        recorded.lock().expect("the record").push((url, marked));
                    }
                }
            }
        })
    };
    eventually(BUDGET, || async {
        (!recorded.lock().ok()?.is_empty()).then_some(())
    })
    .await
    .expect("the watch sees the Agents");
    old.process.signal("CONT");
    let mut old = old;
    let exited = old
        .process
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("the old leader exits once it finds the lease gone");
    assert!(!exited.success(), "losing the lease is an error exit");
    // A write after its exit: once the watch shows it, it has shown every earlier write.
    agents
        .patch(
            "a0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {MARKER: "1"}}})),
        )
        .await
        .expect("the marker annotation");
    eventually(BUDGET, || async {
        recorded
            .lock()
            .ok()?
            .iter()
            .any(|(_, marked)| *marked)
            .then_some(())
    })
    .await
    .expect("the watch sees the marker");
    watch.abort();
    let stale: Vec<String> = recorded
        .lock()
        .expect("the record")
        .iter()
        .filter(|(u, _)| !u.starts_with(NEW))
        .map(|(u, _)| {
            u.rsplit_once('/')
                .map_or(u.clone(), |(path, _)| path.to_owned())
        })
        .collect();
    assert!(
        stale.is_empty(),
        "the old leader wrote {} statuses after the new one took over: {stale:?}",
        stale.len()
    );
    // Nor did any token change: each Agent shows the one URL its new leader published.
    let mut published = std::collections::BTreeMap::<String, String>::new();
    for (url, _) in recorded.lock().expect("the record").iter() {
        let agent = url.rsplit('/').nth(1).unwrap_or_default().to_owned();
        let first = published
            .entry(agent.clone())
            .or_insert_with(|| url.clone());
        assert_eq!(first, url, "the URL of {agent} changed after the takeover");
    }
    assert_eq!(published.len(), AGENTS, "every Agent was seen");
    assert!(
        old.log_text().contains("stepping down") || old.log_text().contains("took the lease"),
        "the old leader says why it stopped: {}",
        old.log_text()
    );
    drop(new);
}
