//! The in-memory index the webhook door answers from: Agents, the operator's managed
//! Secrets and the Sessions, fed by watches and shared as `Arc<RwLock<Index>>` (a std
//! lock, never held across an `.await`).
//!
//! What the index keeps of each object is built by pure functions ([`entries`]); the
//! watches move events into it ([`watch`]); names reserved for Session creates in flight
//! have a lock of their own ([`reservations`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use hookrun_crds::names;
use hookrun_crds::{Agent, Session};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

mod entries;
mod reservations;
mod runner_agents;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
mod watch;

#[cfg(test)]
pub(crate) use entries::agent_entry;
pub(crate) use entries::{
    AgentEntry, SecretEntry, SessionEntry, TargetRef, WebhookTarget, agent_entry_after,
    secret_entry, secret_owner,
};
use entries::{SecretCandidate, secret_key, session_entry};
pub(crate) use reservations::Reservation;
use reservations::Reservations;
pub(crate) use runner_agents::RunnerAgent;
pub(crate) use runner_agents::runner_agent;
pub(crate) use watch::{Scope, run_watches, stream_count};

/// An Agent's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl AgentKey {
    pub(crate) fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// A namespace and a name, owned ([`AgentKey`]) or borrowed ([`KeyRef`]): maps keyed by
/// [`AgentKey`] are looked up with a borrowed pair through `&dyn KeyParts`, so a lookup
/// allocates nothing. Both hash and compare as the pair of strings, as the derived
/// `Hash` and `Eq` of [`AgentKey`] do.
pub(crate) trait KeyParts {
    fn parts(&self) -> (&str, &str);
}

/// A borrowed namespace and name, to look up a map keyed by [`AgentKey`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyRef<'a>(pub(crate) &'a str, pub(crate) &'a str);

impl KeyParts for AgentKey {
    fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl KeyParts for KeyRef<'_> {
    fn parts(&self) -> (&str, &str) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for AgentKey {
    fn borrow(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (namespace, name) = self.parts();
        namespace.hash(state);
        name.hash(state);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

impl<'a> KeyRef<'a> {
    /// The pair as a map key.
    pub(crate) fn key(&self) -> &(dyn KeyParts + 'a) {
        self
    }
}

/// A map keyed by namespace and name, with a fast hash seeded per process: a webhook
/// hashes the names in its path once per map it reads. The keys are the cluster's
/// objects and the names this server gives Sessions, none chosen by an anonymous client.
pub(crate) type KeyMap<V> = HashMap<AgentKey, V, foldhash::fast::RandomState>;

/// The index. Lookups share entries; the lock is never held across an `.await`.
#[derive(Debug, Default)]
pub struct Index {
    agents: KeyMap<Arc<AgentEntry>>,
    /// Managed Secrets by (namespace, Secret name): at most one per name, whatever order
    /// the watches deliver Agents and Secrets in.
    candidates: KeyMap<SecretCandidate>,
    /// The Secret each Agent accepts: the candidate with the Agent's Secret name whose
    /// controller owner reference carries the Agent's uid. Derived from `agents` and
    /// `candidates` whenever either changes, so a lookup is one map read.
    secrets: KeyMap<Arc<SecretEntry>>,
    /// What an Agent whose Secret is not loaded yet is checked against (accepts nothing).
    no_secret: Arc<SecretEntry>,
    /// Sessions by (namespace, session name).
    sessions: KeyMap<SessionEntry>,
    /// Non-finished Sessions per Agent.
    active: KeyMap<u32>,
    /// Stored Sessions per Agent, finished ones included (reserved ones are counted in
    /// `reservations`).
    stored: KeyMap<u32>,
    /// Watch streams that have not finished their first list yet.
    unsynced: usize,
    /// Names held for Session creates of this process, behind their own lock.
    reservations: Mutex<Reservations>,
    /// What the runner API shows of every Agent, webhook or not.
    runner_agents: KeyMap<Arc<RunnerAgent>>,
    /// The generations of stored Sessions per (namespace, session key hash).
    key_generations: KeyMap<std::collections::BTreeSet<u32>>,
}

/// The index as the server shares it.
pub(crate) type SharedIndex = Arc<RwLock<Index>>;

impl Index {
    /// An empty index that is ready once `streams` watch streams have listed once.
    pub fn new(streams: usize) -> Self {
        Self {
            unsynced: streams,
            ..Self::default()
        }
    }

    /// Whether every watch stream has listed once.
    pub(crate) fn is_synced(&self) -> bool {
        self.unsynced == 0
    }

    /// Marks one watch stream as having listed once.
    pub fn mark_synced(&mut self) {
        self.unsynced = self.unsynced.saturating_sub(1);
    }

    /// What a webhook to `key` is checked against; `None` when there is no such Agent or
    /// it has no webhook trigger.
    pub(crate) fn target(&self, key: &dyn KeyParts) -> Option<TargetRef<'_>> {
        let agent = self.agents.get(key)?;
        let secret = self.secrets.get(key).unwrap_or(&self.no_secret);
        Some(TargetRef { agent, secret })
    }

    #[cfg(test)]
    /// How many of the Agent's Sessions have not finished.
    pub(crate) fn active_sessions(&self, key: &AgentKey) -> u32 {
        self.active.get(key).copied().unwrap_or(0) + self.reservations().count(key)
    }

    #[cfg(test)]
    /// How many of the Agent's Sessions are stored (or reserved), finished ones included.
    pub(crate) fn stored_sessions(&self, key: &AgentKey) -> u32 {
        self.stored.get(key).copied().unwrap_or(0) + self.reservations().count(key)
    }

    /// What the runner API shows of Agent `key`; `None` when there is no such Agent.
    pub(crate) fn runner_agent(&self, key: &AgentKey) -> Option<Arc<RunnerAgent>> {
        self.runner_agents.get(key).cloned()
    }

    /// The reservations, locked (always after the index's own lock).
    fn reservations(&self) -> MutexGuard<'_, Reservations> {
        self.reservations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The reservations, through the exclusive borrow a watch event holds.
    fn reservations_mut(&mut self) -> &mut Reservations {
        self.reservations
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The payload digest stored on a Session, when the index knows the Session from
    /// the cluster or created it: `Some(None)` for a Session without one.
    pub(crate) fn session_digest(&self, namespace: &str, name: &str) -> Option<Option<String>> {
        let key = KeyRef(namespace, name);
        match self.sessions.get(key.key()) {
            Some(session) => Some(session.payload_digest.clone()),
            None => self.reservations().created_digest(key.key()),
        }
    }

    /// Holds a slot of the Agent's `max_concurrent` (and of its stored Sessions, capped
    /// by the Agent's `maxStoredSessions`) for a Session about to be created under
    /// `name`, so a burst cannot outrun the watch. The watch event of the created
    /// Session replaces the reservation.
    pub(crate) fn reserve(
        &self,
        agent: &AgentKey,
        name: &str,
        max_concurrent: Option<u32>,
    ) -> Reservation {
        let key = KeyRef(&agent.namespace, name);
        let mut reservations = self.reservations();
        if self.sessions.contains_key(key.key()) || reservations.contains(key.key()) {
            return Reservation::Shared;
        }
        let max_stored = self
            .agents
            .get(agent)
            .map_or(hookrun_crds::agent::DEFAULT_MAX_STORED_SESSIONS, |a| {
                a.max_stored
            });
        let held = reservations.count(agent);
        if self.stored.get(agent).copied().unwrap_or(0) + held >= max_stored {
            return Reservation::StoreFull { max: max_stored };
        }
        if let Some(max) = max_concurrent
            && self.active.get(agent).copied().unwrap_or(0) + held >= max
        {
            return Reservation::Full { max };
        }
        reservations.insert(AgentKey::new(agent.namespace.clone(), name), agent);
        Reservation::Reserved
    }

    /// Drops the reservations of created Sessions, as the watch would on delivering
    /// them: for benches whose store keeps nothing, so reservations do not pile up to
    /// the Agent's cap on stored Sessions.
    #[cfg(any(test, feature = "test-support"))]
    pub fn forget_created_reservations(&self) {
        self.reservations().forget_created();
    }

    /// Marks a reserved Session as created with `digest`, so a duplicate is answered
    /// from the index before the watch reports it.
    pub(crate) fn confirm(&self, namespace: &str, name: &str, digest: &str) {
        self.reservations()
            .confirm(KeyRef(namespace, name).key(), digest);
    }

    /// Gives back a reservation whose create failed, unless the watch has replaced it
    /// with the real Session meanwhile.
    pub(crate) fn release(&self, namespace: &str, name: &str) {
        self.reservations().release(KeyRef(namespace, name).key());
    }

    pub fn apply_agent(&mut self, agent: &Agent) {
        let Some(namespace) = agent.namespace() else {
            return;
        };
        let key = AgentKey::new(namespace, agent.name_any());
        self.runner_agents
            .insert(key.clone(), Arc::new(runner_agent(agent)));
        let previous = self.agents.get(&key).cloned();
        match agent_entry_after(agent, previous.as_deref()) {
            Some(entry) => {
                self.agents.insert(key.clone(), Arc::new(entry));
            }
            None => {
                self.agents.remove(&key);
            }
        }
        self.match_secret(&key);
    }

    pub(crate) fn delete_agent(&mut self, agent: &Agent) {
        if let Some(namespace) = agent.namespace() {
            let key = AgentKey::new(namespace, agent.name_any());
            self.agents.remove(&key);
            self.runner_agents.remove(&key);
            self.match_secret(&key);
        }
    }

    #[cfg(test)]
    fn reset_agents(&mut self, scope: &Scope, agents: &[Agent]) {
        let listed = agents.iter().filter_map(|a| self.listed_agent(a)).collect();
        self.reset_listed_agents(scope, listed);
    }

    /// Replaces the Agents of `scope` with a relist's, already reduced to their entries.
    fn reset_listed_agents(&mut self, scope: &Scope, listed: Vec<ListedAgent>) {
        self.agents.retain(|k, _| !scope.contains(&k.namespace));
        self.runner_agents
            .retain(|k, _| !scope.contains(&k.namespace));
        for ListedAgent { key, runner, entry } in listed {
            if let Some(entry) = entry {
                self.agents.insert(key.clone(), Arc::new(entry));
            }
            self.runner_agents.insert(key, Arc::new(runner));
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

    pub(crate) fn delete_secret(&mut self, secret: &Secret) {
        if let Some(key) = secret_key(secret)
            && let Some(previous) = self.candidates.remove(&key)
        {
            self.match_secret(&previous.owner.agent);
        }
    }

    #[cfg(test)]
    fn reset_secrets(&mut self, scope: &Scope, secrets: &[Secret]) {
        self.reset_listed_secrets(scope, secrets.iter().filter_map(listed_secret).collect());
    }

    /// Replaces the token Secrets of `scope` with a relist's, already reduced to their
    /// entries.
    fn reset_listed_secrets(&mut self, scope: &Scope, listed: Vec<ListedSecret>) {
        self.candidates.retain(|k, _| !scope.contains(&k.namespace));
        self.candidates.extend(listed);
        self.match_secrets_in(scope);
    }

    /// What a relist keeps of `agent`: its entries, with the compiled expressions of the
    /// entry this index holds when the generation is unchanged (a relist compiles only
    /// the Agents whose generation changed).
    fn listed_agent(&self, agent: &Agent) -> Option<ListedAgent> {
        let key = AgentKey::new(agent.namespace()?, agent.name_any());
        let entry = agent_entry_after(agent, self.agents.get(&key).map(|e| e.as_ref()));
        Some(ListedAgent {
            runner: runner_agent(agent),
            key,
            entry,
        })
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

    /// Counts a Session the watch delivered; it replaces the reservation of its name.
    pub(crate) fn apply_session(&mut self, session: &Session) {
        if let Some((key, entry)) = session_entry(session) {
            self.apply_session_entry(key, entry);
        }
    }

    /// The newest generation of the Sessions of session key `hash` that the watch has
    /// seen in `namespace`.
    pub(crate) fn latest_key_generation(&self, namespace: &str, hash: &str) -> Option<u32> {
        self.key_generations
            .get(KeyRef(namespace, hash).key())?
            .last()
            .copied()
    }

    fn apply_session_entry(&mut self, key: AgentKey, entry: SessionEntry) {
        self.remove_session_key(&key);
        if let Some((hash, generation)) = &entry.key {
            self.key_generations
                .entry(AgentKey::new(key.namespace.clone(), hash.clone()))
                .or_default()
                .insert(*generation);
        }
        if entry.active {
            *self.active.entry(entry.agent.clone()).or_default() += 1;
        }
        *self.stored.entry(entry.agent.clone()).or_default() += 1;
        self.sessions.insert(key, entry);
    }

    pub(crate) fn delete_session(&mut self, session: &Session) {
        if let Some(namespace) = session.namespace() {
            self.remove_session_key(&AgentKey::new(namespace, session.name_any()));
        }
    }

    fn remove_session_key(&mut self, key: &AgentKey) {
        self.reservations_mut().remove(key);
        let Some(old) = self.sessions.remove(key) else {
            return;
        };
        if let Some((hash, generation)) = &old.key {
            let by_key = AgentKey::new(key.namespace.clone(), hash.clone());
            if let Some(generations) = self.key_generations.get_mut(&by_key) {
                generations.remove(generation);
                if generations.is_empty() {
                    self.key_generations.remove(&by_key);
                }
            }
        }
        if old.active {
            decrement(&mut self.active, &old.agent);
        }
        decrement(&mut self.stored, &old.agent);
    }

    #[cfg(test)]
    pub(crate) fn reset_sessions(&mut self, scope: &Scope, sessions: &[Session]) {
        self.reset_session_entries(scope, sessions.iter().filter_map(session_entry).collect());
    }

    /// Replaces the Sessions in `scope` with `entries` (a relist, each Session already
    /// reduced to its entry so that a big history is never held whole).
    pub(crate) fn reset_session_entries(
        &mut self,
        scope: &Scope,
        entries: Vec<(AgentKey, SessionEntry)>,
    ) {
        let stale: HashSet<AgentKey> = self
            .sessions
            .keys()
            .filter(|k| scope.contains(&k.namespace))
            .cloned()
            .collect();
        for key in &stale {
            self.remove_session_key(key);
        }
        self.reservations_mut().clear(scope);
        for (key, entry) in entries {
            self.apply_session_entry(key, entry);
        }
    }
}

/// Takes one from an Agent's count, dropping the entry at zero.
fn decrement(counts: &mut KeyMap<u32>, agent: &AgentKey) {
    if let Some(count) = counts.get_mut(agent) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(agent);
        }
    }
}

#[cfg(test)]
mod tests;

/// What a relist keeps of an Agent until the list is complete: its index entries, not
/// the object (a thousand Agents with their managed fields, held at once, would be most
/// of an idle apiserver's memory).
struct ListedAgent {
    key: AgentKey,
    runner: RunnerAgent,
    entry: Option<AgentEntry>,
}

/// What a relist keeps of a token Secret: its key and candidate entry.
type ListedSecret = (AgentKey, SecretCandidate);

fn listed_secret(secret: &Secret) -> Option<ListedSecret> {
    let entry = Arc::new(secret_entry(secret));
    Some((
        secret_key(secret)?,
        SecretCandidate {
            owner: secret_owner(secret)?,
            entry,
        },
    ))
}
