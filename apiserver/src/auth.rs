//! Who is calling the runner and read APIs, asked of the cluster: a TokenReview (with the
//! audience `hookrun` for session pods), then for the read API a SubjectAccessReview for
//! `get sessions.hookrun.dev` in the namespace. Answers, failed ones too, are cached for
//! [`CACHE_TTL`] under a SHA-256 digest of the token: the token itself is never kept.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::api::ApiError;

/// How long a review's answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
/// The most answers each cache keeps.
pub const CACHE_CAPACITY: usize = 10_000;
/// The TokenReview extra key holding the name of the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview extra key holding that pod's uid.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The SHA-256 of a token: what caches are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }
}

/// A map whose entries expire after a fixed time and which never holds more than its
/// capacity (expired entries go first, then the oldest).
#[derive(Debug)]
pub struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<K, (Instant, V)>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            entries: HashMap::new(),
        }
    }

    /// The value stored for `key` less than the TTL before `now`.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        let (stored, value) = self.entries.get(key)?;
        (now.saturating_duration_since(*stored) < self.ttl).then(|| value.clone())
    }

    /// Stores `value` for `key` at `now`.
    pub fn insert(&mut self, key: K, value: V, now: Instant) {
        if self.entries.len() >= self.capacity && !self.entries.contains_key(&key) {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (stored, _)| now.saturating_duration_since(*stored) < ttl);
            if self.entries.len() >= self.capacity {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (stored, _))| *stored)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(key, (now, value));
    }

    /// How many entries are held (expired ones included until pushed out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `(namespace, serviceaccount)` of a `system:serviceaccount:<ns>:<sa>` username.
pub fn parse_service_account(username: &str) -> Option<(&str, &str)> {
    let rest = username.strip_prefix(SERVICE_ACCOUNT_PREFIX)?;
    let (namespace, account) = rest.split_once(':')?;
    (!namespace.is_empty() && !account.is_empty() && !account.contains(':'))
        .then_some((namespace, account))
}

/// The single value of `key` in a TokenReview's extra info.
fn single_extra<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.as_str()),
        _ => None,
    }
}

/// `(pod name, pod uid)` of a pod-bound token, from its review's extra info.
pub fn pod_from_extra(extra: &BTreeMap<String, Vec<String>>) -> Option<(String, String)> {
    let name = single_extra(extra, POD_NAME_EXTRA)?;
    let uid = single_extra(extra, POD_UID_EXTRA)?;
    Some((name.to_owned(), uid.to_owned()))
}

/// A session pod's identity, from its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// Why a caller is turned away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No valid token for this API (401).
    Unauthenticated,
    /// A valid token that may not do this (403), and why.
    Forbidden(&'static str),
}

impl Denied {
    fn into_error(self) -> ApiError {
        match self {
            Denied::Unauthenticated => ApiError::unauthorized(
                "send a valid Kubernetes token as Authorization: Bearer <token>",
            ),
            Denied::Forbidden(why) => ApiError::forbidden(why),
        }
    }
}

const NOT_POD_BOUND: &str = "the token is not bound to a pod: use the projected token at \
                             HOOKRUN_TOKEN_FILE of the session's own pod";

/// What a session pod's TokenReview decided: the pure part, unit-tested.
pub fn runner_decision(status: &TokenReviewStatus, audience: &str) -> Result<PodIdentity, Denied> {
    let audience_ok = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == audience));
    if status.authenticated != Some(true) || !audience_ok {
        return Err(Denied::Unauthenticated);
    }
    let user = status.user.as_ref().ok_or(Denied::Unauthenticated)?;
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, _account) =
        parse_service_account(username).ok_or(Denied::Forbidden(NOT_POD_BOUND))?;
    let extra = user.extra.clone().unwrap_or_default();
    let (pod_name, pod_uid) = pod_from_extra(&extra).ok_or(Denied::Forbidden(NOT_POD_BOUND))?;
    Ok(PodIdentity {
        namespace: namespace.to_owned(),
        pod_name,
        pod_uid,
    })
}

/// The TokenReview and SubjectAccessReview caches.
#[derive(Debug)]
pub struct Authenticator {
    runners: Mutex<TtlCache<TokenDigest, Result<PodIdentity, Denied>>>,
    readers: Mutex<TtlCache<(TokenDigest, String), Result<(), Denied>>>,
}

impl Default for Authenticator {
    fn default() -> Self {
        Self {
            runners: Mutex::new(TtlCache::new(CACHE_TTL, CACHE_CAPACITY)),
            readers: Mutex::new(TtlCache::new(CACHE_TTL, CACHE_CAPACITY)),
        }
    }
}

async fn token_review(
    client: &Client,
    token: &str,
    audiences: Option<Vec<String>>,
) -> Result<TokenReviewStatus, ApiError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            audiences,
            token: token.to_owned(),
        },
        ..TokenReview::default()
    };
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|error| ApiError::cluster("review the token", &error))?;
    Ok(reviewed.status.unwrap_or_default())
}

impl Authenticator {
    /// The session pod that `token` speaks for: 401 when the token is not valid for the
    /// `hookrun` audience, 403 when it is not bound to a pod.
    pub async fn runner(&self, client: &Client, token: &str) -> Result<PodIdentity, ApiError> {
        let key = TokenDigest::of(token);
        let cached = lock(&self.runners).get(&key, Instant::now());
        let decision = match cached {
            Some(decision) => decision,
            None => {
                let audience = hookrun_crds::names::TOKEN_AUDIENCE;
                let status = token_review(client, token, Some(vec![audience.to_owned()])).await?;
                let decision = runner_decision(&status, audience);
                lock(&self.runners).insert(key, decision.clone(), Instant::now());
                decision
            }
        };
        decision.map_err(Denied::into_error)
    }

    /// Whether `token` may read Sessions in `namespace`: 401 for an invalid token, 403
    /// when the cluster's RBAC does not allow `get` on `sessions.hookrun.dev` there.
    pub async fn reader(
        &self,
        client: &Client,
        token: &str,
        namespace: &str,
    ) -> Result<(), ApiError> {
        let key = (TokenDigest::of(token), namespace.to_owned());
        let cached = lock(&self.readers).get(&key, Instant::now());
        let decision = match cached {
            Some(decision) => decision,
            None => {
                let decision = self.review_reader(client, token, namespace).await?;
                lock(&self.readers).insert(key, decision.clone(), Instant::now());
                decision
            }
        };
        decision.map_err(Denied::into_error)
    }

    async fn review_reader(
        &self,
        client: &Client,
        token: &str,
        namespace: &str,
    ) -> Result<Result<(), Denied>, ApiError> {
        let status = token_review(client, token, None).await?;
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => return Ok(Err(Denied::Unauthenticated)),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some("get".to_owned()),
                    group: Some("hookrun.dev".to_owned()),
                    resource: Some("sessions".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|error| ApiError::cluster("review the access", &error))?;
        let allowed = reviewed.status.is_some_and(|s| s.allowed);
        Ok(if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden(
                "this identity may not get sessions.hookrun.dev in that namespace: grant it \
                 with a Role",
            ))
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    #[test]
    fn service_account_usernames() {
        assert_eq!(
            parse_service_account("system:serviceaccount:team-a:default"),
            Some(("team-a", "default"))
        );
        assert_eq!(parse_service_account("system:serviceaccount:team-a"), None);
        assert_eq!(parse_service_account("system:serviceaccount::sa"), None);
        assert_eq!(parse_service_account("system:serviceaccount:ns:"), None);
        assert_eq!(parse_service_account("system:serviceaccount:a:b:c"), None);
        assert_eq!(parse_service_account("alice"), None);
        assert_eq!(parse_service_account("system:node:worker"), None);
    }

    fn extra(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    #[test]
    fn pod_name_and_uid_come_from_the_extra_info() {
        let both = extra(&[(POD_NAME_EXTRA, &["p"]), (POD_UID_EXTRA, &["u-1"])]);
        assert_eq!(pod_from_extra(&both), Some(("p".into(), "u-1".into())));
        assert_eq!(pod_from_extra(&extra(&[(POD_NAME_EXTRA, &["p"])])), None);
        let two = extra(&[(POD_NAME_EXTRA, &["p", "q"]), (POD_UID_EXTRA, &["u"])]);
        assert_eq!(pod_from_extra(&two), None);
        let empty = extra(&[(POD_NAME_EXTRA, &[""]), (POD_UID_EXTRA, &["u"])]);
        assert_eq!(pod_from_extra(&empty), None);
    }

    fn reviewed(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        extra: BTreeMap<String, Vec<String>>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                extra: Some(extra),
                ..UserInfo::default()
            }),
            ..TokenReviewStatus::default()
        }
    }

    #[test]
    fn runner_tokens_need_the_audience_and_a_pod() {
        let pod = extra(&[(POD_NAME_EXTRA, &["s-1"]), (POD_UID_EXTRA, &["uid"])]);
        let sa = "system:serviceaccount:team:default";
        assert_eq!(
            runner_decision(&reviewed(true, &["hookrun"], sa, pod.clone()), "hookrun"),
            Ok(PodIdentity {
                namespace: "team".into(),
                pod_name: "s-1".into(),
                pod_uid: "uid".into()
            })
        );
        assert_eq!(
            runner_decision(&reviewed(false, &["hookrun"], sa, pod.clone()), "hookrun"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            runner_decision(&reviewed(true, &["other"], sa, pod.clone()), "hookrun"),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            runner_decision(&TokenReviewStatus::default(), "hookrun"),
            Err(Denied::Unauthenticated)
        );
        let unbound = runner_decision(
            &reviewed(true, &["hookrun"], sa, BTreeMap::new()),
            "hookrun",
        );
        assert_eq!(unbound, Err(Denied::Forbidden(NOT_POD_BOUND)));
        let user = runner_decision(&reviewed(true, &["hookrun"], "alice", pod), "hookrun");
        assert_eq!(
            user.map_err(|d| d.into_error().status),
            Err(axum::http::StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn cache_entries_expire_and_the_size_is_bounded() {
        let start = Instant::now();
        let mut cache = TtlCache::new(Duration::from_secs(10), 3);
        cache.insert("a", 1, start);
        assert_eq!(cache.get(&"a", start + Duration::from_secs(9)), Some(1));
        assert_eq!(cache.get(&"a", start + Duration::from_secs(10)), None);
        cache.insert("b", 2, start + Duration::from_secs(1));
        cache.insert("c", 3, start + Duration::from_secs(2));
        // Full: the oldest ("a") goes.
        cache.insert("d", 4, start + Duration::from_secs(3));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&"a", start + Duration::from_secs(3)), None);
        assert_eq!(cache.get(&"b", start + Duration::from_secs(3)), Some(2));
        // Full again, much later: every expired entry goes at once.
        cache.insert("e", 5, start + Duration::from_secs(60));
        assert_eq!(cache.len(), 1);
        // Overwriting a key never evicts.
        cache.insert("e", 6, start + Duration::from_secs(61));
        assert_eq!(cache.get(&"e", start + Duration::from_secs(61)), Some(6));
    }

    #[test]
    fn digests_differ_per_token_and_hide_it() {
        assert_eq!(TokenDigest::of("a"), TokenDigest::of("a"));
        assert_ne!(TokenDigest::of("a"), TokenDigest::of("b"));
        assert!(!format!("{:?}", TokenDigest::of("secret-token")).contains("secret-token"));
    }
}
