//! Trust boundaries of the read API and the runner API on the real `hookrun-apiserver`:
//! names that are not Kubernetes names are refused before anything reaches the cluster;
//! a flood of random bearer tokens spends a bounded number of TokenReviews while
//! webhooks and allowed readers keep working; the runner API is only on its own port.

use std::time::Instant;

use futures::future::join_all;
use hookrun_crds::Agent;
use hookrun_tests::door::{self, ApiServer, BUDGET, Door, request};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually};
use kube::Api;
use serde_json::json;

/// The per-address review burst of the apiserver's defaults (`--review-limit-burst`).
const REVIEW_BURST: f64 = 20.0;
/// Its refill rate (`--review-limit-per-second`).
const REVIEWS_PER_SECOND: f64 = 1.0;

/// The reviews of `kind` the apiserver sent so far (0 before the first).
fn reviews(metrics: &str, kind: &str) -> f64 {
    door::metric(
        metrics,
        &format!("hookrun_apiserver_auth_reviews_total{{kind=\"{kind}\"}}"),
    )
}

async fn review_counts(admin: &str) -> (f64, f64) {
    let text = door::metrics(admin).await;
    (
        reviews(&text, "token_review"),
        reviews(&text, "subject_access_review"),
    )
}

#[tokio::test]
async fn names_that_are_not_kubernetes_names_are_400_and_cost_no_review() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), "bad-names").await;
    let name = ns.name();
    let long = "a".repeat(60 * 1024);
    let cases = [
        // A sub-resource and a query smuggled into the Kubernetes URL through the name.
        format!("/agents/s%2Fstatus?namespace={name}"),
        format!("/agents/s%3Fwatch=true?namespace={name}"),
        format!("/agents/s%3FfieldSelector=x/events?namespace={name}"),
        format!("/agents/..?namespace={name}"),
        format!("/agents/UPPER/stream?namespace={name}"),
        format!("/agents/{}?namespace={name}", "a".repeat(254)),
        // Namespaces that are not DNS labels.
        "/agents/s?namespace=Team".to_owned(),
        format!("/agents/s?namespace={name}%2Fsessions"),
        format!("/agents/s/events?namespace={name}%3Fwatch%3D1"),
        format!("/agents/s?namespace={}", "n".repeat(64)),
    ];
    for path in &cases {
        let answer = request(
            &apiserver.public,
            "GET",
            path,
            &[("Authorization", "Bearer some-token")],
            "",
        )
        .await;
        assert_eq!(answer.status, 400, "{path}: {:?}", answer.json);
        let message = answer.json["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("namespace") || message.contains("session"),
            "{path}: {message}"
        );
        assert!(message.contains("DNS-1123"), "{path}: {message}");
    }
    // A 60 KiB namespace (the URI parser stops at 64 KiB): refused, never cached (a
    // request-size limit may answer first).
    let huge = request(
        &apiserver.public,
        "GET",
        &format!("/agents/s?namespace={long}"),
        &[("Authorization", "Bearer some-token")],
        "",
    )
    .await;
    assert!(
        [400, 414, 431].contains(&huge.status),
        "{}: {:?}",
        huge.status,
        huge.json
    );
    let (token_reviews, access_reviews) = review_counts(&apiserver.admin).await;
    assert_eq!(
        (token_reviews, access_reviews),
        (0.0, 0.0),
        "a bad name reached the cluster"
    );
    // A well-formed read does reach it (once connected: 503 before): the counter is live.
    let valid = eventually(BUDGET, || async {
        let answer = request(
            &apiserver.public,
            "GET",
            &format!("/agents/s?namespace={name}"),
            &[("Authorization", "Bearer some-token")],
            "",
        )
        .await;
        (answer.status != 503).then_some(answer.status)
    })
    .await;
    assert_eq!(valid, Some(401));
    let (token_reviews, _) = review_counts(&apiserver.admin).await;
    assert_eq!(token_reviews, 1.0);
}

/// `(status, seconds)` of `count` webhooks sent one after another.
async fn webhooks(door: &Door, path: &str, count: usize) -> Vec<(u16, f64)> {
    let mut answers = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        let answer = door
            .post(
                path,
                &[],
                &json!({"title": format!("webhook {i}")}).to_string(),
            )
            .await;
        answers.push((answer.status, started.elapsed().as_secs_f64()));
    }
    answers
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or_default()
}

#[tokio::test]
async fn a_flood_of_random_tokens_is_throttled_while_webhooks_and_readers_keep_working() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    // The test connects from 127.0.0.1 and plays a proxy: X-Forwarded-For names the client.
    let door = Door::start_with_args(
        cluster,
        &ns,
        &cluster.kubeconfig_path(),
        &["--trusted-proxies", "127.0.0.1/32"],
    )
    .await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "door",
        json!({"spec": {"triggers": [{"webhook": {}}], "session": {"maxConcurrent": 500}}}),
    )
    .await;
    let path = door::webhook_path(&agents, ns.name(), "door").await;
    door.wait_until_known(&path).await;

    // An allowed reader, from an address of its own.
    let reader = format!("Bearer {}", ns.session_reader_token());
    let first = door.post(&path, &[], r#"{"title": "read me"}"#).await;
    assert_eq!(first.status, 200, "{:?}", first.json);
    let session = first.json["session"]
        .as_str()
        .expect("a session")
        .to_owned();
    let read_path = format!("/agents/{session}?namespace={}", ns.name());
    let read = |from: &'static str| {
        let (door, read_path, reader) = (&door, read_path.clone(), reader.clone());
        async move {
            let headers = [
                ("Authorization", reader.as_str()),
                ("X-Forwarded-For", from),
            ];
            request(&door.public, "GET", &read_path, &headers, "").await
        }
    };
    let readable = eventually(BUDGET, || async {
        (read("198.51.100.7").await.status == 200).then_some(())
    })
    .await;
    assert!(readable.is_some(), "the reader never read its Session");

    // Baseline latency of webhooks, with nothing else going on.
    let baseline = webhooks(&door, &path, 15).await;
    assert!(baseline.iter().all(|(s, _)| *s == 200), "{baseline:?}");
    let baseline_median = median(baseline.iter().map(|(_, t)| *t).collect());
    let (reviews_before, _) = review_counts(&door.admin).await;

    // A few thousand distinct junk tokens from one address, 8 connections at a time,
    // while webhooks and the allowed reader go on.
    const FLOOD: usize = 2000;
    const WORKERS: usize = 8;
    let flood_started = Instant::now();
    let flood = join_all((0..WORKERS).map(|worker| {
        let (public, read_path) = (door.public.clone(), read_path.clone());
        async move {
            let mut statuses = Vec::new();
            for i in 0..FLOOD / WORKERS {
                let junk = format!("Bearer junk-{worker}-{i}-{}", rand_suffix(worker, i));
                let headers = [
                    ("Authorization", junk.as_str()),
                    ("X-Forwarded-For", "203.0.113.9"),
                ];
                let answer = request(&public, "GET", &read_path, &headers, "").await;
                if answer.status == 429 {
                    assert!(
                        answer.header("retry-after").is_some(),
                        "429 without Retry-After"
                    );
                }
                statuses.push(answer.status);
            }
            statuses
        }
    }));
    let during = async {
        let hooks = webhooks(&door, &path, 15).await;
        let mut reads = Vec::new();
        for _ in 0..5 {
            reads.push(read("198.51.100.7").await.status);
        }
        (hooks, reads)
    };
    let (flood, (during, reads)) = tokio::join!(flood, during);
    let flood_time = flood_started.elapsed().as_secs_f64();
    let statuses: Vec<u16> = flood.into_iter().flatten().collect();
    let (reviews_after, _) = review_counts(&door.admin).await;

    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(
        unauthorized + throttled,
        FLOOD,
        "only 401 and 429: {:?}",
        statuses
            .iter()
            .filter(|s| **s != 401 && **s != 429)
            .take(5)
            .collect::<Vec<_>>()
    );
    // Each 401 cost one TokenReview; the reader's cache may have expired once (2 more).
    let spent = reviews_after - reviews_before;
    let bound = REVIEW_BURST + (flood_time * REVIEWS_PER_SECOND).ceil() + 2.0;
    println!(
        "flood: {FLOOD} junk tokens in {flood_time:.1}s: {unauthorized} × 401, {throttled} × \
         429, {spent} TokenReviews (bound {bound})"
    );
    assert!(
        spent <= bound,
        "{spent} TokenReviews for the flood, bound {bound}"
    );
    assert!(throttled >= FLOOD / 2, "{throttled} throttled");

    // Webhooks and the allowed reader were not affected.
    assert!(during.iter().all(|(s, _)| *s == 200), "{during:?}");
    assert!(reads.iter().all(|s| *s == 200), "{reads:?}");
    let during_median = median(during.iter().map(|(_, t)| *t).collect());
    let during_max = during.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    println!(
        "webhook latency: baseline median {:.1} ms, during the flood median {:.1} ms, max \
         {:.1} ms",
        baseline_median * 1000.0,
        during_median * 1000.0,
        during_max * 1000.0
    );
    assert!(
        during_median <= baseline_median * 10.0 + 0.25,
        "median {during_median}s against {baseline_median}s"
    );
    assert!(during_max < 3.0, "a webhook took {during_max}s");
}

/// A per-request suffix, so that no two junk tokens are alike across runs either.
fn rand_suffix(worker: usize, i: usize) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}{worker}{i}")
}

#[tokio::test]
async fn the_runner_api_answers_only_on_the_runner_port() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), "ports").await;
    let auth = [("Authorization", "Bearer not-a-pod-token")];
    for (method, path) in [
        ("GET", "/runner/v1/session"),
        ("POST", "/runner/v1/events"),
        ("POST", "/runner/v1/complete"),
    ] {
        let public = request(&apiserver.public, method, path, &auth, "{}").await;
        assert_eq!(public.status, 404, "{method} {path} on the public port");
        // On the runner port the route exists: no token is 401.
        let runner = request(&apiserver.runner, method, path, &[], "{}").await;
        assert_eq!(runner.status, 401, "{method} {path} on the runner port");
    }
    // And the public routes are not on the runner port.
    let read = format!("/agents/s?namespace={}", ns.name());
    let webhook = format!("/webhooks/{}/a/token", ns.name());
    for path in [read.as_str(), webhook.as_str()] {
        let answer = request(&apiserver.runner, "GET", path, &auth, "").await;
        assert_eq!(answer.status, 404, "{path} on the runner port");
    }
    let (token_reviews, _) = review_counts(&apiserver.admin).await;
    assert_eq!(token_reviews, 0.0, "a 404 reached the cluster");
}
