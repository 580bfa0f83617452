//! Cluster test of the apiserver's drain on SIGTERM: held wait-mode requests and open
//! event streams on the real `hookrun-apiserver` while it is told to stop. `/readyz`
//! fails at once, the server keeps serving for its drain period, then every held
//! request gets its 202 with a `pollUrl` (which another replica answers), every stream
//! ends with a `session.reconnect` event to resume from, no client sees a reset or an
//! empty reply, and the process exits within the grace period.

use std::time::{Duration, Instant};

use futures::future::join_all;
use hookrun_crds::session::event_types;
use hookrun_crds::{Agent, Session};
use hookrun_tests::door::{ApiServer, BUDGET, Door, metric, metrics, request, webhook_path};
use hookrun_tests::{
    TestNamespace, apply_agent, cluster, eventually, fixtures::update_session_status,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How many wait-mode requests are held when SIGTERM comes.
const HELD: usize = 50;
/// How many event streams are open when SIGTERM comes.
const STREAMS: usize = 10;
/// The drain period the apiserver runs with.
const DRAIN: Duration = Duration::from_secs(3);
/// The flags that set it.
const DRAIN_FLAGS: [&str; 2] = ["--drain-period", "3s"];
/// The grace period a pod with this drain period gets (drain + finish budget + margin).
const GRACE: Duration = Duration::from_secs(18);

/// An HTTP/1.1 exchange on a fresh connection (`Connection: close`) that reports a reset
/// or an empty reply instead of panicking: `Ok((status, body))` or `Err(what happened)`.
async fn exchange(
    address: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Value), String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 120 s".to_owned())?
        .map_err(|e| format!("read (reset?): {e}"))?;
    if answer.is_empty() {
        return Err("an empty reply".to_owned());
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// Sends a keep-alive `GET path` on `stream` and reads its answer (a `Content-Length`
/// body); returns the head.
async fn keep_alive_get(stream: &mut BufReader<TcpStream>, address: &str, path: &str) -> String {
    let head = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n");
    stream
        .get_mut()
        .write_all(head.as_bytes())
        .await
        .expect("sent");
    let mut answer_head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.expect("a header line");
        if line.trim_end().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().expect("a length");
        }
        answer_head.push_str(&line);
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.expect("the body");
    answer_head
}

/// `GET /readyz`'s status, or what went wrong.
async fn readyz(admin: &str) -> Result<u16, String> {
    exchange(admin, "GET", "/readyz", "").await.map(|(s, _)| s)
}

/// One SSE message: its id, type and whether it carried a `retry:` hint.
#[derive(Debug, Default)]
struct Message {
    id: Option<u64>,
    event: String,
    retry: Option<u64>,
    data: Value,
}

/// An open `GET .../stream` (HTTP/1.0: the body is the raw event text until close).
struct EventStream {
    reader: BufReader<TcpStream>,
}

impl EventStream {
    async fn open(address: &str, path: &str, token: &str) -> Self {
        let mut stream = TcpStream::connect(address).await.expect("connects");
        let head = format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("sent");
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader
            .read_line(&mut status_line)
            .await
            .expect("a status line");
        assert!(status_line.contains(" 200 "), "{status_line}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("a header line");
            if line.trim_end().is_empty() {
                break;
            }
        }
        EventStream { reader }
    }

    /// The next message (comments skipped); `Ok(None)` when the server closed the stream
    /// cleanly, `Err` on a reset.
    async fn next(&mut self) -> Result<Option<Message>, String> {
        let mut message = Message::default();
        let mut filled = false;
        loop {
            let mut line = String::new();
            let read =
                tokio::time::timeout(Duration::from_secs(60), self.reader.read_line(&mut line))
                    .await
                    .map_err(|_| "no line within 60 s".to_owned())?
                    .map_err(|e| format!("read (reset?): {e}"))?;
            if read == 0 {
                return Ok(None);
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if filled {
                    return Ok(Some(message));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            filled = true;
            match field {
                "id" => message.id = value.parse().ok(),
                "event" => message.event = value.to_owned(),
                "retry" => message.retry = value.parse().ok(),
                "data" => message.data = serde_json::from_str(value).unwrap_or(Value::Null),
                other => return Err(format!("unexpected SSE field {other}")),
            }
        }
    }
}

/// Adds one `agent.message` to a Session's status, as the runner API would.
async fn add_event(sessions: &Api<Session>, name: &str, content: &str) {
    update_session_status(sessions, name, |status| {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        status.push_event(event_types::AGENT_MESSAGE, content, now);
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_held_requests_and_streams_without_losing_a_caller() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let kubeconfig = cluster.kubeconfig_path();
    let mut door = Door::start_with_args(cluster, &ns, &kubeconfig, &DRAIN_FLAGS).await;
    let second = ApiServer::start(&kubeconfig, ns.name(), "second").await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    apply_agent(
        &agents,
        "asker",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "asker").await;
    door.wait_until_known(&path).await;
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let reader = ns.session_reader_token();

    // 50 wait-mode requests, held by the apiserver.
    let held: Vec<_> = (0..HELD)
        .map(|i| {
            let (public, path) = (door.public.clone(), path.clone());
            tokio::spawn(async move {
                let body = json!({"title": format!("held {i}"), "wait": 600}).to_string();
                let result = exchange(&public, "POST", &path, &body).await;
                (result, Instant::now())
            })
        })
        .collect();
    let all_held = eventually(Duration::from_secs(90), || async {
        let text = metrics(&door.admin).await;
        (metric(&text, "hookrun_apiserver_waiting_requests") >= HELD as f64).then_some(())
    })
    .await;
    assert!(
        all_held.is_some(),
        "the {HELD} requests were never all held: {}",
        door.apiserver.log.display()
    );
    let mut names: Vec<String> = sessions
        .list(&ListParams::default())
        .await
        .expect("the Sessions list")
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    names.sort();
    assert_eq!(names.len(), HELD);

    // 10 open streams; the first one's Session already has an event.
    add_event(&sessions, &names[0], "before the drain").await;
    let mut streams = Vec::new();
    for name in names.iter().take(STREAMS) {
        let stream_path = format!("/agents/{name}/stream?namespace={}", ns.name());
        streams.push(EventStream::open(&door.public, &stream_path, &reader).await);
    }
    let first = streams[0]
        .next()
        .await
        .expect("readable")
        .expect("the event");
    assert_eq!(first.id, Some(1), "{first:?}");

    // A keep-alive connection that stays idle through the drain, and one that is used
    // during it.
    let mut idle = BufReader::new(TcpStream::connect(&door.public).await.expect("connects"));
    let head = keep_alive_get(&mut idle, &door.public, &path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut busy = BufReader::new(TcpStream::connect(&door.public).await.expect("connects"));
    let head = keep_alive_get(&mut busy, &door.public, &path).await;
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );

    assert_eq!(readyz(&door.admin).await, Ok(200));
    let signalled = Instant::now();
    door.apiserver.signal("TERM");

    // Not ready at once, still serving during the drain period.
    let not_ready = eventually(Duration::from_secs(1), || async {
        (readyz(&door.admin).await == Ok(503)).then_some(signalled.elapsed())
    })
    .await;
    assert!(
        not_ready.is_some(),
        "/readyz did not fail within 1 s of SIGTERM: {:?}",
        readyz(&door.admin).await
    );
    let ping = exchange(&door.public, "GET", &path, "").await;
    assert_eq!(ping.as_ref().map(|(s, _)| *s), Ok(200), "{ping:?}");
    // A keep-alive client is answered and told to go elsewhere, then the server closes
    // that connection cleanly.
    let head = keep_alive_get(&mut busy, &door.public, &path).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    let closed = busy.read_to_end(&mut rest).await;
    assert!(
        matches!(closed, Ok(0)),
        "the draining connection was not closed cleanly: {closed:?}"
    );
    assert!(
        signalled.elapsed() < DRAIN,
        "the check took longer than the drain period"
    );

    // Every held request: a 202 with a pollUrl, after the drain period, no reset.
    let answers = join_all(held).await;
    let mut polls = Vec::new();
    let mut failures = Vec::new();
    for answer in answers {
        let (result, at) = answer.expect("the request task");
        match result {
            Ok((202, body)) if body["timedOut"] == true && body["pollUrl"].is_string() => {
                assert!(
                    at.duration_since(signalled) >= DRAIN - Duration::from_millis(200),
                    "answered {:?} after SIGTERM, before the drain period ended",
                    at.duration_since(signalled)
                );
                polls.push(body["pollUrl"].as_str().unwrap_or_default().to_owned());
            }
            other => failures.push(format!("{other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {HELD} held requests were not answered 202 with a pollUrl: {failures:?}",
        failures.len()
    );

    // Every stream: a final event naming the last id sent, a retry hint, then a clean end.
    for (i, stream) in streams.iter_mut().enumerate() {
        let last = stream
            .next()
            .await
            .expect("readable")
            .expect("a final event");
        assert_eq!(last.event, "session.reconnect", "stream {i}: {last:?}");
        let expected = if i == 0 { 1 } else { 0 };
        assert_eq!(last.id, Some(expected), "stream {i}: {last:?}");
        assert_eq!(last.data["lastEventId"], expected, "stream {i}");
        assert!(last.retry.is_some(), "stream {i}: no retry hint");
        assert!(
            stream.next().await.expect("a clean close").is_none(),
            "stream {i} goes on after its final event"
        );
    }

    // The idle keep-alive connection was closed cleanly (end of stream, no reset).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle keep-alive connection was not closed cleanly: {closed:?}"
    );

    // The process exits within the grace period, and cleanly.
    let exit = door.apiserver.wait_exit(GRACE).await;
    let took = signalled.elapsed();
    assert!(
        exit.is_some_and(|status| status.success()),
        "the apiserver did not exit cleanly within {GRACE:?}: {exit:?}; log {}",
        door.apiserver.log.display()
    );
    assert!(took < GRACE, "{took:?}");

    // Each pollUrl answers from the other replica: the Sessions ran on.
    let bearer = format!("Bearer {reader}");
    for poll in &polls {
        let answer = eventually(BUDGET, || async {
            let answer = request(
                &second.public,
                "GET",
                poll,
                &[("authorization", bearer.as_str())],
                "",
            )
            .await;
            (answer.status == 200).then_some(answer)
        })
        .await
        .unwrap_or_else(|| panic!("{poll} never answered 200 on the second apiserver"));
        assert!(answer.json["count"].is_u64(), "{poll}: {:?}", answer.json);
    }
    eprintln!(
        "drain: /readyz failed {:?} after SIGTERM; {HELD} held requests answered 202; \
         {STREAMS} streams closed with session.reconnect; exit {took:?} after SIGTERM \
         (drain period {DRAIN:?})",
        not_ready.unwrap_or_default()
    );
}
