//! The load generator the benches share: `wrk` (Debian's package of that name) on
//! loopback, its figures read from its `--latency` output, and the bare axum hello-world
//! every figure is compared against.

#![allow(dead_code)] // Each bench reads a different part.

use std::path::PathBuf;
use std::process::Command;

use axum::{Router, routing::get};

/// A number from the environment, or `default`.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one wrk run measured.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// False when wrk saw answers the script did not expect (non-2xx where 2xx was
    /// expected), or socket errors.
    pub statuses_ok: bool,
}

/// The bare server every figure is compared against: "Hello, World!" for GET and POST.
pub fn hello_world() -> Router {
    let hello = || async { "Hello, World!" };
    Router::new().route("/", get(hello).post(hello))
}

/// Runs wrk against `url` and reads its requests/s, median and 99th percentile.
pub fn wrk(url: &str, script: Option<&str>, seconds: u64, connections: u64) -> Run {
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
    let percentile = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| parse_latency(v.trim()))
            .unwrap_or(f64::NAN)
    };
    // wrk counts answers other than 2xx/3xx; where an error is expected, the script says so.
    let statuses_ok = (!text.contains("Non-2xx or 3xx responses")
        || script.is_some_and(|s| s.contains("-- expect non-2xx")))
        && !text.contains("Socket errors");
    Run {
        rps,
        p50_ms: percentile("50%"),
        p99_ms: percentile("99%"),
        statuses_ok,
    }
}

/// A wrk latency such as `1.25ms`, in milliseconds.
pub fn parse_latency(value: &str) -> f64 {
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

/// A wrk script that POSTs `body` as JSON with `headers`; `expect_error` marks non-2xx
/// answers as expected.
pub fn post_script(body: &str, headers: &[(&str, &str)], expect_error: bool) -> String {
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

/// The median of `values` (NaN ones left out); NaN when none is left.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| !v.is_nan());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The workspace's `target/bench/report.md`.
/// It lives in the workspace's own `target/`, wherever `CARGO_TARGET_DIR` puts the build.
pub fn report_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench")
        .join("report.md")
}

/// Writes `section` as `name`'s section of `target/bench/report.md`: it replaces the
/// section this bench wrote before (between its markers) and keeps every other bench's,
/// so each bench of `make bench` adds its own part and reruns do not pile up.
pub fn write_report_section(name: &str, section: &str) -> PathBuf {
    let begin = format!("<!-- {name} bench: begin -->");
    let end = format!("<!-- {name} bench: end -->");
    let path = report_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("target/bench");
    }
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let kept = match (existing.find(&begin), existing.find(&end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}",
            &existing[..b],
            existing[e + end.len()..].trim_start()
        ),
        _ => existing,
    };
    let mut text = kept.trim_end().to_owned();
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str(&format!("{begin}\n{section}{end}\n"));
    std::fs::write(&path, text).expect("the report is written");
    path
}
