//! The one error type of every HTTP answer other than success, on the webhook door, the
//! read API and the runner API: each variant is one answer, with its status code, its
//! `{"error": <code>, "message": <sentence>}` JSON body and its headers (`Retry-After`,
//! `Allow`, the rate-limit headers). Authentication's own error converts into it.

use std::collections::HashMap;
use std::sync::{LazyLock, PoisonError, RwLock};

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hookrun_crds::budget::{BudgetPart, OverBudget};

use crate::auth::{AuthError, Denied};
use crate::body::BodyError;
use crate::client_ip::XffError;
use crate::http_limits::BODY_READ_TIMEOUT;
use crate::idempotency::IdempotencyError;
use crate::rate_limit::{RetryAfter, rate_limit_headers};
use crate::signature::SignatureError;

/// Seconds a caller is told to wait when the cluster cannot answer or store right now.
const UNAVAILABLE_RETRY_SECONDS: u64 = 5;
/// Seconds a caller is told to wait when the Agent runs its most Sessions.
const BUSY_RETRY_SECONDS: u64 = 10;
/// Seconds a caller is told to wait when the Agent stores its most Sessions: room comes
/// back only as finished Sessions reach their TTL, which takes minutes or more.
const STORE_FULL_RETRY_SECONDS: u64 = 60;
/// Seconds a session pod is told to wait until its Session names its pod.
const POD_NOT_RECORDED_RETRY_SECONDS: u64 = 1;

/// Why a request was refused; each variant is one answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("the webhook index is still loading; retry in a few seconds")]
    NotReady,
    #[error(
        "no Agent with a webhook trigger at this URL: check the namespace and Agent name, and \
         that the Agent has a webhook trigger"
    )]
    NotFound,
    #[error(transparent)]
    BadForwardedFor(XffError),
    #[error("the client address is not in the Agent's allowCIDRs")]
    AddressNotAllowed,
    #[error(
        "the token is missing or not valid for this Agent: use the URL from the Agent's \
         webhook Secret, or send it as Authorization: Bearer <token>"
    )]
    BadToken,
    #[error("a signature is required: send one of the headers {expected}")]
    MissingSignature { expected: String },
    #[error(transparent)]
    Signature(SignatureError),
    /// 503, not 401: the sender's signature is not at fault, the receiver lacks the key
    /// (not loaded yet, or the Secret it comes from was deleted), and senders retry a
    /// 5xx once it is back instead of giving up. Either way nothing is accepted.
    #[error(
        "the Agent's signing secret for this signature is missing: it is not loaded yet, or \
         the Secret it is read from was deleted (see the Agent's Ready condition); retry later"
    )]
    SigningSecretPending,
    #[error("the Agent's webhook is misconfigured: {0}")]
    Misconfigured(SignatureError),
    /// An expression of the Agent's webhook trigger does not compile (the Agent's Ready
    /// condition says so too): nothing passes until it is fixed.
    #[error(
        "the Agent's webhook is misconfigured: {0}; fix the expression (see the Agent's \
         Ready condition)"
    )]
    BadExpression(hookrun_crds::validation::FieldError),
    #[error("the body is larger than {limit} bytes: send at most {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    OverBudget(OverBudget),
    #[error("the body could not be read: {0}")]
    BodyRead(String),
    #[error("the body did not arrive within {} s: send the whole request at once", BODY_READ_TIMEOUT.as_secs())]
    BodyTimeout,
    #[error(transparent)]
    BadBody(BodyError),
    #[error(transparent)]
    Idempotency(IdempotencyError),
    #[error("the Agent's webhook rate limit of {limit} requests is spent; retry later")]
    RateLimited { retry: RetryAfter, limit: u32 },
    #[error(
        "the Agent already runs {max} Sessions (spec.session.maxConcurrent); retry when one \
         finishes"
    )]
    TooManySessions { max: u32 },
    #[error(
        "the Agent stores {max} Sessions, finished ones included \
         (spec.session.maxStoredSessions); retry when finished ones are deleted after \
         spec.session.ttlSecondsAfterFinished, or raise spec.session.maxStoredSessions or \
         shorten spec.session.ttlSecondsAfterFinished"
    )]
    TooManyStoredSessions { max: u32 },
    #[error("the cluster cannot store the Session right now; retry later")]
    Unavailable,
    #[error(
        "the cluster refused the Session ({reason}): {message}; sending the same request \
         again will be refused again"
    )]
    Rejected { reason: String, message: String },
    #[error("this URL answers GET (the verification ping) and POST (a webhook) only")]
    MethodNotAllowed,
    /// A read or runner request that names something wrongly; the message says what.
    #[error("{0}")]
    BadRequest(String),
    /// A read or runner request without a credential the cluster accepts.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A read or runner request whose credential may not do this; the message says why.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("there is no Session {name} in namespace {namespace}")]
    SessionNotFound { namespace: String, name: String },
    /// A cluster call of the read or runner API failed; the cause went to the log.
    #[error("the cluster could not {what} right now; retry in a few seconds")]
    Cluster { what: &'static str },
    /// The caller's address spent its review attempts.
    #[error(
        "too many requests from this address were denied: wait for Retry-After, then send a \
         valid token allowed to get the Session"
    )]
    ReviewsSpent(RetryAfter),
    #[error("the Session does not name its pod yet; retry in a second")]
    PodNotRecorded,
    #[error("the Session has already finished: it takes no more events or outcomes")]
    SessionFinished,
    #[error("the Session changed too often to write it; retry in a few seconds")]
    StatusContended,
    #[error("{}", status_too_large(*ended))]
    StatusTooLarge { ended: bool },
    /// A `/hook` token that is unknown, expired or revoked: one answer for all three, so
    /// whether a token ever existed does not leak.
    #[error(
        "this hook URL is not valid: it is unknown, expired or revoked; ask the Grant's \
         owner for a new one"
    )]
    GrantRefused,
    /// The Session a valid Grant names does not exist (any more).
    #[error("the Session this Grant speaks into no longer exists")]
    GrantSessionGone,
    /// The Session a valid Grant names has finished: it takes no more input.
    #[error("the Session this Grant speaks into has finished: it takes no more input")]
    GrantSessionEnded,
    #[error("this Grant's rate limit of {limit} messages is spent; retry later")]
    GrantRateLimited { retry: RetryAfter, limit: u32 },
    /// The caller's address sent too many refused hook tokens.
    #[error(
        "too many refused hook tokens from this address: wait for Retry-After, then use a \
         valid hook URL"
    )]
    KnocksSpent(RetryAfter),
    /// A body field larger than what is stored; the message names it.
    #[error("{field}: larger than {limit} bytes as stored (JSON-encoded); send less")]
    FieldTooLarge { field: &'static str, limit: usize },
}

fn status_too_large(ended: bool) -> &'static str {
    if ended {
        "the cluster refused to store the Session's status as too large: the write was not \
         stored and the Session was ended in phase Error"
    } else {
        "the cluster refused to store the Session's status as too large: the write was not \
         stored (the Session had already finished)"
    }
}

impl HttpError {
    /// 400 naming what was wrong.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        HttpError::BadRequest(message.into())
    }

    /// 404 for a Session that does not exist.
    pub(crate) fn session_not_found(namespace: &str, name: &str) -> Self {
        HttpError::SessionNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// 503 for a cluster call that failed; the cause goes to the log, not the caller.
    pub(crate) fn cluster(what: &'static str, error: &kube::Error) -> Self {
        tracing::warn!(%error, what, "a cluster call failed");
        HttpError::Cluster { what }
    }

    /// A short code for error bodies and metric labels.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            HttpError::NotReady => "not_ready",
            HttpError::NotFound => "not_found",
            HttpError::BadForwardedFor(_) => "bad_forwarded_for",
            HttpError::AddressNotAllowed => "address_not_allowed",
            HttpError::BadToken => "bad_token",
            HttpError::MissingSignature { .. } => "missing_signature",
            HttpError::Signature(e) => e.code(),
            HttpError::SigningSecretPending => "signing_secret_pending",
            HttpError::Misconfigured(_) | HttpError::BadExpression(_) => "agent_misconfigured",
            HttpError::TooLarge { .. } => "body_too_large",
            HttpError::OverBudget(e) => match e.part {
                BudgetPart::Title => "title_too_large",
                BudgetPart::Payload => "payload_too_large",
                BudgetPart::Env => "env_too_large",
                BudgetPart::Session => "session_too_large",
            },
            HttpError::BodyRead(_) => "body_unreadable",
            HttpError::BodyTimeout => "body_timeout",
            HttpError::BadBody(_) => "bad_body",
            HttpError::Idempotency(e) => e.code(),
            HttpError::RateLimited { .. } | HttpError::ReviewsSpent(_) => "rate_limited",
            HttpError::TooManySessions { .. } => "too_many_sessions",
            HttpError::TooManyStoredSessions { .. } => "too_many_stored_sessions",
            HttpError::Unavailable | HttpError::Cluster { .. } | HttpError::StatusContended => {
                "unavailable"
            }
            HttpError::Rejected { .. } => "session_rejected",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::BadRequest(_) => "bad_request",
            HttpError::Unauthorized(_) => "unauthorized",
            HttpError::Forbidden(_) => "forbidden",
            HttpError::SessionNotFound { .. } => "session_not_found",
            HttpError::PodNotRecorded => "pod_not_recorded",
            HttpError::SessionFinished => "session_finished",
            HttpError::StatusTooLarge { .. } => "status_too_large",
            HttpError::GrantRefused => "grant_refused",
            HttpError::GrantSessionGone => "session_gone",
            HttpError::GrantSessionEnded => "session_ended",
            HttpError::GrantRateLimited { .. } | HttpError::KnocksSpent(_) => "rate_limited",
            HttpError::FieldTooLarge { .. } => "field_too_large",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            HttpError::NotReady
            | HttpError::SigningSecretPending
            | HttpError::Unavailable
            | HttpError::Cluster { .. }
            | HttpError::PodNotRecorded
            | HttpError::StatusContended => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::NotFound | HttpError::SessionNotFound { .. } => StatusCode::NOT_FOUND,
            HttpError::BadForwardedFor(_)
            | HttpError::BodyRead(_)
            | HttpError::BadBody(_)
            | HttpError::Rejected { .. }
            | HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::AddressNotAllowed | HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            HttpError::BadToken
            | HttpError::MissingSignature { .. }
            | HttpError::Signature(_)
            | HttpError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            HttpError::Misconfigured(_) | HttpError::BadExpression(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            HttpError::TooLarge { .. }
            | HttpError::OverBudget(_)
            | HttpError::StatusTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HttpError::Idempotency(IdempotencyError::Conflict) => StatusCode::UNPROCESSABLE_ENTITY,
            HttpError::Idempotency(_) => StatusCode::BAD_REQUEST,
            HttpError::RateLimited { .. }
            | HttpError::TooManySessions { .. }
            | HttpError::TooManyStoredSessions { .. }
            | HttpError::ReviewsSpent(_) => StatusCode::TOO_MANY_REQUESTS,
            HttpError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            HttpError::SessionFinished => StatusCode::CONFLICT,
            HttpError::GrantRefused => StatusCode::FORBIDDEN,
            HttpError::GrantSessionGone => StatusCode::NOT_FOUND,
            HttpError::GrantSessionEnded => StatusCode::GONE,
            HttpError::GrantRateLimited { .. } | HttpError::KnocksSpent(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            HttpError::FieldTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

/// The message a caller without a valid Kubernetes token reads.
const UNAUTHENTICATED: &str = "send a valid Kubernetes token as Authorization: Bearer <token>";

impl From<AuthError> for HttpError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Denied(Denied::Unauthenticated) => HttpError::Unauthorized(UNAUTHENTICATED),
            AuthError::Denied(Denied::Forbidden(why)) => HttpError::Forbidden(why),
            AuthError::Throttled(retry) => HttpError::ReviewsSpent(retry),
            AuthError::Review { what, source } => HttpError::cluster(what, &source),
        }
    }
}

/// `{"error", "message"}` as JSON bytes.
fn error_body(code: &str, message: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
        message: &'a str,
    }
    serde_json::to_vec(&ErrorBody {
        error: code,
        message,
    })
    .map(Bytes::from)
    .unwrap_or_default()
}

/// The bodies of the door's errors whose message never changes, serialised once: the
/// cheap refusals (bad token, unknown Agent) are the ones a flood is made of.
static CONSTANT_BODIES: LazyLock<HashMap<&'static str, Bytes>> = LazyLock::new(|| {
    [
        HttpError::NotReady,
        HttpError::NotFound,
        HttpError::AddressNotAllowed,
        HttpError::BadToken,
        HttpError::SigningSecretPending,
        HttpError::BodyTimeout,
        HttpError::Unavailable,
        HttpError::MethodNotAllowed,
        HttpError::GrantRefused,
    ]
    .into_iter()
    .map(|e| (e.code(), error_body(e.code(), &e.to_string())))
    .collect()
});

/// The bodies of refused signatures, rendered once each. Their texts are the schemes'
/// constants, so there are a few dozen at most; only [`SignatureError::Stale`] carries
/// numbers, and it is rendered every time. A flood of forged signatures is a refusal that
/// must stay cheap: it already costs the HMAC.
static SIGNATURE_BODIES: LazyLock<RwLock<HashMap<SignatureError, Bytes>>> =
    LazyLock::new(RwLock::default);

fn signature_body(
    code: &'static str,
    error: &SignatureError,
    message: impl FnOnce() -> String,
) -> Bytes {
    if matches!(error, SignatureError::Stale { .. }) {
        return error_body(code, &message());
    }
    let known = SIGNATURE_BODIES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(error)
        .cloned();
    known.unwrap_or_else(|| {
        let body = error_body(code, &message());
        SIGNATURE_BODIES
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(error.clone(), body.clone());
        body
    })
}

/// What every error answer (and the door's every answer) is.
pub(crate) const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The methods the door's routes answer (`GET` answers `HEAD` too).
const ALLOWED_METHODS: HeaderValue = HeaderValue::from_static("GET, HEAD, POST");

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let code = self.code();
        // Codes shared by several variants ("unavailable") have one constant message
        // only for the door's variant.
        let constant = match self {
            HttpError::Cluster { .. } | HttpError::StatusContended => None,
            _ => CONSTANT_BODIES.get(code),
        };
        let body = match (constant, &self) {
            (Some(body), _) => body.clone(),
            (None, HttpError::Signature(error)) => signature_body(code, error, || self.to_string()),
            (None, _) => error_body(code, &self.to_string()),
        };
        let mut response = (self.status(), [(header::CONTENT_TYPE, JSON)], body).into_response();
        let headers = response.headers_mut();
        let retry_after = match &self {
            HttpError::RateLimited { retry, limit } => {
                for (name, value) in rate_limit_headers(*limit, 0) {
                    headers.insert(name, value);
                }
                Some(retry.seconds())
            }
            HttpError::GrantRateLimited { retry, limit } => {
                for (name, value) in rate_limit_headers(*limit, 0) {
                    headers.insert(name, value);
                }
                Some(retry.seconds())
            }
            HttpError::ReviewsSpent(retry) | HttpError::KnocksSpent(retry) => Some(retry.seconds()),
            HttpError::TooManySessions { .. } => Some(BUSY_RETRY_SECONDS),
            HttpError::TooManyStoredSessions { .. } => Some(STORE_FULL_RETRY_SECONDS),
            HttpError::PodNotRecorded => Some(POD_NOT_RECORDED_RETRY_SECONDS),
            HttpError::MethodNotAllowed => {
                headers.insert(header::ALLOW, ALLOWED_METHODS);
                None
            }
            // Every other 503 says when to come back.
            error if error.status() == StatusCode::SERVICE_UNAVAILABLE => {
                Some(UNAVAILABLE_RETRY_SECONDS)
            }
            _ => None,
        };
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(error: HttpError) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a body");
        (
            status,
            headers,
            serde_json::from_slice(&body).expect("JSON"),
        )
    }

    #[tokio::test]
    async fn errors_are_json_and_503_says_when_to_retry() {
        let (status, headers, value) = answer(HttpError::Cluster { what: "answer" }).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            headers.get(header::RETRY_AFTER),
            Some(&HeaderValue::from(5u64))
        );
        assert_eq!(headers.get(header::CONTENT_TYPE), Some(&JSON));
        assert_eq!(value["error"], "unavailable");
        assert_eq!(
            value["message"],
            "the cluster could not answer right now; retry in a few seconds"
        );
        let (_, headers, value) = answer(HttpError::PodNotRecorded).await;
        assert_eq!(
            headers.get(header::RETRY_AFTER),
            Some(&HeaderValue::from(1u64))
        );
        assert_eq!(value["error"], "pod_not_recorded");
        let (_, _, value) = answer(HttpError::Unavailable).await;
        assert_eq!(
            value["message"],
            "the cluster cannot store the Session right now; retry later"
        );
    }

    #[tokio::test]
    async fn authentication_errors_become_their_answers() {
        let (status, _, value) = answer(AuthError::Denied(Denied::Unauthenticated).into()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(value["error"], "unauthorized");
        assert_eq!(value["message"], UNAUTHENTICATED);
        let (status, _, value) = answer(AuthError::Denied(Denied::Forbidden("why")).into()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(value["error"], "forbidden");
        assert_eq!(value["message"], "why");
        let retry = RetryAfter(std::time::Duration::from_millis(2500));
        let (status, headers, value) = answer(AuthError::Throttled(retry).into()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(value["error"], "rate_limited");
        assert_eq!(
            headers.get(header::RETRY_AFTER),
            Some(&HeaderValue::from(3u64))
        );
    }
}
