//! What to do for a Session, decided from what is observed: its status, its pod (or
//! none), the time and the operator's limits. Pure: no client, no clock of its own.
//!
//! The decision is a [`Decision`]; status changes are [`Transition`]s applied with
//! [`apply`] to a freshly read status, so that the crds helpers (`mark_running`,
//! `finish`) decide whether anything changes and each event is appended exactly once.

use std::time::Duration;

use hookrun_crds::{
    budget::cut_encoded,
    duration::FlagDuration,
    session::{MAX_MESSAGE_BYTES, SessionPhase, SessionStatus},
};
use k8s_openapi::{
    api::core::v1::{ContainerState, ContainerStateTerminated, ContainerStateWaiting, Pod},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};

use super::pod::CONTAINER;

/// The next step for a Session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It has no pod and never had one: create it.
    CreatePod,
    /// Change the status.
    Write(Transition),
    /// Nothing to do now; look again after this long (`None`: on the next change).
    Wait(Option<Duration>),
    /// It finished longer than its TTL ago: delete it (its pod goes with it).
    DeleteSession,
}

/// A change of a Session's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The Agent runs its most Sessions at once: phase `Queued`, `message` saying why.
    Queue { message: String },
    /// The pod was created: record its name and uid, phase `Pending`.
    PodCreated { name: String, uid: String },
    /// The pod runs.
    Running,
    /// The pod succeeded without the harness saying so: `Complete`, answered by the last
    /// `agent.message`.
    Complete,
    /// The session failed; `delete_pod` when its pod is stuck and must go.
    Fail {
        reason: FailReason,
        message: String,
        delete_pod: bool,
    },
}

/// Why the operator ended a Session in `Error`: the reason of its Kubernetes Event and
/// the label of its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    AgentNotFound,
    PodFailed,
    DeadlineExceeded,
    ImagePullFailed,
    InvalidImageName,
    Unschedulable,
    ContainerCreateFailed,
    PodDeleted,
    PodNotOwned,
    PodCreateRefused,
    PolicyViolation,
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::AgentNotFound => "AgentNotFound",
            FailReason::PodFailed => "PodFailed",
            FailReason::DeadlineExceeded => "DeadlineExceeded",
            FailReason::ImagePullFailed => "ImagePullFailed",
            FailReason::InvalidImageName => "InvalidImageName",
            FailReason::Unschedulable => "Unschedulable",
            FailReason::ContainerCreateFailed => "ContainerCreateFailed",
            FailReason::PodDeleted => "PodDeleted",
            FailReason::PodNotOwned => "PodNotOwned",
            FailReason::PodCreateRefused => "PodCreateRefused",
            FailReason::PolicyViolation => "PolicyViolation",
        }
    }
}

impl Transition {
    fn fail(reason: FailReason, message: String, delete_pod: bool) -> Self {
        Transition::Fail {
            reason,
            message,
            delete_pod,
        }
    }

    /// The phase this transition leads to.
    pub fn phase(&self) -> SessionPhase {
        match self {
            Transition::Queue { .. } => SessionPhase::Queued,
            Transition::PodCreated { .. } => SessionPhase::Pending,
            Transition::Running => SessionPhase::Running,
            Transition::Complete => SessionPhase::Complete,
            Transition::Fail { .. } => SessionPhase::Error,
        }
    }

    /// A low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Transition::Queue { .. } => "MaxConcurrent",
            Transition::PodCreated { .. } => "PodCreated",
            Transition::Running => "PodRunning",
            Transition::Complete => "PodSucceeded",
            Transition::Fail { reason, .. } => reason.as_str(),
        }
    }
}

/// The message of a Session whose Agent is gone.
pub fn agent_not_found(agent: &str) -> Transition {
    Transition::fail(
        FailReason::AgentNotFound,
        format!("agent {agent} not found"),
        false,
    )
}

/// The failure of a Session whose Agent is outside the operator's pod policy: no pod is
/// created; `message` names the fields and what the policy allows.
pub fn policy_violation(message: String) -> Transition {
    Transition::fail(FailReason::PolicyViolation, message, false)
}

/// When to try again to create a pod the cluster refused as forbidden, for a Session
/// `age` old with `left` until its pending timeout: after half its age (at least 250 ms,
/// at most 10 s), so that a refusal that passes in a moment costs a moment and one that
/// lasts costs few calls; never later than just past the pending timeout.
pub fn forbidden_retry(age: Duration, left: Duration) -> Duration {
    (age / 2)
        .clamp(Duration::from_millis(250), Duration::from_secs(10))
        .min(left + Duration::from_millis(100))
}

/// What to make of the API refusing to create the pod with `code` and `message`, for a
/// Session `age` old: `None` to retry (with backoff), or the failure that ends it. An
/// invalid pod (400, 422) never becomes valid; a forbidden one (a missing
/// ServiceAccount, an exhausted quota) may, so it is retried until the pending timeout.
pub fn pod_create_refused(
    code: u16,
    message: &str,
    age: Duration,
    pending_timeout: Duration,
) -> Option<Transition> {
    let message = message.trim();
    match code {
        400 | 422 => Some(Transition::fail(
            FailReason::PodCreateRefused,
            format!("the pod was refused by the cluster: {message}"),
            false,
        )),
        403 if age >= pending_timeout => Some(Transition::fail(
            FailReason::PodCreateRefused,
            format!(
                "the pod could not be created within {}: {message}",
                FlagDuration(pending_timeout)
            ),
            false,
        )),
        _ => None,
    }
}

/// What the operator sees of a Session.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The Session's uid (its pod must be controlled by it).
    pub session_uid: &'a str,
    pub status: Option<&'a SessionStatus>,
    /// The pod named like the Session, if there is one.
    pub pod: Option<&'a Pod>,
    pub now: Timestamp,
}

/// The operator's limits that the decision depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// How long a pod may stay Pending because it cannot be scheduled, its image cannot
    /// be pulled or its container cannot be created.
    pub pending_timeout: Duration,
    /// How long a finished Session is kept.
    pub ttl: Duration,
}

/// Decides the next step for a Session.
pub fn decide(observed: Observed<'_>, limits: Limits) -> Decision {
    let empty = SessionStatus::default();
    let status = observed.status.unwrap_or(&empty);
    if status.is_finished() {
        return ttl_decision(status, observed.now, limits.ttl);
    }
    let Some(pod) = observed.pod else {
        return if status.pod_name.is_some() {
            Decision::Write(pod_deleted())
        } else {
            Decision::CreatePod
        };
    };
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let pod_uid = pod.metadata.uid.clone().unwrap_or_default();
    let ours = controller_uid(pod) == Some(observed.session_uid)
        && status.pod_uid.as_deref().is_none_or(|uid| uid == pod_uid);
    if !ours {
        return if pod.metadata.deletion_timestamp.is_some() {
            // A pod of an earlier Session of this name, on its way out.
            Decision::Wait(None)
        } else if status.pod_name.is_some() {
            Decision::Write(pod_deleted())
        } else {
            Decision::Write(Transition::fail(
                FailReason::PodNotOwned,
                format!(
                    "a pod named {pod_name} already exists and does not belong to this Session; \
                     delete that pod, then create the Session again"
                ),
                false,
            ))
        };
    }
    if status.pod_name.is_none() || status.pod_uid.is_none() || status.phase.is_none() {
        return Decision::Write(Transition::PodCreated {
            name: pod_name,
            uid: pod_uid,
        });
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending");
    match phase {
        "Running" if status.phase() == SessionPhase::Pending => {
            Decision::Write(Transition::Running)
        }
        "Running" => Decision::Wait(None),
        "Succeeded" => Decision::Write(Transition::Complete),
        "Failed" => Decision::Write(pod_failed(pod)),
        _ if pod.metadata.deletion_timestamp.is_some() => Decision::Wait(None),
        _ => pending_decision(pod, observed.now, limits.pending_timeout),
    }
}

fn pod_deleted() -> Transition {
    Transition::fail(
        FailReason::PodDeleted,
        "the pod was deleted before the session finished".to_owned(),
        false,
    )
}

fn controller_uid(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

fn duration_ms(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A finished Session is deleted `ttl` after it finished.
fn ttl_decision(status: &SessionStatus, now: Timestamp, ttl: Duration) -> Decision {
    let Some(finished) = status.completion_time.as_ref() else {
        // Finished without a time is not something hookrun writes; keep it.
        return Decision::Wait(None);
    };
    let left = ttl_expiry(finished, ttl)
        .as_millisecond()
        .saturating_sub(now.as_millisecond());
    if left <= 0 {
        Decision::DeleteSession
    } else {
        Decision::Wait(Some(duration_ms(left)))
    }
}

/// When a Session stamped finished at `completion` has been kept `ttl`. The API keeps
/// times to the whole second and the stamp is the moment cut down to it, so the
/// Session may have finished up to a second after `completion`: counting from the end
/// of that second keeps every Session at least `ttl` (up to a second more), never less.
pub fn ttl_expiry(completion: &Time, ttl: Duration) -> Timestamp {
    SignedDuration::try_from(ttl.saturating_add(Duration::from_secs(1)))
        .ok()
        .and_then(|kept| completion.0.checked_add(kept).ok())
        .unwrap_or(Timestamp::MAX)
}

fn agent_container_state(pod: &Pod) -> Option<&ContainerState> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == CONTAINER)?
        .state
        .as_ref()
}

fn agent_container_waiting(pod: &Pod) -> Option<&ContainerStateWaiting> {
    agent_container_state(pod)?.waiting.as_ref()
}

fn agent_container_terminated(pod: &Pod) -> Option<&ContainerStateTerminated> {
    agent_container_state(pod)?.terminated.as_ref()
}

fn image(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == CONTAINER))
        .and_then(|c| c.image.as_deref())
        .unwrap_or("(none)")
}

/// `": <text>"`, or nothing when there is no text.
fn detail(text: Option<&str>) -> String {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => format!(": {t}"),
        None => String::new(),
    }
}

/// Why a Failed pod failed.
fn pod_failed(pod: &Pod) -> Transition {
    let status = pod.status.as_ref();
    let reason = status.and_then(|s| s.reason.as_deref());
    if reason == Some("DeadlineExceeded") {
        let seconds = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".to_owned());
        return Transition::fail(
            FailReason::DeadlineExceeded,
            format!(
                "the session ran past its timeout of {seconds} s (spec.session.timeoutSeconds)"
            ),
            false,
        );
    }
    let message = match agent_container_terminated(pod) {
        Some(terminated) => format!(
            "the agent container exited with code {}{}{}",
            terminated.exit_code,
            terminated
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            detail(terminated.message.as_deref()),
        ),
        None => format!(
            "the pod failed{}{}",
            reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            detail(status.and_then(|s| s.message.as_deref())),
        ),
    };
    Transition::fail(FailReason::PodFailed, message, false)
}

/// A Pending pod: fine, stuck for a while (wait until the timeout), or stuck for good.
fn pending_decision(pod: &Pod, now: Timestamp, timeout: Duration) -> Decision {
    let waiting = agent_container_waiting(pod);
    let waiting_reason = waiting.and_then(|w| w.reason.as_deref());
    let waiting_message = detail(waiting.and_then(|w| w.message.as_deref()));
    if waiting_reason == Some("InvalidImageName") {
        return Decision::Write(Transition::fail(
            FailReason::InvalidImageName,
            format!(
                "the image {:?} is not a valid image name{waiting_message}",
                image(pod)
            ),
            true,
        ));
    }
    let after = FlagDuration(timeout);
    let stuck = match waiting_reason {
        Some(r @ ("ErrImagePull" | "ImagePullBackOff")) => Some((
            FailReason::ImagePullFailed,
            format!(
                "the image {:?} could not be pulled within {after} ({r}{waiting_message})",
                image(pod)
            ),
        )),
        Some(r @ ("CreateContainerConfigError" | "CreateContainerError")) => Some((
            FailReason::ContainerCreateFailed,
            format!(
                "the agent container could not be created within {after} ({r}{waiting_message})"
            ),
        )),
        _ => unschedulable(pod).map(|message| {
            (
                FailReason::Unschedulable,
                format!(
                    "the pod could not be scheduled within {after}{}",
                    detail(message)
                ),
            )
        }),
    };
    let Some((reason, message)) = stuck else {
        return Decision::Wait(None);
    };
    let since = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or_else(|| now.as_millisecond(), |t| t.0.as_millisecond());
    let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    let left = since
        .saturating_add(timeout_ms)
        .saturating_sub(now.as_millisecond());
    if left <= 0 {
        Decision::Write(Transition::fail(reason, message, true))
    } else {
        Decision::Wait(Some(duration_ms(left)))
    }
}

/// The message of a `PodScheduled=False/Unschedulable` condition, if the pod has one.
fn unschedulable(pod: &Pod) -> Option<Option<&str>> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .filter(|c| c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| c.message.as_deref())
}

/// Applies a transition to a freshly read status; false when nothing changed (the
/// Session already moved on, or the write is already there).
pub fn apply(transition: &Transition, status: &mut SessionStatus, at: Time) -> bool {
    match transition {
        Transition::PodCreated { name, uid } => {
            if status.is_finished()
                || (status.pod_name.as_ref() == Some(name)
                    && status.pod_uid.as_ref() == Some(uid)
                    && status.phase.is_some())
            {
                return false;
            }
            status.pod_name = Some(name.clone());
            status.pod_uid = Some(uid.clone());
            if status.phase.is_none_or(|p| p == SessionPhase::Queued) {
                if status.phase.is_some() {
                    // The message said why it waited.
                    status.message = None;
                }
                status.phase = Some(SessionPhase::Pending);
            }
            true
        }
        Transition::Queue { message } => {
            // Written once: while it waits, the message is not rewritten as counts move.
            if status.is_finished()
                || status.pod_name.is_some()
                || status.phase == Some(SessionPhase::Queued)
            {
                return false;
            }
            status.phase = Some(SessionPhase::Queued);
            status.message = Some(cut_encoded(message, MAX_MESSAGE_BYTES).0.to_owned());
            true
        }
        Transition::Running => status.mark_running(at),
        Transition::Complete => {
            // A pod that succeeded has run, even if its Running phase was never seen.
            status.mark_running(at.clone());
            let response = status.last_agent_message().map(str::to_owned);
            status.finish(SessionPhase::Complete, response.as_deref(), None, at)
        }
        Transition::Fail { message, .. } => {
            status.finish(SessionPhase::Error, None, Some(message), at)
        }
    }
}
