//! Leader election on a `coordination.k8s.io` Lease: acquire when free or expired, renew
//! while holding it, step down on shutdown. One elected operator writes; the others wait.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};

use crate::error::{Error, Result};

/// Takes and keeps one Lease on behalf of this process.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
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

/// Whether a Lease may be taken by `identity` at `now`: it is held by nobody, by us, or
/// its holder has not renewed it within its duration.
pub fn lease_is_takeable(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return true;
    }
    let Some(MicroTime(renewed)) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    match renewed.checked_add(duration) {
        Ok(expires) => expires < now,
        Err(_) => false,
    }
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: String,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity,
            lease_duration: lease_duration.max(Duration::from_secs(1)),
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

    /// Takes or renews the Lease; returns whether this process holds it now. Losing a race
    /// to another candidate is `Ok(false)`, not an error.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
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
                if !lease_is_takeable(&current, &self.identity, now) {
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
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(Error::Kube(error)),
        }
    }

    /// Waits until this process holds the Lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_acquire_or_renew().await {
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

    /// Renews until the Lease is lost (another holder, or no successful renewal within the
    /// renew deadline). Returns when it is lost.
    pub async fn hold(&self) {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "another operator took the lease");
                    return;
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "could not renew the lease");
                    if last_renewed.elapsed() >= self.renew_deadline() {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the Lease up so that a successor need not wait for it to expire.
    pub async fn release(&self) -> Result<()> {
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

    fn spec(
        holder: Option<&str>,
        renewed_secs_ago: i64,
        duration: i32,
        now: Timestamp,
    ) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn takeable_leases() {
        let now = Timestamp::now();
        assert!(lease_is_takeable(&LeaseSpec::default(), "me", now));
        assert!(lease_is_takeable(&spec(Some(""), 0, 15, now), "me", now));
        assert!(lease_is_takeable(&spec(Some("me"), 0, 15, now), "me", now));
        assert!(!lease_is_takeable(
            &spec(Some("other"), 5, 15, now),
            "me",
            now
        ));
        assert!(lease_is_takeable(
            &spec(Some("other"), 16, 15, now),
            "me",
            now
        ));
    }

    #[test]
    fn identity_has_pid() {
        assert!(default_identity().ends_with(&format!("-{}", std::process::id())));
    }
}
