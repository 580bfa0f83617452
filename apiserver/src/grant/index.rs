//! The in-memory index `/hook` answers from: Grant token Secrets by token digest, and
//! each Grant's uid, Session and revocation, fed by two watches (Grants, and the managed
//! Secrets labelled `hookrun.dev/grant`). A bad token costs one hash and one map read;
//! no Kubernetes API call is made to refuse it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use hookrun_crds::Grant;
use hookrun_crds::names::{self, grant_secret_keys, secret_keys};
use hookrun_crds::token;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use subtle::ConstantTimeEq;

/// A namespace and a name.
type Key = (String, String);

/// What the index keeps of a Grant's token Secret: the digest of the token, never the
/// token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenEntry {
    pub(crate) digest: [u8; 32],
    pub(crate) namespace: String,
    pub(crate) grant: String,
    pub(crate) grant_uid: String,
    /// The Session fixed when the token was minted.
    pub(crate) session: String,
    pub(crate) expires_at: SystemTime,
}

/// What the index keeps of a Grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GrantEntry {
    pub(crate) uid: String,
    pub(crate) session: String,
    pub(crate) revoked: bool,
}

/// Whom a token that passed every check speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HookTarget {
    pub(crate) namespace: String,
    pub(crate) grant: String,
    pub(crate) grant_uid: String,
    pub(crate) session: String,
}

/// The token entry of a Grant's Secret: its controller owner reference is a hookrun
/// Grant, its name is the one the operator gives that Grant's Secret, and it holds a
/// well-formed token, a Session and a readable expiry. Anything else is nobody's token
/// (fail closed: anyone who may create Secrets can add labels and owner references, and
/// the Grant's uid must then match too).
pub(crate) fn token_entry(secret: &Secret) -> Option<TokenEntry> {
    let namespace = secret.namespace()?;
    let owner = secret.owner_references().iter().find(|o| {
        o.kind == "Grant"
            && o.controller == Some(true)
            && o.api_version.split('/').next() == Some(hookrun_crds::GROUP)
    })?;
    if secret.metadata.name.as_deref() != Some(names::grant_secret_name(&owner.name).as_str()) {
        return None;
    }
    let data = secret.data.as_ref()?;
    let text = |key: &str| std::str::from_utf8(&data.get(key)?.0).ok();
    let presented = text(secret_keys::TOKEN).filter(|t| token::is_well_formed(t))?;
    let session = text(grant_secret_keys::SESSION).filter(|s| !s.is_empty())?;
    let expires_at = text(grant_secret_keys::EXPIRES_AT)?
        .trim()
        .parse::<k8s_openapi::jiff::Timestamp>()
        .ok()?;
    Some(TokenEntry {
        digest: token::digest(presented),
        namespace,
        grant: owner.name.clone(),
        grant_uid: owner.uid.clone(),
        session: session.to_owned(),
        expires_at: SystemTime::from(expires_at),
    })
}

/// What the index keeps of a Grant.
pub(crate) fn grant_entry(grant: &Grant) -> Option<(Key, GrantEntry)> {
    Some((
        (grant.namespace()?, grant.name_any()),
        GrantEntry {
            uid: grant.uid()?,
            session: grant.spec.session.clone(),
            revoked: grant.spec.revoked,
        },
    ))
}

/// The Grant index.
#[derive(Debug, Default)]
pub struct GrantIndex {
    /// Token entries by digest.
    tokens: HashMap<[u8; 32], Arc<TokenEntry>>,
    /// The digest each token Secret holds, by the Secret's namespace and name.
    secrets: HashMap<Key, [u8; 32]>,
    grants: HashMap<Key, GrantEntry>,
    /// Watch streams that have not listed once yet.
    unsynced: usize,
}

/// The index as the server shares it (a std lock, never held across an `.await`).
pub type SharedGrantIndex = Arc<RwLock<GrantIndex>>;

impl GrantIndex {
    /// An empty index that is ready once `streams` watch streams have listed once.
    pub fn new(streams: usize) -> Self {
        Self {
            unsynced: streams,
            ..Self::default()
        }
    }

    /// Whether every watch stream has listed once.
    pub(crate) fn is_synced(&self) -> bool {
        self.unsynced == 0
    }

    fn mark_synced(&mut self) {
        self.unsynced = self.unsynced.saturating_sub(1);
    }

    /// Whom `presented` speaks for at `now`: `None` for a token that is unknown, whose
    /// Grant is gone, revoked or replaced (another uid), whose Grant now names another
    /// Session, or that expired. One answer for all of them.
    pub(crate) fn target(&self, presented: &str, now: SystemTime) -> Option<HookTarget> {
        let digest = token::digest(presented);
        let entry = self.tokens.get(&digest)?;
        // The map found it by digest; the constant-time compare is the check itself.
        if !bool::from(entry.digest.ct_eq(&digest)) {
            return None;
        }
        let grant = self
            .grants
            .get(&(entry.namespace.clone(), entry.grant.clone()))?;
        let usable = grant.uid == entry.grant_uid
            && !grant.revoked
            && grant.session == entry.session
            && now < entry.expires_at;
        usable.then(|| HookTarget {
            namespace: entry.namespace.clone(),
            grant: entry.grant.clone(),
            grant_uid: entry.grant_uid.clone(),
            session: entry.session.clone(),
        })
    }

    pub(crate) fn apply_secret(&mut self, secret: &Secret) {
        let Some(key) = secret_key(secret) else {
            return;
        };
        self.remove_secret_key(&key);
        if let Some(entry) = token_entry(secret) {
            self.secrets.insert(key, entry.digest);
            self.tokens.insert(entry.digest, Arc::new(entry));
        }
    }

    pub(crate) fn delete_secret(&mut self, secret: &Secret) {
        if let Some(key) = secret_key(secret) {
            self.remove_secret_key(&key);
        }
    }

    fn remove_secret_key(&mut self, key: &Key) {
        if let Some(digest) = self.secrets.remove(key) {
            self.tokens.remove(&digest);
        }
    }

    pub(crate) fn apply_grant(&mut self, grant: &Grant) {
        if let Some((key, entry)) = grant_entry(grant) {
            self.grants.insert(key, entry);
        }
    }

    pub(crate) fn delete_grant(&mut self, grant: &Grant) {
        if let Some(namespace) = grant.namespace() {
            self.grants.remove(&(namespace, grant.name_any()));
        }
    }

    fn reset_secrets(&mut self, scope: Option<&str>, listed: &[Secret]) {
        let stale: Vec<Key> = self
            .secrets
            .keys()
            .filter(|(ns, _)| scope.is_none_or(|s| s == ns))
            .cloned()
            .collect();
        for key in &stale {
            self.remove_secret_key(key);
        }
        for secret in listed {
            self.apply_secret(secret);
        }
    }

    fn reset_grants(&mut self, scope: Option<&str>, listed: &[Grant]) {
        self.grants
            .retain(|(ns, _), _| scope.is_some_and(|s| s != ns));
        for grant in listed {
            self.apply_grant(grant);
        }
    }
}

fn secret_key(secret: &Secret) -> Option<Key> {
    Some((secret.namespace()?, secret.metadata.name.clone()?))
}

/// How one kind of watched object lands in the index.
trait Indexed: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + 'static {
    fn apply(index: &mut GrantIndex, object: &Self);
    fn delete(index: &mut GrantIndex, object: &Self);
    fn reset(index: &mut GrantIndex, scope: Option<&str>, listed: &[Self]);
}

impl Indexed for Secret {
    fn apply(index: &mut GrantIndex, object: &Self) {
        index.apply_secret(object);
    }
    fn delete(index: &mut GrantIndex, object: &Self) {
        index.delete_secret(object);
    }
    fn reset(index: &mut GrantIndex, scope: Option<&str>, listed: &[Self]) {
        index.reset_secrets(scope, listed);
    }
}

impl Indexed for Grant {
    fn apply(index: &mut GrantIndex, object: &Self) {
        index.apply_grant(object);
    }
    fn delete(index: &mut GrantIndex, object: &Self) {
        index.delete_grant(object);
    }
    fn reset(index: &mut GrantIndex, scope: Option<&str>, listed: &[Self]) {
        index.reset_grants(scope, listed);
    }
}

/// Feeds one watch stream into the index until it ends (watchers retry with backoff).
async fn feed<K: Indexed>(
    index: SharedGrantIndex,
    scope: Option<String>,
    events: impl Stream<Item = Result<Event<K>, watcher::Error>>,
) {
    let mut events = std::pin::pin!(events);
    let mut buffer: Vec<K> = Vec::new();
    let mut synced_once = false;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, kind = %K::kind(&()), "grant watch failed; retrying");
                continue;
            }
        };
        // Each arm locks, changes and unlocks: never held across an await.
        match event {
            Event::Init => buffer.clear(),
            Event::InitApply(object) => buffer.push(object),
            Event::InitDone => {
                let listed = std::mem::take(&mut buffer);
                let mut index = index.write().unwrap_or_else(PoisonError::into_inner);
                K::reset(&mut index, scope.as_deref(), &listed);
                if !synced_once {
                    synced_once = true;
                    index.mark_synced();
                }
            }
            Event::Apply(object) => K::apply(
                &mut index.write().unwrap_or_else(PoisonError::into_inner),
                &object,
            ),
            Event::Delete(object) => K::delete(
                &mut index.write().unwrap_or_else(PoisonError::into_inner),
                &object,
            ),
        }
    }
}

/// How many watch streams [`run_watches`] runs for these namespaces.
pub fn stream_count(namespaces: &[String]) -> usize {
    2 * namespaces.len().max(1)
}

/// Watches Grants and Grant token Secrets (in `namespaces`, or everywhere when empty)
/// into `index`. Runs until the process ends.
pub async fn run_watches(client: Client, namespaces: Vec<String>, index: SharedGrantIndex) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut tasks = Vec::new();
    for scope in scopes {
        let (grants, secrets): (Api<Grant>, Api<Secret>) = match &scope {
            None => (Api::all(client.clone()), Api::all(client.clone())),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        let config = watcher::Config::default().any_semantic();
        tasks.push(tokio::spawn(feed(
            index.clone(),
            scope.clone(),
            watcher::watcher(grants, config.clone()).default_backoff(),
        )));
        tasks.push(tokio::spawn(feed(
            index.clone(),
            scope,
            watcher::watcher(secrets, config.labels(names::GRANT_SECRET_SELECTOR))
                .default_backoff(),
        )));
    }
    futures::future::join_all(tasks).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use hookrun_crds::grant::{GrantSpec, GrantVerb};
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    const TOKEN: &str = "abcdefghijabcdefghijabcdefghijabcdefghij123";

    fn grant(name: &str, uid: &str, session: &str, revoked: bool) -> Grant {
        let mut grant = Grant::new(
            name,
            GrantSpec {
                session: session.into(),
                verbs: vec![GrantVerb::SendInput],
                ttl_seconds: None,
                label: None,
                revoked,
            },
        );
        grant.metadata.namespace = Some("ns".into());
        grant.metadata.uid = Some(uid.into());
        grant
    }

    fn secret(grant: &str, uid: &str, kind: &str, token: &str, expires: &str) -> Secret {
        let data = BTreeMap::from([
            ("token".to_owned(), ByteString(token.as_bytes().to_vec())),
            ("session".to_owned(), ByteString(b"s-1".to_vec())),
            (
                "expires-at".to_owned(),
                ByteString(expires.as_bytes().to_vec()),
            ),
        ]);
        Secret {
            metadata: ObjectMeta {
                name: Some(names::grant_secret_name(grant)),
                namespace: Some("ns".into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "hookrun.dev/v1alpha1".into(),
                    kind: kind.into(),
                    name: grant.into(),
                    uid: uid.into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        }
    }

    fn now() -> SystemTime {
        SystemTime::from(
            "2026-01-01T00:00:00Z"
                .parse::<k8s_openapi::jiff::Timestamp>()
                .expect("a time"),
        )
    }

    const LATER: &str = "2026-01-01T01:00:00Z";

    #[test]
    fn a_live_grant_admits_its_token_only() {
        let mut index = GrantIndex::new(0);
        index.apply_grant(&grant("ci", "u1", "s-1", false));
        index.apply_secret(&secret("ci", "u1", "Grant", TOKEN, LATER));
        let target = index.target(TOKEN, now()).expect("admitted");
        assert_eq!(
            (
                target.namespace.as_str(),
                target.grant.as_str(),
                target.session.as_str()
            ),
            ("ns", "ci", "s-1")
        );
        assert!(index.target(&TOKEN.replace('a', "b"), now()).is_none());
        assert!(index.target("", now()).is_none());
    }

    #[test]
    fn revoked_expired_replaced_retargeted_or_deleted_grants_refuse() {
        let base = || {
            let mut index = GrantIndex::new(0);
            index.apply_grant(&grant("ci", "u1", "s-1", false));
            index.apply_secret(&secret("ci", "u1", "Grant", TOKEN, LATER));
            index
        };
        let mut index = base();
        index.apply_grant(&grant("ci", "u1", "s-1", true));
        assert!(index.target(TOKEN, now()).is_none(), "revoked");

        let index = base();
        assert!(
            index
                .target(TOKEN, now() + Duration::from_secs(3600))
                .is_none(),
            "expired"
        );

        let mut index = base();
        index.apply_grant(&grant("ci", "u2", "s-1", false));
        assert!(
            index.target(TOKEN, now()).is_none(),
            "a new Grant of the same name"
        );

        let mut index = base();
        index.apply_grant(&grant("ci", "u1", "s-2", false));
        assert!(index.target(TOKEN, now()).is_none(), "spec.session edited");

        let mut index = base();
        index.delete_grant(&grant("ci", "u1", "s-1", false));
        assert!(index.target(TOKEN, now()).is_none(), "Grant deleted");

        let mut index = base();
        index.delete_secret(&secret("ci", "u1", "Grant", TOKEN, LATER));
        assert!(index.target(TOKEN, now()).is_none(), "Secret deleted");
    }

    #[test]
    fn forged_or_malformed_secrets_are_nobodys_token() {
        let mut index = GrantIndex::new(0);
        index.apply_grant(&grant("ci", "u1", "s-1", false));
        // Owned by an Agent (a webhook Secret): never a Grant token.
        let mut webhook = secret("ci", "u1", "Agent", TOKEN, LATER);
        webhook.metadata.name = Some("ci-webhook".into());
        index.apply_secret(&webhook);
        assert!(index.target(TOKEN, now()).is_none());
        // The Grant's owner reference under another name.
        let mut renamed = secret("ci", "u1", "Grant", TOKEN, LATER);
        renamed.metadata.name = Some("other".into());
        index.apply_secret(&renamed);
        assert!(index.target(TOKEN, now()).is_none());
        // No readable expiry.
        index.apply_secret(&secret("ci", "u1", "Grant", TOKEN, "soon"));
        assert!(index.target(TOKEN, now()).is_none());
        // A token of the wrong shape.
        index.apply_secret(&secret("ci", "u1", "Grant", "short", LATER));
        assert!(index.target("short", now()).is_none());
    }

    #[test]
    fn a_relist_replaces_its_scope_only() {
        let mut index = GrantIndex::new(2);
        assert!(!index.is_synced());
        index.apply_grant(&grant("ci", "u1", "s-1", false));
        index.apply_secret(&secret("ci", "u1", "Grant", TOKEN, LATER));
        index.reset_secrets(Some("other"), &[]);
        assert!(index.target(TOKEN, now()).is_some());
        index.reset_secrets(Some("ns"), &[]);
        assert!(index.target(TOKEN, now()).is_none());
        index.reset_secrets(None, &[secret("ci", "u1", "Grant", TOKEN, LATER)]);
        index.reset_grants(None, &[]);
        assert!(index.target(TOKEN, now()).is_none());
        index.mark_synced();
        index.mark_synced();
        assert!(index.is_synced());
    }
}
