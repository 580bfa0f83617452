//! Who is calling the runner and read APIs, asked of the cluster: a TokenReview (with the
//! audience `hookrun` for session pods), then for the read API a SubjectAccessReview for
//! `get` on the one Session in its namespace. Answers, failed ones too, are cached for
//! [`CACHE_TTL`] under a SHA-256 digest of the token (the token itself is never kept),
//! in caches bounded both by entries and by bytes. Reviews for the read API are limited
//! per client address ([`crate::auth_limit`]), so callers who are denied cannot spend
//! the apiserver's share of the Kubernetes API.

use std::collections::BTreeMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{
    TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo,
};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};

use crate::auth_limit::ReviewLimiter;
use crate::metrics::Metrics;
use crate::rate_limit::{RateLimit, RetryAfter};

/// How long a review's answer is reused.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(10);
/// The most answers each cache keeps.
pub(crate) const CACHE_CAPACITY: usize = 10_000;
/// The most bytes (estimated) each cache keeps.
pub(crate) const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// What one cache entry costs beyond its keys and values: map slots and the cache's
/// bookkeeping.
const ENTRY_OVERHEAD: usize = 96;
/// The TokenReview extra key holding the name of the pod a token is bound to.
pub(crate) const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The TokenReview extra key holding that pod's uid.
pub(crate) const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The SHA-256 of a token: what caches are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenDigest([u8; 32]);

impl TokenDigest {
    /// The digest of `token`.
    pub(crate) fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }
}

/// A map whose entries expire after a fixed time, bounded both in entries and in bytes
/// (each entry's size is given by the caller): a `quick_cache` cache weighed in bytes,
/// where every entry weighs at least `max_bytes / capacity`, so neither bound can be
/// passed. Expired entries are misses and are dropped when read.
#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    max_bytes: u64,
    /// The least weight of an entry: what keeps the entry count within the capacity.
    min_weight: u64,
    entries: quick_cache::sync::Cache<K, Cached<V>, ByWeight>,
}

/// A cached value, when it was stored and what it weighs.
#[derive(Clone, Debug)]
struct Cached<V> {
    stored: Instant,
    weight: u64,
    value: V,
}

/// Weighs a [`Cached`] value by the weight stored with it.
#[derive(Clone, Debug)]
struct ByWeight;

impl<K, V> quick_cache::Weighter<K, Cached<V>> for ByWeight {
    fn weight(&self, _key: &K, cached: &Cached<V>) -> u64 {
        cached.weight
    }
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `capacity` entries and `max_bytes` bytes.
    pub(crate) fn new(ttl: Duration, capacity: usize, max_bytes: usize) -> Self {
        let capacity = capacity.max(1);
        let max_bytes = max_bytes as u64;
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(capacity)
            .weight_capacity(max_bytes)
            // One shard, so each bound holds for the whole cache (a shard has its part
            // of the capacity only), like the one lock per cache it replaces.
            .shards(1)
            .build()
            .unwrap_or_else(|_| unreachable!("every option is set"));
        Self {
            ttl,
            max_bytes,
            min_weight: (max_bytes / capacity as u64).max(1),
            entries: quick_cache::sync::Cache::with_options(
                options,
                ByWeight,
                Default::default(),
                Default::default(),
            ),
        }
    }

    /// The value stored for `key` less than the TTL before `now`.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<V> {
        let cached = self.entries.get(key)?;
        if now.saturating_duration_since(cached.stored) < self.ttl {
            return Some(cached.value);
        }
        let expired = |c: &Cached<V>| now.saturating_duration_since(c.stored) >= self.ttl;
        self.entries.remove_if(key, expired);
        None
    }

    /// Stores `value`, of `bytes` bytes, for `key` at `now`; an entry larger than the
    /// whole budget is not stored.
    pub(crate) fn insert(&self, key: K, value: V, bytes: usize, now: Instant) {
        let weight = (bytes as u64).max(self.min_weight);
        if weight > self.max_bytes {
            self.entries.remove(&key);
            return;
        }
        self.entries.insert(
            key,
            Cached {
                stored: now,
                weight,
                value,
            },
        );
    }

    /// How many entries are held (expired ones included until pushed out or read).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The bytes the held entries weigh.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.entries.weight()
    }
}

/// The bytes a cached identity holds, for the byte budgets.
pub(crate) fn user_bytes(user: &UserInfo) -> usize {
    let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    let list = |l: &[String]| l.iter().map(|s| s.len() + 24).sum::<usize>();
    len(&user.username)
        + len(&user.uid)
        + user.groups.as_deref().map_or(0, list)
        + user
            .extra
            .as_ref()
            .map_or(0, |e| e.iter().map(|(k, v)| k.len() + 48 + list(v)).sum())
}

/// `(namespace, serviceaccount)` of a `system:serviceaccount:<ns>:<sa>` username.
pub(crate) fn parse_service_account(username: &str) -> Option<(&str, &str)> {
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
pub(crate) fn pod_from_extra(extra: &BTreeMap<String, Vec<String>>) -> Option<(String, String)> {
    let name = single_extra(extra, POD_NAME_EXTRA)?;
    let uid = single_extra(extra, POD_UID_EXTRA)?;
    Some((name.to_owned(), uid.to_owned()))
}

/// A session pod's identity, from its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodIdentity {
    pub(crate) namespace: String,
    pub(crate) pod_name: String,
    pub(crate) pod_uid: String,
}

/// Why a caller is turned away.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Denied {
    /// No valid token for this API (401).
    #[error("no valid token for this API")]
    Unauthenticated,
    /// A valid token that may not do this (403), and why.
    #[error("{0}")]
    Forbidden(&'static str),
}

/// Why authentication did not let a request through; it becomes an HTTP answer through
/// `From<AuthError> for HttpError`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// The cluster's answer (or the cached one) turns the caller away.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The caller's address spent its review attempts; no review was sent.
    #[error("the address spent its review attempts")]
    Throttled(RetryAfter),
    /// A review could not be asked of the cluster.
    #[error("the cluster could not {what}: {source}")]
    Review {
        what: &'static str,
        #[source]
        source: kube::Error,
    },
}

const NOT_POD_BOUND: &str = "the token is not bound to a pod: use the projected token at \
                             HOOKRUN_TOKEN_FILE of the session's own pod";

/// What a session pod's TokenReview decided: the pure part, unit-tested.
pub(crate) fn runner_decision(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<PodIdentity, Denied> {
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

/// What a reader's TokenReview said: the identity, or `None` for a token the cluster
/// does not know.
type ReviewedUser = Option<UserInfo>;

/// The read API's SubjectAccessReview cache key: token digest, namespace, Session name.
type AccessKey = (TokenDigest, String, String);

/// The TokenReview and SubjectAccessReview caches, and the per-address review limit.
#[derive(Debug)]
pub(crate) struct Authenticator {
    runners: TtlCache<TokenDigest, Result<PodIdentity, Denied>>,
    users: TtlCache<TokenDigest, ReviewedUser>,
    access: TtlCache<AccessKey, bool>,
    limiter: Mutex<ReviewLimiter>,
    metrics: Arc<Metrics>,
}

/// The default per-address review limit: a burst of 20, then one per second.
pub(crate) fn default_review_limit() -> RateLimit {
    RateLimit::new(20, 1.0).unwrap_or_else(|_| unreachable!("a valid constant"))
}

impl Authenticator {
    /// Empty caches; reviews counted in `metrics`; denied read callers limited to
    /// `reviews` per address.
    pub(crate) fn new(metrics: Arc<Metrics>, reviews: RateLimit) -> Self {
        Self {
            runners: TtlCache::new(CACHE_TTL, CACHE_CAPACITY, CACHE_BYTES),
            users: TtlCache::new(CACHE_TTL, CACHE_CAPACITY, CACHE_BYTES),
            access: TtlCache::new(CACHE_TTL, CACHE_CAPACITY, CACHE_BYTES),
            limiter: Mutex::new(ReviewLimiter::new(
                reviews,
                crate::auth_limit::DEFAULT_CAPACITY,
                Instant::now(),
            )),
            metrics,
        }
    }
}

async fn token_review(
    client: &Client,
    metrics: &Metrics,
    token: &str,
    audiences: Option<Vec<String>>,
) -> Result<TokenReviewStatus, AuthError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            audiences,
            token: token.to_owned(),
        },
        ..TokenReview::default()
    };
    metrics.review("token_review");
    let reviewed = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|source| AuthError::Review {
            what: "review the token",
            source,
        })?;
    Ok(reviewed.status.unwrap_or_default())
}

/// The identity a reader's TokenReview vouches for, if any.
pub(crate) fn reviewed_user(status: TokenReviewStatus) -> ReviewedUser {
    match (status.authenticated, status.user) {
        (Some(true), Some(user)) => Some(user),
        _ => None,
    }
}

const READ_FORBIDDEN: &str = "this identity may not get that Session (sessions.hookrun.dev) in \
                              that namespace: grant get on sessions with a Role";

impl Authenticator {
    /// The session pod that `token` speaks for: 401 when the token is not valid for the
    /// `hookrun` audience, 403 when it is not bound to a pod.
    pub(crate) async fn runner(
        &self,
        client: &Client,
        token: &str,
    ) -> Result<PodIdentity, AuthError> {
        let key = TokenDigest::of(token);
        let cached = self.runners.get(&key, Instant::now());
        let decision = match cached {
            Some(decision) => decision,
            None => {
                let audience = hookrun_crds::names::TOKEN_AUDIENCE;
                let status = token_review(
                    client,
                    &self.metrics,
                    token,
                    Some(vec![audience.to_owned()]),
                )
                .await?;
                let decision = runner_decision(&status, audience);
                let bytes = ENTRY_OVERHEAD
                    + decision.as_ref().map_or(0, |pod| {
                        pod.namespace.len() + pod.pod_name.len() + pod.pod_uid.len()
                    });
                self.runners
                    .insert(key, decision.clone(), bytes, Instant::now());
                decision
            }
        };
        decision.map_err(AuthError::Denied)
    }

    /// Whether `token` may read Session `name` in `namespace`: 401 for an invalid token,
    /// 403 when the cluster's RBAC does not allow `get` on it, 429 when `client_ip` has
    /// spent its review attempts (before any review is sent). `namespace` and `name`
    /// must be validated names.
    pub(crate) async fn reader(
        &self,
        client: &Client,
        token: &str,
        namespace: &str,
        name: &str,
        client_ip: IpAddr,
    ) -> Result<(), AuthError> {
        let digest = TokenDigest::of(token);
        let access_key = (digest, namespace.to_owned(), name.to_owned());
        let now = Instant::now();
        if let Some(allowed) = self.access.get(&access_key, now) {
            return access_decision(allowed);
        }
        let known = self.users.get(&digest, now);
        let user = match known {
            Some(None) => return Err(Denied::Unauthenticated.into()),
            Some(Some(user)) => Some(user),
            None => None,
        };
        // A review is needed: it costs this address an attempt, given back if allowed.
        if let Err(retry) = lock(&self.limiter).try_acquire(client_ip, now) {
            self.metrics.auth_throttled.inc();
            return Err(AuthError::Throttled(retry));
        }
        let user = match user {
            Some(user) => user,
            None => {
                let status = token_review(client, &self.metrics, token, None).await?;
                let user = reviewed_user(status);
                let bytes = ENTRY_OVERHEAD + user.as_ref().map_or(0, user_bytes);
                self.users
                    .insert(digest, user.clone(), bytes, Instant::now());
                match user {
                    Some(user) => user,
                    None => return Err(Denied::Unauthenticated.into()),
                }
            }
        };
        let allowed = self.review_access(client, user, namespace, name).await?;
        let bytes = ENTRY_OVERHEAD + namespace.len() + name.len();
        self.access
            .insert(access_key, allowed, bytes, Instant::now());
        if allowed {
            lock(&self.limiter).give_back(client_ip);
        }
        access_decision(allowed)
    }

    async fn review_access(
        &self,
        client: &Client,
        user: UserInfo,
        namespace: &str,
        name: &str,
    ) -> Result<bool, AuthError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    name: Some(name.to_owned()),
                    verb: Some("get".to_owned()),
                    group: Some("hookrun.dev".to_owned()),
                    resource: Some("sessions".to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        self.metrics.review("subject_access_review");
        let reviewed = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::Review {
                what: "review the access",
                source,
            })?;
        Ok(reviewed.status.is_some_and(|s| s.allowed))
    }
}

fn access_decision(allowed: bool) -> Result<(), AuthError> {
    if allowed {
        Ok(())
    } else {
        Err(Denied::Forbidden(READ_FORBIDDEN).into())
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
            user.map_err(|d| crate::error::HttpError::from(AuthError::from(d)).status()),
            Err(axum::http::StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn cache_entries_expire() {
        let start = Instant::now();
        let cache = TtlCache::new(Duration::from_secs(10), 100, 100_000);
        cache.insert("a", 1, 1, start);
        assert_eq!(cache.get(&"a", start + Duration::from_secs(9)), Some(1));
        assert_eq!(cache.get(&"a", start + Duration::from_secs(10)), None);
        // An expired entry is dropped once read.
        assert_eq!(cache.len(), 0);
        // Overwriting a key keeps one entry with the new value.
        cache.insert("e", 5, 1, start);
        cache.insert("e", 6, 1, start);
        assert_eq!(cache.get(&"e", start), Some(6));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_cache_keeps_to_its_entry_count_and_byte_budget() {
        let start = Instant::now();
        // Many small entries: the count is bounded.
        let cache = TtlCache::new(Duration::from_secs(10), 3, 1_000_000);
        for i in 0..100u32 {
            cache.insert(i, i, 1, start);
            assert!(cache.len() <= 3, "{} entries", cache.len());
        }
        // Few large ones: the bytes are bounded.
        let cache = TtlCache::new(Duration::from_secs(10), 1000, 100);
        for i in 0..100u32 {
            cache.insert(i, i, 30, start);
            assert!(cache.bytes() <= 100, "{} bytes", cache.bytes());
        }
        assert!(cache.len() <= 3);
        // The newest entry is kept.
        assert_eq!(cache.get(&99, start), Some(99));
        // An entry larger than the whole budget is not kept.
        cache.insert(1000, 1000, 101, start);
        assert_eq!(cache.get(&1000, start), None);
    }

    #[test]
    fn reader_reviews_become_identities_and_their_size_is_counted() {
        assert_eq!(reviewed_user(TokenReviewStatus::default()), None);
        let status = reviewed(true, &[], "alice", extra(&[("k", &["v1", "v2"])]));
        let user = reviewed_user(status).expect("authenticated");
        assert_eq!(user.username.as_deref(), Some("alice"));
        let small = user_bytes(&user);
        let mut big = user.clone();
        big.groups = Some(vec!["g".repeat(10_000)]);
        assert!(user_bytes(&big) >= small + 10_000);
        let denied = reviewed(false, &[], "alice", BTreeMap::new());
        assert_eq!(reviewed_user(denied), None);
    }

    #[test]
    fn digests_differ_per_token_and_hide_it() {
        assert_eq!(TokenDigest::of("a"), TokenDigest::of("a"));
        assert_ne!(TokenDigest::of("a"), TokenDigest::of("b"));
        assert!(!format!("{:?}", TokenDigest::of("secret-token")).contains("secret-token"));
    }
}
