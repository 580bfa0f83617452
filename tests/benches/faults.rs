//! Faults under load (`make bench`), on the shared local control plane with the real
//! operator and apiserver (debug or release, whichever profile the bench runs):
//!
//! - **slow clients**: a normal client's webhook latency (4 workers, unique idempotency
//!   keys, each POST stored as a Session) without and then during an attack of
//!   `HOOKRUN_BENCH_SLOW_CLIENTS` (2000) connections that send nothing, half a request
//!   line, or a body at one byte per second, each reopened as soon as the server closes
//!   it. Goal: the p99 under attack within 2× of the p99 without.
//! - **soak**: `HOOKRUN_SOAK_SECONDS` (600; `make bench` passes `SOAK_SECONDS`, 120) of
//!   steady fire-and-forget webhooks, wait-mode webhooks that time out into a 202 and SSE
//!   streams opened and dropped, with Sessions older than 10 s deleted as it goes; the
//!   apiserver's RSS and open file descriptors are read
//!   after the warm-up and at the end, each time with the load paused for a moment. Goal:
//!   RSS growth under 5 %, no descriptor growth.
//!
//! The figures are written to `target/bench/report.md` (replacing this bench's section,
//! keeping the rest); the bench fails after writing them when a goal is missed.

#[path = "../../apiserver/benches/support/loadgen.rs"]
mod loadgen;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hookrun_crds::{Agent, Session};
use hookrun_tests::{
    TestNamespace, apply_agent, cluster,
    door::{ApiServer, Operator, Process, is_known, request, webhook_path},
    eventually,
};
use kube::{Api, ResourceExt};
use loadgen::env_number;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(bench());
}

/// `VmRSS` of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Open file descriptors of `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The `q` quantile of sorted latencies, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[at].as_secs_f64() * 1000.0
}

async fn bench() {
    let cluster = cluster().await;
    let mut section = String::from("## Faults under load\n\n");
    let mut missed = Vec::new();

    let ns = TestNamespace::new(cluster).await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "load",
        json!({"spec": {
            "models": ["anthropic/claude-sonnet-4-6"],
            "triggers": [{"webhook": {}}],
            "session": {"maxStoredSessions": 100000},
        }}),
    )
    .await;
    let _operator = Operator::start(cluster, ns.name(), &[]).await;
    // Default flags but a rate limit that is not what is measured.
    let door = ApiServer::attach(Process::start(
        cluster,
        "hookrun-apiserver",
        ns.name(),
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
            "100000",
            "--rate-limit-per-second",
            "100000",
        ],
    ))
    .await;
    let path = webhook_path(&agents, ns.name(), "load").await;
    assert!(
        is_known(&door.public, &path).await,
        "the token is never known"
    );
    let sessions: Api<Session> = Api::namespaced(cluster.client().await, ns.name());

    slow_clients(&door, &path, &mut section, &mut missed).await;
    let _ = sessions
        .delete_collection(&Default::default(), &Default::default())
        .await;
    soak(&door, &ns, &path, &sessions, &mut section, &mut missed).await;

    let report = loadgen::write_report_section("faults", &section);
    println!("{section}\nwritten to {}", report.display());
    assert!(missed.is_empty(), "goals missed: {missed:?}");
}

/// Latencies of webhooks sent by `workers` clients for `seconds`.
async fn normal_client(
    public: &str,
    path: &str,
    seconds: u64,
    tag: &str,
) -> (Vec<Duration>, usize) {
    let failures = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers = (0..4).map(|w| {
        let (public, path, failures) = (public.to_owned(), path.to_owned(), failures.clone());
        let tag = tag.to_owned();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let key = format!("{tag}-{w}-{n}");
                let started = Instant::now();
                let answer = request(
                    &public,
                    "POST",
                    &path,
                    &[("Idempotency-Key", &key)],
                    r#"{"title":"normal"}"#,
                )
                .await;
                latencies.push(started.elapsed());
                if answer.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        })
    });
    let mut all = Vec::new();
    for worker in futures::future::join_all(workers).await {
        all.extend(worker.expect("a worker panicked"));
    }
    all.sort();
    (all, failures.load(Ordering::Relaxed) as usize)
}

/// Opens connections of one misbehaviour (by `kind`: 0 silent, 1 half a request line, 2 a
/// body at one byte per second) again and again until `stop`.
async fn attacker(address: String, path: String, kind: usize, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        let Ok(mut stream) = TcpStream::connect(&address).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let opening = match kind {
            0 => String::new(),
            1 => format!("POST {path} HT"),
            _ => format!(
                "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
                 Content-Length: 100000\r\n\r\n{{"
            ),
        };
        let _ = stream.write_all(opening.as_bytes()).await;
        let mut buf = [0u8; 1024];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { break },
                _ = tick.tick() => {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    if kind == 2 && stream.write_all(b" ").await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}

async fn slow_clients(
    door: &ApiServer,
    path: &str,
    section: &mut String,
    missed: &mut Vec<String>,
) {
    let slow = env_number("HOOKRUN_BENCH_SLOW_CLIENTS", 2000) as usize;
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 15);
    let pid = door.process.pid();
    // The first Session creates in a namespace that is seconds old take about 2 s on the
    // kube-apiserver's side; both phases are measured after that.
    let _ = normal_client(&door.public, path, 3, "warm").await;
    let (calm, calm_failures) = normal_client(&door.public, path, seconds, "calm").await;

    let fds_before = open_fds(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let attackers: Vec<_> = (0..slow)
        .map(|i| {
            tokio::spawn(attacker(
                door.public.clone(),
                path.to_owned(),
                i % 3,
                stop.clone(),
            ))
        })
        .collect();
    let open = eventually(Duration::from_secs(30), || async {
        (open_fds(pid) >= fds_before + slow * 9 / 10).then_some(())
    })
    .await
    .is_some();
    let held = open_fds(pid).saturating_sub(fds_before);
    let (attacked, attacked_failures) =
        normal_client(&door.public, path, seconds, "attacked").await;
    stop.store(true, Ordering::Release);
    for task in attackers {
        task.abort();
    }

    let (calm_p99, attacked_p99) = (quantile_ms(&calm, 0.99), quantile_ms(&attacked, 0.99));
    let ratio = attacked_p99 / calm_p99;
    section.push_str(&format!(
        "### Slow clients\n\n{slow} slow connections (silent, half a request line, a body at \
         1 byte/s; reopened when closed; {held} held open by the apiserver at once) against \
         the public listener with default timeouts, while 4 normal clients send webhooks \
         for {seconds} s each phase.\n\n\
         | normal client | webhooks | failed | p50 ms | p99 ms |\n|---|---|---|---|---|\n\
         | without attack | {} | {calm_failures} | {:.1} | {calm_p99:.1} |\n\
         | under attack | {} | {attacked_failures} | {:.1} | {attacked_p99:.1} |\n\n\
         p99 under attack / without: **{ratio:.2}×** (goal ≤ 2×)\n\n",
        calm.len(),
        quantile_ms(&calm, 0.5),
        attacked.len(),
        quantile_ms(&attacked, 0.5),
    ));
    if !open {
        missed.push(format!(
            "only {held} of {slow} slow connections were open at once"
        ));
    }
    if ratio > 2.0 {
        missed.push(format!("p99 under attack {ratio:.2}× the p99 without"));
    }
    if calm_failures + attacked_failures > 0 {
        missed.push(format!(
            "{} normal webhooks failed",
            calm_failures + attacked_failures
        ));
    }
}

/// A quiesced reading of the apiserver: the load paused for 3 s first.
async fn quiet_reading(pause: &AtomicBool, pid: u32) -> (f64, usize) {
    pause.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reading = (rss_mib(pid), open_fds(pid));
    pause.store(false, Ordering::Release);
    reading
}

/// Opens the SSE stream of `session`, reads it for `hold`, and drops it; true when it
/// answered 200 with an event stream.
async fn sse_for(public: &str, session: &str, ns: &str, token: &str, hold: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect(public).await else {
        return false;
    };
    let head = format!(
        "GET /agents/{session}/stream?namespace={ns} HTTP/1.1\r\nHost: {public}\r\n\
         Authorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if stream.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(hold, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&received);
    text.starts_with("HTTP/1.1 200") && text.to_ascii_lowercase().contains("text/event-stream")
}

async fn soak(
    door: &ApiServer,
    ns: &TestNamespace,
    path: &str,
    sessions: &Api<Session>,
    section: &mut String,
    missed: &mut Vec<String>,
) {
    let seconds = env_number("HOOKRUN_SOAK_SECONDS", 600);
    let warmup = Duration::from_secs((seconds / 5).max(30));
    let total = Duration::from_secs(seconds) + warmup;
    let pid = door.process.pid();
    let reader = ns.session_reader_token();
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    const FIRE_OK: usize = 0;
    const FIRE_BAD: usize = 1;
    const WAIT_OK: usize = 2;
    const WAIT_BAD: usize = 3;
    const SSE_OK: usize = 4;
    const SSE_BAD: usize = 5;

    let looped = |period: Duration, kind: usize| {
        let (public, path, stop, pause, counts) = (
            door.public.clone(),
            path.to_owned(),
            stop.clone(),
            pause.clone(),
            counts.clone(),
        );
        let (ns, reader, failures) = (ns.name().to_owned(), reader.clone(), failures.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Acquire) {
                tick.tick().await;
                if pause.load(Ordering::Acquire) {
                    continue;
                }
                let outcome: Result<(), String> = match kind {
                    FIRE_OK => {
                        let answer =
                            request(&public, "POST", &path, &[], r#"{"title":"soak"}"#).await;
                        (answer.status == 200)
                            .then_some(())
                            .ok_or(format!("fire-and-forget {} {}", answer.status, answer.text))
                    }
                    WAIT_OK => {
                        let answer =
                            request(&public, "POST", &path, &[], r#"{"title":"held","wait":1}"#)
                                .await;
                        (answer.status == 202 && answer.json["pollUrl"].is_string())
                            .then_some(())
                            .ok_or(format!("wait-mode {} {}", answer.status, answer.text))
                    }
                    _ => {
                        let answer =
                            request(&public, "POST", &path, &[], r#"{"title":"streamed"}"#).await;
                        match answer.json["session"].as_str() {
                            Some(session) if answer.status == 200 => {
                                sse_for(&public, session, &ns, &reader, Duration::from_secs(2))
                                    .await
                                    .then_some(())
                                    .ok_or_else(|| "an SSE stream did not open".to_owned())
                            }
                            _ => Err(format!("SSE's webhook {} {}", answer.status, answer.text)),
                        }
                    }
                };
                let slot = match outcome {
                    Ok(()) => kind,
                    Err(failure) => {
                        let mut failures = failures.lock().expect("the failures");
                        if failures.len() < 5 {
                            failures.push(failure);
                        }
                        kind + 1
                    }
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let tasks = vec![
        looped(Duration::from_millis(200), FIRE_OK),
        looped(Duration::from_millis(500), WAIT_OK),
        looped(Duration::from_millis(500), SSE_OK),
    ];
    // Sessions older than 10 s (no held request or stream follows them any more) are
    // deleted as the load goes, as the operator's TTL would.
    let reaper = {
        let (sessions, stop) = (sessions.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let Ok(list) = sessions.list(&Default::default()).await else {
                    continue;
                };
                let old = k8s_openapi::jiff::Timestamp::now() - Duration::from_secs(10);
                for session in list.items {
                    let created = session.metadata.creation_timestamp.as_ref().map(|t| t.0);
                    if created.is_some_and(|t| t < old) {
                        let _ = sessions
                            .delete(&session.name_any(), &Default::default())
                            .await;
                    }
                }
            }
        })
    };

    let started = Instant::now();
    tokio::time::sleep(warmup).await;
    let (warm_rss, warm_fds) = quiet_reading(&pause, pid).await;
    let mut peak_rss = warm_rss;
    let mut peak_fds = warm_fds;
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(5)).await;
        peak_rss = peak_rss.max(rss_mib(pid));
        peak_fds = peak_fds.max(open_fds(pid));
    }
    let (end_rss, end_fds) = quiet_reading(&pause, pid).await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    reaper.abort();

    let growth = (end_rss / warm_rss - 1.0) * 100.0;
    let count = |slot: usize| counts[slot].load(Ordering::Relaxed);
    section.push_str(&format!(
        "### Soak\n\n{seconds} s after a {} s warm-up, three clients at once: \
         fire-and-forget webhooks every 200 ms; wait-mode webhooks (`wait: 1`, each held \
         1 s and answered 202) one after the other; a webhook and then its SSE stream, read \
         for 2 s and dropped, one after the other. Sessions older than 10 s are deleted \
         every 20 s. Readings with the load paused for 3 s.\n\n\
         | | ok | failed |\n|---|---|---|\n\
         | fire-and-forget | {} | {} |\n| wait-mode | {} | {} |\n| SSE | {} | {} |\n\n\
         | apiserver | after warm-up | end | peak under load |\n|---|---|---|---|\n\
         | RSS MiB | {warm_rss:.1} | {end_rss:.1} | {peak_rss:.1} |\n\
         | open fds | {warm_fds} | {end_fds} | {peak_fds} |\n\n\
         RSS growth after warm-up: **{growth:+.1} %** (goal < 5 %); fd growth: **{:+}** \
         (goal ≤ 0)\n\n",
        warmup.as_secs(),
        count(FIRE_OK),
        count(FIRE_BAD),
        count(WAIT_OK),
        count(WAIT_BAD),
        count(SSE_OK),
        count(SSE_BAD),
        end_fds as i64 - warm_fds as i64,
    ));
    if growth >= 5.0 {
        missed.push(format!("soak RSS grew {growth:.1} %"));
    }
    if end_fds > warm_fds {
        missed.push(format!("soak fds grew from {warm_fds} to {end_fds}"));
    }
    if count(FIRE_BAD) + count(WAIT_BAD) + count(SSE_BAD) > 0 {
        missed.push(format!(
            "soak requests failed, first ones: {:?}",
            failures.lock().expect("the failures")
        ));
    }
}
