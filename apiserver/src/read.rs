//! The read API, for holders of a Kubernetes token allowed to `get` Sessions:
//! `GET /agents/{session}?namespace=` (where the Session is), `.../events` (its stored
//! events, optionally of one type) and `.../stream` (Server-Sent Events: the stored
//! events, then live ones from the [`SessionHub`], until `session.status_closed`).
//!
//! A stream resumes after the id in `Last-Event-ID`. When the server drains, each open
//! stream ends with a `session.reconnect` event carrying the last id it sent and a
//! `retry:` hint, so clients reconnect (to another replica) and lose nothing.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{Extensions, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use hookrun_crds::Session;
use hookrun_crds::session::{SessionEvent, SessionStatus, event_types};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::access_log::{AccessLog, api_access_log};
use crate::api::{ApiState, bearer_token};
use crate::client_ip;
use crate::dns_name::{is_dns_label, is_dns_subdomain};
use crate::error::HttpError;
use crate::hub::{Seen, Subscription};

/// How long a stream stays quiet before it sends a heartbeat comment.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(15);

/// The route templates, which are also the access log's and metrics' route labels.
const SESSION_ROUTE: &str = "/agents/{session}";
const EVENTS_ROUTE: &str = "/agents/{session}/events";
const STREAM_ROUTE: &str = "/agents/{session}/stream";
const ROUTES: [&str; 3] = [SESSION_ROUTE, EVENTS_ROUTE, STREAM_ROUTE];

/// The read routes, with their access log and metrics.
pub fn router(state: ApiState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route(SESSION_ROUTE, get(session_summary))
        .route(EVENTS_ROUTE, get(session_events))
        .route(STREAM_ROUTE, get(session_stream))
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            AccessLog {
                metrics,
                routes: &ROUTES,
            },
            api_access_log,
        ))
}

/// The query of every read route.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ReadQuery {
    namespace: Option<String>,
    event_type: Option<String>,
}

/// The namespace a read is about: 400 naming the parameter when it is missing or not a
/// namespace name (the value is not echoed).
fn namespace(query: &Result<Query<ReadQuery>, QueryRejection>) -> Result<String, HttpError> {
    let query = query.as_ref().map_err(|_| {
        HttpError::bad_request(
            "the query string is not valid: send ?namespace=<the Session's namespace> and, \
             for events, &event_type=<type>",
        )
    })?;
    match query.namespace.as_deref().map(str::trim) {
        Some(ns) if is_dns_label(ns) => Ok(ns.to_owned()),
        Some(ns) if !ns.is_empty() => Err(HttpError::bad_request(
            "the query parameter namespace is not a namespace name: use a DNS-1123 label, \
             1 to 63 lowercase letters, digits and '-', starting and ending with a letter or \
             digit",
        )),
        _ => Err(HttpError::bad_request(
            "the query parameter namespace is required: add ?namespace=<the Session's namespace>",
        )),
    }
}

/// The Session name of the path: 400 when it is not an object name (the value is not
/// echoed).
fn session_name(path: Result<Path<String>, PathRejection>) -> Result<String, HttpError> {
    const NOT_A_NAME: &str = "the session in the path /agents/{session} is not a Session \
                              name: use a DNS-1123 subdomain, at most 253 lowercase letters, \
                              digits, '-' and '.'";
    match path {
        Ok(Path(name)) if is_dns_subdomain(&name) => Ok(name),
        _ => Err(HttpError::bad_request(NOT_A_NAME)),
    }
}

/// The validated `(namespace, session name)` a read is about; checked before anything
/// else, authentication included.
fn target(
    path: Result<Path<String>, PathRejection>,
    query: &Result<Query<ReadQuery>, QueryRejection>,
) -> Result<(String, String), HttpError> {
    let name = session_name(path)?;
    let namespace = namespace(query)?;
    Ok((namespace, name))
}

/// The address whose review attempts a request spends: the TCP peer, or behind trusted
/// proxies the first untrusted `X-Forwarded-For` hop (the peer when that hop is not
/// readable).
pub(crate) fn client_address(
    state: &ApiState,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> IpAddr {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let forwarded = client_ip::forwarded_for_values(headers);
    client_ip::resolve_client_ip(peer, &forwarded, &state.trusted_proxies).unwrap_or(peer)
}

/// Checks the caller's token and RBAC for Session `name`, then reads it (404 when
/// unknown).
async fn authorized_session(
    state: &ApiState,
    headers: &HeaderMap,
    extensions: &Extensions,
    namespace: &str,
    name: &str,
) -> Result<Session, HttpError> {
    let token = bearer_token(headers).ok_or(HttpError::Unauthorized(
        "send a Kubernetes token allowed to get sessions.hookrun.dev as Authorization: \
         Bearer <token>",
    ))?;
    let client = state.client.clone();
    let address = client_address(state, headers, extensions);
    state
        .auth
        .reader(&client, token, namespace, name, address)
        .await?;
    read_session(state, namespace, name).await
}

async fn read_session(state: &ApiState, namespace: &str, name: &str) -> Result<Session, HttpError> {
    cached_session(state, namespace, name)
        .await
        .map_err(|error| HttpError::cluster("read the Session", &error))?
        .ok_or_else(|| HttpError::session_not_found(namespace, name))
}

/// The Session `namespace/name` for the read and runner APIs: from the hub's read cache
/// once the index has synced (the watch keeps it current). A live read remains where
/// the cache cannot answer: before the first sync (the watch may not have delivered
/// the Session yet, so nothing is stored), and on a miss (read once, then held; the
/// pending mark lets events during the read land). Writes read live again after a 409
/// (see [`crate::session_status`]), since a conflict means the read was stale.
pub(crate) async fn cached_session(
    state: &ApiState,
    namespace: &str,
    name: &str,
) -> Result<Option<Session>, kube::Error> {
    let api = Api::<Session>::namespaced(state.client.clone(), namespace);
    let synced = state.index.as_ref().is_some_and(|index| {
        index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_synced()
    });
    if !synced {
        return api.get_opt(name).await;
    }
    let cache = &state.hub.read_cache;
    if let Some(session) = cache.get(namespace, name) {
        return Ok(Some(Session::clone(&session)));
    }
    cache.begin_read(namespace, name);
    let read = api.get_opt(name).await;
    match &read {
        Ok(Some(session)) => cache.store_read(session),
        Ok(None) | Err(_) => cache.forget_read(namespace, name),
    }
    read
}

/// The answer of `GET /agents/{session}`.
pub(crate) fn summary(session: &Session) -> serde_json::Value {
    let status = session.status.clone().unwrap_or_default();
    json!({
        "session": session.name_any(),
        "namespace": session.namespace(),
        "agentDefinition": session.spec.agent,
        "phase": status.phase(),
        "title": session.spec.title,
        "createdAt": session.metadata.creation_timestamp,
        "startTime": status.start_time,
        "completionTime": status.completion_time,
        "response": status.response,
        "message": status.message,
        "eventCount": status.events.len(),
        "droppedEvents": status.dropped_events.unwrap_or(0),
    })
}

/// One event as the read API shows it.
fn event_json(event: &SessionEvent) -> serde_json::Value {
    json!({"type": event.type_, "content": event.content, "timestamp": event.timestamp})
}

/// The answer of `GET /agents/{session}/events`: every stored event, or those of
/// `event_type`.
pub(crate) fn events(status: &SessionStatus, event_type: Option<&str>) -> serde_json::Value {
    let events: Vec<_> = status
        .events
        .iter()
        .filter(|e| event_type.is_none_or(|t| e.type_ == t))
        .map(event_json)
        .collect();
    json!({"count": events.len(), "events": events})
}

async fn session_summary(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Response {
    let result = async {
        let (namespace, name) = target(path, &query)?;
        let session = authorized_session(&state, &headers, &extensions, &namespace, &name).await?;
        Ok::<_, HttpError>(Json(summary(&session)))
    }
    .await;
    result.into_response()
}

async fn session_events(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Response {
    let result = async {
        let (namespace, name) = target(path, &query)?;
        let session = authorized_session(&state, &headers, &extensions, &namespace, &name).await?;
        let event_type = query
            .ok()
            .and_then(|q| q.0.event_type)
            .filter(|t| !t.is_empty());
        let status = session.status.unwrap_or_default();
        Ok::<_, HttpError>(Json(events(&status, event_type.as_deref())))
    }
    .await;
    result.into_response()
}

/// One SSE message: `id`, `event` (the type) and `data` (the event as one line of JSON).
pub(crate) fn sse_event(id: u64, event: &SessionEvent) -> Event {
    // JSON escapes newlines, so `data` is one line; the type has no newline by
    // validation, but a stray one must not split the frame either.
    let type_: String = event
        .type_
        .chars()
        .filter(|c| *c != '\n' && *c != '\r')
        .collect();
    Event::default()
        .id(id.to_string())
        .event(type_)
        .data(event_json(event).to_string())
}

/// The comment a quiet stream sends so proxies and clients keep it open.
pub(crate) const HEARTBEAT_TEXT: &str = "heartbeat";

/// The type of the last event of a stream the server closes while draining.
pub(crate) const RECONNECT: &str = "session.reconnect";

/// How long a client waits before it reconnects after [`RECONNECT`] (the `retry:` hint).
pub(crate) const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The last event of a stream closed by a drain: its id is the last one the stream sent
/// (so `Last-Event-ID` resumes right after it), with a `retry:` hint.
pub(crate) fn reconnect_event(last_id: u64) -> Event {
    let data = json!({
        "type": RECONNECT,
        "lastEventId": last_id,
        "content": "the server is shutting down: reconnect with Last-Event-ID to resume",
    });
    Event::default()
        .id(last_id.to_string())
        .event(RECONNECT)
        .retry(RECONNECT_AFTER)
        .data(data.to_string())
}

/// The id after which a resumed stream continues: `Last-Event-ID`, when it is a number.
pub(crate) fn last_event_id(headers: &HeaderMap) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The events of `status` with ids above `after`, with their ids; returns them and the
/// highest id seen.
pub(crate) fn events_after(status: &SessionStatus, after: u64) -> (Vec<(u64, Event)>, u64) {
    let first = status.first_event_id();
    let mut last = after;
    let events = status
        .events
        .iter()
        .enumerate()
        .map(|(i, event)| (first + i as u64, event))
        .filter(|(id, _)| *id > after)
        .map(|(id, event)| {
            last = last.max(id);
            (id, sse_event(id, event))
        })
        .collect();
    (events, last)
}

/// Whether a stream that has sent everything in `status` is over: the Session finished
/// (its last event is `session.status_closed`).
fn closed(status: &SessionStatus) -> bool {
    status.is_finished()
        || status
            .events
            .last()
            .is_some_and(|e| e.type_ == event_types::STATUS_CLOSED)
}

/// A stream's state between events.
struct Stream {
    subscription: Subscription,
    uid: Option<String>,
    /// The id of the last event queued (sent or about to be).
    last_id: u64,
    queued: VecDeque<Event>,
    done: bool,
}

impl Stream {
    /// Queues what `session` holds beyond what was sent; marks the stream done once the
    /// Session is closed.
    fn take(&mut self, session: &Session) {
        let status = session.status.clone().unwrap_or_default();
        let (events, last) = events_after(&status, self.last_id);
        self.queued
            .extend(events.into_iter().map(|(_, event)| event));
        self.last_id = last;
        if closed(&status) {
            self.done = true;
        }
    }

    /// The next event: queued ones first, then whatever the hub brings; when the server
    /// drains, [`reconnect_event`]. `None` ends the stream. Heartbeats are the
    /// [`KeepAlive`]'s.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            let flushed = self.subscription.flushed();
            let changed = tokio::select! {
                biased;
                () = flushed => {
                    self.done = true;
                    return Some(reconnect_event(self.last_id));
                }
                changed = self.subscription.changed() => changed,
            };
            match changed {
                None | Some(Seen::Deleted) => self.done = true,
                Some(Seen::Nothing) => {}
                Some(Seen::Session(session)) => {
                    // Another Session of the same name (deleted, made again) is not ours.
                    if session.metadata.uid != self.uid {
                        self.done = true;
                    } else {
                        self.take(&session);
                    }
                }
            }
        }
    }
}

/// Opens a stream on Session `name`: follows it in the hub first, then reads it once.
async fn open_stream(
    state: &ApiState,
    namespace: &str,
    name: &str,
    last_id: u64,
    headers: &HeaderMap,
    extensions: &Extensions,
) -> Result<Stream, HttpError> {
    let subscription = state.hub.subscribe(namespace, name);
    let session = authorized_session(state, headers, extensions, namespace, name).await?;
    let mut stream = Stream {
        subscription,
        uid: session.metadata.uid.clone(),
        last_id,
        queued: VecDeque::new(),
        done: false,
    };
    stream.take(&session);
    Ok(stream)
}

async fn session_stream(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
    extensions: Extensions,
) -> Response {
    let result = async {
        let (namespace, name) = target(path, &query)?;
        let last_id = last_event_id(&headers);
        open_stream(&state, &namespace, &name, last_id, &headers, &extensions).await
    }
    .await;
    let stream = match result {
        Ok(stream) => stream,
        Err(error) => return error.into_response(),
    };
    sse_response(stream)
}

/// The SSE answer of an open stream: its events, with a heartbeat comment after
/// [`HEARTBEAT`] of quiet. The stream (and its hub subscription) is dropped when the
/// client goes away.
fn sse_response(stream: Stream) -> Response {
    let events = futures::stream::unfold(stream, |mut stream| async move {
        let event = stream.next().await?;
        Some((Ok::<_, std::convert::Infallible>(event), stream))
    });
    let keep_alive = KeepAlive::new().interval(HEARTBEAT).text(HEARTBEAT_TEXT);
    let mut response = Sse::new(events).keep_alive(keep_alive).into_response();
    // Proxies such as nginx buffer responses unless told not to.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::hub::SessionHub;

    fn at() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    /// What `events` look like on the wire of an SSE answer.
    async fn wire(events: Vec<Event>) -> String {
        let stream =
            futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
        let body = Sse::new(stream).into_response().into_body();
        let bytes = axum::body::to_bytes(body, usize::MAX)
            .await
            .expect("a body");
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The wire text of a stream's next event, `None` when it ends.
    async fn next_on_wire(stream: &mut Stream) -> Option<String> {
        let event = stream.next().await?;
        Some(wire(vec![event]).await)
    }

    fn status_with(contents: &[&str]) -> SessionStatus {
        let mut status = SessionStatus::default();
        for content in contents {
            status.push_event("agent.message", content, at());
        }
        status
    }

    #[tokio::test]
    async fn frames_carry_the_id_the_type_and_one_line_of_json() {
        let status = status_with(&["line one\nline two"]);
        let frame = wire(vec![sse_event(7, &status.events[0])]).await;
        let lines: Vec<&str> = frame.split('\n').collect();
        assert_eq!(lines[0], "id: 7");
        assert_eq!(lines[1], "event: agent.message");
        assert!(lines[2].starts_with("data: {"), "{frame}");
        assert_eq!(&lines[3..], ["", ""]);
        let data: serde_json::Value =
            serde_json::from_str(lines[2].trim_start_matches("data: ")).expect("JSON");
        assert_eq!(data["type"], "agent.message");
        assert_eq!(data["content"], "line one\nline two");
        assert_eq!(data["timestamp"], "1970-01-01T00:00:00Z");
    }

    #[tokio::test]
    async fn the_reconnect_event_names_the_last_id_and_a_retry_hint() {
        let frame = wire(vec![reconnect_event(4)]).await;
        let lines: Vec<&str> = frame.split('\n').collect();
        assert_eq!(lines[0], "id: 4");
        assert_eq!(lines[1], "event: session.reconnect");
        assert_eq!(lines[2], "retry: 1000");
        let data: serde_json::Value =
            serde_json::from_str(lines[3].trim_start_matches("data: ")).expect("JSON");
        assert_eq!(data["lastEventId"], 4);
        assert_eq!(&lines[4..], ["", ""]);
    }

    #[tokio::test]
    async fn last_event_id_resumes_after_that_id() {
        let mut headers = HeaderMap::new();
        assert_eq!(last_event_id(&headers), 0);
        headers.insert("last-event-id", HeaderValue::from_static(" 2 "));
        assert_eq!(last_event_id(&headers), 2);
        headers.insert("last-event-id", HeaderValue::from_static("nope"));
        assert_eq!(last_event_id(&headers), 0);

        let status = status_with(&["a", "b", "c"]);
        let (frames, last) = events_after(&status, 2);
        assert_eq!(last, 3);
        let ids: Vec<u64> = frames.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [3]);
        let (frames, _) = events_after(&status, 2);
        let text = wire(frames.into_iter().map(|(_, e)| e).collect()).await;
        assert!(text.starts_with("id: 3\n"), "{text}");
        let (frames, last) = events_after(&status, 0);
        assert_eq!((frames.len(), last), (3, 3));
        let (frames, last) = events_after(&status, 9);
        assert_eq!((frames.len(), last), (0, 9));
    }

    #[test]
    fn ids_stay_stable_when_old_events_are_dropped() {
        let mut status = status_with(&["a", "b", "c"]);
        status.events.remove(0);
        status.dropped_events = Some(1);
        let ids = |after| -> Vec<u64> {
            events_after(&status, after)
                .0
                .iter()
                .map(|(id, _)| *id)
                .collect()
        };
        assert_eq!(ids(0), [2, 3]);
        assert_eq!(ids(2), [3]);
    }

    #[test]
    fn events_filter_by_type_and_the_summary_counts_them() {
        let mut status = status_with(&["a", "b"]);
        status.push_event("tool.call", "t", at());
        let all = events(&status, None);
        assert_eq!(all["count"], 3);
        let some = events(&status, Some("tool.call"));
        assert_eq!(some["count"], 1);
        assert_eq!(some["events"][0]["content"], "t");
        assert_eq!(events(&status, Some("none"))["events"], json!([]));
        assert!(!closed(&status));
        status.finish(hookrun_crds::SessionPhase::Complete, Some("b"), None, at());
        assert!(closed(&status));
    }

    #[test]
    fn a_missing_namespace_names_the_parameter() {
        let missing: Result<Query<ReadQuery>, QueryRejection> = Ok(Query(ReadQuery::default()));
        let error = namespace(&missing).expect_err("required");
        assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(error.to_string().contains("namespace"));
        let given = Ok(Query(ReadQuery {
            namespace: Some("team".into()),
            event_type: None,
        }));
        assert_eq!(namespace(&given), Ok("team".to_owned()));
    }

    #[test]
    fn names_that_are_not_kubernetes_names_are_refused_without_being_echoed() {
        let long = "a".repeat(64 * 1024);
        for bad in [long.as_str(), "Team", "team?x=1", "a/b", "-a"] {
            let query = Ok(Query(ReadQuery {
                namespace: Some(bad.to_owned()),
                event_type: None,
            }));
            let error = namespace(&query).expect_err(bad);
            assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
            assert!(
                error.to_string().contains("namespace"),
                "{}",
                error.to_string()
            );
            assert!(
                error.to_string().contains("DNS-1123 label"),
                "{}",
                error.to_string()
            );
            assert!(!error.to_string().contains(bad), "{}", error.to_string());
        }
        for bad in ["s/status", "s?watch=true", "UPPER", ".."] {
            let error = session_name(Ok(Path(bad.to_owned()))).expect_err(bad);
            assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);
            assert!(error.to_string().contains("DNS-1123 subdomain"));
            assert!(!error.to_string().contains(bad), "{}", error.to_string());
        }
        assert_eq!(
            session_name(Ok(Path("agent-wh-0123abcd".to_owned()))),
            Ok("agent-wh-0123abcd".to_owned())
        );
    }

    async fn get(app: &Router, uri: &str, token: Option<&str>) -> Response {
        use tower::ServiceExt;
        let mut request = axum::http::Request::get(uri);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        app.clone()
            .oneshot(request.body(axum::body::Body::empty()).expect("a request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn bad_names_are_400_before_the_token_is_looked_at() {
        // No cluster: anything that got as far as authentication would be 401 or 503.
        let state = ApiState::new(
            crate::api::unreachable_client(),
            SessionHub::new(),
            std::sync::Arc::new(crate::metrics::Metrics::default()),
        );
        let app = router(state);
        let long = "a".repeat(60_000);
        let uris = [
            "/agents/s%2Fstatus?namespace=team".to_owned(),
            "/agents/s%3Fwatch=1?namespace=team".to_owned(),
            "/agents/%FF?namespace=team".to_owned(),
            "/agents/s/events?namespace=Team".to_owned(),
            "/agents/s/stream?namespace=team%2Fsessions".to_owned(),
            format!("/agents/s?namespace={long}"),
        ];
        for uri in &uris {
            for token in [None, Some("t")] {
                let response = get(&app, uri, token).await;
                assert_eq!(
                    response.status(),
                    axum::http::StatusCode::BAD_REQUEST,
                    "{}",
                    &uri[..uri.len().min(80)]
                );
            }
        }
        let fine = get(&app, "/agents/s?namespace=team", Some("t")).await;
        assert_eq!(fine.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_stream_replays_then_follows_the_hub_and_ends_when_closed() {
        let hub = SessionHub::new();
        let mut session = crate::index::test_support::session(
            "team",
            "s",
            "a",
            Some(hookrun_crds::SessionPhase::Running),
        );
        session.metadata.uid = Some("uid-1".into());
        let mut status = status_with(&["one", "two"]);
        session.status = Some(status.clone());
        let mut stream = Stream {
            subscription: hub.subscribe("team", "s"),
            uid: Some("uid-1".into()),
            last_id: 1,
            queued: VecDeque::new(),
            done: false,
        };
        stream.take(&session);
        assert!(
            next_on_wire(&mut stream)
                .await
                .is_some_and(|f| f.starts_with("id: 2\n"))
        );

        status.push_event("agent.message", "three", at());
        status.finish(hookrun_crds::SessionPhase::Complete, None, None, at());
        session.status = Some(status.clone());
        hub.publish(&session);
        // The same Session published twice: each event is sent once.
        hub.publish(&session);
        let three = next_on_wire(&mut stream).await.expect("a frame");
        assert!(
            three.starts_with("id: 3\nevent: agent.message\n"),
            "{three}"
        );
        let closing = next_on_wire(&mut stream).await.expect("a frame");
        assert!(
            closing.contains("event: session.status_closed"),
            "{closing}"
        );
        assert!(next_on_wire(&mut stream).await.is_none());
    }

    fn quiet_stream(hub: &std::sync::Arc<SessionHub>, session: &Session, last_id: u64) -> Stream {
        Stream {
            subscription: hub.subscribe("team", "s"),
            uid: session.metadata.uid.clone(),
            last_id,
            queued: VecDeque::new(),
            done: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_sends_heartbeats_and_a_deleted_session_ends_it() {
        use http_body_util::BodyExt;
        let hub = SessionHub::new();
        let session = crate::index::test_support::session("team", "s", "a", None);
        let mut body = sse_response(quiet_stream(&hub, &session, 0)).into_body();
        let frame = body
            .frame()
            .await
            .expect("a frame")
            .expect("readable")
            .into_data()
            .expect("data");
        assert_eq!(&frame[..], b": heartbeat\n\n");
        hub.publish_deleted(&session);
        assert!(body.frame().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn a_drain_ends_a_stream_with_the_reconnect_event() {
        let hub = SessionHub::new();
        let session = crate::index::test_support::session("team", "s", "a", None);
        let mut stream = quiet_stream(&hub, &session, 3);
        let flusher = hub.clone();
        tokio::spawn(async move { flusher.flush() });
        let last = tokio::time::timeout(Duration::from_secs(5), next_on_wire(&mut stream))
            .await
            .expect("the flush ends the stream")
            .expect("the last event");
        assert!(
            last.starts_with("id: 3\nevent: session.reconnect\nretry: 1000\n"),
            "{last}"
        );
        assert!(next_on_wire(&mut stream).await.is_none());
    }
}
