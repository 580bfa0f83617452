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
    door::{self, Process},
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

/// hookrun's apiserver with the Agent `bench`'s webhook path, the operator stopped.
async fn start_hookrun(cluster: &Cluster, ns: &TestNamespace) -> (Process, String, String) {
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "bench",
        json!({"spec": {
            "models": ["anthropic/claude-sonnet-4-6"],
            "triggers": [{"webhook": {}}],
            // Every accepted POST of the runs is stored; the default cap would refuse.
            "session": {"maxStoredSessions": 100000},
        }}),
    )
    .await;
    let path = {
        let _operator = Process::start(
            cluster,
            "hookrun-operator",
            ns.name(),
            &[
                "--public-url",
                "https://hooks.bench.example/",
                "--admin-listen",
                "127.0.0.1:0",
                "--namespaces",
                ns.name(),
            ],
        );
        door::webhook_path(&agents, ns.name(), "bench").await
    };
    let apiserver = Process::start(
        cluster,
        "hookrun-apiserver",
        "peer-bench",
        &[
            "--listen",
            "127.0.0.1:0",
            "--runner-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--namespaces",
            ns.name(),
            "--rate-limit-burst",
            "1000000000",
            "--rate-limit-per-second",
            "1000000000",
        ],
    );
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
    assert!(
        door::is_known(&public, &path).await,
        "the apiserver never accepted the token; log: {}",
        apiserver.log.display()
    );
    (apiserver, public, path)
}

#[derive(Clone, Copy)]
enum Server {
    Hookrun,
    Peer,
    Bare,
}

/// One path measured on the three servers: the URL and wrk script for each.
struct Case {
    name: &'static str,
    targets: [(String, Option<String>); 3],
}

/// Medians over the rounds, per server in [`Server`] order.
struct Medians([Run; 3]);

async fn measure(case: &Case, rounds: u64, seconds: u64, connections: u64) -> Medians {
    let order = [Server::Hookrun, Server::Peer, Server::Bare];
    let mut runs: [Vec<Run>; 3] = Default::default();
    for round in 0..rounds {
        for step in 0..3 {
            let server = order[(round as usize + step) % 3];
            let (url, script) = case.targets[server as usize].clone();
            let run = tokio::task::spawn_blocking(move || {
                wrk(&url, script.as_deref(), seconds, connections)
            })
            .await
            .expect("wrk");
            println!(
                "  {:<26} {:<8} {:>8.0} req/s  p50 {:>8.2} ms  p99 {:>8.2} ms{}",
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
    Medians(runs.map(|runs| Run {
        rps: median(runs.iter().map(|r| r.rps).collect()),
        p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        statuses_ok: runs.iter().all(|r| r.statuses_ok),
    }))
}

fn row(name: &str, values: [f64; 3], decimals: usize, flags: [bool; 3]) -> String {
    let cell = |i: usize| {
        let mark = if flags[i] { "" } else { " (!)" };
        format!("{:.decimals$}{mark}", values[i])
    };
    format!(
        "| {name} | {} | {} | {} | {:.2}× | {:.2}× |\n",
        cell(0),
        cell(1),
        cell(2),
        values[0] / values[2],
        values[1] / values[2],
    )
}

async fn bench() {
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 5);
    let connections = env_number("HOOKRUN_BENCH_CONNECTIONS", 32);
    let rounds = env_number("HOOKRUN_BENCH_ROUNDS", 3).max(1);

    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let (bare, bare_addr) = start_bare();
    let (apiserver, public, hookrun_path) = start_hookrun(cluster, &ns).await;
    let peer = start_peer(cluster, &ns).await;
    let pids = [apiserver.pid(), peer.process.0.id(), bare.0.id()];
    let idle = pids.map(rss_mib);

    let wrong_token = "A".repeat(43);
    let wrong_hook = format!("/hook/{}", "0".repeat(64));
    let body = "{\"title\":\"bench\"}";
    let refused = post_script(body, &[], true);
    let accepted = post_script(body, &[], false);
    let hookrun_url = |path: &str| format!("http://{public}{path}");
    let hookrun_bad = hookrun_url(&format!(
        "{}/{wrong_token}",
        hookrun_path.rsplit_once('/').map_or("", |(dir, _)| dir)
    ));
    let peer_url = |path: &str| format!("http://{}{path}", peer.address);
    let bare_url = format!("http://{bare_addr}/");
    let cases = [
        Case {
            name: "bad-token POST",
            targets: [
                (hookrun_bad, Some(refused.clone())),
                (peer_url(&wrong_hook), Some(refused.clone())),
                (bare_url.clone(), Some(accepted.clone())),
            ],
        },
        Case {
            name: "valid POST",
            targets: [
                (hookrun_url(&hookrun_path), Some(accepted.clone())),
                (peer_url(&peer.hook_path), Some(accepted.clone())),
                (bare_url.clone(), Some(accepted.clone())),
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
    let ok = |m: &Medians| m.0.map(|r| r.statuses_ok);
    let [bad, valid] = [&results[0], &results[1]];

    let mut section = format!(
        "## hookrun beside the peer\n\n\
         wrk -t2 -c{connections} -d{seconds}s on 127.0.0.1, median of {rounds} rounds, servers \
         alternated (order rotated each round); one local control plane. hookrun: \
         `hookrun-apiserver` with default flags and logging (rate limit raised out of the way); \
         a valid POST is a Session stored in the cluster. peer: Flux notification-controller \
         (`make peer-tools`), `generic` Receiver; a valid POST reads the token Secret and \
         patches one GitRepository. bare: axum hello-world. Bad token: hookrun 401, peer 404, \
         bare 200.\n\n\
         | path | hookrun | peer | bare | hookrun/bare | peer/bare |\n\
         |---|---|---|---|---|---|\n"
    );
    section.push_str(&row(
        "bad-token POST, req/s",
        bad.0.map(|r| r.rps),
        0,
        ok(bad),
    ));
    section.push_str(&row(
        "bad-token POST p99, ms",
        bad.0.map(|r| r.p99_ms),
        2,
        ok(bad),
    ));
    section.push_str(&row(
        "valid POST, req/s",
        valid.0.map(|r| r.rps),
        0,
        ok(valid),
    ));
    section.push_str(&row(
        "valid POST p50, ms",
        valid.0.map(|r| r.p50_ms),
        2,
        ok(valid),
    ));
    section.push_str(&row(
        "valid POST p99, ms",
        valid.0.map(|r| r.p99_ms),
        2,
        ok(valid),
    ));
    section.push_str(&row("RSS idle, MiB", idle, 1, [true; 3]));
    section.push_str(&row("RSS after the runs, MiB", loaded, 1, [true; 3]));
    section.push_str(
        "\n(!) marks a median over runs where wrk saw unexpected answers or socket errors \
         (timeouts count).\n",
    );
    let path = write_report_section("peer", &section);
    println!("\n{section}\nwritten to {}", path.display());

    // The Receiver carries a finalizer: delete it while its controller runs.
    let _ = ns.kubectl(
        &["delete", "receiver", "peer", "--wait=true", "--timeout=20s"],
        None,
    );
    drop(peer);
    drop(apiserver);
    drop(bare);
}
