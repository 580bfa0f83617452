//! `make dev` as a new user runs it: hookrun-dev (what `make dev` runs once the binaries
//! are built) on free ports with its own control plane; the echo Agent's URL is printed,
//! a wait-mode call comes back with the title, and Ctrl-C leaves no process behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookrun_tests::{
    control_plane::workspace_root, door, eventually, kubectl, tied, workspace_binary,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')))
        .unwrap_or(false)
}

/// hookrun-dev in the background, its output collected line by line.
struct Dev {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// Its state and logs, removed when the test passes.
    dir: PathBuf,
    state: PathBuf,
    logs: PathBuf,
    public: String,
}

impl Dev {
    fn start() -> Self {
        let root = workspace_root().join("target/test-clusters");
        let tag = format!("dev-{}", std::process::id());
        let state = root.join(&tag).join("state");
        let logs = root.join(&tag).join("logs");
        let _ = std::fs::remove_dir_all(root.join(&tag));
        let public = format!("127.0.0.1:{}", free_port());
        let mut child = Command::new(workspace_binary("hookrun-dev"))
            .arg("--state")
            .arg(&state)
            .arg("--logs")
            .arg(&logs)
            .args(["--listen", &public])
            .args(["--runner-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .args([
                "--operator-admin-listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("hookrun-dev starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().expect("lock").push(line);
                }
            });
        }
        Dev {
            child,
            lines,
            dir: root.join(&tag),
            state,
            logs,
            public,
        }
    }

    fn output(&self) -> String {
        self.lines.lock().expect("lock").join("\n")
    }

    /// The webhook path of an Agent, from the printed URL.
    async fn webhook_path(&self, agent: &str) -> String {
        let marker = format!("{}/webhooks/default/{agent}/", self.public);
        let found = eventually(Duration::from_secs(240), || async {
            let lines = self.lines.lock().expect("lock").clone();
            lines.iter().find_map(|line| {
                let url = line.split_whitespace().find(|w| w.contains(&marker))?;
                url.split_once(&self.public)
                    .map(|(_, path)| path.to_owned())
            })
        })
        .await;
        found.unwrap_or_else(|| panic!("no URL printed for {agent}:\n{}", self.output()))
    }
}

impl Drop for Dev {
    /// A failed test still stops hookrun-dev the way a user does (Ctrl-C), so that it
    /// stops what it started instead of leaving it behind.
    fn drop(&mut self) {
        let Some(pid) = self.child.id() else { return };
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        let begun = Instant::now();
        while alive(pid) && begun.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the fake chat-completions server saw: the Authorization header and the body.
type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A one-route OpenAI-compatible server: answers every request with a chat completion
/// whose content repeats the user message.
async fn fake_chat_completions() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    let address = listener.local_addr().expect("an address").to_string();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body) = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break (String::new(), Vec::new());
                };
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                let Some((head, _)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_owned())
                    })
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let start = head.len() + 4;
                if request.len() >= start + length {
                    break (head.to_owned(), request[start..start + length].to_vec());
                }
            };
            let auth = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("authorization: ")
                        .or(l.strip_prefix("Authorization: "))
                })
                .unwrap_or("")
                .to_owned();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let user = body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .and_then(|m| m["content"].as_str())
                .unwrap_or("")
                .to_owned();
            record.lock().expect("lock").push((auth, body));
            let answer = serde_json::json!({
                "id": "chatcmpl-dev", "object": "chat.completion", "created": 1, "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("the fake model heard: {user}")}, "finish_reason": "stop"}]
            })
            .to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (address, seen)
}

/// A model Agent under make dev: the pod runner resolves its key from a Secret, the
/// harness calls the (fake) chat completions API and the answer comes back in wait mode.
async fn model_agent_through_the_pod_runner(dev: &Dev) {
    let (model, seen) = fake_chat_completions().await;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Secret
metadata:
  name: fake-openai
  namespace: default
  labels: {{hookrun.dev/agent-env: "true"}}
stringData: {{api-key: sk-test-dev}}
---
apiVersion: hookrun.dev/v1alpha1
kind: Agent
metadata: {{name: fake-llm, namespace: default}}
spec:
  models: [openai/fake-model]
  system: Be brief.
  triggers: [{{webhook: {{}}}}]
  session:
    env:
      - {{name: OPENAI_BASE_URL, value: "http://{model}/v1"}}
      - name: OPENAI_API_KEY
        valueFrom: {{secretKeyRef: {{name: fake-openai, key: api-key}}}}
"#
    );
    let kubeconfig = dev.state.join("kubeconfig");
    let applied = kubectl(&kubeconfig, &["apply", "-f", "-"], Some(&manifest));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let url = eventually(Duration::from_secs(30), || async {
        let out = kubectl(
            &kubeconfig,
            &[
                "get",
                "agent",
                "fake-llm",
                "-n",
                "default",
                "-o",
                "jsonpath={.status.webhookUrl}",
            ],
            None,
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!url.is_empty()).then_some(url)
    })
    .await
    .expect("fake-llm gets a URL");
    let path = url
        .split_once(&dev.public)
        .map(|(_, p)| p.to_owned())
        .expect("a local URL");
    let answer = door::request(
        &dev.public,
        "POST",
        &path,
        &[],
        r#"{"title":"hello model","wait":60}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}\n{}", answer.json, dev.output());
    assert_eq!(answer.json["phase"], "Complete", "{:?}", answer.json);
    assert_eq!(answer.json["response"], "the fake model heard: hello model");
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0, "Bearer sk-test-dev",
        "the key came from the Secret"
    );
    assert_eq!(seen[0].1["model"], "fake-model");
    assert_eq!(
        seen[0].1["messages"][0],
        serde_json::json!({"role": "system", "content": "Be brief."})
    );
}

#[tokio::test]
async fn make_dev_answers_the_echo_agent_and_ctrl_c_leaves_nothing_running() {
    let begun = Instant::now();
    let mut dev = Dev::start();
    let path = dev.webhook_path("echo").await;
    let ready = begun.elapsed();
    let output = dev.output();
    assert!(
        output.contains("\"wait\":60"),
        "the wait-mode curl line:\n{output}"
    );

    // Everything it started, read while it runs.
    let mut started = tied::recorded(&dev.logs.join("dev.pids"));
    started.extend(tied::recorded(&dev.state.join("pids")));
    let names: Vec<&str> = started.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "hookrun-cluster",
        "hookrun-operator",
        "hookrun-apiserver",
        "etcd",
        "kube-apiserver",
    ] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }

    let mut timings = Vec::new();
    // Twenty calls: the quickstart's latency, p50 printed for the README.
    for _ in 0..20 {
        let call = Instant::now();
        let answer = door::request(
            &dev.public,
            "POST",
            &path,
            &[],
            r#"{"title":"hello","wait":60}"#,
        )
        .await;
        timings.push(call.elapsed());
        assert_eq!(answer.status, 200, "{:?}\n{}", answer.json, dev.output());
        // The echo Agent is interactive: wait mode answers at the end of the first turn,
        // while the Session waits for follow-ups.
        assert!(
            matches!(answer.json["phase"].as_str(), Some("Running" | "Complete")),
            "{:?}",
            answer.json
        );
        assert!(
            answer.json["response"]
                .as_str()
                .is_some_and(|r| r.contains("hello")),
            "{:?}",
            answer.json
        );
    }
    let output = dev.output();
    assert!(output.contains("▶ session default/echo-wh-"), "{output}");
    // Sessions end after the echo Agent's idle timeout.
    let closed = eventually(Duration::from_secs(60), || async {
        dev.output()
            .contains("■ session default/echo-wh-")
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "{}", dev.output());
    timings.sort();
    eprintln!(
        "make dev: URLs after {:.1}s; wait-mode p50 {:?}, max {:?} over {} calls",
        ready.as_secs_f64(),
        timings[timings.len() / 2],
        timings[timings.len() - 1],
        timings.len()
    );

    // Fire-and-forget, then the answer read back with a ServiceAccount token.
    let fired = door::request(&dev.public, "POST", &path, &[], r#"{"title":"later"}"#).await;
    assert_eq!(fired.status, 200, "{:?}", fired.json);
    let session = fired.json["session"]
        .as_str()
        .expect("a session name")
        .to_owned();
    let token = kubectl(
        &dev.state.join("kubeconfig"),
        &["create", "token", "session-reader", "-n", "default"],
        None,
    );
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let bearer = format!("Bearer {}", String::from_utf8_lossy(&token.stdout).trim());
    let auth = [("Authorization", bearer.as_str())];
    let summary = format!("/agents/{session}?namespace=default");
    let complete = eventually(Duration::from_secs(30), || async {
        let answer = door::request(&dev.public, "GET", &summary, &auth, "").await;
        (answer.json["phase"] == "Complete").then_some(answer)
    })
    .await
    .unwrap_or_else(|| panic!("{session} did not complete:\n{}", dev.output()));
    assert_eq!(complete.status, 200);
    let events = door::request(
        &dev.public,
        "GET",
        &format!("/agents/{session}/events?namespace=default&event_type=agent.message"),
        &auth,
        "",
    )
    .await;
    assert_eq!(events.status, 200, "{:?}", events.json);
    assert_eq!(
        events.json["events"][0]["content"], "later",
        "{:?}",
        events.json
    );
    // The stream of a finished session replays its events and closes.
    let stream = tokio::time::timeout(
        Duration::from_secs(30),
        door::request(
            &dev.public,
            "GET",
            &format!("/agents/{session}/stream?namespace=default"),
            &[
                ("Authorization", bearer.as_str()),
                ("Accept", "text/event-stream"),
            ],
            "",
        ),
    )
    .await
    .expect("the stream of a finished session ends")
    .text;
    assert!(stream.contains("event: agent.message"), "{stream}");
    assert!(stream.contains("session.status_closed"), "{stream}");
    let refused = door::request(&dev.public, "GET", &summary, &[], "").await;
    assert_eq!(refused.status, 401, "no token, no answer");

    model_agent_through_the_pod_runner(&dev).await;

    let pid = dev.child.id().expect("a pid");
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), dev.child.wait())
        .await
        .expect("hookrun-dev stops within 60 s of Ctrl-C")
        .expect("its status");
    assert!(status.success(), "{status}\n{}", dev.output());
    let left: Vec<_> = started.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
    // The exit can be seen before the output reader has taken the last lines.
    let said = eventually(Duration::from_secs(10), || async {
        dev.output()
            .contains("everything make dev started has stopped")
            .then_some(())
    })
    .await;
    assert!(said.is_some(), "{}", dev.output());
    if let Err(error) = std::fs::remove_dir_all(&dev.dir) {
        eprintln!("cannot remove {}: {error}", dev.dir.display());
    }
}
