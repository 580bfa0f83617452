//! The pod policy as the controllers apply it: the policy from the flags, and a cache of
//! the Secrets that opted in to Agent env (their metadata only, selected by
//! [`names::AGENT_ENV_SELECTOR`]), one watch per watched scope.

use futures::{Stream, StreamExt};
use hookrun_crds::{Agent, names};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client, ResourceExt,
    api::PartialObjectMeta,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};

use crate::pod_policy::{self, PodPolicy, Violation};

/// The metadata of a Secret, as the cache keeps it.
pub type SecretMeta = PartialObjectMeta<Secret>;

/// Watches the metadata of the opted-in Secrets of one namespace (`None`: all). Returns
/// the cache and the stream of touched Secrets (to map to the Agents that name them);
/// the cache fills only while the stream is polled.
pub fn watch(
    client: Client,
    namespace: Option<&str>,
) -> (
    Store<SecretMeta>,
    impl Stream<Item = Result<SecretMeta, watcher::Error>> + Send + 'static,
) {
    // An `Api` of `PartialObjectMeta` lists and watches metadata only: no Secret data.
    let api: Api<SecretMeta> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            api,
            watcher::Config::default()
                .labels(names::AGENT_ENV_SELECTOR)
                .any_semantic()
                .page_size(crate::agent_controller::LIST_PAGE),
        )
        .default_backoff(),
    )
    .touched_objects()
    .boxed();
    (store, stream)
}

/// The opted-in Secrets of every watched scope.
#[derive(Clone, Default)]
pub struct EnvSecrets {
    stores: Vec<Store<SecretMeta>>,
}

impl EnvSecrets {
    pub fn new(stores: Vec<Store<SecretMeta>>) -> Self {
        Self { stores }
    }

    /// Whether the Secret `name` of `namespace` carries the opt-in label.
    pub fn opted_in(&self, namespace: &str, name: &str) -> bool {
        let key = ObjectRef::new(name).within(namespace);
        self.stores.iter().any(|store| {
            store.get(&key).is_some_and(|secret| {
                secret
                    .labels()
                    .get(names::AGENT_ENV_LABEL)
                    .map(String::as_str)
                    == Some(names::AGENT_ENV_OPT_IN)
            })
        })
    }

    /// Waits until every cache has listed once, so that a Secret that opted in is never
    /// taken for one that did not.
    pub async fn wait_until_ready(&self) {
        for store in &self.stores {
            // An error means the watch was dropped: the operator is stopping.
            let _ = store.wait_until_ready().await;
        }
    }
}

/// The pod policy and what it needs to know of the cluster.
#[derive(Clone, Default)]
pub struct PolicyGuard {
    pub policy: PodPolicy,
    pub env_secrets: EnvSecrets,
}

impl PolicyGuard {
    /// Every way `agent` leaves the policy (empty: none).
    pub async fn violations(&self, agent: &Agent) -> Vec<Violation> {
        if agent.spec.session.is_none() {
            return Vec::new();
        }
        self.env_secrets.wait_until_ready().await;
        let namespace = agent.namespace().unwrap_or_default();
        pod_policy::check(&agent.spec, &self.policy, |name| {
            self.env_secrets.opted_in(&namespace, name)
        })
    }
}

/// Whether `agent` reads the Secret `name` into its session env.
pub fn reads_env_secret(agent: &Agent, name: &str) -> bool {
    agent.spec.session.as_ref().is_some_and(|session| {
        session.env.iter().any(|var| {
            var.value_from
                .as_ref()
                .and_then(|from| from.secret_key_ref.as_ref())
                .is_some_and(|r| r.name == name)
        })
    })
}
