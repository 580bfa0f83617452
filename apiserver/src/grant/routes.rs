//! The `/hook` router and its one handler, with the access log line and metrics (by
//! route template: the path holds the token).

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hookrun_crds::Session;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use serde_json::json;

use super::HookState;
use super::body::{HookBodyError, MAX_HOOK_BODY_BYTES, parse_hook_body};
use super::delivery::{Delivered, NotDelivered, deliver, event_key};
use super::index::HookTarget;
use crate::access_log;
use crate::client_ip;
use crate::error::{HttpError, JSON};
use crate::http_limits::read_body;
use crate::index::AgentKey;
use crate::session_status::StatusError;

/// The route template with the token in the path.
pub(crate) const HOOK_TOKEN_ROUTE: &str = "/hook/{token}";
/// The route template with the token in `Authorization: Bearer`.
pub(crate) const HOOK_BEARER_ROUTE: &str = "/hook";

/// The `/hook` routes (POST only), to merge into the public router.
pub fn router(state: HookState) -> Router {
    Router::new()
        .route(
            HOOK_TOKEN_ROUTE,
            post(token_handler).fallback(method_not_allowed),
        )
        .route(
            HOOK_BEARER_ROUTE,
            post(bearer_handler).fallback(method_not_allowed),
        )
        .with_state(state)
}

async fn method_not_allowed() -> Response {
    HttpError::MethodNotAllowed.into_response()
}

async fn token_handler(
    State(state): State<HookState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    method: Method,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    knock(&state, peer, matched, &method, Some(token), headers, body).await
}

async fn bearer_handler(
    State(state): State<HookState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let token = crate::api::bearer_token(&headers).map(str::to_owned);
    knock(&state, peer, matched, &method, token, headers, body).await
}

async fn knock(
    state: &HookState,
    peer: SocketAddr,
    matched: Option<MatchedPath>,
    method: &Method,
    token: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let route = access_log::route_label(matched.as_ref(), &[HOOK_TOKEN_ROUTE, HOOK_BEARER_ROUTE]);
    let client = client_ip::resolve_client_ip(
        peer.ip(),
        &client_ip::forwarded_for_values(&headers),
        &state.trusted_proxies,
    )
    .unwrap_or(peer.ip());
    let (response, outcome) = match answer(state, client, token.as_deref(), &headers, body).await {
        Ok(answered) => answered,
        Err(error) => {
            let code = error.code();
            (error.into_response(), code)
        }
    };
    access_log::record_webhook(
        &state.metrics,
        route,
        method,
        started,
        client,
        None,
        outcome,
        response.status().as_u16(),
    );
    response
}

async fn answer(
    state: &HookState,
    client: std::net::IpAddr,
    token: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Response, &'static str), HttpError> {
    let target = {
        let index = state
            .index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !index.is_synced() {
            return Err(HttpError::NotReady);
        }
        token.and_then(|t| index.target(t, SystemTime::now()))
    };
    let Some(target) = target else {
        // Anonymous refusals spend the address's bucket; a spent address waits.
        let mut refusals = state
            .refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        return Err(match refusals.try_acquire(client, Instant::now()) {
            Ok(()) => HttpError::GrantRefused,
            Err(retry) => HttpError::KnocksSpent(retry),
        });
    };
    let grant_key = AgentKey::new(target.namespace.clone(), target.grant.clone());
    {
        let mut limiter = state
            .rate_limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let limit = limiter.limit().capacity();
        if let Err(retry) = limiter.try_acquire(&grant_key, Instant::now()) {
            return Err(HttpError::GrantRateLimited { retry, limit });
        }
    }
    let bytes = read_body(headers, body, MAX_HOOK_BODY_BYTES).await?;
    let hook = parse_hook_body(&bytes).map_err(|error| match error {
        HookBodyError::Bad(error) => HttpError::BadBody(error),
        HookBodyError::TooLarge { field, limit } => HttpError::FieldTooLarge { field, limit },
    })?;
    let content = hook.content();
    let key = hook
        .idempotency_key
        .as_deref()
        .map(|k| event_key(&target.grant_uid, k));
    let delivered = store(state, &target, &content, key.as_deref()).await?;
    let (status, outcome, mut body) = if delivered.running {
        (
            StatusCode::OK,
            "delivered",
            json!({"session": target.session, "delivered": true, "eventId": delivered.event_id}),
        )
    } else {
        (
            StatusCode::ACCEPTED,
            "buffered",
            json!({"session": target.session, "buffered": true, "eventId": delivered.event_id}),
        )
    };
    if delivered.replayed {
        body["replayed"] = json!(true);
    }
    tracing::debug!(namespace = %target.namespace, grant = %target.grant, session = %target.session, event_id = delivered.event_id, "hook input stored");
    Ok((
        (status, [(header::CONTENT_TYPE, JSON)], body.to_string()).into_response(),
        outcome,
    ))
}

/// Appends the input to the Session's status, within the store timeout.
async fn store(
    state: &HookState,
    target: &HookTarget,
    content: &str,
    key: Option<&str>,
) -> Result<Delivered, HttpError> {
    let api: Api<Session> = Api::namespaced(state.client.clone(), &target.namespace);
    let at = Time(k8s_openapi::jiff::Timestamp::now());
    let write = state.status.update(
        &api,
        &target.session,
        None,
        |_, status| deliver(status, content, key, at.clone()),
        |_| {},
    );
    match tokio::time::timeout(state.store_timeout, write).await {
        Err(_) => {
            tracing::warn!(namespace = %target.namespace, session = %target.session, "storing a hook input timed out");
            Err(HttpError::Unavailable)
        }
        Ok(Ok(delivered)) => Ok(delivered),
        Ok(Err(StatusError::NotFound)) => Err(HttpError::GrantSessionGone),
        Ok(Err(StatusError::Refused(NotDelivered::Finished))) => Err(HttpError::GrantSessionEnded),
        Ok(Err(StatusError::TooLarge { ended })) => Err(HttpError::StatusTooLarge { ended }),
        Ok(Err(StatusError::Kube(error))) => {
            tracing::warn!(%error, namespace = %target.namespace, session = %target.session, "storing a hook input failed");
            Err(HttpError::Unavailable)
        }
        Ok(Err(StatusError::Contended | StatusError::Conflict)) => Err(HttpError::StatusContended),
    }
}
