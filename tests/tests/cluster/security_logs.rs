//! The real `hookrun-apiserver`'s log is not an input channel: paths that name no Agent
//! (a token pasted where the Agent name goes, bad names, kilobytes of junk) and junk
//! headers and queries never reach it, and no request makes a long line.

use std::time::Duration;

use hookrun_tests::door::{ApiServer, BUDGET, request};
use hookrun_tests::{TestNamespace, cluster, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the requests carry; it must never appear in the log.
const MARKER: &str = "Xq7LogMarkerTok_9f2LkP0aZ";
/// The longest log line allowed.
const MAX_LINE: usize = 2048;

/// Sends `head` and the blank line, and returns whatever comes back before the server
/// closes (a refusal may close before reading everything).
async fn send_raw(address: &str, head: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("the apiserver accepts");
    let _ = stream.write_all(format!("{head}\r\n").as_bytes()).await;
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn paths_headers_and_junk_that_name_no_agent_never_reach_the_log() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let server = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), "logs").await;
    eventually(BUDGET, || async {
        (request(&server.admin, "GET", "/readyz", &[], "")
            .await
            .status
            == 200)
            .then_some(())
    })
    .await
    .expect("the apiserver becomes ready");
    let ns = ns.name();
    let junk = format!("{MARKER}{}", "j".repeat(1500));

    let door_paths = [
        // A token where the Agent name goes (the bearer route matches).
        format!("/webhooks/{ns}/{MARKER}"),
        format!("/webhooks/{ns}/agent/{MARKER}"),
        format!("/webhooks/{MARKER}_Bad.NS/agent/token"),
        format!("/webhooks/{ns}/{junk}/token"),
        format!("/webhooks/{ns}/{junk}"),
        format!("/webhooks/{ns}/%2E%2E%2F{MARKER}/token"),
    ];
    for path in &door_paths {
        for method in ["POST", "GET"] {
            let answer = request(&server.public, method, path, &[("X-Junk", MARKER)], "{}").await;
            assert_eq!(answer.status, 404, "{method} {path}: {answer:?}");
        }
    }
    for path in [
        format!("/{MARKER}/nothing?{MARKER}=1"),
        format!("/webhooks/{ns}/a/b/{MARKER}"),
        format!("/agents/{MARKER}?namespace={MARKER}"),
        format!("/agents/s/events?namespace={ns}&event_type={MARKER}"),
    ] {
        let answer = request(
            &server.public,
            "GET",
            &path,
            &[("Authorization", &format!("Bearer {MARKER}"))],
            "",
        )
        .await;
        assert!(answer.status >= 400, "{path}: {answer:?}");
    }
    // 60 KB of junk in the path and in a header: refused before any handler.
    let long = format!("/webhooks/{ns}/{MARKER}{}/token", "k".repeat(60 * 1024));
    let answer = send_raw(
        &server.public,
        &format!("POST {long} HTTP/1.1\r\nHost: x\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{:.200}", answer);
    let header = format!("X-Junk: {MARKER}{}", "h".repeat(60 * 1024));
    let answer = send_raw(
        &server.public,
        &format!("GET /webhooks/{ns}/agent/token HTTP/1.1\r\nHost: x\r\n{header}\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{:.200}", answer);

    // The door logged the requests (by route template), then nothing of them.
    let logged = eventually(BUDGET, || async {
        let log = server.process.log_text();
        (log.matches("webhook request").count() >= 2 * door_paths.len()).then_some(log)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the door logged too few requests: {}",
            server.process.log_text()
        )
    });
    assert!(
        !logged.to_lowercase().contains(&MARKER.to_lowercase()),
        "the marker is in the log: {}",
        server.process.log.display()
    );
    let longest = logged.lines().map(str::len).max().unwrap_or(0);
    assert!(
        longest <= MAX_LINE,
        "a log line of {longest} bytes: {}",
        server.process.log.display()
    );
    assert!(logged.contains("/webhooks/{namespace}/{agent}"), "{logged}");
}
