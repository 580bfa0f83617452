//! Cluster tests of who may put a token or a signing secret in front of the door: a
//! namespace user's forged Secrets authenticate nothing, a user's Secret that happens to
//! have the webhook Secret's name is never adopted, and deleting a referenced signing
//! Secret revokes it. The real `hookrun-operator` and `hookrun-apiserver` run on a
//! namespace of each test's own.

use hookrun_crds::{Agent, names};
use hookrun_tests::door::{ApiServer, BUDGET, Operator, is_known, request, webhook_path};
use hookrun_tests::fixtures::{
    agent_namespace, apply_webhook_agent, hex_hmac_sha256, ready_condition,
};
use hookrun_tests::{Cluster, TestNamespace, eventually};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

/// A well-formed token of the attacker's choice.
const FORGED_TOKEN: &str = "forgedforgedforgedforgedforgedforgedforged1";

async fn start_operator(cluster: &Cluster, ns: &TestNamespace) -> Operator {
    Operator::start(cluster, ns.name(), &[]).await
}

async fn start_apiserver(cluster: &Cluster, ns: &TestNamespace, tag: &str) -> ApiServer {
    ApiServer::start(
        &cluster.kubeconfig_path(),
        ns.name(),
        &format!("{}-{tag}", ns.name()),
    )
    .await
}

/// Waits for the Agent's `Ready` condition to show `status`/`reason`; returns its message.
async fn wait_for_reason(agents: &Api<Agent>, name: &str, status: &str, reason: &str) -> String {
    eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        let ready = ready_condition(&agent)?;
        (ready.status == status && ready.reason == reason).then(|| ready.message.clone())
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} did not reach Ready={status}/{reason}"))
}

/// A ServiceAccount that may do anything with Secrets in the namespace and read Agents,
/// as a namespace user may; returns a token of it.
fn namespace_user_token(ns: &TestNamespace) -> String {
    let rbac = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: mallory}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: secret-editor}}\n\
         rules:\n\
         - {{apiGroups: [\"\"], resources: [secrets], verbs: [get, list, create, update, patch, delete]}}\n\
         - {{apiGroups: [hookrun.dev], resources: [agents], verbs: [get, list]}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: mallory}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: secret-editor}}\n\
         subjects: [{{kind: ServiceAccount, name: mallory, namespace: {}}}]\n",
        ns.name()
    );
    ns.apply(&rbac);
    ns.token("mallory", &[])
}

/// Creates `secret` as the namespace user holding `token`.
fn create_as_user(ns: &TestNamespace, token: &str, secret: &Value) {
    let flag = format!("--token={token}");
    let created = ns.kubectl(&[&flag, "create", "-f", "-"], Some(&secret.to_string()));
    assert!(
        created.status.success(),
        "the namespace user could not create the Secret: {}",
        String::from_utf8_lossy(&created.stderr)
    );
}

/// A Secret that looks managed: the managed labels, an owner reference to the Agent and
/// a token of the attacker's choice.
fn forged_secret(name: &str, agent: &str, uid: &str, controller: Option<bool>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "labels": {
                names::MANAGED_BY_LABEL: names::MANAGED_BY,
                names::AGENT_LABEL: agent,
            },
            "ownerReferences": [{
                "apiVersion": "hookrun.dev/v1alpha1",
                "kind": "Agent",
                "name": agent,
                "uid": uid,
                "controller": controller,
            }],
        },
        "stringData": {"token": FORGED_TOKEN},
    })
}

/// The status of a POST of `{}` to the webhook path.
async fn post_status(address: &str, path: &str) -> u16 {
    request(address, "POST", path, &[], "{}").await.status
}

#[tokio::test]
async fn forged_managed_secrets_authenticate_nothing_live_or_after_a_restart() {
    let (cluster, ns, _, agents, _) = agent_namespace().await;
    let _operator = start_operator(cluster, &ns).await;
    let apiserver = start_apiserver(cluster, &ns, "first").await;

    apply_webhook_agent(&agents, "victim", json!({})).await;
    let real = webhook_path(&agents, ns.name(), "victim").await;
    assert!(is_known(&apiserver.public, &real).await, "the real token");
    let uid = agents
        .get("victim")
        .await
        .expect("the Agent")
        .metadata
        .uid
        .expect("a uid");

    // The namespace user forges: another name with the right uid; the right name of an
    // Agent that has no Secret yet with the right uid but no controller flag; and the
    // right name with a made-up uid.
    let user = namespace_user_token(&ns);
    create_as_user(
        &ns,
        &user,
        &forged_secret("victim-webhook-2", "victim", &uid, Some(true)),
    );
    create_as_user(
        &ns,
        &user,
        &forged_secret("victim-webhook-3", "victim", &uid, None),
    );
    create_as_user(
        &ns,
        &user,
        &forged_secret(
            &names::webhook_secret_name("squatted"),
            "squatted",
            "00000000-0000-0000-0000-000000000000",
            Some(true),
        ),
    );
    apply_webhook_agent(&agents, "squatted", json!({})).await;

    // A barrier: the Secret of an Agent applied after the forgeries comes later on the
    // same watch, so once its token is accepted the apiserver has seen them all.
    apply_webhook_agent(&agents, "barrier", json!({})).await;
    let barrier = webhook_path(&agents, ns.name(), "barrier").await;
    assert!(is_known(&apiserver.public, &barrier).await, "the barrier");

    let forged_victim = names::webhook_path(ns.name(), "victim", FORGED_TOKEN);
    let forged_squatted = names::webhook_path(ns.name(), "squatted", FORGED_TOKEN);
    let check = |address: String| {
        let (real, forged_victim, forged_squatted) =
            (real.clone(), forged_victim.clone(), forged_squatted.clone());
        async move {
            assert_eq!(
                post_status(&address, &forged_victim).await,
                401,
                "forged token, victim"
            );
            assert_eq!(
                post_status(&address, &forged_squatted).await,
                401,
                "forged token, squatted"
            );
            let answer = request(&address, "POST", &real, &[], "{}").await;
            assert_eq!(answer.status, 200, "the real token: {answer:?}");
        }
    };
    check(apiserver.public.clone()).await;

    // After a restart the relist sees every Secret at once, in the cluster's order.
    drop(apiserver);
    let restarted = start_apiserver(cluster, &ns, "restarted").await;
    assert!(
        is_known(&restarted.public, &real).await,
        "the real token after a restart"
    );
    check(restarted.public.clone()).await;
}

#[tokio::test]
async fn a_users_secret_with_the_webhook_secret_name_is_never_adopted() {
    let (cluster, ns, client, agents, _) = agent_namespace().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let events: Api<Event> = Api::namespaced(client, ns.name());
    let _operator = start_operator(cluster, &ns).await;

    let users_secret = |name: &str| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "labels": {"team": "a"}},
            "stringData": {"token": "the user's own value", "other": "keep me"},
        }))
        .expect("a Secret")
    };
    let taken = names::webhook_secret_name("squatter");
    let created = secrets
        .create(&PostParams::default(), &users_secret(&taken))
        .await
        .expect("the user's Secret");
    let unchanged = |what: &'static str| {
        let (secrets, taken, created) = (secrets.clone(), taken.clone(), created.clone());
        async move {
            let now = secrets
                .get_opt(&taken)
                .await
                .expect("get")
                .unwrap_or_else(|| panic!("the user's Secret was deleted ({what})"));
            assert_eq!(
                now.resource_version(),
                created.resource_version(),
                "the user's Secret was written ({what})"
            );
            assert_eq!(now.data, created.data, "{what}");
            assert!(now.owner_references().is_empty(), "{what}");
        }
    };

    apply_webhook_agent(&agents, "squatter", json!({})).await;
    // Whatever the operator makes of it, once it has said so the Secret must be as it was.
    let reconciled = eventually(BUDGET, || async {
        let agent = agents.get("squatter").await.ok()?;
        ready_condition(&agent).cloned()
    })
    .await;
    assert!(
        reconciled.is_some(),
        "the operator never reconciled the Agent"
    );
    unchanged("the Agent was applied").await;
    let message = wait_for_reason(&agents, "squatter", "False", "SecretNameTaken").await;
    assert!(
        message.contains(&format!("{taken:?}")) && message.contains("rename or delete"),
        "{message}"
    );
    let agent = agents.get("squatter").await.expect("the Agent");
    assert_eq!(agent.status.and_then(|s| s.webhook_url), None);
    let event = eventually(BUDGET, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("SecretNameTaken")
                    && e.involved_object.name.as_deref() == Some("squatter")
            })
    })
    .await;
    assert!(event.is_some(), "no SecretNameTaken Event");
    unchanged("the Agent was applied").await;

    // Removing the trigger does not delete it.
    hookrun_tests::apply_agent(
        &agents,
        "squatter",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": []}}),
    )
    .await;
    wait_for_reason(&agents, "squatter", "True", "NoWebhookTrigger").await;
    unchanged("the trigger was removed").await;

    // Nor does deleting the Agent (nothing of ours owns it for the garbage collector).
    apply_webhook_agent(&agents, "squatter", json!({})).await;
    wait_for_reason(&agents, "squatter", "False", "SecretNameTaken").await;
    agents
        .delete("squatter", &DeleteParams::default())
        .await
        .expect("the Agent deletes");
    let gone = eventually(BUDGET, || async {
        agents
            .get_opt("squatter")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the Agent was not deleted");
    unchanged("the Agent was deleted").await;

    // Once the user's Secret goes, the operator makes its own.
    apply_webhook_agent(&agents, "squatter", json!({})).await;
    wait_for_reason(&agents, "squatter", "False", "SecretNameTaken").await;
    secrets
        .delete(&taken, &DeleteParams::default())
        .await
        .expect("the user deletes their Secret");
    wait_for_reason(&agents, "squatter", "True", "WebhookReady").await;
    let managed = secrets.get(&taken).await.expect("the operator's Secret");
    assert_eq!(
        managed
            .labels()
            .get(names::MANAGED_BY_LABEL)
            .map(String::as_str),
        Some(names::MANAGED_BY)
    );
    let uid = agents
        .get("squatter")
        .await
        .expect("the Agent")
        .metadata
        .uid;
    assert!(
        managed
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
    );
}

/// A GitHub delivery (a fresh body each time, so no dedup answers for it), signed with
/// `secret` when given.
async fn github_delivery(address: &str, path: &str, secret: Option<&str>, n: u32) -> (u16, Value) {
    let body = format!(r#"{{"action":"opened","issue":{{"number":{n},"title":"t"}}}}"#);
    let delivery = format!("delivery-{n}");
    let mut headers = vec![
        ("X-GitHub-Event", "issues".to_owned()),
        ("X-GitHub-Delivery", delivery),
    ];
    if let Some(secret) = secret {
        headers.push((
            "X-Hub-Signature-256",
            format!("sha256={}", hex_hmac_sha256(secret, &body)),
        ));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let answer = request(address, "POST", path, &headers, &body).await;
    (answer.status, answer.json)
}

#[tokio::test]
async fn a_deleted_github_secret_stops_its_signatures_until_it_is_back() {
    let (cluster, ns, client, agents, _) = agent_namespace().await;
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = start_operator(cluster, &ns).await;
    let apiserver = start_apiserver(cluster, &ns, "gh").await;
    let address = apiserver.public.clone();

    let github = |value: &str| -> Secret {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "github"},
            "stringData": {"secret": value},
        }))
        .expect("a Secret")
    };
    secrets
        .create(&PostParams::default(), &github("gh-one"))
        .await
        .expect("the GitHub Secret");
    apply_webhook_agent(
        &agents,
        "signed",
        json!({"githubSecretRef": {"name": "github", "key": "secret"}}),
    )
    .await;
    let path = webhook_path(&agents, ns.name(), "signed").await;
    let mut n = 0;
    let mut next = || {
        n += 1;
        n
    };
    let accepted =
        eventually(BUDGET, || {
            let (address, path, n) = (address.clone(), path.clone(), next());
            async move {
                (github_delivery(&address, &path, Some("gh-one"), n).await.0 == 200).then_some(())
            }
        })
        .await;
    assert!(accepted.is_some(), "a signed delivery was never accepted");

    // Revoke it by deleting the referenced Secret.
    secrets
        .delete("github", &DeleteParams::default())
        .await
        .expect("the GitHub Secret deletes");
    let message = wait_for_reason(&agents, "signed", "False", "SecretRefMissing").await;
    let refused = eventually(BUDGET, || {
        let (address, path, n) = (address.clone(), path.clone(), next());
        async move {
            let (status, json) = github_delivery(&address, &path, Some("gh-one"), n).await;
            (status != 200).then_some((status, json))
        }
    })
    .await;
    let (status, json) = refused.expect("the old signing secret is still accepted");
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["error"], "signing_secret_pending", "{json}");
    for _ in 0..3 {
        let (status, json) = github_delivery(&address, &path, Some("gh-one"), next()).await;
        assert_eq!(status, 503, "signed with the revoked secret: {json}");
        let (status, json) = github_delivery(&address, &path, None, next()).await;
        assert_eq!(status, 401, "unsigned: {json}");
    }
    assert!(
        message.contains("\"github\"") && message.contains("refused"),
        "{message}"
    );
    let managed = secrets
        .get(&names::webhook_secret_name("signed"))
        .await
        .expect("the managed Secret stays (its token too)");
    assert!(
        !managed
            .data
            .unwrap_or_default()
            .contains_key("github-secret"),
        "the copy of the revoked signing secret is still there"
    );

    // Recreated (with a new value): accepted again, and only with the new value.
    secrets
        .create(&PostParams::default(), &github("gh-two"))
        .await
        .expect("the GitHub Secret again");
    wait_for_reason(&agents, "signed", "True", "WebhookReady").await;
    let accepted =
        eventually(BUDGET, || {
            let (address, path, n) = (address.clone(), path.clone(), next());
            async move {
                (github_delivery(&address, &path, Some("gh-two"), n).await.0 == 200).then_some(())
            }
        })
        .await;
    assert!(
        accepted.is_some(),
        "the recreated secret was never accepted"
    );
    let (status, json) = github_delivery(&address, &path, Some("gh-one"), next()).await;
    assert_eq!(status, 401, "the old value after the new one: {json}");
}
