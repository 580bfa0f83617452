//! Load test of the webhook door on loopback (`make bench`), beside a bare axum
//! hello-world measured in the same run with the same load generator (`wrk`, from
//! Debian's package of that name).
//!
//! The door runs its real dispatch and HTTP/1 server over an index built in memory, with a
//! Session store that keeps nothing, so the figures are the door's own cost: the accepted
//! case is the latency that the door adds on top of the one Session create a real cluster
//! makes. No log subscriber is installed: the door's work alone (the peer bench measures
//! the real binary with its default logging).
//!
//! Each path is measured against the door and the bare server in turn, the order swapped
//! every round; the table holds the medians of the rounds. It also reports what 1,000
//! Agents (each with its token Secret) add to the resident memory of an index. The
//! section is written to `target/bench/report.md` (see `loadgen::write_report_section`).
//!
//! `HOOKRUN_BENCH_SECONDS` (5), `HOOKRUN_BENCH_CONNECTIONS` (32) and
//! `HOOKRUN_BENCH_ROUNDS` (3) size the runs.

#[path = "support/loadgen.rs"]
mod loadgen;
mod support;

use hookrun_apiserver::index::{
    Index,
    test_support::{agent, secret},
};
use serde_json::json;
use tokio::net::TcpListener;

use loadgen::{Run, env_number, hello_world, median, post_script, write_report_section, wrk};
use support::BenchDoor;

/// One path: the door's URL and script, the goal as a ratio to bare (none for the
/// accepted case, whose goal is latency).
struct Case {
    name: &'static str,
    url: String,
    script: Option<String>,
    goal: Option<f64>,
}

/// Medians over the rounds: (door, bare, ratio of each round's door to bare).
struct Measured {
    door: Run,
    bare: Run,
    ratio: f64,
    ok: bool,
}

async fn measure(case: &Case, bare_url: &str, rounds: u64, seconds: u64, c: u64) -> Measured {
    let mut door_runs = Vec::new();
    let mut bare_runs = Vec::new();
    for round in 0..rounds {
        for step in 0..2 {
            let door_turn = (round + step) % 2 == 0;
            let (url, script) = if door_turn {
                (case.url.clone(), case.script.clone())
            } else {
                (bare_url.to_owned(), case.script.clone())
            };
            let run = tokio::task::spawn_blocking(move || wrk(&url, script.as_deref(), seconds, c))
                .await
                .expect("wrk");
            println!(
                "  {:<46} {:<5} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms{}",
                case.name,
                if door_turn { "door" } else { "bare" },
                run.rps,
                run.p50_ms,
                run.p99_ms,
                if run.statuses_ok {
                    ""
                } else {
                    "  [unexpected answers]"
                }
            );
            if door_turn {
                door_runs.push(run);
            } else {
                bare_runs.push(run);
            }
        }
    }
    let med = |runs: &[Run]| Run {
        rps: median(runs.iter().map(|r| r.rps).collect()),
        p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
        statuses_ok: runs.iter().all(|r| r.statuses_ok),
    };
    let ratio = median(
        door_runs
            .iter()
            .zip(&bare_runs)
            .map(|(d, b)| d.rps / b.rps)
            .collect(),
    );
    Measured {
        door: med(&door_runs),
        bare: med(&bare_runs),
        ratio,
        ok: door_runs.iter().all(|r| r.statuses_ok),
    }
}

/// VmRSS of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What 1,000 Agents with a webhook and their token Secrets add to an index's memory.
fn index_of_1000_agents_kib() -> u64 {
    let before = rss_kib();
    let mut index = Index::new(1);
    for i in 0..1000 {
        let name = format!("agent-{i:04}");
        index.apply_agent(&agent(
            "bench-rss",
            &name,
            json!({"triggers": [{"webhook": {"allowCIDRs": ["10.0.0.0/8"]}}]}),
        ));
        index.apply_secret(&secret(
            "bench-rss",
            &name,
            &[(
                "token",
                &format!("token-of-agent-{i:04}-0123456789abcdef0123456789"),
            )],
        ));
    }
    index.mark_synced();
    let after = rss_kib();
    drop(index);
    after.saturating_sub(before)
}

#[tokio::main]
async fn main() {
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 5);
    let connections = env_number("HOOKRUN_BENCH_CONNECTIONS", 32);
    let rounds = env_number("HOOKRUN_BENCH_ROUNDS", 3).max(1);
    let index_kib = index_of_1000_agents_kib();
    let door = BenchDoor::start().await;
    let token = &door.token;
    let door_addr = door.addr;

    let bare = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let bare_addr = bare.local_addr().expect("an address");
    tokio::spawn(async move { axum::serve(bare, hello_world()).await });
    let bare_url = format!("http://{bare_addr}/");

    let door_url =
        |agent: &str, token: &str| format!("http://{door_addr}{}", door.path(agent, token));
    let wrong = "A".repeat(43);
    let kib_body = format!(
        "{{\"webhookTimestamp\":0,\"data\":\"{}\"}}",
        "x".repeat(1000)
    );
    let wrong_signature = "0".repeat(64);
    let cases = [
        Case {
            name: "bad-token POST (401)",
            url: door_url("plain", &wrong),
            script: Some(post_script("{}", &[], true)),
            goal: Some(0.9),
        },
        Case {
            name: "valid GET ping (200)",
            url: door_url("plain", token.expose()),
            script: None,
            goal: Some(0.8),
        },
        Case {
            name: "1 KiB POST, valid token, wrong Linear sig (401)",
            url: door_url("linear", token.expose()),
            script: Some(post_script(
                &kib_body,
                &[("Linear-Signature", &wrong_signature)],
                true,
            )),
            goal: Some(0.7),
        },
        Case {
            name: "accepted POST (200, in-memory store)",
            url: door_url("plain", token.expose()),
            script: Some(post_script("{\"title\":\"bench\"}", &[], false)),
            goal: None,
        },
    ];

    let settings = format!(
        "wrk -t2 -c{connections} -d{seconds}s on 127.0.0.1, median of {rounds} rounds, door and \
         bare alternated (order swapped each round); 2 cores shared by wrk and both servers"
    );
    println!("{settings}\n");
    let mut measured = Vec::new();
    for case in &cases {
        measured.push(measure(case, &bare_url, rounds, seconds, connections).await);
    }

    let mut section = format!(
        "## webhook door beside bare (in process)\n\n{settings}. The door: its real dispatch \
         and HTTP/1 server, an index in memory, a Session store that keeps nothing, no log \
         subscriber. Bare: axum hello-world, same wrk settings (same script).\n\n\
         | path | door req/s | bare req/s | door/bare (median of rounds) | goal | door p99 ms | bare p99 ms |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for (case, m) in cases.iter().zip(&measured) {
        let flag = if m.ok { "" } else { " (!)" };
        let goal = case.goal.map_or("—".to_owned(), |g| format!("≥ {g}×"));
        section.push_str(&format!(
            "| {} | {:.0}{flag} | {:.0} | {:.2}× | {goal} | {:.2} | {:.2} |\n",
            case.name, m.door.rps, m.bare.rps, m.ratio, m.door.p99_ms, m.bare.p99_ms
        ));
    }
    let accepted = &measured[3];
    section.push_str(&format!(
        "\nAccepted webhook → Session handed to an in-memory store: p99 {:.2} ms under this \
         load, {:.2} ms over bare's p99: the door's own latency on the accepted path (the \
         latency it adds over a Session create in a real cluster is in the peer section).\n\
         \nIndex of 1,000 Agents with a webhook (and their token Secrets): +{:.1} MiB of \
         resident memory.\n\n(!) marks a median over runs with unexpected answers or socket \
         errors.\n",
        accepted.door.p99_ms,
        accepted.door.p99_ms - accepted.bare.p99_ms,
        index_kib as f64 / 1024.0,
    ));
    let path = write_report_section("webhook", &section);
    println!("\n{section}\nwritten to {}", path.display());
}
