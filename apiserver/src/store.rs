//! Where accepted webhooks put their Sessions: the cluster, or memory in tests. The one
//! API call of an accepted webhook is [`SessionStore::create`]; [`SessionStore::get`] is
//! only read after a keyed create collided.

use std::time::Duration;

use futures::future::BoxFuture;
use hookrun_crds::Session;
use hookrun_crds::session::{Finished, Input, SessionStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

use crate::session_status::{StatusError, StatusWriter};

/// Why a Session could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A Session of that name exists.
    #[error("a Session of that name already exists")]
    AlreadyExists,
    /// The cluster refused the Session itself (a 4xx other than AlreadyExists and
    /// throttling): sending it again would be refused again.
    #[error("the cluster refused the Session ({reason}): {message}")]
    Rejected {
        /// The Kubernetes reason, e.g. `Invalid`.
        reason: String,
        /// The Kubernetes message, cut to [`MAX_REJECTION_MESSAGE`] bytes.
        message: String,
    },
    /// The cluster did not take the request.
    #[error("the cluster cannot store the Session: {0}")]
    Unavailable(String),
}

/// Creates and reads Sessions.
pub trait SessionStore: Send + Sync {
    /// Creates `session` in its namespace and returns it as stored (with its uid and
    /// resourceVersion).
    fn create<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, Result<Session, StoreError>>;
    /// Reads a Session; `None` when it does not exist.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>>;
    /// Appends input `content` to the live Session `namespace/name` as a `user.message`
    /// with event key `key` (a retry with the same key is the same input). A request
    /// whose idempotency key `request_key` is the one the Session was created with is
    /// that creating request again: input id 0, replayed.
    fn append_input<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        content: &'a str,
        key: &'a str,
        request_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Delivery, StoreError>>;
}

/// Appends an input to `session`'s status (see [`SessionStore::append_input`]).
pub(crate) fn append_to(
    session: &Session,
    status: &mut SessionStatus,
    content: &str,
    key: &str,
    request_key: Option<&str>,
) -> Result<Input, Finished> {
    let created_with = session
        .spec
        .trigger
        .as_ref()
        .and_then(|t| t.idempotency_key.as_deref());
    if request_key.is_some() && created_with == request_key {
        return Ok(Input {
            id: 0,
            replayed: true,
        });
    }
    status.append_input(content, key, now())
}

/// What delivering an input into a Session came to.
#[derive(Debug)]
pub enum Delivery {
    /// Stored (or found stored, for a retry); the Session as written.
    Appended { input: Input, session: Box<Session> },
    /// The Session had finished: it takes no more input. The finished Session as read,
    /// when the write got to read it (its conversation may be carried over).
    Finished(Option<Box<Session>>),
    /// The Session does not exist.
    Gone,
}

/// `session` with `status` in place, as the write stored it.
fn with_status(session: &Session, status: &SessionStatus) -> Box<Session> {
    let mut session = session.clone();
    session.status = Some(status.clone());
    Box::new(session)
}

/// Sessions in the cluster.
#[derive(Clone)]
pub(crate) struct KubeSessionStore {
    client: Client,
    timeout: Duration,
    /// Shared with the runner API, so that this process's writes to one Session take
    /// turns instead of conflicting.
    status: std::sync::Arc<StatusWriter>,
}

/// How long a Session create or read may take before the webhook is answered 503: the
/// Kubernetes client's own read timeout is minutes (it serves watches too), and a
/// kube-apiserver that is starting or unreachable accepts connections it does not
/// answer. Senders give up on a webhook after about 10 s.
pub(crate) const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

impl KubeSessionStore {
    /// A store that writes through `client`, each call bounded by
    /// [`DEFAULT_STORE_TIMEOUT`].
    pub(crate) fn new(client: Client) -> Self {
        Self {
            client,
            timeout: DEFAULT_STORE_TIMEOUT,
            status: std::sync::Arc::default(),
        }
    }

    /// The same store, writing statuses through `status`.
    pub(crate) fn with_status_writer(self, status: std::sync::Arc<StatusWriter>) -> Self {
        Self { status, ..self }
    }

    /// The same store with each create and read bounded by `timeout`.
    pub(crate) fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }
}

/// `call` within `timeout`, else [`StoreError::Unavailable`]. A create that timed out may
/// still be stored: a caller who retries with the same idempotency key gets that Session.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(store_error),
        Err(_) => Err(StoreError::Unavailable(format!(
            "the cluster did not answer within {timeout:?}"
        ))),
    }
}

/// The longest Kubernetes message a [`StoreError::Rejected`] keeps.
pub(crate) const MAX_REJECTION_MESSAGE: usize = 512;

fn store_error(error: kube::Error) -> StoreError {
    match error {
        kube::Error::Api(status) if status.is_already_exists() => StoreError::AlreadyExists,
        kube::Error::Api(status) if is_refusal(status.code, &status.message) => {
            StoreError::Rejected {
                reason: cut(&status.reason, 64),
                message: cut(&status.message, MAX_REJECTION_MESSAGE),
            }
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Whether an answer of the Kubernetes API refuses the Session itself, so that sending
/// it again would be refused again: a 4xx such as 400, 413, 422, or a 403 of admission
/// (a quota, a policy). Not a refusal, but a state of the cluster or of this server's
/// identity that passes (503, retry): 401 (the token is not known yet), a 403 that
/// denies this server a permission (RBAC is not loaded yet while a kube-apiserver
/// starts, or the grant is missing), a 403 of an admission plugin that has not loaded
/// what it checks yet (a kube-apiserver that has just started), 404 (the Session type is
/// not served yet), 408 and 429.
pub(crate) fn is_refusal(code: u16, message: &str) -> bool {
    match code {
        401 | 404 | 408 | 429 => false,
        403 => !is_permission_denial(message) && !is_admission_not_ready(message),
        code => (400..500).contains(&code),
    }
}

/// Whether a 403's message is an admission plugin's answer while its caches load, such
/// as the namespace lifecycle plugin's in the first seconds of a kube-apiserver
/// (`... is forbidden: not yet ready to handle request`).
fn is_admission_not_ready(message: &str) -> bool {
    message.ends_with("not yet ready to handle request")
}

/// Whether a 403's message is the authorizer's denial of the caller (`User "..." cannot
/// create resource "sessions" in API group ...`), not an admission plugin's refusal.
fn is_permission_denial(message: &str) -> bool {
    message.contains(" cannot ") && message.contains(" resource ")
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl SessionStore for KubeSessionStore {
    fn create<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, Result<Session, StoreError>> {
        Box::pin(async move {
            let namespace = session.namespace().unwrap_or_default();
            let api = Api::<Session>::namespaced(self.client.clone(), &namespace);
            bounded(self.timeout, api.create(&PostParams::default(), session)).await
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(async move {
            let api = Api::<Session>::namespaced(self.client.clone(), namespace);
            bounded(self.timeout, api.get_opt(name)).await
        })
    }

    fn append_input<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        content: &'a str,
        key: &'a str,
        request_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Delivery, StoreError>> {
        Box::pin(async move {
            let api = Api::<Session>::namespaced(self.client.clone(), namespace);
            let write = self.status.update(
                &api,
                name,
                None,
                |session, status| {
                    let input = append_to(session, status, content, key, request_key)
                        .map_err(|Finished| Box::new(session.clone()))?;
                    Ok::<_, Box<Session>>((input, with_status(session, status)))
                },
                |_| {},
            );
            // Conflicts with other writers are retried; the whole write is bounded like
            // a create, twice over (a read and a patch).
            let written = tokio::time::timeout(self.timeout * 2, write)
                .await
                .map_err(|_| {
                    StoreError::Unavailable(format!(
                        "the cluster did not answer within {:?}",
                        self.timeout * 2
                    ))
                })?;
            match written {
                Ok((input, session)) => Ok(Delivery::Appended { input, session }),
                Err(StatusError::Refused(finished)) => Ok(Delivery::Finished(Some(finished))),
                Err(StatusError::NotFound) => Ok(Delivery::Gone),
                Err(StatusError::TooLarge { .. }) => Ok(Delivery::Finished(None)),
                Err(StatusError::Kube(error)) => Err(store_error(error)),
                Err(error @ (StatusError::Conflict | StatusError::Contended)) => {
                    Err(StoreError::Unavailable(error.to_string()))
                }
            }
        })
    }
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Sessions in memory, for handler tests and benches (the `test-support` feature); can be
/// told to fail like a cluster that is down.
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Default)]
pub struct MemorySessionStore {
    sessions: std::sync::Mutex<std::collections::HashMap<(String, String), Session>>,
    unavailable: std::sync::atomic::AtomicBool,
    /// When set, every create is refused like a Kubernetes 422 with this message.
    rejecting: std::sync::Mutex<Option<String>>,
    forgetful: bool,
}

#[cfg(any(test, feature = "test-support"))]
impl MemorySessionStore {
    /// A store whose creates succeed without keeping anything, for benches: a cluster
    /// keeps Sessions elsewhere, so the server's own cost must not include them (and a
    /// map grown to millions of entries would stall creates while it rehashes).
    pub fn forgetful() -> Self {
        Self {
            forgetful: true,
            ..Self::default()
        }
    }

    /// Every stored Session.
    pub fn sessions(&self) -> Vec<Session> {
        self.lock().values().cloned().collect()
    }

    /// Stores `session` as it is now, as a status writer would.
    pub fn put(&self, session: Session) {
        let key = (session.namespace().unwrap_or_default(), session.name_any());
        self.lock().insert(key, session);
    }

    /// Makes every call fail (or work again).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.unavailable
            .store(unavailable, std::sync::atomic::Ordering::SeqCst);
    }

    /// Makes every create fail as the cluster refusing the object (or work again).
    pub fn set_rejecting(&self, message: Option<&str>) {
        *self
            .rejecting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = message.map(str::to_owned);
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable("the test store is down".into()))
        } else {
            Ok(())
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl SessionStore for MemorySessionStore {
    fn create<'a>(&'a self, session: &'a Session) -> BoxFuture<'a, Result<Session, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let rejecting = self
                .rejecting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            if let Some(message) = rejecting {
                return Err(StoreError::Rejected {
                    reason: "Invalid".to_owned(),
                    message,
                });
            }
            let key = (session.namespace().unwrap_or_default(), session.name_any());
            let mut sessions = self.lock();
            if sessions.contains_key(&key) {
                return Err(StoreError::AlreadyExists);
            }
            if !self.forgetful {
                sessions.insert(key, session.clone());
            }
            Ok(session.clone())
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(async move {
            self.check()?;
            Ok(self
                .lock()
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned())
        })
    }

    fn append_input<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        content: &'a str,
        key: &'a str,
        request_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Delivery, StoreError>> {
        Box::pin(async move {
            self.check()?;
            let mut sessions = self.lock();
            let Some(session) = sessions.get_mut(&(namespace.to_owned(), name.to_owned())) else {
                return Ok(Delivery::Gone);
            };
            let mut status = session.status.clone().unwrap_or_default();
            let appended = append_to(session, &mut status, content, key, request_key);
            session.status = Some(status);
            match appended {
                Ok(input) => Ok(Delivery::Appended {
                    input,
                    session: Box::new(session.clone()),
                }),
                Err(Finished) => Ok(Delivery::Finished(Some(Box::new(session.clone())))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_the_cluster_does_not_answer_is_unavailable_after_the_timeout() {
        let started = std::time::Instant::now();
        let never = std::future::pending::<Result<(), kube::Error>>();
        let result = bounded(Duration::from_millis(50), never).await;
        assert!(
            matches!(&result, Err(StoreError::Unavailable(m)) if m.contains("did not answer")),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let answered = bounded(Duration::from_secs(1), async { Ok::<_, kube::Error>(7) }).await;
        assert_eq!(answered.ok(), Some(7));
    }

    fn api_error(code: u16, reason: &str, message: &str) -> kube::Error {
        kube::Error::Api(
            kube::core::Status {
                code,
                reason: reason.to_owned(),
                message: message.to_owned(),
                ..kube::core::Status::default()
            }
            .boxed(),
        )
    }

    #[test]
    fn a_refusal_by_the_cluster_is_not_a_retryable_outage() {
        assert!(matches!(
            store_error(api_error(409, "AlreadyExists", "exists")),
            StoreError::AlreadyExists
        ));
        for (code, reason) in [(422, "Invalid"), (400, "BadRequest"), (403, "Forbidden")] {
            match store_error(api_error(code, reason, "spec.x: Too long")) {
                StoreError::Rejected { reason: r, message } => {
                    assert_eq!(r, reason);
                    assert_eq!(message, "spec.x: Too long");
                }
                other => panic!("{code}: {other:?}"),
            }
        }
        let quota = "sessions.hookrun.dev \"a-wh-1\" is forbidden: exceeded quota: no-sessions, \
                     requested: count/sessions.hookrun.dev=1, used: count/sessions.hookrun.dev=0, \
                     limited: count/sessions.hookrun.dev=0";
        assert!(matches!(
            store_error(api_error(403, "Forbidden", quota)),
            StoreError::Rejected { .. }
        ));
        for code in [429, 500, 503, 504, 401, 404, 408] {
            assert!(
                matches!(
                    store_error(api_error(code, "x", "y")),
                    StoreError::Unavailable(_)
                ),
                "{code}"
            );
        }
        // What a kube-apiserver answers while its RBAC is still loading, or when the
        // grant is missing: this server's permission, not the Session, is at fault.
        let denied = "sessions.hookrun.dev is forbidden: User \"system:serviceaccount:hookrun:\
                      hookrun-apiserver\" cannot create resource \"sessions\" in API group \
                      \"hookrun.dev\" in the namespace \"team\"";
        assert!(matches!(
            store_error(api_error(403, "Forbidden", denied)),
            StoreError::Unavailable(_)
        ));
        // What a kube-apiserver answers in its first seconds, before its namespace
        // lifecycle admission has listed the namespaces: the cluster, not the Session.
        let starting =
            "sessions.hookrun.dev \"a-wh-1\" is forbidden: not yet ready to handle request";
        assert!(matches!(
            store_error(api_error(403, "Forbidden", starting)),
            StoreError::Unavailable(_)
        ));
        let long = "é".repeat(1000);
        match store_error(api_error(422, "Invalid", &long)) {
            StoreError::Rejected { message, .. } => {
                assert!(
                    message.len() <= MAX_REJECTION_MESSAGE + 3,
                    "{}",
                    message.len()
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
