//! Which Sessions of an Agent may start their pod under `spec.session.maxConcurrent`,
//! counted across the cluster by the one elected operator: Sessions whose pod lives, or
//! whose pod this process is creating, take a slot; the others wait `Queued` and start
//! oldest first. Pure: no client, no clock of its own.
//!
//! Each decision is taken under one lock together with the record of the starts it
//! allows ([`Starting`]), so two Sessions of one Agent reconciled at once never both take
//! the last slot, even before the pod cache shows either pod.

use std::{
    cmp::Ordering,
    collections::HashMap,
    time::{Duration, Instant},
};

/// How long a start is remembered when its pod never shows up in the pod cache (the
/// create failed without the reconcile giving the slot back, or the pod went before the
/// watch saw it). A backstop only: the pod's watch event normally ends it.
pub const STARTING_FOR_AT_MOST: Duration = Duration::from_secs(300);

/// The pod the cache holds under a Session's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSeen {
    /// No pod of that name in the cache.
    None,
    /// A pod that has not ended (pending, running, or being deleted but not gone).
    Live,
    /// A pod in phase `Succeeded` or `Failed`.
    Ended,
}

impl PodSeen {
    /// What a pod in `phase` (as in `status.phase`) counts as.
    pub fn of_phase(phase: Option<&str>) -> Self {
        match phase {
            Some("Succeeded" | "Failed") => PodSeen::Ended,
            _ => PodSeen::Live,
        }
    }
}

/// What the caches show of one Session of the Agent.
#[derive(Clone, Copy, Debug)]
pub struct SessionSeen<'a> {
    pub name: &'a str,
    /// `metadata.creationTimestamp` in milliseconds (the queue order, then the name).
    pub created_ms: i64,
    /// Its status says `Complete` or `Error`.
    pub finished: bool,
    /// It has a deletion timestamp.
    pub deleting: bool,
    /// Its status names a pod.
    pub names_pod: bool,
    pub pod: PodSeen,
}

/// Where one Session stands with respect to the Agent's slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seat {
    /// It takes a slot: its pod lives, or is being created.
    Occupies,
    /// It waits for a slot.
    Waits,
    /// It takes none and wants none.
    Free,
}

/// Where `session` stands; `starting` when this process is creating its pod.
pub fn seat(session: &SessionSeen<'_>, starting: bool) -> Seat {
    match session.pod {
        PodSeen::Live => Seat::Occupies,
        PodSeen::Ended => Seat::Free,
        PodSeen::None if starting => Seat::Occupies,
        PodSeen::None if session.finished || session.deleting => Seat::Free,
        // The status names a pod the cache does not show yet: count it until the cache
        // or the status says otherwise.
        PodSeen::None if session.names_pod => Seat::Occupies,
        PodSeen::None => Seat::Waits,
    }
}

/// The answer for one Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Create its pod now (the slot is recorded in [`Starting`]).
    Start,
    /// Wait: `running` Sessions take slots of `max`, `ahead` older ones wait too.
    Queue {
        running: usize,
        max: u32,
        ahead: usize,
    },
}

impl Admission {
    /// `status.message` of a Session that waits.
    pub fn message(&self) -> Option<String> {
        match self {
            Admission::Start => None,
            Admission::Queue {
                running,
                max,
                ahead,
            } => Some(format!(
                "queued: the Agent runs {running} Sessions and allows {max} at once \
                 (spec.session.maxConcurrent){}; it starts when a slot frees, oldest first",
                match ahead {
                    0 => String::new(),
                    1 => ", and 1 older Session waits".to_owned(),
                    n => format!(", and {n} older Sessions wait"),
                }
            )),
        }
    }
}

/// The pods this process is creating and has not yet seen in its pod cache, by Agent
/// (`namespace/agent`) and Session name, with when each start was allowed.
#[derive(Debug, Default)]
pub struct Starting {
    by_agent: HashMap<String, HashMap<String, Instant>>,
}

impl Starting {
    /// Gives the slot of `session` back (its pod was not created).
    pub fn release(&mut self, agent: &str, session: &str) {
        if let Some(starts) = self.by_agent.get_mut(agent) {
            starts.remove(session);
            if starts.is_empty() {
                self.by_agent.remove(agent);
            }
        }
    }

    /// How many starts of `agent` are remembered.
    pub fn len(&self, agent: &str) -> usize {
        self.by_agent.get(agent).map_or(0, HashMap::len)
    }

    /// Decides whether `me` (one of `sessions`, the cached Sessions of Agent `agent`)
    /// may create its pod under `max` (`None`: no limit) and, when it may, records the
    /// start. Starts whose pod the cache now shows, whose Session is gone or finished, or
    /// that are older than [`STARTING_FOR_AT_MOST`] are forgotten first.
    pub fn admit(
        &mut self,
        agent: &str,
        me: &str,
        sessions: &[SessionSeen<'_>],
        max: Option<u32>,
        now: Instant,
    ) -> Admission {
        let Some(max) = max else {
            return Admission::Start;
        };
        let starts = self.by_agent.entry(agent.to_owned()).or_default();
        starts.retain(|name, since| {
            now.saturating_duration_since(*since) < STARTING_FOR_AT_MOST
                && sessions
                    .iter()
                    .any(|s| s.name == name && s.pod == PodSeen::None && !s.finished && !s.deleting)
        });
        if starts.contains_key(me) {
            return Admission::Start;
        }
        let mut running = 0;
        let mut waiting: Vec<&SessionSeen<'_>> = Vec::new();
        for session in sessions {
            match seat(session, starts.contains_key(session.name)) {
                Seat::Occupies => running += 1,
                Seat::Waits => waiting.push(session),
                Seat::Free => {}
            }
        }
        let Some(mine) = sessions.iter().find(|s| s.name == me) else {
            // Not in the cache: it cannot be ordered; let the watch bring it first.
            return Admission::Queue {
                running,
                max,
                ahead: waiting.len(),
            };
        };
        let ahead = waiting
            .iter()
            .filter(|other| queue_order(other, mine) == Ordering::Less)
            .count();
        if running + ahead < usize::try_from(max).unwrap_or(usize::MAX) {
            starts.insert(me.to_owned(), now);
            Admission::Start
        } else {
            if starts.is_empty() {
                self.by_agent.remove(agent);
            }
            Admission::Queue {
                running,
                max,
                ahead,
            }
        }
    }
}

/// Oldest first; the name breaks ties (creation times have whole seconds).
fn queue_order(a: &SessionSeen<'_>, b: &SessionSeen<'_>) -> Ordering {
    a.created_ms
        .cmp(&b.created_ms)
        .then_with(|| a.name.cmp(b.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(name: &str, created_ms: i64) -> SessionSeen<'_> {
        SessionSeen {
            name,
            created_ms,
            finished: false,
            deleting: false,
            names_pod: false,
            pod: PodSeen::None,
        }
    }

    fn running(name: &str, created_ms: i64) -> SessionSeen<'_> {
        SessionSeen {
            names_pod: true,
            pod: PodSeen::Live,
            ..waiting(name, created_ms)
        }
    }

    const AGENT: &str = "team/a";

    #[test]
    fn without_a_limit_every_session_starts() {
        let sessions = [running("r1", 1), running("r2", 2), waiting("w", 3)];
        let mut starting = Starting::default();
        let now = Instant::now();
        assert_eq!(
            starting.admit(AGENT, "w", &sessions, None, now),
            Admission::Start
        );
        assert_eq!(starting.len(AGENT), 0);
    }

    #[test]
    fn a_full_agent_queues_and_says_which_limit_and_how_many_run() {
        let sessions = [running("r1", 1), running("r2", 2), waiting("w", 3)];
        let mut starting = Starting::default();
        let admission = starting.admit(AGENT, "w", &sessions, Some(2), Instant::now());
        assert_eq!(
            admission,
            Admission::Queue {
                running: 2,
                max: 2,
                ahead: 0
            }
        );
        let message = admission.message().expect("a message");
        assert!(
            message.contains("runs 2 Sessions and allows 2 at once"),
            "{message}"
        );
        assert!(message.contains("spec.session.maxConcurrent"), "{message}");
        assert_eq!(starting.len(AGENT), 0);
    }

    #[test]
    fn two_sessions_reconciled_at_once_never_both_take_the_last_slot() {
        // Neither pod is in the cache yet: the first start is counted from the record.
        let sessions = [running("r1", 1), waiting("w1", 2), waiting("w2", 3)];
        let mut starting = Starting::default();
        let now = Instant::now();
        assert_eq!(
            starting.admit(AGENT, "w1", &sessions, Some(2), now),
            Admission::Start
        );
        assert_eq!(
            starting.admit(AGENT, "w2", &sessions, Some(2), now),
            Admission::Queue {
                running: 2,
                max: 2,
                ahead: 0
            }
        );
        // The same order the other way round: the younger one waits for the older.
        let mut starting = Starting::default();
        assert_eq!(
            starting.admit(AGENT, "w2", &sessions, Some(2), now),
            Admission::Queue {
                running: 1,
                max: 2,
                ahead: 1
            }
        );
        assert_eq!(
            starting.admit(AGENT, "w1", &sessions, Some(2), now),
            Admission::Start
        );
        assert_eq!(
            starting.admit(AGENT, "w2", &sessions, Some(2), now),
            Admission::Queue {
                running: 2,
                max: 2,
                ahead: 0
            }
        );
    }

    #[test]
    fn freed_slots_go_to_the_oldest_waiting_sessions_first() {
        let sessions = [
            SessionSeen {
                finished: true,
                pod: PodSeen::Ended,
                ..running("done", 1)
            },
            waiting("young", 30),
            waiting("old", 10),
            waiting("middle", 20),
        ];
        let mut starting = Starting::default();
        let now = Instant::now();
        let admit =
            |starting: &mut Starting, me| starting.admit(AGENT, me, &sessions, Some(2), now);
        assert!(matches!(
            admit(&mut starting, "young"),
            Admission::Queue { ahead: 2, .. }
        ));
        assert_eq!(
            admit(&mut starting, "middle"),
            Admission::Start,
            "one older waits, one slot is left"
        );
        assert_eq!(admit(&mut starting, "old"), Admission::Start);
        assert!(matches!(
            admit(&mut starting, "young"),
            Admission::Queue {
                running: 2,
                ahead: 0,
                ..
            }
        ));
    }

    #[test]
    fn equal_creation_times_are_ordered_by_name() {
        let sessions = [waiting("b", 5), waiting("a", 5)];
        let mut starting = Starting::default();
        let now = Instant::now();
        assert!(matches!(
            starting.admit(AGENT, "b", &sessions, Some(1), now),
            Admission::Queue { ahead: 1, .. }
        ));
        assert_eq!(
            starting.admit(AGENT, "a", &sessions, Some(1), now),
            Admission::Start
        );
    }

    #[test]
    fn a_start_ends_when_the_cache_shows_its_pod_or_its_session_goes() {
        let now = Instant::now();
        let mut starting = Starting::default();
        let before = [waiting("w1", 1), waiting("w2", 2)];
        assert_eq!(
            starting.admit(AGENT, "w1", &before, Some(1), now),
            Admission::Start
        );
        assert_eq!(
            starting.admit(AGENT, "w1", &before, Some(1), now),
            Admission::Start,
            "a second look at a started Session keeps its slot"
        );
        // The pod shows up and then ends: the slot is free for w2.
        let shown = [running("w1", 1), waiting("w2", 2)];
        assert!(matches!(
            starting.admit(AGENT, "w2", &shown, Some(1), now),
            Admission::Queue { running: 1, .. }
        ));
        assert_eq!(
            starting.len(AGENT),
            0,
            "the cache took over from the record"
        );
        let ended = [
            SessionSeen {
                finished: true,
                pod: PodSeen::Ended,
                ..running("w1", 1)
            },
            waiting("w2", 2),
        ];
        assert_eq!(
            starting.admit(AGENT, "w2", &ended, Some(1), now),
            Admission::Start
        );
        // A start whose Session was deleted before its pod appeared is forgotten.
        let mut starting = Starting::default();
        assert_eq!(
            starting.admit(AGENT, "w1", &before, Some(1), now),
            Admission::Start
        );
        let gone = [waiting("w2", 2)];
        assert_eq!(
            starting.admit(AGENT, "w2", &gone, Some(1), now),
            Admission::Start
        );
    }

    #[test]
    fn a_released_or_forgotten_start_gives_its_slot_back() {
        let sessions = [waiting("w1", 1), waiting("w2", 2)];
        let now = Instant::now();
        let mut starting = Starting::default();
        assert_eq!(
            starting.admit(AGENT, "w1", &sessions, Some(1), now),
            Admission::Start
        );
        starting.release(AGENT, "w1");
        assert_eq!(starting.len(AGENT), 0);
        // w1 is older and still waits, so w2 stays behind it.
        assert!(matches!(
            starting.admit(AGENT, "w2", &sessions, Some(1), now),
            Admission::Queue {
                running: 0,
                ahead: 1,
                ..
            }
        ));
        assert_eq!(
            starting.admit(AGENT, "w1", &sessions, Some(1), now),
            Admission::Start
        );
        let later = now + STARTING_FOR_AT_MOST;
        let only_w2 = [
            SessionSeen {
                names_pod: false,
                ..waiting("w1", 1)
            },
            waiting("w2", 2),
        ];
        assert!(matches!(
            starting.admit(AGENT, "w2", &only_w2, Some(1), later),
            Admission::Queue {
                running: 0,
                ahead: 1,
                ..
            }
        ));
    }

    #[test]
    fn seats_follow_the_pod_first_then_the_status() {
        let base = waiting("s", 1);
        assert_eq!(seat(&base, false), Seat::Waits);
        assert_eq!(seat(&base, true), Seat::Occupies);
        let names_pod = SessionSeen {
            names_pod: true,
            ..base
        };
        assert_eq!(seat(&names_pod, false), Seat::Occupies);
        let finished_with_live_pod = SessionSeen {
            finished: true,
            pod: PodSeen::Live,
            ..base
        };
        assert_eq!(
            seat(&finished_with_live_pod, false),
            Seat::Occupies,
            "a pod that still runs holds its slot after its Session ended"
        );
        let finished = SessionSeen {
            finished: true,
            names_pod: true,
            ..base
        };
        assert_eq!(seat(&finished, false), Seat::Free);
        let deleting = SessionSeen {
            deleting: true,
            ..base
        };
        assert_eq!(seat(&deleting, false), Seat::Free);
        assert_eq!(PodSeen::of_phase(Some("Failed")), PodSeen::Ended);
        assert_eq!(PodSeen::of_phase(Some("Running")), PodSeen::Live);
        assert_eq!(PodSeen::of_phase(None), PodSeen::Live);
    }
}
