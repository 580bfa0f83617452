//! Session names this process holds for a create in flight, or created and not yet seen
//! by the watch: they count against their Agent's `maxConcurrent` and stored Sessions
//! until the watch delivers the Session, so a burst cannot outrun the watch. They live
//! behind their own lock inside the [`Index`](super::Index): a reservation takes the
//! index's read lock only, so webhooks do not queue behind each other on its write lock.

use super::watch::Scope;
use super::{AgentKey, KeyMap, KeyParts};

/// The answer to [`Index::reserve`](super::Index::reserve).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reservation {
    /// A slot is held under the name; release it if the create fails.
    Reserved,
    /// Another request of this process holds the name already; nothing to release.
    Shared,
    /// The Agent runs its most Sessions.
    Full { max: u32 },
    /// The Agent stores its most Sessions, finished ones included.
    StoreFull { max: u32 },
}

/// One held name.
#[derive(Debug)]
struct Held {
    agent: AgentKey,
    /// The payload digest once the create succeeded; `None` while it is in flight.
    created: Option<String>,
}

/// The held names, by (namespace, Session name), and how many each Agent holds.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    held: KeyMap<Held>,
    per_agent: KeyMap<u32>,
}

impl Reservations {
    /// How many names `agent` holds.
    pub(super) fn count(&self, agent: &AgentKey) -> u32 {
        self.per_agent.get(agent).copied().unwrap_or(0)
    }

    /// Whether the Session `key` is held.
    pub(super) fn contains(&self, key: &dyn KeyParts) -> bool {
        self.held.contains_key(key)
    }

    /// Drops every name whose create succeeded, as the watch does when it delivers
    /// the Sessions (benches, whose store keeps nothing and has no watch).
    #[cfg(any(test, feature = "test-support"))]
    pub(super) fn forget_created(&mut self) {
        let created: Vec<AgentKey> = self
            .held
            .iter()
            .filter(|(_, held)| held.created.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        for key in created {
            if let Some(held) = self.held.remove(&key) {
                self.forget(&held.agent);
            }
        }
    }

    /// Holds `key` for `agent`.
    pub(super) fn insert(&mut self, key: AgentKey, agent: &AgentKey) {
        *self.per_agent.entry(agent.clone()).or_default() += 1;
        let previous = self.held.insert(
            key,
            Held {
                agent: agent.clone(),
                created: None,
            },
        );
        if let Some(previous) = previous {
            self.forget(&previous.agent);
        }
    }

    /// Marks the held `key` as created with `digest`.
    pub(super) fn confirm(&mut self, key: &dyn KeyParts, digest: &str) {
        if let Some(held) = self.held.get_mut(key)
            && held.created.is_none()
        {
            held.created = Some(digest.to_owned());
        }
    }

    /// The digest of a held Session that was created: `Some(Some(digest))`.
    pub(super) fn created_digest(&self, key: &dyn KeyParts) -> Option<Option<String>> {
        self.held.get(key).and_then(|h| h.created.clone()).map(Some)
    }

    /// Gives back `key` if its create is still in flight (a created one waits for the
    /// watch).
    pub(super) fn release(&mut self, key: &dyn KeyParts) {
        if self.held.get(key).is_some_and(|h| h.created.is_none()) {
            self.remove(key);
        }
    }

    /// Drops `key`, whatever its state: the watch delivered or deleted the Session.
    pub(super) fn remove(&mut self, key: &dyn KeyParts) {
        if let Some(held) = self.held.remove(key) {
            self.forget(&held.agent);
        }
    }

    /// Drops every name in `scope`, as a relist of the Sessions does.
    pub(super) fn clear(&mut self, scope: &Scope) {
        let keys: Vec<AgentKey> = self
            .held
            .keys()
            .filter(|k| scope.contains(&k.namespace))
            .cloned()
            .collect();
        for key in &keys {
            self.remove(key);
        }
    }

    fn forget(&mut self, agent: &AgentKey) {
        if let Some(count) = self.per_agent.get_mut(agent) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_agent.remove(agent);
            }
        }
    }
}
