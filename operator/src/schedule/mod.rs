//! Schedule triggers, the pure part: reading a trigger's cron pattern and time zone,
//! finding its slots (with the DST rules below), deciding what is due after a pause, and
//! keeping the per-trigger status. Nothing here talks to a cluster; [`controller`] does.
//!
//! Slots are wall-clock times of the trigger's zone that match the pattern:
//! - a wall-clock time that does not exist (the hour a clock skips in spring) is no slot:
//!   it is skipped, once, and recorded as `NonexistentLocalTime`;
//! - a wall-clock time that happens twice (the hour a clock repeats in autumn) is one
//!   slot, at its first occurrence: a repeated hour fires once.

pub mod controller;

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use hookrun_crds::agent::{
    AgentSpec, MAX_SCHEDULE_NAME_LEN, MAX_SKIPPED_RECORDS, ScheduleStatus, ScheduleTrigger,
    SkippedSlot,
};
use hookrun_crds::validation::{check_env_name, quoted_head};

/// Candidate wall-clock times examined for one answer before giving up (a pattern that
/// matches only in far years, or only inside DST gaps).
const MAX_STEPS: usize = 10_000;
/// Slots counted one by one after a pause; past this the latest is found backwards.
const MAX_MISSED_COUNTED: usize = 1_000;

/// Why a slot did not run; the `reason` of its status record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// The operator was down over several slots: only the latest ran (or was judged).
    Missed,
    /// The slot was later than `startingDeadlineSeconds` when the operator saw it.
    MissedDeadline,
    /// `concurrencyPolicy: Forbid` and a Session of the trigger still ran.
    Forbid,
    /// `suspend: true`.
    Suspended,
    /// The wall-clock time does not exist in the zone (a DST gap).
    NonexistentLocalTime,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Missed => "Missed",
            SkipReason::MissedDeadline => "MissedDeadline",
            SkipReason::Forbid => "Forbid",
            SkipReason::Suspended => "Suspended",
            SkipReason::NonexistentLocalTime => "NonexistentLocalTime",
        }
    }
}

/// A trigger's pattern read in its zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    zone: Tz,
}

/// The first slot after some instant, and the nonexistent wall-clock times passed on
/// the way to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextSlot {
    pub slot: DateTime<Utc>,
    pub gaps: Vec<NaiveDateTime>,
}

fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

impl Schedule {
    /// Reads a trigger; errors name the field (under `field`, e.g.
    /// `spec.triggers[1].schedule`) and what is accepted.
    pub fn parse(trigger: &ScheduleTrigger, field: &str) -> Result<Self, String> {
        let cron = parser().parse(&trigger.cron).map_err(|error| {
            format!(
                "{field}.cron: {} is not a cron pattern ({error}); use 5 fields (minute hour \
                 day-of-month month day-of-week), 6 with leading seconds, or @hourly, @daily, \
                 @weekly, @monthly, @yearly",
                quoted_head(&trigger.cron)
            )
        })?;
        let zone = match trigger.time_zone.as_deref() {
            None => Tz::UTC,
            Some(name) => Tz::from_str(name).map_err(|_| {
                format!(
                    "{field}.timeZone: {} is not an IANA time zone; use a name such as \
                     \"Europe/Paris\" or \"America/New_York\", or leave it out for UTC",
                    quoted_head(name)
                )
            })?,
        };
        Ok(Self { cron, zone })
    }

    /// The zone's name.
    pub fn zone_name(&self) -> &'static str {
        self.zone.name()
    }

    /// The instant a matching wall-clock time stands for, or `None` when it does not exist.
    fn resolve(&self, local: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.zone.from_local_datetime(&local) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            // A repeated wall-clock time is one slot, at its first occurrence.
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => None,
        }
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<NextSlot> {
        let mut local = after.with_timezone(&self.zone).naive_local();
        let mut gaps = Vec::new();
        for _ in 0..MAX_STEPS {
            local = self.cron.find_next_occurrence(&local, false).ok()?;
            match self.resolve(local) {
                Some(slot) if slot > after => return Some(NextSlot { slot, gaps }),
                // The first occurrence of a repeated time, already behind us.
                Some(_) => {}
                None => gaps.push(local),
            }
        }
        None
    }

    /// The latest slot at or before `at` (for long pauses, where counting forward would
    /// take too long).
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut local = at.with_timezone(&self.zone).naive_local();
        let mut inclusive = true;
        for _ in 0..MAX_STEPS {
            local = self.cron.find_previous_occurrence(&local, inclusive).ok()?;
            inclusive = false;
            if let Some(slot) = self.resolve(local)
                && slot <= at
            {
                return Some(slot);
            }
        }
        None
    }

    /// What is due at `now` for a trigger whose slots up to `base` are decided.
    pub fn plan(&self, base: DateTime<Utc>, now: DateTime<Utc>, deadline: Option<i64>) -> Plan {
        let mut plan = Plan::default();
        let mut cursor = base;
        let mut due = Vec::new();
        let mut counted_all = false;
        for _ in 0..MAX_MISSED_COUNTED {
            match self.next_after(cursor) {
                Some(next) if next.slot <= now => {
                    plan.gaps.extend(next.gaps);
                    due.push(next.slot);
                    cursor = next.slot;
                }
                Some(next) => {
                    plan.gaps.extend(next.gaps);
                    plan.next = Some(next.slot);
                    counted_all = true;
                    break;
                }
                None => {
                    counted_all = true;
                    break;
                }
            }
        }
        let mut missed = due.len().saturating_sub(1);
        let mut latest = due.last().copied();
        if !counted_all {
            // Too many to count: the latest is found from `now`, the rest summed up.
            latest = self.latest_at_or_before(now).or(latest);
            missed = MAX_MISSED_COUNTED;
            plan.next = self.next_after(now).map(|n| n.slot);
        }
        if let Some(latest) = latest {
            if missed > 0 {
                let before_latest = self
                    .latest_at_or_before(latest - chrono::Duration::seconds(1))
                    .unwrap_or(latest);
                plan.skipped
                    .push((SkipReason::Missed, before_latest, missed));
            }
            let late = (now - latest).num_seconds();
            match deadline {
                Some(deadline) if late > deadline => {
                    plan.skipped.push((SkipReason::MissedDeadline, latest, 1));
                }
                _ => plan.run = Some(latest),
            }
            plan.decided_through = Some(latest);
        }
        plan
    }

    /// The wall-clock time and zone of a nonexistent local time, for status.
    pub fn describe_gap(&self, local: NaiveDateTime) -> String {
        format!("{} {}", local.format("%Y-%m-%dT%H:%M:%S"), self.zone.name())
    }
}

/// What a trigger should do now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The slot to start a Session for (at most one: never more than one catch-up run).
    pub run: Option<DateTime<Utc>>,
    /// Slots not run, with why and how many (the time is the latest of them).
    pub skipped: Vec<(SkipReason, DateTime<Utc>, usize)>,
    /// Nonexistent wall-clock times passed.
    pub gaps: Vec<NaiveDateTime>,
    /// The latest slot now decided (run or skipped): the next plan starts after it.
    pub decided_through: Option<DateTime<Utc>>,
    /// The first slot after now.
    pub next: Option<DateTime<Utc>>,
}

/// RFC 3339 in UTC with whole seconds, as status shows times.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The latest slot a trigger's status shows as decided: the last run or the last skip
/// of a real slot (the record of a nonexistent local time names no instant). `None` for a
/// trigger never seen: its slots count from when it is first seen.
pub fn decided_through(status: &ScheduleStatus) -> Option<DateTime<Utc>> {
    let last_run = status.last_schedule_time.as_deref().and_then(parse_time);
    let last_skip = status
        .skipped
        .iter()
        .filter_map(|s| parse_time(&s.time))
        .max();
    last_run.max(last_skip)
}

/// Adds a skip record; a skip for the same reason as the newest record extends it.
pub fn record_skip(status: &mut ScheduleStatus, reason: SkipReason, time: String, count: usize) {
    let count = i64::try_from(count).unwrap_or(i64::MAX);
    if let Some(last) = status.skipped.last_mut()
        && last.reason == reason.as_str()
    {
        last.time = time;
        last.count = last.count.saturating_add(count);
        return;
    }
    status.skipped.push(SkippedSlot {
        time,
        reason: reason.as_str().to_owned(),
        count,
    });
    if status.skipped.len() > MAX_SKIPPED_RECORDS {
        let extra = status.skipped.len() - MAX_SKIPPED_RECORDS;
        status.skipped.drain(..extra);
    }
}

/// Checks every schedule trigger of a spec: its name, cron pattern, time zone and env.
/// The error names each field and what is accepted.
pub fn check_schedules(spec: &AgentSpec) -> Result<(), String> {
    let mut errors = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for (index, trigger) in spec.schedules() {
        let field = format!("spec.triggers[{index}].schedule");
        if !valid_trigger_name(&trigger.name) {
            errors.push(format!(
                "{field}.name: {} must be 1 to {MAX_SCHEDULE_NAME_LEN} lower-case letters, \
                 digits or '-', starting and ending with a letter or digit",
                quoted_head(&trigger.name)
            ));
        } else if !names.insert(trigger.name.as_str()) {
            errors.push(format!(
                "{field}.name: {:?} is used by another schedule trigger; names must be unique",
                trigger.name
            ));
        }
        if let Err(message) = Schedule::parse(trigger, &field) {
            errors.push(message);
        }
        for (i, env) in trigger.env.iter().enumerate() {
            if let Err(message) = check_env_name(&env.name) {
                errors.push(format!("{field}.env[{i}].name: {message}"));
            }
        }
        if let Some(seconds) = trigger.starting_deadline_seconds
            && seconds < 1
        {
            errors.push(format!(
                "{field}.startingDeadlineSeconds: {seconds} must be at least 1"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn valid_trigger_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= MAX_SCHEDULE_NAME_LEN
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests;
