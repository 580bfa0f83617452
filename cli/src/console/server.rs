//! The console's HTTP side: the router (page, assets, JSON API, two SSE streams), the
//! guard every request passes (own `Host`, the run's token, same-origin JSON posts), the
//! headers every answer carries, and the handlers that talk to Kubernetes as the user.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use hookrun_crds::{Agent, Session};
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use super::guard::{self, ConsoleToken, InputRequest, Invalid, InvokeRequest};
use super::view::{self, AgentView, SessionView};
use crate::context::Context;
use crate::ops::{self, Followed};

const PAGE: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// The Content-Security-Policy of every answer: the page's own script and style only, no
/// inline code, no frames, and requests only back to this console.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

/// What every handler shares.
#[derive(Clone)]
pub struct Console {
    pub context: Context,
    pub token: ConsoleToken,
    /// The port the console listens on: the only one its `Host` may name.
    pub port: u16,
}

/// The console's routes behind its guard.
pub fn app(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/console.css", get(style))
        .route("/console.js", get(script))
        .route("/api/agents", get(agents))
        .route("/api/sessions/watch", get(watch_sessions))
        .route("/api/sessions/{name}/follow", get(follow_session))
        .route("/api/sessions/{name}/input", post(send_input))
        .route("/api/invoke", post(invoke))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(guard::MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(console.clone(), guarded))
        .layer(middleware::map_response(secure_headers))
        .with_state(console)
}

/// The guard: a request must name this console as its `Host`, carry the run's token, and
/// a post must be JSON from this console's own origin (when the browser says where from).
async fn guarded(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    if let Some(refusal) = refusal(
        &console,
        request.method(),
        request.uri().query(),
        request.headers(),
    ) {
        return refusal;
    }
    next.run(request).await
}

fn refusal(
    console: &Console,
    method: &Method,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Option<Response> {
    let header_text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if !guard::host_allowed(header_text(header::HOST), console.port) {
        return Some(forbidden(
            "this console answers only to 127.0.0.1 or localhost on its own port",
        ));
    }
    let token_ok = guard::token_in_query(query).is_some_and(|t| console.token.matches(t));
    if !token_ok {
        return Some(forbidden(
            "open the console with the URL it printed (it carries this run's token)",
        ));
    }
    if method == Method::POST {
        let json = header_text(header::CONTENT_TYPE)
            .is_some_and(|t| t.split(';').next() == Some("application/json"));
        if !json {
            return Some(
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "send application/json").into_response(),
            );
        }
        if let Some(origin) = header_text(header::ORIGIN) {
            let own = header_text(header::HOST).map(|host| format!("http://{host}"));
            if own.as_deref() != Some(origin) {
                return Some(forbidden("cross-origin posts are refused"));
            }
        }
    }
    None
}

fn forbidden(message: &'static str) -> Response {
    (StatusCode::FORBIDDEN, message).into_response()
}

/// The headers of every answer, refusals included.
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page").into_response()
}

async fn page(State(console): State<Arc<Console>>) -> Response {
    let html = PAGE
        .replace("{{TOKEN}}", console.token.as_str())
        .replace("{{NAMESPACE}}", &escape_html(&console.context.namespace));
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

/// Text for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A refusal or a failure, answered as `{"error": ..., "reason": ...}` with a status the
/// page shows as it is: Kubernetes' own (403 Forbidden names the verb and resource).
#[derive(Debug)]
pub enum ApiError {
    Invalid(Invalid),
    Kubernetes {
        code: u16,
        reason: String,
        message: String,
    },
    Other(String),
}

impl From<Invalid> for ApiError {
    fn from(invalid: Invalid) -> Self {
        ApiError::Invalid(invalid)
    }
}

impl From<kube::Error> for ApiError {
    fn from(error: kube::Error) -> Self {
        ApiError::from(anyhow::Error::new(error))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        let message = format!("{error:#}");
        let api = error.chain().find_map(|cause| match cause.downcast_ref() {
            Some(kube::Error::Api(status)) => Some((status.code, status.reason.clone())),
            _ => None,
        });
        // The shared operations turn refusals into messages that name the missing RBAC
        // verb and resource; their first word says which refusal it was.
        let named = if message.starts_with("forbidden: ") {
            Some((403, "Forbidden".to_owned()))
        } else if message.starts_with("unauthorized: ") {
            Some((401, "Unauthorized".to_owned()))
        } else {
            None
        };
        match api.or(named) {
            Some((code, reason)) => ApiError::Kubernetes {
                code,
                reason,
                message,
            },
            None => ApiError::Other(message),
        }
    }
}

impl ApiError {
    fn parts(&self) -> (StatusCode, serde_json::Value) {
        match self {
            ApiError::Invalid(invalid) => (
                StatusCode::BAD_REQUEST,
                json!({"error": invalid.to_string(), "field": invalid.field, "reason": "Invalid"}),
            ),
            ApiError::Kubernetes {
                code,
                reason,
                message,
            } => (
                StatusCode::from_u16(*code)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY),
                json!({"error": message, "reason": reason}),
            ),
            ApiError::Other(message) => (
                StatusCode::BAD_GATEWAY,
                json!({"error": message, "reason": "Failed"}),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.parts();
        (status, Json(body)).into_response()
    }
}

/// A JSON body, its parse errors answered in the console's own error shape.
pub struct JsonBody<T>(T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::Invalid(Invalid {
                field: "body".to_owned(),
                message: rejection.body_text(),
            })),
        }
    }
}

async fn agents(State(console): State<Arc<Console>>) -> Result<Json<serde_json::Value>, ApiError> {
    let context = &console.context;
    let agents: Api<Agent> = Api::namespaced(context.client.clone(), &context.namespace);
    let sessions: Api<Session> = Api::namespaced(context.client.clone(), &context.namespace);
    let all = ListParams::default();
    let ns = &context.namespace;
    let (agents, sessions) = futures::try_join!(
        async {
            agents
                .list(&all)
                .await
                .map_err(|e| ops::explain(e, "list", "agents.hookrun.dev", ns))
        },
        async {
            sessions
                .list(&all)
                .await
                .map_err(|e| ops::explain(e, "list", "sessions.hookrun.dev", ns))
        }
    )?;
    let mut sessions = sessions.items;
    view::newest_first(&mut sessions);
    let views: Vec<AgentView> = agents
        .items
        .iter()
        .map(|agent| view::agent_view(agent, &sessions))
        .collect();
    Ok(Json(
        json!({"namespace": context.namespace, "agents": views}),
    ))
}

fn sse_json(name: &str, value: &impl serde::Serialize) -> Event {
    Event::default()
        .event(name)
        .json_data(value)
        .unwrap_or_else(|_| Event::default().event("error").data("{}"))
}

fn sse_error(error: &ApiError) -> Event {
    let (status, body) = error.parts();
    sse_json(
        "failure",
        &json!({"error": body["error"], "reason": body["reason"], "code": status.as_u16()}),
    )
}

fn sse<S>(stream: S) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    S: Stream<Item = Event> + Send + 'static,
{
    Sse::new(stream.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The namespace's Sessions, live from a Kubernetes watch: `reset` with the whole list
/// (at the start and after the watch had to relist), then `upsert` and `remove` per
/// change, `failure` when the watch fails (it retries with backoff).
async fn watch_sessions(
    State(console): State<Arc<Console>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let context = &console.context;
    let sessions: Api<Session> = Api::namespaced(context.client.clone(), &context.namespace);
    let watching = format!(
        "watch sessions.hookrun.dev in namespace {}",
        context.namespace
    );
    let mut initial: Vec<Session> = Vec::new();
    let events = watcher::watcher(sessions, watcher::Config::default())
        .default_backoff()
        .filter_map(move |event| {
            let out = match event {
                Ok(watcher::Event::Init) => {
                    initial.clear();
                    None
                }
                Ok(watcher::Event::InitApply(session)) => {
                    initial.push(session);
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let mut all = std::mem::take(&mut initial);
                    view::newest_first(&mut all);
                    let views: Vec<SessionView> =
                        all.iter().map(|s| view::session_view(s, true)).collect();
                    Some(sse_json("reset", &views))
                }
                Ok(watcher::Event::Apply(session)) => {
                    Some(sse_json("upsert", &view::session_view(&session, true)))
                }
                Ok(watcher::Event::Delete(session)) => {
                    Some(sse_json("remove", &json!({"name": session.metadata.name})))
                }
                Err(error) => Some(sse_error(&ApiError::from(
                    anyhow::Error::new(error).context(watching.clone()),
                ))),
            };
            futures::future::ready(out)
        });
    sse(events)
}

/// One Session's transcript, live: `session` (its head: agent, title, phase), then each
/// `event` once in order, `phase` changes, and `finished` with the answer; `failure` when
/// reading it fails.
async fn follow_session(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    guard::check_name("session", &name)?;
    let context = &console.context;
    let sessions: Api<Session> = Api::namespaced(context.client.clone(), &context.namespace);
    let session = sessions
        .get(&name)
        .await
        .map_err(|e| ops::explain(e, "get", "sessions.hookrun.dev", &context.namespace))?;
    let head = futures::stream::once(futures::future::ready(sse_json(
        "session",
        &view::session_view(&session, false),
    )));
    let followed = ops::follow(context, &name).map(|item| match item {
        Ok(Followed::Event { id, event }) => sse_json("event", &view::event_view(id, &event)),
        Ok(Followed::Phase(phase)) => sse_json("phase", &json!({"phase": phase.as_str()})),
        Ok(Followed::Finished(session)) => {
            let status = session.status.clone().unwrap_or_default();
            sse_json(
                "finished",
                &json!({
                    "phase": status.phase().as_str(),
                    "response": status.response,
                    "message": status.message,
                }),
            )
        }
        Err(error) => sse_error(&ApiError::from(error)),
    });
    Ok(sse(head.chain(followed)))
}

async fn invoke(
    State(console): State<Arc<Console>>,
    JsonBody(request): JsonBody<InvokeRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let env = request.check()?;
    let session = ops::invoke(&console.context, &request.agent, &request.title, &env).await?;
    Ok(Json(json!({"session": view::session_view(&session, true)})))
}

async fn send_input(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<InputRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    guard::check_name("session", &name)?;
    let message = request.check()?;
    let answer = ops::send_input(&console.context, &name, message).await?;
    Ok(Json(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escaping_covers_markup_and_quotes() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn kubernetes_refusals_keep_their_status_and_message() {
        let status = kube::core::Status::failure(
            r#"sessions.hookrun.dev is forbidden: User "alice" cannot create resource "sessions""#,
            "Forbidden",
        )
        .with_code(403);
        let error = ApiError::from(
            anyhow::Error::new(kube::Error::Api(Box::new(status)))
                .context("create a Session of Agent echo"),
        );
        let (code, body) = error.parts();
        assert_eq!(code, StatusCode::FORBIDDEN);
        assert_eq!(body["reason"], "Forbidden");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("create a Session of Agent echo: "),
            "{message}"
        );
        assert!(
            message.contains("cannot create resource \"sessions\""),
            "{message}"
        );

        let named = ApiError::from(anyhow::anyhow!(
            "forbidden: your kubeconfig identity may not create sessions.hookrun.dev"
        ));
        assert_eq!(named.parts().0, StatusCode::FORBIDDEN);
        assert_eq!(named.parts().1["reason"], "Forbidden");

        let other = ApiError::from(anyhow::anyhow!("the watch ended"));
        assert_eq!(other.parts().0, StatusCode::BAD_GATEWAY);
        let invalid = ApiError::from(Invalid {
            field: "title".into(),
            message: "at most 16384 bytes".into(),
        });
        assert_eq!(invalid.parts().0, StatusCode::BAD_REQUEST);
        assert_eq!(invalid.parts().1["field"], "title");
    }
}

#[cfg(test)]
mod router_tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt as _;

    const PORT: u16 = 4321;

    /// A console whose client points at a closed port: the guard answers before any
    /// handler would reach Kubernetes.
    fn console() -> (Router, String) {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("a URI"));
        let client = kube::Client::try_from(config).expect("a client");
        let token = ConsoleToken::generate();
        let secret = token.as_str().to_owned();
        let console = Console {
            context: Context {
                client,
                namespace: "team-a".to_owned(),
                output: crate::context::Output::Table,
            },
            token,
            port: PORT,
        };
        (app(Arc::new(console)), secret)
    }

    fn request(method: Method, uri: &str, host: &str) -> axum::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, host)
    }

    async fn send(router: &Router, request: Request) -> (StatusCode, HeaderMap, String) {
        let response = router.clone().oneshot(request).await.expect("answers");
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("a body");
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_page_needs_the_token_and_carries_it_to_its_assets_only() {
        let (router, token) = console();
        let host = format!("127.0.0.1:{PORT}");
        let page = request(Method::GET, &format!("/?token={token}"), &host)
            .body(Body::empty())
            .expect("a request");
        let (status, headers, body) = send(&router, page).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP);
        assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert!(
            body.contains(&format!("/console.js?token={token}")),
            "{body}"
        );
        assert!(body.contains("team-a"));

        for uri in [
            "/".to_owned(),
            "/?token=".to_owned(),
            format!("/?token={}", &token[1..]),
            format!("/?token={token}&token={token}"),
            "/console.js".to_owned(),
            "/api/agents".to_owned(),
            "/api/sessions/watch".to_owned(),
            "/nowhere".to_owned(),
        ] {
            let refused = request(Method::GET, &uri, &host)
                .body(Body::empty())
                .expect("a request");
            let (status, headers, body) = send(&router, refused).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
            assert_eq!(headers[header::CONTENT_SECURITY_POLICY], CSP, "{uri}");
            assert!(!body.contains(&token), "{uri}");
        }
        for asset in ["/console.js", "/console.css"] {
            let asset = request(Method::GET, &format!("{asset}?token={token}"), &host)
                .body(Body::empty())
                .expect("a request");
            assert_eq!(send(&router, asset).await.0, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn another_host_name_is_refused_even_with_the_token() {
        let (router, token) = console();
        for host in [
            format!("evil.example:{PORT}"),
            "127.0.0.1:80".to_owned(),
            String::new(),
        ] {
            let rebound = request(Method::GET, &format!("/?token={token}"), &host)
                .body(Body::empty())
                .expect("a request");
            assert_eq!(
                send(&router, rebound).await.0,
                StatusCode::FORBIDDEN,
                "{host}"
            );
        }
        let local = request(
            Method::GET,
            &format!("/?token={token}"),
            &format!("localhost:{PORT}"),
        )
        .body(Body::empty())
        .expect("a request");
        assert_eq!(send(&router, local).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn posts_must_be_same_origin_json_and_are_checked_before_kubernetes() {
        let (router, token) = console();
        let host = format!("127.0.0.1:{PORT}");
        let uri = format!("/api/invoke?token={token}");
        let form = request(Method::POST, &uri, &host)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from("agent=echo"))
            .expect("a request");
        assert_eq!(
            send(&router, form).await.0,
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );

        let cross = request(Method::POST, &uri, &host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ORIGIN, "http://evil.example")
            .body(Body::from(r#"{"agent":"echo"}"#))
            .expect("a request");
        assert_eq!(send(&router, cross).await.0, StatusCode::FORBIDDEN);

        let cases = [
            (uri.clone(), r#"{"agent":"Not A Name"}"#.to_owned(), "agent"),
            (uri.clone(), r#"{"agent":"echo","titel":"typo"}"#.to_owned(), "body"),
            (uri.clone(), "not json".to_owned(), "body"),
            (
                uri.clone(),
                serde_json::json!({"agent": "echo", "title": "x".repeat(guard::MAX_TITLE_BYTES + 1)})
                    .to_string(),
                "title",
            ),
            (
                format!("/api/sessions/..%2Fetc/input?token={token}"),
                r#"{"message":"hi"}"#.to_owned(),
                "session",
            ),
            (
                format!("/api/sessions/echo-1/input?token={token}"),
                r#"{"message":"  "}"#.to_owned(),
                "message",
            ),
        ];
        for (uri, body, field) in cases {
            let post = request(Method::POST, &uri, &host)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ORIGIN, format!("http://{host}"))
                .body(Body::from(body))
                .expect("a request");
            let (status, _, answer) = send(&router, post).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {answer}");
            let answer: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
            assert_eq!(answer["field"], field, "{answer}");
        }

        let huge = request(Method::POST, &uri, &host)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(vec![b' '; guard::MAX_BODY_BYTES + 1]))
            .expect("a request");
        let (status, _, _) = send(&router, huge).await;
        assert!(
            status == StatusCode::PAYLOAD_TOO_LARGE || status == StatusCode::BAD_REQUEST,
            "{status}"
        );
    }
}
