//! Tests that break things on purpose, on the real binaries and a real control plane:
//! the kube-apiserver goes away and comes back under a steady stream of webhooks, the
//! elected operator is killed, slow clients hold connections open against the public
//! listener, and both binaries restart over a large history of finished Sessions.
//!
//! The outage and the history tests start a control plane of their own (the shared one
//! serves every other test at the same time, so it can neither be stopped nor filled).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookrun_crds::{Agent, Session, names};
use hookrun_tests::control_plane::{self, ControlPlane, default_tools_bin, workspace_root};
use hookrun_tests::door::{
    Answer, ApiServer, BUDGET, Door, Operator, elected_pair, get, is_known, lease_holder, request,
    webhook_path,
};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually, install_crds};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A number from the environment, or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A control plane of this test's own (without kube-controller-manager: nothing here
/// needs garbage collection), with hookrun's CRDs and the namespace `ns` (with its
/// `default` ServiceAccount, which the operator's pods name).
async fn own_control_plane(tag: &str, ns: &str) -> (ControlPlane, Client) {
    let state_dir = workspace_root()
        .join("target/test-clusters")
        .join(format!("{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let plane = ControlPlane::start(control_plane::Config {
        state_dir,
        tools_bin: default_tools_bin(),
        controller_manager: false,
    })
    .await
    .expect("a control plane of the test's own starts");
    let client = plane.client().await.expect("an admin client");
    install_crds(&client).await;
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("the namespace is created");
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("default".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &account)
        .await
        .expect("the default ServiceAccount is created");
    (plane, client)
}

/// Removes the state directory of a control plane of the test's own once it is stopped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A kubeconfig for the ServiceAccount `hookrun-apiserver` of `ns`, allowed what the
/// chart's Role allows the apiserver in a namespace it serves: the admin kubeconfig with
/// a TokenRequest token instead of the admin token.
fn service_account_kubeconfig(admin: &std::path::Path, ns: &str) -> PathBuf {
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: hookrun-apiserver, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: hookrun-apiserver, namespace: {ns}}}\n\
         rules:\n\
         - {{apiGroups: [hookrun.dev], resources: [agents], verbs: [list, watch]}}\n\
         - {{apiGroups: [hookrun.dev], resources: [sessions], verbs: [get, list, watch, create]}}\n\
         - {{apiGroups: [hookrun.dev], resources: [sessions/status], verbs: [patch]}}\n\
         - {{apiGroups: [hookrun.dev], resources: [agents/finalizers], verbs: [update]}}\n\
         - {{apiGroups: [\"\"], resources: [secrets], verbs: [list, watch]}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: hookrun-apiserver, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: hookrun-apiserver}}\n\
         subjects: [{{kind: ServiceAccount, name: hookrun-apiserver, namespace: {ns}}}]\n"
    );
    let applied = hookrun_tests::kubectl(admin, &["apply", "-f", "-"], Some(&rbac));
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let token = hookrun_tests::kubectl(
        admin,
        &[
            "create",
            "token",
            "hookrun-apiserver",
            "-n",
            ns,
            "--duration=2h",
        ],
        None,
    );
    assert!(
        token.status.success(),
        "kubectl create token: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8_lossy(&token.stdout).trim().to_owned();
    let text = std::fs::read_to_string(admin).expect("the admin kubeconfig");
    let replaced: String = text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("token:") {
            Some(_) => format!("    token: {token}"),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(text, replaced, "the admin kubeconfig carries a token line");
    let path = admin.with_file_name(format!("{ns}-hookrun-apiserver.kubeconfig"));
    std::fs::write(&path, replaced).expect("the ServiceAccount kubeconfig");
    path
}

/// The Agent of these tests: a webhook trigger and room for many stored Sessions.
fn steady_agent() -> serde_json::Value {
    json!({"spec": {
        "models": ["anthropic/claude-sonnet-4-6"],
        "triggers": [{"webhook": {}}],
        "session": {"maxStoredSessions": 100000},
    }})
}

/// The token Secret's uid and token, and the Agent's webhook URL: what must survive.
async fn token_state(client: &Client, ns: &str, agent: &str) -> (String, Vec<u8>, String) {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&names::webhook_secret_name(agent))
        .await
        .expect("the token Secret");
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.values().next().map(|v| v.0.clone()))
        .unwrap_or_default();
    let url = Api::<Agent>::namespaced(client.clone(), ns)
        .get(agent)
        .await
        .expect("the Agent")
        .status
        .and_then(|s| s.webhook_url)
        .unwrap_or_default();
    (secret.uid().unwrap_or_default(), token, url)
}

/// `path` with its token replaced by a well-formed wrong one.
fn wrong_token_path(path: &str) -> String {
    let (prefix, _) = path.rsplit_once('/').expect("a token path");
    format!("{prefix}/{}", "A".repeat(43))
}

/// One webhook attempt of the steady sender.
#[derive(Clone, Debug)]
struct Attempt {
    key: String,
    started: Instant,
    took: Duration,
    /// `None` when no whole answer came within [`ANSWER_BOUND`].
    status: Option<u16>,
    retry_after: bool,
    session: Option<String>,
    /// The error code and message of an answer that is not a success.
    error: Option<String>,
}

/// The longest any answer of the door may take while the kube-apiserver is down or
/// starting: the apiserver's Session store timeout (5 s) and slack.
const ANSWER_BOUND: Duration = Duration::from_secs(8);

/// A request that gives up after `bound`.
async fn bounded(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
    bound: Duration,
) -> Option<Answer> {
    tokio::time::timeout(bound, request(address, method, path, headers, body))
        .await
        .ok()
}

/// Sends webhooks with keys `<name>-<n>` one after the other until `stop` is set, each
/// key again and again (as a sender that honours 5xx does) until it gets a 2xx or a
/// refusal; every attempt goes into `log`.
async fn steady_sender(
    name: String,
    public: String,
    path: String,
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Acquire) {
        n += 1;
        let key = format!("{name}-{n}");
        let body = format!(r#"{{"title":"steady {key}"}}"#);
        // Once a key is under way it is finished (bounded), so that no answered key is
        // left without its retry.
        let give_up = Instant::now() + Duration::from_secs(400);
        loop {
            let started = Instant::now();
            let answer = bounded(
                &public,
                "POST",
                &path,
                &[("Idempotency-Key", &key)],
                &body,
                ANSWER_BOUND,
            )
            .await;
            let attempt = Attempt {
                key: key.clone(),
                started,
                took: started.elapsed(),
                status: answer.as_ref().map(|a| a.status),
                retry_after: answer
                    .as_ref()
                    .is_some_and(|a| a.header("retry-after").is_some()),
                session: answer
                    .as_ref()
                    .and_then(|a| a.json["session"].as_str().map(str::to_owned)),
                error: answer.as_ref().and_then(|a| {
                    let code = a.json["error"].as_str()?;
                    Some(format!(
                        "{code}: {}",
                        a.json["message"].as_str().unwrap_or("")
                    ))
                }),
            };
            let done = attempt.status.is_some_and(|s| s < 500);
            log.lock().expect("the log").push(attempt);
            if done || Instant::now() > give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_outage_of_the_kube_apiserver_loses_no_webhook_and_no_token() {
    const NS: &str = "outage";
    let cycles = env_number("HOOKRUN_OUTAGE_CYCLES", 2);
    let outage = Duration::from_secs(env_number("HOOKRUN_OUTAGE_SECONDS", 60));
    let (mut plane, client) = own_control_plane("outage", NS).await;
    let _cleanup = RemoveOnDrop(plane.state_dir().to_owned());
    let kubeconfig = plane.kubeconfig_path();
    let agents: Api<Agent> = Api::namespaced(client.clone(), NS);
    let mut operator = Operator::start_with(&kubeconfig, NS, "outage", &[]).await;
    // The apiserver runs as its ServiceAccount with the chart's namespaced rules, as in a
    // cluster: a kube-apiserver that is starting refuses such callers for a moment
    // (authentication and authorization load from etcd), unlike the admin.
    let identity = service_account_kubeconfig(&kubeconfig, NS);
    let mut apiserver = ApiServer::start(&identity, NS, "outage").await;
    apply_agent(&agents, "steady", steady_agent()).await;
    let path = webhook_path(&agents, NS, "steady").await;
    assert!(
        is_known(&apiserver.public, &path).await,
        "token never known"
    );
    let tokens_before = token_state(&client, NS, "steady").await;
    let wrong = wrong_token_path(&path);
    let unknown = names::webhook_path(NS, "nobody", &"A".repeat(43));

    let log = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(steady_sender(
                format!("s{i}"),
                apiserver.public.clone(),
                path.clone(),
                log.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let accepted_since = |at: Instant| {
        log.lock()
            .expect("the log")
            .iter()
            .filter(|a| a.started >= at && a.status.is_some_and(|s| (200..300).contains(&s)))
            .count()
    };

    let mut outages = Vec::new();
    let mut recoveries = Vec::new();
    let mut refusals = Vec::new();
    for cycle in 0..cycles {
        let before = Instant::now();
        eventually(Duration::from_secs(30), || async {
            (accepted_since(before) >= 5).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("cycle {cycle}: no steady 2xx before the outage"));

        plane.stop_kube_apiserver().await;
        let down = Instant::now();
        // Bad tokens are refused from the index the whole time, each within the bound.
        while down.elapsed() < outage {
            for (probe, expected) in [(&wrong, 401), (&unknown, 404)] {
                let started = Instant::now();
                let answer = bounded(
                    &apiserver.public,
                    "POST",
                    probe,
                    &[],
                    r#"{"title":"x"}"#,
                    ANSWER_BOUND,
                )
                .await;
                refusals.push((expected, answer.map(|a| a.status), started.elapsed()));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // The outage ends when the kube-apiserver is started: it may serve requests
        // before its own readiness is reported.
        let restarting = Instant::now();
        outages.push((down, restarting));
        plane
            .start_kube_apiserver(Duration::from_secs(120))
            .await
            .expect("the kube-apiserver starts again");
        let up = Instant::now();
        let recovered = eventually(Duration::from_secs(30), || async {
            (accepted_since(up) >= 1).then_some(())
        })
        .await;
        assert!(
            recovered.is_some(),
            "cycle {cycle}: no webhook succeeded within 30 s of the kube-apiserver's return; \
             apiserver log: {}",
            apiserver.process.log.display()
        );
        recoveries.push(up.elapsed());
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(60), sender)
            .await
            .expect("the senders finish their last key")
            .expect("a sender panicked");
    }

    let attempts = log.lock().expect("the log").clone();
    // During each outage (an attempt that started after the stop and ended before the
    // kube-apiserver was started again), every answer is a 503 with Retry-After within
    // the bound.
    let during: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| {
            outages
                .iter()
                .any(|(down, up)| a.started >= *down && a.started + a.took <= *up)
        })
        .collect();
    assert!(during.len() >= 10, "too few attempts during the outages");
    let wrong_answers: Vec<_> = during
        .iter()
        .filter(|a| a.status != Some(503) || !a.retry_after || a.took > ANSWER_BOUND)
        .collect();
    assert!(
        wrong_answers.is_empty(),
        "{} of {} answers during the outage were not a prompt 503 with Retry-After: {:?}",
        wrong_answers.len(),
        during.len(),
        &wrong_answers[..wrong_answers.len().min(5)]
    );
    // No 500 and no hang at any time, the restarts included.
    let bad: Vec<_> = attempts
        .iter()
        .filter(|a| {
            a.status.is_none()
                || a.status == Some(500)
                || a.status.is_some_and(|s| (400..500).contains(&s))
        })
        .collect();
    let when = |a: &Attempt| {
        outages
            .iter()
            .map(|(down, up)| {
                format!(
                    "{:+.1}s after the stop, {:+.1}s after the start",
                    a.started.duration_since(*down).as_secs_f64()
                        - down.duration_since(a.started).as_secs_f64(),
                    a.started.duration_since(*up).as_secs_f64()
                        - up.duration_since(a.started).as_secs_f64()
                )
            })
            .collect::<Vec<_>>()
    };
    assert!(
        bad.is_empty(),
        "{} answers were a hang, a 500 or a refusal: {:?}",
        bad.len(),
        bad.iter()
            .take(5)
            .map(|a| (a.error.as_deref().unwrap_or("no error body"), a, when(a)))
            .collect::<Vec<_>>()
    );
    let wrong_refusals: Vec<_> = refusals
        .iter()
        .filter(|(expected, status, took)| *status != Some(*expected) || *took > ANSWER_BOUND)
        .collect();
    assert!(
        wrong_refusals.is_empty(),
        "bad tokens were not refused promptly during the outage: {wrong_refusals:?}"
    );

    // Every 2xx has its Session, and no key has two.
    let sessions: Vec<Session> = Api::<Session>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await
        .expect("the Sessions list")
        .items;
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for session in &sessions {
        if let Some(key) = session
            .spec
            .trigger
            .as_ref()
            .and_then(|t| t.idempotency_key.clone())
        {
            by_key.entry(key).or_default().push(session.name_any());
        }
    }
    let doubled: Vec<_> = by_key.iter().filter(|(_, names)| names.len() > 1).collect();
    assert!(doubled.is_empty(), "keys with two Sessions: {doubled:?}");
    let answered: BTreeSet<(String, String)> = attempts
        .iter()
        .filter(|a| a.status.is_some_and(|s| (200..300).contains(&s)))
        .map(|a| {
            (
                a.key.clone(),
                a.session.clone().expect("a 2xx names its Session"),
            )
        })
        .collect();
    for (key, session) in &answered {
        assert_eq!(
            by_key.get(key).map(Vec::as_slice),
            Some(std::slice::from_ref(session)),
            "the 2xx of key {key} named {session}, which is not stored"
        );
    }
    // Every key the senders began ended in a 2xx.
    let begun: BTreeSet<&str> = attempts.iter().map(|a| a.key.as_str()).collect();
    let answered_keys: BTreeSet<&str> = answered.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(begun, answered_keys, "keys left without a 2xx");

    // Nothing was restarted, and the operator kept the token.
    assert!(
        operator.process.wait_exit(Duration::ZERO).await.is_none(),
        "the operator exited: {}",
        operator.process.log.display()
    );
    assert!(
        apiserver.process.wait_exit(Duration::ZERO).await.is_none(),
        "the apiserver exited: {}",
        apiserver.process.log.display()
    );
    // Give the operator time to act on anything it missed before judging the token.
    operator.settled_after("agent", 0.0).await;
    assert_eq!(
        token_state(&client, NS, "steady").await,
        tokens_before,
        "the token Secret or the webhook URL changed"
    );
    let slowest = during.iter().map(|a| a.took).max().unwrap_or_default();
    let slowest_overall = attempts.iter().map(|a| a.took).max().unwrap_or_default();
    println!(
        "outage: {cycles} x {outage:?}; {} attempts, {} during outages (slowest answer {slowest:?}, \
         {slowest_overall:?} over the whole run), {} keys accepted, {} Sessions; back to 2xx after {recoveries:?}",
        attempts.len(),
        during.len(),
        answered.len(),
        sessions.len()
    );
    plane.stop().await;
}

#[tokio::test]
async fn a_killed_leader_is_replaced_within_the_lease_and_its_successor_acts() {
    const FIRST: &str = "https://first-leader.example.test/";
    const SECOND: &str = "https://second-leader.example.test/";
    const LEASE: Duration = Duration::from_secs(4);
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let (first, second) = elected_pair(cluster, ns.name(), "4s", FIRST, SECOND).await;
    let second_pid = format!("-{}", second.pid());
    apply_agent(&agents, "before", steady_agent()).await;
    let url = |name: &'static str| {
        let agents = agents.clone();
        async move { agents.get(name).await.ok()?.status?.webhook_url }
    };
    eventually(BUDGET, || async {
        url("before").await.filter(|u| u.starts_with(FIRST))
    })
    .await
    .expect("the leader serves the first Agent");
    assert_eq!(second.writes("agent").await, 0.0, "the standby wrote");

    // SIGKILL: no step-down, the lease stays held until it expires.
    first.process.signal("KILL");
    let killed = Instant::now();
    eventually(LEASE + Duration::from_secs(15), || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&second_pid))
    })
    .await
    .expect("the standby takes over from a killed leader");
    let takeover = killed.elapsed();
    assert!(
        takeover <= LEASE + Duration::from_secs(5),
        "takeover took {takeover:?} with a {LEASE:?} lease"
    );

    // Work that arrives after the takeover is done by the new leader.
    apply_agent(&agents, "after", steady_agent()).await;
    let done = eventually(BUDGET, || async {
        url("after").await.filter(|u| u.starts_with(SECOND))
    })
    .await;
    assert!(
        done.is_some(),
        "the new leader did not serve an Agent created after the takeover: {}",
        second.log_text()
    );
    let secret = Api::<Secret>::namespaced(cluster.client().await, ns.name())
        .get(&names::webhook_secret_name("after"))
        .await
        .expect("the new Agent's token Secret");
    assert!(secret.data.is_some_and(|d| !d.is_empty()));
    assert!(second.writes("agent").await >= 2.0);
    println!("leader failover: SIGKILL to takeover {takeover:?} (lease {LEASE:?})");
}

/// How a slow client misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Slowness {
    /// Connects and sends nothing.
    Silent,
    /// Sends half a request line and stops.
    HalfLine,
    /// Sends whole headers, then the body one byte per second.
    Trickle,
}

/// What happened to one slow connection.
#[derive(Debug)]
struct SlowOutcome {
    kind: Slowness,
    /// From the moment the client finished what it sends at once to the server's close;
    /// `None` when the server never closed it within the test's patience.
    closed_after: Option<Duration>,
    /// The status the server answered before closing, if any.
    status: Option<u16>,
}

/// Opens one slow connection of `kind` and waits (at most `patience`) until the server
/// closes it.
async fn slow_client(
    address: String,
    path: String,
    kind: Slowness,
    patience: Duration,
) -> SlowOutcome {
    let mut stream = TcpStream::connect(&address).await.expect("connects");
    match kind {
        Slowness::Silent => {}
        Slowness::HalfLine => {
            let half = format!("POST {path} HT");
            let _ = stream.write_all(half.as_bytes()).await;
        }
        Slowness::Trickle => {
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n{{"
            );
            let _ = stream.write_all(head.as_bytes()).await;
        }
    }
    let sent = Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let closed = loop {
        if sent.elapsed() > patience {
            break false;
        }
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => break true,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            },
            _ = tick.tick(), if kind == Slowness::Trickle => {
                if writer.write_all(b" ").await.is_err() {
                    break true;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    let text = String::from_utf8_lossy(&received);
    SlowOutcome {
        kind,
        closed_after: closed.then(|| sent.elapsed()),
        status: text.split_whitespace().nth(1).and_then(|s| s.parse().ok()),
    }
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn slow_clients_are_cut_off_by_their_timeouts_while_webhooks_go_through() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    /// The door's body read timeout (not a flag).
    const BODY_TIMEOUT: Duration = Duration::from_secs(30);
    const SLACK: Duration = Duration::from_secs(5);
    let slow = env_number("HOOKRUN_SLOW_CLIENTS", 500) as usize;
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    let door = Door::start_with_args(
        cluster,
        &ns,
        &cluster.kubeconfig_path(),
        &["--header-read-timeout", "2s"],
    )
    .await;
    apply_agent(&agents, "busy", steady_agent()).await;
    let path = webhook_path(&agents, ns.name(), "busy").await;
    door.wait_until_known(&path).await;
    let pid = door.apiserver.pid();
    let fds_before = open_fds(pid);

    let kinds = [Slowness::Silent, Slowness::HalfLine, Slowness::Trickle];
    let attack: Vec<_> = (0..slow)
        .map(|i| {
            tokio::spawn(slow_client(
                door.public.clone(),
                path.clone(),
                kinds[i % kinds.len()],
                BODY_TIMEOUT + HEADER_TIMEOUT + SLACK * 4,
            ))
        })
        .collect();
    // Once the attack's connections are open, a normal client sends webhooks.
    eventually(BUDGET, || async {
        (open_fds(pid) >= fds_before + slow * 9 / 10).then_some(())
    })
    .await
    .expect("the slow connections are open");
    let mut latencies = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        let key = format!("normal-{i}");
        let answer = door
            .post(&path, &[("Idempotency-Key", &key)], r#"{"title":"normal"}"#)
            .await;
        latencies.push(started.elapsed());
        assert_eq!(answer.status, 200, "webhook {i} under attack: {answer:?}");
    }

    let mut outcomes = Vec::new();
    for task in attack {
        outcomes.push(task.await.expect("a slow client panicked"));
    }
    let mut late = Vec::new();
    let mut slowest: BTreeMap<Slowness, Duration> = BTreeMap::new();
    for outcome in &outcomes {
        let bound = match outcome.kind {
            Slowness::Silent | Slowness::HalfLine => HEADER_TIMEOUT + SLACK,
            Slowness::Trickle => BODY_TIMEOUT + SLACK,
        };
        match outcome.closed_after {
            Some(after) if after <= bound => {
                let entry = slowest.entry(outcome.kind).or_default();
                *entry = (*entry).max(after);
            }
            _ => late.push(outcome),
        }
    }
    assert!(
        late.is_empty(),
        "{} of {slow} slow connections were not closed by their timeout: {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
    // A trickled body is answered 408 before its connection closes.
    let trickle_statuses: BTreeSet<Option<u16>> = outcomes
        .iter()
        .filter(|o| o.kind == Slowness::Trickle)
        .map(|o| o.status)
        .collect();
    assert_eq!(trickle_statuses, BTreeSet::from([Some(408)]));
    // The server holds nothing of them afterwards.
    eventually(BUDGET, || async {
        (open_fds(pid) <= fds_before + 5).then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the apiserver still holds {} fds (had {fds_before})",
            open_fds(pid)
        )
    });
    latencies.sort();
    println!(
        "slow clients: {slow} connections; closed after at most {slowest:?}; normal webhooks \
         under attack: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

/// `VmRSS` and `VmHWM` (peak) of `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(f64::NAN, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A finished Session near every storage budget: title, env and payload just under their
/// defaults, and a status with an answer and a list of events.
fn big_session(agent: &str, i: usize) -> (Session, serde_json::Value) {
    let title = format!(
        "{i} {}",
        "t".repeat(hookrun_crds::budget::DEFAULT_TITLE_BYTES - 1024)
    );
    let payload = format!(
        r#"{{"n":{i},"text":"{}"}}"#,
        "p".repeat(hookrun_crds::budget::DEFAULT_PAYLOAD_BYTES - 2048)
    );
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "hookrun.dev/v1alpha1",
        "kind": "Session",
        "metadata": {
            "name": format!("{agent}-wh-{i:08x}"),
            "labels": {names::AGENT_LABEL: agent},
        },
        "spec": {
            "agent": agent,
            "title": title,
            "env": [{"name": "BIG", "value": "e".repeat(hookrun_crds::budget::DEFAULT_ENV_BYTES - 1024)}],
            "trigger": {
                "source": "webhook",
                "idempotencyKey": format!("history-{i}"),
                "payloadDigest": format!("sha256:{}", "0".repeat(64)),
                "payload": payload,
            },
        },
    }))
    .expect("a valid Session");
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let events: Vec<_> = (0..8)
        .map(|e| json!({"type": "agent.message", "content": format!("{e} {}", "c".repeat(2000)), "timestamp": now}))
        .collect();
    let status = json!({"status": {
        "phase": "Complete",
        "startTime": now,
        "completionTime": now,
        "response": "r".repeat(16 * 1024),
        "events": events,
    }});
    (session, status)
}

#[tokio::test]
async fn both_binaries_restart_over_a_big_history_within_a_minute_and_a_memory_ceiling() {
    const NS: &str = "history";
    const AGENT: &str = "historian";
    let count = env_number("HOOKRUN_HISTORY_SESSIONS", 2000) as usize;
    // Measured (debug build, 2,000 Sessions of 125 KiB): the apiserver 58 MiB after
    // ready (peak 72; 285 MiB when a relist was buffered whole), the operator 160 MiB
    // (peak 273). The index keeps a small entry per Session and a relist reads pages of
    // 50. The ceilings leave about 40 % headroom over those figures.
    let apiserver_ceiling_mib = env_number("HOOKRUN_HISTORY_APISERVER_MIB", 100) as f64;
    let operator_ceiling_mib = env_number("HOOKRUN_HISTORY_OPERATOR_MIB", 224) as f64;
    let (mut plane, client) = own_control_plane("history", NS).await;
    let _cleanup = RemoveOnDrop(plane.state_dir().to_owned());
    let kubeconfig = plane.kubeconfig_path();
    let agents: Api<Agent> = Api::namespaced(client.clone(), NS);
    let sessions: Api<Session> = Api::namespaced(client.clone(), NS);
    apply_agent(&agents, AGENT, steady_agent()).await;

    let started = Instant::now();
    let sessions_ref = &sessions;
    futures::stream::iter(0..count)
        .for_each_concurrent(8, |i| async move {
            let (session, status) = big_session(AGENT, i);
            let name = session.name_any();
            sessions_ref
                .create(&PostParams::default(), &session)
                .await
                .unwrap_or_else(|e| panic!("Session {i}: {e}"));
            sessions_ref
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap_or_else(|e| panic!("status of Session {i}: {e}"));
        })
        .await;
    let bytes = serde_json::to_vec(
        &sessions
            .get(&format!("{AGENT}-wh-{:08x}", 0))
            .await
            .expect("one"),
    )
    .map_or(0, |b| b.len());
    println!(
        "history: {count} finished Sessions of {} KiB stored in {:?}",
        bytes / 1024,
        started.elapsed()
    );

    // First start mints the token; then both restart over the history.
    let operator = Operator::start_with(&kubeconfig, NS, "history", &[]).await;
    let apiserver = ApiServer::start(&kubeconfig, NS, "history").await;
    let path = webhook_path(&agents, NS, AGENT).await;
    assert!(is_known(&apiserver.public, &path).await);
    drop(apiserver);
    drop(operator);

    let restarted = Instant::now();
    let operator = Operator::start_with(&kubeconfig, NS, "history-again", &[]).await;
    let apiserver = ApiServer::start(&kubeconfig, NS, "history-again").await;
    let ready = |admin: String| async move {
        eventually(Duration::from_secs(60), || {
            let admin = admin.clone();
            async move { (get(&admin, "/readyz").await.status == 200).then(Instant::now) }
        })
        .await
    };
    let (operator_ready, apiserver_ready) = tokio::join!(
        ready(operator.admin.clone()),
        ready(apiserver.admin.clone())
    );
    let operator_ready = operator_ready.expect("the operator is ready within 60 s") - restarted;
    let apiserver_ready = apiserver_ready.expect("the apiserver is ready within 60 s") - restarted;
    // Still serving: a webhook over the history is accepted.
    let answer = request(
        &apiserver.public,
        "POST",
        &path,
        &[],
        r#"{"title":"after"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Let the operator go through the history once before its memory is read.
    operator.settled_after("session", 0.0).await;
    let (api_rss, api_peak) = memory_mib(apiserver.process.pid());
    let (op_rss, op_peak) = memory_mib(operator.pid());
    println!(
        "history restart: apiserver ready after {apiserver_ready:?}, RSS {api_rss:.1} MiB \
         (peak {api_peak:.1}); operator ready after {operator_ready:?}, RSS {op_rss:.1} MiB \
         (peak {op_peak:.1})"
    );
    assert!(
        api_rss < apiserver_ceiling_mib,
        "apiserver RSS {api_rss:.1} MiB over {apiserver_ceiling_mib} MiB"
    );
    assert!(
        op_rss < operator_ceiling_mib,
        "operator RSS {op_rss:.1} MiB over {operator_ceiling_mib} MiB"
    );
    drop(apiserver);
    drop(operator);
    plane.stop().await;
}
