//! Where accepted webhooks put their Sessions: the cluster, or memory in tests. The one
//! API call of an accepted webhook is [`SessionStore::create`]; [`SessionStore::get`] is
//! only read after a keyed create collided.

use futures::future::BoxFuture;
use hookrun_crds::Session;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};

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
}

/// Sessions in the cluster.
#[derive(Clone)]
pub(crate) struct KubeSessionStore {
    client: Client,
}

impl KubeSessionStore {
    /// A store that writes through `client`.
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }
}

/// The longest Kubernetes message a [`StoreError::Rejected`] keeps.
pub(crate) const MAX_REJECTION_MESSAGE: usize = 512;

fn store_error(error: kube::Error) -> StoreError {
    match error {
        kube::Error::Api(status) if status.is_already_exists() => StoreError::AlreadyExists,
        kube::Error::Api(status) if is_refusal(status.code) => StoreError::Rejected {
            reason: cut(&status.reason, 64),
            message: cut(&status.message, MAX_REJECTION_MESSAGE),
        },
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Whether a status code from the Kubernetes API refuses the request itself: a 4xx, but
/// not 429 (the API is throttling, so a retry later is right).
pub(crate) fn is_refusal(code: u16) -> bool {
    (400..500).contains(&code) && code != 429
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
            Api::<Session>::namespaced(self.client.clone(), &namespace)
                .create(&PostParams::default(), session)
                .await
                .map_err(store_error)
        })
    }

    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(async move {
            Api::<Session>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(store_error)
        })
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for code in [429, 500, 503, 504] {
            assert!(
                matches!(
                    store_error(api_error(code, "x", "y")),
                    StoreError::Unavailable(_)
                ),
                "{code}"
            );
        }
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
