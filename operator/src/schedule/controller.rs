//! The scheduler: on the elected operator only, looks at every Agent with schedule
//! triggers at least once a second (and at each slot), starts the Session a due slot
//! asks for, and writes each trigger's status.
//!
//! A slot's Session has a name derived from (Agent, trigger, slot), so whichever
//! operator creates it first wins and every other attempt (a restart that had not yet
//! written status, a former leader still finishing its tick) fails with AlreadyExists:
//! one Session per slot. Status says where a trigger is; a restarted operator counts
//! missed slots from it and runs at most one of them.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Future;
use hookrun_crds::agent::{ConcurrencyPolicy, ScheduleStatus, ScheduleTrigger};
use hookrun_crds::session::SessionTrigger;
use hookrun_crds::{Agent, Session, SessionSpec, names};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::reflector::Store,
};
use serde_json::json;

use super::{Schedule, SkipReason, decided_through, format_time, record_skip};
use crate::{
    error::{Error, Result},
    metrics::Metrics,
};

/// The controller's name in metrics.
pub const CONTROLLER: &str = "schedule";
/// The longest the scheduler sleeps: new and changed Agents are seen within it.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// What the scheduler shares across ticks.
pub struct Scheduler {
    client: Client,
    agents: Vec<Store<Agent>>,
    metrics: Metrics,
    /// The statuses this process wrote last, per Agent uid: the cache may not show them
    /// yet, and a tick that read the older one would count a slot twice in status.
    written: HashMap<String, Vec<ScheduleStatus>>,
}

impl Scheduler {
    pub fn new(client: Client, agents: Vec<Store<Agent>>, metrics: Metrics) -> Self {
        Self {
            client,
            agents,
            metrics,
            written: HashMap::new(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        for store in &self.agents {
            if store.wait_until_ready().await.is_err() {
                return;
            }
        }
        tracing::info!("scheduler started");
        tokio::pin!(shutdown);
        loop {
            let now = Utc::now();
            let mut wake = now + chrono::Duration::from_std(MAX_SLEEP).unwrap_or_default();
            let agents: Vec<_> = self
                .agents
                .iter()
                .flat_map(Store::state)
                // Agents whose last schedule trigger went still get their status cleared.
                .filter(|a| {
                    a.spec.schedules().next().is_some()
                        || a.status.as_ref().is_some_and(|s| {
                            !s.schedules.is_empty() || s.next_schedule_time.is_some()
                        })
                })
                .collect();
            let mut seen = Vec::with_capacity(agents.len());
            for agent in agents {
                let uid = agent.uid().unwrap_or_default();
                seen.push(uid.clone());
                match self.tick(&agent, &uid, now).await {
                    Ok(Some(next)) => wake = wake.min(next),
                    Ok(None) => {}
                    Err(error) => {
                        self.metrics
                            .reconcile_failed(CONTROLLER, error.metric_label());
                        tracing::warn!(agent = %agent.name_any(), namespace = ?agent.namespace(), %error, "schedule tick failed");
                    }
                }
            }
            self.written.retain(|uid, _| seen.contains(uid));
            let sleep = (wake - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                () = &mut shutdown => return,
            }
        }
    }

    /// One look at one Agent; returns its earliest next slot.
    async fn tick(
        &mut self,
        agent: &Agent,
        uid: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        if agent.meta().deletion_timestamp.is_some() {
            return Ok(None);
        }
        let namespace = agent
            .namespace()
            .ok_or(Error::MissingObjectKey("namespace"))?;
        let previous: Vec<ScheduleStatus> = match self.written.get(uid) {
            Some(written) => written.clone(),
            None => agent
                .status
                .as_ref()
                .map(|s| s.schedules.clone())
                .unwrap_or_default(),
        };
        // An Agent whose schedules do not all read is reported by the Agent controller
        // (InvalidSchedule) and runs none of them.
        let mut parsed = Vec::new();
        for (index, trigger) in agent.spec.schedules() {
            match Schedule::parse(trigger, &format!("spec.triggers[{index}].schedule")) {
                Ok(schedule) => parsed.push((trigger, schedule)),
                Err(_) => return Ok(None),
            }
        }
        let mut statuses = Vec::with_capacity(parsed.len());
        for (trigger, schedule) in parsed {
            let mut status = previous
                .iter()
                .find(|s| s.name == trigger.name)
                .cloned()
                .unwrap_or_else(|| ScheduleStatus {
                    name: trigger.name.clone(),
                    ..ScheduleStatus::default()
                });
            self.tick_trigger(agent, &namespace, trigger, &schedule, &mut status, now)
                .await?;
            statuses.push(status);
        }
        let next = statuses
            .iter()
            .filter_map(|s| s.next_schedule_time.as_deref())
            .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .min();
        if statuses != previous
            || agent
                .status
                .as_ref()
                .and_then(|s| s.next_schedule_time.clone())
                != next.map(format_time)
        {
            let api: Api<Agent> = Api::namespaced(self.client.clone(), &namespace);
            api.patch_status(
                &agent.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "schedules": statuses,
                    "nextScheduleTime": next.map(format_time),
                }})),
            )
            .await?;
            self.metrics.wrote(CONTROLLER, "status_patch");
            self.written.insert(uid.to_owned(), statuses);
        }
        Ok(next)
    }

    async fn tick_trigger(
        &self,
        agent: &Agent,
        namespace: &str,
        trigger: &ScheduleTrigger,
        schedule: &Schedule,
        status: &mut ScheduleStatus,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let recorded_next = status
            .next_schedule_time
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        // Slots count from the last decided one; a trigger that never decided one counts
        // from the next slot it published (so a restart before its first run still runs
        // it), and a trigger seen for the first time from now.
        let base = decided_through(status).unwrap_or_else(|| {
            recorded_next
                .map(|next| (next - chrono::Duration::milliseconds(1)).min(now))
                .unwrap_or(now)
        });
        let plan = schedule.plan(base, now, trigger.starting_deadline_seconds);
        for gap in &plan.gaps {
            record_skip(
                status,
                SkipReason::NonexistentLocalTime,
                schedule.describe_gap(*gap),
                1,
            );
        }
        if trigger.suspend {
            // Slots passed while suspended are decided: skipped, never caught up.
            let count = plan.skipped.iter().map(|(_, _, n)| n).sum::<usize>()
                + usize::from(plan.run.is_some());
            if let Some(through) = plan.decided_through {
                record_skip(status, SkipReason::Suspended, format_time(through), count);
            }
            status.next_schedule_time = None;
            return Ok(());
        }
        for (reason, time, count) in &plan.skipped {
            record_skip(status, *reason, format_time(*time), *count);
        }
        status.next_schedule_time = plan
            .next
            .or_else(|| schedule.next_after(now).map(|n| n.slot))
            .map(format_time);
        let Some(slot) = plan.run else {
            return Ok(());
        };
        let sessions: Api<Session> = Api::namespaced(self.client.clone(), namespace);
        let policy = trigger.concurrency_policy.unwrap_or_default();
        if policy != ConcurrencyPolicy::Allow {
            let running = self.running_sessions(&sessions, agent, trigger).await?;
            if !running.is_empty() {
                if policy == ConcurrencyPolicy::Forbid {
                    tracing::info!(agent = %agent.name_any(), %namespace, trigger = %trigger.name, slot = %format_time(slot), running = ?running, "slot skipped: a Session of the trigger still runs (Forbid)");
                    record_skip(status, SkipReason::Forbid, format_time(slot), 1);
                    return Ok(());
                }
                for name in &running {
                    match sessions.delete(name, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(error) => return Err(error.into()),
                    }
                    self.metrics.wrote(CONTROLLER, "session_delete");
                    tracing::info!(agent = %agent.name_any(), %namespace, trigger = %trigger.name, session = %name, "ended the running Session to replace it (Replace)");
                }
            }
        }
        let session = scheduled_session(agent, trigger, slot)?;
        let name = session.name_any();
        match sessions.create(&PostParams::default(), &session).await {
            Ok(_) => {
                self.metrics.wrote(CONTROLLER, "session_create");
                tracing::info!(agent = %agent.name_any(), %namespace, trigger = %trigger.name, slot = %format_time(slot), session = %name, "started a scheduled Session");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::info!(agent = %agent.name_any(), %namespace, trigger = %trigger.name, slot = %format_time(slot), session = %name, "the slot's Session already exists");
            }
            Err(error) => return Err(error.into()),
        }
        status.last_schedule_time = Some(format_time(slot));
        status.last_session_name = Some(name);
        Ok(())
    }

    /// The unfinished Sessions of a trigger, read live (a cache could miss the one
    /// started a moment ago).
    async fn running_sessions(
        &self,
        sessions: &Api<Session>,
        agent: &Agent,
        trigger: &ScheduleTrigger,
    ) -> Result<Vec<String>> {
        let selector = format!(
            "{}={},{}={}",
            names::AGENT_LABEL,
            names::label_value(&agent.name_any()),
            names::SCHEDULE_LABEL,
            trigger.name
        );
        let list = sessions
            .list_metadata(&ListParams::default().labels(&selector))
            .await;
        let list = match list {
            Ok(list) => list,
            Err(error) => return Err(error.into()),
        };
        let mut running = Vec::new();
        for item in list {
            let name = item.name_any();
            if item.metadata.deletion_timestamp.is_some() {
                continue;
            }
            // Metadata carries no phase: read the phase of each candidate.
            if let Some(session) = sessions.get_opt(&name).await? {
                let finished = session
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p.is_finished());
                if !finished {
                    running.push(name);
                }
            }
        }
        Ok(running)
    }
}

/// The Session a trigger starts for a slot: named from (Agent, trigger, slot), owned by
/// the Agent, labelled like a webhook's Session plus the trigger, its source
/// `schedule/<name>` and its delivery id the slot time.
pub fn scheduled_session(
    agent: &Agent,
    trigger: &ScheduleTrigger,
    slot: DateTime<Utc>,
) -> Result<Session> {
    let agent_name = agent.name_any();
    let owner = agent
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("uid"))?;
    let name = names::scheduled_session_name(&agent_name, &trigger.name, slot.timestamp());
    let slot_text = format_time(slot);
    let title = trigger.title.clone().unwrap_or_else(|| {
        format!(
            "Scheduled run of agent {agent_name} (trigger {}) for {slot_text}",
            trigger.name
        )
    });
    Ok(Session {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: agent.namespace(),
            labels: Some(
                [
                    (
                        names::AGENT_LABEL.to_owned(),
                        names::label_value(&agent_name),
                    ),
                    (
                        names::MANAGED_BY_LABEL.to_owned(),
                        names::MANAGED_BY.to_owned(),
                    ),
                    (names::SCHEDULE_LABEL.to_owned(), trigger.name.clone()),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec: SessionSpec {
            agent: agent_name,
            title,
            env: trigger.env.clone(),
            trigger: Some(SessionTrigger {
                source: format!("schedule/{}", trigger.name),
                delivery_id: Some(slot_text),
                idempotency_key: None,
                payload_digest: None,
                payload: None,
                payload_truncated: false,
                callback_url: None,
            }),
            session_key: None,
            history: Vec::new(),
        },
        status: None,
    })
}
