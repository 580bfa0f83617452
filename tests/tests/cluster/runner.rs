//! Cluster tests of the runner API and the read API on the real
//! `hookrun-apiserver`. The tests play the operator (they create the Session, its Pod,
//! and write `status.podName`/`podUid`) and the harness (they mint pod-bound tokens with
//! `kubectl create token --bound-object-kind Pod` and call the runner API with them).

use std::time::Duration;

use futures::future::join_all;
use hookrun_crds::{Agent, Session, SessionSpec, session::SessionTrigger};
use hookrun_tests::door::{Answer, ApiServer, BUDGET, request};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One namespace, the real apiserver on it, and an admin client.
struct Setup {
    ns: TestNamespace,
    client: Client,
    apiserver: ApiServer,
}

impl Setup {
    async fn new() -> Self {
        let cluster = cluster().await;
        let ns = TestNamespace::new(cluster).await;
        let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), ns.name()).await;
        let setup = Setup {
            ns,
            client: cluster.client().await,
            apiserver,
        };
        // Until it has a client, every runner call is 503.
        let connected = eventually(BUDGET, || async {
            (setup.get("/runner/v1/session", None).await.status != 503).then_some(())
        })
        .await;
        assert!(
            connected.is_some(),
            "the apiserver never reached the cluster"
        );
        setup
    }

    fn sessions(&self) -> Api<Session> {
        Api::namespaced(self.client.clone(), self.ns.name())
    }

    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> Answer {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        // The runner API has its own listener; the read API is on the public one.
        let address = if path.starts_with("/runner/") {
            &self.apiserver.runner
        } else {
            &self.apiserver.public
        };
        request(address, method, path, &headers, body).await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Answer {
        self.call("GET", path, token, "").await
    }

    async fn event(&self, token: &str, type_: &str, content: &str) -> Answer {
        let body = json!({"type": type_, "content": content}).to_string();
        self.call("POST", "/runner/v1/events", Some(token), &body)
            .await
    }

    async fn complete(&self, token: &str, body: Value) -> Answer {
        self.call(
            "POST",
            "/runner/v1/complete",
            Some(token),
            &body.to_string(),
        )
        .await
    }

    /// Plays the operator: a Session of Agent `agent`, its Pod (Pending forever: no
    /// kubelet), and the status naming the pod. Returns the pod's uid.
    async fn session_with_pod(&self, name: &str, agent: &str) -> String {
        let session = Session {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: SessionSpec {
                agent: agent.to_owned(),
                title: format!("title of {name}"),
                env: vec![hookrun_crds::session::SessionEnvVar {
                    name: "FROM_SESSION".into(),
                    value: "yes".into(),
                }],
                trigger: Some(SessionTrigger {
                    source: "webhook".into(),
                    payload: Some("{\"hello\":1}".into()),
                    ..SessionTrigger::default()
                }),
                session_key: None,
                history: Vec::new(),
            },
            status: None,
        };
        self.sessions()
            .create(&PostParams::default(), &session)
            .await
            .expect("the Session is created");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "agent", "image": "example.invalid/harness:1"}]
            }
        }))
        .expect("a pod");
        let pod = Api::<Pod>::namespaced(self.client.clone(), self.ns.name())
            .create(&PostParams::default(), &pod)
            .await
            .expect("the Pod is created");
        let uid = pod.metadata.uid.expect("a uid");
        let status = json!({"status": {"podName": name, "podUid": uid, "phase": "Running"}});
        self.sessions()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("the status is written");
        uid
    }

    /// `kubectl create token <account> <extra args>` in the namespace.
    fn token(&self, account: &str, extra: &[&str]) -> String {
        self.ns.token(account, extra)
    }

    /// A `hookrun`-audience token bound to pod `name` (the projected token of the pod).
    fn pod_token(&self, name: &str, uid: &str) -> String {
        self.ns.pod_token(name, uid)
    }

    async fn stored(&self, name: &str) -> Session {
        self.sessions().get(name).await.expect("the Session")
    }

    fn read_path(&self, name: &str, rest: &str) -> String {
        format!("/agents/{name}{rest}?namespace={}", self.ns.name())
    }
}

fn agent_messages(session: &Session) -> Vec<String> {
    session
        .status
        .iter()
        .flat_map(|s| &s.events)
        .filter(|e| e.type_ == "agent.message")
        .map(|e| e.content.clone())
        .collect()
}

#[tokio::test]
async fn a_session_pod_reads_its_context_posts_events_and_completes() {
    let setup = Setup::new().await;
    let agents: Api<Agent> = Api::namespaced(setup.client.clone(), setup.ns.name());
    apply_agent(
        &agents,
        "helper",
        json!({"spec": {
            "models": ["anthropic/claude-sonnet-4-6"],
            "system": "Be brief.",
            "session": {"env": [{"name": "FROM_AGENT", "value": "1"}, {"name": "FROM_SESSION", "value": "no"}]}
        }}),
    )
    .await;
    let uid = setup.session_with_pod("helper-wh-1", "helper").await;
    let token = setup.pod_token("helper-wh-1", &uid);

    let context = setup.get("/runner/v1/session", Some(&token)).await;
    assert_eq!(context.status, 200, "{context:?}");
    let c = &context.json;
    assert_eq!(c["session"], "helper-wh-1");
    assert_eq!(c["namespace"], setup.ns.name());
    assert_eq!(c["agent"], "helper");
    assert_eq!(c["title"], "title of helper-wh-1");
    assert_eq!(c["system"], "Be brief.");
    assert_eq!(c["models"], json!(["anthropic/claude-sonnet-4-6"]));
    assert_eq!(c["exec"], Value::Null);
    assert_eq!(
        c["env"],
        json!([{"name": "FROM_AGENT", "value": "1"}, {"name": "FROM_SESSION", "value": "yes"}])
    );
    assert_eq!(c["trigger"]["source"], "webhook");
    assert_eq!(c["trigger"]["payload"], "{\"hello\":1}");
    assert_eq!(c["phase"], "Running");

    let first = setup.event(&token, "agent.message", "thinking").await;
    assert_eq!(
        (first.status, &first.json["id"]),
        (200, &json!(1)),
        "{first:?}"
    );
    let tool = setup.event(&token, "tool.call", "ls").await;
    assert_eq!(tool.json["id"], 2);
    let second = setup.event(&token, "agent.message", "the answer").await;
    assert_eq!(second.json["id"], 3);

    let reserved = setup.event(&token, "session.status_closed", "x").await;
    assert_eq!(reserved.status, 400, "{reserved:?}");
    assert!(
        reserved.json["message"]
            .as_str()
            .is_some_and(|m| m.contains("type"))
    );
    let no_type = setup
        .call(
            "POST",
            "/runner/v1/events",
            Some(&token),
            r#"{"content":"x"}"#,
        )
        .await;
    assert_eq!(no_type.status, 400);
    assert!(
        no_type.json["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("type"))
    );

    // Without a response the last agent.message is the answer.
    let done = setup.complete(&token, json!({"status": "complete"})).await;
    assert_eq!(
        (done.status, &done.json["phase"]),
        (200, &json!("Complete")),
        "{done:?}"
    );
    let stored = setup.stored("helper-wh-1").await;
    let status = stored.status.clone().expect("a status");
    assert_eq!(status.phase(), hookrun_crds::SessionPhase::Complete);
    assert_eq!(status.response.as_deref(), Some("the answer"));
    assert!(status.completion_time.is_some());
    assert_eq!(agent_messages(&stored), ["thinking", "the answer"]);
    let types: Vec<&str> = status.events.iter().map(|e| e.type_.as_str()).collect();
    assert_eq!(
        types,
        [
            "agent.message",
            "tool.call",
            "agent.message",
            "session.status_closed"
        ]
    );

    let late = setup.event(&token, "agent.message", "too late").await;
    assert_eq!(
        (late.status, &late.json["error"]),
        (409, &json!("session_finished"))
    );
    let again = setup.complete(&token, json!({"status": "error"})).await;
    assert_eq!(again.status, 409);
}

#[tokio::test]
async fn errors_are_recorded_and_only_the_sessions_own_pod_token_is_served() {
    let setup = Setup::new().await;
    let uid = setup.session_with_pod("a-wh-1", "a").await;
    let other_uid = setup.session_with_pod("a-wh-2", "a").await;
    let token = setup.pod_token("a-wh-1", &uid);

    // No token, a token of another audience, a token not bound to a pod.
    let none = setup.get("/runner/v1/session", None).await;
    assert_eq!(
        (none.status, &none.json["error"]),
        (401, &json!("unauthorized"))
    );
    let wrong_audience = setup.token(
        "default",
        &[
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "a-wh-1",
            "--bound-object-uid",
            &uid,
        ],
    );
    assert_eq!(
        setup
            .get("/runner/v1/session", Some(&wrong_audience))
            .await
            .status,
        401
    );
    let unbound = setup.token("default", &["--audience", "hookrun"]);
    let answer = setup.get("/runner/v1/session", Some(&unbound)).await;
    assert_eq!(
        (answer.status, &answer.json["error"]),
        (403, &json!("forbidden")),
        "{answer:?}"
    );
    assert_eq!(
        setup
            .get("/runner/v1/session", Some("not-a-token"))
            .await
            .status,
        401
    );

    // A token bound to the other Session's pod speaks for that Session only.
    let other = setup.pod_token("a-wh-2", &other_uid);
    let theirs = setup.get("/runner/v1/session", Some(&other)).await;
    assert_eq!(theirs.json["session"], "a-wh-2");
    // Point a-wh-2 at a-wh-1's pod uid: its own pod's token no longer matches.
    let swap = json!({"status": {"podUid": uid}});
    setup
        .sessions()
        .patch_status("a-wh-2", &PatchParams::default(), &Patch::Merge(&swap))
        .await
        .expect("status written");
    let refused = setup.event(&other, "agent.message", "not mine").await;
    assert_eq!(refused.status, 403, "{refused:?}");

    let failed = setup
        .complete(
            &token,
            json!({"status": "error", "message": "the tool crashed"}),
        )
        .await;
    assert_eq!(
        (failed.status, &failed.json["phase"]),
        (200, &json!("Error")),
        "{failed:?}"
    );
    let status = setup.stored("a-wh-1").await.status.expect("a status");
    assert_eq!(status.phase(), hookrun_crds::SessionPhase::Error);
    assert_eq!(status.message.as_deref(), Some("the tool crashed"));
    assert_eq!(status.response, None);
    let bad = setup.complete(&token, json!({"status": "maybe"})).await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn the_read_api_answers_holders_of_get_sessions_only() {
    let setup = Setup::new().await;
    let uid = setup.session_with_pod("r-wh-1", "r").await;
    let pod = setup.pod_token("r-wh-1", &uid);
    setup.event(&pod, "agent.message", "hello").await;
    setup.event(&pod, "tool.call", "ls").await;
    setup
        .complete(&pod, json!({"status": "complete", "response": "bye"}))
        .await;
    let reader = setup.ns.session_reader_token();

    let summary = setup
        .get(&setup.read_path("r-wh-1", ""), Some(&reader))
        .await;
    assert_eq!(summary.status, 200, "{summary:?}");
    let s = &summary.json;
    assert_eq!(s["session"], "r-wh-1");
    assert_eq!(s["namespace"], setup.ns.name());
    assert_eq!(s["agentDefinition"], "r");
    assert_eq!(s["phase"], "Complete");
    assert_eq!(s["title"], "title of r-wh-1");
    assert_eq!(s["response"], "bye");
    assert_eq!(s["eventCount"], 3);
    assert!(
        s["createdAt"].is_string() && s["completionTime"].is_string(),
        "{s}"
    );

    let all = setup
        .get(&setup.read_path("r-wh-1", "/events"), Some(&reader))
        .await;
    assert_eq!(
        (all.status, &all.json["count"]),
        (200, &json!(3)),
        "{all:?}"
    );
    assert_eq!(all.json["events"][0]["type"], "agent.message");
    assert_eq!(all.json["events"][0]["content"], "hello");
    assert!(all.json["events"][0]["timestamp"].is_string());
    let path = format!(
        "{}&event_type=tool.call",
        setup.read_path("r-wh-1", "/events")
    );
    let tools = setup.get(&path, Some(&reader)).await;
    assert_eq!(tools.json["count"], 1, "{tools:?}");
    assert_eq!(tools.json["events"][0]["content"], "ls");

    let unknown = setup.get(&setup.read_path("nope", ""), Some(&reader)).await;
    assert_eq!(
        (unknown.status, &unknown.json["error"]),
        (404, &json!("session_not_found"))
    );
    let no_ns = setup.get("/agents/r-wh-1", Some(&reader)).await;
    assert_eq!(no_ns.status, 400);
    assert!(
        no_ns.json["message"]
            .as_str()
            .is_some_and(|m| m.contains("namespace"))
    );

    // The default ServiceAccount has no RBAC on Sessions; the pod token neither.
    let stranger = setup.token("default", &[]);
    let denied = setup
        .get(&setup.read_path("r-wh-1", ""), Some(&stranger))
        .await;
    assert_eq!(
        (denied.status, &denied.json["error"]),
        (403, &json!("forbidden")),
        "{denied:?}"
    );
    let none = setup.get(&setup.read_path("r-wh-1", "/events"), None).await;
    assert_eq!(none.status, 401);
    let invalid = setup
        .get(&setup.read_path("r-wh-1", ""), Some("garbage"))
        .await;
    assert_eq!(invalid.status, 401);
}

/// One SSE message as read off the wire.
#[derive(Debug, Default, Clone)]
struct Frame {
    id: Option<u64>,
    event: String,
    data: Value,
}

/// An open `GET .../stream`; HTTP/1.0, so the body is the raw bytes until close.
struct SseStream {
    reader: BufReader<tokio::net::TcpStream>,
    status: u16,
    content_type: String,
}

impl SseStream {
    async fn open(address: &str, path: &str, token: &str, last_id: Option<u64>) -> Self {
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("the apiserver accepts");
        let mut head = format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n");
        if let Some(id) = last_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.expect("sent");
        let mut reader = BufReader::new(stream);
        let mut status = 0;
        let mut content_type = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if line.starts_with("HTTP/") {
                status = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            } else if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-type")
            {
                content_type = v.trim().to_owned();
            }
        }
        SseStream {
            reader,
            status,
            content_type,
        }
    }

    /// The next message (comments skipped), or `None` when the server closed the stream.
    async fn next(&mut self) -> Option<Frame> {
        let mut frame = Frame::default();
        let mut filled = false;
        loop {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(30), self.reader.read_line(&mut line))
                    .await
                    .expect("a line within 30 s")
                    .expect("readable");
            if read == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if filled {
                    return Some(frame);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            filled = true;
            match field {
                "id" => frame.id = value.parse().ok(),
                "event" => frame.event = value.to_owned(),
                "data" => frame.data = serde_json::from_str(value).expect("JSON data"),
                other => panic!("unexpected SSE field {other}"),
            }
        }
    }
}

#[tokio::test]
async fn the_stream_shows_events_live_ends_after_close_and_resumes_from_last_event_id() {
    let setup = Setup::new().await;
    let uid = setup.session_with_pod("s-wh-1", "s").await;
    let pod = setup.pod_token("s-wh-1", &uid);
    setup.event(&pod, "agent.message", "before").await;
    let reader = setup.ns.session_reader_token();
    let path = setup.read_path("s-wh-1", "/stream");

    let mut stream = SseStream::open(&setup.apiserver.public, &path, &reader, None).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.content_type, "text/event-stream");
    let replayed = stream.next().await.expect("the stored event");
    assert_eq!(
        (replayed.id, replayed.event.as_str()),
        (Some(1), "agent.message")
    );
    assert_eq!(replayed.data["content"], "before");

    // Live: each event posted now arrives on the open stream.
    for (i, text) in ["one", "two"].iter().enumerate() {
        setup.event(&pod, "agent.message", text).await;
        let live = stream.next().await.expect("a live event");
        assert_eq!(live.id, Some(i as u64 + 2), "{live:?}");
        assert_eq!(live.data["content"], *text);
        assert_eq!(live.data["type"], "agent.message");
        assert!(live.data["timestamp"].is_string());
    }
    setup.complete(&pod, json!({"status": "complete"})).await;
    let closed = stream.next().await.expect("the closing event");
    assert_eq!(
        (closed.id, closed.event.as_str()),
        (Some(4), "session.status_closed")
    );
    assert_eq!(closed.data["content"], "Complete");
    assert!(
        stream.next().await.is_none(),
        "the stream ends after status_closed"
    );

    // Resume after id 2: only 3 and 4, then the end.
    let mut resumed = SseStream::open(&setup.apiserver.public, &path, &reader, Some(2)).await;
    let ids: Vec<Option<u64>> = [resumed.next().await, resumed.next().await]
        .into_iter()
        .map(|f| f.and_then(|f| f.id))
        .collect();
    assert_eq!(ids, [Some(3), Some(4)]);
    assert!(resumed.next().await.is_none());

    let denied = SseStream::open(
        &setup.apiserver.public,
        &path,
        &setup.token("default", &[]),
        None,
    )
    .await;
    assert_eq!(denied.status, 403);

    // A stream on a Session that is deleted ends.
    setup.session_with_pod("s-wh-2", "s").await;
    let path = setup.read_path("s-wh-2", "/stream");
    let mut doomed = SseStream::open(&setup.apiserver.public, &path, &reader, None).await;
    assert_eq!(doomed.status, 200);
    setup
        .sessions()
        .delete("s-wh-2", &Default::default())
        .await
        .expect("deleted");
    assert!(
        doomed.next().await.is_none(),
        "the stream ends with its Session"
    );
}

#[tokio::test]
async fn two_apiservers_appending_to_one_session_lose_no_event() {
    let setup = Setup::new().await;
    let cluster = cluster().await;
    let second = ApiServer::start(&cluster.kubeconfig_path(), setup.ns.name(), "second").await;
    let uid = setup.session_with_pod("c-wh-1", "c").await;
    let token = setup.pod_token("c-wh-1", &uid);
    let addresses = [setup.apiserver.runner.clone(), second.runner.clone()];
    // The second one answers once connected.
    let ready = eventually(BUDGET, || async {
        let answer = request(
            &addresses[1],
            "GET",
            "/runner/v1/session",
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
        (answer.status == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "the second apiserver never answered");

    let started = std::time::Instant::now();
    let posts = (0..50).map(|i| {
        let address = addresses[i % 2].clone();
        let auth = format!("Bearer {token}");
        async move {
            let body =
                json!({"type": "agent.message", "content": format!("event {i}")}).to_string();
            request(
                &address,
                "POST",
                "/runner/v1/events",
                &[("Authorization", &auth)],
                &body,
            )
            .await
        }
    });
    let answers = join_all(posts).await;
    let elapsed = started.elapsed();
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let mut ids: Vec<u64> = answers
        .iter()
        .filter_map(|a| a.json["id"].as_u64())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=50).collect::<Vec<u64>>(),
        "every append got its own id"
    );

    let mut stored = agent_messages(&setup.stored("c-wh-1").await);
    stored.sort();
    let mut expected: Vec<String> = (0..50).map(|i| format!("event {i}")).collect();
    expected.sort();
    assert_eq!(stored, expected);
    eprintln!("50 concurrent appends through two apiservers took {elapsed:?}");
}
