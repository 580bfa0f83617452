//! What the runner API ([`crate::runner`]) and the read API ([`crate::read`]) share: the
//! cluster client, their state, their JSON error, request bodies read
//! within a bound, and the access log and metrics of their routes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kube::Client;
use serde_json::json;

use crate::auth::Authenticator;
use crate::client_ip::TrustedProxies;
use crate::hub::SessionHub;
use crate::metrics::Metrics;
use crate::rate_limit::{RateLimit, RetryAfter};
use crate::session_status::StatusWriter;

/// The largest body the runner API reads.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Seconds a caller is told to wait while the cluster is not reachable.
const UNAVAILABLE_RETRY_SECONDS: u64 = 5;
/// How long a caller may take to send a body once the headers are in.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the runner and read routers share.
#[derive(Clone)]
pub struct ApiState {
    /// The one Kubernetes client, built at start.
    pub client: Client,
    pub auth: Arc<Authenticator>,
    pub hub: Arc<SessionHub>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<StatusWriter>,
    /// Whose `X-Forwarded-For` names the client whose review attempts are counted.
    pub trusted_proxies: Arc<TrustedProxies>,
}

impl ApiState {
    /// A state with fresh caches over `client`, `hub` and `metrics`, no trusted proxy
    /// and the default review limit.
    pub fn new(client: Client, hub: Arc<SessionHub>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            auth: Arc::new(Authenticator::new(
                metrics.clone(),
                crate::auth::default_review_limit(),
            )),
            hub,
            metrics,
            status: Arc::new(StatusWriter::default()),
            trusted_proxies: Arc::new(TrustedProxies::none()),
        }
    }

    /// The same state, with the client address read through `trusted_proxies` and
    /// denied read callers limited to `reviews` reviews per address.
    pub fn with_review_limit(
        mut self,
        trusted_proxies: TrustedProxies,
        reviews: RateLimit,
    ) -> Self {
        self.auth = Arc::new(Authenticator::new(self.metrics.clone(), reviews));
        self.trusted_proxies = Arc::new(trusted_proxies);
        self
    }
}

/// A client whose cluster refuses every connection, for handler tests: every call that
/// reaches it fails like a cluster that is down.
#[cfg(test)]
pub(crate) fn unreachable_client() -> Client {
    let url = "http://127.0.0.1:1".parse().expect("a URL");
    Client::try_from(kube::Config::new(url)).expect("a client")
}

/// An answer other than success: `{"error": code, "message": message}` with `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` (always sent with 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error answer.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: (status == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(UNAVAILABLE_RETRY_SECONDS),
        }
    }

    /// 429 with `Retry-After`.
    pub fn too_many_requests(retry: RetryAfter, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(retry.seconds()),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
        }
    }

    /// 400 naming what was wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 for a Session that does not exist.
    pub fn session_not_found(namespace: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!("there is no Session {name} in namespace {namespace}"),
        )
    }

    /// 503 for a cluster call that failed; the cause goes to the log, not the caller.
    pub fn cluster(what: &str, error: &kube::Error) -> Self {
        tracing::warn!(%error, what, "a cluster call failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("the cluster could not {what} right now; retry in a few seconds"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.code, "message": self.message}));
        let mut response = (self.status, body).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The credential in `Authorization: Bearer <token>`, if one is there.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reads a body of at most [`MAX_BODY_BYTES`] (413 beyond) within 30 s (408 after).
pub async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {MAX_BODY_BYTES} bytes (or unreadable): send less"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the body did not arrive within 30 s: send the whole request at once",
        )),
    }
}

/// Logs and counts each runner and read request by route template and status code:
/// never the path's values or the token.
pub async fn api_access_log(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    let status = response.status();
    let outcome = if status.is_success() {
        "ok"
    } else {
        status.canonical_reason().unwrap_or("error")
    };
    let elapsed = started.elapsed().as_secs_f64();
    metrics.observe(&route, method.as_str(), outcome, status.as_u16(), elapsed);
    tracing::info!(%route, %method, status = status.as_u16(), latency_ms = elapsed * 1000.0, "api request");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  x.y "),
        );
        assert_eq!(bearer_token(&headers), Some("x.y"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    #[tokio::test]
    async fn errors_are_json_and_503_says_when_to_retry() {
        let response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the cluster could not answer right now; retry in a few seconds",
        )
        .into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from(5u64))
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(value["error"], "unavailable");
        assert!(
            value["message"]
                .as_str()
                .is_some_and(|m| m.contains("retry"))
        );
    }

    #[tokio::test]
    async fn bodies_are_bounded() {
        let big = vec![b'x'; MAX_BODY_BYTES + 1];
        let error = read_body(Body::from(big)).await.expect_err("too large");
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        let ok = read_body(Body::from("{}")).await.expect("small");
        assert_eq!(&ok[..], b"{}");
    }
}
