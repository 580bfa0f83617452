//! The cost of an Agent's CEL expressions (`make bench`): a realistic filter, title and
//! env mapping on a 10 KiB GitHub `issue_comment` payload, measured two ways.
//!
//! - In process: building the expressions' variables and evaluating the three, per
//!   request, many times: the p50 and p99 that the expressions add to a request (the body
//!   is parsed once by the door either way, so parsing is not counted).
//! - Through the door under `wrk`: the accepted path of an Agent with the expressions and
//!   of one without, alternated per round; the throughput ratio with/without.
//!
//! `HOOKRUN_BENCH_SECONDS` (5), `HOOKRUN_BENCH_CONNECTIONS` (32) and
//! `HOOKRUN_BENCH_ROUNDS` (3) size the wrk runs.

#[path = "support/loadgen.rs"]
mod loadgen;
mod support;

use std::time::{Duration, Instant};

use hookrun_apiserver::index::test_support::{agent, secret};
use hookrun_crds::expression::{Reads, Variables, compile_trigger};
use serde_json::{Value, json};

use loadgen::{env_number, median, post_script, write_report_section, wrk};
use support::{BenchDoor, NS};

const FILTER: &str = "headers['x-github-event'] == 'issue_comment' && \
    body.action == 'created' && body.comment.body.contains('@' + agent.name)";
const TITLE: &str =
    "body.repository.full_name + '#' + string(body.issue.number) + ': ' + body.issue.title";

fn webhook() -> Value {
    json!({
        "filter": FILTER,
        "title": TITLE,
        "env": [
            {"name": "GITHUB_REPOSITORY", "expression": "body.repository.full_name"},
            {"name": "ISSUE_NUMBER", "expression": "body.issue.number"},
            {"name": "COMMENT_AUTHOR", "expression": "body.comment.user.login"},
        ],
    })
}

/// A GitHub `issue_comment` delivery of about 10 KiB (the fields GitHub documents, with
/// the body making up the size).
fn payload() -> String {
    let user = |login: &str| {
        json!({"login": login, "id": 1, "node_id": "MDQ6VXNlcjE=", "avatar_url": "https://avatars.githubusercontent.com/u/1?v=4",
               "url": format!("https://api.github.com/users/{login}"), "html_url": format!("https://github.com/{login}"),
               "type": "User", "site_admin": false})
    };
    let mut body = json!({
        "action": "created",
        "issue": {
            "url": "https://api.github.com/repos/octo/hello/issues/42", "number": 42,
            "title": "Crash on start when the config file is missing", "user": user("octocat"),
            "labels": [{"id": 1, "name": "bug", "color": "d73a4a"}, {"id": 2, "name": "triage", "color": "ededed"}],
            "state": "open", "locked": false, "assignees": [user("hubot")], "comments": 3,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-02T00:00:00Z",
            "author_association": "MEMBER", "body": "",
        },
        "comment": {
            "url": "https://api.github.com/repos/octo/hello/issues/comments/1", "id": 1,
            "user": user("octocat"), "created_at": "2026-01-02T00:00:00Z",
            "body": "@mapped can you look at the stack trace above and propose a fix?",
            "author_association": "MEMBER",
        },
        "repository": {"id": 7, "name": "hello", "full_name": "octo/hello", "private": false,
                       "owner": user("octo"), "html_url": "https://github.com/octo/hello",
                       "default_branch": "main", "language": "Rust", "topics": ["cli", "rust"]},
        "sender": user("octocat"),
    });
    let size = body.to_string().len();
    body["issue"]["body"] =
        json!("Steps to reproduce: run it without a config. ".repeat((10 * 1024 - size) / 45));
    body.to_string()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// p50 and p99 of the expressions' added cost per request, in µs.
fn in_process(payload: &str) -> (f64, f64) {
    let trigger = serde_json::from_value(webhook()).expect("a trigger");
    let compiled = compile_trigger("spec.triggers[0].webhook", &trigger, &[]).expect("compiles");
    let body: Value = serde_json::from_str(payload).expect("JSON");
    let headers = [
        ("x-github-event", "issue_comment"),
        ("content-type", "application/json"),
    ];
    let mut times = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let started = Instant::now();
        let variables = Variables::new(&compiled.reads, &body, headers, "none", NS, "mapped");
        let pass = compiled
            .filter
            .as_ref()
            .map(|f| f.evaluate_bool(&variables));
        assert_eq!(pass, Some(Ok(true)));
        let title = compiled.title.as_ref().map(|t| t.evaluate_text(&variables));
        assert!(matches!(title, Some(Ok(_))));
        for (_, e) in &compiled.env {
            assert!(e.evaluate_text(&variables).is_ok());
        }
        times.push(started.elapsed());
    }
    times.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(percentile(&times, 0.5)), us(percentile(&times, 0.99)))
}

/// The worst cases constructed within the compile-time and body limits (the same as the
/// crate's unit test): every allowed comprehension over a body of the most values, the
/// chain of the most list concatenations, and 100 scans of a 200 KiB string. The slowest
/// of 20 evaluations of each, in ms.
fn worst_cases() -> Vec<(&'static str, f64)> {
    use hookrun_crds::expression::{MAX_ADDITIONS, MAX_BODY_VALUES, MAX_COMPREHENSIONS, compile};
    let list = Value::Array(vec![json!("ab"); MAX_BODY_VALUES - 2]);
    let big = json!({"l": list});
    let long = json!({"s": "a".repeat(200 * 1024)});
    let comprehensions = ["body.l.exists(x, x == 'zz')"; MAX_COMPREHENSIONS].join(" || ");
    let mapped = ["body.l.map(x, x + x).size() > 0"; MAX_COMPREHENSIONS].join(" || ");
    let concat = format!("size({}) > 0", ["body.l"; MAX_ADDITIONS + 1].join(" + "));
    let scans = ["body.s.contains('b')"; 100].join(" || ");
    let no_headers: [(&str, &str); 0] = [];
    [
        ("comprehensions over 1,022 values", comprehensions, &big),
        ("map with x + x over 1,022 values", mapped, &big),
        ("chain of 8 list concatenations", concat, &big),
        ("100 scans of a 200 KiB string", scans, &long),
    ]
    .into_iter()
    .map(|(name, source, body)| {
        let expression = compile("filter", &source).expect("within the limits");
        let variables = Variables::new(&Reads::everything(), body, no_headers, "none", NS, "worst");
        let slowest = (0..20)
            .map(|_| {
                let started = Instant::now();
                let _ = expression.evaluate_bool(&variables);
                started.elapsed()
            })
            .max()
            .unwrap_or_default();
        (name, slowest.as_secs_f64() * 1000.0)
    })
    .collect()
}

#[tokio::main]
async fn main() {
    let seconds = env_number("HOOKRUN_BENCH_SECONDS", 5);
    let connections = env_number("HOOKRUN_BENCH_CONNECTIONS", 32);
    let rounds = env_number("HOOKRUN_BENCH_ROUNDS", 3).max(1);
    let payload = payload();
    let (p50, p99) = in_process(&payload);
    println!("expressions in process: p50 {p50:.1} µs, p99 {p99:.1} µs per request");
    let worst = worst_cases();
    for (name, ms) in &worst {
        println!("worst case {name}: {ms:.2} ms");
    }

    let door = BenchDoor::start().await;
    {
        let mut index = door.state.index.write().expect("the index");
        let spec = support::bench_spec;
        index.apply_agent(&agent(NS, "mapped", spec(webhook())));
        index.apply_agent(&agent(NS, "unmapped", spec(json!({}))));
        for name in ["mapped", "unmapped"] {
            index.apply_secret(&secret(NS, name, &[("token", door.token.expose())]));
        }
    }
    let script = post_script(&payload, &[("X-GitHub-Event", "issue_comment")], false);
    let url = |name: &str| {
        format!(
            "http://{}{}",
            door.addr,
            door.path(name, door.token.expose())
        )
    };
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut ok = true;
    for round in 0..rounds {
        let mut pair = [None, None];
        for step in 0..2 {
            let mapped_turn = (round + step) % 2 == 0;
            let (target, script) = (
                url(if mapped_turn { "mapped" } else { "unmapped" }),
                script.clone(),
            );
            let run = tokio::task::spawn_blocking(move || {
                wrk(&target, Some(&script), seconds, connections)
            })
            .await
            .expect("wrk");
            ok &= run.statuses_ok;
            println!(
                "  accepted 10 KiB GitHub POST {:<8} {:>9.0} req/s  p99 {:>6.2} ms",
                if mapped_turn { "with" } else { "without" },
                run.rps,
                run.p99_ms
            );
            pair[usize::from(!mapped_turn)] = Some(run);
        }
        if let [Some(w), Some(wo)] = pair {
            ratios.push(w.rps / wo.rps);
            with.push(w);
            without.push(wo);
        }
    }
    let with_rps = median(with.iter().map(|r| r.rps).collect());
    let without_rps = median(without.iter().map(|r| r.rps).collect());
    let with_p99 = median(with.iter().map(|r| r.p99_ms).collect());
    let without_p99 = median(without.iter().map(|r| r.p99_ms).collect());
    let flag = if ok { "" } else { " (!) unexpected answers" };
    let section = format!(
        "## webhook expressions (filter + title + 3 env on a 10 KiB GitHub payload)\n\n\
         In process, per request (variables built, three kinds of expression evaluated; \
         20,000 runs): p50 {p50:.1} µs, p99 {p99:.1} µs (goal: under 50 µs added p99).\n\n\
         Through the door, accepted path, wrk -t2 -c{connections} -d{seconds}s, median of \
         {rounds} rounds alternated: with expressions {with_rps:.0} req/s (p99 {with_p99:.2} \
         ms), without {without_rps:.0} req/s (p99 {without_p99:.2} ms); ratio with/without \
         {:.2}×{flag}.\n",
        median(ratios)
    );
    let mut section = section;
    section.push_str(
        "\nWorst cases within the compile-time and body limits, slowest of 20 evaluations:\n\n\
         | expression | ms |\n|---|---|\n",
    );
    for (name, ms) in &worst {
        section.push_str(&format!("| {name} | {ms:.2} |\n"));
    }
    let path = write_report_section("expressions", &section);
    println!("\n{section}\nwritten to {}", path.display());
}
