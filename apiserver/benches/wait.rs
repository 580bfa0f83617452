//! What held wait-mode requests cost (`make bench`): the door's real dispatch and
//! HTTP/1 server with an in-memory Session store, holding 1,000 and then 10,000
//! `"wait": 600` requests from a client in a child process (this same binary, so the
//! server's figures are its own and each process stays within its open-file limit).
//!
//! For each size it reports the server's resident memory per held request (VmRSS before
//! the client connects and once every request is held), its CPU over 5 s while
//! everything is held and nothing happens (utime + stime from /proc/self/stat), and how
//! long after the client closes every socket the last waiter is freed.
//!
//! `HOOKRUN_WAIT_BENCH_SIZES` (`1000,10000`) and `HOOKRUN_WAIT_BENCH_IDLE_SECONDS` (5)
//! size it.

#[path = "support/loadgen.rs"]
mod loadgen;
mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::BenchDoor;

/// Set in the child: `<address> <path> <count>`.
const CLIENT_ENV: &str = "HOOKRUN_WAIT_BENCH_CLIENT";
/// Connections the client opens at once (the listener's backlog is finite).
const CONNECT_CONCURRENCY: usize = 256;

fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Raises this process's soft open-file limit to `files` when the hard limit allows
/// (or we may raise it); best effort, through util-linux `prlimit`.
fn raise_open_files(files: u64) {
    let _ = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={files}:{files}"))
        .stderr(Stdio::null())
        .status();
}

/// A field of /proc/self/status in KiB (`VmRSS`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// User + system CPU of this process so far, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100u64);
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// The child: opens `count` connections, sends one wait-mode webhook on each, says
/// `sent`, and holds them until its stdin closes.
async fn client(spec: &str) {
    let mut parts = spec.split_whitespace();
    let (Some(addr), Some(path), Some(count)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{CLIENT_ENV} must be '<address> <path> <count>'");
    };
    let count: usize = count.parse().expect("a count");
    raise_open_files(count as u64 + 1024);
    let body = r#"{"title":"held","wait":600}"#;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let streams: Vec<TcpStream> = futures::stream::iter(0..count)
        .map(|_| {
            let request = request.clone();
            async move {
                let mut stream = TcpStream::connect(addr).await.expect("connects");
                stream
                    .write_all(request.as_bytes())
                    .await
                    .expect("sends the request");
                stream
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    println!("sent {}", streams.len());
    std::io::stdout().flush().expect("stdout");
    // Hold every connection until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await
    .expect("stdin");
    drop(streams);
}

async fn wait_for(what: &str, budget: Duration, check: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < budget,
            "{what} did not happen in {budget:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    started.elapsed()
}

/// Measures `count` held requests; the report's table row.
async fn measure(door: &BenchDoor, count: u64, idle: Duration) -> String {
    let metrics = &door.state.metrics;
    let hub = &door.state.hub;
    assert_eq!(metrics.waiting.get(), 0);
    let rss_before = status_kib("VmRSS");

    let path = door.path("plain", door.token.expose());
    let mut child = Command::new(std::env::current_exe().expect("this bench"))
        .env(CLIENT_ENV, format!("{} {path} {count}", door.addr))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the client starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("the client reports");
    assert!(line.starts_with("sent"), "client said {line:?}");
    wait_for("every request held", Duration::from_secs(120), || {
        metrics.waiting.get() == count as i64
    })
    .await;
    // Let allocator and runtime settle before reading the memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_held = status_kib("VmRSS");

    let cpu_before = cpu_time();
    tokio::time::sleep(idle).await;
    let cpu_idle = cpu_time().saturating_sub(cpu_before);
    assert_eq!(
        metrics.waiting.get(),
        count as i64,
        "nothing answered while idle"
    );

    drop(child.stdin.take());
    let closed = Instant::now();
    wait_for("every waiter released", Duration::from_secs(60), || {
        hub.followed() == 0 && metrics.waiting.get() == 0
    })
    .await;
    let released = closed.elapsed();
    let _ = child.wait();

    let per_request = (rss_held.saturating_sub(rss_before)) as f64 * 1024.0 / count as f64;
    let row = format!(
        "| {count} | {rss_before} → {rss_held} | {:.2} | {:.3} % | {:.0} |\n",
        per_request / 1024.0,
        cpu_idle.as_secs_f64() / idle.as_secs_f64() * 100.0,
        released.as_secs_f64() * 1000.0,
    );
    println!(
        "{count:>6} held: RSS {rss_before} -> {rss_held} KiB = {:.2} KiB per held request \
         (goal <= 10 KiB); idle CPU {:.1} ms over {} s = {:.3}% of a core; all released \
         {:.0} ms after the client closed (goal <= 1 s)",
        per_request / 1024.0,
        cpu_idle.as_secs_f64() * 1000.0,
        idle.as_secs(),
        cpu_idle.as_secs_f64() / idle.as_secs_f64() * 100.0,
        released.as_secs_f64() * 1000.0,
    );
    row
}

#[tokio::main]
async fn main() {
    if let Ok(spec) = std::env::var(CLIENT_ENV) {
        client(&spec).await;
        return;
    }
    // `cargo bench` passes `--bench`; nothing to filter here.
    let sizes = env_list("HOOKRUN_WAIT_BENCH_SIZES", &[1000, 10000]);
    let idle = Duration::from_secs(
        env_list("HOOKRUN_WAIT_BENCH_IDLE_SECONDS", &[5])
            .first()
            .copied()
            .unwrap_or(5),
    );
    let largest = sizes.iter().copied().max().unwrap_or(0);
    raise_open_files(largest + 1024);
    let door = BenchDoor::start().await;
    println!("wait mode: requests held on loopback, client in a child process\n");
    let mut section = format!(
        "## held wait-mode requests\n\n`\"wait\": 600` POSTs held by the door's real HTTP/1 \
         server (client in a child process); RSS of the server before the client connects and \
         once all are held; CPU while {} s pass with everything held.\n\n\
         | held | RSS KiB | KiB per held request (goal ≤ 10) | idle CPU of a core | all released (ms after close) |\n\
         |---|---|---|---|---|\n",
        idle.as_secs()
    );
    for count in sizes {
        section.push_str(&measure(&door, count, idle).await);
    }
    let path = loadgen::write_report_section("wait", &section);
    println!("\nwritten to {}", path.display());
}
