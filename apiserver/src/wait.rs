//! Wait mode: an accepted webhook whose caller asked to wait (`"wait": true`, a
//! number of seconds, or `Prefer: wait=<n>`) is held until its Session is `Complete` or
//! `Error`, then answered with the agent's response; when the budget runs out the answer
//! is 202 with a `pollUrl`, and the Session runs on.
//!
//! A held request costs one [`Subscription`] to the [`SessionHub`](crate::hub::SessionHub)
//! (fed by the index's Session watch: no polling, no API read while waiting) and its
//! connection. A client that disconnects makes hyper drop the handler's future, which
//! drops the subscription, so the hub forgets the Session at once.
//!
//! When the server drains, the hub is flushed and every held request answers as if its
//! budget ran out (202 with a `pollUrl`): the Session runs on, and any replica answers
//! the poll.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hookrun_crds::session::SessionStatus;
use hookrun_crds::{Session, SessionPhase};
use serde_json::json;

use crate::hub::{Seen, Subscription};
use crate::metrics::Metrics;

/// How a held request ended.
#[derive(Debug)]
pub(crate) enum Held {
    /// The Session finished with this status.
    Finished(Box<SessionStatus>),
    /// The budget ran out; the Session was last seen in this phase.
    TimedOut(SessionPhase),
    /// The Session was deleted before it finished.
    Deleted,
    /// The turn the caller waited for is done (a live Session goes on after it).
    Turn { reply: String, phase: SessionPhase },
}

/// What the answer names: the Session, its Agent and namespace.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Waited<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) session: &'a str,
    pub(crate) agent: &'a str,
    /// `delivered` or `buffered` for an input into a live Session: the answer says it.
    pub(crate) delivery: Option<&'static str>,
}

/// A request to hold: the subscription taken *before* `current` was read (the create's
/// answer, or one read for a replay; `None` when the Session is gone), so no change falls
/// in between.
#[derive(Debug)]
pub(crate) struct HeldRequest {
    pub(crate) subscription: Subscription,
    pub(crate) current: Option<Session>,
    pub(crate) budget: Duration,
}

/// A request being held: only what waiting needs, not the Session and its payload (a
/// held request's memory is mostly this and its connection).
#[derive(Debug)]
pub(crate) struct Waiting {
    subscription: Subscription,
    /// Changes of another Session of the same name (deleted and created again) are not
    /// ours.
    uid: Option<String>,
    last: SessionPhase,
    budget: Duration,
    /// The input whose turn's reply ends the wait (0: the initial title); `None` waits
    /// for the Session to finish.
    turn: Option<u64>,
}

/// Decides at once when the Session is gone or finished; otherwise what to wait with.
#[cfg(test)]
pub(crate) fn begin(request: HeldRequest) -> Result<Waiting, Held> {
    begin_turn(request, None)
}

/// [`begin`], ending the wait as soon as the reply of the turn that answers input `turn`
/// is in the Session's log (a live Session's turn, not its end).
pub(crate) fn begin_turn(request: HeldRequest, turn: Option<u64>) -> Result<Waiting, Held> {
    let HeldRequest {
        subscription,
        current,
        budget,
    } = request;
    let Some(current) = current else {
        return Err(Held::Deleted);
    };
    let last = phase(&current);
    if let Some(held) = turn_done(&current, turn) {
        return Err(held);
    }
    if last.is_finished() {
        return Err(Held::Finished(Box::new(current.status.unwrap_or_default())));
    }
    Ok(Waiting {
        subscription,
        uid: current.metadata.uid,
        last,
        budget,
        turn,
    })
}

/// The reply of the turn answering input `turn`, once the Session's log has it.
fn turn_done(session: &Session, turn: Option<u64>) -> Option<Held> {
    let status = session.status.as_ref()?;
    let reply = status.turn_reply(turn?)?;
    // A turn that answered ran: the stored phase can still say Pending when the runner's
    // reply is written before the operator has recorded the pod as running.
    let phase = match status.phase() {
        SessionPhase::Pending => SessionPhase::Running,
        phase => phase,
    };
    Some(Held::Turn {
        reply: reply.to_owned(),
        phase,
    })
}

/// Holds until the Session finishes, is deleted, or the budget passes.
#[cfg(test)]
pub(crate) async fn hold(request: HeldRequest, metrics: &Metrics) -> Held {
    match begin(request) {
        Ok(waiting) => wait_for_end(waiting, metrics).await,
        Err(held) => held,
    }
}

/// Waits on the hub; counted in `hookrun_apiserver_waiting_requests` meanwhile.
pub(crate) async fn wait_for_end(waiting: Waiting, metrics: &Metrics) -> Held {
    let Waiting {
        mut subscription,
        uid,
        mut last,
        budget,
        turn,
    } = waiting;
    let _waiting = metrics.waiting();
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let flushed = subscription.flushed();
        let changed = tokio::select! {
            // The server drains: answer now, as if the budget ran out.
            biased;
            () = flushed => return Held::TimedOut(last),
            changed = tokio::time::timeout_at(deadline, subscription.changed()) => changed,
        };
        match changed {
            Err(_elapsed) => return Held::TimedOut(last),
            // The hub is gone only when the server is going down: answer as a timeout.
            Ok(None) => {
                tokio::time::sleep_until(deadline).await;
                return Held::TimedOut(last);
            }
            Ok(Some(Seen::Nothing)) => {}
            Ok(Some(Seen::Deleted)) => return Held::Deleted,
            Ok(Some(Seen::Session(session))) => {
                if uid.is_some() && session.metadata.uid.is_some() && session.metadata.uid != uid {
                    continue;
                }
                last = phase(&session);
                if let Some(held) = turn_done(&session, turn) {
                    return held;
                }
                if last.is_finished() {
                    return Held::Finished(Box::new(session.status.clone().unwrap_or_default()));
                }
            }
        }
    }
}

fn phase(session: &Session) -> SessionPhase {
    session
        .status
        .as_ref()
        .map(|s| s.phase())
        .unwrap_or_default()
}

/// Where a caller whose wait ran out reads the agent's messages (the read API).
pub(crate) fn poll_url(namespace: &str, session: &str) -> String {
    format!("/agents/{session}/events?event_type=agent.message&namespace={namespace}")
}

/// The answer to a held request, with its outcome for the access log. 200
/// `{session, agentDefinition, response, phase[, message]}` once the Session finished
/// (or `phase: "Error"` with a message when it was deleted); 202 with `pollUrl`,
/// `timedOut: true` and a `Location` header when the budget ran out.
pub(crate) fn answer(waited: Waited<'_>, held: Held) -> (Response, &'static str) {
    let Waited {
        namespace,
        session,
        agent,
        delivery,
    } = waited;
    let mut location = None;
    let (status, mut body, outcome) = match held {
        Held::Turn { reply, phase } => {
            let body = json!({
                "session": session,
                "agentDefinition": agent,
                "response": reply,
                "phase": phase.as_str(),
            });
            (StatusCode::OK, body, "waited_turn")
        }
        Held::Finished(status) => {
            let mut body = json!({
                "session": session,
                "agentDefinition": agent,
                "response": status.response,
                "phase": status.phase().as_str(),
            });
            if let Some(message) = status.message {
                body["message"] = message.into();
            }
            (StatusCode::OK, body, "waited")
        }
        Held::Deleted => {
            let body = json!({
                "session": session,
                "agentDefinition": agent,
                "response": null,
                "phase": SessionPhase::Error.as_str(),
                "message": "the Session was deleted before it finished",
            });
            (StatusCode::OK, body, "wait_session_deleted")
        }
        Held::TimedOut(phase) => {
            let poll = poll_url(namespace, session);
            location = HeaderValue::from_str(&poll).ok();
            let body = json!({
                "session": session,
                "agentDefinition": agent,
                "response": null,
                "phase": phase.as_str(),
                "pollUrl": poll,
                "timedOut": true,
            });
            (StatusCode::ACCEPTED, body, "wait_timed_out")
        }
    };
    if let Some(delivery) = delivery {
        body[delivery] = true.into();
    }
    let mut response = (status, Json(body)).into_response();
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    (response, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::SessionHub;
    use crate::index::test_support::session;

    fn finished(phase: SessionPhase, response: Option<&str>) -> Session {
        let mut s = session("team", "s", "a", Some(phase));
        if let Some(status) = s.status.as_mut() {
            status.response = response.map(str::to_owned);
        }
        s
    }

    #[tokio::test]
    async fn a_finished_session_answers_at_once() {
        let hub = SessionHub::new();
        let metrics = Metrics::default();
        let request = HeldRequest {
            subscription: hub.subscribe("team", "s"),
            current: Some(finished(SessionPhase::Complete, Some("hi"))),
            budget: Duration::from_secs(60),
        };
        let held = hold(request, &metrics).await;
        assert!(matches!(held, Held::Finished(_)), "{held:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_runs_out_with_the_last_phase_seen() {
        let hub = SessionHub::new();
        let metrics = Metrics::default();
        let subscription = hub.subscribe("team", "s");
        let publisher = hub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            publisher.publish(&session("team", "s", "a", Some(SessionPhase::Running)));
        });
        let request = HeldRequest {
            subscription,
            current: Some(session("team", "s", "a", None)),
            budget: Duration::from_secs(5),
        };
        let held = hold(request, &metrics).await;
        assert!(
            matches!(held, Held::TimedOut(SessionPhase::Running)),
            "{held:?}"
        );
        assert_eq!(metrics.waiting.get(), 0);
    }

    #[tokio::test]
    async fn a_flush_answers_a_held_request_as_timed_out_at_once() {
        let hub = SessionHub::new();
        let metrics = Metrics::default();
        let request = |name: &str| HeldRequest {
            subscription: hub.subscribe("team", name),
            current: Some(session("team", name, "a", Some(SessionPhase::Running))),
            budget: Duration::from_secs(3600),
        };
        let (held_before, held_after) = (request("before"), request("after"));
        let publisher = hub.clone();
        let flushing = tokio::spawn(async move {
            tokio::task::yield_now().await;
            publisher.flush();
        });
        let held = tokio::time::timeout(Duration::from_secs(5), hold(held_before, &metrics))
            .await
            .expect("the flush ends the wait");
        assert!(
            matches!(held, Held::TimedOut(SessionPhase::Running)),
            "{held:?}"
        );
        flushing.await.expect("the flush");
        // A request that begins waiting after the flush answers at once too.
        let held = tokio::time::timeout(Duration::from_secs(5), hold(held_after, &metrics))
            .await
            .expect("no wait after the flush");
        assert!(matches!(held, Held::TimedOut(_)), "{held:?}");
        assert_eq!(metrics.waiting.get(), 0);
    }

    #[test]
    fn a_turn_that_answered_is_running_even_when_the_stored_phase_lags() {
        use hookrun_crds::session::{event_types, turn_key};
        let at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        );
        for (stored, answered) in [
            (SessionPhase::Pending, SessionPhase::Running),
            (SessionPhase::Running, SessionPhase::Running),
            (SessionPhase::Complete, SessionPhase::Complete),
        ] {
            let mut s = session("team", "s", "a", Some(stored));
            let status = s.status.as_mut().expect("a status");
            status.push_event_once(event_types::TURN_COMPLETE, "hi", &turn_key(1), at.clone());
            match turn_done(&s, Some(1)) {
                Some(Held::Turn { reply, phase }) => {
                    assert_eq!(reply, "hi");
                    assert_eq!(phase, answered, "stored {stored:?}");
                }
                other => panic!("expected the turn, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_turn_wait_ends_with_its_own_turns_reply_not_anothers() {
        use hookrun_crds::session::{event_types, turn_key};
        let hub = SessionHub::new();
        let metrics = Metrics::default();
        let at = || {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            )
        };
        let mut running = session("team", "s", "a", Some(SessionPhase::Running));
        let waiting = begin_turn(
            HeldRequest {
                subscription: hub.subscribe("team", "s"),
                current: Some(running.clone()),
                budget: Duration::from_secs(30),
            },
            Some(5),
        )
        .expect("nothing to answer yet");
        let status = running.status.as_mut().expect("a status");
        status.push_event_once(event_types::TURN_COMPLETE, "earlier", &turn_key(0), at());
        hub.publish(&running);
        let status = running.status.as_mut().expect("a status");
        status.push_event_once(event_types::TURN_COMPLETE, "mine", &turn_key(5), at());
        let publisher = hub.clone();
        let later = running.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            publisher.publish(&later);
        });
        let held = tokio::time::timeout(Duration::from_secs(5), wait_for_end(waiting, &metrics))
            .await
            .expect("answered by the turn");
        match held {
            Held::Turn { reply, phase } => {
                assert_eq!(reply, "mine");
                assert_eq!(phase, SessionPhase::Running);
            }
            other => panic!("expected the turn, got {other:?}"),
        }
        // A reply already in the log answers at once.
        let held = begin_turn(
            HeldRequest {
                subscription: hub.subscribe("team", "s"),
                current: Some(running),
                budget: Duration::from_secs(30),
            },
            Some(0),
        )
        .expect_err("answered at once");
        assert!(matches!(held, Held::Turn { ref reply, .. } if reply == "earlier"));
        let waited = Waited {
            namespace: "team",
            session: "s",
            agent: "a",
            delivery: Some("delivered"),
        };
        let (response, outcome) = answer(waited, held);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(outcome, "waited_turn");
    }

    #[test]
    fn answers() {
        let waited = Waited {
            namespace: "team",
            session: "a-wh-1",
            agent: "a",
            delivery: None,
        };
        let (response, outcome) = answer(waited, Held::TimedOut(SessionPhase::Pending));
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        assert_eq!(outcome, "wait_timed_out");
        assert_eq!(
            response.headers()[header::LOCATION],
            "/agents/a-wh-1/events?event_type=agent.message&namespace=team"
        );
        let (response, _) = answer(waited, Held::Deleted);
        assert_eq!(response.status(), StatusCode::OK);
    }
}
