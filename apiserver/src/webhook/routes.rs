//! The door's router and handlers: which route matched, which Agent is knocked on and
//! with which token, the answer, and its access log line and metrics. The checks are in
//! [`super::checks`], the intake of an accepted POST in [`super::intake`].
use std::net::SocketAddr;
use std::time::Instant;

use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::access_log::{self, UNMATCHED_ROUTE};
use crate::error::{HttpError, JSON};
use crate::index::AgentKey;

use super::AppState;
use super::checks::ping;
use super::intake::{Accepted, accept};

/// The route template with the token in the path.
pub(crate) const TOKEN_ROUTE: &str = "/webhooks/{namespace}/{agent}/{token}";
/// The route template with the token in `Authorization: Bearer`.
pub(crate) const BEARER_ROUTE: &str = "/webhooks/{namespace}/{agent}";

/// The public router. Each handler writes its own access log line and metrics (by route
/// template, never the path: it holds the token); no middleware wraps them, so a refusal
/// costs no boxed future and no per-request allocation for labels.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route(
            TOKEN_ROUTE,
            get(ping_handler)
                .post(post_handler)
                .fallback(method_not_allowed),
        )
        .route(
            BEARER_ROUTE,
            get(ping_handler)
                .post(post_handler)
                .fallback(method_not_allowed),
        )
        .fallback(not_found)
        .with_state(state)
}

/// An answer and its outcome code, for the access log and metrics.
pub(super) type Answered = (Response, &'static str);

/// Which of the door's templates matched.
fn route_label(matched: Option<&MatchedPath>) -> &'static str {
    access_log::route_label(matched, &[TOKEN_ROUTE, BEARER_ROUTE])
}

/// Access log and metrics of one answered request.
fn record(
    state: &AppState,
    route: &'static str,
    method: &Method,
    started: Instant,
    peer: SocketAddr,
    agent: Option<&AgentKey>,
    (response, outcome): Answered,
) -> Response {
    let status = response.status().as_u16();
    access_log::record_webhook(
        &state.metrics,
        route,
        method,
        started,
        peer.ip(),
        agent,
        outcome,
        status,
    );
    response
}

fn refused(error: HttpError) -> Answered {
    let code = error.code();
    (error.into_response(), code)
}

/// The client's address; unspecified when the server gave none (a test's `oneshot`).
fn peer_of(peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> SocketAddr {
    peer.map_or(
        SocketAddr::from(([0, 0, 0, 0], 0)),
        |Extension(ConnectInfo(peer))| peer,
    )
}

async fn not_found(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    method: Method,
) -> Response {
    let started = Instant::now();
    let answered = refused(HttpError::NotFound);
    let peer = peer_of(peer);
    record(
        &state,
        UNMATCHED_ROUTE,
        &method,
        started,
        peer,
        None,
        answered,
    )
}

async fn method_not_allowed(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    matched: Option<MatchedPath>,
    method: Method,
) -> Response {
    let started = Instant::now();
    let answered = refused(HttpError::MethodNotAllowed);
    let route = route_label(matched.as_ref());
    let peer = peer_of(peer);
    record(&state, route, &method, started, peer, None, answered)
}

/// Which Agent's door is knocked on, and the token presented: read straight from the
/// request's path (the router already matched one of the two templates) and, without a
/// third segment, from `Authorization: Bearer`. Namespace and name are DNS labels and
/// tokens are base64url, so no segment that names an Agent or holds a token is
/// percent-encoded: an encoded one is taken as written and matches nothing.
struct Knock<'a> {
    key: AgentKey,
    token: Option<&'a str>,
}

impl<'a> Knock<'a> {
    fn of(path: &'a str, headers: &'a HeaderMap) -> Result<Self, HttpError> {
        let mut segments = path
            .strip_prefix("/webhooks/")
            .ok_or(HttpError::NotFound)?
            .split('/');
        let (Some(namespace), Some(agent)) = (segments.next(), segments.next()) else {
            return Err(HttpError::NotFound);
        };
        let token = match (segments.next(), segments.next()) {
            (None, _) => crate::api::bearer_token(headers),
            (Some(token), None) => Some(token),
            (Some(_), Some(_)) => return Err(HttpError::NotFound),
        };
        if namespace.is_empty() || agent.is_empty() {
            return Err(HttpError::NotFound);
        }
        Ok(Knock {
            key: AgentKey::new(namespace, agent),
            token: token.filter(|t| !t.is_empty()),
        })
    }
}

/// `GET`: the verification ping, the checks up to the token and no Session.
async fn ping_handler(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let route = route_label(matched.as_ref());
    let method = request.method();
    let headers = request.headers();
    let knock = match Knock::of(request.uri().path(), headers) {
        Ok(knock) => knock,
        Err(error) => {
            return record(&state, route, method, started, peer, None, refused(error));
        }
    };
    let answered = match ping(&state, &knock.key, knock.token, peer, headers) {
        Ok(()) => (ping_ok(), "ping"),
        Err(error) => refused(error),
    };
    record(
        &state,
        route,
        method,
        started,
        peer,
        Some(&knock.key),
        answered,
    )
}

/// `{"ok": true}`.
fn ping_ok() -> Response {
    static BODY: Bytes = Bytes::from_static(br#"{"ok":true}"#);
    ([(header::CONTENT_TYPE, JSON)], BODY.clone()).into_response()
}

/// `POST`: the checks, then the intake; a wait-mode request is held here until it is
/// answered.
async fn post_handler(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    matched: Option<MatchedPath>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let route = route_label(matched.as_ref());
    // The rest of the request (its extensions) goes here, not into a held request.
    let (
        Parts {
            method,
            uri,
            headers,
            ..
        },
        body,
    ) = request.into_parts();
    let (key, result) = match Knock::of(uri.path(), &headers) {
        Ok(knock) => {
            // Boxed, so its state (the body, the Session it built) is freed once it is
            // done and is not part of a held request's memory.
            let result = Box::pin(accept(
                &state,
                &knock.key,
                knock.token,
                peer,
                &headers,
                body,
            ))
            .await;
            (knock.key, result)
        }
        Err(error) => {
            return record(&state, route, &method, started, peer, None, refused(error));
        }
    };
    // Nothing of the request is kept while a wait-mode request is held.
    drop(headers);
    drop(uri);
    let answered = match result {
        Ok(Accepted::Now(answered)) => answered,
        Ok(Accepted::Hold(hold)) => Box::pin(hold.answer(&state, &key)).await,
        Err(error) => refused(error),
    };
    record(&state, route, &method, started, peer, Some(&key), answered)
}
