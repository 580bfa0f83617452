//! Leader election on a `coordination.k8s.io` Lease, with client-go's rules: a candidate
//! judges a Lease expired by how long ago *it* saw the Lease last change (its own monotonic
//! clock, never the holder's timestamps), every call has a deadline, and the holder stops
//! writing as soon as it has gone a renew deadline (shorter than the Lease) without a
//! successful renewal. The operator's client refuses writes while [`Leadership`] is not
//! held ([`Leadership::write_gate`]), so a process that hung or was frozen writes nothing
//! once a successor may have taken over, even before its renew loop has noticed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};

use crate::error::{Error, Result};

/// Until when this process may act as the leader. Shared by the elector, which extends
/// it on every successful renewal, and the client's write gate, which reads it.
#[derive(Debug, Default)]
pub struct Leadership {
    valid_until: Mutex<Option<Instant>>,
}

/// Why a write was refused by the gate.
#[derive(Debug, thiserror::Error)]
#[error("this operator does not hold the leader lease; writes are refused until it does")]
pub struct NotLeader;

impl Leadership {
    /// Whether this process may write now.
    pub fn is_held(&self) -> bool {
        self.is_held_at(Instant::now())
    }

    fn is_held_at(&self, now: Instant) -> bool {
        lock(&self.valid_until).is_some_and(|until| now < until)
    }

    /// The instant leadership lapses unless renewed, if it is held at all.
    pub fn valid_until(&self) -> Option<Instant> {
        *lock(&self.valid_until)
    }

    fn extend_to(&self, until: Instant) {
        let mut valid_until = lock(&self.valid_until);
        if valid_until.is_none_or(|current| current < until) {
            *valid_until = Some(until);
        }
    }

    /// Stops acting as leader at once.
    pub fn revoke(&self) {
        *lock(&self.valid_until) = None;
    }

    /// Lets a request through when it only reads (GET: get, list, watch) or when
    /// leadership is held; every other method is refused with [`NotLeader`].
    pub fn admit<B>(&self, request: http::Request<B>) -> Result<http::Request<B>, NotLeader> {
        if request.method() == http::Method::GET || self.is_held() {
            Ok(request)
        } else {
            Err(NotLeader)
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a candidate compares to notice that the holder renewed: any change to the
/// holder, its timestamps or the transition count counts, whatever the timestamps say.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRecord {
    holder: String,
    acquire_time: Option<MicroTime>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
    duration: Duration,
}

impl LeaseRecord {
    pub fn of(spec: &LeaseSpec) -> Self {
        Self {
            holder: spec.holder_identity.clone().unwrap_or_default(),
            acquire_time: spec.acquire_time.clone(),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
            duration: Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
            ),
        }
    }
}

/// Whether `identity` may take a Lease whose record it first saw unchanged at
/// `observed_at`: nobody holds it, we do, or the holder has left it unchanged for
/// longer than its duration as measured by our own clock.
pub fn lease_is_takeable(
    record: &LeaseRecord,
    identity: &str,
    observed_at: Instant,
    now: Instant,
) -> bool {
    record.holder.is_empty()
        || record.holder == identity
        || now.saturating_duration_since(observed_at) > record.duration
}

/// Takes and keeps one Lease on behalf of this process.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    /// The last record seen and when this process first saw it.
    observed: Mutex<Option<(LeaseRecord, Instant)>>,
    leadership: std::sync::Arc<Leadership>,
}

/// This process's identity in the Lease: host name and process id.
pub fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host}-{}", std::process::id())
}

impl LeaderElector {
    /// An elector for the Lease `namespace/name`. `client` must not be gated by
    /// `leadership`: renewing is itself a write.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        lease_duration: Duration,
        leadership: std::sync::Arc<Leadership>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            lease_duration: lease_duration.max(Duration::from_secs(1)),
            observed: Mutex::new(None),
            leadership,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// How often the holder renews.
    pub fn renew_interval(&self) -> Duration {
        self.lease_duration / 3
    }

    /// How long the holder may fail to renew before it must assume it lost the Lease.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let held =
            previous.is_some_and(|p| p.holder_identity.as_deref() == Some(self.identity.as_str()));
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if held {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if held || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// Remembers `spec` and returns when this process first saw it unchanged.
    fn observe(&self, spec: &LeaseSpec, now: Instant) -> (LeaseRecord, Instant) {
        let record = LeaseRecord::of(spec);
        let mut observed = lock(&self.observed);
        match observed.as_ref() {
            Some((seen, at)) if *seen == record => (record, *at),
            _ => {
                *observed = Some((record.clone(), now));
                (record, now)
            }
        }
    }

    /// Takes or renews the Lease; returns whether this process holds it now. Losing a race
    /// to another candidate is `Ok(false)`, not an error. On success leadership is held
    /// until a renew deadline after this attempt *started*, which is before any other
    /// candidate can judge the Lease expired.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let started = Instant::now();
        let now = Timestamp::now();
        let result = match self.api.get_opt(&self.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(None, now)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let current = lease.spec.clone().unwrap_or_default();
                let (record, observed_at) = self.observe(&current, started);
                if !lease_is_takeable(&record, &self.identity, observed_at, Instant::now()) {
                    return Ok(false);
                }
                lease.spec = Some(self.spec(Some(&current), now));
                // The resourceVersion from the read makes this a compare-and-swap.
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(lease) => {
                if let Some(spec) = &lease.spec {
                    self.observe(spec, Instant::now());
                }
                self.leadership.extend_to(started + self.renew_deadline());
                Ok(true)
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    /// One attempt, cut off after `deadline`.
    async fn attempt(&self, deadline: Duration) -> Result<bool> {
        match tokio::time::timeout(deadline, self.try_acquire_or_renew()).await {
            Ok(result) => result,
            Err(_) => Err(Error::LeaderElection(format!(
                "no answer from the cluster within {deadline:?}"
            ))),
        }
    }

    /// Waits until this process holds the Lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.attempt(self.renew_deadline()).await {
                Ok(true) => return,
                Ok(false) => {
                    tracing::debug!(lease = %self.name, "the lease is held by another operator")
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "could not take the lease")
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews until the Lease is lost: another holder took it, or no renewal succeeded
    /// before leadership lapsed. Each renewal is cut off when leadership would lapse, so a
    /// hung call cannot outlive it. Leadership is revoked before this returns.
    pub async fn hold(&self) {
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            let Some(remaining) = self
                .leadership
                .valid_until()
                .and_then(|until| until.checked_duration_since(Instant::now()))
                .filter(|left| !left.is_zero())
            else {
                tracing::error!(lease = %self.name, "no renewal within the renew deadline; stepping down");
                break;
            };
            match self.attempt(remaining).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another operator took the lease");
                    break;
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "could not renew the lease");
                }
            }
        }
        self.leadership.revoke();
    }

    /// Gives the Lease up so that a successor need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
        self.leadership.revoke();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        spec.lease_duration_seconds = Some(1);
        tracing::info!(lease = %lease.name_any(), "stepping down");
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: &str, duration_secs: u64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.to_owned(),
            acquire_time: None,
            renew_time: None,
            transitions: None,
            duration: Duration::from_secs(duration_secs),
        }
    }

    #[test]
    fn free_or_own_leases_are_takeable_at_once() {
        let now = Instant::now();
        assert!(lease_is_takeable(&record("", 15), "me", now, now));
        assert!(lease_is_takeable(&record("me", 15), "me", now, now));
        assert!(!lease_is_takeable(&record("other", 15), "me", now, now));
    }

    #[test]
    fn expiry_is_judged_by_when_this_process_saw_the_last_change() {
        let seen = Instant::now();
        let other = record("other", 15);
        assert!(!lease_is_takeable(
            &other,
            "me",
            seen,
            seen + Duration::from_secs(15)
        ));
        assert!(lease_is_takeable(
            &other,
            "me",
            seen,
            seen + Duration::from_secs(16)
        ));
    }

    #[test]
    fn a_record_is_the_holder_and_its_timestamps_not_the_clock() {
        let spec = LeaseSpec {
            holder_identity: Some("other".into()),
            renew_time: Some(MicroTime(Timestamp::UNIX_EPOCH)),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        };
        let mut renewed = spec.clone();
        renewed.renew_time = Some(MicroTime(
            Timestamp::UNIX_EPOCH + k8s_openapi::jiff::SignedDuration::from_secs(1),
        ));
        // A renewal whose timestamp is decades in the past is still a renewal.
        assert_ne!(LeaseRecord::of(&spec), LeaseRecord::of(&renewed));
        assert_eq!(LeaseRecord::of(&spec).duration, Duration::from_secs(15));
    }

    #[test]
    fn leadership_lapses_and_gates_writes_but_not_reads() {
        let leadership = Leadership::default();
        let request = |method: http::Method| {
            http::Request::builder()
                .method(method)
                .uri("/apis")
                .body(())
                .expect("a request")
        };
        assert!(!leadership.is_held());
        assert!(leadership.admit(request(http::Method::GET)).is_ok());
        assert!(leadership.admit(request(http::Method::PATCH)).is_err());

        let now = Instant::now();
        leadership.extend_to(now + Duration::from_secs(10));
        assert!(leadership.is_held_at(now));
        assert!(!leadership.is_held_at(now + Duration::from_secs(10)));
        assert!(leadership.admit(request(http::Method::POST)).is_ok());
        // An older renewal never shortens what a newer one granted.
        leadership.extend_to(now + Duration::from_secs(5));
        assert!(leadership.is_held_at(now + Duration::from_secs(9)));

        leadership.revoke();
        assert!(leadership.admit(request(http::Method::DELETE)).is_err());
    }

    #[test]
    fn identity_has_pid() {
        assert!(default_identity().ends_with(&format!("-{}", std::process::id())));
    }
}
