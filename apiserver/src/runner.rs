//! The runner API, called by session pods with their projected, pod-bound token:
//! `GET /runner/v1/session` (what to run), `POST /runner/v1/events` (append an event) and
//! `POST /runner/v1/complete` (the outcome), and `GET /runner/v1/inputs?after=&wait=`
//! (a long-poll for the `user.message` events after a cursor, answered from the Session
//! watch). A token speaks only for the Session named like its pod, in its namespace,
//! whose `status.podUid` is that pod's uid.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use hookrun_crds::agent::EnvVar;
use hookrun_crds::session::{SessionEnvVar, SessionStatus};
use hookrun_crds::{Agent, Session, SessionPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Map, Value, json};

use crate::access_log::{AccessLog, api_access_log};
use crate::api::{ApiState, MAX_BODY_BYTES, bearer_token};
use crate::auth::PodIdentity;
use crate::error::HttpError;
use crate::http_limits::read_body;
use crate::index::{AgentKey, RunnerAgent, runner_agent};
use crate::session_status::StatusError;

/// The longest event type.
const MAX_EVENT_TYPE_LEN: usize = 64;

/// The route templates, which are also the access log's and metrics' route labels.
const SESSION_ROUTE: &str = "/runner/v1/session";
const EVENTS_ROUTE: &str = "/runner/v1/events";
const COMPLETE_ROUTE: &str = "/runner/v1/complete";
const INPUTS_ROUTE: &str = "/runner/v1/inputs";
const CLOSE_INPUTS_ROUTE: &str = "/runner/v1/inputs/close";
const ROUTES: [&str; 5] = [
    SESSION_ROUTE,
    EVENTS_ROUTE,
    COMPLETE_ROUTE,
    INPUTS_ROUTE,
    CLOSE_INPUTS_ROUTE,
];
/// The longest a long-poll for input is held, in seconds (below the harness's own
/// request timeout, so an idle poll is answered, not cut).
pub const MAX_INPUT_WAIT_SECONDS: u64 = 25;

/// The runner routes, with their access log and metrics.
pub(crate) fn router(state: ApiState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route(SESSION_ROUTE, get(session_context))
        .route(EVENTS_ROUTE, post(append_event))
        .route(COMPLETE_ROUTE, post(complete))
        .route(INPUTS_ROUTE, get(inputs))
        .route(CLOSE_INPUTS_ROUTE, post(close_inputs))
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            AccessLog {
                metrics,
                routes: &ROUTES,
            },
            api_access_log,
        ))
}

/// Whether a pod is a Session's own pod, as far as the Session's status says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PodClaim {
    Owns,
    NotYours,
    /// The status names no pod yet: the pod can start before the operator records it.
    NotRecordedYet,
}

/// Whether `pod` is the Session's own pod: its uid when the operator wrote one, else its
/// name.
pub(crate) fn session_owns_pod(status: Option<&SessionStatus>, pod: &PodIdentity) -> PodClaim {
    let claim = |owns: bool| {
        if owns {
            PodClaim::Owns
        } else {
            PodClaim::NotYours
        }
    };
    match status.map(|s| (&s.pod_uid, &s.pod_name)) {
        Some((Some(uid), _)) => claim(*uid == pod.pod_uid),
        Some((None, Some(name))) => claim(*name == pod.pod_name),
        Some((None, None)) | None => PodClaim::NotRecordedYet,
    }
}

/// The calling pod's Session, read once (from the read cache), its collection and the
/// pod the token is bound to.
struct Caller {
    sessions: Api<Session>,
    session: Session,
    client: kube::Client,
    pod: PodIdentity,
}

/// The token's pod is not the Session's pod.
fn not_yours() -> HttpError {
    HttpError::Forbidden(
        "the token's pod is not the pod of a Session: only a session's own pod may call the \
         runner API",
    )
}

/// Whether `pod` may act for a Session in the state `status`.
fn check_claim(status: Option<&SessionStatus>, pod: &PodIdentity) -> Result<(), HttpError> {
    match session_owns_pod(status, pod) {
        PodClaim::Owns => Ok(()),
        PodClaim::NotYours => Err(not_yours()),
        // Retryable: the operator writes the pod into the status right after creating it.
        PodClaim::NotRecordedYet => Err(HttpError::PodNotRecorded),
    }
}

async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Caller, HttpError> {
    let token = bearer_token(headers).ok_or(HttpError::Unauthorized(
        "send the pod's projected token (the file at HOOKRUN_TOKEN_FILE) as \
         Authorization: Bearer <token>",
    ))?;
    let client = state.client.clone();
    let pod = state.auth.runner(&client, token).await?;
    let sessions: Api<Session> = Api::namespaced(client.clone(), &pod.namespace);
    let session = crate::read::cached_session(state, &pod.namespace, &pod.pod_name)
        .await
        .map_err(|error| HttpError::cluster("read the Session", &error))?
        .ok_or_else(not_yours)?;
    check_claim(session.status.as_ref(), &pod)?;
    Ok(Caller {
        sessions,
        session,
        client,
        pod,
    })
}

/// The Agent's literal env, then the Session's overrides (same name: the Session wins).
/// Values from Secrets or ConfigMaps are not served: the pod gets those from its spec.
pub(crate) fn merged_env(agent: &[EnvVar], session: &[SessionEnvVar]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = agent
        .iter()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    for over in session {
        match env.iter_mut().find(|(name, _)| *name == over.name) {
            Some(slot) => slot.1 = over.value.clone(),
            None => env.push((over.name.clone(), over.value.clone())),
        }
    }
    env
}

/// The runner's view of its Session.
pub(crate) fn context(session: &Session, agent: Option<&RunnerAgent>) -> Value {
    let spec = agent;
    let agent_env = spec.map(|a| a.env.as_slice()).unwrap_or_default();
    let env: Vec<Value> = merged_env(agent_env, &session.spec.env)
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    let exec = spec
        .and_then(|s| s.exec.as_ref())
        .map(|e| json!({"command": e.command, "workingDir": e.working_dir}));
    json!({
        "session": session.name_any(),
        "namespace": session.namespace(),
        "agent": session.spec.agent,
        "title": session.spec.title,
        "system": spec.and_then(|s| s.system.clone()),
        "models": spec.map(|s| s.models.clone()).unwrap_or_default(),
        "exec": exec,
        "env": env,
        "trigger": session.spec.trigger,
        "phase": session.status.as_ref().map(SessionStatus::phase).unwrap_or_default(),
        "idleTimeoutSeconds": spec.map_or(0, |s| s.idle_timeout_seconds),
        "history": session.spec.history,
    })
}

/// `after` and `wait` of `GET /runner/v1/inputs`.
#[derive(Debug, PartialEq, Eq)]
pub struct InputQuery {
    /// The event id after which inputs are wanted (0: every kept input).
    pub after: u64,
    /// How long to hold the request while there is none, at most
    /// [`MAX_INPUT_WAIT_SECONDS`].
    pub wait: std::time::Duration,
}

/// Parses the query of `GET /runner/v1/inputs`: `after=<event id>` (default 0) and
/// `wait=<seconds>` (default 0, capped at [`MAX_INPUT_WAIT_SECONDS`]); errors name the
/// parameter.
pub fn parse_input_query(query: Option<&str>) -> Result<InputQuery, HttpError> {
    let mut parsed = InputQuery {
        after: 0,
        wait: std::time::Duration::ZERO,
    };
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let number = |what: &str| {
            value.parse::<u64>().map_err(|_| {
                HttpError::bad_request(format!(
                    "{name} must be a whole number of {what}, e.g. {name}=0"
                ))
            })
        };
        match name {
            "after" => parsed.after = number("events")?,
            "wait" => {
                parsed.wait =
                    std::time::Duration::from_secs(number("seconds")?.min(MAX_INPUT_WAIT_SECONDS));
            }
            // Other parameters are left for later versions of the harness.
            _ => {}
        }
    }
    Ok(parsed)
}

/// The answer of an input poll when there is something to say: the inputs after
/// `after`, or that the Session has finished. `None` while there is neither.
pub(crate) fn input_answer(session: &Session, after: u64) -> Option<Value> {
    let status = session.status.clone().unwrap_or_default();
    let inputs: Vec<Value> = status
        .inputs_after(after)
        .into_iter()
        .map(|(id, content)| json!({"id": id, "content": content}))
        .collect();
    (!inputs.is_empty() || status.is_finished()).then(|| {
        json!({
            "inputs": inputs,
            "phase": status.phase(),
            "finished": status.is_finished(),
        })
    })
}

async fn inputs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let result = async {
        let query = parse_input_query(query.as_deref())?;
        let caller = caller(&state, &headers).await?;
        let namespace = caller.session.namespace().unwrap_or_default();
        let name = caller.session.name_any();
        let uid = caller.session.metadata.uid.clone();
        // Follow the Session before looking at it, so no change falls in between; the
        // read cache is fed by the same watch, so it is at least as new as the read.
        let mut subscription = state.hub.subscribe(&namespace, &name);
        let mut current = state
            .hub
            .read_cache
            .get(&namespace, &name)
            .map_or(caller.session, |s| Session::clone(&s));
        let deadline = tokio::time::Instant::now() + query.wait;
        loop {
            if let Some(answer) = input_answer(&current, query.after) {
                return Ok::<_, HttpError>(Json(answer));
            }
            let flushed = subscription.flushed();
            let changed = tokio::select! {
                biased;
                () = flushed => break,
                changed = tokio::time::timeout_at(deadline, subscription.changed()) => changed,
            };
            match changed {
                Ok(Some(crate::hub::Seen::Session(session))) => {
                    if uid.is_none() || session.metadata.uid == uid {
                        current = Session::clone(&session);
                    }
                }
                Ok(Some(crate::hub::Seen::Nothing)) => {}
                Ok(Some(crate::hub::Seen::Deleted)) => {
                    return Err(HttpError::session_not_found(&namespace, &name));
                }
                // The wait ran out, or the hub is gone (the server stops).
                Err(_) | Ok(None) => break,
            }
        }
        let status = current.status.clone().unwrap_or_default();
        Ok(Json(json!({
            "inputs": [],
            "phase": status.phase(),
            "finished": status.is_finished(),
        })))
    }
    .await;
    result.into_response()
}

async fn session_context(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let result = async {
        let caller = caller(&state, &headers).await?;
        let namespace = caller.session.namespace().unwrap_or_default();
        let key = AgentKey::new(namespace.clone(), caller.session.spec.agent.clone());
        // From the watched index once it has listed (no Agent there: none in the
        // cluster); before that, one list by name (the apiserver's RBAC grants list/watch
        // on Agents and nothing more).
        let cached = state.index.as_ref().and_then(|index| {
            let index = index
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            index.is_synced().then(|| index.runner_agent(&key))
        });
        let agent = match cached {
            Some(agent) => agent,
            None => {
                let selector = format!("metadata.name={}", key.name);
                Api::<Agent>::namespaced(caller.client, &namespace)
                    .list(&ListParams::default().fields(&selector))
                    .await
                    .map_err(|error| HttpError::cluster("read the Agent", &error))?
                    .items
                    .first()
                    .map(|agent| std::sync::Arc::new(runner_agent(agent)))
            }
        };
        Ok::<_, HttpError>(Json(context(&caller.session, agent.as_deref())))
    }
    .await;
    result.into_response()
}

/// Checks an event type: `^[a-z0-9][a-z0-9._-]{0,63}$`, and not `session.*` (hookrun's).
pub fn validate_event_type(type_: &str) -> Result<(), String> {
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c);
    let first_ok = type_
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok || type_.len() > MAX_EVENT_TYPE_LEN || !type_.chars().all(valid) {
        return Err(format!(
            "type must match ^[a-z0-9][a-z0-9._-]{{0,63}}$, e.g. agent.message; got {} \
             characters that do not",
            type_.chars().count()
        ));
    }
    if type_.starts_with("session.") {
        return Err("type session.* is reserved for hookrun's own events".to_owned());
    }
    Ok(())
}

fn json_object(raw: &[u8]) -> Result<Map<String, Value>, HttpError> {
    match serde_json::from_slice(raw) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HttpError::bad_request("the body must be a JSON object")),
        Err(error) => Err(HttpError::bad_request(format!(
            "the body is not JSON ({error}): send a JSON object"
        ))),
    }
}

/// An optional string field (absent and `null` are both `None`).
fn optional_string(body: &Map<String, Value>, field: &str) -> Result<Option<String>, HttpError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(HttpError::bad_request(format!("{field} must be a string"))),
    }
}

/// `{"type": "...", "content": "...", "idempotencyKey"?: "..."}` of
/// `POST /runner/v1/events`.
#[derive(Debug, PartialEq, Eq)]
pub struct NewEvent {
    pub type_: String,
    pub content: String,
    /// The sender's key for this event: a repeat with the same key is stored once.
    pub key: Option<String>,
}

/// Parses and checks an event body; errors name the field.
pub fn parse_event(raw: &[u8]) -> Result<NewEvent, HttpError> {
    let body = json_object(raw)?;
    let type_ = optional_string(&body, "type")?
        .ok_or_else(|| HttpError::bad_request("type is required, e.g. \"agent.message\""))?;
    validate_event_type(&type_).map_err(HttpError::bad_request)?;
    let content = optional_string(&body, "content")?.unwrap_or_default();
    let key = optional_string(&body, "idempotencyKey")?;
    if let Some(key) = &key
        && !hookrun_crds::session::valid_event_key(key)
    {
        return Err(HttpError::bad_request(format!(
            "idempotencyKey must be 1 to {} ASCII letters, digits, '-', '_' or '.'",
            hookrun_crds::session::MAX_EVENT_KEY_LEN
        )));
    }
    Ok(NewEvent {
        type_,
        content,
        key,
    })
}

/// Parses `{"after": <event id>}` of `POST /runner/v1/inputs/close`: the last input the
/// harness has read (0: only the title).
pub fn parse_close(raw: &[u8]) -> Result<u64, HttpError> {
    let body = json_object(raw)?;
    match body.get("after") {
        None | Some(Value::Null) => Ok(0),
        Some(value) => value.as_u64().ok_or_else(|| {
            HttpError::bad_request("after must be a whole number: the last input's event id")
        }),
    }
}

/// `{"status": "complete"|"error", "response"?, "message"?}` of `POST /runner/v1/complete`.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    pub phase: SessionPhase,
    pub response: Option<String>,
    pub message: Option<String>,
}

/// Parses a completion body; errors name the field.
pub fn parse_completion(raw: &[u8]) -> Result<Completion, HttpError> {
    let body = json_object(raw)?;
    let phase = match optional_string(&body, "status")?.as_deref() {
        Some("complete") => SessionPhase::Complete,
        Some("error") => SessionPhase::Error,
        _ => {
            return Err(HttpError::bad_request(
                "status is required and must be \"complete\" or \"error\"",
            ));
        }
    };
    Ok(Completion {
        phase,
        response: optional_string(&body, "response")?,
        message: optional_string(&body, "message")?,
    })
}

/// The Session had already finished.
#[derive(Debug)]
struct Finished;

/// Why a runner write was refused: the Session had finished, or the Session it was about
/// to write over is not the caller's (the status names another pod).
#[derive(Debug)]
enum Refused {
    Finished,
    Claim(HttpError),
}

fn status_error(error: StatusError<Refused>, namespace: &str, name: &str) -> HttpError {
    match error {
        StatusError::Refused(Refused::Finished) => HttpError::SessionFinished,
        StatusError::Refused(Refused::Claim(error)) => error,
        StatusError::NotFound => HttpError::session_not_found(namespace, name),
        StatusError::Conflict | StatusError::Contended => HttpError::StatusContended,
        StatusError::Kube(error) => HttpError::cluster("write the Session's status", &error),
        StatusError::TooLarge { ended } => HttpError::StatusTooLarge { ended },
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Changes the calling pod's Session status with `edit` (refused once it has finished),
/// through the shared conflict-retrying writer. The pod's claim is checked again on the
/// very Session each write is based on: the write carries that Session's
/// resourceVersion, so a claim judged on a stale cached copy ends in a conflict and a
/// fresh read, never in a write for a pod that no longer owns the Session.
async fn update_status<T>(
    state: &ApiState,
    caller: Caller,
    edit: impl FnMut(&Session, &mut SessionStatus) -> Result<T, Finished>,
) -> Result<T, HttpError> {
    let (namespace, name) = (
        caller.session.namespace().unwrap_or_default(),
        caller.session.name_any(),
    );
    let pod = caller.pod;
    let mut edit = edit;
    state
        .status
        .update(
            &caller.sessions,
            &name,
            Some(caller.session),
            |session, status| {
                check_claim(session.status.as_ref(), &pod).map_err(Refused::Claim)?;
                edit(session, status).map_err(|Finished| Refused::Finished)
            },
            |written| {
                // A read after this write through this process sees it.
                state.hub.read_cache.store_read(written);
            },
        )
        .await
        .map_err(|e| status_error(e, &namespace, &name))
}

async fn append_event(State(state): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let caller = caller(&state, &headers).await?;
        let event = parse_event(&read_body(&headers, body, MAX_BODY_BYTES).await?)?;
        let id = update_status(&state, caller, |_, status| {
            // A repeat of an event already stored (a retry after a timeout) answers its
            // id again, even once the Session has finished.
            if let Some(id) = event.key.as_deref().and_then(|k| status.event_with_key(k)) {
                return Ok(id);
            }
            if status.is_finished() {
                return Err(Finished);
            }
            Ok(match &event.key {
                Some(key) => status.push_event_once(&event.type_, &event.content, key, now()),
                None => status.push_event(&event.type_, &event.content, now()),
            })
        })
        .await?;
        Ok::<_, HttpError>(Json(json!({"id": id})))
    }
    .await;
    result.into_response()
}

/// Closes the Session's inputs once the harness has read them all: answers the unread
/// inputs after `after` instead while there are some (the harness answers them and asks
/// again), so that no input is accepted without a turn to answer it.
async fn close_inputs(State(state): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let caller = caller(&state, &headers).await?;
        let after = parse_close(&read_body(&headers, body, MAX_BODY_BYTES).await?)?;
        let unread = update_status(&state, caller, |_, status| {
            if status.is_finished() {
                return Err(Finished);
            }
            Ok(status.close_inputs(after))
        })
        .await?;
        let inputs: Vec<Value> = unread
            .iter()
            .map(|(id, content)| json!({"id": id, "content": content}))
            .collect();
        Ok::<_, HttpError>(Json(json!({"closed": inputs.is_empty(), "inputs": inputs})))
    }
    .await;
    result.into_response()
}

async fn complete(State(state): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let caller = caller(&state, &headers).await?;
        let completion = parse_completion(&read_body(&headers, body, MAX_BODY_BYTES).await?)?;
        let phase = update_status(&state, caller, |_, status| {
            let response = match (&completion.response, completion.phase) {
                (Some(response), _) => Some(response.clone()),
                (None, SessionPhase::Complete) => status.last_agent_message().map(str::to_owned),
                (None, _) => None,
            };
            let message = match (&completion.message, completion.phase) {
                (None, SessionPhase::Error) => Some("the agent reported an error".to_owned()),
                (message, _) => message.clone(),
            };
            if status.finish(
                completion.phase,
                response.as_deref(),
                message.as_deref(),
                now(),
            ) {
                Ok(completion.phase)
            } else {
                Err(Finished)
            }
        })
        .await?;
        Ok::<_, HttpError>(Json(json!({"phase": phase})))
    }
    .await;
    result.into_response()
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use hookrun_crds::SessionSpec;

    use super::*;

    fn pod(name: &str, uid: &str) -> PodIdentity {
        PodIdentity {
            namespace: "team".into(),
            pod_name: name.into(),
            pod_uid: uid.into(),
        }
    }

    async fn call(router: Router, path: &str, token: Option<&str>) -> Response {
        use tower::ServiceExt;
        let mut request = axum::http::Request::get(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        router
            .oneshot(request.body(Body::empty()).expect("a request"))
            .await
            .expect("infallible")
    }

    #[tokio::test]
    async fn without_a_cluster_the_apis_answer_503_and_are_counted_by_route() {
        let state = ApiState::new(
            crate::api::unreachable_client(),
            crate::hub::SessionHub::new(),
            std::sync::Arc::new(crate::metrics::Metrics::default()),
        );
        let app = router(state.clone()).merge(crate::read::router(state.clone()));
        let missing = call(app.clone(), "/runner/v1/session", None).await;
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        let down = call(app.clone(), "/runner/v1/session", Some("t")).await;
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.headers().contains_key("retry-after"));
        let no_namespace = call(app.clone(), "/agents/s", Some("t")).await;
        assert_eq!(no_namespace.status(), StatusCode::BAD_REQUEST);
        let read = call(app, "/agents/s/events?namespace=team", Some("t")).await;
        assert_eq!(read.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = state.metrics.encode();
        assert!(
            text.contains(
                r#"route="/runner/v1/session",method="GET",outcome="Unauthorized",status="401""#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"route="/agents/{session}/events""#),
            "{text}"
        );
        assert!(!text.contains("namespace=team"), "{text}");
    }

    #[test]
    fn a_close_names_the_last_input_read() {
        assert_eq!(parse_close(br#"{"after": 7}"#).ok(), Some(7));
        assert_eq!(parse_close(br#"{}"#).ok(), Some(0));
        assert_eq!(parse_close(br#"{"after": null}"#).ok(), Some(0));
        for bad in [
            &br#"{"after": -1}"#[..],
            br#"{"after": "7"}"#,
            b"[]",
            b"not json",
        ] {
            assert!(
                parse_close(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_the_sessions_own_pod_is_served() {
        let mut status = SessionStatus {
            pod_name: Some("s-1".into()),
            ..SessionStatus::default()
        };
        assert_eq!(
            session_owns_pod(Some(&status), &pod("s-1", "u")),
            PodClaim::Owns
        );
        assert_eq!(
            session_owns_pod(Some(&status), &pod("s-2", "u")),
            PodClaim::NotYours
        );
        status.pod_uid = Some("u-1".into());
        assert_eq!(
            session_owns_pod(Some(&status), &pod("s-1", "u-1")),
            PodClaim::Owns
        );
        // A pod of the same name made again has another uid.
        assert_eq!(
            session_owns_pod(Some(&status), &pod("s-1", "u-2")),
            PodClaim::NotYours
        );
        // Before the operator records the pod, the caller is told to retry, not refused.
        assert_eq!(
            session_owns_pod(None, &pod("s-1", "u")),
            PodClaim::NotRecordedYet
        );
        assert_eq!(
            session_owns_pod(Some(&SessionStatus::default()), &pod("s-1", "u")),
            PodClaim::NotRecordedYet
        );
    }

    #[test]
    fn event_types() {
        for ok in [
            "agent.message",
            "tool_call",
            "a",
            "x-1.y_z",
            &"a".repeat(64),
        ] {
            assert_eq!(validate_event_type(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".a", "-a", "Agent", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(validate_event_type(bad).is_err(), "{bad}");
        }
        let reserved = validate_event_type("session.status_closed").expect_err("reserved");
        assert!(reserved.contains("reserved"));
    }

    #[test]
    fn event_bodies_name_the_bad_field() {
        assert_eq!(
            parse_event(br#"{"type":"agent.message","content":"hi"}"#),
            Ok(NewEvent {
                type_: "agent.message".into(),
                content: "hi".into(),
                key: None,
            })
        );
        assert_eq!(
            parse_event(br#"{"type":"agent.message","idempotencyKey":"e-1"}"#).map(|e| e.key),
            Ok(Some("e-1".to_owned()))
        );
        let bad_key = parse_event(br#"{"type":"agent.message","idempotencyKey":"a b"}"#)
            .expect_err("a bad key");
        assert!(
            bad_key.to_string().starts_with("idempotencyKey"),
            "{bad_key}"
        );
        assert_eq!(
            parse_event(br#"{"type":"note"}"#).map(|e| e.content),
            Ok(String::new())
        );
        let message = |raw: &[u8]| parse_event(raw).expect_err("bad").to_string();
        assert!(message(br#"{"content":"x"}"#).starts_with("type"));
        assert!(message(br#"{"type":"a","content":3}"#).starts_with("content"));
        assert!(message(br#"{"type":"session.x"}"#).contains("reserved"));
        assert!(message(b"[1]").contains("object"));
        assert!(message(b"{").contains("not JSON"));
        assert_eq!(
            parse_event(b"{").expect_err("bad").status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn completion_bodies() {
        assert_eq!(
            parse_completion(br#"{"status":"complete","response":"done"}"#),
            Ok(Completion {
                phase: SessionPhase::Complete,
                response: Some("done".into()),
                message: None
            })
        );
        assert_eq!(
            parse_completion(br#"{"status":"error","message":"boom"}"#).map(|c| c.phase),
            Ok(SessionPhase::Error)
        );
        let bad = parse_completion(br#"{"status":"done"}"#).expect_err("bad");
        assert!(bad.to_string().starts_with("status"));
        let bad = parse_completion(br#"{"status":"complete","response":1}"#).expect_err("bad");
        assert!(bad.to_string().starts_with("response"));
    }

    #[test]
    fn input_queries_name_the_bad_parameter_and_cap_the_wait() {
        assert_eq!(
            parse_input_query(None),
            Ok(InputQuery {
                after: 0,
                wait: std::time::Duration::ZERO
            })
        );
        assert_eq!(
            parse_input_query(Some("after=12&wait=5&x=1")),
            Ok(InputQuery {
                after: 12,
                wait: std::time::Duration::from_secs(5)
            })
        );
        assert_eq!(
            parse_input_query(Some("wait=99999999999")).map(|q| q.wait),
            Ok(std::time::Duration::from_secs(MAX_INPUT_WAIT_SECONDS))
        );
        for bad in ["after=-1", "after=x", "wait=1.5", "wait"] {
            let error = parse_input_query(Some(bad)).expect_err(bad);
            assert_eq!(error.status(), StatusCode::BAD_REQUEST);
            assert!(
                error
                    .to_string()
                    .starts_with(bad.split('=').next().unwrap_or_default())
            );
        }
    }

    #[test]
    fn an_input_poll_answers_inputs_after_the_cursor_or_the_end() {
        use hookrun_crds::session::event_types;
        let at = || Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut session = Session::new("s", SessionSpec::default());
        let mut status = SessionStatus::default();
        status.mark_running(at());
        session.status = Some(status.clone());
        assert_eq!(input_answer(&session, 0), None, "nothing to say yet");
        status.append_input("more", "k1", at()).expect("live");
        status.push_event(event_types::AGENT_MESSAGE, "not an input", at());
        session.status = Some(status.clone());
        let answer = input_answer(&session, 0).expect("an input");
        assert_eq!(answer["inputs"], json!([{"id": 2, "content": "more"}]));
        assert_eq!(answer["finished"], false);
        assert_eq!(input_answer(&session, 2), None);
        status.finish(SessionPhase::Complete, None, None, at());
        session.status = Some(status);
        let answer = input_answer(&session, 2).expect("the end");
        assert_eq!(answer["inputs"], json!([]));
        assert_eq!(answer["finished"], true);
    }

    #[test]
    fn env_is_the_agents_then_the_sessions_overrides() {
        let agent = vec![
            EnvVar {
                name: "A".into(),
                value: Some("1".into()),
                value_from: None,
            },
            EnvVar {
                name: "SECRET".into(),
                value: None,
                value_from: None,
            },
            EnvVar {
                name: "B".into(),
                value: Some("2".into()),
                value_from: None,
            },
        ];
        let session = vec![
            SessionEnvVar {
                name: "B".into(),
                value: "over".into(),
            },
            SessionEnvVar {
                name: "C".into(),
                value: "3".into(),
            },
        ];
        let env = merged_env(&agent, &session);
        let pairs: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("A", "1"), ("B", "over"), ("C", "3")]);
    }

    #[test]
    fn the_context_without_an_agent_still_names_the_session() {
        let session = Session {
            metadata: kube::api::ObjectMeta {
                name: Some("a-wh-1".into()),
                namespace: Some("team".into()),
                ..Default::default()
            },
            spec: SessionSpec {
                agent: "a".into(),
                title: "hello".into(),
                ..SessionSpec::default()
            },
            status: None,
        };
        let value = context(&session, None);
        assert_eq!(value["session"], "a-wh-1");
        assert_eq!(value["namespace"], "team");
        assert_eq!(value["title"], "hello");
        assert_eq!(value["system"], Value::Null);
        assert_eq!(value["models"], json!([]));
        assert_eq!(value["exec"], Value::Null);
        assert_eq!(value["trigger"], Value::Null);
        assert_eq!(value["phase"], "Pending");
    }
}
