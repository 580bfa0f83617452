//! The access log and request metrics of every route, on every listener: one log line
//! and one count per answered request, labelled by route template (never the path: it
//! can hold a token), method, status and outcome. Every label is a `'static` string
//! known at compile time, so counting a request allocates nothing and the label set
//! stays bounded whatever clients send.
//!
//! The webhook door calls [`record_webhook`] from its handlers (no middleware: a refusal
//! costs no boxed future); the read and runner routers wrap their routes in
//! [`api_access_log`].
//!
//! Answers that change nothing, refusals and pings, are folded: the first [`FOLD_AFTER`]
//! of one source (client address) with one outcome in an interval of [`FOLD_INTERVAL`]
//! get a line each, at once; the rest are counted, and one line per source and outcome
//! with `folded=<n>` closes the interval. A flood of bad tokens, or a monitor pinging
//! its URL, thus costs a counter increment per request, not a log line. Every accepted
//! POST gets its line.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::index::KeyRef;
use crate::metrics::Metrics;

/// The route label of a request no route matched.
pub(crate) const UNMATCHED_ROUTE: &str = "unmatched";

/// The outcome of a webhook `GET` (or `HEAD`) whose token matched.
pub(crate) const PING_OUTCOME: &str = "ping";

/// Outcomes of webhook requests whose path names no Agent the index knows.
const UNKNOWN_AGENT_OUTCOMES: [&str; 2] = ["not_found", "not_ready"];

/// Which of `routes` matched, as a label; [`UNMATCHED_ROUTE`] when none did.
pub(crate) fn route_label(matched: Option<&MatchedPath>, routes: &[&'static str]) -> &'static str {
    matched
        .and_then(|m| routes.iter().find(|r| **r == m.as_str()))
        .copied()
        .unwrap_or(UNMATCHED_ROUTE)
}

/// How long one fold lasts.
pub(crate) const FOLD_INTERVAL: Duration = Duration::from_secs(10);
/// Answers of one source with one outcome logged one by one in an interval, before the
/// rest are folded.
pub(crate) const FOLD_AFTER: u64 = 20;
/// The most (source, outcome) pairs followed in one interval; answers of further pairs
/// are folded into one line for every other source.
pub(crate) const MAX_FOLD_KEYS: usize = 4096;

/// One line that closes an interval: `folded` answers of `source` (every other source
/// when `None`) with outcome `reason` were counted, not logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Folded {
    pub(crate) source: Option<IpAddr>,
    pub(crate) reason: &'static str,
    pub(crate) status: u16,
    pub(crate) folded: u64,
}

/// The folded answers of the current interval, by source and outcome.
#[derive(Debug)]
pub(crate) struct Folds {
    interval: Duration,
    after: u64,
    max_keys: usize,
    window: Mutex<Window>,
    /// Whether a task closes the intervals when no answer comes to close them.
    flusher: AtomicBool,
}

/// Keyed by client addresses, so with a seeded hash; taken on every folded answer, so a
/// fast one.
type FoldMap<K> = HashMap<K, (u16, u64), foldhash::fast::RandomState>;

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    /// (source, outcome) → (status, answers seen this interval).
    seen: FoldMap<(IpAddr, &'static str)>,
    /// Answers of pairs past `max_keys`, by outcome: (status, count).
    others: FoldMap<&'static str>,
}

impl Folds {
    pub(crate) fn new(interval: Duration, after: u64, max_keys: usize) -> Self {
        Self {
            interval,
            after,
            max_keys,
            window: Mutex::new(Window {
                started: None,
                seen: FoldMap::default(),
                others: FoldMap::default(),
            }),
            flusher: AtomicBool::new(false),
        }
    }

    /// Notes one answer to fold at `now`: whether to log it at once, and the lines of an
    /// interval that ended before it.
    pub(crate) fn note(
        &self,
        source: IpAddr,
        reason: &'static str,
        status: u16,
        now: Instant,
    ) -> (bool, Vec<Folded>) {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = self.close_if_due(&mut window, now);
        window.started.get_or_insert(now);
        let keys = window.seen.len();
        let log_now = match window.seen.get_mut(&(source, reason)) {
            Some((_, seen)) => {
                *seen += 1;
                *seen <= self.after
            }
            None if keys < self.max_keys => {
                window.seen.insert((source, reason), (status, 1));
                true
            }
            None => {
                window.others.entry(reason).or_insert((status, 0)).1 += 1;
                false
            }
        };
        (log_now, closed)
    }

    /// The lines of the interval when it has ended at `now`, which starts the next one.
    pub(crate) fn flush(&self, now: Instant) -> Vec<Folded> {
        let mut window = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        self.close_if_due(&mut window, now)
    }

    fn close_if_due(&self, window: &mut Window, now: Instant) -> Vec<Folded> {
        match window.started {
            Some(started) if now.saturating_duration_since(started) >= self.interval => {}
            _ => return Vec::new(),
        }
        window.started = None;
        let after = self.after;
        let mut lines: Vec<Folded> = window
            .seen
            .drain()
            .filter(|(_, (_, seen))| *seen > after)
            .map(|((source, reason), (status, seen))| Folded {
                source: Some(source),
                reason,
                status,
                folded: seen - after,
            })
            .collect();
        lines.extend(
            window
                .others
                .drain()
                .map(|(reason, (status, folded))| Folded {
                    source: None,
                    reason,
                    status,
                    folded,
                }),
        );
        lines
    }
}

/// The process's folds (the log is process-wide too).
static FOLDS: LazyLock<Arc<Folds>> =
    LazyLock::new(|| Arc::new(Folds::new(FOLD_INTERVAL, FOLD_AFTER, MAX_FOLD_KEYS)));

fn log_folded(lines: Vec<Folded>) {
    for line in lines {
        let source = line
            .source
            .map_or_else(|| "others".to_owned(), |ip| ip.to_string());
        tracing::info!(
            source,
            outcome = line.reason,
            status = line.status,
            folded = line.folded,
            interval_s = FOLD_INTERVAL.as_secs(),
            "webhook requests folded"
        );
    }
}

/// Starts the task that closes intervals no answer closes, once, when a runtime runs.
fn ensure_flusher(folds: &Arc<Folds>) {
    if folds.flusher.swap(true, Ordering::Relaxed) {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        folds.flusher.store(false, Ordering::Relaxed);
        return;
    };
    let folds = Arc::downgrade(folds);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(FOLD_INTERVAL / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(folds) = folds.upgrade() else { return };
            log_folded(folds.flush(Instant::now()));
        }
    });
}

/// Logs and counts one answered webhook request. `agent` is named only when the index
/// knows it: the segments of a path that named none are whatever the client wrote (a
/// token in the wrong place, kilobytes of junk). Refusals and pings from `source` are
/// folded (see the module doc).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_webhook(
    metrics: &Metrics,
    route: &'static str,
    method: &Method,
    started: Instant,
    source: IpAddr,
    agent: Option<KeyRef<'_>>,
    outcome: &'static str,
    status: u16,
) {
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(started).as_secs_f64();
    metrics.observe(route, method.as_str(), outcome, status, elapsed);
    if status >= 400 || outcome == PING_OUTCOME {
        let folds = &*FOLDS;
        let (log_now, closed) = folds.note(source, outcome, status, now);
        log_folded(closed);
        if !log_now {
            ensure_flusher(folds);
            return;
        }
    }
    let agent = agent.filter(|_| !UNKNOWN_AGENT_OUTCOMES.contains(&outcome));
    let (namespace, agent) = agent.map_or(("", ""), |KeyRef(namespace, name)| (namespace, name));
    tracing::info!(
        route,
        %method,
        status,
        outcome,
        namespace,
        agent,
        latency_ms = elapsed * 1000.0,
        "webhook request"
    );
}

/// What [`api_access_log`] needs: where to count, and the router's route templates.
#[derive(Clone)]
pub(crate) struct AccessLog {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) routes: &'static [&'static str],
}

/// Logs and counts each read and runner request by route template and status code.
pub(crate) async fn api_access_log(
    State(log): State<AccessLog>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = route_label(request.extensions().get::<MatchedPath>(), log.routes);
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let outcome = if status.is_success() {
        "ok"
    } else {
        status.canonical_reason().unwrap_or("error")
    };
    let elapsed = started.elapsed().as_secs_f64();
    log.metrics
        .observe(route, method.as_str(), outcome, status.as_u16(), elapsed);
    tracing::info!(%route, %method, status = status.as_u16(), latency_ms = elapsed * 1000.0, "api request");
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    #[test]
    fn repeated_refusals_of_a_source_are_folded_per_reason_and_interval() {
        let folds = Folds::new(Duration::from_secs(10), 2, 3);
        let t0 = Instant::now();
        let a: IpAddr = [192, 0, 2, 1].into();
        let b: IpAddr = [192, 0, 2, 2].into();
        let at = |ms| t0 + Duration::from_millis(ms);
        // The first two of `a`'s bad tokens are logged at once, the rest counted.
        assert_eq!(folds.note(a, "bad_token", 401, at(0)), (true, vec![]));
        assert_eq!(folds.note(a, "bad_token", 401, at(1)), (true, vec![]));
        for ms in 2..10 {
            assert_eq!(folds.note(a, "bad_token", 401, at(ms)), (false, vec![]));
        }
        // Another reason, and another source, have folds of their own.
        assert_eq!(folds.note(a, "not_found", 404, at(10)), (true, vec![]));
        assert_eq!(folds.note(b, "bad_token", 401, at(11)), (true, vec![]));
        // Past the key budget, pairs are counted together as every other source.
        let c: IpAddr = [192, 0, 2, 3].into();
        assert_eq!(folds.note(c, "bad_token", 401, at(12)), (false, vec![]));
        assert_eq!(folds.flush(at(9_999)), vec![], "the interval is not over");
        // The interval's end: one line per folded pair, none for pairs not folded.
        let mut lines = folds.flush(at(10_000));
        lines.sort_by_key(|l| l.source);
        assert_eq!(
            lines,
            vec![
                Folded {
                    source: None,
                    reason: "bad_token",
                    status: 401,
                    folded: 1
                },
                Folded {
                    source: Some(a),
                    reason: "bad_token",
                    status: 401,
                    folded: 8
                },
            ]
        );
        assert_eq!(folds.flush(at(30_000)), vec![], "nothing left to say");
        // A new interval logs the first refusals at once again; a refusal after the end
        // of an interval closes it.
        assert_eq!(folds.note(a, "bad_token", 401, at(40_000)), (true, vec![]));
        assert_eq!(folds.note(a, "bad_token", 401, at(40_001)), (true, vec![]));
        assert_eq!(folds.note(a, "bad_token", 401, at(40_002)), (false, vec![]));
        let (log_now, closed) = folds.note(a, "bad_token", 401, at(50_002));
        assert!(log_now);
        assert_eq!(
            closed,
            vec![Folded {
                source: Some(a),
                reason: "bad_token",
                status: 401,
                folded: 1
            }]
        );
    }

    /// The lines a subscriber on this thread wrote while `f` ran.
    fn lines_logged(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Lines(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lines").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(lines.0.lock().expect("lines").clone()).expect("text");
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn pings_are_folded_like_refusals_and_every_accepted_post_is_logged() {
        let metrics = Metrics::default();
        // An address no other test uses: the folds are the process's.
        let source: IpAddr = [198, 51, 100, 77].into();
        let agent = Some(KeyRef("team", "triage"));
        let route = "/webhooks/{namespace}/{agent}/{token}";
        let lines = lines_logged(|| {
            for _ in 0..FOLD_AFTER + 30 {
                let started = Instant::now();
                record_webhook(
                    &metrics,
                    route,
                    &Method::GET,
                    started,
                    source,
                    agent,
                    PING_OUTCOME,
                    200,
                );
                record_webhook(
                    &metrics,
                    route,
                    &Method::POST,
                    started,
                    source,
                    agent,
                    "accepted",
                    202,
                );
            }
        });
        let count = |outcome: &str| {
            lines
                .iter()
                .filter(|l| {
                    l.contains(&format!("outcome=\"{outcome}\""))
                        || l.contains(&format!("outcome={outcome} "))
                })
                .count() as u64
        };
        assert_eq!(count(PING_OUTCOME), FOLD_AFTER, "{lines:#?}");
        assert_eq!(count("accepted"), FOLD_AFTER + 30, "{lines:#?}");
    }

    #[tokio::test]
    async fn route_labels_are_the_known_templates_or_unmatched() {
        const ROUTES: &[&str] = &["/a/{x}"];
        let label = |m: MatchedPath| async move { route_label(Some(&m), ROUTES) };
        let app = Router::new()
            .route("/a/{x}", get(label))
            .route("/b", get(label));
        for (path, expected) in [("/a/secret-token", "/a/{x}"), ("/b", UNMATCHED_ROUTE)] {
            let request = axum::http::Request::get(path)
                .body(Body::empty())
                .expect("a request");
            let response = app.clone().oneshot(request).await.expect("infallible");
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("a body");
            assert_eq!(&body[..], expected.as_bytes());
        }
        assert_eq!(route_label(None, ROUTES), UNMATCHED_ROUTE);
    }
}
