//! The admin server: `/healthz`, `/readyz` (ready once the controllers' caches have
//! synced, or while waiting for leadership) and `/metrics`.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router, extract::State, http::StatusCode, http::header, response::IntoResponse, routing::get,
};
use prometheus_client::registry::Registry;

/// What the admin handlers read.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
}

/// The admin routes.
pub fn app(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "caches have not synced yet",
        )
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn state(ready: bool) -> AdminState {
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        drop(metrics.reconcile_started("agent"));
        metrics.reconcile_failed("agent", "conflict");
        AdminState {
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(ready)),
        }
    }

    async fn status(state: AdminState, path: &str) -> (StatusCode, String) {
        let request = axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let response = app(state).oneshot(request).await.expect("infallible");
        let code = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (code, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        assert_eq!(status(state(false), "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            status(state(false), "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(status(state(true), "/readyz").await.0, StatusCode::OK);
        let (code, body) = status(state(true), "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("hookrun_operator_reconcile_duration_seconds"),
            "{body}"
        );
        assert!(
            body.contains("hookrun_operator_reconciles_total{controller=\"agent\"} 1"),
            "{body}"
        );
        assert!(body.contains("reason=\"conflict\""), "{body}");
    }
}
