//! Cluster tests of schedule triggers: the real `hookrun-operator` starts one Session per
//! slot of an every-2-seconds cron, runs one catch-up after an outage, never a slot
//! twice under leader election, honours Forbid and suspend, and reports a bad cron.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookrun_crds::{Agent, Session, SessionPhase, names};
use hookrun_tests::{
    apply_agent,
    door::{Operator, elected_pair, lease_holder},
    eventually,
    fixtures::{agent_namespace, ready_condition},
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

const BUDGET: Duration = Duration::from_secs(20);
const TRIGGER: &str = "tick";
const EVERY_TWO_SECONDS: &str = "*/2 * * * * *";

fn scheduled_agent(schedule: Value) -> Value {
    let mut schedule = schedule;
    schedule["name"] = json!(TRIGGER);
    json!({"spec": {
        "models": ["anthropic/claude-sonnet-4-6"],
        "triggers": [{"schedule": schedule}],
    }})
}

/// The scheduled Sessions of `agent`, as (slot, Session), oldest slot first.
async fn scheduled(sessions: &Api<Session>, agent: &str) -> Vec<(DateTime<Utc>, Session)> {
    let selector = format!("{}={TRIGGER}", names::SCHEDULE_LABEL);
    let mut out: Vec<_> = sessions
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list Sessions")
        .items
        .into_iter()
        .filter(|s| s.spec.agent == agent)
        .map(|s| {
            let trigger = s.spec.trigger.clone().expect("trigger metadata");
            assert_eq!(trigger.source, format!("schedule/{TRIGGER}"));
            let slot = trigger
                .delivery_id
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .expect("the slot time")
                .with_timezone(&Utc);
            (slot, s)
        })
        .collect();
    out.sort_by_key(|(slot, _)| *slot);
    out
}

/// Every Session has its slot's own name, and no slot has two Sessions.
fn assert_one_per_slot(runs: &[(DateTime<Utc>, Session)], agent: &str) {
    let slots: BTreeSet<_> = runs.iter().map(|(slot, _)| *slot).collect();
    assert_eq!(slots.len(), runs.len(), "a slot ran twice: {runs:?}");
    for (slot, session) in runs {
        assert_eq!(
            session.name_any(),
            names::scheduled_session_name(agent, TRIGGER, slot.timestamp())
        );
        assert_eq!(slot.timestamp() % 2, 0, "not a slot of */2: {slot}");
    }
}

fn schedule_status(agent: &Agent) -> Option<&hookrun_crds::agent::ScheduleStatus> {
    agent
        .status
        .as_ref()?
        .schedules
        .iter()
        .find(|s| s.name == TRIGGER)
}

fn skipped(agent: &Agent, reason: &str) -> i64 {
    schedule_status(agent)
        .map(|s| {
            s.skipped
                .iter()
                .filter(|r| r.reason == reason)
                .map(|r| r.count)
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn every_two_seconds_one_session_per_slot() {
    let (cluster, ns, _client, agents, sessions) = agent_namespace().await;
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    apply_agent(
        &agents,
        "clock",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        (!scheduled(&sessions, "clock").await.is_empty()).then_some(())
    })
    .await
    .expect("the first slot runs");
    // Ten seconds of a two-second clock: the duration is what is tested.
    tokio::time::sleep(Duration::from_secs(10)).await;
    operator.process.terminate(BUDGET).await;

    let runs = scheduled(&sessions, "clock").await;
    assert_one_per_slot(&runs, "clock");
    assert!(runs.len() >= 5, "{} Sessions in 10 s", runs.len());
    for pair in runs.windows(2) {
        assert_eq!(
            (pair[1].0 - pair[0].0).num_seconds(),
            2,
            "a slot was left out between {} and {}",
            pair[0].0,
            pair[1].0
        );
    }
    let agent = agents.get("clock").await.expect("the Agent");
    let status = schedule_status(&agent).expect("the trigger's status");
    let (last_slot, last) = runs.last().expect("runs");
    assert_eq!(
        status.last_schedule_time.as_deref(),
        Some(
            last_slot
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                .as_str()
        )
    );
    assert_eq!(
        status.last_session_name.as_deref(),
        Some(last.name_any().as_str())
    );
    assert!(status.next_schedule_time.is_some());
    assert!(
        agent
            .status
            .as_ref()
            .and_then(|s| s.next_schedule_time.as_ref())
            .is_some()
    );
    // `kubectl get agents -o wide` shows the next run.
    let wide = ns.kubectl(&["get", "agents", "-o", "wide"], None);
    let text = String::from_utf8_lossy(&wide.stdout);
    assert!(text.contains("NEXT RUN"), "{text}");
    assert!(
        text.contains(status.next_schedule_time.as_deref().unwrap_or("?")),
        "{text}"
    );
    // Scheduled Sessions look like webhook Sessions: same labels, owned by the Agent.
    let labels = last.labels();
    assert_eq!(
        labels.get(names::AGENT_LABEL).map(String::as_str),
        Some("clock")
    );
    assert_eq!(
        last.owner_references().first().map(|o| o.uid.as_str()),
        agent.uid().as_deref()
    );
}

#[tokio::test]
async fn operator_down_six_seconds_runs_one_catch_up_not_three() {
    let (cluster, ns, _client, agents, sessions) = agent_namespace().await;
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    apply_agent(
        &agents,
        "outage",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        (scheduled(&sessions, "outage").await.len() >= 2).then_some(())
    })
    .await
    .expect("slots run before the outage");
    // Wait for the status of the latest run, so the kill does not race its write.
    eventually(BUDGET, || async {
        let last = scheduled(&sessions, "outage").await.last()?.1.name_any();
        let agent = agents.get("outage").await.ok()?;
        (schedule_status(&agent)?.last_session_name.as_deref() == Some(&last)).then_some(())
    })
    .await
    .expect("the status shows the latest run");
    operator.process.signal("KILL");
    operator.process.wait_exit(BUDGET).await.expect("killed");
    let before = scheduled(&sessions, "outage").await;
    let last_before = before.last().expect("runs").0;
    // The outage is what is tested: three slots pass with no operator.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restarted_at = Utc::now();
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    // The catch-up, then a slot on time after the restart.
    eventually(BUDGET, || async {
        scheduled(&sessions, "outage")
            .await
            .iter()
            .any(|(slot, _)| *slot > restarted_at + chrono::Duration::seconds(2))
            .then_some(())
    })
    .await
    .expect("slots run again after the restart");
    operator.process.terminate(BUDGET).await;

    let runs = scheduled(&sessions, "outage").await;
    assert_one_per_slot(&runs, "outage");
    let during: Vec<_> = runs
        .iter()
        .filter(|(slot, _)| *slot > last_before && *slot <= restarted_at)
        .map(|(slot, _)| *slot)
        .collect();
    assert_eq!(
        during.len(),
        1,
        "one catch-up run for the outage: {during:?}"
    );
    let agent = agents.get("outage").await.expect("the Agent");
    assert!(
        skipped(&agent, "Missed") >= 2,
        "the other missed slots are recorded: {:?}",
        schedule_status(&agent)
    );
}

#[tokio::test]
async fn two_elected_operators_never_run_a_slot_twice() {
    let (cluster, ns, client, agents, sessions) = agent_namespace().await;
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let (mut leader, mut standby) = elected_pair(
        cluster,
        ns.name(),
        "4s",
        "https://leader.example.test/",
        "https://standby.example.test/",
    )
    .await;
    apply_agent(
        &agents,
        "pair",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        (scheduled(&sessions, "pair").await.len() >= 2).then_some(())
    })
    .await
    .expect("the leader runs slots");
    // Freeze the leader: the standby takes over; then wake the old one, which must not
    // start any slot again.
    leader.process.signal("STOP");
    let standby_pid = format!("-{}", standby.pid());
    eventually(BUDGET, || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&standby_pid))
    })
    .await
    .expect("the standby takes over");
    let took_over = Utc::now();
    eventually(BUDGET, || async {
        scheduled(&sessions, "pair")
            .await
            .iter()
            .any(|(slot, _)| *slot > took_over + chrono::Duration::seconds(2))
            .then_some(())
    })
    .await
    .expect("the new leader runs slots");
    leader.process.signal("CONT");
    leader.process.wait_exit(BUDGET).await;
    // Both ran for at least 10 s together; give the woken one time to do harm.
    tokio::time::sleep(Duration::from_secs(2)).await;
    standby.process.terminate(BUDGET).await;

    let runs = scheduled(&sessions, "pair").await;
    assert_one_per_slot(&runs, "pair");
    assert!(runs.len() >= 4, "{runs:?}");
    assert!(
        standby.log_text().contains("started a scheduled Session"),
        "the new leader started Sessions"
    );
}

#[tokio::test]
async fn forbid_skips_slots_while_a_session_runs() {
    let (cluster, ns, client, agents, sessions) = agent_namespace().await;
    let pods: Api<Pod> = Api::namespaced(client, ns.name());
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    apply_agent(
        &agents,
        "solo",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS, "concurrencyPolicy": "Forbid"})),
    )
    .await;
    let first = eventually(BUDGET, || async {
        scheduled(&sessions, "solo")
            .await
            .first()
            .map(|(_, s)| s.name_any())
    })
    .await
    .expect("the first slot runs");
    // No kubelet runs its pod: the Session stays unfinished, and slots are skipped.
    eventually(BUDGET, || async {
        let agent = agents.get("solo").await.ok()?;
        (skipped(&agent, "Forbid") >= 2).then_some(())
    })
    .await
    .expect("slots are skipped while the Session runs");
    assert_eq!(scheduled(&sessions, "solo").await.len(), 1);

    // Play the kubelet: the pod runs and ends; the Session completes.
    let pod = eventually(BUDGET, || async {
        pods.get_opt(&first).await.ok().flatten()
    })
    .await
    .expect("the Session's pod");
    for phase in ["Running", "Succeeded"] {
        pods.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": phase}})),
        )
        .await
        .expect("the pod status is written");
    }
    eventually(BUDGET, || async {
        let s = sessions.get(&first).await.ok()?;
        s.status?.phase?.is_finished().then_some(())
    })
    .await
    .expect("the Session finishes");
    eventually(BUDGET, || async {
        (scheduled(&sessions, "solo").await.len() >= 2).then_some(())
    })
    .await
    .expect("the next slot runs once the Session finished");
    operator.process.terminate(BUDGET).await;
    let runs = scheduled(&sessions, "solo").await;
    assert_one_per_slot(&runs, "solo");
    let unfinished = runs
        .iter()
        .filter(|(_, s)| {
            !s.status
                .as_ref()
                .and_then(|st| st.phase)
                .is_some_and(SessionPhase::is_finished)
        })
        .count();
    assert!(unfinished <= 1, "Forbid let two Sessions run: {runs:?}");
}

#[tokio::test]
async fn suspend_stops_runs_without_catching_up() {
    let (cluster, ns, _client, agents, sessions) = agent_namespace().await;
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    apply_agent(
        &agents,
        "pause",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        (!scheduled(&sessions, "pause").await.is_empty()).then_some(())
    })
    .await
    .expect("slots run");
    apply_agent(
        &agents,
        "pause",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS, "suspend": true})),
    )
    .await;
    eventually(BUDGET, || async {
        let agent = agents.get("pause").await.ok()?;
        (skipped(&agent, "Suspended") >= 1).then_some(())
    })
    .await
    .expect("suspended slots are recorded");
    let suspended_at = Utc::now();
    let count = scheduled(&sessions, "pause").await.len();
    let started = Instant::now();
    // Three slots pass suspended.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(scheduled(&sessions, "pause").await.len(), count);
    let agent = agents.get("pause").await.expect("the Agent");
    assert!(
        skipped(&agent, "Suspended") >= 3,
        "{:?}",
        schedule_status(&agent)
    );
    assert_eq!(
        schedule_status(&agent).and_then(|s| s.next_schedule_time.clone()),
        None
    );
    assert!(started.elapsed() >= Duration::from_secs(6));

    let resumed_at = Utc::now();
    apply_agent(
        &agents,
        "pause",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        (scheduled(&sessions, "pause").await.len() > count).then_some(())
    })
    .await
    .expect("slots run again after resuming");
    operator.process.terminate(BUDGET).await;
    let runs = scheduled(&sessions, "pause").await;
    assert_one_per_slot(&runs, "pause");
    assert!(
        runs.iter()
            .all(|(slot, _)| *slot <= suspended_at
                || *slot >= resumed_at - chrono::Duration::seconds(1)),
        "a slot of the suspended time was caught up: {runs:?}"
    );
}

#[tokio::test]
async fn an_invalid_cron_or_zone_is_reported_on_the_agent() {
    let (cluster, ns, _client, agents, sessions) = agent_namespace().await;
    let _operator = Operator::start(cluster, ns.name(), &[]).await;
    for (name, schedule, field) in [
        (
            "bad-cron",
            json!({"cron": "61 * * * *"}),
            "spec.triggers[0].schedule.cron",
        ),
        (
            "bad-zone",
            json!({"cron": "@daily", "timeZone": "Mars/Olympus_Mons"}),
            "spec.triggers[0].schedule.timeZone",
        ),
    ] {
        apply_agent(&agents, name, scheduled_agent(schedule)).await;
        let condition = eventually(BUDGET, || async {
            let agent = agents.get(name).await.ok()?;
            ready_condition(&agent).cloned()
        })
        .await
        .expect("the Agent gets a Ready condition");
        assert_eq!(condition.status, "False");
        assert_eq!(condition.reason, "InvalidSchedule");
        assert!(condition.message.contains(field), "{}", condition.message);
    }
    // Fixed, it becomes ready and runs.
    apply_agent(
        &agents,
        "bad-cron",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS})),
    )
    .await;
    eventually(BUDGET, || async {
        let agent = agents.get("bad-cron").await.ok()?;
        (ready_condition(&agent)?.status == "True").then_some(())
    })
    .await
    .expect("the fixed Agent is ready");
    eventually(BUDGET, || async {
        (!scheduled(&sessions, "bad-cron").await.is_empty()).then_some(())
    })
    .await
    .expect("the fixed schedule runs");
    assert!(scheduled(&sessions, "bad-zone").await.is_empty());
    // Without schedule triggers, the schedule status goes.
    apply_agent(
        &agents,
        "bad-cron",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    eventually(BUDGET, || async {
        let status = agents.get("bad-cron").await.ok()?.status?;
        (status.schedules.is_empty() && status.next_schedule_time.is_none()).then_some(())
    })
    .await
    .expect("the schedule status is cleared");
}

#[tokio::test]
async fn replace_ends_the_running_session_before_the_next() {
    let (cluster, ns, _client, agents, sessions) = agent_namespace().await;
    let mut operator = Operator::start(cluster, ns.name(), &[]).await;
    apply_agent(
        &agents,
        "fresh",
        scheduled_agent(json!({"cron": EVERY_TWO_SECONDS, "concurrencyPolicy": "Replace"})),
    )
    .await;
    let first = eventually(BUDGET, || async {
        scheduled(&sessions, "fresh")
            .await
            .first()
            .map(|(slot, s)| (*slot, s.name_any()))
    })
    .await
    .expect("the first slot runs");
    // No kubelet runs its pod: it stays unfinished, so the next slot replaces it.
    eventually(BUDGET, || async {
        let runs = scheduled(&sessions, "fresh").await;
        let gone = runs.iter().all(|(_, s)| s.name_any() != first.1);
        (gone && runs.iter().any(|(slot, _)| *slot > first.0)).then_some(())
    })
    .await
    .expect("the running Session is deleted and a later slot runs");
    operator.process.terminate(BUDGET).await;
    let runs: Vec<_> = scheduled(&sessions, "fresh")
        .await
        .into_iter()
        .filter(|(_, s)| s.metadata.deletion_timestamp.is_none())
        .collect();
    assert_eq!(
        runs.len(),
        1,
        "only the latest slot's Session is left: {runs:?}"
    );
    assert_one_per_slot(&runs, "fresh");
}
