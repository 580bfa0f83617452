//! The Session controller: turns every Session into one Pod, follows the Pod into
//! `status.phase`, and deletes finished Sessions after their TTL.
//!
//! Reconcile: look up the pod (watched) and the Agent (the Agent controller's cache) →
//! decide (pure, in [`phase`]) → act: create the pod (built purely in [`pod`]), write a
//! status transition, or delete the Session. Status writes read the Session, change its
//! status with the crds helpers and merge-patch it with the `resourceVersion` they read,
//! retrying on a conflict, so that appends by the apiserver are never lost and each
//! `session.*` event is written once.

pub mod cache;
pub mod phase;
pub mod pod;
pub mod queue;
pub mod retention;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures::{Future, StreamExt, TryStreamExt};
use hookrun_crds::retry::ConflictRetry;
use hookrun_crds::session::{is_too_large_refusal, oversize_finish_patch};
use hookrun_crds::{Agent, Session, SessionPhase, SessionStatus, names};
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;

use self::{
    cache::{CachedPod, CachedSession, PodIndex},
    phase::{Decision, Limits, Observed, Transition},
    pod::PodSettings,
    queue::{Admission, PodSeen, SessionSeen, Starting},
};
use crate::{
    agent_controller::{FIELD_MANAGER, LIST_PAGE, backoff},
    error::{Error, Result},
    events::{Event, EventType, Recorder},
    metrics::Metrics,
    pod_policy,
    policy_guard::PolicyGuard,
};

/// The controller's name in metrics and Events.
pub const CONTROLLER: &str = "session";
/// How long a finished Session is kept when its Agent does not say.
pub const DEFAULT_TTL: Duration = Duration::from_secs(86_400);
/// Reconciles in flight at once (as for Agents: each may hold an API connection).
const MAX_CONCURRENT_RECONCILES: u16 = 16;
/// How one status write retries when it meets conflicting writers: 8 attempts.
const STATUS_WRITE: ConflictRetry = ConflictRetry {
    max_attempts: 8,
    budget: Duration::MAX,
};
/// How often every Session is looked at again anyway: one tick for all of them, not a
/// timer per Session (the controller's scheduler would keep each, with a copy of the
/// Session's key, for the whole period, even after the Session finished).
const RESYNC: Duration = Duration::from_secs(3600);
/// How often the finished Sessions in the cache are checked for a TTL that ran out. They
/// wait for it here rather than each in the controller's queue, which would keep two
/// copies of its key per Session for as long as the TTL.
const TTL_SWEEP: Duration = Duration::from_secs(1);
/// How often a `Queued` Session is looked at again even when no pod of its Agent ends
/// (a cache-only look; pod and Agent changes normally wake it at once).
const QUEUED_RESYNC: Duration = Duration::from_secs(30);

/// What every reconcile of one watch scope shares.
pub struct Context {
    pub client: Client,
    pub settings: PodSettings,
    pub pending_timeout: Duration,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// The pod policy a Session's Agent must be within for its pod to be created.
    pub guard: Arc<PolicyGuard>,
    /// The Agent controller's cache of this scope.
    agents: Store<Agent>,
    /// Session pods, from the controller's own watch.
    pods: Arc<PodIndex>,
    /// The controller's own (slimmed) cache of Sessions.
    sessions: Store<CachedSession>,
    /// Consecutive failures per Session, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<CachedSession>, u32>>,
    /// Pods being created, not yet in the pod cache: with the caches, the count of each
    /// Agent's `maxConcurrent` slots. Decisions are taken under this lock.
    starting: Mutex<Starting>,
    /// Pods this process recorded in a Session's status (Session uid → pod uid) that the
    /// Session cache does not show yet, so that a reconcile on the stale cache does not
    /// read the Session again only to find the record there.
    recorded: Mutex<HashMap<String, String>>,
}

/// The Session controller for one namespace (`None`: all namespaces), using `agents`
/// (the Agent controller's cache of the same scope) to look Agents up. Returns the
/// Session cache (to wait for its sync) and the future that runs until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    client: Client,
    namespace: Option<&str>,
    agents: Store<Agent>,
    settings: PodSettings,
    guard: Arc<PolicyGuard>,
    pending_timeout: Duration,
    metrics: Metrics,
    recorder: Recorder,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Store<CachedSession>, impl Future<Output = ()> + Send) {
    let (sessions, pods): (Api<CachedSession>, Api<CachedPod>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let pod_index = Arc::new(PodIndex::default());
    let index = pod_index.clone();
    let pod_events = watcher(
        pods,
        watcher::Config::default()
            .labels(names::SESSION_LABEL)
            .any_semantic()
            .page_size(LIST_PAGE),
    )
    .modify(CachedPod::trim)
    .default_backoff()
    // The index follows the watch; then a deleted pod is marked so, so that the mapper
    // below knows its slot is free.
    .map_ok(move |event| {
        index.apply(&event);
        event
    })
    .map_ok(|event| match event {
        watcher::Event::Delete(mut pod) => {
            pod.metadata
                .deletion_timestamp
                .get_or_insert_with(|| Time(Timestamp::now()));
            watcher::Event::Delete(pod)
        }
        other => other,
    })
    .touched_objects();
    let (session_store, session_writer) = reflector::store();
    let agents_api: Api<Agent> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ctx = Arc::new(Context {
        client,
        settings,
        pending_timeout,
        metrics,
        recorder,
        guard,
        agents,
        pods: pod_index,
        sessions: session_store.clone(),
        failures: Mutex::default(),
        starting: Mutex::default(),
        recorded: Mutex::default(),
    });
    // An Agent whose maxStoredSessions drops below what it stores brings its oldest
    // finished Sessions to a reconcile, which deletes them.
    let stored = session_store.clone();
    let agent_changes = move |agent: Agent| {
        let sessions = sessions_of(
            &stored,
            &agent.namespace().unwrap_or_default(),
            &agent.name_any(),
        );
        let sessions: Vec<&CachedSession> = sessions.iter().map(|s| &**s).collect();
        // A raised maxConcurrent may let waiting Sessions start.
        let waiting = sessions.iter().copied().filter(|s| waits_for_pod(s));
        retention::over_cap(&sessions, agent.spec.max_stored_sessions())
            .into_iter()
            .chain(waiting)
            .map(ObjectRef::from_obj)
            .collect::<Vec<_>>()
    };
    // A pod change brings its Session; a pod that ended or went also brings the Sessions
    // of the same Agent that wait for a slot.
    let owners = session_store.clone();
    let pod_changes = move |pod: CachedPod| {
        let Some(namespace) = pod.metadata.namespace.as_deref() else {
            return Vec::new();
        };
        let Some(owner) = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true) && o.kind == Session::kind(&()))
        else {
            return Vec::new();
        };
        let owner_ref = ObjectRef::new(&owner.name).within(namespace);
        let freed = pod.metadata.deletion_timestamp.is_some()
            || PodSeen::of_phase(pod.phase()) == PodSeen::Ended;
        let mut refs = Vec::new();
        if freed && let Some(session) = owners.get(&owner_ref) {
            refs.extend(
                sessions_of(&owners, namespace, &session.spec.agent)
                    .iter()
                    .filter(|s| waits_for_pod(s))
                    .map(|s| ObjectRef::from_obj(&**s)),
            );
        }
        refs.push(owner_ref);
        refs
    };
    let session_events = reflector::reflector(
        session_writer,
        watcher(
            sessions,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE),
        )
        .modify(CachedSession::trim)
        .default_backoff(),
    )
    .touched_objects();
    let controller = Controller::for_stream(session_events, session_store)
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES))
        .reconcile_all_on(crate::ticks(RESYNC))
        .watches_stream(pod_events, pod_changes)
        .watches(
            agents_api,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE),
            agent_changes,
        )
        .graceful_shutdown_on(shutdown);
    // Finished Sessions whose TTL ran out, from the caches, once per sweep.
    let swept = controller.store();
    let agents = ctx.agents.clone();
    let expired = futures::stream::unfold((), move |()| {
        let (sessions, agents) = (swept.clone(), agents.clone());
        async move {
            tokio::time::sleep(TTL_SWEEP).await;
            let due = expired_sessions(&sessions, &agents, Timestamp::now());
            Some((futures::stream::iter(due), ()))
        }
    })
    .flatten();
    let controller = controller.reconcile_on(expired);
    let store = controller.store();
    let runner = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // A watch that fails is retried with backoff; say so, since decisions
                // wait for its cache.
                Err(controller::Error::QueueError(error)) => {
                    tracing::warn!(%error, "a watch of the session controller failed; retrying")
                }
                Err(error) => tracing::debug!(%error, "session controller event"),
                Ok(_) => {}
            }
        });
    (store, runner)
}

/// The cached finished Sessions whose TTL (their Agent's, from its cache) ran out by
/// `now`: the decision a reconcile would take for them is to delete them.
fn expired_sessions(
    sessions: &Store<CachedSession>,
    agents: &Store<Agent>,
    now: Timestamp,
) -> Vec<ObjectRef<CachedSession>> {
    sessions
        .state()
        .into_iter()
        .filter(|session| {
            let Some(status) = session.status.as_ref().filter(|s| s.is_finished()) else {
                return false;
            };
            if session.metadata.deletion_timestamp.is_some() {
                return false;
            }
            let Some(namespace) = session.metadata.namespace.as_deref() else {
                return false;
            };
            let agent = agents.get(&ObjectRef::new(&session.spec.agent).within(namespace));
            let limits = Limits {
                // Not read for a finished Session.
                pending_timeout: Duration::ZERO,
                ttl: ttl_of(agent.as_deref()),
            };
            let observed = Observed {
                session_uid: session.metadata.uid.as_deref().unwrap_or_default(),
                status: Some(status),
                pod: None,
                now,
            };
            phase::decide(observed, limits) == Decision::DeleteSession
                && !callback_holds(status, limits.ttl, now)
        })
        .map(|session| ObjectRef::from_obj(&*session))
        .collect()
}

/// Whether a finished Session's TTL deletion waits for its pending callback deliveries
/// (at most [`crate::callback::plan::MAX_TTL_HOLD`] past the TTL).
fn callback_holds(status: &SessionStatus, ttl: Duration, now: Timestamp) -> bool {
    let Some(done) = status.completion_time.as_ref() else {
        return false;
    };
    let expired_at = phase::ttl_expiry(done, ttl);
    crate::callback::plan::ttl_held(status, expired_at, now, crate::callback::plan::MAX_TTL_HOLD)
}

/// Whether a cached Session still waits for its pod (new, or `Queued`).
fn waits_for_pod(session: &CachedSession) -> bool {
    session.metadata.deletion_timestamp.is_none()
        && session
            .status
            .as_ref()
            .is_none_or(|s| !s.is_finished() && s.pod_name.is_none())
}

async fn reconcile(session: Arc<CachedSession>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let result = reconcile_session(&session, &ctx).await;
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&ObjectRef::from_obj(&*session));
    }
    result
}

/// The Session's Agent: from the cache, else read live (the cache may not have a new
/// Agent yet). `None` when it does not exist.
async fn find_agent(ctx: &Context, namespace: &str, name: &str) -> Result<Option<Arc<Agent>>> {
    if let Some(agent) = ctx.agents.get(&ObjectRef::new(name).within(namespace)) {
        return Ok(Some(agent));
    }
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(api.get_opt(name).await?.map(Arc::new))
}

/// The cached Sessions of one Agent.
fn sessions_of(
    store: &Store<CachedSession>,
    namespace: &str,
    agent: &str,
) -> Vec<Arc<CachedSession>> {
    store
        .state()
        .into_iter()
        .filter(|s| s.spec.agent == agent && s.namespace().as_deref() == Some(namespace))
        .collect()
}

/// Deletes the oldest finished Sessions of `agent` beyond its `maxStoredSessions`.
async fn delete_over_cap(ctx: &Context, sessions: &Api<Session>, agent: &Agent) -> Result<()> {
    let namespace = agent.namespace().unwrap_or_default();
    let cached = sessions_of(&ctx.sessions, &namespace, &agent.name_any());
    let cached: Vec<&CachedSession> = cached.iter().map(|s| &**s).collect();
    let cap = agent.spec.max_stored_sessions();
    for session in retention::over_cap(&cached, cap) {
        let Some(uid) = session.uid() else {
            continue;
        };
        let why = format!(
            "deleted a finished session: its agent stores more than {cap} sessions \
             (spec.session.maxStoredSessions)"
        );
        delete_session(ctx, sessions, session, &uid, &why).await?;
    }
    Ok(())
}

fn ttl_of(agent: Option<&Agent>) -> Duration {
    agent
        .and_then(|a| a.spec.session.as_ref())
        .and_then(|s| s.ttl_seconds_after_finished)
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TTL)
}

async fn reconcile_session(session: &CachedSession, ctx: &Context) -> Result<Action> {
    let namespace = session
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let name = session.name_any();
    let uid = session.uid().ok_or(Error::MissingObjectKey("uid"))?;
    if session.meta().deletion_timestamp.is_some() {
        ctx.recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&uid);
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut pod = ctx.pods.get(&namespace, &name);
    let named_pod = session.status.as_ref().and_then(|s| s.pod_name.as_ref());
    if pod.is_none() && named_pod.is_some() {
        // The status names a pod the cache lacks: ask before calling it gone.
        pod = pods.get_opt(&name).await?;
    }
    let agent = find_agent(ctx, &namespace, &session.spec.agent).await?;
    let limits = Limits {
        pending_timeout: ctx.pending_timeout,
        ttl: ttl_of(agent.as_deref()),
    };
    let observe = |status: Option<&SessionStatus>, pod: Option<&Pod>| {
        phase::decide(
            Observed {
                session_uid: &uid,
                status,
                pod,
                now: Timestamp::now(),
            },
            limits,
        )
    };
    let sessions: Api<Session> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(agent) = &agent
        && session.status.as_ref().is_some_and(|s| s.is_finished())
    {
        delete_over_cap(ctx, &sessions, agent).await?;
    }

    let decision = observe(session.status.as_ref(), pod.as_ref());
    {
        let mut recorded = ctx.recorded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Decision::Write(Transition::PodCreated { uid: pod_uid, .. }) = &decision
            && recorded.get(&uid) == Some(pod_uid)
        {
            // Written already; the watch brings it.
            return Ok(Action::await_change());
        }
        if session.status.as_ref().is_some_and(|s| s.pod_uid.is_some()) {
            recorded.remove(&uid);
        }
    }
    let finished = session.status.as_ref().is_some_and(|s| s.is_finished());
    match decision {
        // The TTL sweep brings a finished Session back when its time has come.
        Decision::Wait(_) if finished => Ok(Action::await_change()),
        Decision::Wait(None) => Ok(Action::await_change()),
        Decision::Wait(Some(after)) => {
            // A little after the moment, so that it has passed when we look.
            Ok(Action::requeue(
                (after + Duration::from_millis(100)).min(RESYNC),
            ))
        }
        Decision::DeleteSession
            if session
                .status
                .as_ref()
                .is_some_and(|s| callback_holds(s, limits.ttl, Timestamp::now())) =>
        {
            // Its deliveries are still pending: the watch brings it back when they end.
            Ok(Action::await_change())
        }
        Decision::DeleteSession => {
            delete_session(
                ctx,
                &sessions,
                session,
                &uid,
                "deleted a finished session after its TTL",
            )
            .await?;
            Ok(Action::await_change())
        }
        Decision::Write(transition) => {
            write_transition(ctx, &sessions, session, &uid, &transition, pod.as_ref()).await?;
            // The watch brings the write back.
            Ok(Action::await_change())
        }
        Decision::CreatePod => {
            // Failing the Session or creating its pod first reads it live (see
            // `read_if_podless`); waiting in the queue reads only the caches.
            let Some(agent) = agent else {
                let Some(live) = read_if_podless(&sessions, &name, &uid, observe).await? else {
                    return Ok(Action::await_change());
                };
                let transition = phase::agent_not_found(&session.spec.agent);
                write_transition_from(ctx, &sessions, session, &uid, &transition, None, Some(live))
                    .await?;
                return Ok(Action::await_change());
            };
            let violations = ctx.guard.violations(&agent).await;
            if !violations.is_empty() {
                let Some(live) = read_if_podless(&sessions, &name, &uid, observe).await? else {
                    return Ok(Action::await_change());
                };
                let transition = phase::policy_violation(pod_policy::describe(&violations));
                write_transition_from(ctx, &sessions, session, &uid, &transition, None, Some(live))
                    .await?;
                return Ok(Action::await_change());
            }
            // Slots are counted from the pod cache: it must hold every pod first. Not
            // awaited here, so that a reconcile never holds its slot for the pod list.
            if max_concurrent(&agent).is_some() && !ctx.pods.is_ready() {
                tracing::debug!(session = %name, "the pod cache has not listed yet");
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            let admission = admit(ctx, session, &agent);
            if let Some(message) = admission.message() {
                tracing::debug!(session = %name, namespace = %namespace, agent = %session.spec.agent, ?admission, "session waits for a slot");
                if session.status.as_ref().and_then(|s| s.phase) != Some(SessionPhase::Queued) {
                    let transition = Transition::Queue { message };
                    write_transition(ctx, &sessions, session, &uid, &transition, None).await?;
                }
                return Ok(Action::requeue(QUEUED_RESYNC));
            }
            // From here the slot is held; it is given back unless a pod gets created.
            let slot = SlotClaim {
                ctx,
                agent: agent_key(&namespace, &session.spec.agent),
                session: name.clone(),
                kept: false,
            };
            let Some(live) = read_if_podless(&sessions, &name, &uid, observe).await? else {
                return Ok(Action::await_change());
            };
            let created = match create_pod(ctx, &pods, &live, &agent).await {
                Err(Error::Kube(kube::Error::Api(refusal))) => {
                    let age = session_age(&live);
                    let Some(transition) = phase::pod_create_refused(
                        refusal.code,
                        &refusal.message,
                        age,
                        ctx.pending_timeout,
                    ) else {
                        if refusal.code != 403 {
                            return Err(Error::Kube(kube::Error::Api(refusal)));
                        }
                        // Forbidden may pass (a ServiceAccount or quota appears, or the
                        // admission's cache of ServiceAccounts catches up with a new
                        // namespace): look again soon, then less often, and by the
                        // pending timeout at the latest.
                        tracing::warn!(session = %name, namespace = %namespace, detail = %refusal.message, "the cluster refused the session pod; retrying");
                        ctx.metrics
                            .reconcile_failed(CONTROLLER, "pod_create_forbidden");
                        let left = ctx.pending_timeout.saturating_sub(age);
                        return Ok(Action::requeue(phase::forbidden_retry(age, left)));
                    };
                    write_transition(ctx, &sessions, session, &uid, &transition, None).await?;
                    return Ok(Action::await_change());
                }
                other => other?,
            };
            slot.keep();
            match observe(live.status.as_ref(), Some(&created)) {
                Decision::Write(transition) => {
                    write_transition_from(
                        ctx,
                        &sessions,
                        session,
                        &uid,
                        &transition,
                        Some(&created),
                        Some(live),
                    )
                    .await?;
                    if let Transition::PodCreated { uid: pod_uid, .. } = &transition {
                        ctx.recorded
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(uid.clone(), pod_uid.clone());
                    }
                }
                other => {
                    tracing::debug!(session = %name, decision = ?other, "after creating the pod")
                }
            }
            // The pod watch brings the pod back.
            Ok(Action::await_change())
        }
    }
}

/// `namespace/agent`: the key of an Agent's slots.
fn agent_key(namespace: &str, agent: &str) -> String {
    format!("{namespace}/{agent}")
}

/// `spec.session.maxConcurrent` of `agent`, if it sets one.
fn max_concurrent(agent: &Agent) -> Option<u32> {
    agent
        .spec
        .session
        .as_ref()
        .and_then(|s| s.max_concurrent)
        .map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
}

/// Whether `session` may create its pod now under its Agent's `maxConcurrent`, counted
/// from the Session and pod caches and the starts in flight; a start is recorded. The
/// caches are read under the same lock, so every decision sees at least what the one
/// before it saw.
fn admit(ctx: &Context, session: &CachedSession, agent: &Agent) -> Admission {
    let max = max_concurrent(agent);
    if max.is_none() {
        return Admission::Start;
    }
    let namespace = session.namespace().unwrap_or_default();
    let mut starting = ctx.starting.lock().unwrap_or_else(PoisonError::into_inner);
    let sessions = sessions_of(&ctx.sessions, &namespace, &session.spec.agent);
    let seen: Vec<SessionSeen<'_>> = sessions
        .iter()
        .map(|s| {
            let name = s.metadata.name.as_deref().unwrap_or_default();
            let pod = ctx
                .pods
                .with(&namespace, name, |pod| PodSeen::of_phase(pod.phase()))
                .unwrap_or(PodSeen::None);
            let status = s.status.as_ref();
            SessionSeen {
                name,
                created_ms: s
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(i64::MAX, |t| t.0.as_millisecond()),
                finished: status.is_some_and(SessionStatus::is_finished),
                deleting: s.metadata.deletion_timestamp.is_some(),
                names_pod: status.is_some_and(|s| s.pod_name.is_some()),
                pod,
            }
        })
        .collect();
    starting.admit(
        &agent_key(&namespace, &session.spec.agent),
        &session.name_any(),
        &seen,
        max,
        Instant::now(),
    )
}

/// A `maxConcurrent` slot taken for one Session's pod: given back when dropped, unless
/// the pod was created (then the pod cache takes over the count).
struct SlotClaim<'a> {
    ctx: &'a Context,
    agent: String,
    session: String,
    kept: bool,
}

impl SlotClaim<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for SlotClaim<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.ctx
                .starting
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .release(&self.agent, &self.session);
        }
    }
}

/// Reads the Session live and returns it when it still has no pod and should get one.
///
/// A live read, kept on purpose: the cache may lag behind a status that already names a
/// pod (one that ran and was deleted since), and acting on that stale view would create
/// a second pod for the Session (running it twice) or fail a Session that runs. `None`
/// when it is gone or has moved on (its watch event brings the newer Session).
async fn read_if_podless(
    sessions: &Api<Session>,
    name: &str,
    uid: &str,
    observe: impl Fn(Option<&SessionStatus>, Option<&Pod>) -> Decision,
) -> Result<Option<Session>> {
    let Some(live) = sessions.get_opt(name).await? else {
        return Ok(None);
    };
    if live.uid().as_deref() != Some(uid)
        || observe(live.status.as_ref(), None) != Decision::CreatePod
    {
        return Ok(None);
    }
    Ok(Some(live))
}

/// How long ago the Session was created (whole seconds: the API stamps no finer).
fn session_age(session: &Session) -> Duration {
    let created = session.meta().creation_timestamp.as_ref().map_or_else(
        || Timestamp::now().as_millisecond(),
        |t| t.0.as_millisecond(),
    );
    Duration::from_millis(u64::try_from(Timestamp::now().as_millisecond() - created).unwrap_or(0))
}

/// Creates the Session's pod; an existing one (of an earlier attempt) is returned as is.
async fn create_pod(
    ctx: &Context,
    pods: &Api<Pod>,
    session: &Session,
    agent: &Agent,
) -> Result<Pod> {
    let desired = pod::build_pod(session, agent, &ctx.settings).map_err(Error::PodBuild)?;
    let name = session.name_any();
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..Default::default()
    };
    match pods.create(&params, &desired).await {
        Ok(created) => {
            ctx.metrics.wrote(CONTROLLER, "pod_create");
            ctx.metrics.pod_created(session_age(session).as_secs_f64());
            tracing::info!(session = %name, namespace = %session.namespace().unwrap_or_default(), agent = %session.spec.agent, "created the session pod");
            Ok(created)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(pods.get(&name).await?),
        Err(error) => Err(error.into()),
    }
}

/// Reads the Session, applies `transition` to its status and merge-patches the status
/// with the `resourceVersion` read (the API refuses it with 409 when someone wrote in
/// between; then read again). Returns false when the status needed no change.
pub async fn update_status(
    sessions: &Api<Session>,
    name: &str,
    uid: &str,
    transition: &Transition,
) -> Result<bool> {
    update_status_from(sessions, name, uid, transition, None).await
}

/// Like [`update_status`], with the first attempt on `read` (a Session just read live)
/// instead of a fresh read.
pub async fn update_status_from(
    sessions: &Api<Session>,
    name: &str,
    uid: &str,
    transition: &Transition,
    read: Option<Session>,
) -> Result<bool> {
    let first = Mutex::new(read);
    STATUS_WRITE
        .run(is_conflict, tokio::time::sleep, |_| async {
            let read = first.lock().unwrap_or_else(PoisonError::into_inner).take();
            let session = match read {
                Some(session) => session,
                None => match sessions.get_opt(name).await? {
                    Some(session) => session,
                    None => return Ok(false),
                },
            };
            if session.uid().as_deref() != Some(uid) {
                return Ok(false);
            }
            let mut status = session.status.clone().unwrap_or_default();
            let now = Time(
                Timestamp::from_second(Timestamp::now().as_second())
                    .unwrap_or_else(|_| Timestamp::now()),
            );
            if !phase::apply(transition, &mut status, now) {
                return Ok(false);
            }
            let patch = json!({
                "metadata": {"resourceVersion": session.resource_version()},
                "status": status,
            });
            match sessions
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(refusal))
                    if is_too_large_refusal(refusal.code, &refusal.message) =>
                {
                    tracing::warn!(session = %name, code = refusal.code, "the cluster refused a Session status as too large; ending the Session");
                    finish_oversize(sessions, name, uid, session).await?;
                    Ok(false)
                }
                Err(error) => Err(error.into()),
            }
        })
        .await
}

/// Whether `error` is a 409: another writer changed the object since it was read.
fn is_conflict(error: &Error) -> bool {
    matches!(error, Error::Kube(kube::Error::Api(status)) if status.code == 409)
}

/// Ends Session `name` in `Error` with the smallest write there is after the cluster
/// refused a status write as too large (phase, message, completion time; if even that
/// is refused, the kept events and answer go too), so that it never stays Running with
/// its Agent's concurrency slot held. True when it ended the Session.
pub async fn finish_oversize(
    sessions: &Api<Session>,
    name: &str,
    uid: &str,
    session: Session,
) -> Result<bool> {
    let current = std::sync::Mutex::new(Some(session));
    // Once the minimal write was refused as too large, the retries shed the kept events
    // and answer too.
    let shed_all = std::sync::atomic::AtomicBool::new(false);
    let ended = STATUS_WRITE
        .run(is_conflict, tokio::time::sleep, |_| async {
            let first = current
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let session = match first {
                Some(session) => session,
                None => match sessions.get_opt(name).await? {
                    Some(fresh) if fresh.uid().as_deref() == Some(uid) => fresh,
                    _ => return Ok(false),
                },
            };
            let status = session.status.clone().unwrap_or_default();
            let version = session.resource_version().unwrap_or_default();
            loop {
                let shed = shed_all.load(std::sync::atomic::Ordering::Relaxed);
                let at = Time(Timestamp::now());
                let Some(patch) = oversize_finish_patch(&status, &version, &at, shed) else {
                    return Ok(false);
                };
                match sessions
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::warn!(session = %name, shed, "ended a Session whose status the cluster would not store");
                        return Ok(true);
                    }
                    Err(kube::Error::Api(refusal))
                        if !shed && is_too_large_refusal(refusal.code, &refusal.message) =>
                    {
                        shed_all.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(kube::Error::Api(refusal)) if refusal.code == 404 => return Ok(false),
                    Err(error) => return Err(Error::from(error)),
                }
            }
        })
        .await;
    match ended {
        // Other writers kept winning: whoever they are, the Session moved on.
        Err(error) if is_conflict(&error) => Ok(false),
        other => other,
    }
}

/// Writes `transition`; Events and metrics follow only a write that changed something,
/// so each happens once. A stuck `pod` is deleted when the transition says so.
async fn write_transition(
    ctx: &Context,
    sessions: &Api<Session>,
    session: &CachedSession,
    uid: &str,
    transition: &Transition,
    pod: Option<&Pod>,
) -> Result<()> {
    write_transition_from(ctx, sessions, session, uid, transition, pod, None).await
}

/// Like [`write_transition`], with the first attempt on `read`, the Session as just read
/// live (no second read).
async fn write_transition_from(
    ctx: &Context,
    sessions: &Api<Session>,
    session: &CachedSession,
    uid: &str,
    transition: &Transition,
    pod: Option<&Pod>,
    read: Option<Session>,
) -> Result<()> {
    let name = session.name_any();
    let changed = update_status_from(sessions, &name, uid, transition, read).await?;
    if changed {
        ctx.metrics.wrote(CONTROLLER, "status_patch");
        ctx.metrics
            .session_transition(transition.phase().as_str(), transition.reason());
        match transition {
            Transition::Fail {
                message, reason, ..
            } => {
                tracing::warn!(session = %name, namespace = %session.namespace().unwrap_or_default(), reason = reason.as_str(), detail = %message, "session failed");
                publish(
                    ctx,
                    session,
                    EventType::Warning,
                    reason.as_str(),
                    message.clone(),
                )
                .await;
            }
            other => {
                tracing::info!(session = %name, namespace = %session.namespace().unwrap_or_default(), phase = other.phase().as_str(), "session moved on");
            }
        }
    }
    if let Transition::Fail {
        delete_pod: true, ..
    } = transition
        && let Some(pod) = pod
    {
        delete_pod(ctx, pod).await?;
    }
    Ok(())
}

/// Deletes a stuck pod (that very pod: a uid precondition).
async fn delete_pod(ctx: &Context, pod: &Pod) -> Result<()> {
    let namespace = pod
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = DeleteParams::background().preconditions(Preconditions {
        uid: pod.uid(),
        resource_version: None,
    });
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => {
            ctx.metrics.wrote(CONTROLLER, "pod_delete");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Deletes a finished Session (its TTL ran out, or its Agent stores too many);
/// garbage collection removes its pod. `why` is the log line.
async fn delete_session(
    ctx: &Context,
    sessions: &Api<Session>,
    session: &CachedSession,
    uid: &str,
    why: &str,
) -> Result<()> {
    let name = session.name_any();
    let params = DeleteParams::background().preconditions(Preconditions {
        uid: Some(uid.to_owned()),
        resource_version: None,
    });
    match sessions.delete(&name, &params).await {
        Ok(_) => {
            ctx.metrics.wrote(CONTROLLER, "session_delete");
            tracing::info!(session = %name, namespace = %session.namespace().unwrap_or_default(), "{why}");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Publishes an Event about a Session; one that cannot be written is logged, not retried.
async fn publish(
    ctx: &Context,
    session: &CachedSession,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, &session.object_ref(&())).await {
        Ok(()) => ctx.metrics.wrote(CONTROLLER, "event"),
        Err(error) => {
            tracing::warn!(session = %session.name_any(), %error, "could not publish an event")
        }
    }
}

/// Requeues a failed reconcile with a per-Session exponential backoff.
fn error_policy(session: Arc<CachedSession>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let attempts = ctx.failures.lock().map_or(1, |mut failures| {
        let n = failures.entry(ObjectRef::from_obj(&*session)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    let delay = backoff(attempts);
    tracing::warn!(session = %session.name_any(), namespace = %session.namespace().unwrap_or_default(), %error, retry_in = ?delay, "session reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests;
