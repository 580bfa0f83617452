//! Operator benchmark on the real local control plane (`make bench`):
//!
//! 1. apply-to-URL latency over 50 sequential Agents (p50, p99);
//! 2. 1000 Agents applied at once: time until every one has a URL, API writes per Agent
//!    (Secret creates/updates + Agent status patches, counted from watch events; Kubernetes
//!    Events counted apart), writes during a quiet window afterwards (goal: zero);
//! 3. the operator's resident memory with those Agents;
//! 4. Session-created-to-Pod-created latency: Sessions one at a time, then all at once
//!    (p50, p99);
//! 5. webhook-to-Pod latency through the real apiserver, one webhook at a time (p50, p99);
//! 6. live Session reads per created pod: the kube-apiserver's own count of Session GETs
//!    while the operator turns Sessions into pods (part 4), divided by the pods created;
//! 7. the cache's cost: the operator's resident memory with N finished Sessions (each
//!    with a title, payload, env and events, as webhooks leave them) and their
//!    Succeeded pods, minus its memory before them, per Session+Pod; measured on the
//!    operator that ran them and on a fresh one that only lists them.
//!
//! Sizes: `HOOKRUN_BENCH_AGENTS` (1000), `HOOKRUN_BENCH_SEQUENTIAL` (50),
//! `HOOKRUN_BENCH_QUIET_SECS` (60), `HOOKRUN_BENCH_SESSIONS` (100),
//! `HOOKRUN_BENCH_CACHED` (1000). With `HOOKRUN_BENCH_AGENTS=0` only the Session parts
//! run. The figures of parts 3, 6 and 7 are also written, with their goals, to this
//! bench's section of `target/bench/report.md`.

#[path = "../../apiserver/benches/support/loadgen.rs"]
mod loadgen;

use std::{
    collections::HashSet,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt, stream, stream::BoxStream};
use hookrun_crds::{
    Agent, AgentSpec, Session, SessionPhase, SessionSpec,
    agent::{SessionTemplate, Trigger, WebhookTrigger},
    session::{SessionEnvVar, SessionTrigger},
};
use hookrun_tests::door::{self, ApiServer, Operator};
use hookrun_tests::{TestNamespace, cluster, eventually};
use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

/// The figures this bench writes to the report (each when its part ran).
#[derive(Default)]
struct Figures {
    agents: Option<(u64, f64)>,
    gets_per_pod: Option<(f64, u64)>,
    cache: Option<CacheFigures>,
}

struct CacheFigures {
    sessions: u64,
    baseline_mib: f64,
    ran_mib: f64,
    listed_mib: f64,
}

impl CacheFigures {
    fn per_session_kib(&self, total_mib: f64) -> f64 {
        (total_mib - self.baseline_mib) * 1024.0 / self.sessions as f64
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent(name: &str) -> Agent {
    Agent::new(
        name,
        AgentSpec {
            models: vec!["anthropic/claude-sonnet-4-6".into()],
            triggers: vec![Trigger {
                webhook: Some(WebhookTrigger::default()),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

async fn start_operator(kubeconfig: &std::path::Path, namespace: &str) -> Operator {
    Operator::start_with(
        kubeconfig,
        namespace,
        "bench",
        &[
            "--public-url",
            "https://hooks.bench.example",
            "--runner-url",
            "http://runner.bench.example",
        ],
    )
    .await
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Counts write events on one kind in the namespace from `resource_version` on.
fn count_writes<K>(api: Api<K>, resource_version: String, count_added: bool) -> Arc<AtomicU64>
where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let counter = Arc::new(AtomicU64::new(0));
    let writes = counter.clone();
    tokio::spawn(async move {
        let params = WatchParams::default().timeout(290);
        let Ok(stream) = api.watch(&params, &resource_version).await else {
            return;
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            match event {
                WatchEvent::Added(_) if count_added => writes.fetch_add(1, Ordering::Relaxed),
                WatchEvent::Modified(_) | WatchEvent::Deleted(_) => {
                    writes.fetch_add(1, Ordering::Relaxed)
                }
                _ => 0,
            };
        }
    });
    counter
}

async fn list_version<K>(api: &Api<K>) -> String
where
    K: kube::Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.list_metadata(&ListParams::default().limit(1))
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default()
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

async fn sequential_latency(client: &Client, namespace: &str, count: u64) -> Vec<Duration> {
    let agents: Api<Agent> = Api::namespaced(client.clone(), namespace);
    let mut latencies = Vec::new();
    for _ in 0..count {
        let name = format!("seq-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed));
        let mut updates = watcher(
            agents.clone(),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .applied_objects()
        .boxed();
        let started = Instant::now();
        agents
            .create(&PostParams::default(), &agent(&name))
            .await
            .expect("create");
        while let Ok(Some(a)) = updates.try_next().await {
            if a.status
                .as_ref()
                .and_then(|s| s.webhook_url.as_ref())
                .is_some()
            {
                break;
            }
        }
        latencies.push(started.elapsed());
    }
    latencies.sort();
    latencies
}

fn session(name: &str) -> Session {
    Session::new(
        name,
        SessionSpec {
            agent: "bench".into(),
            title: "hello".into(),
            ..Default::default()
        },
    )
}

/// Session-created-to-Pod-created latency: `count` Sessions one at a time, then `count`
/// at once (16 creates in flight). Each latency runs from just before the Session's
/// create call to the pod's ADDED event on a watch opened beforehand.
async fn session_to_pod(client: &Client, namespace: &str, count: u64) -> f64 {
    let gets_before = session_gets(client).await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), namespace);
    let sessions: Api<Session> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    agents
        .create(&PostParams::default(), &agent("bench"))
        .await
        .expect("the Agent");
    let mut added = watcher(pods, watcher::Config::default())
        .applied_objects()
        .boxed();

    let sequential = one_at_a_time(&mut added, count, |i| {
        let sessions = sessions.clone();
        async move {
            let name = format!("seq-wh-{i:08x}");
            sessions
                .create(&PostParams::default(), &session(&name))
                .await
                .expect("create");
            name
        }
    })
    .await;
    print_latencies("Session-to-Pod", "sequential Sessions", &sequential);

    let created: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let creator = {
        let (sessions, created) = (sessions.clone(), created.clone());
        tokio::spawn(async move {
            stream::iter(0..count)
                .map(|i| {
                    let (sessions, created) = (sessions.clone(), created.clone());
                    async move {
                        let name = format!("burst-wh-{i:08x}");
                        if let Ok(mut created) = created.lock() {
                            created.insert(name.clone(), Instant::now());
                        }
                        sessions
                            .create(&PostParams::default(), &session(&name))
                            .await
                    }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
                .expect("every Session is created");
        })
    };
    let mut burst = Vec::new();
    while (burst.len() as u64) < count {
        match tokio::time::timeout(Duration::from_secs(120), added.try_next()).await {
            Ok(Ok(Some(pod))) => {
                let name = pod.metadata.name.unwrap_or_default();
                let since = created.lock().ok().and_then(|c| c.get(&name).copied());
                if let Some(since) = since
                    && name.starts_with("burst-")
                {
                    burst.push(since.elapsed());
                    if let Ok(mut created) = created.lock() {
                        created.remove(&name);
                    }
                }
            }
            other => panic!("waiting for pods failed after {}: {other:?}", burst.len()),
        }
    }
    let all = started.elapsed();
    creator.await.expect("creator task");
    burst.sort();
    println!(
        "{count} Sessions created at once: every pod after {:.2} s; Session-to-Pod p50 {:.0} ms, p99 {:.0} ms",
        all.as_secs_f64(),
        percentile(&burst, 0.50).as_secs_f64() * 1000.0,
        percentile(&burst, 0.99).as_secs_f64() * 1000.0,
    );
    // The operator's last status writes after the last pod are counted too.
    let pods = 2 * count + 1;
    let settled = eventually(Duration::from_secs(60), || async {
        let list = sessions.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .all(|s| s.status.as_ref().is_some_and(|st| st.pod_name.is_some()))
            .then_some(())
    })
    .await;
    assert!(settled.is_some(), "not every Session recorded its pod");
    let gets = session_gets(client).await - gets_before;
    let per_pod = gets / pods as f64;
    println!("live Session GETs per created pod: {per_pod:.2} ({gets:.0} GETs for {pods} pods)");
    per_pod
}

/// Session GETs the kube-apiserver has answered so far, from its own metrics.
async fn session_gets(client: &Client) -> f64 {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    let text = client
        .request_text(request)
        .await
        .expect("the kube-apiserver's metrics");
    text.lines()
        .filter(|l| {
            l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"sessions\"")
                && l.contains("verb=\"GET\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A Session as a webhook leaves it: a title, a payload, env overrides.
fn stored_session(name: &str, agent: &str) -> Session {
    Session::new(
        name,
        SessionSpec {
            agent: agent.into(),
            title: "t".repeat(1024),
            env: vec![
                SessionEnvVar {
                    name: "TICKET".into(),
                    value: "LIN-1234".into(),
                },
                SessionEnvVar {
                    name: "PRIORITY".into(),
                    value: "high".into(),
                },
            ],
            trigger: Some(SessionTrigger {
                source: "linear".into(),
                delivery_id: Some(format!("{name}-delivery")),
                idempotency_key: None,
                payload_digest: Some(format!("sha256:{}", "ab".repeat(32))),
                payload: Some(format!("{{\"data\":\"{}\"}}", "p".repeat(4096))),
                payload_truncated: false,
                callback_url: None,
            }),
            session_key: None,
            history: Vec::new(),
        },
    )
}

/// Plays the kubelet and the harness for one pod: events on the Session, then the pod
/// Succeeded with the status fields a kubelet writes.
async fn finish_pod(sessions: &Api<Session>, pods: &Api<Pod>, name: &str) {
    let events: Vec<_> = (0..4)
        .map(|i| {
            json!({"type": "agent.message", "content": format!("{i}: {}", "m".repeat(1000)),
                   "timestamp": "2026-01-01T00:00:00Z"})
        })
        .collect();
    sessions
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"events": events}})),
        )
        .await
        .expect("events on the Session");
    let now = "2026-01-01T00:00:00Z";
    let conditions: Vec<_> = [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ]
    .iter()
    .map(|t| json!({"type": t, "status": "False", "lastTransitionTime": now, "reason": "PodCompleted"}))
    .collect();
    let status = json!({"status": {
        "phase": "Succeeded",
        "hostIP": "10.0.0.1", "podIP": "10.1.2.3",
        "podIPs": [{"ip": "10.1.2.3"}], "hostIPs": [{"ip": "10.0.0.1"}],
        "startTime": now,
        "conditions": conditions,
        "containerStatuses": [{
            "name": "agent", "ready": false, "restartCount": 0, "started": false,
            "image": "ghcr.io/hookrun/harness:0.1.0",
            "imageID": format!("ghcr.io/hookrun/harness@sha256:{}", "cd".repeat(32)),
            "containerID": format!("containerd://{}", "ef".repeat(32)),
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": now,
                      "finishedAt": now, "containerID": format!("containerd://{}", "ef".repeat(32))}}
        }]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("the pod's status");
}

/// Waits until the operator reports ready and its Session controller is idle.
async fn ready_and_settled(operator: &Operator) {
    let ready = eventually(Duration::from_secs(120), || async {
        (door::request(&operator.admin, "GET", "/readyz", &[], "")
            .await
            .status
            == 200)
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "the operator never became ready");
    let mut finished = operator.reconciled("session").await;
    // Idle: no reconcile started or finished for a second.
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = operator.reconciled("session").await;
        let started = operator
            .metric("hookrun_operator_reconciles_total{controller=\"session\"}")
            .await;
        if now == finished && started == now {
            break;
        }
        finished = now;
    }
}

fn rss_mib(operator: &Operator) -> f64 {
    rss_kib(operator.pid()).expect("the operator's RSS") as f64 / 1024.0
}

/// Part 7: memory per cached Session+Pod.
async fn cache_footprint(
    client: &Client,
    kubeconfig: &std::path::Path,
    count: u64,
) -> CacheFigures {
    let ns = TestNamespace::new(cluster().await).await;
    let namespace = ns.name();
    let agents: Api<Agent> = Api::namespaced(client.clone(), namespace);
    let sessions: Api<Session> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut keeper = agent("cached");
    keeper.spec.session = Some(Box::new(SessionTemplate {
        max_stored_sessions: Some(i64::try_from(count).unwrap_or(i64::MAX) + 10),
        ..Default::default()
    }));
    agents
        .create(&PostParams::default(), &keeper)
        .await
        .expect("the Agent");
    let operator = start_operator(kubeconfig, namespace).await;
    ready_and_settled(&operator).await;
    let baseline_mib = rss_mib(&operator);

    let mut added = watcher(pods.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let creator = {
        let sessions = sessions.clone();
        tokio::spawn(async move {
            stream::iter(0..count)
                .map(|i| {
                    let sessions = sessions.clone();
                    async move {
                        sessions
                            .create(
                                &PostParams::default(),
                                &stored_session(&format!("cached-wh-{i:08x}"), "cached"),
                            )
                            .await
                    }
                })
                .buffer_unordered(16)
                .try_collect::<Vec<_>>()
                .await
                .expect("every Session is created");
        })
    };
    let mut created = HashSet::new();
    let mut finishing = Vec::new();
    while (created.len() as u64) < count {
        match tokio::time::timeout(Duration::from_secs(120), added.try_next()).await {
            Ok(Ok(Some(pod))) => {
                let name = pod.metadata.name.unwrap_or_default();
                if created.insert(name.clone()) {
                    let (sessions, pods) = (sessions.clone(), pods.clone());
                    finishing.push(async move { finish_pod(&sessions, &pods, &name).await });
                }
            }
            other => panic!("waiting for pods failed after {}: {other:?}", created.len()),
        }
    }
    creator.await.expect("creator task");
    stream::iter(finishing)
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let complete = eventually(Duration::from_secs(300), || async {
        let list = sessions.list(&ListParams::default()).await.ok()?;
        let done = list
            .items
            .iter()
            .filter(|s| s.status.as_ref().map(|st| st.phase()) == Some(SessionPhase::Complete))
            .count() as u64;
        (done == count).then_some(())
    })
    .await;
    assert!(complete.is_some(), "not every Session completed");
    ready_and_settled(&operator).await;
    let ran_mib = rss_mib(&operator);
    drop(operator);

    let operator = start_operator(kubeconfig, namespace).await;
    ready_and_settled(&operator).await;
    let listed_mib = rss_mib(&operator);
    drop(operator);
    let figures = CacheFigures {
        sessions: count,
        baseline_mib,
        ran_mib,
        listed_mib,
    };
    println!(
        "operator RSS: {baseline_mib:.1} MiB before, {ran_mib:.1} MiB after running {count} Sessions ({:.2} KiB per Session+Pod), {listed_mib:.1} MiB restarted with them ({:.2} KiB per Session+Pod)",
        figures.per_session_kib(ran_mib),
        figures.per_session_kib(listed_mib),
    );
    figures
}

/// Replaces this bench's section of `target/bench/report.md`, keeping the rest.
fn write_report(figures: &Figures) {
    let mut section = String::from(
        "## Operator\n\nFrom `cargo bench -p hookrun-tests --bench operator` (release binaries, \
         default flags).\n\n| figure | measured | goal |\n|---|---|---|\n",
    );
    if let Some((agents, mib)) = figures.agents {
        let _ = writeln!(
            section,
            "| operator RSS with {agents} Agents | {mib:.1} MiB | ≤ 20 MiB{} |",
            if mib <= 20.0 { "" } else { " (missed)" }
        );
    }
    if let Some(cache) = &figures.cache {
        let ran = cache.per_session_kib(cache.ran_mib);
        let listed = cache.per_session_kib(cache.listed_mib);
        let _ = writeln!(
            section,
            "| memory per cached Session+Pod, {} finished (restarted operator; RSS {:.1} → {:.1} MiB) | {listed:.2} KiB | ≤ 2 KiB{} |",
            cache.sessions,
            cache.baseline_mib,
            cache.listed_mib,
            if listed <= 2.0 { "" } else { " (missed)" }
        );
        let _ = writeln!(
            section,
            "| the same on the operator that ran them (RSS {:.1} → {:.1} MiB) | {ran:.2} KiB | ≤ 2 KiB{} |",
            cache.baseline_mib,
            cache.ran_mib,
            if ran <= 2.0 { "" } else { " (missed)" }
        );
    }
    if let Some((per_pod, pods)) = figures.gets_per_pod {
        let _ = writeln!(
            section,
            "| live Session GETs per created pod ({pods} pods; kube-apiserver's count) | {per_pod:.2} | 1 (the read before creating a pod) |"
        );
    }
    let path = loadgen::write_report_section("operator", &section);
    println!("report: {}", path.display());
}

/// Webhook-to-Pod latency: `count` webhooks one at a time through the real apiserver,
/// each from just before the POST to the ADDED event of the pod of the Session it names.
async fn webhook_to_pod(
    client: &Client,
    kubeconfig: &std::path::Path,
    namespace: &str,
    count: u64,
) {
    let agents: Api<Agent> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let apiserver = ApiServer::start(kubeconfig, namespace, "bench").await;
    let path = door::webhook_path(&agents, namespace, "bench").await;
    assert!(
        door::is_known(&apiserver.public, &path).await,
        "the apiserver never accepted the token"
    );
    let mut added = watcher(pods, watcher::Config::default())
        .applied_objects()
        .boxed();
    let (public, path) = (apiserver.public.clone(), path.clone());
    let latencies = one_at_a_time(&mut added, count, |_| {
        let (public, path) = (public.clone(), path.clone());
        async move {
            let answer = door::request(&public, "POST", &path, &[], r#"{"title":"bench"}"#).await;
            assert_eq!(answer.status, 200, "{answer:?}");
            answer.json["session"]
                .as_str()
                .expect("a Session")
                .to_owned()
        }
    })
    .await;
    print_latencies("webhook-to-Pod", "sequential webhooks", &latencies);
}

/// Runs `start(i)` for `i` in `0..=count`, one at a time; each returns the name of the
/// Session it made, and is timed until that Session's pod appears on `added`. The first
/// is not counted: it also waits out the operator's start or the watch's initial list.
async fn one_at_a_time<F, Fut>(
    added: &mut BoxStream<'static, Result<Pod, watcher::Error>>,
    count: u64,
    start: F,
) -> Vec<Duration>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut latencies = Vec::new();
    for i in 0..=count {
        let started = Instant::now();
        let name = start(i).await;
        loop {
            match tokio::time::timeout(Duration::from_secs(60), added.try_next()).await {
                Ok(Ok(Some(pod))) if pod.metadata.name.as_deref() == Some(name.as_str()) => break,
                Ok(Ok(Some(_))) => continue,
                other => panic!("no pod for {name}: {other:?}"),
            }
        }
        if i > 0 {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort();
    latencies
}

fn print_latencies(what: &str, over: &str, sorted: &[Duration]) {
    println!(
        "{what} latency over {} {over}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        sorted.len(),
        percentile(sorted, 0.50).as_secs_f64() * 1000.0,
        percentile(sorted, 0.99).as_secs_f64() * 1000.0,
        sorted.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
}

#[tokio::main]
async fn main() {
    let agents_n = env_number("HOOKRUN_BENCH_AGENTS", 1000);
    let sequential_n = env_number("HOOKRUN_BENCH_SEQUENTIAL", 50);
    let quiet = Duration::from_secs(env_number("HOOKRUN_BENCH_QUIET_SECS", 60));

    let sessions_n = env_number("HOOKRUN_BENCH_SESSIONS", 100);
    let cached_n = env_number("HOOKRUN_BENCH_CACHED", 1000);

    let cluster = cluster().await;
    let client = cluster.client().await;
    let mut figures = Figures::default();
    if sessions_n > 0 {
        let ns = TestNamespace::new(cluster).await;
        let _operator = start_operator(&cluster.kubeconfig_path(), ns.name()).await;
        let per_pod = session_to_pod(&client, ns.name(), sessions_n).await;
        figures.gets_per_pod = Some((per_pod, 2 * sessions_n + 1));
        webhook_to_pod(&client, &cluster.kubeconfig_path(), ns.name(), sessions_n).await;
    }
    if cached_n > 0 {
        figures.cache = Some(cache_footprint(&client, &cluster.kubeconfig_path(), cached_n).await);
    }
    if agents_n == 0 {
        write_report(&figures);
        return;
    }
    let ns = TestNamespace::new(cluster).await;
    let operator = start_operator(&cluster.kubeconfig_path(), ns.name()).await;

    // 1. Sequential latency, after one Agent that waits out the operator's start.
    sequential_latency(&client, ns.name(), 1).await;
    let latencies = sequential_latency(&client, ns.name(), sequential_n).await;
    println!(
        "apply-to-URL latency over {} sequential Agents: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );

    // 2. A burst in a namespace of its own, with writes counted from watch events.
    let burst_ns = TestNamespace::new(cluster).await;
    drop(operator);
    let operator = start_operator(&cluster.kubeconfig_path(), burst_ns.name()).await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), burst_ns.name());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), burst_ns.name());
    let events: Api<Event> = Api::namespaced(client.clone(), burst_ns.name());
    let agent_writes = count_writes(agents.clone(), list_version(&agents).await, false);
    let secret_writes = count_writes(secrets.clone(), list_version(&secrets).await, true);
    let event_writes = count_writes(events.clone(), list_version(&events).await, true);

    let mut ready = watcher(agents.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let started = Instant::now();
    let creator = {
        let agents = agents.clone();
        tokio::spawn(async move {
            stream::iter(0..agents_n)
                .map(|i| {
                    let agents = agents.clone();
                    async move {
                        agents
                            .create(&PostParams::default(), &agent(&format!("burst-{i}")))
                            .await
                    }
                })
                .buffer_unordered(32)
                .try_collect::<Vec<_>>()
                .await
                .expect("every Agent is created");
        })
    };
    let mut with_url = HashSet::new();
    while (with_url.len() as u64) < agents_n {
        match tokio::time::timeout(Duration::from_secs(300), ready.try_next()).await {
            Ok(Ok(Some(a))) => {
                if a.status
                    .as_ref()
                    .and_then(|s| s.webhook_url.as_ref())
                    .is_some()
                {
                    with_url.insert(a.metadata.name.unwrap_or_default());
                }
            }
            other => panic!(
                "waiting for URLs failed after {} of {agents_n}: {other:?}",
                with_url.len()
            ),
        }
    }
    let burst = started.elapsed();
    creator.await.expect("creator task");
    // Every reconcile has finished before the counters are read.
    operator.settled_after("agent", 0.0).await;
    let (a, s, e) = (
        agent_writes.load(Ordering::Relaxed),
        secret_writes.load(Ordering::Relaxed),
        event_writes.load(Ordering::Relaxed),
    );
    println!(
        "{agents_n} Agents applied at once: all have a URL after {:.1} s ({:.0} Agents/s)",
        burst.as_secs_f64(),
        agents_n as f64 / burst.as_secs_f64()
    );
    println!(
        "API writes per Agent: {:.2} (Secret writes {s}, Agent status/metadata writes {a}); Kubernetes Events recorded: {e}",
        (a + s) as f64 / agents_n as f64
    );
    if let Some(rss) = rss_kib(operator.pid()) {
        let mib = rss as f64 / 1024.0;
        println!("operator RSS with {agents_n} Agents: {mib:.1} MiB");
        figures.agents = Some((agents_n, mib));
    }

    // 3. Quiet window: nothing may be written.
    let before = a + s + e;
    tokio::time::sleep(quiet).await;
    let after = agent_writes.load(Ordering::Relaxed)
        + secret_writes.load(Ordering::Relaxed)
        + event_writes.load(Ordering::Relaxed);
    println!(
        "writes in the {} s after: {}",
        quiet.as_secs(),
        after - before
    );
    if let Some(rss) = rss_kib(operator.pid()) {
        println!(
            "operator RSS after the quiet window: {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    drop(operator);
    write_report(&figures);
}
