//! Which finished Sessions go when an Agent stores more Sessions than its
//! `spec.session.maxStoredSessions`: the oldest finished first. Pure: no client.
//!
//! The apiserver refuses a webhook once an Agent stores its most Sessions; this is the
//! other half, for an Agent whose cap was lowered (or whose Sessions were created some
//! other way): the operator brings the count back down to the cap.

use std::cmp::Ordering;

use hookrun_crds::{Session, SessionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::cache::CachedSession;

/// A stored Session as retention sees it: its metadata and status.
pub trait Stored {
    fn stored_meta(&self) -> &ObjectMeta;
    fn stored_status(&self) -> Option<&SessionStatus>;
}

impl Stored for Session {
    fn stored_meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn stored_status(&self) -> Option<&SessionStatus> {
        self.status.as_ref()
    }
}

impl Stored for CachedSession {
    fn stored_meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn stored_status(&self) -> Option<&SessionStatus> {
        self.status.as_ref()
    }
}

/// The Sessions to delete so that at most `cap` of `sessions` (the Sessions of one
/// Agent) are stored: finished ones, the earliest finished first. A Session that has not
/// finished is never chosen, so fewer may be chosen than the excess. Sessions already
/// being deleted neither count nor are chosen.
pub fn over_cap<'a, S: Stored>(sessions: &[&'a S], cap: u32) -> Vec<&'a S> {
    let stored: Vec<&S> = sessions
        .iter()
        .copied()
        .filter(|s| s.stored_meta().deletion_timestamp.is_none())
        .collect();
    let cap = usize::try_from(cap).unwrap_or(usize::MAX);
    let excess = stored.len().saturating_sub(cap);
    if excess == 0 {
        return Vec::new();
    }
    let mut finished: Vec<&S> = stored
        .into_iter()
        .filter(|s| s.stored_status().is_some_and(|st| st.is_finished()))
        .collect();
    finished.sort_by(|a, b| oldest_first(*a, *b));
    finished.truncate(excess);
    finished
}

/// When a finished Session finished (its creation when it carries no completion time).
fn finished_at<S: Stored>(session: &S) -> Option<&Time> {
    session
        .stored_status()
        .and_then(|s| s.completion_time.as_ref())
        .or(session.stored_meta().creation_timestamp.as_ref())
}

fn oldest_first<S: Stored>(a: &S, b: &S) -> Ordering {
    let key = |s: &S| {
        (
            finished_at(s).map(|t| t.0.as_millisecond()),
            s.stored_meta()
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond()),
        )
    };
    key(a)
        .cmp(&key(b))
        .then_with(|| a.stored_meta().name.cmp(&b.stored_meta().name))
}

#[cfg(test)]
mod tests {
    use hookrun_crds::{
        SessionSpec,
        session::{SessionPhase, SessionStatus},
    };
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).expect("a time"))
    }

    fn session(name: &str, phase: Option<SessionPhase>, finished: Option<i64>) -> Session {
        let mut s = Session::new(
            name,
            SessionSpec {
                agent: "a".into(),
                ..Default::default()
            },
        );
        s.metadata.creation_timestamp = Some(at(0));
        s.status = Some(SessionStatus {
            phase,
            completion_time: finished.map(at),
            ..Default::default()
        });
        s
    }

    fn names(chosen: Vec<&Session>) -> Vec<String> {
        chosen
            .into_iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn nothing_goes_within_the_cap() {
        let a = session("a", Some(SessionPhase::Complete), Some(1));
        let b = session("b", Some(SessionPhase::Error), Some(2));
        assert!(over_cap(&[&a, &b], 2).is_empty());
        assert!(over_cap(&[&a, &b], 5).is_empty());
        assert!(over_cap::<Session>(&[], 1).is_empty());
    }

    #[test]
    fn the_earliest_finished_go_first() {
        let late = session("late", Some(SessionPhase::Complete), Some(30));
        let early = session("early", Some(SessionPhase::Error), Some(10));
        let middle = session("middle", Some(SessionPhase::Complete), Some(20));
        let running = session("running", Some(SessionPhase::Running), None);
        let all = [&late, &running, &early, &middle];
        assert_eq!(names(over_cap(&all, 3)), ["early"]);
        assert_eq!(names(over_cap(&all, 2)), ["early", "middle"]);
        assert_eq!(names(over_cap(&all, 1)), ["early", "middle", "late"]);
    }

    #[test]
    fn running_and_pending_sessions_are_never_chosen() {
        let running = session("running", Some(SessionPhase::Running), None);
        let pending = session("pending", Some(SessionPhase::Pending), None);
        let new = session("new", None, None);
        let done = session("done", Some(SessionPhase::Complete), Some(5));
        // Three over the cap, one finished: only that one goes.
        assert_eq!(
            names(over_cap(&[&running, &pending, &new, &done], 1)),
            ["done"]
        );
        assert!(over_cap(&[&running, &pending, &new], 1).is_empty());
    }

    #[test]
    fn sessions_being_deleted_neither_count_nor_go_again() {
        let mut going = session("going", Some(SessionPhase::Complete), Some(1));
        going.metadata.deletion_timestamp = Some(at(50));
        let a = session("a", Some(SessionPhase::Complete), Some(2));
        let b = session("b", Some(SessionPhase::Complete), Some(3));
        assert!(over_cap(&[&going, &a, &b], 2).is_empty());
        assert_eq!(names(over_cap(&[&going, &a, &b], 1)), ["a"]);
    }

    #[test]
    fn ties_and_missing_times_are_ordered_by_creation_then_name() {
        let mut no_time = session("x-no-time", Some(SessionPhase::Error), None);
        no_time.metadata.creation_timestamp = Some(at(-100));
        let b = session("b", Some(SessionPhase::Complete), Some(7));
        let a = session("a", Some(SessionPhase::Complete), Some(7));
        assert_eq!(
            names(over_cap(&[&b, &a, &no_time], 0)),
            ["x-no-time", "a", "b"]
        );
    }
}
