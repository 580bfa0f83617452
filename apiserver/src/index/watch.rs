//! The watches that feed the index: Agents, the operator's managed Secrets and Sessions,
//! in every namespace or in the ones given. Each event is applied under the index's
//! write lock; Session changes go on to the [`SessionHub`] after the lock is released.

use std::sync::{Arc, PoisonError};

use futures::{Stream, StreamExt};
use hookrun_crds::names;
use hookrun_crds::{Agent, Session};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher::Event};
use kube::{Api, Client, Resource};

use super::entries::{SessionEntry, session_entry};
use super::{AgentKey, Index, ListedAgent, ListedSecret, SharedIndex, listed_secret};
use crate::hub::SessionHub;

/// Which watch stream a reset came from: every namespace, or one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    pub(super) fn contains(&self, namespace: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Namespace(ns) => ns == namespace,
        }
    }
}

/// The watch streams of one kind: how each event lands in the index, and what held
/// requests learn of it.
trait Indexed: Resource<DynamicType = ()> + Clone + Send + Sync + std::fmt::Debug + 'static {
    /// What a relist keeps of each object until the list is complete: only its small
    /// index entry, since thousands of objects (Sessions near their size budget, Agents
    /// with their managed fields) would otherwise be held whole at once.
    type Listed: Send;
    fn listed(index: &Index, object: Self) -> Self::Listed;
    fn apply(index: &mut Index, object: &Self);
    fn delete(index: &mut Index, object: &Self);
    fn reset(index: &mut Index, scope: &Scope, listed: Vec<Self::Listed>);
    /// Tells `hub` that `object` changed (Sessions only).
    fn publish(_hub: &SessionHub, _object: &Self) {}
    /// Tells `hub` that `object` is gone (Sessions only).
    fn publish_deleted(_hub: &SessionHub, _object: &Self) {}
    /// Tells `hub` that a relist begins (Sessions only).
    fn relisting(_hub: &SessionHub) {}
}

impl Indexed for Agent {
    type Listed = Option<ListedAgent>;
    fn listed(index: &Index, object: Self) -> Self::Listed {
        index.listed_agent(&object)
    }
    fn apply(index: &mut Index, object: &Self) {
        index.apply_agent(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_agent(object);
    }
    fn reset(index: &mut Index, scope: &Scope, listed: Vec<Self::Listed>) {
        index.reset_listed_agents(scope, listed.into_iter().flatten().collect());
    }
}

impl Indexed for Secret {
    type Listed = Option<ListedSecret>;
    fn listed(_index: &Index, object: Self) -> Self::Listed {
        listed_secret(&object)
    }
    fn apply(index: &mut Index, object: &Self) {
        index.apply_secret(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_secret(object);
    }
    fn reset(index: &mut Index, scope: &Scope, listed: Vec<Self::Listed>) {
        index.reset_listed_secrets(scope, listed.into_iter().flatten().collect());
    }
}

impl Indexed for Session {
    type Listed = Option<(AgentKey, SessionEntry)>;
    fn listed(_index: &Index, object: Self) -> Self::Listed {
        session_entry(&object)
    }
    fn apply(index: &mut Index, object: &Self) {
        index.apply_session(object);
    }
    fn delete(index: &mut Index, object: &Self) {
        index.delete_session(object);
    }
    fn reset(index: &mut Index, scope: &Scope, listed: Vec<Self::Listed>) {
        index.reset_session_entries(scope, listed.into_iter().flatten().collect());
    }
    fn publish(hub: &SessionHub, object: &Self) {
        hub.publish(object);
    }
    fn publish_deleted(hub: &SessionHub, object: &Self) {
        hub.publish_deleted(object);
    }
    fn relisting(hub: &SessionHub) {
        hub.relisting();
    }
}

/// What an event changed, to tell the hub once the index lock is released.
enum Changed<K> {
    Nothing,
    Applied(K),
    Deleted(K),
}

/// Feeds one watch stream into the index until it ends (it does not: watchers retry
/// with backoff).
async fn feed<K: Indexed>(
    index: SharedIndex,
    hub: Arc<SessionHub>,
    scope: Scope,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
) {
    let mut events = std::pin::pin!(events);
    let mut buffer: Vec<K::Listed> = Vec::new();
    let mut synced_once = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, kind = %K::kind(&()), "watch failed; retrying");
                continue;
            }
        };
        let changed = match event {
            Event::Init => {
                buffer.clear();
                K::relisting(&hub);
                Changed::Nothing
            }
            // Followers of a listed Session learn of it now; the index keeps its entry
            // until the list is complete.
            Event::InitApply(object) => {
                K::publish(&hub, &object);
                let listed = K::listed(
                    &index.read().unwrap_or_else(PoisonError::into_inner),
                    object,
                );
                buffer.push(listed);
                Changed::Nothing
            }
            // Never held across an await: each arm locks, changes and unlocks.
            Event::InitDone => {
                let listed = std::mem::take(&mut buffer);
                let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
                K::reset(&mut index, &scope, listed);
                if !synced_once {
                    synced_once = true;
                    index.mark_synced();
                    if index.is_synced() {
                        drop(index);
                        release_freed_memory();
                    }
                }
                Changed::Nothing
            }
            Event::Apply(object) => {
                K::apply(
                    &mut index.write().unwrap_or_else(PoisonError::into_inner),
                    &object,
                );
                Changed::Applied(object)
            }
            Event::Delete(object) => {
                K::delete(
                    &mut index.write().unwrap_or_else(PoisonError::into_inner),
                    &object,
                );
                Changed::Deleted(object)
            }
        };
        // The index lock is released: held requests wake without waiting on it.
        match changed {
            Changed::Nothing => {}
            Changed::Applied(object) => K::publish(&hub, &object),
            Changed::Deleted(object) => K::publish_deleted(&hub, &object),
        }
    }
}

/// Sessions per page of a relist: each page is held whole while it is read, and a
/// Session may be a few hundred KiB near its budgets.
const SESSION_LIST_PAGE: u32 = 50;

/// How many watch streams [`run_watches`] runs for these namespaces.
pub(crate) fn stream_count(namespaces: &[String]) -> usize {
    3 * namespaces.len().max(1)
}

/// Watches Agents, managed Secrets and Sessions (in `namespaces`, or everywhere when
/// empty) into `index`, and passes Session changes on to `hub`. Runs until the process ends.
/// Gives the pages the first lists freed back to the system. The lists' JSON and the
/// decoded objects are freed once the index holds its own entries, but glibc keeps
/// freed memory in each worker thread's arena: over 1,000 Agents that is about 5 MiB
/// resident for good, more than the index itself. Once, at start; later relists are
/// watch resumptions or the same size again.
#[allow(unsafe_code)]
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free pages of glibc's arenas to the kernel; it
    // takes the arenas' locks and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub(crate) async fn run_watches(
    client: Client,
    namespaces: Vec<String>,
    index: SharedIndex,
    hub: Arc<SessionHub>,
) {
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
            hub.clone(),
            scope.clone(),
            watcher(agents, config.clone()).default_backoff(),
        )));
        tasks.push(tokio::spawn(feed(
            index.clone(),
            hub.clone(),
            scope.clone(),
            watcher(
                secrets,
                config.clone().labels(names::MANAGED_SECRET_SELECTOR),
            )
            .default_backoff(),
        )));
        tasks.push(tokio::spawn(feed(
            index.clone(),
            hub.clone(),
            scope.clone(),
            watcher(sessions, config.page_size(SESSION_LIST_PAGE)).default_backoff(),
        )));
    }
    futures::future::join_all(tasks).await;
}

#[cfg(test)]
mod tests {
    use std::sync::RwLock;

    use hookrun_crds::session::SessionPhase;

    use super::*;
    use crate::hub::Seen;
    use crate::index::AgentKey;
    use crate::index::test_support::session;

    #[tokio::test]
    async fn session_events_reach_the_index_and_then_the_hub() {
        let index: SharedIndex = Arc::new(RwLock::new(Index::new(1)));
        let hub = SessionHub::new();
        let listed = hub.subscribe("ns", "listed");
        let gone = hub.subscribe("ns", "gone");
        let running = |name| session("ns", name, "a", Some(SessionPhase::Running));
        let events = futures::stream::iter([
            Ok(Event::Init),
            Ok(Event::InitApply(running("listed"))),
            Ok(Event::InitApply(running("gone"))),
            Ok(Event::InitDone),
            Ok(Event::Delete(running("gone"))),
        ]);
        feed::<Session>(index.clone(), hub.clone(), Scope::All, events).await;
        let index = index.read().unwrap_or_else(PoisonError::into_inner);
        assert!(index.is_synced());
        assert_eq!(index.active_sessions(&AgentKey::new("ns", "a")), 1);
        assert!(
            matches!(listed.latest(), Seen::Session(s) if s.metadata.name.as_deref() == Some("listed"))
        );
        assert!(matches!(gone.latest(), Seen::Deleted));
    }
}
