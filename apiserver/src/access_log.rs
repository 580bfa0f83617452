//! The access log and request metrics of every route, on every listener: one log line
//! and one count per answered request, labelled by route template (never the path: it
//! can hold a token), method, status and outcome. Every label is a `'static` string
//! known at compile time, so counting a request allocates nothing and the label set
//! stays bounded whatever clients send.
//!
//! The webhook door calls [`record_webhook`] from its handlers (no middleware: a refusal
//! costs no boxed future); the read and runner routers wrap their routes in
//! [`api_access_log`].

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::index::AgentKey;
use crate::metrics::Metrics;

/// The route label of a request no route matched.
pub(crate) const UNMATCHED_ROUTE: &str = "unmatched";

/// Outcomes of webhook requests whose path names no Agent the index knows.
const UNKNOWN_AGENT_OUTCOMES: [&str; 2] = ["not_found", "not_ready"];

/// Which of `routes` matched, as a label; [`UNMATCHED_ROUTE`] when none did.
pub(crate) fn route_label(matched: Option<&MatchedPath>, routes: &[&'static str]) -> &'static str {
    matched
        .and_then(|m| routes.iter().find(|r| **r == m.as_str()))
        .copied()
        .unwrap_or(UNMATCHED_ROUTE)
}

/// Logs and counts one answered webhook request. `agent` is named only when the index
/// knows it: the segments of a path that named none are whatever the client wrote (a
/// token in the wrong place, kilobytes of junk).
pub(crate) fn record_webhook(
    metrics: &Metrics,
    route: &'static str,
    method: &Method,
    started: Instant,
    agent: Option<&AgentKey>,
    outcome: &'static str,
    status: u16,
) {
    let elapsed = started.elapsed().as_secs_f64();
    metrics.observe(route, method.as_str(), outcome, status, elapsed);
    let agent = agent.filter(|_| !UNKNOWN_AGENT_OUTCOMES.contains(&outcome));
    let (namespace, agent) = agent.map_or(("", ""), |k| (k.namespace.as_str(), k.name.as_str()));
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
