//! The in-memory index the webhook door answers from: Agents, the operator's managed
//! Secrets and the non-finished Sessions, fed by watches and shared as
//! `Arc<RwLock<Index>>` (a std lock, never held across an `.await`).
//!
//! Building an entry from objects is pure ([`agent_entry`], [`secret_entry`]) and unit
//! tested; [`run_watches`] only moves watch events into the index.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::names::{self, secret_keys};
use hookrun_crds::session::SessionPhase;
use hookrun_crds::{Agent, Session};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher::Event};
use kube::{Api, Client, Resource, ResourceExt};

use crate::hub::SessionHub;

/// An Agent's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    pub namespace: String,
    pub name: String,
}

impl AgentKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// What the index keeps of an Agent with a webhook trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentEntry {
    /// The Agent's uid, for the Session's owner reference.
    pub uid: String,
    /// The parsed `allowCIDRs`; empty allows every address unless `deny_all`.
    pub allow_cidrs: Vec<IpNet>,
    /// `allowCIDRs` is set but none of it is readable: nobody is allowed.
    pub deny_all: bool,
    /// The schemes the trigger configures a signing secret for.
    pub schemes: Vec<SignatureScheme>,
    /// `spec.session.maxConcurrent`.
    pub max_concurrent: Option<u32>,
    /// What a webhook may put in a Session's `env`, and its storage budgets.
    pub input: crate::webhook_input::InputPolicy,
    /// `spec.session.maxStoredSessions` (or its default).
    pub max_stored: u32,
}

/// A token digest that stops being accepted at `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiringDigest {
    pub digest: [u8; 32],
    pub expires_at: SystemTime,
}

/// What the index keeps of an Agent's managed Secret: digests, never tokens.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEntry {
    /// SHA-256 of the current token.
    pub token: Option<[u8; 32]>,
    /// SHA-256 of the previous token within its rotation grace.
    pub previous: Option<ExpiringDigest>,
    /// The signing secret of each scheme the operator copied in.
    pub signing: HashMap<SignatureScheme, Vec<u8>>,
}

impl std::fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEntry")
            .field("token", &self.token.is_some())
            .field("previous", &self.previous.as_ref().map(|p| p.expires_at))
            .field("signing", &self.signing.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Everything a request to one Agent's webhook is checked against. Both parts are shared
/// with the index, so a lookup costs two reference-count increments, not copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookTarget {
    pub agent: Arc<AgentEntry>,
    pub secret: Arc<SecretEntry>,
}

/// The webhook entry of an Agent, `None` when it has no webhook trigger. `allowCIDRs`
/// entries that do not parse are dropped with a warning (the operator's validation
/// refuses them, so this only happens for Agents it has not validated yet).
pub fn agent_entry(agent: &Agent) -> Option<AgentEntry> {
    let webhook = agent.spec.webhook()?;
    let allow_cidrs = webhook
        .allow_cidrs
        .iter()
        .filter_map(|c| parse_cidr(c))
        .collect::<Vec<_>>();
    if allow_cidrs.len() != webhook.allow_cidrs.len() {
        tracing::warn!(agent = %agent.name_any(), "allowCIDRs has entries that are not networks");
    }
    Some(AgentEntry {
        uid: agent.uid().unwrap_or_default(),
        // Fail closed: an allowlist with nothing readable in it allows nobody.
        deny_all: !webhook.allow_cidrs.is_empty() && allow_cidrs.is_empty(),
        allow_cidrs,
        schemes: webhook
            .signing_secrets()
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        max_concurrent: agent
            .spec
            .session
            .as_ref()
            .and_then(|s| s.max_concurrent)
            .map(|m| u32::try_from(m.max(0)).unwrap_or(u32::MAX)),
        input: crate::webhook_input::InputPolicy::of(&agent.spec),
        max_stored: agent.spec.max_stored_sessions(),
    })
}

/// A CIDR, or a bare address as a host network.
fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// The Agent a managed Secret claims to belong to: its controller owner reference to an
/// Agent, when the Secret also has the name the operator gives that Agent's Secret.
/// A Secret that fails either is nobody's token (anyone who may create Secrets in the
/// namespace can add the managed label and an owner reference).
pub fn secret_owner(secret: &Secret) -> Option<SecretOwner> {
    let namespace = secret.namespace()?;
    let owner = secret.owner_references().iter().find(|o| {
        o.kind == "Agent"
            && o.controller == Some(true)
            && o.api_version.split('/').next() == Some(hookrun_crds::GROUP)
    })?;
    if secret.metadata.name.as_deref() != Some(names::webhook_secret_name(&owner.name).as_str()) {
        return None;
    }
    Some(SecretOwner {
        agent: AgentKey::new(namespace, owner.name.clone()),
        uid: owner.uid.clone(),
    })
}

/// The Agent a managed Secret names as its controller, with the uid that must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretOwner {
    pub agent: AgentKey,
    pub uid: String,
}

/// A managed Secret the watch delivered, kept by its own name until an Agent with the
/// owner's name and uid takes it.
#[derive(Clone, Debug)]
struct SecretCandidate {
    owner: SecretOwner,
    entry: Arc<SecretEntry>,
}

/// A Secret's namespace and its own name.
fn secret_key(secret: &Secret) -> Option<AgentKey> {
    Some(AgentKey::new(
        secret.namespace()?,
        secret.metadata.name.clone()?,
    ))
}

/// What the index keeps of a managed Secret. A previous token without a readable expiry
/// is not accepted (fail closed).
pub fn secret_entry(secret: &Secret) -> SecretEntry {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::to_owned)
    };
    let token = text(secret_keys::TOKEN)
        .filter(|t| !t.is_empty())
        .map(|t| hookrun_crds::token::digest(&t));
    let previous = match (
        text(secret_keys::PREVIOUS_TOKEN).filter(|t| !t.is_empty()),
        text(secret_keys::PREVIOUS_TOKEN_EXPIRES_AT),
    ) {
        (Some(token), Some(expiry)) => expiry
            .trim()
            .parse::<k8s_openapi::jiff::Timestamp>()
            .ok()
            .map(|at| ExpiringDigest {
                digest: hookrun_crds::token::digest(&token),
                expires_at: SystemTime::from(at),
            }),
        _ => None,
    };
    let signing = SignatureScheme::ALL
        .into_iter()
        .filter_map(|s| {
            data.get(s.secret_key())
                .filter(|v| !v.0.is_empty())
                .map(|v| (s, v.0.clone()))
        })
        .collect();
    SecretEntry {
        token,
        previous,
        signing,
    }
}

/// Whether a Session still counts against its Agent's `maxConcurrent`.
pub fn is_active(session: &Session) -> bool {
    !session
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(SessionPhase::is_finished)
}

/// What the index keeps of a Session: whose it is, whether it runs, and the digest that
/// tells an idempotent replay from a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEntry {
    pub agent: AgentKey,
    pub active: bool,
    pub payload_digest: Option<String>,
    /// Reserved by this process for a create in flight, not seen in the cluster yet.
    pub pending: bool,
}

/// The answer to [`Index::reserve`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// A slot is held under the name; release it if the create fails.
    Reserved,
    /// Another request of this process holds the name already; nothing to release.
    Shared,
    /// The Agent runs its most Sessions.
    Full { max: u32 },
    /// The Agent stores its most Sessions, finished ones included.
    StoreFull { max: u32 },
}

fn session_entry(session: &Session) -> Option<(AgentKey, SessionEntry)> {
    let namespace = session.namespace()?;
    let name = session.name_any();
    let agent = AgentKey::new(namespace.clone(), session.spec.agent.clone());
    Some((
        AgentKey::new(namespace, name),
        SessionEntry {
            agent,
            active: is_active(session),
            pending: false,
            payload_digest: session
                .spec
                .trigger
                .as_ref()
                .and_then(|t| t.payload_digest.clone()),
        },
    ))
}

/// Which watch stream a reset came from: every namespace, or one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespace(ns) => ns == namespace,
        }
    }
}

/// The index. Lookups share entries; the lock is never held across an `.await`.
#[derive(Debug, Default)]
pub struct Index {
    agents: HashMap<AgentKey, Arc<AgentEntry>>,
    /// Managed Secrets by (namespace, Secret name): at most one per name, whatever order
    /// the watches deliver Agents and Secrets in.
    candidates: HashMap<AgentKey, SecretCandidate>,
    /// The Secret each Agent accepts: the candidate with the Agent's Secret name whose
    /// controller owner reference carries the Agent's uid. Derived from `agents` and
    /// `candidates` whenever either changes, so a lookup is one map read.
    secrets: HashMap<AgentKey, Arc<SecretEntry>>,
    /// What an Agent whose Secret is not loaded yet is checked against (accepts nothing).
    no_secret: Arc<SecretEntry>,
    /// Sessions by (namespace, session name).
    sessions: HashMap<AgentKey, SessionEntry>,
    /// Non-finished Sessions per Agent.
    active: HashMap<AgentKey, u32>,
    /// Stored Sessions per Agent, finished and reserved ones included.
    stored: HashMap<AgentKey, u32>,
    /// Watch streams that have not finished their first list yet.
    unsynced: usize,
    /// Where Session changes go on to held requests.
    hub: Option<Arc<SessionHub>>,
}

/// The index as the server shares it.
pub type SharedIndex = Arc<RwLock<Index>>;

impl Index {
    /// An empty index that is ready once `streams` watch streams have listed once.
    pub fn new(streams: usize) -> Self {
        Self {
            unsynced: streams,
            ..Self::default()
        }
    }

    /// Passes every Session change the watch delivers on to `hub`.
    pub fn set_hub(&mut self, hub: Arc<SessionHub>) {
        self.hub = Some(hub);
    }

    /// Whether every watch stream has listed once.
    pub fn is_synced(&self) -> bool {
        self.unsynced == 0
    }

    /// Marks one watch stream as having listed once.
    pub fn mark_synced(&mut self) {
        self.unsynced = self.unsynced.saturating_sub(1);
    }

    /// What a webhook to `key` is checked against; `None` when there is no such Agent or
    /// it has no webhook trigger.
    pub fn target(&self, key: &AgentKey) -> Option<WebhookTarget> {
        let agent = self.agents.get(key)?.clone();
        let secret = self.secrets.get(key).unwrap_or(&self.no_secret).clone();
        Some(WebhookTarget { agent, secret })
    }

    /// How many of the Agent's Sessions have not finished.
    pub fn active_sessions(&self, key: &AgentKey) -> u32 {
        self.active.get(key).copied().unwrap_or(0)
    }

    /// How many of the Agent's Sessions are stored (or reserved), finished ones included.
    pub fn stored_sessions(&self, key: &AgentKey) -> u32 {
        self.stored.get(key).copied().unwrap_or(0)
    }

    /// The payload digest stored on a Session, when the index knows the Session from
    /// the cluster: `Some(None)` for a Session without one.
    pub fn session_digest(&self, namespace: &str, name: &str) -> Option<Option<String>> {
        self.sessions
            .get(&AgentKey::new(namespace, name))
            .filter(|s| !s.pending)
            .map(|s| s.payload_digest.clone())
    }

    /// Holds a slot of the Agent's `max_concurrent` (and of its stored Sessions, capped
    /// by the Agent's `maxStoredSessions`) for a Session about to be created under
    /// `name`, so a burst cannot outrun the watch. The watch event of the created
    /// Session replaces the reservation.
    pub fn reserve(
        &mut self,
        agent: &AgentKey,
        name: &str,
        max_concurrent: Option<u32>,
    ) -> Reservation {
        let key = AgentKey::new(agent.namespace.clone(), name);
        if self.sessions.contains_key(&key) {
            return Reservation::Shared;
        }
        let max_stored = self
            .agents
            .get(agent)
            .map_or(hookrun_crds::agent::DEFAULT_MAX_STORED_SESSIONS, |a| {
                a.max_stored
            });
        if self.stored_sessions(agent) >= max_stored {
            return Reservation::StoreFull { max: max_stored };
        }
        if let Some(max) = max_concurrent
            && self.active_sessions(agent) >= max
        {
            return Reservation::Full { max };
        }
        *self.active.entry(agent.clone()).or_default() += 1;
        *self.stored.entry(agent.clone()).or_default() += 1;
        self.sessions.insert(
            key,
            SessionEntry {
                agent: agent.clone(),
                active: true,
                payload_digest: None,
                pending: true,
            },
        );
        Reservation::Reserved
    }

    /// Marks a reserved Session as created with `digest`, so a duplicate is answered
    /// from the index before the watch reports it.
    pub fn confirm(&mut self, namespace: &str, name: &str, digest: &str) {
        if let Some(entry) = self.sessions.get_mut(&AgentKey::new(namespace, name))
            && entry.pending
        {
            entry.pending = false;
            entry.payload_digest = Some(digest.to_owned());
        }
    }

    /// Gives back a reservation whose create failed, unless the watch has replaced it
    /// with the real Session meanwhile.
    pub fn release(&mut self, namespace: &str, name: &str) {
        let key = AgentKey::new(namespace, name);
        if self.sessions.get(&key).is_some_and(|s| s.pending) {
            self.remove_session_key(&key);
        }
    }

    pub fn apply_agent(&mut self, agent: &Agent) {
        let Some(namespace) = agent.namespace() else {
            return;
        };
        let key = AgentKey::new(namespace, agent.name_any());
        match agent_entry(agent) {
            Some(entry) => {
                self.agents.insert(key.clone(), Arc::new(entry));
            }
            None => {
                self.agents.remove(&key);
            }
        }
        self.match_secret(&key);
    }

    pub fn delete_agent(&mut self, agent: &Agent) {
        if let Some(namespace) = agent.namespace() {
            let key = AgentKey::new(namespace, agent.name_any());
            self.agents.remove(&key);
            self.match_secret(&key);
        }
    }

    pub fn reset_agents(&mut self, scope: &Scope, agents: &[Agent]) {
        self.agents.retain(|k, _| !scope.contains(&k.namespace));
        for agent in agents {
            if let (Some(namespace), Some(entry)) = (agent.namespace(), agent_entry(agent)) {
                let key = AgentKey::new(namespace, agent.name_any());
                self.agents.insert(key, Arc::new(entry));
            }
        }
        self.match_secrets_in(scope);
    }

    pub fn apply_secret(&mut self, secret: &Secret) {
        let Some(key) = secret_key(secret) else {
            return;
        };
        let previous = match secret_owner(secret) {
            Some(owner) => {
                let agent = owner.agent.clone();
                let entry = Arc::new(secret_entry(secret));
                let previous = self
                    .candidates
                    .insert(key, SecretCandidate { owner, entry });
                self.match_secret(&agent);
                previous
            }
            // Renamed away from the operator's name, or its owner reference changed.
            None => self.candidates.remove(&key),
        };
        if let Some(previous) = previous {
            self.match_secret(&previous.owner.agent);
        }
    }

    pub fn delete_secret(&mut self, secret: &Secret) {
        if let Some(key) = secret_key(secret)
            && let Some(previous) = self.candidates.remove(&key)
        {
            self.match_secret(&previous.owner.agent);
        }
    }

    pub fn reset_secrets(&mut self, scope: &Scope, secrets: &[Secret]) {
        self.candidates.retain(|k, _| !scope.contains(&k.namespace));
        for secret in secrets {
            if let (Some(key), Some(owner)) = (secret_key(secret), secret_owner(secret)) {
                let entry = Arc::new(secret_entry(secret));
                self.candidates
                    .insert(key, SecretCandidate { owner, entry });
            }
        }
        self.match_secrets_in(scope);
    }

    /// Sets the Secret the Agent `key` accepts: the candidate under the operator's name
    /// for it, if its controller owner reference carries the Agent's uid; else none.
    fn match_secret(&mut self, key: &AgentKey) {
        let accepted = self.agents.get(key).and_then(|agent| {
            let name = AgentKey::new(key.namespace.clone(), names::webhook_secret_name(&key.name));
            self.candidates
                .get(&name)
                .filter(|c| {
                    !agent.uid.is_empty() && c.owner.uid == agent.uid && c.owner.agent == *key
                })
                .map(|c| c.entry.clone())
        });
        match accepted {
            Some(entry) => {
                self.secrets.insert(key.clone(), entry);
            }
            None => {
                self.secrets.remove(key);
            }
        }
    }

    /// [`Index::match_secret`] for every Agent of `scope`, after a relist.
    fn match_secrets_in(&mut self, scope: &Scope) {
        self.secrets.retain(|k, _| !scope.contains(&k.namespace));
        let keys: Vec<AgentKey> = self
            .agents
            .keys()
            .filter(|k| scope.contains(&k.namespace))
            .cloned()
            .collect();
        for key in &keys {
            self.match_secret(key);
        }
    }

    pub fn apply_session(&mut self, session: &Session) {
        if let Some(hub) = &self.hub {
            hub.publish(session);
        }
        let Some((key, entry)) = session_entry(session) else {
            return;
        };
        self.remove_session_key(&key);
        if entry.active {
            *self.active.entry(entry.agent.clone()).or_default() += 1;
        }
        *self.stored.entry(entry.agent.clone()).or_default() += 1;
        self.sessions.insert(key, entry);
    }

    pub fn delete_session(&mut self, session: &Session) {
        if let Some(hub) = &self.hub {
            hub.publish_deleted(session);
        }
        if let Some(namespace) = session.namespace() {
            self.remove_session_key(&AgentKey::new(namespace, session.name_any()));
        }
    }

    fn remove_session_key(&mut self, key: &AgentKey) {
        let Some(old) = self.sessions.remove(key) else {
            return;
        };
        if old.active {
            decrement(&mut self.active, &old.agent);
        }
        decrement(&mut self.stored, &old.agent);
    }

    pub fn reset_sessions(&mut self, scope: &Scope, sessions: &[Session]) {
        let stale: HashSet<AgentKey> = self
            .sessions
            .keys()
            .filter(|k| scope.contains(&k.namespace))
            .cloned()
            .collect();
        for key in &stale {
            self.remove_session_key(key);
        }
        for session in sessions {
            self.apply_session(session);
        }
    }
}

/// Takes one from an Agent's count, dropping the entry at zero.
fn decrement(counts: &mut HashMap<AgentKey, u32>, agent: &AgentKey) {
    if let Some(count) = counts.get_mut(agent) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(agent);
        }
    }
}

/// The watch streams of one kind and how each event lands in the index.
trait Indexed: Resource<DynamicType = ()> + Clone + Send + Sync + std::fmt::Debug + 'static {
    fn apply(index: &mut Index, object: &Self);
    fn delete(index: &mut Index, object: &Self);
    fn reset(index: &mut Index, scope: &Scope, objects: &[Self]);
}

impl Indexed for Agent {
    fn apply(index: &mut Index, object: &Self) {
        index.apply_agent(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_agent(object);
    }
    fn reset(index: &mut Index, scope: &Scope, objects: &[Self]) {
        index.reset_agents(scope, objects);
    }
}

impl Indexed for Secret {
    fn apply(index: &mut Index, object: &Self) {
        index.apply_secret(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_secret(object);
    }
    fn reset(index: &mut Index, scope: &Scope, objects: &[Self]) {
        index.reset_secrets(scope, objects);
    }
}

impl Indexed for Session {
    fn apply(index: &mut Index, object: &Self) {
        index.apply_session(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_session(object);
    }
    fn reset(index: &mut Index, scope: &Scope, objects: &[Self]) {
        index.reset_sessions(scope, objects);
    }
}

/// Feeds one watch stream into the index until it ends (it does not: watchers retry
/// with backoff).
async fn feed<K: Indexed>(
    index: SharedIndex,
    scope: Scope,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
) {
    let mut events = std::pin::pin!(events);
    let mut buffer: Vec<K> = Vec::new();
    let mut synced_once = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying");
                continue;
            }
        };
        // Never held across an await: each arm locks, changes and unlocks.
        let mut index = match index.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match event {
            Event::Init => buffer.clear(),
            Event::InitApply(object) => buffer.push(object),
            Event::InitDone => {
                K::reset(&mut index, &scope, &std::mem::take(&mut buffer));
                if !synced_once {
                    synced_once = true;
                    index.mark_synced();
                }
            }
            Event::Apply(object) => K::apply(&mut index, &object),
            Event::Delete(object) => K::delete(&mut index, &object),
        }
    }
}

/// How many watch streams [`run_watches`] runs for these namespaces.
pub fn stream_count(namespaces: &[String]) -> usize {
    3 * namespaces.len().max(1)
}

/// Watches Agents, managed Secrets and Sessions (in `namespaces`, or everywhere when
/// empty) into `index`. Runs until the process ends.
pub async fn run_watches(client: Client, namespaces: Vec<String>, index: SharedIndex) {
    let scopes: Vec<Scope> = if namespaces.is_empty() {
        vec![Scope::All]
    } else {
        namespaces.into_iter().map(Scope::Namespace).collect()
    };
    let mut tasks = Vec::new();
    for scope in scopes {
        let api = |client: Client| match &scope {
            Scope::All => (
                Api::<Agent>::all(client.clone()),
                Api::<Secret>::all(client.clone()),
                Api::<Session>::all(client),
            ),
            Scope::Namespace(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
        };
        let (agents, secrets, sessions) = api(client.clone());
        let config = watcher::Config::default().any_semantic();
        tasks.push(tokio::spawn(feed(
            index.clone(),
            scope.clone(),
            watcher(agents, config.clone()).default_backoff(),
        )));
        tasks.push(tokio::spawn(feed(
            index.clone(),
            scope.clone(),
            watcher(
                secrets,
                config.clone().labels(names::MANAGED_SECRET_SELECTOR),
            )
            .default_backoff(),
        )));
        tasks.push(tokio::spawn(feed(
            index.clone(),
            scope.clone(),
            watcher(sessions, config).default_backoff(),
        )));
    }
    futures::future::join_all(tasks).await;
}

/// Objects for tests and benchmarks of the index and of the handlers.
#[doc(hidden)]
pub mod test_support {
    use hookrun_crds::{AgentSpec, SessionSpec};
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    pub fn agent(ns: &str, name: &str, spec: serde_json::Value) -> Agent {
        let spec: AgentSpec = serde_json::from_value(spec).expect("a valid spec");
        let mut agent = Agent::new(name, spec);
        agent.metadata.namespace = Some(ns.into());
        agent.metadata.uid = Some(format!("uid-{name}"));
        agent
    }

    pub fn secret(ns: &str, agent: &str, data: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(names::webhook_secret_name(agent)),
                namespace: Some(ns.into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "hookrun.dev/v1alpha1".into(),
                    kind: "Agent".into(),
                    name: agent.into(),
                    uid: format!("uid-{agent}"),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    pub fn session(ns: &str, name: &str, agent: &str, phase: Option<SessionPhase>) -> Session {
        let mut s = Session::new(
            name,
            SessionSpec {
                agent: agent.into(),
                title: "t".into(),
                ..Default::default()
            },
        );
        s.metadata.namespace = Some(ns.into());
        s.status = phase.map(|phase| hookrun_crds::session::SessionStatus {
            phase: Some(phase),
            ..Default::default()
        });
        s
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::test_support::*;
    use super::*;

    #[test]
    fn agent_entries() {
        let a = agent(
            "ns",
            "a",
            json!({"triggers": [{"webhook": {
                "allowCIDRs": ["10.0.0.0/8", "192.0.2.7"],
                "linearSignatureSecret": "s"
            }}], "session": {"maxConcurrent": 3}}),
        );
        let entry = agent_entry(&a).expect("has a webhook");
        assert_eq!(entry.uid, "uid-a");
        assert_eq!(entry.allow_cidrs.len(), 2);
        assert_eq!(entry.schemes, [SignatureScheme::Linear]);
        assert_eq!(entry.max_concurrent, Some(3));

        assert_eq!(agent_entry(&agent("ns", "b", json!({}))), None);
        let bad = agent(
            "ns",
            "c",
            json!({"triggers": [{"webhook": {"allowCIDRs": ["nope"]}}]}),
        );
        let bad = agent_entry(&bad).expect("has a webhook");
        assert!(bad.deny_all && bad.allow_cidrs.is_empty());
        assert!(!entry.deny_all);
    }

    #[test]
    fn secret_entries_keep_digests_and_expiry() {
        let s = secret(
            "ns",
            "a",
            &[
                ("token", "current"),
                ("previous-token", "old"),
                ("previous-token-expires-at", "2030-01-01T00:00:00Z"),
                ("linear-signing-secret", "lin"),
                ("github-secret", ""),
            ],
        );
        assert_eq!(
            secret_owner(&s),
            Some(SecretOwner {
                agent: AgentKey::new("ns", "a"),
                uid: "uid-a".into()
            })
        );
        let e = secret_entry(&s);
        assert_eq!(e.token, Some(hookrun_crds::token::digest("current")));
        let prev = e.previous.clone().expect("previous");
        assert_eq!(prev.digest, hookrun_crds::token::digest("old"));
        assert_eq!(
            prev.expires_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
        );
        assert_eq!(e.signing.len(), 1);
        assert_eq!(e.signing[&SignatureScheme::Linear], b"lin");
        assert!(!format!("{e:?}").contains("lin\""));

        let no_expiry = secret("ns", "a", &[("token", "t"), ("previous-token", "old")]);
        assert_eq!(secret_entry(&no_expiry).previous, None);
    }

    #[test]
    fn index_joins_agents_and_secrets_and_resets_per_scope() {
        let mut index = Index::new(2);
        assert!(!index.is_synced());
        let spec = json!({"triggers": [{"webhook": {}}]});
        index.reset_agents(
            &Scope::All,
            &[agent("a", "x", spec.clone()), agent("b", "y", spec.clone())],
        );
        index.apply_secret(&secret("a", "x", &[("token", "t")]));
        index.mark_synced();
        index.mark_synced();
        assert!(index.is_synced());
        let target = index.target(&AgentKey::new("a", "x")).expect("x");
        assert_eq!(target.secret.token, Some(hookrun_crds::token::digest("t")));
        assert!(index.target(&AgentKey::new("b", "y")).is_some());

        // A relist of namespace `a` alone leaves `b` alone.
        index.reset_agents(&Scope::Namespace("a".into()), &[]);
        assert!(index.target(&AgentKey::new("a", "x")).is_none());
        assert!(index.target(&AgentKey::new("b", "y")).is_some());

        // Removing the trigger removes the entry.
        index.apply_agent(&agent("b", "y", json!({})));
        assert!(index.target(&AgentKey::new("b", "y")).is_none());
    }

    /// The operator's Secret of Agent `a` in `ns`, with token `token`.
    fn real(token: &str) -> Secret {
        secret("ns", "a", &[("token", token)])
    }

    /// A Secret a namespace user made: the managed label and an owner reference to `a`,
    /// changed by `forge`.
    fn forged(token: &str, forge: impl FnOnce(&mut Secret)) -> Secret {
        let mut s = secret("ns", "a", &[("token", token)]);
        forge(&mut s);
        s
    }

    fn other_name(s: &mut Secret) {
        s.metadata.name = Some("a-webhook-2".into());
    }

    fn wrong_uid(s: &mut Secret) {
        if let Some(o) = s.metadata.owner_references.as_mut() {
            o[0].uid = "uid-forged".into();
        }
    }

    fn no_controller(s: &mut Secret) {
        if let Some(o) = s.metadata.owner_references.as_mut() {
            o[0].controller = None;
        }
    }

    fn token_of(index: &Index) -> Option<[u8; 32]> {
        index.target(&AgentKey::new("ns", "a"))?.secret.token
    }

    fn webhook_agent() -> Agent {
        agent("ns", "a", json!({"triggers": [{"webhook": {}}]}))
    }

    /// Every order of `objects` through the watch events and through relists.
    fn every_order(objects: &[Obj], check: impl Fn(&Index, &str)) {
        fn permutations(n: usize) -> Vec<Vec<usize>> {
            if n == 0 {
                return vec![vec![]];
            }
            let mut all = Vec::new();
            for p in permutations(n - 1) {
                for at in 0..=p.len() {
                    let mut q = p.clone();
                    q.insert(at, n - 1);
                    all.push(q);
                }
            }
            all
        }
        for order in permutations(objects.len()) {
            let mut index = Index::new(2);
            for &i in &order {
                match &objects[i] {
                    Obj::Agent(a) => index.apply_agent(a),
                    Obj::Secret(s) => index.apply_secret(s),
                }
            }
            check(&index, &format!("events in order {order:?}"));
        }
        let agents: Vec<Agent> = objects
            .iter()
            .filter_map(|o| match o {
                Obj::Agent(a) => Some((**a).clone()),
                Obj::Secret(_) => None,
            })
            .collect();
        let secrets: Vec<Secret> = objects
            .iter()
            .filter_map(|o| match o {
                Obj::Secret(s) => Some((**s).clone()),
                Obj::Agent(_) => None,
            })
            .collect();
        for agents_first in [true, false] {
            let mut index = Index::new(2);
            if agents_first {
                index.reset_agents(&Scope::All, &agents);
                index.reset_secrets(&Scope::Namespace("ns".into()), &secrets);
            } else {
                index.reset_secrets(&Scope::All, &secrets);
                index.reset_agents(&Scope::Namespace("ns".into()), &agents);
            }
            check(&index, &format!("relist, agents first: {agents_first}"));
        }
    }

    enum Obj {
        Agent(Box<Agent>),
        Secret(Box<Secret>),
    }

    impl Obj {
        fn secret(s: Secret) -> Self {
            Obj::Secret(Box::new(s))
        }
    }

    #[test]
    fn a_forged_secret_of_another_name_never_adds_or_replaces_a_token() {
        let real_digest = Some(hookrun_crds::token::digest("real"));
        every_order(
            &[
                Obj::Agent(Box::new(webhook_agent())),
                Obj::secret(real("real")),
                Obj::secret(forged("forged", other_name)),
                Obj::secret(forged("forged2", |s| {
                    other_name(s);
                    s.metadata.name = Some("zzz".into());
                })),
            ],
            |index, how| assert_eq!(token_of(index), real_digest, "{how}"),
        );
        every_order(
            &[
                Obj::Agent(Box::new(webhook_agent())),
                Obj::secret(forged("forged", other_name)),
            ],
            |index, how| assert_eq!(token_of(index), None, "{how}"),
        );
    }

    #[test]
    fn a_secret_with_the_right_name_but_the_wrong_owner_is_no_token() {
        for forge in [wrong_uid, no_controller] {
            every_order(
                &[
                    Obj::Agent(Box::new(webhook_agent())),
                    Obj::secret(forged("forged", forge)),
                ],
                |index, how| assert_eq!(token_of(index), None, "{how}"),
            );
        }
        let other_group = forged("forged", |s| {
            if let Some(o) = s.metadata.owner_references.as_mut() {
                o[0].api_version = "evil.example/v1".into();
            }
        });
        every_order(
            &[
                Obj::Agent(Box::new(webhook_agent())),
                Obj::secret(other_group),
            ],
            |index, how| assert_eq!(token_of(index), None, "{how}"),
        );
    }

    #[test]
    fn a_forged_secret_replaced_by_the_real_one_gives_way_and_back() {
        let mut index = Index::new(1);
        index.apply_secret(&forged("forged", wrong_uid));
        index.apply_agent(&webhook_agent());
        assert_eq!(token_of(&index), None);
        // The same object updated by the operator: now it is the real one.
        index.apply_secret(&real("real"));
        assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("real")));
        // Edited to carry another owner: it stops counting at once.
        index.apply_secret(&forged("forged", wrong_uid));
        assert_eq!(token_of(&index), None);
        index.apply_secret(&real("real"));
        // Deleting a forged Secret of another name leaves the real one.
        index.delete_secret(&forged("forged", other_name));
        assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("real")));
        index.delete_secret(&real("real"));
        assert_eq!(token_of(&index), None);
    }

    #[test]
    fn an_agent_recreated_with_a_new_uid_does_not_take_the_old_secret() {
        let mut index = Index::new(1);
        index.apply_agent(&webhook_agent());
        index.apply_secret(&real("old"));
        assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("old")));

        let mut recreated = webhook_agent();
        recreated.metadata.uid = Some("uid-a-2".into());
        index.delete_agent(&webhook_agent());
        index.apply_agent(&recreated);
        assert_eq!(token_of(&index), None, "the old Secret must not count");
        // The same after a relist that sees the old Secret first.
        index.reset_secrets(&Scope::All, &[real("old")]);
        index.reset_agents(&Scope::All, std::slice::from_ref(&recreated));
        assert_eq!(token_of(&index), None);

        let new = forged("new", |s| {
            if let Some(o) = s.metadata.owner_references.as_mut() {
                o[0].uid = "uid-a-2".into();
            }
        });
        index.apply_secret(&new);
        assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("new")));
    }

    #[test]
    fn active_sessions_are_counted() {
        let mut index = Index::new(1);
        let key = AgentKey::new("ns", "a");
        index.apply_session(&session("ns", "s1", "a", None));
        index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Running)));
        index.apply_session(&session("ns", "s3", "a", Some(SessionPhase::Complete)));
        assert_eq!(index.active_sessions(&key), 2);
        // Updates do not count twice; finishing frees a slot.
        index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Running)));
        assert_eq!(index.active_sessions(&key), 2);
        index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Error)));
        assert_eq!(index.active_sessions(&key), 1);
        index.delete_session(&session("ns", "s2", "a", None));
        assert_eq!(index.active_sessions(&key), 0);
        assert_eq!(index.session_digest("ns", "s3"), Some(None));
        index.reset_sessions(&Scope::All, &[session("ns", "s4", "a", None)]);
        assert_eq!(index.active_sessions(&key), 1);
        assert_eq!(index.session_digest("ns", "s3"), None);
    }

    #[test]
    fn stored_sessions_are_counted_finished_ones_included_and_capped() {
        let mut index = Index::new(1);
        let key = AgentKey::new("ns", "a");
        index.apply_agent(&agent(
            "ns",
            "a",
            json!({"triggers": [{"webhook": {}}], "session": {"maxStoredSessions": 3}}),
        ));
        index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Complete)));
        index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Error)));
        index.apply_session(&session("ns", "other", "b", None));
        assert_eq!(index.stored_sessions(&key), 2);
        assert_eq!(index.active_sessions(&key), 0);
        // Updates do not count twice.
        index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Error)));
        assert_eq!(index.stored_sessions(&key), 2);

        assert_eq!(index.reserve(&key, "s3", None), Reservation::Reserved);
        // Finished Sessions fill the store although none runs.
        assert_eq!(
            index.reserve(&key, "s4", None),
            Reservation::StoreFull { max: 3 }
        );
        index.release("ns", "s3");
        assert_eq!(index.stored_sessions(&key), 2);
        index.apply_session(&session("ns", "s3", "a", None));
        assert_eq!(
            index.reserve(&key, "s4", Some(100)),
            Reservation::StoreFull { max: 3 }
        );
        // Deleting one (the TTL or the operator) frees room.
        index.delete_session(&session("ns", "s1", "a", None));
        assert_eq!(index.stored_sessions(&key), 2);
        assert_eq!(index.reserve(&key, "s4", None), Reservation::Reserved);
        // Another Agent is counted apart; without an entry it gets the default.
        assert_eq!(index.stored_sessions(&AgentKey::new("ns", "b")), 1);
        index.reset_sessions(&Scope::All, &[]);
        assert_eq!(index.stored_sessions(&key), 0);
        assert_eq!(
            agent_entry(&agent("ns", "c", json!({"triggers": [{"webhook": {}}]})))
                .map(|e| e.max_stored),
            Some(hookrun_crds::agent::DEFAULT_MAX_STORED_SESSIONS)
        );
    }

    #[test]
    fn reservations_hold_slots_until_the_watch_or_a_release() {
        let mut index = Index::new(1);
        let key = AgentKey::new("ns", "a");
        assert_eq!(index.reserve(&key, "s1", Some(2)), Reservation::Reserved);
        assert_eq!(index.reserve(&key, "s1", Some(2)), Reservation::Shared);
        // A pending Session is no replay target yet.
        assert_eq!(index.session_digest("ns", "s1"), None);
        assert_eq!(index.reserve(&key, "s2", Some(2)), Reservation::Reserved);
        assert_eq!(
            index.reserve(&key, "s3", Some(2)),
            Reservation::Full { max: 2 }
        );
        assert_eq!(index.reserve(&key, "s3", None), Reservation::Reserved);
        index.release("ns", "s3");
        assert_eq!(index.active_sessions(&key), 2);

        // The watch confirms s1: it stays counted once, and a release no longer drops it.
        index.apply_session(&session("ns", "s1", "a", None));
        assert_eq!(index.active_sessions(&key), 2);
        index.release("ns", "s1");
        assert_eq!(index.active_sessions(&key), 2);
        assert_eq!(index.session_digest("ns", "s1"), Some(None));
        // A failed create gives its slot back.
        index.release("ns", "s2");
        assert_eq!(index.active_sessions(&key), 1);
    }
}
