//! Completion callbacks, end to end on the real binaries: the operator signs and sends
//! them (Standard Webhooks) to a local receiver, retries on the schedule given by its
//! flag with one `webhook-id`, resumes from the Session's status after being killed,
//! refuses destinations it must not reach, and one Agent's callback starts a Session of
//! another Agent through hookrun's own door. The tests that need no pod play the harness
//! by finishing the Session's status as the runner API would.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use hookrun_crds::callback::{CallbackDelivery, DeliveryState};
use hookrun_crds::session::event_types;
use hookrun_crds::{Agent, Session, SessionPhase, SessionSpec};
use hookrun_tests::control_plane::workspace_root;
use hookrun_tests::door::{ApiServer, Door, Operator, webhook_path};
use hookrun_tests::fixtures::update_session_status;
use hookrun_tests::pod_runner::PodRunner;
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually, workspace_binary};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The callback key (Standard Webhooks `whsec_<base64>`), also B's door secret in the chain.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const BUDGET: Duration = Duration::from_secs(60);
const HARNESS_IMAGE: &str = "hookrun-harness:callbacks";

/// What a receiver does with one request.
#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    /// Closes the connection without an answer.
    Drop,
    Redirect(&'static str),
}

/// One request a receiver got.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.as_str())
    }
}

/// A local HTTP receiver that answers from a script (then 200) and records every request.
struct Receiver {
    address: String,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("an address").to_string();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        tokio::spawn(async move {
            let mut script = script.into_iter();
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let Some(request) = read_request(&mut stream).await else {
                    continue;
                };
                log.lock().expect("the log").push(request);
                let answer = match script.next().unwrap_or(Reply::Status(200)) {
                    Reply::Drop => continue,
                    Reply::Status(code) => format!(
                        "HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    ),
                    Reply::Redirect(to) => format!(
                        "HTTP/1.1 302 Found\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    ),
                };
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.shutdown().await;
            }
        });
        Receiver { address, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("the log").clone()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.lines();
    let path = lines.next()?.split_whitespace().nth(1)?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Received {
        at: Instant::now(),
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Checks a request's Standard Webhooks signature with an HMAC of the test's own.
fn signature_is_valid(request: &Received) -> bool {
    let key = STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("a base64 key");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key");
    mac.update(
        format!(
            "{}.{}.{}",
            request.header("webhook-id"),
            request.header("webhook-timestamp"),
            request.body
        )
        .as_bytes(),
    );
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    request
        .header("webhook-signature")
        .split(' ')
        .any(|s| s == expected)
}

async fn create_key_secret(ns: &TestNamespace) {
    let client = cluster().await.client().await;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("callback-key".into()),
            ..Default::default()
        },
        data: Some(
            [("key".to_owned(), ByteString(SECRET.as_bytes().to_vec()))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client, ns.name())
        .create(&PostParams::default(), &secret)
        .await
        .expect("the key Secret is created");
}

fn key_ref() -> Value {
    json!({"name": "callback-key", "key": "key"})
}

/// An Agent (a program, so no model) with `callbacks`, and one Session of it.
async fn agent_with_session(ns: &TestNamespace, callbacks: Value) -> Api<Session> {
    let client = cluster().await.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    apply_agent(
        &agents,
        "notifier",
        json!({"spec": {"exec": {"command": ["cat"]}, "callbacks": callbacks}}),
    )
    .await;
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let session = Session::new(
        "notifier-run",
        SessionSpec {
            agent: "notifier".into(),
            title: "what is 6 times 7?".into(),
            ..Default::default()
        },
    );
    sessions
        .create(&PostParams::default(), &session)
        .await
        .expect("the Session is created");
    sessions
}

/// Ends the Session as the harness would, answering "42".
async fn finish(sessions: &Api<Session>) {
    update_session_status(sessions, "notifier-run", |status| {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        status.push_event(event_types::AGENT_MESSAGE, "42", now.clone());
        status.finish(SessionPhase::Complete, Some("42"), None, now);
    })
    .await;
}

/// The Session's delivery records once `done` holds for them.
async fn records_when(
    sessions: &Api<Session>,
    name: &str,
    done: impl Fn(&[CallbackDelivery]) -> bool,
) -> Vec<CallbackDelivery> {
    let found = eventually(BUDGET, || async {
        let records = sessions.get(name).await.ok()?.status?.callbacks;
        done(&records).then_some(records)
    })
    .await;
    match found {
        Some(records) => records,
        None => {
            let last = sessions
                .get(name)
                .await
                .ok()
                .and_then(|s| s.status)
                .map(|s| s.callbacks);
            panic!("the delivery records never got there: {last:#?}")
        }
    }
}

#[tokio::test]
async fn a_failing_receiver_gets_one_id_on_the_schedule_and_one_delivery() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    create_key_secret(&ns).await;
    let receiver = Receiver::start(vec![Reply::Status(503), Reply::Drop]).await;
    let operator = Operator::start(
        cluster,
        ns.name(),
        &[
            "--callback-allow-loopback",
            "--callback-retry-delays",
            "1s,2s,2s",
        ],
    )
    .await;
    let sessions = agent_with_session(
        &ns,
        json!([{"url": receiver.url("/hook?token=s3cret"), "secretRef": key_ref()}]),
    )
    .await;
    finish(&sessions).await;

    let records = records_when(&sessions, "notifier-run", |r| {
        r.first().is_some_and(|r| r.state.is_final())
    })
    .await;
    let record = &records[0];
    assert_eq!(record.state, DeliveryState::Delivered, "{record:#?}");
    assert_eq!(record.attempts, 3);
    assert_eq!(record.last_status_code, Some(200));
    assert!(record.delivered_time.is_some());
    assert_eq!(record.event, "session.completed");
    // The query string (a secret of the receiver's) is not in status.
    assert_eq!(record.url, receiver.url("/hook"));

    let got = receiver.received();
    assert_eq!(got.len(), 3, "{got:#?}");
    for request in &got {
        assert_eq!(request.header("webhook-id"), record.id);
        assert_eq!(request.path, "/hook?token=s3cret");
        assert!(signature_is_valid(request), "{request:#?}");
    }
    // Backoff: at least the configured delays (1 s, then 2 s) between attempts.
    assert!(
        got[1].at - got[0].at >= Duration::from_millis(900),
        "{got:#?}"
    );
    assert!(
        got[2].at - got[1].at >= Duration::from_millis(1900),
        "{got:#?}"
    );
    let body: Value = serde_json::from_str(&got[2].body).expect("a JSON body");
    assert_eq!(body["type"], "session.completed");
    assert_eq!(body["session"], "notifier-run");
    assert_eq!(body["namespace"], ns.name());
    assert_eq!(body["agentDefinition"], "notifier");
    assert_eq!(body["phase"], "Complete");
    assert_eq!(body["response"], "42");
    // Every attempt sent the same body.
    assert_eq!(got[0].body, got[2].body);

    // Delivered once: no attempt follows (the last delay has passed twice over).
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(receiver.received().len(), 3);
    let text = operator.log_text();
    assert!(!text.contains("s3cret"), "the query string reached the log");
}

#[tokio::test]
async fn a_killed_operator_resumes_the_schedule_from_status() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    create_key_secret(&ns).await;
    let receiver = Receiver::start(vec![Reply::Status(503)]).await;
    let flags = [
        "--callback-allow-loopback",
        "--callback-retry-delays",
        "5s,1s",
    ];
    let mut first = Operator::start(cluster, ns.name(), &flags).await;
    let sessions = agent_with_session(
        &ns,
        json!([{"url": receiver.url("/hook"), "secretRef": key_ref()}]),
    )
    .await;
    finish(&sessions).await;
    let pending = records_when(&sessions, "notifier-run", |r| {
        r.first().is_some_and(|r| r.attempts == 1)
    })
    .await;
    assert_eq!(pending[0].state, DeliveryState::Pending);
    let due = pending[0]
        .next_attempt_time
        .clone()
        .expect("a next attempt time")
        .0;
    first.process.signal("KILL");
    first
        .process
        .wait_exit(BUDGET)
        .await
        .expect("the operator died");

    let _second = Operator::start(cluster, ns.name(), &flags).await;
    let records = records_when(&sessions, "notifier-run", |r| {
        r.first().is_some_and(|r| r.state.is_final())
    })
    .await;
    assert_eq!(records[0].state, DeliveryState::Delivered, "{records:#?}");
    // The second attempt is the second of the schedule, not a new first one.
    assert_eq!(records[0].attempts, 2);
    assert_eq!(records[0].id, pending[0].id);
    let got = receiver.received();
    assert_eq!(got.len(), 2, "{got:#?}");
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    // It waited for the recorded time (seconds in status: allow for the rounding).
    let delivered = records[0].delivered_time.clone().expect("delivered").0;
    assert!(delivered >= due, "{delivered} before {due}");
    assert!(got[1].at - got[0].at >= Duration::from_secs(4), "{got:#?}");
}

#[tokio::test]
async fn forbidden_destinations_are_refused_and_recorded() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    create_key_secret(&ns).await;
    let receiver = Receiver::start(Vec::new()).await;
    let _operator = Operator::start(
        cluster,
        ns.name(),
        &[
            "--callback-deny-cidrs",
            "192.0.2.0/24",
            "--callback-retry-delays",
            "1s",
        ],
    )
    .await;
    let port = receiver
        .address
        .rsplit(':')
        .next()
        .expect("a port")
        .to_owned();
    let sessions = agent_with_session(
        &ns,
        json!([
            {"url": receiver.url("/hook"), "secretRef": key_ref()},
            {"url": format!("http://localhost:{port}/hook"), "secretRef": key_ref()},
            {"url": "http://169.254.169.254/latest/meta-data/", "secretRef": key_ref()},
            {"url": "http://192.0.2.10/hook", "secretRef": key_ref()},
        ]),
    )
    .await;
    finish(&sessions).await;
    let records = records_when(&sessions, "notifier-run", |r| {
        r.len() == 4 && r.iter().all(|r| r.state.is_final())
    })
    .await;
    let reason = |url: &str| -> String {
        let record = records
            .iter()
            .find(|r| r.url == url)
            .unwrap_or_else(|| panic!("no record for {url}: {records:#?}"));
        assert_eq!(record.state, DeliveryState::Refused, "{record:#?}");
        assert_eq!(record.attempts, 0);
        record.message.clone().unwrap_or_default()
    };
    assert!(reason(&receiver.url("/hook")).contains("loopback"));
    assert!(reason(&format!("http://localhost:{port}/hook")).contains("loopback"));
    assert!(reason("http://169.254.169.254/latest/meta-data/").contains("link-local"));
    assert!(reason("http://192.0.2.10/hook").contains("192.0.2.0/24"));
    // Refusals are not retried: the receiver never hears of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(receiver.received().is_empty());
    let again = sessions.get("notifier-run").await.expect("the Session");
    assert_eq!(again.status.expect("a status").callbacks, records);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    create_key_secret(&ns).await;
    let target = Receiver::start(Vec::new()).await;
    let redirect_to: &'static str = Box::leak(target.url("/elsewhere").into_boxed_str());
    let receiver = Receiver::start(vec![Reply::Redirect(redirect_to)]).await;
    let _operator = Operator::start(
        cluster,
        ns.name(),
        &["--callback-allow-loopback", "--callback-retry-delays", "1s"],
    )
    .await;
    let sessions = agent_with_session(
        &ns,
        json!([{"url": receiver.url("/hook"), "secretRef": key_ref()}]),
    )
    .await;
    finish(&sessions).await;
    let records = records_when(&sessions, "notifier-run", |r| {
        r.first().is_some_and(|r| r.state.is_final())
    })
    .await;
    assert_eq!(records[0].state, DeliveryState::Refused, "{records:#?}");
    assert_eq!(records[0].last_status_code, Some(302));
    assert!(
        records[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("redirect"))
    );
    assert_eq!(receiver.received().len(), 1);
    assert!(target.received().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn a_callback_url_outside_the_allowed_prefixes_is_a_400() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let door = Door::start(cluster, &ns).await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    apply_agent(
        &agents,
        "asker",
        json!({"spec": {
            "exec": {"command": ["cat"]},
            "triggers": [{"webhook": {}}],
            "callbackPolicy": {"allowedUrlPrefixes": ["https://ci.example.test/hooks/"]},
        }}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "asker").await;
    door.wait_until_known(&path).await;
    let sessions: Api<Session> = Api::namespaced(client, ns.name());

    for outside in [
        "https://evil.example.test/hooks/1",
        "https://ci.example.test/hooksx",
        "https://ci.example.test.evil.test/hooks/1",
    ] {
        let answer = door
            .post(
                &path,
                &[],
                &json!({"title": "hi", "callbackUrl": outside}).to_string(),
            )
            .await;
        assert_eq!(answer.status, 400, "{outside}: {}", answer.text);
        assert_eq!(answer.json["error"], "bad_body", "{}", answer.text);
        let message = answer.json["message"].as_str().unwrap_or_default();
        assert!(message.contains("callbackUrl"), "{message}");
        assert!(
            message.contains("https://ci.example.test/hooks/"),
            "{message}"
        );
    }
    assert!(
        sessions
            .list(&ListParams::default())
            .await
            .expect("a list")
            .items
            .is_empty(),
        "a refused request stored a Session"
    );

    let inside = "https://ci.example.test/hooks/build-7?sig=abc";
    let answer = door
        .post(
            &path,
            &[],
            &json!({"title": "hi", "callbackUrl": inside}).to_string(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let name = answer.json["session"].as_str().expect("a session name");
    let stored = sessions.get(name).await.expect("the Session");
    assert_eq!(
        stored.spec.trigger.and_then(|t| t.callback_url).as_deref(),
        Some(inside)
    );
}

#[tokio::test]
async fn one_agent_feeds_the_next_through_a_signed_callback() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    create_key_secret(&ns).await;
    let kubeconfig = cluster.kubeconfig_path();
    let apiserver = ApiServer::start(&kubeconfig, ns.name(), &format!("chain-{}", ns.name())).await;
    let runner_url = format!("http://{}", apiserver.runner);
    let _operator = Operator::start_with(
        &kubeconfig,
        ns.name(),
        &format!("chain-{}", ns.name()),
        &[
            "--runner-url",
            &runner_url,
            "--default-harness-image",
            HARNESS_IMAGE,
            "--callback-allow-loopback",
            "--callback-retry-delays",
            "1s,1s,1s",
        ],
    )
    .await;
    let work_dir: PathBuf = workspace_root()
        .join("target/test-clusters")
        .join(format!("callbacks-{}", ns.name()));
    std::fs::create_dir_all(&work_dir).expect("the pod runner's directory");
    let pod_runner = PodRunner::new(
        client.clone(),
        HARNESS_IMAGE,
        workspace_binary("hookrun-harness"),
        work_dir,
    )
    .in_namespace(ns.name());
    let pod_runner_task = tokio::spawn(pod_runner.clone().run());

    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    // B: accepts only Standard Webhooks signed with A's callback key.
    apply_agent(
        &agents,
        "b",
        json!({"spec": {
            "exec": {"command": ["cat"]},
            "triggers": [{"webhook": {"standardWebhooksSecret": SECRET}}],
            "session": {"timeoutSeconds": 60},
        }}),
    )
    .await;
    let b_path = webhook_path(&agents, ns.name(), "b").await;
    assert!(
        eventually(BUDGET, || async {
            hookrun_tests::door::is_known(&apiserver.public, &b_path)
                .await
                .then_some(())
        })
        .await
        .is_some()
    );
    // A: the echo agent, whose completion is posted to B's webhook URL.
    apply_agent(
        &agents,
        "a",
        json!({"spec": {
            "exec": {"command": ["cat"]},
            "triggers": [{"webhook": {}}],
            "session": {"timeoutSeconds": 60},
            "callbacks": [{
                "url": format!("http://{}{b_path}", apiserver.public),
                "secretRef": key_ref(),
                "events": ["session.completed"],
            }],
        }}),
    )
    .await;
    let a_path = webhook_path(&agents, ns.name(), "a").await;
    assert!(
        eventually(BUDGET, || async {
            hookrun_tests::door::is_known(&apiserver.public, &a_path)
                .await
                .then_some(())
        })
        .await
        .is_some()
    );
    let answer = hookrun_tests::door::request(
        &apiserver.public,
        "POST",
        &a_path,
        &[],
        r#"{"title": "the chained question"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let a_session = answer.json["session"]
        .as_str()
        .expect("a session")
        .to_owned();

    let sessions: Api<Session> = Api::namespaced(client.clone(), ns.name());
    let records = records_when(&sessions, &a_session, |r| {
        r.first().is_some_and(|r| r.state.is_final())
    })
    .await;
    assert_eq!(records[0].state, DeliveryState::Delivered, "{records:#?}");
    assert_eq!(records[0].last_status_code, Some(200));

    let b_session = eventually(BUDGET, || async {
        let list = sessions.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|s| s.spec.agent == "b")
    })
    .await
    .expect("B got a Session from A's callback");
    let trigger = b_session.spec.trigger.expect("a trigger");
    assert_eq!(trigger.source, "standard-webhooks");
    assert_eq!(trigger.delivery_id.as_deref(), Some(records[0].id.as_str()));
    let payload: Value =
        serde_json::from_str(trigger.payload.as_deref().expect("a payload")).expect("JSON");
    assert_eq!(payload["type"], "session.completed");
    assert_eq!(payload["session"], a_session);
    assert_eq!(payload["agentDefinition"], "a");
    let a_answer = sessions
        .get(&a_session)
        .await
        .expect("A's Session")
        .status
        .and_then(|s| s.response)
        .expect("A answered");
    assert!(a_answer.contains("the chained question"), "{a_answer}");
    assert_eq!(payload["response"], a_answer);
    // B runs with it and finishes too.
    let b_name = b_session.metadata.name.expect("a name");
    let b_done = eventually(BUDGET, || async {
        let status = sessions.get(&b_name).await.ok()?.status?;
        status.is_finished().then_some(status.phase())
    })
    .await;
    assert_eq!(b_done, Some(SessionPhase::Complete));
    pod_runner.stop_all();
    pod_runner_task.abort();
}

#[tokio::test]
async fn the_example_pair_of_agents_applies() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let manifest = std::fs::read_to_string(workspace_root().join("examples/callback-chain.yaml"))
        .expect("examples/callback-chain.yaml is readable");
    ns.apply(&manifest);
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    let draft = agents.get("chain-draft").await.expect("chain-draft exists");
    assert_eq!(draft.spec.callbacks.len(), 1);
    assert_eq!(draft.spec.callbacks[0].event_names(), ["session.completed"]);
    let policy = draft.spec.callback_policy.expect("a callback policy");
    assert!(policy.allows("https://ci.example.com/hookrun/build-1"));
    // The schema refuses a URL that is not http(s) and an unknown event.
    for (callback, field) in [
        (
            "{url: 'ftp://x/', secretRef: {name: a, key: b}}",
            "spec.callbacks[0].url",
        ),
        (
            "{url: 'https://x/', secretRef: {name: a, key: b}, events: [session.exploded]}",
            "spec.callbacks[0].events[0]",
        ),
    ] {
        let manifest = format!(
            "apiVersion: hookrun.dev/v1alpha1\nkind: Agent\nmetadata: {{name: bad}}\nspec:\n  \
             callbacks: [{callback}]\n"
        );
        let refused = ns.kubectl(&["apply", "-f", "-"], Some(&manifest));
        assert!(!refused.status.success(), "{callback}");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(field), "{stderr}");
    }
}
