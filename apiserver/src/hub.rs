//! Where held requests (wait mode, SSE streams) learn that a Session changed.
//!
//! The apiserver already watches every Session to count running ones; the hub passes each
//! change on to the requests that asked for that Session, and to no one else. It keeps
//! nothing for Sessions nobody holds, so memory grows with held requests, not Sessions,
//! and a request that goes away (its client disconnected) frees its slot when its
//! [`Subscription`] drops.
//!
//! When the server drains, [`SessionHub::flush`] tells every subscription at once (and
//! every one taken later) to answer with what it has: held requests answer 202 with a
//! `pollUrl`, streams send a final event to resume from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hookrun_crds::Session;
use kube::ResourceExt;
use tokio::sync::watch;

use crate::session_cache::{DEFAULT_READ_CACHE_BYTES, SessionCache};

/// What the hub last saw of one Session.
#[derive(Clone, Debug, Default)]
pub(crate) enum Seen {
    /// Nothing since the subscription began.
    #[default]
    Nothing,
    /// The Session as the watch delivered it.
    Session(Arc<Session>),
    /// The Session was deleted.
    Deleted,
}

type Key = (String, String);

/// Fans Session changes out to the requests waiting on them.
#[derive(Debug)]
pub struct SessionHub {
    senders: Mutex<HashMap<Key, watch::Sender<Seen>>>,
    /// True once the server drains: every held request answers now.
    flushed: watch::Sender<bool>,
    /// The Sessions the read and runner APIs are reading, kept current by the same
    /// watch events.
    pub(crate) read_cache: SessionCache,
}

impl Default for SessionHub {
    fn default() -> Self {
        Self::with_cache(DEFAULT_READ_CACHE_BYTES)
    }
}

/// One request's view of one Session; dropping it unsubscribes.
#[derive(Debug)]
pub(crate) struct Subscription {
    hub: Arc<SessionHub>,
    key: Key,
    receiver: Option<watch::Receiver<Seen>>,
}

impl SessionHub {
    /// An empty hub, shared by the watch that feeds it and the requests that read it.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty hub whose read cache holds at most `read_cache_bytes` bytes of Sessions.
    pub fn with_read_cache_bytes(read_cache_bytes: u64) -> Arc<Self> {
        Arc::new(Self::with_cache(read_cache_bytes))
    }

    fn with_cache(read_cache_bytes: u64) -> Self {
        Self {
            senders: Mutex::default(),
            flushed: watch::channel(false).0,
            read_cache: SessionCache::new(read_cache_bytes),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, watch::Sender<Seen>>> {
        self.senders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts following the Session `namespace/name`. Subscribe *before* reading the
    /// Session's current state from the cluster, so no change falls in between.
    pub(crate) fn subscribe(self: &Arc<Self>, namespace: &str, name: &str) -> Subscription {
        let key = (namespace.to_owned(), name.to_owned());
        let receiver = self
            .lock()
            .entry(key.clone())
            .or_insert_with(|| watch::channel(Seen::Nothing).0)
            .subscribe();
        Subscription {
            hub: self.clone(),
            key,
            receiver: Some(receiver),
        }
    }

    /// Passes a changed Session to whoever follows it.
    pub(crate) fn publish(&self, session: &Session) {
        self.read_cache.observe(session);
        let Some(namespace) = session.namespace() else {
            return;
        };
        let senders = self.lock();
        if let Some(sender) = senders.get(&(namespace, session.name_any())) {
            sender.send_replace(Seen::Session(Arc::new(session.clone())));
        }
    }

    /// Tells whoever follows `session` that it is gone.
    pub(crate) fn publish_deleted(&self, session: &Session) {
        self.read_cache.observe_deleted(session);
        let Some(namespace) = session.namespace() else {
            return;
        };
        let senders = self.lock();
        if let Some(sender) = senders.get(&(namespace, session.name_any())) {
            sender.send_replace(Seen::Deleted);
        }
    }

    /// The watch starts listing Sessions again: deletes during a gap may have been
    /// missed, so the read cache starts over.
    pub(crate) fn relisting(&self) {
        self.read_cache.clear();
    }

    /// Tells every subscription, now and later, to stop waiting (the server drains).
    pub fn flush(&self) {
        self.flushed.send_replace(true);
    }

    /// How many Sessions are followed right now (for metrics and tests).
    pub fn followed(&self) -> usize {
        self.lock().len()
    }
}

impl Subscription {
    #[cfg(test)]
    /// The latest change seen since subscribing.
    pub(crate) fn latest(&self) -> Seen {
        self.receiver
            .as_ref()
            .map(|r| r.borrow().clone())
            .unwrap_or_default()
    }

    /// A future that resolves once the hub is flushed (at once if it already is); it
    /// borrows nothing, so it can be awaited beside [`Subscription::changed`].
    pub(crate) fn flushed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut flushed = self.hub.flushed.subscribe();
        async move {
            // Resolves too if the hub is dropped: nobody is left to publish.
            let _ = flushed.wait_for(|flushed| *flushed).await;
        }
    }

    /// Waits for the next change and returns it; `None` only if the hub itself is gone.
    pub(crate) async fn changed(&mut self) -> Option<Seen> {
        let receiver = self.receiver.as_mut()?;
        receiver.changed().await.ok()?;
        Some(receiver.borrow_and_update().clone())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.receiver.take());
        let mut senders = self.hub.lock();
        if senders
            .get(&self.key)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            senders.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::test_support::session;
    use hookrun_crds::SessionPhase;

    #[tokio::test]
    async fn a_subscriber_sees_changes_to_its_session_only() {
        let hub = SessionHub::new();
        let mut mine = hub.subscribe("team", "a-wh-1");
        hub.publish(&session("team", "other", "a", Some(SessionPhase::Running)));
        assert!(matches!(mine.latest(), Seen::Nothing));
        hub.publish(&session(
            "team",
            "a-wh-1",
            "a",
            Some(SessionPhase::Complete),
        ));
        match mine.changed().await {
            Some(Seen::Session(s)) => {
                assert_eq!(
                    s.status.as_ref().and_then(|s| s.phase),
                    Some(SessionPhase::Complete)
                );
            }
            other => panic!("expected the Session, got {other:?}"),
        }
        hub.publish_deleted(&session("team", "a-wh-1", "a", None));
        assert!(matches!(mine.changed().await, Some(Seen::Deleted)));
    }

    #[tokio::test]
    async fn a_flush_wakes_every_subscription_now_and_later() {
        let hub = SessionHub::new();
        let early = hub.subscribe("team", "a");
        let waiting = tokio::spawn(async move { early.flushed().await });
        hub.flush();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the flush")
            .expect("the task");
        let late = hub.subscribe("team", "b");
        tokio::time::timeout(std::time::Duration::from_secs(5), late.flushed())
            .await
            .expect("a subscription taken after the flush resolves at once");
    }

    #[test]
    fn watch_events_keep_the_read_cache_current_and_a_relist_empties_it() {
        let hub = SessionHub::new();
        let at = |version: &str, phase| {
            let mut s = session("team", "s", "a", Some(phase));
            s.metadata.resource_version = Some(version.into());
            s
        };
        let phase = |hub: &SessionHub| {
            hub.read_cache
                .get("team", "s")
                .and_then(|s| s.status.as_ref()?.phase)
        };
        hub.publish(&at("1", SessionPhase::Running));
        assert_eq!(phase(&hub), None, "nobody read it: not held");
        hub.read_cache.begin_read("team", "s");
        hub.read_cache.store_read(&at("1", SessionPhase::Running));
        hub.publish(&at("2", SessionPhase::Complete));
        assert_eq!(phase(&hub), Some(SessionPhase::Complete));
        hub.relisting();
        assert_eq!(phase(&hub), None);
        hub.read_cache.begin_read("team", "s");
        hub.read_cache.store_read(&at("2", SessionPhase::Complete));
        hub.publish_deleted(&at("3", SessionPhase::Complete));
        assert_eq!(phase(&hub), None);
    }

    #[test]
    fn dropping_the_last_subscription_forgets_the_session() {
        let hub = SessionHub::new();
        let first = hub.subscribe("team", "s");
        let second = hub.subscribe("team", "s");
        assert_eq!(hub.followed(), 1);
        drop(first);
        assert_eq!(hub.followed(), 1);
        drop(second);
        assert_eq!(hub.followed(), 0);
        // Nobody follows it: publishing keeps nothing.
        hub.publish(&session("team", "s", "a", None));
        assert_eq!(hub.followed(), 0);
    }
}
