use std::time::Duration;

use hookrun_crds::callback::{DeliveryState, MAX_DELIVERY_RECORDS, events, webhook_id};
use hookrun_crds::session::event_types;
use hookrun_crds::{AgentSpec, SessionPhase, SessionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::*;

const UID: &str = "0b7c-uid";

fn agent(spec: serde_json::Value) -> AgentSpec {
    serde_json::from_value(spec).expect("an Agent spec")
}

fn at(second: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + second).expect("a time")
}

fn completed(second: i64) -> SessionStatus {
    let mut status = SessionStatus::default();
    status.mark_running(Time(at(second - 5)));
    status.push_event(event_types::AGENT_MESSAGE, "42", Time(at(second - 1)));
    status.finish(SessionPhase::Complete, Some("42"), None, Time(at(second)));
    status
}

fn one_callback() -> AgentSpec {
    agent(json!({"callbacks": [{
        "url": "https://r.example/hook?token=s3cret",
        "secretRef": {"name": "cb", "key": "key"},
    }]}))
}

fn schedule() -> RetrySchedule {
    RetrySchedule {
        delays: vec![Duration::from_secs(1), Duration::from_secs(2)],
    }
}

#[test]
fn a_completed_session_owes_one_delivery_with_a_stable_id() {
    let spec = one_callback();
    let targets = targets(&spec, None);
    let status = completed(0);
    let (owed, next) = due(UID, &targets, &status, at(1), Duration::from_secs(3600));
    assert_eq!(next, None);
    assert_eq!(owed.len(), 1);
    let item = &owed[0];
    assert_eq!(item.occurrence.event, events::SESSION_COMPLETED);
    assert_eq!(
        item.record.id,
        webhook_id(
            UID,
            "https://r.example/hook?token=s3cret",
            events::SESSION_COMPLETED,
            None
        )
    );
    // The record shows the URL without its query.
    assert_eq!(item.record.url, "https://r.example/hook");
    assert_eq!(item.record.attempts, 0);
    let body = item.body("a-wh-1", "team", "a");
    assert_eq!(body["type"], "session.completed");
    assert_eq!(body["response"], "42");
    assert_eq!(body["phase"], "Complete");
    assert_eq!(body["agentDefinition"], "a");
    // A running Session owes nothing to a callback of the defaults.
    let mut running = SessionStatus::default();
    running.mark_running(Time(at(0)));
    running.push_event(event_types::AGENT_MESSAGE, "hi", Time(at(0)));
    assert!(
        due(UID, &targets, &running, at(1), Duration::MAX)
            .0
            .is_empty()
    );
}

#[test]
fn failures_retry_on_the_schedule_with_the_same_id_then_deliver() {
    let spec = one_callback();
    let targets = targets(&spec, None);
    let mut status = completed(0);
    let horizon = schedule().horizon();
    let first = due(UID, &targets, &status, at(1), horizon)
        .0
        .remove(0)
        .record;
    let id = first.id.clone();

    let after_503 = after_attempt(
        first,
        &Outcome::Answered {
            status: 503,
            retry_after: None,
        },
        at(1),
        &schedule(),
        0.5,
    );
    assert_eq!(after_503.state, DeliveryState::Pending);
    assert_eq!(after_503.attempts, 1);
    assert_eq!(after_503.last_status_code, Some(503));
    // 1 s plus 10% (half of the 20% band), rounded up to the second status keeps.
    let next = after_503
        .next_attempt_time
        .clone()
        .expect("a next attempt")
        .0;
    assert_eq!(next, at(3));
    assert!(upsert(&mut status, &after_503));
    // Not due before its time; due after it, with the same record.
    let (none, when) = due(UID, &targets, &status, at(1), horizon);
    assert!(none.is_empty());
    assert_eq!(when, Some(next));
    assert!(due(UID, &targets, &status, at(2), horizon).0.is_empty());
    let again = due(UID, &targets, &status, at(3), horizon)
        .0
        .remove(0)
        .record;
    assert_eq!((again.id.as_str(), again.attempts), (id.as_str(), 1));

    let dropped = after_attempt(
        again,
        &Outcome::Unanswered("the connection dropped before an answer".into()),
        at(3),
        &schedule(),
        0.0,
    );
    assert_eq!(
        (dropped.state, dropped.attempts),
        (DeliveryState::Pending, 2)
    );
    assert_eq!(dropped.last_status_code, None);
    assert_eq!(
        dropped.next_attempt_time.clone().expect("next").0,
        at(5),
        "the second delay, no jitter"
    );
    assert!(upsert(&mut status, &dropped));
    let third = due(UID, &targets, &status, at(5), horizon)
        .0
        .remove(0)
        .record;
    let delivered = after_attempt(
        third,
        &Outcome::Answered {
            status: 204,
            retry_after: None,
        },
        at(5),
        &schedule(),
        0.0,
    );
    assert_eq!(delivered.state, DeliveryState::Delivered);
    assert_eq!(delivered.attempts, 3);
    assert_eq!(delivered.delivered_time, Some(Time(at(5))));
    assert!(upsert(&mut status, &delivered));
    assert!(due(UID, &targets, &status, at(100), horizon).0.is_empty());
    // A late copy of an earlier state does not undo the delivery.
    assert!(!upsert(&mut status, &dropped));
    assert_eq!(status.callbacks.len(), 1);
}

#[test]
fn answers_that_stop_and_the_end_of_the_schedule() {
    let record = CallbackDelivery {
        id: "msg_1".into(),
        attempts: 0,
        ..CallbackDelivery::default()
    };
    let run = |outcome: Outcome| after_attempt(record.clone(), &outcome, at(0), &schedule(), 0.0);
    let answered = |status| Outcome::Answered {
        status,
        retry_after: None,
    };
    assert_eq!(run(answered(410)).state, DeliveryState::Failed);
    assert_eq!(run(answered(404)).state, DeliveryState::Failed);
    assert_eq!(run(answered(400)).state, DeliveryState::Failed);
    for retried in [408, 429, 500, 502, 503] {
        assert_eq!(
            run(answered(retried)).state,
            DeliveryState::Pending,
            "{retried}"
        );
    }
    let redirect = run(answered(302));
    assert_eq!(redirect.state, DeliveryState::Refused);
    assert!(
        redirect
            .message
            .as_deref()
            .is_some_and(|m| m.contains("redirect"))
    );
    let refused = run(Outcome::Refused(
        "169.254.169.254 is a link-local address".into(),
    ));
    assert_eq!(
        (refused.state, refused.attempts),
        (DeliveryState::Refused, 0)
    );
    // Retry-After lengthens the wait, up to an hour.
    let later = run(Outcome::Answered {
        status: 429,
        retry_after: Some(Duration::from_secs(30)),
    });
    assert_eq!(later.next_attempt_time.expect("next").0, at(30));
    let capped = run(Outcome::Answered {
        status: 503,
        retry_after: Some(Duration::from_secs(86_400)),
    });
    assert_eq!(capped.next_attempt_time.expect("next").0, at(3600));
    // Two delays: the third failed attempt gives up.
    let spent = CallbackDelivery {
        attempts: 2,
        ..record.clone()
    };
    let given_up = after_attempt(spent, &answered(503), at(0), &schedule(), 0.0);
    assert_eq!(
        (given_up.state, given_up.attempts),
        (DeliveryState::Failed, 3)
    );
    assert!(
        given_up
            .message
            .as_deref()
            .is_some_and(|m| m.contains("gave up after 3"))
    );
}

#[test]
fn turns_and_messages_are_delivered_each_to_their_subscribers() {
    let spec = agent(json!({"callbacks": [
        {"url": "https://turns.example/", "secretRef": {"name": "cb", "key": "k"},
         "events": ["session.turn_completed"]},
        {"url": "https://chatty.example/", "secretRef": {"name": "cb", "key": "k"},
         "events": ["agent.message", "session.failed"]},
    ]}));
    assert!(wants_running_events(&spec));
    assert!(!wants_running_events(&one_callback()));
    let targets = targets(&spec, None);
    let mut status = SessionStatus::default();
    status.mark_running(Time(at(0)));
    status.push_event(event_types::AGENT_MESSAGE, "thinking", Time(at(1)));
    status.push_event(event_types::TURN_COMPLETE, "first answer", Time(at(2)));
    status.push_event(event_types::TURN_COMPLETE, "second answer", Time(at(3)));
    let (owed, _) = due(UID, &targets, &status, at(4), Duration::from_secs(3600));
    let seen: Vec<(&str, &str, Option<u64>)> = owed
        .iter()
        .map(|d| {
            (
                d.target.url.as_str(),
                d.occurrence.event,
                d.occurrence.number,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("https://chatty.example/", events::AGENT_MESSAGE, Some(2)),
            (
                "https://turns.example/",
                events::SESSION_TURN_COMPLETED,
                Some(3)
            ),
            (
                "https://turns.example/",
                events::SESSION_TURN_COMPLETED,
                Some(4)
            ),
        ]
    );
    assert_ne!(owed[1].record.id, owed[2].record.id);
    assert_eq!(owed[2].body("s", "n", "a")["response"], "second answer");
}

#[test]
fn per_request_urls_use_the_policy_key_and_the_end_events() {
    let spec = agent(json!({
        "callbacks": [{"url": "https://a.example/", "secretRef": {"name": "a", "key": "k"}}],
        "callbackPolicy": {"allowedUrlPrefixes": ["https://ci.example/"],
                           "secretRef": {"name": "p", "key": "k"}},
    }));
    let all = targets(&spec, Some("https://ci.example/job/1"));
    assert_eq!(all.len(), 2);
    let own = &all[1];
    assert!(own.per_request);
    assert_eq!(own.secret.as_ref().map(|s| s.name.as_str()), Some("p"));
    assert_eq!(own.events, ["session.completed", "session.failed"]);
    // Without a policy key, the first callback's key signs it.
    let no_key = agent(json!({
        "callbacks": [{"url": "https://a.example/", "secretRef": {"name": "a", "key": "k"}}],
        "callbackPolicy": {"allowedUrlPrefixes": ["https://ci.example/"]},
    }));
    let fallback = targets(&no_key, Some("https://ci.example/x"));
    assert_eq!(
        fallback[1].secret.as_ref().map(|s| s.name.as_str()),
        Some("a")
    );
    assert_eq!(
        targets(&agent(json!({})), Some("https://ci.example/x"))[0].secret,
        None
    );
}

#[test]
fn old_events_and_full_records_start_nothing() {
    let spec = one_callback();
    let targets = targets(&spec, None);
    let status = completed(0);
    assert!(
        due(UID, &targets, &status, at(7200), Duration::from_secs(3600))
            .0
            .is_empty()
    );
    let mut full = completed(0);
    for i in 0..MAX_DELIVERY_RECORDS {
        assert!(upsert(
            &mut full,
            &CallbackDelivery {
                id: format!("msg_{i}"),
                ..Default::default()
            }
        ));
    }
    assert!(
        due(UID, &targets, &full, at(1), Duration::from_secs(3600))
            .0
            .is_empty()
    );
    assert!(!upsert(
        &mut full,
        &CallbackDelivery {
            id: "msg_more".into(),
            ..Default::default()
        }
    ));
}

#[test]
fn a_pending_delivery_holds_the_ttl_deletion_for_a_bounded_time() {
    let mut status = completed(0);
    let hold = Duration::from_secs(600);
    assert!(!ttl_held(&status, at(10), at(11), hold));
    status.callbacks.push(CallbackDelivery {
        id: "msg_1".into(),
        ..Default::default()
    });
    assert!(ttl_held(&status, at(10), at(11), hold));
    assert!(!ttl_held(&status, at(10), at(611), hold));
    status.callbacks[0].state = DeliveryState::Delivered;
    assert!(!ttl_held(&status, at(10), at(11), hold));
}
