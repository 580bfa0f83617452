//! Putting one input into a Session's status: a `user.message` event appended once per
//! idempotency key, and whether it was delivered (the Session runs) or buffered (its pod
//! has not started). Pure: the caller writes the status.

use hookrun_crds::SessionPhase;
use hookrun_crds::session::{SessionStatus, event_types};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sha2::{Digest, Sha256};

/// How an input reached its Session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// The event's id in the Session's log.
    pub(crate) event_id: u64,
    /// `false`: the Session was Pending, the input waits for its pod.
    pub(crate) running: bool,
    /// The same idempotency key was delivered before: this is its answer again.
    pub(crate) replayed: bool,
}

/// Why an input was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NotDelivered {
    /// The Session has finished (Complete or Error).
    Finished,
}

/// The event key of an idempotency key sent through Grant `grant_uid`: a digest, so any
/// key the caller picks fits the event key's alphabet and length, and keys of different
/// Grants or sources never meet.
pub(crate) fn event_key(grant_uid: &str, idempotency_key: &str) -> String {
    let digest = Sha256::digest(format!("{grant_uid}\0{idempotency_key}").as_bytes());
    format!("hook-{}", &hex::encode(digest)[..40])
}

/// Appends `content` as a `user.message` to `status`, once per `key`. A key already in the
/// log answers as the first delivery did: delivered if the Session was running when it
/// arrived (a `session.status_running` event before it, or dropped from the kept log).
pub(crate) fn deliver(
    status: &mut SessionStatus,
    content: &str,
    key: Option<&str>,
    at: Time,
) -> Result<Delivered, NotDelivered> {
    if let Some(key) = key
        && let Some(event_id) = status.event_with_key(key)
    {
        return Ok(Delivered {
            event_id,
            running: was_running_at(status, event_id),
            replayed: true,
        });
    }
    if !status.takes_input() {
        return Err(NotDelivered::Finished);
    }
    let running = status.phase() == SessionPhase::Running;
    let event_id = match key {
        Some(key) => status.push_event_once(event_types::USER_MESSAGE, content, key, at),
        None => status.push_event(event_types::USER_MESSAGE, content, at),
    };
    Ok(Delivered {
        event_id,
        running,
        replayed: false,
    })
}

/// Whether the Session was running when event `event_id` was appended.
fn was_running_at(status: &SessionStatus, event_id: u64) -> bool {
    let first = status.first_event_id();
    let running_event = status
        .events
        .iter()
        .position(|e| e.type_ == event_types::STATUS_RUNNING)
        .map(|i| first + i as u64);
    match running_event {
        Some(id) => id < event_id,
        // Not kept: either it was dropped (it came before everything kept) or the
        // Session never ran.
        None => status.phase() != SessionPhase::Pending && status.start_time.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at() -> Time {
        Time(Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn pending_buffers_running_delivers_finished_refuses() {
        let mut status = SessionStatus::default();
        let first = deliver(&mut status, "one", None, at()).expect("buffered");
        assert!(!first.running && !first.replayed);
        assert_eq!(status.events[0].type_, "user.message");
        assert!(status.mark_running(at()));
        let second = deliver(&mut status, "two", None, at()).expect("delivered");
        assert!(second.running);
        assert_eq!(second.event_id, first.event_id + 2);
        assert!(status.finish(SessionPhase::Complete, None, None, at()));
        assert_eq!(
            deliver(&mut status, "three", None, at()),
            Err(NotDelivered::Finished)
        );
    }

    #[test]
    fn the_same_key_is_one_input_with_the_first_answer() {
        let key = event_key("uid-1", "run-7");
        assert!(hookrun_crds::session::valid_event_key(&key), "{key}");
        assert_ne!(key, event_key("uid-2", "run-7"));
        let mut status = SessionStatus::default();
        let buffered = deliver(&mut status, "hi", Some(&key), at()).expect("buffered");
        assert!(status.mark_running(at()));
        let replay = deliver(&mut status, "hi", Some(&key), at()).expect("replayed");
        assert_eq!(replay.event_id, buffered.event_id);
        assert!(
            replay.replayed && !replay.running,
            "answered as the first time: buffered"
        );
        let users = status
            .events
            .iter()
            .filter(|e| e.type_ == "user.message")
            .count();
        assert_eq!(users, 1);
        let other = event_key("uid-1", "run-8");
        let delivered = deliver(&mut status, "hi", Some(&other), at()).expect("delivered");
        assert!(delivered.running);
        // Replays are answered even after the Session finished.
        assert!(status.finish(SessionPhase::Complete, None, None, at()));
        let late = deliver(&mut status, "hi", Some(&other), at()).expect("replayed");
        assert!(late.replayed && late.running);
    }
}
