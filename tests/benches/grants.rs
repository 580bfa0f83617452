//! Grant revocation latency (`make bench`), on the shared local control plane with the
//! real operator and two real apiserver replicas: for each of `HOOKRUN_BENCH_GRANTS`
//! (50) Grants, mint it, knock until both replicas accept its token, set
//! `spec.revoked: true`, and knock at both replicas until each answers 403. The figure
//! of a Grant is the time from the revoke's write to the slower replica's first 403 (the
//! revocation holds everywhere); the knocks carry one idempotency key, so they store
//! nothing. Goal: p99 under 1 s (one watch round-trip, no polling of the cluster).
//!
//! The figures are written to `target/bench/report.md` (replacing this bench's section,
//! keeping the rest); the bench fails after writing them when the goal is missed.

#[path = "../../apiserver/benches/support/loadgen.rs"]
mod loadgen;

use std::time::{Duration, Instant};

use hookrun_crds::grant::{GrantSpec, GrantVerb};
use hookrun_crds::{Agent, Grant, Session, SessionSpec};
use hookrun_tests::door::{ApiServer, BUDGET, Operator, PUBLIC_URL, request};
use hookrun_tests::fixtures::apply_webhook_agent;
use hookrun_tests::{TestNamespace, cluster, eventually};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// The goal for the slower replica's p99.
const GOAL_P99: Duration = Duration::from_secs(1);

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(bench());
}

fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    let index = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

/// Knocks with `token` at `public` every millisecond until the answer is 403; the time
/// from `since` to that answer.
async fn until_refused(public: &str, path: &str, body: &str, since: Instant) -> Duration {
    loop {
        let answer = request(public, "POST", path, &[], body).await;
        match answer.status {
            403 => return since.elapsed(),
            202 | 200 => {}
            other => panic!("a knock after the revoke got {other}: {}", answer.text),
        }
        assert!(since.elapsed() < BUDGET, "the revoke never took effect");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn bench() {
    let grants_wanted: usize = std::env::var("HOOKRUN_BENCH_GRANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let _operator = Operator::start(
        cluster,
        ns.name(),
        &[
            "--runner-url",
            "http://runner.hookrun.test:8080",
            "--pending-timeout",
            "1h",
        ],
    )
    .await;
    // Each Grant's own rate limit (the launcher's burst of 1000) outlasts its knocks;
    // refused tokens are not limited per address here.
    let limits = ["--review-limit-burst", "100000"];
    let mut replicas = Vec::new();
    for i in 0..2 {
        let tag = format!("{}-grants-bench-{i}", ns.name());
        replicas.push(
            ApiServer::start_with_args(&cluster.kubeconfig_path(), ns.name(), &tag, &limits).await,
        );
    }
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    apply_webhook_agent(&agents, "helper", json!({})).await;
    // A Session that stays Pending (no kubelet): inputs into it are 202 buffered.
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns.name());
    let session = Session::new(
        "bench-session",
        SessionSpec {
            agent: "helper".to_owned(),
            title: "take input".to_owned(),
            ..SessionSpec::default()
        },
    );
    sessions
        .create(&PostParams::default(), &session)
        .await
        .expect("the Session is created");
    let grants: Api<Grant> = Api::namespaced(client, ns.name());
    let body = json!({"message": "knock", "idempotency_key": "bench"}).to_string();
    let prefix = format!("{}/hook/", PUBLIC_URL.trim_end_matches('/'));

    let (mut slower, mut each) = (Vec::new(), Vec::new());
    for i in 0..grants_wanted {
        let name = format!("bench-{i}");
        let grant = Grant::new(
            &name,
            GrantSpec {
                session: "bench-session".to_owned(),
                verbs: vec![GrantVerb::SendInput],
                ttl_seconds: Some(600),
                label: Some("bench".to_owned()),
                revoked: false,
            },
        );
        grants
            .create(&PostParams::default(), &grant)
            .await
            .expect("the Grant is created");
        let url = eventually(BUDGET, || async {
            grants.get(&name).await.ok()?.status?.url
        })
        .await
        .expect("the Grant got its URL");
        let path = format!("/hook/{}", url.strip_prefix(&prefix).expect("a hook URL"));
        for replica in &replicas {
            eventually(BUDGET, || async {
                let answer = request(&replica.public, "POST", &path, &[], &body).await;
                (answer.status == 202).then_some(())
            })
            .await
            .expect("every replica accepts the new Grant");
        }
        let revoked_at = Instant::now();
        grants
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"revoked": true}})),
            )
            .await
            .expect("the Grant is revoked");
        let (a, b) = tokio::join!(
            until_refused(&replicas[0].public, &path, &body, revoked_at),
            until_refused(&replicas[1].public, &path, &body, revoked_at),
        );
        slower.push(a.max(b));
        each.extend([a, b]);
    }
    slower.sort();
    each.sort();
    let (p50, p99) = (percentile_ms(&slower, 50), percentile_ms(&slower, 99));
    let verdict = if p99 <= GOAL_P99.as_secs_f64() * 1000.0 {
        "met"
    } else {
        "MISSED"
    };
    let section = format!(
        "## Grants: revoke → 403\n\n\
         {} Grants, two apiserver replicas, knocking every millisecond after the revoke.\n\n\
         | measure | p50 | p99 | max |\n|---|---|---|---|\n\
         | slower replica's first 403 | {p50:.1} ms | {p99:.1} ms | {:.1} ms |\n\
         | each replica's first 403 | {:.1} ms | {:.1} ms | {:.1} ms |\n\n\
         Goal: p99 of the slower replica under {} ms: {verdict}.\n\n",
        slower.len(),
        percentile_ms(&slower, 100),
        percentile_ms(&each, 50),
        percentile_ms(&each, 99),
        percentile_ms(&each, 100),
        GOAL_P99.as_millis(),
    );
    print!("{section}");
    loadgen::write_report_section("grants", &section);
    assert_eq!(verdict, "met", "revoke -> 403 p99 {p99:.1} ms");
}
