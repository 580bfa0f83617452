//! What the Session controller's caches keep of Sessions and their pods: the few fields
//! its decisions and its slot count read, decoded straight from the API's JSON, so that
//! neither a whole object nor its managed fields, title, payload, env, events or pod
//! spec is ever built, kept or copied. Pure: no client.
//!
//! [`CachedSession`] and [`CachedPod`] are `kube::Resource`s of the real kinds, so they
//! are listed and watched like `Session` and `Pod`; [`CachedPod::to_pod`] and
//! [`CachedSession::status`] give the decisions the types they take.

use std::{
    borrow::Cow,
    collections::HashMap,
    sync::{PoisonError, RwLock},
};

use hookrun_crds::callback::CallbackDelivery;
use hookrun_crds::{Session, SessionPhase, SessionStatus};
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{
        Container, ContainerState, ContainerStatus, Pod, PodCondition, PodSpec, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
};
use kube::{Resource, runtime::watcher};
use serde::{Deserialize, Deserializer, de::IgnoredAny};

use super::pod::CONTAINER;

/// The metadata the caches keep: identity and times, and for pods their owners; not
/// labels, annotations or managed fields. `Owners` is what the owners decode into:
/// [`IgnoredAny`] skips them without building anything.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanMeta<Owners> {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    /// The watch resumes from the last object's version; the caches drop it after.
    resource_version: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    owner_references: Option<Owners>,
}

impl<Owners> LeanMeta<Owners> {
    fn into_meta(self, owner_references: Option<Vec<OwnerReference>>) -> ObjectMeta {
        ObjectMeta {
            name: self.name,
            namespace: self.namespace,
            uid: self.uid,
            resource_version: self.resource_version,
            creation_timestamp: self.creation_timestamp,
            deletion_timestamp: self.deletion_timestamp,
            owner_references,
            ..ObjectMeta::default()
        }
    }
}

/// A pod's metadata, owners included (the pod's Session is its controller).
fn lean_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let mut meta = LeanMeta::<Vec<OwnerReference>>::deserialize(deserializer)?;
    let owners = meta.owner_references.take().filter(|o| !o.is_empty());
    Ok(meta.into_meta(owners))
}

/// A Session's metadata without its owners: no decision reads them (its Agent is
/// `spec.agent`), and the Agent's reference is four more strings per cached Session.
fn lean_session_meta<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    Ok(LeanMeta::<IgnoredAny>::deserialize(deserializer)?.into_meta(None))
}

/// A Session as the cache keeps it: its Agent and the status fields that say where it
/// is (phase, pod, times), and what the callback sender looks at (the request's
/// `callbackUrl`, the delivery records, how many events were ever appended). Writes read
/// the whole Session live.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "WireSession")]
pub struct CachedSession {
    pub metadata: ObjectMeta,
    pub spec: CachedSessionSpec,
    pub status: Option<SessionStatus>,
    /// The id the next appended event gets (events ever appended, plus one): a change
    /// says the Session spoke or finished a turn.
    pub next_event_id: u64,
}

#[derive(Deserialize)]
struct WireSession {
    #[serde(deserialize_with = "lean_session_meta")]
    metadata: ObjectMeta,
    spec: CachedSessionSpec,
    #[serde(default)]
    status: Option<LeanSessionStatus>,
}

impl From<WireSession> for CachedSession {
    fn from(wire: WireSession) -> Self {
        let next_event_id = wire.status.as_ref().map_or(1, |s| {
            s.dropped_events.unwrap_or(0).max(0) as u64 + s.events.len() as u64 + 1
        });
        CachedSession {
            metadata: wire.metadata,
            spec: wire.spec,
            status: wire.status.map(LeanSessionStatus::into_status),
            next_event_id,
        }
    }
}

/// The part of a Session's spec the cache keeps.
#[derive(Clone, Debug, Deserialize)]
pub struct CachedSessionSpec {
    /// The Agent (same namespace) the Session runs.
    #[serde(default)]
    pub agent: String,
    /// Whether the request that started it named its own `callbackUrl`.
    #[serde(default, deserialize_with = "has_callback_url")]
    #[serde(rename = "trigger")]
    pub has_callback_url: bool,
}

fn has_callback_url<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct LeanTrigger {
        #[serde(default)]
        callback_url: Option<serde::de::IgnoredAny>,
    }
    Ok(Option::<LeanTrigger>::deserialize(deserializer)?.is_some_and(|t| t.callback_url.is_some()))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanSessionStatus {
    phase: Option<SessionPhase>,
    pod_name: Option<String>,
    pod_uid: Option<String>,
    start_time: Option<Time>,
    completion_time: Option<Time>,
    dropped_events: Option<i64>,
    /// Only counted.
    #[serde(default)]
    events: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    callbacks: Vec<CallbackDelivery>,
}

impl LeanSessionStatus {
    fn into_status(self) -> SessionStatus {
        // A finished Session is only timed for its TTL: its pod no longer matters.
        let finished = self.phase.is_some_and(SessionPhase::is_finished);
        SessionStatus {
            phase: self.phase,
            pod_name: self.pod_name.filter(|_| !finished),
            pod_uid: self.pod_uid.filter(|_| !finished),
            start_time: self.start_time.filter(|_| !finished),
            completion_time: self.completion_time,
            callbacks: self.callbacks,
            ..SessionStatus::default()
        }
    }
}

impl CachedSession {
    /// Drops what only the watch needs, and only while it reads the event: the
    /// `resourceVersion` it resumes from (writes read the Session live, with its own).
    /// Kept, it would also be copied into the cache's key of every Session.
    pub fn trim(&mut self) {
        self.metadata.resource_version = None;
    }

    /// The kept status (events, answer and message are not kept).
    pub fn status(&self) -> Option<&SessionStatus> {
        self.status.as_ref()
    }
}

impl Resource for CachedSession {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Session::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Session::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Session::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Session::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A session pod as the cache keeps it: identity, owner, phase, the agent container's
/// state and the scheduling condition; of the spec only the agent container's image and
/// the deadline, which failure messages name.
#[derive(Clone, Debug, Deserialize)]
pub struct CachedPod {
    #[serde(deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<LeanPodSpec>,
    #[serde(default)]
    status: Option<LeanPodStatus>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodSpec {
    active_deadline_seconds: Option<i64>,
    #[serde(default, deserialize_with = "agent_image")]
    containers: Option<String>,
}

/// The image of the agent container, from the list of containers.
fn agent_image<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
        image: Option<String>,
    }
    Ok(Option::<Vec<Named>>::deserialize(deserializer)?
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.image))
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeanPodStatus {
    phase: Option<String>,
    reason: Option<String>,
    message: Option<String>,
    #[serde(default, deserialize_with = "unscheduled")]
    conditions: Option<LeanCondition>,
    #[serde(default, deserialize_with = "agent_state")]
    container_statuses: Option<ContainerState>,
}

#[derive(Clone, Debug, Deserialize)]
struct LeanCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
    reason: Option<String>,
    message: Option<String>,
}

/// The `PodScheduled=False` condition, if there is one.
fn unscheduled<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<LeanCondition>, D::Error> {
    Ok(Option::<Vec<LeanCondition>>::deserialize(deserializer)?
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False"))
}

/// The state of the agent container, from the list of container statuses.
fn agent_state<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ContainerState>, D::Error> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
        state: Option<ContainerState>,
    }
    Ok(Option::<Vec<Named>>::deserialize(deserializer)?
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.state))
}

impl CachedPod {
    /// Drops what no decision reads in the pod's phase: a running or succeeded pod needs
    /// neither its image, deadline, conditions nor container state (pending and failed
    /// pods name them in failure messages). Of its controller reference, the uid and
    /// name are kept; the `resourceVersion` only the watch reads, before this.
    pub fn trim(&mut self) {
        if matches!(self.phase(), Some("Running" | "Succeeded")) {
            self.spec = None;
            if let Some(status) = self.status.as_mut() {
                status.reason = None;
                status.message = None;
                status.conditions = None;
                status.container_statuses = None;
            }
        }
        self.metadata.resource_version = None;
        if let Some(owners) = self.metadata.owner_references.as_mut() {
            owners.retain(|o| o.controller == Some(true));
            for owner in owners.iter_mut() {
                owner.api_version = String::new();
                owner.block_owner_deletion = None;
            }
        }
    }

    /// `status.phase`.
    pub fn phase(&self) -> Option<&str> {
        self.status.as_ref()?.phase.as_deref()
    }

    /// The pod with what the cache keeps, for the decisions that take a `Pod`.
    pub fn to_pod(&self) -> Pod {
        Pod {
            metadata: self.metadata.clone(),
            spec: self.spec.as_ref().map(|spec| PodSpec {
                active_deadline_seconds: spec.active_deadline_seconds,
                containers: vec![Container {
                    name: CONTAINER.to_owned(),
                    image: spec.containers.clone(),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: self.status.as_ref().map(|status| PodStatus {
                phase: status.phase.clone(),
                reason: status.reason.clone(),
                message: status.message.clone(),
                conditions: status.conditions.as_ref().map(|c| {
                    vec![PodCondition {
                        type_: c.type_.clone(),
                        status: c.status.clone(),
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        ..PodCondition::default()
                    }]
                }),
                container_statuses: status.container_statuses.as_ref().map(|state| {
                    vec![ContainerStatus {
                        name: CONTAINER.to_owned(),
                        state: Some(state.clone()),
                        ..ContainerStatus::default()
                    }]
                }),
                ..PodStatus::default()
            }),
        }
    }
}

impl Resource for CachedPod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The session pods of one watch, keyed by namespace and name, each kept as
/// [`PodEntry`]: no `ObjectMeta`, no key object repeating its strings, no `Arc`. Fed by
/// [`PodIndex::apply`] from the pod watch's events, as a reflector store would be.
#[derive(Default)]
pub struct PodIndex {
    state: RwLock<PodIndexState>,
}

/// Namespace → pod name → pod.
type PodsByNamespace = HashMap<Box<str>, HashMap<Box<str>, PodEntry>>;

#[derive(Default)]
struct PodIndexState {
    pods: PodsByNamespace,
    /// The pods of a list in progress; they replace `pods` once it is done.
    listing: Option<PodsByNamespace>,
    /// Whether a first list completed.
    ready: bool,
}

/// One pod in the index: what decisions read of a running or succeeded pod (uid, owner,
/// times, phase) inline; a pod in any other phase is kept as its trimmed [`CachedPod`],
/// since failure messages read its image, deadline, conditions and container state.
#[derive(Debug)]
pub enum PodEntry {
    Settled {
        uid: Option<Box<str>>,
        /// The uid of the controlling owner (the Session).
        controller_uid: Option<Box<str>>,
        created: Option<Time>,
        deleted: Option<Time>,
        phase: SettledPhase,
    },
    Other(Box<CachedPod>),
}

/// The phases a [`PodEntry::Settled`] pod can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettledPhase {
    Running,
    Succeeded,
}

impl SettledPhase {
    fn as_str(self) -> &'static str {
        match self {
            Self::Running => "Running",
            Self::Succeeded => "Succeeded",
        }
    }
}

impl PodEntry {
    /// The entry for `pod` (as [`CachedPod::trim`] left it).
    pub fn of(pod: &CachedPod) -> Self {
        let phase = match pod.phase() {
            Some("Running") => SettledPhase::Running,
            Some("Succeeded") => SettledPhase::Succeeded,
            _ => return Self::Other(Box::new(pod.clone())),
        };
        let meta = &pod.metadata;
        Self::Settled {
            uid: meta.uid.as_deref().map(Box::from),
            controller_uid: meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| Box::from(o.uid.as_str())),
            created: meta.creation_timestamp.clone(),
            deleted: meta.deletion_timestamp.clone(),
            phase,
        }
    }

    /// `status.phase`.
    pub fn phase(&self) -> Option<&str> {
        match self {
            Self::Settled { phase, .. } => Some(phase.as_str()),
            Self::Other(pod) => pod.phase(),
        }
    }

    /// The pod named `name` in `namespace` with what the index keeps, for the decisions
    /// that take a `Pod`. Of a settled pod's owners only the controller's uid is kept.
    pub fn to_pod(&self, namespace: &str, name: &str) -> Pod {
        match self {
            Self::Other(pod) => pod.to_pod(),
            Self::Settled {
                uid,
                controller_uid,
                created,
                deleted,
                phase,
            } => Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    uid: uid.as_deref().map(str::to_owned),
                    creation_timestamp: created.clone(),
                    deletion_timestamp: deleted.clone(),
                    owner_references: controller_uid.as_deref().map(|uid| {
                        vec![OwnerReference {
                            kind: Session::kind(&()).into_owned(),
                            uid: uid.to_owned(),
                            controller: Some(true),
                            ..OwnerReference::default()
                        }]
                    }),
                    ..ObjectMeta::default()
                },
                spec: None,
                status: Some(PodStatus {
                    phase: Some(phase.as_str().to_owned()),
                    ..PodStatus::default()
                }),
            },
        }
    }
}

impl PodIndex {
    /// Applies one event of the pod watch.
    pub fn apply(&self, event: &watcher::Event<CachedPod>) {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Init => state.listing = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some((namespace, name)) = key_of(pod) {
                    let listing = state.listing.get_or_insert_with(HashMap::new);
                    insert(listing, namespace, name, PodEntry::of(pod));
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = state.listing.take() {
                    state.pods = listing;
                }
                state.ready = true;
            }
            watcher::Event::Apply(pod) => {
                if let Some((namespace, name)) = key_of(pod) {
                    insert(&mut state.pods, namespace, name, PodEntry::of(pod));
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((namespace, name)) = key_of(pod)
                    && let Some(names) = state.pods.get_mut(namespace)
                {
                    names.remove(name);
                    if names.is_empty() {
                        state.pods.remove(namespace);
                    }
                }
            }
        }
    }

    /// Whether the first list completed: before it, a pod missing here may exist.
    pub fn is_ready(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .ready
    }

    /// Reads the pod `name` of `namespace` with `f`, if the index has it.
    pub fn with<T>(
        &self,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&PodEntry) -> T,
    ) -> Option<T> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.pods.get(namespace)?.get(name).map(f)
    }

    /// The pod `name` of `namespace` as a `Pod`, if the index has it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Pod> {
        self.with(namespace, name, |entry| entry.to_pod(namespace, name))
    }

    /// How many pods the index holds.
    pub fn len(&self) -> usize {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.pods.values().map(HashMap::len).sum()
    }

    /// Whether the index holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn key_of(pod: &CachedPod) -> Option<(&str, &str)> {
    Some((
        pod.metadata.namespace.as_deref()?,
        pod.metadata.name.as_deref()?,
    ))
}

fn insert(pods: &mut PodsByNamespace, namespace: &str, name: &str, entry: PodEntry) {
    let names = match pods.get_mut(namespace) {
        Some(names) => names,
        None => pods.entry(Box::from(namespace)).or_default(),
    };
    match names.get_mut(name) {
        Some(slot) => *slot = entry,
        None => {
            names.insert(Box::from(name), entry);
        }
    }
}
