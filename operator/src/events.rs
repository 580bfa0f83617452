//! Kubernetes Events about Agents and Sessions (`kubectl describe` shows them).
//!
//! A repeat of an Event (same object, type, reason, action and note) within
//! [`REPEAT_WINDOW`] raises the first one's series count instead of creating another, as
//! Kubernetes' own recorders do. What is remembered for that is a hash of the Event's
//! identity, the stored Event's name and a count: about a hundred bytes per Event, at most
//! [`MAX_REMEMBERED`] of them. (A recorder that keeps each whole Event until the window
//! ends holds several kilobytes per Agent after a thousand Agents are created at once.)

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType, Reporter};

/// How long a published Event is remembered for its repeats.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(6 * 60);
/// The most Events remembered at once; past it, an Event is still published but its
/// repeats create Events of their own until room frees up.
pub const MAX_REMEMBERED: usize = 4096;

/// Publishes Events as one reporting controller and instance. Clones share what they
/// remember.
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    reporter: Arc<Reporter>,
    repeats: Arc<Mutex<Repeats>>,
    hasher: RandomState,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Self {
            client,
            reporter: Arc::new(reporter),
            repeats: Arc::new(Mutex::new(Repeats::new(REPEAT_WINDOW, MAX_REMEMBERED))),
            hasher: RandomState::new(),
        }
    }

    /// Publishes `event` about the object `regarding` names: creates it, or raises the
    /// series of the same Event published within the window.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let key = self.key(event, regarding);
        let repeat = self
            .repeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .repeat_of(key, Instant::now());
        if let Some((name, count)) = repeat {
            let series = serde_json::json!({"series": EventSeries {
                count,
                last_observed_time: MicroTime(Timestamp::now()),
            }});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                .await
            {
                Ok(_) => return Ok(()),
                // Gone (Events expire in the cluster): publish it anew.
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error),
            }
        }
        let created = api
            .create(&PostParams::default(), &self.new_event(event, regarding))
            .await?;
        if let Some(name) = created.metadata.name {
            self.repeats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remember(key, name.into_boxed_str(), Instant::now());
        }
        Ok(())
    }

    /// What makes two Events the same: the object, type, reason, action, note and
    /// related object (the reporter is this recorder's own).
    fn key(&self, event: &Event, regarding: &ObjectReference) -> u64 {
        let type_ = match event.type_ {
            EventType::Normal => 0u8,
            EventType::Warning => 1,
        };
        let related = event.secondary.as_ref();
        self.hasher.hash_one((
            (
                &regarding.uid,
                &regarding.namespace,
                &regarding.name,
                &regarding.kind,
            ),
            type_,
            &event.reason,
            &event.action,
            &event.note,
            related.map(|r| (&r.uid, &r.namespace, &r.name, &r.kind)),
        ))
    }

    fn new_event(&self, event: &Event, regarding: &ObjectReference) -> K8sEvent {
        let now = Timestamp::now();
        let controller = &self.reporter.controller;
        K8sEvent {
            metadata: ObjectMeta {
                namespace: regarding.namespace.clone(),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_owned(),
            ),
            reason: Some(event.reason.clone()),
            action: Some(event.action.clone()),
            note: event.note.clone(),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            ..K8sEvent::default()
        }
    }
}

/// The Events published within the window, by identity hash. Pure: the caller says
/// what time it is.
#[derive(Debug)]
pub struct Repeats {
    window: Duration,
    max: usize,
    seen: HashMap<u64, Seen>,
    /// When expired entries were last dropped: at most a few times per window, so a
    /// burst of Events does not walk the whole map once per Event.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Seen {
    /// The stored Event's name.
    name: Box<str>,
    /// How many times it was published.
    count: i32,
    /// When it was first published: repeats after the window start a new Event, so one
    /// series does not grow forever.
    first: Instant,
}

impl Repeats {
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max,
            seen: HashMap::new(),
            swept: None,
        }
    }

    /// When `key` was published within the window: the stored Event's name and the
    /// series count to write (counting this one).
    pub fn repeat_of(&mut self, key: u64, now: Instant) -> Option<(String, i32)> {
        self.sweep(now);
        let window = self.window;
        let seen = self
            .seen
            .get_mut(&key)
            .filter(|s| now.saturating_duration_since(s.first) < window)?;
        seen.count = seen.count.saturating_add(1);
        Some((seen.name.to_string(), seen.count))
    }

    /// Remembers that `key` was just published as the Event `name`.
    pub fn remember(&mut self, key: u64, name: Box<str>, now: Instant) {
        self.sweep(now);
        if self.seen.len() >= self.max && !self.seen.contains_key(&key) {
            self.sweep_now(now);
            if self.seen.len() >= self.max {
                return;
            }
        }
        self.seen.insert(
            key,
            Seen {
                name,
                count: 1,
                first: now,
            },
        );
    }

    /// How many Events are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn sweep(&mut self, now: Instant) {
        let due = self
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= self.window / 4);
        if due {
            self.sweep_now(now);
        }
    }

    fn sweep_now(&mut self, now: Instant) {
        let window = self.window;
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.first) < window);
        if self.seen.is_empty() {
            // A map that held a burst keeps its capacity; give it back.
            self.seen.shrink_to_fit();
        }
        self.swept = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_within_the_window_raises_the_first_events_count() {
        let mut repeats = Repeats::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        assert_eq!(repeats.repeat_of(1, at(0)), None, "first time: create");
        repeats.remember(1, "agent.1".into(), at(0));
        assert_eq!(repeats.repeat_of(1, at(10)), Some(("agent.1".into(), 2)));
        assert_eq!(repeats.repeat_of(1, at(20)), Some(("agent.1".into(), 3)));
        assert_eq!(repeats.repeat_of(2, at(20)), None, "another Event");
        // After the window a repeat starts a new Event with a series of its own.
        assert_eq!(repeats.repeat_of(1, at(61)), None);
        repeats.remember(1, "agent.2".into(), at(61));
        assert_eq!(repeats.repeat_of(1, at(62)), Some(("agent.2".into(), 2)));
    }

    #[test]
    fn what_is_remembered_is_bounded_and_expires() {
        let mut repeats = Repeats::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        for key in 0..5 {
            repeats.remember(key, format!("e.{key}").into(), at(key));
        }
        assert_eq!(
            repeats.len(),
            3,
            "the first three fit; the rest are not remembered"
        );
        assert_eq!(repeats.repeat_of(4, at(5)), None);
        assert_eq!(repeats.repeat_of(0, at(5)), Some(("e.0".into(), 2)));
        // Once the window has passed, every entry goes and the room is back.
        repeats.remember(9, "e.9".into(), at(200));
        assert_eq!(repeats.len(), 1);
        assert_eq!(repeats.repeat_of(0, at(201)), None);
        assert_eq!(repeats.repeat_of(9, at(201)), Some(("e.9".into(), 2)));
    }
}
