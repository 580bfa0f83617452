//! hookrun's webhook door beside the closest peer and a bare server (`make bench`), on
//! one local control plane, with one load generator and the same settings:
//!
//! - **hookrun**: the release `hookrun-apiserver` with its default flags and log
//!   settings, except a rate limit high enough not to be what is measured (the peer has
//!   none). A valid POST is stored as a Session in the cluster before it is answered. The
//!   operator mints the Agent's token and is then stopped, so nothing turns the stored
//!   Sessions into pods during the runs.
//! - **peer**: Flux's notification-controller (`make peer-tools` builds it from the Go
//!   module proxy; it never ships) with a `generic` Receiver whose target is a
//!   `GitRepository` (only its CRD, with an open schema, is installed). A valid POST reads
//!   the token Secret and patches the target's `requestedAt` annotation before it is
//!   answered; a wrong token is an unknown path (404).
//! - **bare**: the axum hello-world of the webhook bench, in a process of its own so that
//!   its memory can be read.
//!
//! Each path is measured against the three servers in turn, rotating the order every
//! round; the table holds the median of the rounds. It is written to
//! `target/bench/report.md` (replacing this bench's section, keeping the rest: see
//! `loadgen::write_report_section`).
//!
//! `HOOKRUN_BENCH_SECONDS` (5), `HOOKRUN_BENCH_CONNECTIONS` (32) and
//! `HOOKRUN_BENCH_ROUNDS` (3) size the runs.

#[path = "../../apiserver/benches/support/loadgen.rs"]
mod loadgen;

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use hookrun_crds::Agent;
use hookrun_tests::{
    Cluster, TestNamespace, apply_agent, cluster,
    control_plane::{default_tools_bin, workspace_root},
    door::{self, Operator, Process},
    eventually, kubectl,
};
use kube::Api;
use loadgen::{Run, env_number, hello_world, median, post_script, write_report_section, wrk};
use serde_json::json;

/// Set in the environment of the copy of this binary that serves the bare hello-world.
const BARE_SERVER_ENV: &str = "HOOKRUN_BENCH_BARE_SERVER";

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    if std::env::var_os(BARE_SERVER_ENV).is_some() {
        runtime.block_on(serve_bare());
    } else {
        runtime.block_on(bench());
    }
}

/// Serves the hello-world on a loopback port and prints the address on stdout.
async fn serve_bare() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port");
    println!("{}", listener.local_addr().expect("an address"));
    axum::serve(listener, hello_world())
        .await
        .expect("the bare server serves");
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_bare() -> (Killed, String) {
    let mut child = Command::new(std::env::current_exe().expect("this binary's path"))
        .env(BARE_SERVER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the bare server starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("its stdout"))
        .read_line(&mut line)
        .expect("the bare server prints its address");
    (Killed(child), line.trim().to_owned())
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn must(output: std::process::Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The GitRepository CRD with an open schema: the Receiver's target kind, without
/// source-controller.
const GIT_REPOSITORY_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gitrepositories.source.toolkit.fluxcd.io}
spec:
  group: source.toolkit.fluxcd.io
  names: {kind: GitRepository, listKind: GitRepositoryList, plural: gitrepositories, singular: gitrepository}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

/// The running peer and its Receiver's hook path.
struct Peer {
    process: Killed,
    address: String,
    hook_path: String,
}

async fn start_peer(cluster: &Cluster, ns: &TestNamespace) -> Peer {
    let tools = default_tools_bin();
    let binary = tools.join("notification-controller");
    assert!(
        binary.exists(),
        "{} is missing: run `make peer-tools`",
        binary.display()
    );
    let kubeconfig = cluster.kubeconfig_path();
    // kubectl reads a symlink to a folder as a file: resolve the cache link first.
    let crd_dir = std::fs::canonicalize(tools.join("notification-controller-crd"))
        .expect("the peer's CRD folder (make peer-tools)");
    must(
        kubectl(
            &kubeconfig,
            &[
                "apply",
                "--server-side",
                "-f",
                &crd_dir.display().to_string(),
            ],
            None,
        ),
        "the notification-controller CRDs apply",
    );
    must(
        kubectl(&kubeconfig, &["apply", "-f", "-"], Some(GIT_REPOSITORY_CRD)),
        "the GitRepository CRD applies",
    );
    must(
        kubectl(
            &kubeconfig,
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd/receivers.notification.toolkit.fluxcd.io",
                "crd/alerts.notification.toolkit.fluxcd.io",
                "crd/providers.notification.toolkit.fluxcd.io",
                "crd/gitrepositories.source.toolkit.fluxcd.io",
            ],
            None,
        ),
        "the CRDs are Established",
    );

    let receiver_port = free_port();
    let log = log_path("notification-controller");
    let file = std::fs::File::create(&log).expect("the peer's log file");
    let child = Command::new(&binary)
        .args([
            format!("--receiverAddr=127.0.0.1:{receiver_port}"),
            format!("--events-addr=127.0.0.1:{}", free_port()),
            format!("--metrics-addr=127.0.0.1:{}", free_port()),
            format!("--health-addr=127.0.0.1:{}", free_port()),
            "--watch-all-namespaces=true".into(),
            "--enable-leader-election=false".into(),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUNTIME_NAMESPACE", ns.name())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("the log file"))
        .stderr(file)
        .spawn()
        .expect("notification-controller starts");
    let process = Killed(child);

    let token = hex::encode(rand::random::<[u8; 32]>());
    let objects = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: peer-token}}
stringData: {{token: {token}}}
---
apiVersion: source.toolkit.fluxcd.io/v1
kind: GitRepository
metadata: {{name: target}}
spec: {{url: https://example.invalid/repo, interval: 1h}}
---
apiVersion: notification.toolkit.fluxcd.io/v1
kind: Receiver
metadata: {{name: peer}}
spec:
  type: generic
  secretRef: {{name: peer-token}}
  resources:
  - {{apiVersion: source.toolkit.fluxcd.io/v1, kind: GitRepository, name: target}}
"
    );
    must(
        ns.kubectl(&["apply", "-f", "-"], Some(&objects)),
        "the Receiver and its Secret apply",
    );
    let hook_path = eventually(Duration::from_secs(60), || async {
        let out = ns.kubectl(
            &[
                "get",
                "receiver",
                "peer",
                "-o",
                "jsonpath={.status.webhookPath}",
            ],
            None,
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        path.starts_with("/hook/").then_some(path)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the Receiver got no webhookPath in 60s; the peer's log is {}",
            log.display()
        )
    });
    let address = format!("127.0.0.1:{receiver_port}");
    let ready = eventually(Duration::from_secs(30), || async {
        let answer = door::request(&address, "POST", &hook_path, &[], "{}").await;
        (answer.status == 200).then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the peer never accepted a valid POST; its log is {}",
        log.display()
    );
    Peer {
        process,
        address,
        hook_path,
    }
}

fn log_path(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/test-clusters");
    std::fs::create_dir_all(&dir).expect("the log directory");
    dir.join(format!("{name}-bench-{}.log", std::process::id()))
}

/// hookrun's apiserver and the webhook paths of its two Agents, the operator stopped.
struct Hookrun {
    process: Process,
    public: String,
    /// `bench`: a webhook trigger with no signature scheme.
    plain: String,
    /// `bench-linear`: Linear signatures required.
    linear: String,
}

/// The Agents' spec: every accepted POST of the runs is stored, so the default cap on
/// stored Sessions is raised out of the way.
fn bench_agent(webhook: serde_json::Value) -> serde_json::Value {
    json!({"spec": {
        "models": ["anthropic/claude-sonnet-4-6"],
        "triggers": [{"webhook": webhook}],
        "session": {"maxStoredSessions": 100000},
    }})
}

async fn start_hookrun(cluster: &Cluster, ns: &TestNamespace) -> Hookrun {
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(&agents, "bench", bench_agent(json!({}))).await;
    apply_agent(
        &agents,
        "bench-linear",
        bench_agent(json!({"linearSignatureSecret": "bench-linear-signing-secret"})),
    )
    .await;
    let (plain, linear) = {
        let _operator = Operator::start(cluster, ns.name(), &[]).await;
        (
            door::webhook_path(&agents, ns.name(), "bench").await,
            door::webhook_path(&agents, ns.name(), "bench-linear").await,
        )
    };
    let apiserver = start_apiserver(cluster, ns.name(), "peer-bench");
    let public = eventually(door::BUDGET, || async {
        door::logged_field(&apiserver.log_text(), "public")
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the apiserver logged no address: {}",
            apiserver.log.display()
        )
    });
    for path in [&plain, &linear] {
        assert!(
            door::is_known(&public, path).await,
            "the apiserver never accepted the token; log: {}",
            apiserver.log.display()
        );
    }
    Hookrun {
        process: apiserver,
        public,
        plain,
        linear,
    }
}

/// `hookrun-apiserver` on `namespace` with its default flags and logging, the rate limit
/// raised out of the way (the peer has none).
fn start_apiserver(cluster: &Cluster, namespace: &str, tag: &str) -> Process {
    Process::start(
        cluster,
        "hookrun-apiserver",
        tag,
        &[
            "--listen",
            "127.0.0.1:0",
            "--runner-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--namespaces",
            namespace,
            "--rate-limit-burst",
            "1000000000",
            "--rate-limit-per-second",
            "1000000000",
        ],
    )
}

#[derive(Clone, Copy)]
enum Server {
    Hookrun,
    Peer,
    Bare,
}

/// One path measured on the three servers: the URL and wrk script for each, none where
/// a server has no such path (the peer has no ping and no Linear signatures).
struct Case {
    name: &'static str,
    targets: [Option<(String, Option<String>)>; 3],
}

/// Medians over the rounds, per server in [`Server`] order.
struct Medians([Option<Run>; 3]);

impl Medians {
    fn values(&self, figure: impl Fn(&Run) -> f64) -> [Option<f64>; 3] {
        self.0.map(|run| run.as_ref().map(&figure))
    }

    fn ok(&self) -> [bool; 3] {
        self.0.map(|run| run.is_none_or(|r| r.statuses_ok))
    }
}

async fn measure(case: &Case, rounds: u64, seconds: u64, connections: u64) -> Medians {
    let order = [Server::Hookrun, Server::Peer, Server::Bare];
    let mut runs: [Vec<Run>; 3] = Default::default();
    for round in 0..rounds {
        for step in 0..3 {
            let server = order[(round as usize + step) % 3];
            let Some((url, script)) = case.targets[server as usize].clone() else {
                continue;
            };
            let run = tokio::task::spawn_blocking(move || {
                wrk(&url, script.as_deref(), seconds, connections)
            })
            .await
            .expect("wrk");
            println!(
                "  {:<34} {:<8} {:>8.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms{}",
                case.name,
                ["hookrun", "peer", "bare"][server as usize],
                run.rps,
                run.p50_ms,
                run.p99_ms,
                if run.statuses_ok {
                    ""
                } else {
                    "  [unexpected answers or socket errors]"
                }
            );
            runs[server as usize].push(run);
        }
    }
    Medians(runs.map(|runs| {
        (!runs.is_empty()).then(|| Run {
            rps: median(runs.iter().map(|r| r.rps).collect()),
            p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
            statuses_ok: runs.iter().all(|r| r.statuses_ok),
        })
    }))
}

fn row(name: &str, values: [Option<f64>; 3], decimals: usize, flags: [bool; 3]) -> String {
    let cell = |i: usize| match values[i] {
        Some(v) => format!("{v:.decimals$}{}", if flags[i] { "" } else { " (!)" }),
        None => "—".to_owned(),
    };
    let ratio = |i: usize| match (values[i], values[2]) {
        (Some(v), Some(bare)) => format!("{:.2}×", v / bare),
        _ => "—".to_owned(),
    };
    format!(
        "| {name} | {} | {} | {} | {} | {} |\n",
        cell(0),
        cell(1),
        cell(2),
        ratio(0),
        ratio(1),
    )
}

/// Latencies in ms, sorted.
fn percentile_ms(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Accepted webhook → Session stored, beside the same Session created directly: `count`
/// of each, `in_flight` at a time, in alternating blocks so that both see the same
/// cluster. The direct create sends a copy of a Session the door stored (same size),
/// through a kube client on the same kube-apiserver; the door's requests come over a new
/// loopback connection each. Returns sorted latencies in ms: (door, direct).
async fn stored_latencies(
    cluster: &Cluster,
    ns: &TestNamespace,
    public: &str,
    path: &str,
    count: usize,
    in_flight: usize,
) -> (Vec<f64>, Vec<f64>) {
    use futures::{StreamExt, stream};
    use hookrun_crds::Session;
    use kube::api::{ListParams, PostParams};

    let sessions: Api<Session> = Api::namespaced(cluster.client().await, ns.name());
    let sample = sessions
        .list(&ListParams::default().limit(1))
        .await
        .expect("the Sessions are listed")
        .items
        .into_iter()
        .next()
        .expect("the runs stored Sessions");
    let block = 100.min(count).max(1);
    let (mut door_ms, mut direct_ms) = (Vec::new(), Vec::new());
    let mut made = 0;
    while made < count {
        let n = block.min(count - made);
        let door_block = stream::iter(0..n)
            .map(|_| async {
                let started = std::time::Instant::now();
                let answer =
                    door::request(public, "POST", path, &[], "{\"title\":\"bench\"}").await;
                assert_eq!(answer.status, 200, "an accepted webhook: {:?}", answer.json);
                started.elapsed().as_secs_f64() * 1000.0
            })
            .buffer_unordered(in_flight)
            .collect::<Vec<_>>();
        let direct_block = stream::iter(0..n)
            .map(|i| {
                let sessions = sessions.clone();
                let mut copy = Session::new(&format!("direct-{}", made + i), sample.spec.clone());
                copy.metadata.labels = sample.metadata.labels.clone();
                async move {
                    let started = std::time::Instant::now();
                    sessions
                        .create(&PostParams::default(), &copy)
                        .await
                        .expect("a direct Session create");
                    started.elapsed().as_secs_f64() * 1000.0
                }
            })
            .buffer_unordered(in_flight)
            .collect::<Vec<_>>();
        if (made / block) % 2 == 0 {
            door_ms.extend(door_block.await);
            direct_ms.extend(direct_block.await);
        } else {
            direct_ms.extend(direct_block.await);
            door_ms.extend(door_block.await);
        }
        made += n;
    }
    door_ms.sort_by(f64::total_cmp);
    direct_ms.sort_by(f64::total_cmp);
    (door_ms, direct_ms)
}

/// A fresh `hookrun-apiserver` on a namespace of `count` Agents (tokens minted by the
/// operator, which is then stopped): its resident memory once it accepts every token,
/// and how long indexing took from its start.
async fn rss_with_agents(cluster: &Cluster, count: usize) -> (f64, Duration) {
    use futures::{StreamExt, TryStreamExt, stream};

    let ns = TestNamespace::new(cluster).await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    let paths = {
        let _operator = Operator::start(cluster, ns.name(), &[]).await;
        stream::iter(0..count)
            .map(|i| {
                let agents = agents.clone();
                async move {
                    apply_agent(&agents, &format!("agent-{i:04}"), bench_agent(json!({}))).await;
                    Ok::<_, ()>(())
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .expect("every Agent is applied");
        let ns_name = ns.name().to_owned();
        let minted = eventually(Duration::from_secs(300), || async {
            let list = agents.list(&Default::default()).await.ok()?;
            let paths: Vec<String> = list
                .items
                .iter()
                .filter_map(|a| {
                    let url = a.status.as_ref()?.webhook_url.as_ref()?;
                    let token = url.rsplit('/').next()?;
                    Some(hookrun_crds::names::webhook_path(
                        &ns_name,
                        a.metadata.name.as_deref()?,
                        token,
                    ))
                })
                .collect();
            (paths.len() == count).then_some(paths)
        })
        .await;
        minted.unwrap_or_else(|| panic!("{count} Agents did not all get a URL within 300 s"))
    };
    let started = std::time::Instant::now();
    let apiserver = start_apiserver(cluster, ns.name(), "peer-bench-agents");
    let public = eventually(door::BUDGET, || async {
        door::logged_field(&apiserver.log_text(), "public")
    })
    .await
    .expect("the apiserver logs its address");
    for path in &paths {
        assert!(
            door::is_known(&public, path).await,
            "the apiserver never accepted {path}; log: {}",
            apiserver.log.display()
        );
    }
    let indexed = started.elapsed();
    // Settle: what start-up allocated and freed is returned before the figure is read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    (rss_mib(apiserver.pid()), indexed)
}

async fn bench() {
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 5);
    let connections = env_number("HOOKRUN_BENCH_CONNECTIONS", 32);
    let rounds = env_number("HOOKRUN_BENCH_ROUNDS", 3).max(1);
    let stored_count = env_number("HOOKRUN_BENCH_STORED", 1000) as usize;
    let agents_count = env_number("HOOKRUN_BENCH_AGENTS", 1000) as usize;

    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let (bare, bare_addr) = start_bare();
    let hookrun = start_hookrun(cluster, &ns).await;
    let peer = start_peer(cluster, &ns).await;
    let pids = [hookrun.process.pid(), peer.process.0.id(), bare.0.id()];
    // Settle before the idle figure: start-up's transient allocations are returned.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = pids.map(rss_mib);

    let wrong_token = "A".repeat(43);
    let wrong_hook = format!("/hook/{}", "0".repeat(64));
    let body = "{\"title\":\"bench\"}";
    let refused = post_script(body, &[], true);
    let accepted = post_script(body, &[], false);
    let kib_body = format!(
        "{{\"webhookTimestamp\":0,\"data\":\"{}\"}}",
        "x".repeat(1000)
    );
    let wrong_signature = "0".repeat(64);
    let linear_refused = post_script(&kib_body, &[("Linear-Signature", &wrong_signature)], true);
    let bare_kib = post_script(&kib_body, &[("Linear-Signature", &wrong_signature)], false);
    let hookrun_url = |path: &str| format!("http://{}{path}", hookrun.public);
    let hookrun_bad = hookrun_url(&format!(
        "{}/{wrong_token}",
        hookrun.plain.rsplit_once('/').map_or("", |(dir, _)| dir)
    ));
    let peer_url = |path: &str| format!("http://{}{path}", peer.address);
    let bare_url = format!("http://{bare_addr}/");
    let cases = [
        Case {
            name: "bad-token POST",
            targets: [
                Some((hookrun_bad, Some(refused.clone()))),
                Some((peer_url(&wrong_hook), Some(refused.clone()))),
                Some((bare_url.clone(), Some(accepted.clone()))),
            ],
        },
        Case {
            name: "valid GET ping",
            targets: [
                Some((hookrun_url(&hookrun.plain), None)),
                None,
                Some((bare_url.clone(), None)),
            ],
        },
        Case {
            name: "1 KiB POST, wrong Linear signature",
            targets: [
                Some((hookrun_url(&hookrun.linear), Some(linear_refused))),
                None,
                Some((bare_url.clone(), Some(bare_kib))),
            ],
        },
        Case {
            name: "valid POST",
            targets: [
                Some((hookrun_url(&hookrun.plain), Some(accepted.clone()))),
                Some((peer_url(&peer.hook_path), Some(accepted.clone()))),
                Some((bare_url.clone(), Some(accepted.clone()))),
            ],
        },
    ];

    println!(
        "hookrun, peer (notification-controller) and bare: wrk -t2 -c{connections} -d{seconds}s \
         on 127.0.0.1, {rounds} rounds, order rotated each round"
    );
    let mut results = Vec::new();
    for case in &cases {
        results.push(measure(case, rounds, seconds, connections).await);
    }
    let loaded = pids.map(rss_mib);
    let [bad, ping, linear, valid] = [&results[0], &results[1], &results[2], &results[3]];

    println!(
        "accepted webhook → Session stored, beside a direct Session create: {stored_count} each"
    );
    let (door_ms, direct_ms) = stored_latencies(
        cluster,
        &ns,
        &hookrun.public,
        &hookrun.plain,
        stored_count,
        4,
    )
    .await;
    println!("a fresh apiserver over {agents_count} Agents");
    let (agents_mib, indexed) = rss_with_agents(cluster, agents_count).await;

    let mut section = format!(
        "## hookrun beside the peer\n\n\
         wrk -t2 -c{connections} -d{seconds}s on 127.0.0.1, median of {rounds} rounds, servers \
         alternated (order rotated each round); one local control plane. hookrun: \
         `hookrun-apiserver` with default flags and logging (rate limit raised out of the way); \
         a valid POST is a Session stored in the cluster. peer: Flux notification-controller \
         (`make peer-tools`), `generic` Receiver; a valid POST reads the token Secret and \
         patches one GitRepository. bare: axum hello-world, answering 200 to every request. \
         Bad token: hookrun 401, peer 404. The peer has no ping and no signature schemes \
         (—). Goals (hookrun/bare): bad token ≥ 0.9×, ping ≥ 0.8×, wrong Linear signature \
         ≥ 0.7×.\n\n\
         | path | hookrun | peer | bare | hookrun/bare | peer/bare |\n\
         |---|---|---|---|---|---|\n"
    );
    for (name, m) in [
        ("bad-token POST", bad),
        ("valid GET ping", ping),
        ("1 KiB POST, wrong Linear signature", linear),
        ("valid POST", valid),
    ] {
        section.push_str(&row(
            &format!("{name}, req/s"),
            m.values(|r| r.rps),
            0,
            m.ok(),
        ));
        section.push_str(&row(
            &format!("{name}, p99 ms"),
            m.values(|r| r.p99_ms),
            2,
            m.ok(),
        ));
    }
    section.push_str(&row(
        "valid POST, p50 ms",
        valid.values(|r| r.p50_ms),
        2,
        valid.ok(),
    ));
    section.push_str(&row("RSS idle, MiB", idle.map(Some), 1, [true; 3]));
    section.push_str(&row(
        "RSS after the runs, MiB",
        loaded.map(Some),
        1,
        [true; 3],
    ));
    let (door_p50, door_p99) = (percentile_ms(&door_ms, 0.5), percentile_ms(&door_ms, 0.99));
    let (direct_p50, direct_p99) = (
        percentile_ms(&direct_ms, 0.5),
        percentile_ms(&direct_ms, 0.99),
    );
    section.push_str(&format!(
        "\n(!) marks a median over runs where wrk saw unexpected answers or socket errors \
         (timeouts count).\n\n\
         Accepted webhook → Session stored in the cluster, {stored_count} of each, 4 in flight, \
         in alternating blocks of 100: through the door p50 {door_p50:.2} ms, p99 \
         {door_p99:.2} ms; the same Session created directly through a kube client p50 \
         {direct_p50:.2} ms, p99 {direct_p99:.2} ms: the door adds **{:.2} ms at p99** \
         (goal ≤ 5 ms), {:.2} ms at p50.\n\n\
         A fresh `hookrun-apiserver` over {agents_count} Agents with a webhook (default flags): \
         **{agents_mib:.1} MiB** resident once it accepts every token ({:.1} s from start); \
         idle over 2 Agents: {:.1} MiB (goals ≤ 25 MiB / ≤ 15 MiB).\n",
        door_p99 - direct_p99,
        door_p50 - direct_p50,
        indexed.as_secs_f64(),
        idle[0],
    ));
    let path = write_report_section("peer", &section);
    println!("\n{section}\nwritten to {}", path.display());

    // The Receiver carries a finalizer: delete it while its controller runs.
    let _ = ns.kubectl(
        &["delete", "receiver", "peer", "--wait=true", "--timeout=20s"],
        None,
    );
    drop(peer);
    drop(hookrun);
    drop(bare);
}
