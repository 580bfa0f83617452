//! Load test of the webhook door on loopback (`make bench`), beside a bare axum
//! hello-world measured in the same run with the same load generator (`wrk`, from
//! Debian's package of that name).
//!
//! The door runs its real router and HTTP/1 server over an index built in memory, with an
//! in-memory Session store, so the figures are the door's own cost: the accepted case is
//! the latency that the door adds on top of the one Session create a real cluster makes.
//!
//! `HOOKRUN_BENCH_SECONDS` (10) and `HOOKRUN_BENCH_CONNECTIONS` (32) size each run.

mod support;

use std::process::Command;

use axum::{Router, routing::get};
use tokio::net::TcpListener;

use support::BenchDoor;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    rps: f64,
    p99_ms: f64,
    statuses_ok: bool,
}

/// Runs wrk against `url` and reads its requests/s and 99th percentile.
fn wrk(url: &str, script: Option<&str>, seconds: u64, connections: u64) -> Run {
    let mut command = Command::new("wrk");
    command.args([
        "-t2",
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--latency",
    ]);
    let script_path =
        std::env::temp_dir().join(format!("hookrun-bench-{}.lua", std::process::id()));
    if let Some(script) = script {
        std::fs::write(&script_path, script).expect("the wrk script is written");
        command.arg("-s").arg(&script_path);
    }
    let out = command
        .arg(url)
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| parse_latency(v.trim()))
        .unwrap_or(f64::NAN);
    // wrk counts answers other than 2xx/3xx; where we expect 401, the script says so.
    let statuses_ok = !text.contains("Non-2xx or 3xx responses")
        || script.is_some_and(|s| s.contains("-- expect non-2xx"));
    Run {
        rps,
        p99_ms,
        statuses_ok,
    }
}

fn parse_latency(value: &str) -> f64 {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        _ => f64::NAN,
    }
}

fn post_script(body: &str, headers: &[(&str, &str)], expect_error: bool) -> String {
    let mut script = format!(
        "wrk.method = \"POST\"\nwrk.body = {body:?}\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
    );
    for (name, value) in headers {
        script.push_str(&format!("wrk.headers[{name:?}] = {value:?}\n"));
    }
    if expect_error {
        script.push_str("-- expect non-2xx\n");
    }
    script
}

fn report(name: &str, run: &Run, bare: &Run, goal: f64) {
    let ratio = run.rps / bare.rps;
    println!(
        "{name:<44} {:>9.0} req/s  p99 {:>6.2} ms  = {ratio:.2}x bare (goal >= {goal}x){}",
        run.rps,
        run.p99_ms,
        if run.statuses_ok {
            ""
        } else {
            "  [unexpected status codes]"
        }
    );
}

#[tokio::main]
async fn main() {
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 10);
    let connections = env_number("HOOKRUN_BENCH_CONNECTIONS", 32);
    let door = BenchDoor::start().await;
    let token = &door.token;
    let door_addr = door.addr;

    let bare = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let bare_addr = bare.local_addr().expect("an address");
    let hello = Router::new().route("/", get(|| async { "Hello, World!" }));
    tokio::spawn(async move { axum::serve(bare, hello).await });

    let door_url =
        |agent: &str, token: &str| format!("http://{door_addr}{}", door.path(agent, token));
    let wrong = "A".repeat(43);
    let kib_body = format!(
        "{{\"webhookTimestamp\":0,\"data\":\"{}\"}}",
        "x".repeat(1000)
    );
    let wrong_signature = "0".repeat(64);

    // wrk blocks; run it off the runtime that serves.
    let run = move |url: String, script: Option<String>| {
        tokio::task::spawn_blocking(move || wrk(&url, script.as_deref(), seconds, connections))
    };
    println!(
        "wrk -t2 -c{connections} -d{seconds}s on loopback, 2 cores shared by wrk and the server\n"
    );
    let bare_run = run(format!("http://{bare_addr}/"), None)
        .await
        .expect("wrk");
    println!(
        "{:<44} {:>9.0} req/s  p99 {:>6.2} ms",
        "bare axum hello-world (GET)", bare_run.rps, bare_run.p99_ms
    );
    let bad_token = run(
        door_url("plain", &wrong),
        Some(post_script("{}", &[], true)),
    )
    .await
    .expect("wrk");
    report("POST with a bad token (401)", &bad_token, &bare_run, 0.9);
    let ping = run(door_url("plain", token.expose()), None)
        .await
        .expect("wrk");
    report(
        "GET verification ping, valid token (200)",
        &ping,
        &bare_run,
        0.8,
    );
    let hmac = run(
        door_url("linear", token.expose()),
        Some(post_script(
            &kib_body,
            &[("Linear-Signature", &wrong_signature)],
            true,
        )),
    )
    .await
    .expect("wrk");
    report(
        "1 KiB POST, valid token, wrong Linear sig (401)",
        &hmac,
        &bare_run,
        0.7,
    );
    let accepted = run(
        door_url("plain", token.expose()),
        Some(post_script("{\"title\":\"bench\"}", &[], false)),
    )
    .await
    .expect("wrk");
    println!(
        "{:<44} {:>9.0} req/s  p99 {:>6.2} ms  = latency added over the Session create (goal p99 <= 5 ms){}",
        "accepted POST (200, in-memory create)",
        accepted.rps,
        accepted.p99_ms,
        if accepted.statuses_ok {
            ""
        } else {
            "  [unexpected status codes]"
        }
    );
}
