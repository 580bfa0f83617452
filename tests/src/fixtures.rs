//! The setup the cluster tests of Agents share: a namespace of their own with the Agent
//! and Session APIs in it, a webhook Agent, its `Ready` condition, the number of stored
//! Sessions, and HMAC-SHA256 signatures as the providers send them.

use hmac::{Hmac, Mac};
use hookrun_crds::{Agent, Session};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{Api, Client};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::{Cluster, TestNamespace, cluster};

/// A test's own namespace on the shared cluster (started on first use), deleted when the
/// returned [`TestNamespace`] is dropped: `(cluster, namespace, admin client, Agents in
/// it, Sessions in it)`.
pub async fn agent_namespace() -> (
    &'static Cluster,
    TestNamespace,
    Client,
    Api<Agent>,
    Api<Session>,
) {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents = Api::namespaced(client.clone(), ns.name());
    let sessions = Api::namespaced(client.clone(), ns.name());
    (cluster, ns, client, agents, sessions)
}

/// Applies an Agent with one model and one webhook trigger configured by `webhook`
/// (`{}`, or `{"linearSignatureSecret": ...}` and the like).
pub async fn apply_webhook_agent(agents: &Api<Agent>, name: &str, webhook: Value) {
    crate::apply_agent(
        agents,
        name,
        json!({"spec": {
            "models": ["anthropic/claude-sonnet-4-6"],
            "triggers": [{"webhook": webhook}],
        }}),
    )
    .await;
}

/// How many Sessions are stored (read live, not from a cache).
pub async fn session_count(sessions: &Api<Session>) -> usize {
    sessions
        .list(&Default::default())
        .await
        .expect("list Sessions")
        .items
        .len()
}

/// The Agent's `Ready` condition, once the operator has set one.
pub fn ready_condition(agent: &Agent) -> Option<&Condition> {
    agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
}

/// The hex HMAC-SHA256 of `body` under `secret` (GitHub's `sha256=` value, Linear's
/// signature).
pub fn hex_hmac_sha256(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Changes the Session's status as the runner API would: `change` is applied to the
/// status as read, and the write is retried on a conflict.
pub async fn update_session_status(
    sessions: &Api<Session>,
    name: &str,
    change: impl Fn(&mut hookrun_crds::session::SessionStatus),
) {
    for _ in 0..10 {
        let session = sessions.get(name).await.expect("the Session reads");
        let mut status = session.status.clone().unwrap_or_default();
        change(&mut status);
        let patch = json!({
            "metadata": {"resourceVersion": session.metadata.resource_version},
            "status": status,
        });
        match sessions
            .patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("the status patch failed: {e}"),
        }
    }
    panic!("the status patch kept conflicting");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_the_rfc_4231_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            hex_hmac_sha256("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
