//! Load test of the webhook door on loopback (`make bench`), beside a bare axum
//! hello-world measured in the same run with the same load generator (`wrk`, from
//! Debian's package of that name).
//!
//! The door runs its real router and HTTP/1 server over an index built in memory, with an
//! in-memory Session store, so the figures are the door's own cost: the accepted case is
//! the latency that the door adds on top of the one Session create a real cluster makes.
//!
//! `HOOKRUN_BENCH_SECONDS` (10) and `HOOKRUN_BENCH_CONNECTIONS` (32) size each run.

#[path = "support/loadgen.rs"]
mod loadgen;
mod support;

use tokio::net::TcpListener;

use loadgen::{Run, env_number, hello_world, post_script, wrk};
use support::BenchDoor;

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
    tokio::spawn(async move { axum::serve(bare, hello_world()).await });

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
