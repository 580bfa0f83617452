//! Cluster tests of Grants: the real `hookrun-operator` mints a Grant's token into a
//! Secret and its URL into status, and the real `hookrun-apiserver` answers
//! `POST /hook/<token>` from its watches. No kubelet runs: the tests play it by writing
//! the session pod's status, and the operator's Session controller follows it into the
//! Session's phase.

use std::time::{Duration, Instant};

use hookrun_crds::{
    Agent, Grant, Session, SessionSpec,
    grant::{GrantSpec, GrantVerb},
    names,
    session::{SessionPhase, event_types},
};
use hookrun_tests::door::{ApiServer, BUDGET, Operator, PUBLIC_URL, request, webhook_path};
use hookrun_tests::fixtures::apply_webhook_agent;
use hookrun_tests::{Cluster, TestNamespace, cluster, eventually};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// A namespace with the operator and the apiserver watching it, and one Agent.
struct Setup {
    ns: TestNamespace,
    agents: Api<Agent>,
    sessions: Api<Session>,
    grants: Api<Grant>,
    secrets: Api<Secret>,
    pods: Api<Pod>,
    _operator: Operator,
    apiserver: ApiServer,
}

impl Setup {
    async fn new(cluster: &Cluster, apiserver_flags: &[&str]) -> Self {
        let ns = TestNamespace::new(cluster).await;
        let client = cluster.client().await;
        let operator = Operator::start(
            cluster,
            ns.name(),
            &[
                "--runner-url",
                "http://runner.hookrun.test:8080",
                "--pending-timeout",
                "1h",
                "--grant-max-ttl",
                "1h",
            ],
        )
        .await;
        let apiserver = ApiServer::start_with_args(
            &cluster.kubeconfig_path(),
            ns.name(),
            &format!("{}-grants", ns.name()),
            apiserver_flags,
        )
        .await;
        let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
        apply_webhook_agent(&agents, "helper", json!({})).await;
        Setup {
            agents,
            sessions: Api::namespaced(client.clone(), ns.name()),
            grants: Api::namespaced(client.clone(), ns.name()),
            secrets: Api::namespaced(client.clone(), ns.name()),
            pods: Api::namespaced(client, ns.name()),
            ns,
            _operator: operator,
            apiserver,
        }
    }

    /// Creates a Session of the Agent, as the webhook door would.
    async fn session(&self, name: &str) {
        let session = Session::new(
            name,
            SessionSpec {
                agent: "helper".to_owned(),
                title: "triage the build".to_owned(),
                env: vec![],
                trigger: None,
                session_key: None,
                history: Vec::new(),
            },
        );
        self.sessions
            .create(&PostParams::default(), &session)
            .await
            .expect("the Session is created");
    }

    /// Plays the kubelet: the session pod reaches `phase`; waits for the Session to
    /// follow into `session_phase`.
    async fn pod_phase(&self, session: &str, phase: &str, session_phase: SessionPhase) {
        eventually(BUDGET, || async {
            self.pods.get_opt(session).await.ok().flatten()
        })
        .await
        .unwrap_or_else(|| panic!("no pod for {session}"));
        self.pods
            .patch_status(
                session,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            )
            .await
            .expect("the pod status is written");
        eventually(BUDGET, || async {
            let s = self.sessions.get(session).await.ok()?;
            (s.status?.phase == Some(session_phase)).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{session} did not reach {session_phase:?}"));
    }

    /// Creates a Grant and waits for the URL in its status; returns its token.
    async fn mint(&self, name: &str, session: &str, ttl_seconds: Option<i64>) -> String {
        let grant = Grant::new(
            name,
            GrantSpec {
                session: session.to_owned(),
                verbs: vec![GrantVerb::SendInput],
                ttl_seconds,
                label: Some("ci: release pipeline".to_owned()),
                revoked: false,
            },
        );
        self.grants
            .create(&PostParams::default(), &grant)
            .await
            .expect("the Grant is created");
        let url = eventually(BUDGET, || async {
            self.grants.get(name).await.ok()?.status?.url
        })
        .await
        .unwrap_or_else(|| panic!("grant {name} got no URL"));
        let prefix = format!("{}/hook/", PUBLIC_URL.trim_end_matches('/'));
        url.strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{url} is not under {prefix}"))
            .to_owned()
    }

    async fn post(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> hookrun_tests::door::Answer {
        request(&self.apiserver.public, "POST", path, headers, body).await
    }

    async fn knock(&self, token: &str, body: Value) -> hookrun_tests::door::Answer {
        self.post(&format!("/hook/{token}"), &[], &body.to_string())
            .await
    }

    /// Knocks until the apiserver's watch has the token (the first answer that is not
    /// 403, nor 503 while its index loads), within the budget.
    async fn knock_when_known(&self, token: &str, body: Value) -> hookrun_tests::door::Answer {
        eventually(BUDGET, || async {
            let answer = self.knock(token, body.clone()).await;
            (answer.status != 403 && answer.status != 503).then_some(answer)
        })
        .await
        .expect("the apiserver learns the token")
    }

    async fn user_messages(&self, session: &str) -> Vec<String> {
        let session = self.sessions.get(session).await.expect("the Session");
        session
            .status
            .unwrap_or_default()
            .events
            .into_iter()
            .filter(|e| e.type_ == event_types::USER_MESSAGE)
            .map(|e| e.content)
            .collect()
    }

    async fn revoke(&self, name: &str) {
        self.grants
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"revoked": true}})),
            )
            .await
            .expect("the Grant is revoked");
    }
}

/// Percentile `p` (0..=100) of sorted `values`.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let index = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len()) - 1;
    sorted[index]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_puts_input_into_its_one_session_and_does_nothing_else() {
    let setup = Setup::new(cluster().await, &["--review-limit-burst", "1000"]).await;
    setup.session("triage-1").await;
    let token = setup.mint("ci", "triage-1", Some(600)).await;

    // The Secret is the Grant's, labelled for the apiserver's watch.
    let secret = setup
        .secrets
        .get(&names::grant_secret_name("ci"))
        .await
        .expect("the token Secret");
    assert_eq!(
        secret.labels().get(names::GRANT_LABEL).map(String::as_str),
        Some("ci")
    );
    let grant = setup.grants.get("ci").await.expect("the Grant");
    assert_eq!(
        secret.owner_references()[0].uid,
        grant.uid().expect("a uid"),
        "owned by the Grant"
    );
    assert!(grant.status.and_then(|s| s.expires_at).is_some());

    // Pending: buffered.
    let answer = setup
        .knock_when_known(&token, json!({"message": "the build is red", "from": "ci"}))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    assert_eq!(answer.json["buffered"], true);
    assert_eq!(answer.json["session"], "triage-1");
    assert_eq!(
        setup.user_messages("triage-1").await,
        ["[ci] the build is red"]
    );

    // The same idempotency key is one input, answered as the first time.
    let keyed = json!({"message": "retry me", "idempotency_key": "run-7"});
    let first = setup.knock(&token, keyed.clone()).await;
    assert_eq!(first.status, 202, "{}", first.text);
    setup
        .pod_phase("triage-1", "Running", SessionPhase::Running)
        .await;
    let again = setup.knock(&token, keyed.clone()).await;
    assert_eq!(again.status, 202, "{}", again.text);
    assert_eq!(again.json["eventId"], first.json["eventId"]);
    assert_eq!(again.json["replayed"], true);
    assert_eq!(
        setup.user_messages("triage-1").await,
        ["[ci] the build is red", "retry me"]
    );

    // Running: delivered, by path or by bearer token.
    let answer = setup.knock(&token, json!({"message": "now green"})).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json["delivered"], true);
    let bearer = format!("Bearer {token}");
    let answer = setup
        .post(
            "/hook",
            &[("Authorization", &bearer)],
            r#"{"message": "via bearer"}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Bad and oversized bodies, with the field named.
    let answer = setup.knock(&token, json!({"from": "ci"})).await;
    assert_eq!(answer.status, 400, "{}", answer.text);
    assert!(
        answer.json["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("message:"),
        "{}",
        answer.text
    );
    let answer = setup
        .knock(&token, json!({"message": "x".repeat(40_000)}))
        .await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert!(
        answer.json["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("message:"),
        "{}",
        answer.text
    );
    let answer = setup
        .post(&format!("/hook/{token}"), &[], &"x".repeat(70_000))
        .await;
    assert_eq!(answer.status, 413, "{}", answer.text);
    assert_eq!(
        setup.user_messages("triage-1").await.len(),
        4,
        "refused bodies stored nothing"
    );

    // The Grant token opens no webhook door, and a webhook token is no Grant.
    let webhook = webhook_path(&setup.agents, setup.ns.name(), "helper").await;
    let agent_door = format!("/webhooks/{}/helper/{token}", setup.ns.name());
    let answer = setup.post(&agent_door, &[], r#"{"title": "sneaky"}"#).await;
    assert_eq!(answer.status, 401, "{}", answer.text);
    let webhook_token = webhook.rsplit('/').next().expect("a token").to_owned();
    let answer = setup
        .knock(&webhook_token, json!({"message": "sneaky"}))
        .await;
    assert_eq!(answer.status, 403, "{}", answer.text);
    // The webhook token still works where it belongs: the refusal was the route's.
    let answer = setup.post(&webhook, &[], r#"{"title": "legit"}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.text);

    // Finished: 410; deleted: 404.
    setup
        .pod_phase("triage-1", "Succeeded", SessionPhase::Complete)
        .await;
    let answer = setup.knock(&token, json!({"message": "too late"})).await;
    assert_eq!(answer.status, 410, "{}", answer.text);
    assert_eq!(answer.json["error"], "session_ended");
    setup
        .sessions
        .delete("triage-1", &DeleteParams::default())
        .await
        .expect("the Session is deleted");
    eventually(BUDGET, || async {
        setup
            .sessions
            .get_opt("triage-1")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .expect("the Session goes");
    let answer = setup.knock(&token, json!({"message": "anyone?"})).await;
    assert_eq!(answer.status, 404, "{}", answer.text);
    assert_eq!(answer.json["error"], "session_gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_expired_and_unknown_tokens_get_one_answer_within_the_watch_latency() {
    let setup = Setup::new(cluster().await, &["--review-limit-burst", "1000"]).await;
    setup.session("triage-2").await;

    // Revoke → 403, measured over several Grants.
    let mut latencies = Vec::new();
    let mut refusal_bodies = Vec::new();
    for i in 0..5 {
        let name = format!("ci-{i}");
        let token = setup.mint(&name, "triage-2", Some(600)).await;
        let answer = setup
            .knock_when_known(&token, json!({"message": format!("hello {i}")}))
            .await;
        assert_eq!(answer.status, 202, "{}", answer.text);
        let revoked_at = Instant::now();
        setup.revoke(&name).await;
        let mut knocks = 0;
        let refused = loop {
            let answer = setup
                .knock(&token, json!({"message": "after revoke"}))
                .await;
            knocks += 1;
            if answer.status == 403 {
                break answer;
            }
            assert!(answer.status == 202, "{}", answer.text);
            assert!(
                revoked_at.elapsed() < BUDGET,
                "the revoke never took effect"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        latencies.push(revoked_at.elapsed());
        refusal_bodies.push(refused.text.clone());
        assert!(knocks >= 1);
        // The Grant stays listed, its token Secret goes and its URL is cleared.
        eventually(BUDGET, || async {
            let gone = setup
                .secrets
                .get_opt(&names::grant_secret_name(&name))
                .await
                .ok()?
                .is_none();
            let grant = setup.grants.get(&name).await.ok()?;
            let status = grant.status?;
            let revoked = status.conditions.iter().any(|c| c.reason == "Revoked");
            (gone && revoked && status.url.is_none()).then_some(())
        })
        .await
        .expect("the revoked Grant is listed without Secret or URL");
    }
    latencies.sort();
    let (p50, p99) = (percentile(&latencies, 50), percentile(&latencies, 99));
    println!(
        "revoke -> 403 over {} Grants: p50 {:.1} ms, p99 {:.1} ms",
        latencies.len(),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0
    );
    assert!(p99 < Duration::from_secs(5), "revoke took {p99:?}");

    // Unknown tokens get the very same answer as revoked ones.
    let unknown = setup
        .knock(&"A".repeat(43), json!({"message": "guess"}))
        .await;
    assert_eq!(unknown.status, 403);
    assert_eq!(unknown.text, refusal_bodies[0]);
    assert_eq!(unknown.json["error"], "grant_refused");
    let junk = setup
        .knock("not-a-token", json!({"message": "guess"}))
        .await;
    assert_eq!(junk.text, refusal_bodies[0]);

    // Expiry: refused at once, then the operator deletes the Grant.
    let token = setup.mint("short", "triage-2", Some(5)).await;
    let answer = setup
        .knock_when_known(&token, json!({"message": "quick"}))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    let grant = setup.grants.get("short").await.expect("the Grant");
    let expires = grant
        .status
        .and_then(|s| s.expires_at)
        .expect("an expiry")
        .0;
    let created = grant.metadata.creation_timestamp.expect("created").0;
    assert_eq!(expires.duration_since(created).as_secs(), 5);
    let refused = eventually(Duration::from_secs(15), || async {
        let answer = setup.knock(&token, json!({"message": "late"})).await;
        (answer.status == 403).then_some(answer)
    })
    .await
    .expect("the expired token is refused");
    assert_eq!(refused.text, refusal_bodies[0]);
    eventually(BUDGET, || async {
        setup
            .grants
            .get_opt("short")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .expect("the operator deletes the expired Grant");

    // A TTL over the operator's maximum (1h here) is cut to it.
    setup.mint("long", "triage-2", Some(1_000_000)).await;
    let grant = setup.grants.get("long").await.expect("the Grant");
    let expires = grant
        .status
        .and_then(|s| s.expires_at)
        .expect("an expiry")
        .0;
    let created = grant.metadata.creation_timestamp.expect("created").0;
    assert_eq!(expires.duration_since(created).as_secs(), 3600);

    // Deleting a Grant revokes it too.
    let token = setup.mint("deleted", "triage-2", None).await;
    let answer = setup
        .knock_when_known(&token, json!({"message": "before delete"}))
        .await;
    assert_eq!(answer.status, 202, "{}", answer.text);
    setup
        .grants
        .delete("deleted", &DeleteParams::default())
        .await
        .expect("the Grant is deleted");
    let refused = eventually(BUDGET, || async {
        let answer = setup
            .knock(&token, json!({"message": "after delete"}))
            .await;
        (answer.status == 403).then_some(answer)
    })
    .await
    .expect("the deleted Grant's token is refused");
    assert_eq!(refused.text, refusal_bodies[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_tokens_are_throttled_per_address_and_cost_no_api_call() {
    let setup = Setup::new(
        cluster().await,
        &[
            "--review-limit-burst",
            "3",
            "--review-limit-per-second",
            "0.01",
        ],
    )
    .await;
    let admin = &setup.apiserver.admin;
    eventually(BUDGET, || async {
        (hookrun_tests::door::get(admin, "/readyz").await.status == 200).then_some(())
    })
    .await
    .expect("the apiserver is ready");
    // Wait for the grant index too: the first refusal is a 403, not a 503.
    eventually(BUDGET, || async {
        let answer =
            hookrun_tests::door::request(&setup.apiserver.public, "POST", "/hook", &[], "{}").await;
        (answer.status != 503).then_some(())
    })
    .await
    .expect("the grant index loads");
    // The calls a hook would make: reads and writes of Sessions.
    let calls = |text: &str| -> f64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("hookrun_apiserver_kube_requests_total{"))
            .filter(|rest| rest.contains("resource=\"sessions"))
            .filter_map(|rest| rest.split_once("} ")?.1.trim().parse::<f64>().ok())
            .sum()
    };
    let before = calls(&hookrun_tests::door::metrics(admin).await);
    // One of the burst of 3 went to the tokenless knock that waited for the index.
    for _ in 0..2 {
        let answer = setup
            .knock(&"B".repeat(43), json!({"message": "guess"}))
            .await;
        assert_eq!(answer.status, 403, "{}", answer.text);
    }
    let answer = setup
        .knock(&"B".repeat(43), json!({"message": "guess"}))
        .await;
    assert_eq!(answer.status, 429, "{}", answer.text);
    assert!(answer.header("retry-after").is_some());
    let after = calls(&hookrun_tests::door::metrics(admin).await);
    assert_eq!(before, after, "refusals made no Kubernetes API call");
}
