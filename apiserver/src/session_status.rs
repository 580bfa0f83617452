//! Writing a Session's status without losing anyone's change: read the Session, change
//! its status with the crds helpers, then a JSON merge patch on the status subresource
//! that carries `metadata.resourceVersion`, so the kube-apiserver refuses (409) a write
//! based on a stale read; on 409 read again and redo the change.
//!
//! A write the cluster refuses as too large (its request limit, or etcd's) is replaced
//! by the smallest write that ends the Session in `Error` ([`finish_oversize`]), so a
//! Session never stays Running, holding its Agent's concurrency slot, because its status
//! cannot grow.
//!
//! Writers in this process take turns per Session (a local lock), so their patches do not
//! collide with each other; only writers in other processes (replicas, the operator) can
//! cause a 409, and those are retried with a small random backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hookrun_crds::retry::ConflictRetry;
use hookrun_crds::session::{SessionStatus, is_too_large_refusal, oversize_finish_patch};
use hookrun_crds::{Session, SessionPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

/// How long a change keeps retrying after conflicts before giving up.
pub(crate) const CONFLICT_BUDGET: Duration = Duration::from_secs(15);

/// Conflicts are retried for [`CONFLICT_BUDGET`], however many attempts that takes.
const WRITE_RETRY: ConflictRetry = ConflictRetry {
    max_attempts: u32::MAX,
    budget: CONFLICT_BUDGET,
};

/// Why a status change did not happen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError<E> {
    /// The Session does not exist (any more).
    #[error("the Session does not exist")]
    NotFound,
    /// Other writers kept winning for [`CONFLICT_BUDGET`].
    #[error("the Session kept changing under this write")]
    Contended,
    /// Another writer won this attempt (a 409); retried until [`CONFLICT_BUDGET`] is
    /// spent, then reported as [`StatusError::Contended`].
    #[error("another writer changed the Session first")]
    Conflict,
    /// The cluster did not answer.
    #[error("the cluster call failed: {0}")]
    Kube(#[source] kube::Error),
    /// The change itself refused (e.g. the Session already finished).
    #[error("the change was refused")]
    Refused(E),
    /// The cluster refused the write as too large; `ended` when the Session was then
    /// ended in `Error` with a minimal write (false: it had already finished).
    #[error("the cluster refused the status as too large")]
    TooLarge { ended: bool },
}

impl<E> StatusError<E> {
    /// A conflict left after the retries is contention; other errors stay as they are.
    fn contended(self) -> Self {
        match self {
            StatusError::Conflict => StatusError::Contended,
            other => other,
        }
    }
}

type Key = (String, String);

/// Serializes this process's status writes per Session and performs them.
#[derive(Debug, Default)]
pub(crate) struct StatusWriter {
    turns: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
}

/// The merge patch that turns `old` into `new`: every field of `new`, `null` for fields
/// `old` had and `new` has not, and the resourceVersion the change was based on.
pub(crate) fn status_patch(
    old: &SessionStatus,
    new: &SessionStatus,
    resource_version: &str,
) -> Result<Value, serde_json::Error> {
    let mut status = serde_json::to_value(new)?;
    if let (Value::Object(old), Value::Object(fields)) = (serde_json::to_value(old)?, &mut status) {
        for key in old.keys() {
            fields.entry(key.clone()).or_insert(Value::Null);
        }
    }
    Ok(json!({"metadata": {"resourceVersion": resource_version}, "status": status}))
}

impl StatusWriter {
    /// Changes the status of Session `name` with `edit` and writes it, retrying on
    /// conflicts. `edit` sees the current Session and a copy of its status; when it
    /// leaves the status as it was, nothing is written. `current` is a Session already
    /// read (saves the first read); a stale one only costs a retry. `written` sees the
    /// Session each successful write returns.
    pub(crate) async fn update<T, E>(
        &self,
        api: &Api<Session>,
        name: &str,
        current: Option<Session>,
        mut edit: impl FnMut(&Session, &mut SessionStatus) -> Result<T, E>,
        written: impl Fn(&Session),
    ) -> Result<T, StatusError<E>> {
        // The collection URL names the namespace: one lock per Session.
        let key = (api.resource_url().to_owned(), name.to_owned());
        let turn = self.turn(&key);
        let guard = turn.lock().await;
        let current = Mutex::new(current);
        let edit = Mutex::new(&mut edit);
        let result = WRITE_RETRY
            .run(
                |error: &StatusError<E>| matches!(error, StatusError::Conflict),
                tokio::time::sleep,
                |_| async {
                    let first = current.lock().unwrap_or_else(PoisonError::into_inner).take();
                    let session = match first {
                        Some(session) => session,
                        None => api
                            .get_opt(name)
                            .await
                            .map_err(StatusError::Kube)?
                            .ok_or(StatusError::NotFound)?,
                    };
                    let old = session.status.clone().unwrap_or_default();
                    let mut new = old.clone();
                    let value = (edit.lock().unwrap_or_else(PoisonError::into_inner))(
                        &session, &mut new,
                    )
                    .map_err(StatusError::Refused)?;
                    if new == old {
                        return Ok(value);
                    }
                    let version = session
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default();
                    let patch = status_patch(&old, &new, &version)
                        .map_err(|e| StatusError::Kube(kube::Error::SerdeError(e)))?;
                    match api
                        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(session) => {
                            written(&session);
                            Ok(value)
                        }
                        Err(kube::Error::Api(status)) if status.code == 409 => {
                            Err(StatusError::Conflict)
                        }
                        Err(kube::Error::Api(status)) if status.code == 404 => {
                            Err(StatusError::NotFound)
                        }
                        Err(kube::Error::Api(status))
                            if is_too_large_refusal(status.code, &status.message) =>
                        {
                            tracing::warn!(
                                session = name,
                                code = status.code,
                                "the cluster refused a Session status as too large; ending the Session"
                            );
                            match finish_oversize(api, name, session).await {
                                Ok(ended) => Err(StatusError::TooLarge { ended }),
                                Err(error) => Err(error),
                            }
                        }
                        Err(error) => Err(StatusError::Kube(error)),
                    }
                },
            )
            .await
            .map_err(StatusError::contended);
        drop(guard);
        self.release(&key, turn);
        result
    }

    fn turn(&self, key: &Key) -> Arc<tokio::sync::Mutex<()>> {
        self.turns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Forgets the Session's lock once nobody else holds or waits for it.
    fn release(&self, key: &Key, turn: Arc<tokio::sync::Mutex<()>>) {
        let mut turns = self.turns.lock().unwrap_or_else(PoisonError::into_inner);
        drop(turn);
        if turns.get(key).is_some_and(|t| Arc::strong_count(t) == 1) {
            turns.remove(key);
        }
    }

    #[cfg(test)]
    /// How many Sessions have a write in flight (for tests).
    pub(crate) fn in_flight(&self) -> usize {
        self.turns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Ends Session `name` (last read as `session`) in `Error` with the smallest write there
/// is, after the cluster refused a status write as too large: phase, message and
/// completion time; if even that is refused, the kept events and answer are dropped too.
/// True when it ended the Session, false when it had finished already.
pub(crate) async fn finish_oversize<E>(
    api: &Api<Session>,
    name: &str,
    session: Session,
) -> Result<bool, StatusError<E>> {
    let current = Mutex::new(Some(session));
    // Once the minimal write was refused as too large, the retries shed the kept events
    // and answer too.
    let shed_all = AtomicBool::new(false);
    WRITE_RETRY
        .run(
            |error: &StatusError<E>| matches!(error, StatusError::Conflict),
            tokio::time::sleep,
            |_| async {
                let first = current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let session = match first {
                    Some(session) => session,
                    None => api
                        .get_opt(name)
                        .await
                        .map_err(StatusError::Kube)?
                        .ok_or(StatusError::NotFound)?,
                };
                let status = session.status.clone().unwrap_or_default();
                let version = session
                    .metadata
                    .resource_version
                    .clone()
                    .unwrap_or_default();
                loop {
                    let shed = shed_all.load(Ordering::Relaxed);
                    let at = Time(k8s_openapi::jiff::Timestamp::now());
                    let Some(patch) = oversize_finish_patch(&status, &version, &at, shed) else {
                        return Ok(false);
                    };
                    match api
                        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                    {
                        Ok(stored) => {
                            let phase = stored.status.map(|s| s.phase()).unwrap_or_default();
                            tracing::warn!(
                                session = name,
                                shed,
                                phase = phase.as_str(),
                                "ended a Session whose status the cluster would not store"
                            );
                            return Ok(phase == SessionPhase::Error);
                        }
                        Err(kube::Error::Api(refusal))
                            if !shed && is_too_large_refusal(refusal.code, &refusal.message) =>
                        {
                            shed_all.store(true, Ordering::Relaxed);
                        }
                        Err(kube::Error::Api(refusal)) if refusal.code == 409 => {
                            return Err(StatusError::Conflict);
                        }
                        Err(kube::Error::Api(refusal)) if refusal.code == 404 => {
                            return Err(StatusError::NotFound);
                        }
                        Err(error) => return Err(StatusError::Kube(error)),
                    }
                }
            },
        )
        .await
        .map_err(StatusError::contended)
}

#[cfg(test)]
mod tests {
    use hookrun_crds::SessionPhase;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    fn at() -> Time {
        Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn the_patch_carries_the_version_and_clears_removed_fields() {
        let mut old = SessionStatus {
            message: Some("was".into()),
            ..SessionStatus::default()
        };
        old.push_event("agent.message", "hi", at());
        let mut new = old.clone();
        new.message = None;
        new.push_event("agent.message", "again", at());
        let patch = status_patch(&old, &new, "42").expect("serializable");
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert_eq!(patch["status"]["message"], Value::Null);
        assert_eq!(patch["status"]["events"].as_array().map(Vec::len), Some(2));
        assert!(patch["status"].get("phase").is_none());
        new.phase = Some(SessionPhase::Running);
        let patch = status_patch(&old, &new, "43").expect("serializable");
        assert_eq!(patch["status"]["phase"], "Running");
    }

    #[tokio::test]
    async fn locks_are_forgotten_after_use() {
        let writer = StatusWriter::default();
        let key = ("ns".to_owned(), "s".to_owned());
        let turn = writer.turn(&key);
        assert_eq!(writer.in_flight(), 1);
        let other = writer.turn(&key);
        writer.release(&key, turn);
        assert_eq!(writer.in_flight(), 1);
        writer.release(&key, other);
        assert_eq!(writer.in_flight(), 0);
    }
}
