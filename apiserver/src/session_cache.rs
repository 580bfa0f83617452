//! Whole Sessions that the read and runner APIs are reading, kept current by the Session
//! watch, so repeated reads (polls, event appends) cost no Kubernetes API call.
//!
//! Only Sessions someone read are held: a read that misses reads the cluster once and
//! stores the answer; the watch then replaces (or removes) the entries that are present
//! and never adds one. The index keeps a small entry per Session for everything else;
//! this cache is bounded in bytes (each entry weighs its encoded size), so a history of
//! thousands of large Sessions never sits here whole.
//!
//! Ordering: a watch event replaces an entry unless the entry's resourceVersion is
//! larger (both read as integers); a write's answer and a cluster read replace an entry
//! only when theirs is larger. So a read after a write through this process never sees
//! less than the write, and a slow cluster read never undoes a later event. A read that
//! misses first leaves a pending mark, so an event (or a delete) that lands while the
//! cluster read is in flight is not lost.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use hookrun_crds::Session;
use kube::ResourceExt;

/// The default byte budget of the cache.
pub const DEFAULT_READ_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// What a pending or gone mark weighs: its key and the cache's bookkeeping.
const MARK_WEIGHT: u64 = 256;

type Key = (String, String);

/// One entry: a Session, or a mark left while a cluster read is in flight.
#[derive(Clone, Debug)]
enum Entry {
    /// A read missed and is reading the cluster.
    Pending,
    /// Deleted while a read was in flight: that read's answer is not stored.
    Gone,
    Held {
        version: Option<u64>,
        weight: u64,
        session: Arc<Session>,
    },
}

#[derive(Clone, Debug)]
struct ByWeight;

impl quick_cache::Weighter<Key, Entry> for ByWeight {
    fn weight(&self, _key: &Key, entry: &Entry) -> u64 {
        match entry {
            Entry::Held { weight, .. } => *weight,
            Entry::Pending | Entry::Gone => MARK_WEIGHT,
        }
    }
}

/// Counts the bytes written to it.
struct Counter(u64);

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What `session` weighs: the length of its JSON encoding (counted, not kept), plus the
/// key and bookkeeping.
pub(crate) fn session_weight(session: &Session) -> u64 {
    let mut counter = Counter(0);
    // Encoding a typed Session cannot fail; if it did, it weighs the mark only.
    let _ = serde_json::to_writer(&mut counter, session);
    counter.0 + MARK_WEIGHT
}

/// A Session's resourceVersion as the number the kube-apiserver gives (etcd's revision);
/// `None` when it is not one, and then the watch's order decides.
fn version_of(session: &Session) -> Option<u64> {
    session.metadata.resource_version.as_deref()?.parse().ok()
}

fn key_of(session: &Session) -> Option<Key> {
    Some((session.namespace()?, session.name_any()))
}

/// Recently read Sessions, bounded in bytes.
#[derive(Debug)]
pub(crate) struct SessionCache {
    max_bytes: u64,
    entries: quick_cache::sync::Cache<Key, Entry, ByWeight>,
    /// Changes take turns, so each compare-and-replace sees the entry it replaces.
    writes: Mutex<()>,
}

impl SessionCache {
    /// An empty cache of at most `max_bytes` bytes (0 holds nothing).
    pub(crate) fn new(max_bytes: u64) -> Self {
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(1024)
            .weight_capacity(max_bytes.max(1))
            // One shard, so the byte budget holds for the whole cache.
            .shards(1)
            .build()
            .unwrap_or_else(|_| unreachable!("every option is set"));
        Self {
            max_bytes,
            entries: quick_cache::sync::Cache::with_options(
                options,
                ByWeight,
                Default::default(),
                Default::default(),
            ),
            writes: Mutex::new(()),
        }
    }

    /// The held Session `namespace/name`, if any.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<Arc<Session>> {
        match self.entries.get(&(namespace.to_owned(), name.to_owned()))? {
            Entry::Held { session, .. } => Some(session),
            Entry::Pending | Entry::Gone => None,
        }
    }

    /// Marks `namespace/name` as being read from the cluster, so events that arrive
    /// meanwhile land in the cache. Call before the cluster read, then [`Self::store_read`].
    pub(crate) fn begin_read(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let _turn = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        if self.entries.peek(&key).is_none() {
            self.entries.insert(key, Entry::Pending);
        }
    }

    /// Stores a Session read from the cluster (or returned by a write), unless the entry
    /// already holds a larger resourceVersion or the Session was deleted meanwhile.
    pub(crate) fn store_read(&self, session: &Session) {
        self.store(session, false);
    }

    /// A read found nothing: forgets its pending mark.
    pub(crate) fn forget_read(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let _turn = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        self.entries
            .remove_if(&key, |e| matches!(e, Entry::Pending | Entry::Gone));
    }

    /// A watch event: replaces the entry of `session` when there is one (never adds one).
    pub(crate) fn observe(&self, session: &Session) {
        self.store(session, true);
    }

    /// A watch delete: the entry goes (a read in flight will not store its answer).
    pub(crate) fn observe_deleted(&self, session: &Session) {
        let Some(key) = key_of(session) else {
            return;
        };
        let _turn = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        match self.entries.peek(&key) {
            None => {}
            Some(Entry::Pending) => {
                self.entries.insert(key, Entry::Gone);
            }
            Some(_) => {
                self.entries.remove(&key);
            }
        }
    }

    /// The watch lists again (after a gap, deletes may have been missed): drop everything;
    /// reads fill the cache again.
    pub(crate) fn clear(&self) {
        let _turn = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        self.entries.clear();
    }

    fn store(&self, session: &Session, from_watch: bool) {
        let Some(key) = key_of(session) else {
            return;
        };
        let version = version_of(session);
        let _turn = self.writes.lock().unwrap_or_else(PoisonError::into_inner);
        let replace = match self.entries.peek(&key) {
            // Only Sessions someone reads are held.
            None => false,
            Some(Entry::Gone) => {
                if !from_watch {
                    self.entries.remove(&key);
                }
                // A Session made again under the name: held again once read.
                false
            }
            Some(Entry::Pending) => true,
            Some(Entry::Held { version: held, .. }) => match (held, version) {
                (Some(held), Some(new)) => new >= held,
                // Unreadable versions: the watch's order wins, a read does not.
                _ => from_watch,
            },
        };
        if !replace {
            return;
        }
        let weight = session_weight(session);
        if weight > self.max_bytes {
            self.entries.remove(&key);
            return;
        }
        self.entries.insert(
            key,
            Entry::Held {
                version,
                weight,
                session: Arc::new(session.clone()),
            },
        );
    }

    /// The bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::test_support::session;
    use hookrun_crds::SessionPhase;

    fn at(version: &str, phase: SessionPhase) -> Session {
        let mut s = session("ns", "s", "a", Some(phase));
        s.metadata.resource_version = Some(version.into());
        s
    }

    fn phase(cache: &SessionCache) -> Option<SessionPhase> {
        cache.get("ns", "s")?.status.as_ref()?.phase
    }

    #[test]
    fn the_watch_replaces_only_sessions_that_were_read() {
        let cache = SessionCache::new(DEFAULT_READ_CACHE_BYTES);
        cache.observe(&at("5", SessionPhase::Running));
        assert!(
            cache.get("ns", "s").is_none(),
            "an unread Session is not added"
        );
        cache.store_read(&at("5", SessionPhase::Running));
        assert!(
            cache.get("ns", "s").is_none(),
            "a read without a mark is not added"
        );

        cache.begin_read("ns", "s");
        cache.store_read(&at("5", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Running));
        cache.observe(&at("6", SessionPhase::Complete));
        assert_eq!(phase(&cache), Some(SessionPhase::Complete));
        cache.observe_deleted(&at("7", SessionPhase::Complete));
        assert!(cache.get("ns", "s").is_none());
        cache.observe(&at("8", SessionPhase::Running));
        assert!(cache.get("ns", "s").is_none(), "deleted: not added back");
    }

    #[test]
    fn nothing_goes_back_to_an_older_resource_version() {
        let cache = SessionCache::new(DEFAULT_READ_CACHE_BYTES);
        cache.begin_read("ns", "s");
        // A write's answer is in before the events that led to it.
        cache.store_read(&at("10", SessionPhase::Complete));
        cache.observe(&at("9", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Complete));
        // A slow cluster read does not undo a later event.
        cache.observe(&at("12", SessionPhase::Error));
        cache.store_read(&at("11", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Error));
        // Versions that are not numbers: the event wins, a read does not.
        cache.store_read(&at("x", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Error));
        cache.observe(&at("y", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Running));
    }

    #[test]
    fn an_event_during_a_read_is_kept_and_a_delete_stops_the_store() {
        let cache = SessionCache::new(DEFAULT_READ_CACHE_BYTES);
        cache.begin_read("ns", "s");
        cache.observe(&at("6", SessionPhase::Complete));
        cache.store_read(&at("5", SessionPhase::Running));
        assert_eq!(phase(&cache), Some(SessionPhase::Complete));

        cache.clear();
        cache.begin_read("ns", "s");
        cache.observe_deleted(&at("6", SessionPhase::Complete));
        cache.store_read(&at("5", SessionPhase::Running));
        assert!(
            cache.get("ns", "s").is_none(),
            "a deleted Session is not stored"
        );
        cache.begin_read("ns", "s");
        cache.store_read(&at("9", SessionPhase::Running));
        assert_eq!(
            phase(&cache),
            Some(SessionPhase::Running),
            "read again later"
        );

        cache.begin_read("ns", "gone");
        cache.forget_read("ns", "gone");
        assert_eq!(cache.entries.len(), 1);
    }

    #[test]
    fn the_cache_stays_within_its_byte_budget() {
        let big = |name: &str| {
            let mut s = session("ns", name, "a", Some(SessionPhase::Running));
            s.metadata.resource_version = Some("1".into());
            s.spec.title = "x".repeat(10_000);
            s
        };
        let weight = session_weight(&big("s0"));
        assert!(weight > 10_000, "the weight counts the encoded Session");
        let cache = SessionCache::new(weight * 3);
        for i in 0..20 {
            let s = big(&format!("s{i}"));
            cache.begin_read("ns", &s.name_any());
            cache.store_read(&s);
        }
        assert!(cache.bytes() <= weight * 3, "{} bytes held", cache.bytes());
        // A Session larger than the whole budget is not held.
        let small = SessionCache::new(1000);
        small.begin_read("ns", "s0");
        small.store_read(&big("s0"));
        assert!(small.get("ns", "s0").is_none());
    }
}
