//! Slots, DST, macros, seconds and catch-up decisions, as plain functions.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use hookrun_crds::agent::{AgentSpec, ScheduleStatus, ScheduleTrigger};

use super::*;

fn schedule(cron: &str, zone: Option<&str>) -> Schedule {
    let trigger = ScheduleTrigger {
        name: "t".to_owned(),
        cron: cron.to_owned(),
        time_zone: zone.map(str::to_owned),
        ..ScheduleTrigger::default()
    };
    Schedule::parse(&trigger, "spec.triggers[0].schedule").expect("valid")
}

fn local(zone: &str, y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    let tz: Tz = zone.parse().expect("zone");
    tz.with_ymd_and_hms(y, mo, d, h, mi, s)
        .earliest()
        .expect("exists")
        .with_timezone(&Utc)
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("a UTC time")
}

fn slots(schedule: &Schedule, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from;
    for _ in 0..n {
        at = schedule.next_after(at).expect("a next slot").slot;
        out.push(at);
    }
    out
}

#[test]
fn spring_gap_skips_the_missing_slot_once_new_york() {
    // 2026-03-08: New York jumps from 02:00 EST to 03:00 EDT; 02:30 does not exist.
    let s = schedule("30 2 * * *", Some("America/New_York"));
    let next = s
        .next_after(local("America/New_York", 2026, 3, 7, 3, 0, 0))
        .expect("present");
    assert_eq!(next.slot, local("America/New_York", 2026, 3, 9, 2, 30, 0));
    assert_eq!(
        next.gaps,
        vec![
            NaiveDate::from_ymd_opt(2026, 3, 8)
                .expect("present")
                .and_hms_opt(2, 30, 0)
                .expect("present")
        ]
    );
    assert_eq!(
        s.describe_gap(next.gaps[0]),
        "2026-03-08T02:30:00 America/New_York"
    );
}

#[test]
fn spring_gap_skips_the_missing_slots_berlin() {
    // 2026-03-29: Berlin jumps from 02:00 CET to 03:00 CEST.
    let s = schedule("*/30 * * * *", Some("Europe/Berlin"));
    let got = slots(&s, local("Europe/Berlin", 2026, 3, 29, 1, 0, 0), 3);
    assert_eq!(
        got,
        vec![
            local("Europe/Berlin", 2026, 3, 29, 1, 30, 0),
            local("Europe/Berlin", 2026, 3, 29, 3, 0, 0),
            local("Europe/Berlin", 2026, 3, 29, 3, 30, 0),
        ]
    );
    // 01:30 CET is 00:30Z and 03:00 CEST is 01:00Z: half an hour apart, no run between.
    assert_eq!(got[1] - got[0], chrono::Duration::minutes(30));
}

#[test]
fn autumn_repeated_hour_fires_once_new_york() {
    // 2026-11-01: New York goes back from 02:00 EDT to 01:00 EST; 01:30 happens twice.
    let s = schedule("30 1 * * *", Some("America/New_York"));
    let got = slots(&s, local("America/New_York", 2026, 10, 31, 12, 0, 0), 2);
    assert_eq!(got[0], utc(2026, 11, 1, 5, 30, 0), "the first 01:30 (EDT)");
    assert_eq!(got[1], local("America/New_York", 2026, 11, 2, 1, 30, 0));
    // Asked from between the two 01:30s, the second one is not a slot.
    let between = utc(2026, 11, 1, 6, 0, 0);
    assert_eq!(s.next_after(between).expect("present").slot, got[1]);
}

#[test]
fn autumn_repeated_hour_fires_once_berlin_every_quarter() {
    // 2026-10-25: Berlin goes back from 03:00 CEST to 02:00 CET; 02:00-02:59 twice.
    let s = schedule("*/15 * * * *", Some("Europe/Berlin"));
    let got = slots(&s, utc(2026, 10, 24, 23, 50, 0), 6);
    // 02:00, 02:15, 02:30, 02:45 CEST (00:00Z..00:45Z), then 03:00 CET (02:00Z): the
    // repeated 02:xx CET (01:00Z..01:45Z) does not run again.
    assert_eq!(
        got,
        vec![
            utc(2026, 10, 25, 0, 0, 0),
            utc(2026, 10, 25, 0, 15, 0),
            utc(2026, 10, 25, 0, 30, 0),
            utc(2026, 10, 25, 0, 45, 0),
            utc(2026, 10, 25, 2, 0, 0),
            utc(2026, 10, 25, 2, 15, 0),
        ]
    );
}

#[test]
fn macros_and_seconds() {
    let from = utc(2026, 1, 1, 10, 20, 30);
    assert_eq!(
        slots(&schedule("@hourly", None), from, 1),
        vec![utc(2026, 1, 1, 11, 0, 0)]
    );
    assert_eq!(
        slots(&schedule("@daily", None), from, 1),
        vec![utc(2026, 1, 2, 0, 0, 0)]
    );
    // 2026-01-04 is a Sunday.
    assert_eq!(
        slots(&schedule("@weekly", None), from, 1),
        vec![utc(2026, 1, 4, 0, 0, 0)]
    );
    assert_eq!(
        slots(&schedule("@monthly", None), from, 1),
        vec![utc(2026, 2, 1, 0, 0, 0)]
    );
    assert_eq!(
        slots(&schedule("@yearly", None), from, 1),
        vec![utc(2027, 1, 1, 0, 0, 0)]
    );
    assert_eq!(
        slots(&schedule("*/2 * * * * *", None), from, 3),
        vec![
            utc(2026, 1, 1, 10, 20, 32),
            utc(2026, 1, 1, 10, 20, 34),
            utc(2026, 1, 1, 10, 20, 36),
        ]
    );
    // Five fields: whole minutes.
    assert_eq!(
        slots(&schedule("*/5 * * * *", None), from, 1),
        vec![utc(2026, 1, 1, 10, 25, 0)]
    );
    // In a zone: 09:00 Tokyo is 00:00Z.
    assert_eq!(
        slots(&schedule("0 9 * * *", Some("Asia/Tokyo")), from, 1),
        vec![utc(2026, 1, 2, 0, 0, 0)]
    );
}

#[test]
fn bad_patterns_and_zones_name_the_field() {
    let mut spec: AgentSpec = serde_yaml::from_str(
        "triggers:\n- schedule: {name: a, cron: '61 * * * *'}\n- schedule: {name: b, cron: '@daily', timeZone: Mars/Olympus}\n- schedule: {name: c, cron: '* * * * * * 2030'}\n",
    )
    .expect("present");
    let message = check_schedules(&spec).expect_err("invalid");
    assert!(
        message.contains("spec.triggers[0].schedule.cron"),
        "{message}"
    );
    assert!(
        message.contains("spec.triggers[1].schedule.timeZone"),
        "{message}"
    );
    assert!(message.contains("\"Mars/Olympus\""), "{message}");
    assert!(
        message.contains("spec.triggers[2].schedule.cron"),
        "{message}"
    );
    spec.triggers[0].schedule.as_mut().expect("present").cron = "0 3 * * MON-FRI".to_owned();
    spec.triggers[1]
        .schedule
        .as_mut()
        .expect("present")
        .time_zone = Some("Europe/Paris".to_owned());
    spec.triggers[2].schedule.as_mut().expect("present").cron = "0 0 3 * * *".to_owned();
    assert_eq!(check_schedules(&spec), Ok(()));
    spec.triggers[2].schedule.as_mut().expect("present").name = "a".to_owned();
    let message = check_schedules(&spec).expect_err("invalid");
    assert!(
        message.contains("spec.triggers[2].schedule.name"),
        "{message}"
    );
}

#[test]
fn on_time_runs_the_slot() {
    let s = schedule("*/2 * * * * *", None);
    let plan = s.plan(utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 2), None);
    assert_eq!(plan.run, Some(utc(2026, 1, 1, 0, 0, 2)));
    assert!(plan.skipped.is_empty());
    assert_eq!(plan.decided_through, plan.run);
    assert_eq!(plan.next, Some(utc(2026, 1, 1, 0, 0, 4)));
    let idle = s.plan(utc(2026, 1, 1, 0, 0, 2), utc(2026, 1, 1, 0, 0, 3), None);
    assert_eq!(idle.run, None);
    assert_eq!(idle.decided_through, None);
}

#[test]
fn after_an_outage_one_catch_up_run_not_three() {
    let s = schedule("*/2 * * * * *", None);
    // Decided through :00; down until :07: slots :02, :04, :06 were missed.
    let plan = s.plan(utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 1, 0, 0, 7), None);
    assert_eq!(plan.run, Some(utc(2026, 1, 1, 0, 0, 6)));
    assert_eq!(
        plan.skipped,
        vec![(SkipReason::Missed, utc(2026, 1, 1, 0, 0, 4), 2)]
    );
    assert_eq!(plan.next, Some(utc(2026, 1, 1, 0, 0, 8)));
}

#[test]
fn past_the_deadline_the_catch_up_is_skipped() {
    let s = schedule("0 * * * *", None);
    let base = utc(2026, 1, 1, 0, 0, 0);
    let late = s.plan(base, utc(2026, 1, 1, 1, 10, 0), Some(300));
    assert_eq!(late.run, None);
    assert_eq!(
        late.skipped,
        vec![(SkipReason::MissedDeadline, utc(2026, 1, 1, 1, 0, 0), 1)]
    );
    assert_eq!(late.decided_through, Some(utc(2026, 1, 1, 1, 0, 0)));
    let in_time = s.plan(base, utc(2026, 1, 1, 1, 4, 0), Some(300));
    assert_eq!(in_time.run, Some(utc(2026, 1, 1, 1, 0, 0)));
}

#[test]
fn a_long_outage_is_summed_up_not_walked() {
    let s = schedule("* * * * * *", None);
    let now = utc(2026, 1, 2, 0, 0, 0);
    let plan = s.plan(utc(2026, 1, 1, 0, 0, 0), now, None);
    assert_eq!(plan.run, Some(now));
    assert_eq!(plan.skipped.len(), 1);
    assert_eq!(plan.skipped[0].0, SkipReason::Missed);
    assert_eq!(plan.next, Some(utc(2026, 1, 2, 0, 0, 1)));
}

#[test]
fn status_records_merge_and_stay_bounded() {
    let mut status = ScheduleStatus::default();
    record_skip(
        &mut status,
        SkipReason::Forbid,
        format_time(utc(2026, 1, 1, 0, 0, 2)),
        1,
    );
    record_skip(
        &mut status,
        SkipReason::Forbid,
        format_time(utc(2026, 1, 1, 0, 0, 4)),
        1,
    );
    assert_eq!(status.skipped.len(), 1);
    assert_eq!(status.skipped[0].count, 2);
    assert_eq!(status.skipped[0].time, "2026-01-01T00:00:04Z");
    for i in 0..30 {
        let reason = if i % 2 == 0 {
            SkipReason::Suspended
        } else {
            SkipReason::Forbid
        };
        record_skip(
            &mut status,
            reason,
            format_time(utc(2026, 1, 1, 0, 1, i)),
            1,
        );
    }
    assert_eq!(status.skipped.len(), MAX_SKIPPED_RECORDS);
    assert_eq!(decided_through(&status), Some(utc(2026, 1, 1, 0, 1, 29)));
    status.last_schedule_time = Some(format_time(utc(2026, 1, 1, 0, 2, 0)));
    assert_eq!(decided_through(&status), Some(utc(2026, 1, 1, 0, 2, 0)));
    // A DST gap record names no instant and decides nothing.
    let mut gap = ScheduleStatus::default();
    record_skip(
        &mut gap,
        SkipReason::NonexistentLocalTime,
        "2026-03-08T02:30:00 America/New_York".to_owned(),
        1,
    );
    assert_eq!(decided_through(&gap), None);
}
