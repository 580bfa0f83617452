//! The door's dispatch and handlers: which route matched, which Agent is knocked on and
//! with which token, the answer, and its access log line and metrics. The checks are in
//! [`super::checks`], the intake of an accepted POST in [`super::intake`].
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::BoxError;
use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{ConnectInfo, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

use crate::access_log::{self, UNMATCHED_ROUTE};
use crate::error::{HttpError, JSON};
use crate::index::{AgentKey, KeyRef};

use super::AppState;
use super::checks::{authenticate, ping};
use super::intake::{Accepted, accept, receive};

/// The route template with the token in the path.
pub(crate) const TOKEN_ROUTE: &str = "/webhooks/{namespace}/{agent}/{token}";
/// The route template with the token in `Authorization: Bearer`.
pub(crate) const BEARER_ROUTE: &str = "/webhooks/{namespace}/{agent}";

/// What a listener serves: the webhook door's two routes when it has them, matched and
/// answered here, and a router for every other path.
///
/// The door is dispatched by hand because it takes every webhook and every anonymous
/// knock: a refusal should cost the checks and the answer, not what a router adds per
/// request (path parameters and the matched template in the request's extensions, a
/// boxed future per handler, the state cloned into each). Each of the door's answers
/// writes its own access log line and metrics (by route template, never the path: it
/// holds the token).
#[derive(Clone)]
pub struct Routes {
    door: Option<AppState>,
    rest: Router,
}

/// The webhook door alone: every other path is 404 in the door's own format, counted
/// under [`UNMATCHED_ROUTE`].
pub fn app(state: AppState) -> Routes {
    let fallback = state.clone();
    Routes {
        door: Some(state),
        rest: Router::new().fallback(move |request: Request| {
            let state = fallback.clone();
            async move { not_found(&state, &request) }
        }),
    }
}

impl From<Router> for Routes {
    /// A listener without the door: `router` answers every path.
    fn from(router: Router) -> Self {
        Routes {
            door: None,
            rest: router,
        }
    }
}

impl Routes {
    /// Adds `router`'s routes beside the ones served already.
    pub fn merge(mut self, router: Router) -> Self {
        self.rest = self.rest.merge(router);
        self
    }

    /// Answers `request`, which came from `peer`.
    pub(crate) async fn answer<B>(
        &self,
        request: axum::http::Request<B>,
        peer: SocketAddr,
    ) -> Response
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if let Some(state) = &self.door
            && let Some(door) = DoorPath::of(request.uri().path())
        {
            let started = Instant::now();
            // `HEAD` is answered as `GET`; the HTTP server sends no body with it.
            return match *request.method() {
                Method::GET | Method::HEAD => ping_answer(state, door, peer, &request, started),
                Method::POST => {
                    let route = door.route;
                    post_answer(state, route, peer, request, started).await
                }
                _ => {
                    let answered = refused(HttpError::MethodNotAllowed);
                    record(
                        state,
                        door.route,
                        request.method(),
                        started,
                        peer,
                        None,
                        answered,
                    )
                }
            };
        }
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        match self.rest.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// For `oneshot` in tests: the client's address is the request's `ConnectInfo`, or
/// unspecified without one.
impl tower::Service<Request> for Routes {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let routes = self.clone();
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |ConnectInfo(peer)| {
                *peer
            });
        Box::pin(async move { Ok(routes.answer(request, peer).await) })
    }
}

/// A path of the door: `/webhooks/{namespace}/{agent}` or
/// `/webhooks/{namespace}/{agent}/{token}`, each segment non-empty. Namespace and name
/// are DNS labels and tokens are base64url, so no segment that names an Agent or holds a
/// token is percent-encoded: an encoded one is taken as written and matches nothing.
#[derive(Clone, Copy)]
struct DoorPath<'a> {
    route: &'static str,
    agent: KeyRef<'a>,
    /// The token in the path; `None` on the bearer route.
    token: Option<&'a str>,
}

impl<'a> DoorPath<'a> {
    fn of(path: &'a str) -> Option<Self> {
        let mut segments = path.strip_prefix("/webhooks/")?.split('/');
        let namespace = segments.next().filter(|s| !s.is_empty())?;
        let agent = segments.next().filter(|s| !s.is_empty())?;
        let (route, token) = match (segments.next(), segments.next()) {
            (None, _) => (BEARER_ROUTE, None),
            (Some(token), None) if !token.is_empty() => (TOKEN_ROUTE, Some(token)),
            _ => return None,
        };
        Some(DoorPath {
            route,
            agent: KeyRef(namespace, agent),
            token,
        })
    }

    /// The token presented: in the path, or in `Authorization: Bearer`.
    fn token(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        match self.route {
            TOKEN_ROUTE => self.token,
            _ => crate::api::bearer_token(headers),
        }
    }
}

/// An answer and its outcome code, for the access log and metrics.
pub(super) type Answered = (Response, &'static str);

/// Access log and metrics of one answered request.
fn record(
    state: &AppState,
    route: &'static str,
    method: &Method,
    started: Instant,
    peer: SocketAddr,
    agent: Option<KeyRef<'_>>,
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

/// Every path outside the door and the routes beside it.
fn not_found(state: &AppState, request: &Request) -> Response {
    let started = Instant::now();
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |ConnectInfo(peer)| {
            *peer
        });
    let answered = refused(HttpError::NotFound);
    record(
        state,
        UNMATCHED_ROUTE,
        request.method(),
        started,
        peer,
        None,
        answered,
    )
}

/// `GET`: the verification ping, the checks up to the token and no Session.
fn ping_answer<B>(
    state: &AppState,
    door: DoorPath<'_>,
    peer: SocketAddr,
    request: &axum::http::Request<B>,
    started: Instant,
) -> Response {
    let headers = request.headers();
    let answered = match ping(state, door.agent, door.token(headers), peer, headers) {
        Ok(()) => (ping_ok(), access_log::PING_OUTCOME),
        Err(error) => refused(error),
    };
    record(
        state,
        door.route,
        request.method(),
        started,
        peer,
        Some(door.agent),
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
async fn post_answer<B>(
    state: &AppState,
    route: &'static str,
    peer: SocketAddr,
    request: axum::http::Request<B>,
    started: Instant,
) -> Response
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
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
    // Matched by `answer`; parsed again from the request's own parts, which are kept.
    let Some(door) = DoorPath::of(uri.path()) else {
        return not_found(state, &Request::new(Body::empty()));
    };
    let target = match authenticate(state, door.agent, door.token(&headers), peer, &headers) {
        Ok(target) => target,
        Err(error) => {
            let answered = refused(error);
            return record(
                state,
                route,
                &method,
                started,
                peer,
                Some(door.agent),
                answered,
            );
        }
    };
    let key = AgentKey::new(door.agent.0, door.agent.1);
    let result = match receive(state, &key, &target, &headers, Body::new(body)).await {
        // Boxed, so its state (the body, the Session it built) is freed once it is done
        // and is not part of a held request's memory.
        Ok(received) => Box::pin(accept(state, &key, target, &headers, received)).await,
        Err(error) => Err(error),
    };
    // Nothing of the request is kept while a wait-mode request is held.
    drop(headers);
    drop(uri);
    let answered = match result {
        Ok(Accepted::Now(answered)) => answered,
        Ok(Accepted::Hold(hold)) => Box::pin(hold.answer(state, &key)).await,
        Err(error) => refused(error),
    };
    let agent = KeyRef(&key.namespace, &key.name);
    record(state, route, &method, started, peer, Some(agent), answered)
}
