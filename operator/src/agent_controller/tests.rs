//! Unit tests of the Agent controller's pure parts: the Secret plan, the write decisions,
//! the status and its condition. No cluster.

use std::{collections::BTreeMap, time::Duration};

use hookrun_crds::{
    Agent, AgentStatus,
    agent::WebhookTrigger,
    names::{self, secret_keys},
    token::WebhookToken,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::{SignedDuration, Timestamp},
};

use super::{
    backoff,
    secret::{self, AgentFacts, TokenChange},
    status::{self, Outcome},
};

const BASE: &str = "https://hooks.example.com/";

fn owner() -> OwnerReference {
    OwnerReference {
        api_version: "hookrun.dev/v1alpha1".into(),
        kind: "Agent".into(),
        name: "my-agent".into(),
        uid: "uid-1".into(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn facts(rotate: Option<&'static str>) -> AgentFacts<'static> {
    AgentFacts {
        name: "my-agent",
        namespace: "team-a",
        owner: owner(),
        rotate_token: rotate,
        rotation_grace: Duration::from_secs(600),
    }
}

fn token(c: char) -> WebhookToken {
    WebhookToken::parse(&c.to_string().repeat(43)).expect("well-formed")
}

fn now() -> Timestamp {
    "2030-01-01T00:00:00Z".parse().expect("timestamp")
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn plan(
    f: &AgentFacts<'_>,
    existing: Option<&Secret>,
    signing: &BTreeMap<String, Vec<u8>>,
    at: Timestamp,
    minted: char,
) -> secret::SecretPlan {
    secret::plan_secret(f, existing, signing, BASE, at, || Ok(token(minted))).expect("plan")
}

#[test]
fn a_missing_secret_gets_a_new_token_and_everything_around_it() {
    let p = plan(&facts(None), None, &BTreeMap::new(), now(), 'a');
    assert_eq!(p.change, TokenChange::Created);
    let s = &p.secret;
    assert_eq!(s.metadata.name.as_deref(), Some("my-agent-webhook"));
    assert_eq!(s.metadata.namespace.as_deref(), Some("team-a"));
    let labels = s.metadata.labels.as_ref().expect("labels");
    assert_eq!(
        labels.get(names::MANAGED_BY_LABEL).map(String::as_str),
        Some("hookrun")
    );
    assert_eq!(
        labels.get(names::AGENT_LABEL).map(String::as_str),
        Some("my-agent")
    );
    assert_eq!(s.metadata.owner_references.as_deref(), Some(&[owner()][..]));
    assert_eq!(data(s, secret_keys::TOKEN), Some("a".repeat(43)));
    assert_eq!(
        data(s, secret_keys::URL),
        Some(format!(
            "https://hooks.example.com/webhooks/team-a/my-agent/{}",
            "a".repeat(43)
        ))
    );
    assert_eq!(data(s, secret_keys::PREVIOUS_TOKEN), None);
    assert!(p.previous_expires_at.is_none());
    assert!(secret::secret_needs_write(s, None));
}

#[test]
fn an_existing_token_is_never_regenerated_and_a_right_secret_is_not_written() {
    let first = plan(&facts(None), None, &BTreeMap::new(), now(), 'a');
    let again = secret::plan_secret(
        &facts(None),
        Some(&first.secret),
        &BTreeMap::new(),
        BASE,
        now(),
        || panic!("must not mint a token when one exists"),
    )
    .expect("plan");
    assert_eq!(again.change, TokenChange::Kept);
    assert_eq!(again.token, token('a'));
    assert!(!secret::secret_needs_write(
        &again.secret,
        Some(&first.secret)
    ));
}

#[test]
fn a_malformed_stored_token_is_replaced() {
    let mut existing = plan(&facts(None), None, &BTreeMap::new(), now(), 'a').secret;
    existing
        .data
        .as_mut()
        .expect("data")
        .insert(secret_keys::TOKEN.into(), ByteString(b"short".to_vec()));
    let p = plan(&facts(None), Some(&existing), &BTreeMap::new(), now(), 'b');
    assert_eq!(p.change, TokenChange::Created);
    assert!(secret::secret_needs_write(&p.secret, Some(&existing)));
}

#[test]
fn extra_labels_and_foreign_keys_do_not_cause_writes_but_changed_ones_do() {
    let first = plan(&facts(None), None, &BTreeMap::new(), now(), 'a').secret;
    let mut existing = first.clone();
    existing
        .metadata
        .labels
        .as_mut()
        .expect("labels")
        .insert("team".into(), "x".into());
    existing
        .data
        .as_mut()
        .expect("data")
        .insert("someone-elses".into(), ByteString(b"v".to_vec()));
    existing.metadata.resource_version = Some("42".into());
    assert!(!secret::secret_needs_write(&first, Some(&existing)));

    let mut tampered = first.clone();
    tampered
        .data
        .as_mut()
        .expect("data")
        .insert(secret_keys::URL.into(), ByteString(b"x".to_vec()));
    assert!(secret::secret_needs_write(&first, Some(&tampered)));

    let mut relabelled = first.clone();
    relabelled
        .metadata
        .labels
        .as_mut()
        .expect("labels")
        .remove(names::MANAGED_BY_LABEL);
    assert!(secret::secret_needs_write(&first, Some(&relabelled)));

    let mut orphaned = first.clone();
    orphaned.metadata.owner_references = None;
    assert!(secret::secret_needs_write(&first, Some(&orphaned)));
}

#[test]
fn a_replacement_is_conditional_on_the_version_read_and_keeps_what_others_added() {
    let signing = BTreeMap::from([(
        hookrun_crds::agent::SignatureScheme::Github
            .secret_key()
            .to_owned(),
        b"s3cret".to_vec(),
    )]);
    let mut existing = plan(&facts(None), None, &signing, now(), 'a').secret;
    existing.metadata.resource_version = Some("42".into());
    existing
        .metadata
        .labels
        .as_mut()
        .expect("labels")
        .insert("team".into(), "x".into());
    existing
        .data
        .as_mut()
        .expect("data")
        .insert("someone-elses".into(), ByteString(b"v".to_vec()));
    let foreign = OwnerReference {
        uid: "uid-other".into(),
        controller: None,
        ..owner()
    };
    existing
        .metadata
        .owner_references
        .as_mut()
        .expect("owners")
        .push(foreign.clone());
    // The signing secret went away: its copy must go, the token must stay.
    let desired = plan(&facts(None), Some(&existing), &BTreeMap::new(), now(), 'b').secret;
    let next = secret::replacement(&desired, &existing);

    assert_eq!(next.metadata.resource_version.as_deref(), Some("42"));
    assert_eq!(data(&next, secret_keys::TOKEN), Some("a".repeat(43)));
    let github = hookrun_crds::agent::SignatureScheme::Github.secret_key();
    assert_eq!(data(&next, github), None, "a dropped signing copy goes");
    assert_eq!(data(&next, "someone-elses").as_deref(), Some("v"));
    let labels = next.metadata.labels.as_ref().expect("labels");
    assert_eq!(labels.get("team").map(String::as_str), Some("x"));
    assert_eq!(
        labels.get(names::MANAGED_BY_LABEL).map(String::as_str),
        Some(names::MANAGED_BY)
    );
    let owners = next.metadata.owner_references.as_ref().expect("owners");
    assert_eq!(owners.len(), 2, "{owners:?}");
    assert!(owners.contains(&foreign) && owners.contains(&owner()));
    assert!(!secret::secret_needs_write(&desired, Some(&next)));
}

#[test]
fn a_new_public_url_rewrites_the_url_but_keeps_the_token() {
    let first = plan(&facts(None), None, &BTreeMap::new(), now(), 'a').secret;
    let moved = secret::plan_secret(
        &facts(None),
        Some(&first),
        &BTreeMap::new(),
        "http://other",
        now(),
        || panic!("no mint"),
    )
    .expect("plan");
    assert_eq!(
        data(&moved.secret, secret_keys::URL),
        Some(format!(
            "http://other/webhooks/team-a/my-agent/{}",
            "a".repeat(43)
        ))
    );
    assert!(secret::secret_needs_write(&moved.secret, Some(&first)));
}

#[test]
fn graceful_rotation_keeps_the_old_token_until_expiry_then_drops_it() {
    let first = plan(&facts(None), None, &BTreeMap::new(), now(), 'a').secret;

    let rotated = plan(
        &facts(Some("r1")),
        Some(&first),
        &BTreeMap::new(),
        now(),
        'b',
    );
    assert_eq!(rotated.change, TokenChange::Rotated);
    assert_eq!(
        data(&rotated.secret, secret_keys::TOKEN),
        Some("b".repeat(43))
    );
    assert_eq!(
        data(&rotated.secret, secret_keys::PREVIOUS_TOKEN),
        Some("a".repeat(43))
    );
    assert_eq!(
        data(&rotated.secret, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT),
        Some("2030-01-01T00:10:00Z".into())
    );
    let annotations = rotated
        .secret
        .metadata
        .annotations
        .as_ref()
        .expect("annotations");
    assert_eq!(
        annotations
            .get(names::ROTATED_FOR_ANNOTATION)
            .map(String::as_str),
        Some("r1")
    );
    assert_eq!(
        rotated.previous_expires_at,
        Some(now() + SignedDuration::from_mins(10))
    );

    // Before expiry: the same annotation does not rotate again, and nothing changes.
    let later = now() + SignedDuration::from_mins(5);
    let kept = secret::plan_secret(
        &facts(Some("r1")),
        Some(&rotated.secret),
        &BTreeMap::new(),
        BASE,
        later,
        || panic!("no mint"),
    )
    .expect("plan");
    assert_eq!(kept.change, TokenChange::Kept);
    assert_eq!(
        data(&kept.secret, secret_keys::PREVIOUS_TOKEN),
        Some("a".repeat(43))
    );
    assert!(!secret::secret_needs_write(
        &kept.secret,
        Some(&rotated.secret)
    ));

    // After expiry: the previous token goes, and that needs a write.
    let after = now() + SignedDuration::from_mins(11);
    let expired = secret::plan_secret(
        &facts(Some("r1")),
        Some(&rotated.secret),
        &BTreeMap::new(),
        BASE,
        after,
        || panic!("no mint"),
    )
    .expect("plan");
    assert_eq!(data(&expired.secret, secret_keys::PREVIOUS_TOKEN), None);
    assert_eq!(
        data(&expired.secret, secret_keys::TOKEN),
        Some("b".repeat(43))
    );
    assert!(expired.previous_expires_at.is_none());
    assert!(secret::secret_needs_write(
        &expired.secret,
        Some(&rotated.secret)
    ));
}

#[test]
fn a_fresh_secret_answers_the_current_rotation_value() {
    // Deleting the Secret of an Agent that carries rotate-token gives a new token; the
    // next reconcile must not count the annotation as another rotation.
    let fresh = plan(&facts(Some("r1")), None, &BTreeMap::new(), now(), 'a');
    assert_eq!(fresh.change, TokenChange::Created);
    let next = secret::plan_secret(
        &facts(Some("r1")),
        Some(&fresh.secret),
        &BTreeMap::new(),
        BASE,
        now(),
        || panic!("no mint"),
    )
    .expect("plan");
    assert_eq!(next.change, TokenChange::Kept);
}

#[test]
fn zero_grace_rotates_without_a_previous_token() {
    let first = plan(&facts(None), None, &BTreeMap::new(), now(), 'a').secret;
    let mut f = facts(Some("r1"));
    f.rotation_grace = Duration::ZERO;
    let rotated = plan(&f, Some(&first), &BTreeMap::new(), now(), 'b');
    assert_eq!(rotated.change, TokenChange::Rotated);
    assert_eq!(data(&rotated.secret, secret_keys::PREVIOUS_TOKEN), None);
}

fn webhook(yaml: &str) -> WebhookTrigger {
    serde_yaml::from_str(yaml).expect("webhook yaml")
}

fn secret_with(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    }
}

#[test]
fn signing_secrets_resolve_inline_and_by_reference() {
    let w = webhook(
        "githubSecret: gh\nlinearSignatureSecretRef: {name: linear, key: signing-secret}\n",
    );
    let linear = secret_with("linear", "signing-secret", "lin");
    let resolved = secret::resolve_signing_secrets(&w, "spec.triggers[0].webhook", |n| {
        (n == "linear").then_some(&linear)
    })
    .expect("resolves");
    assert_eq!(
        resolved.get("github-secret").map(Vec::as_slice),
        Some(&b"gh"[..])
    );
    assert_eq!(
        resolved.get("linear-signing-secret").map(Vec::as_slice),
        Some(&b"lin"[..])
    );

    let p = plan(&facts(None), None, &resolved, now(), 'a');
    assert_eq!(data(&p.secret, "linear-signing-secret"), Some("lin".into()));

    // A signing secret dropped from the spec must leave the managed Secret.
    let without = plan(&facts(None), Some(&p.secret), &BTreeMap::new(), now(), 'z');
    assert_eq!(data(&without.secret, "linear-signing-secret"), None);
    assert!(secret::secret_needs_write(&without.secret, Some(&p.secret)));
}

#[test]
fn a_missing_reference_names_the_secret_the_key_and_the_field() {
    let w = webhook("linearSignatureSecretRef: {name: linear, key: signing-secret}\n");
    let missing = secret::resolve_signing_secrets(&w, "spec.triggers[1].webhook", |_| None)
        .expect_err("missing");
    assert_eq!(missing.secret, "linear");
    assert!(!missing.secret_exists);
    let message = missing.message();
    assert!(
        message.contains("\"linear\"") && message.contains("\"signing-secret\""),
        "{message}"
    );
    assert!(
        message.contains("spec.triggers[1].webhook.linearSignatureSecretRef"),
        "{message}"
    );

    let wrong_key = secret_with("linear", "other", "x");
    let missing =
        secret::resolve_signing_secrets(&w, "spec.triggers[0].webhook", |_| Some(&wrong_key))
            .expect_err("missing key");
    assert!(missing.secret_exists);
    assert!(
        missing.message().contains("has no key \"signing-secret\""),
        "{}",
        missing.message()
    );
}

#[test]
fn a_deleted_reference_drops_the_copy_of_its_signing_secret_and_keeps_the_others() {
    let w = webhook(
        "githubSecretRef: {name: gh, key: secret}\nlinearSignatureSecretRef: {name: linear, key: signing-secret}\n",
    );
    let gh = secret_with("gh", "secret", "old-gh");
    let linear = secret_with("linear", "signing-secret", "lin");
    let both = secret::resolve_available_signing_secrets(&w, "spec.triggers[0].webhook", |n| {
        [&gh, &linear]
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(n))
    });
    assert!(both.missing.is_empty());
    let before = plan(&facts(None), None, &both.signing, now(), 'a').secret;
    assert_eq!(data(&before, "github-secret"), Some("old-gh".into()));

    // The GitHub Secret is deleted: its reference is listed as missing, the other one
    // still resolves, and the plan built from that drops the stale copy.
    let without_gh =
        secret::resolve_available_signing_secrets(&w, "spec.triggers[0].webhook", |n| {
            (n == "linear").then_some(&linear)
        });
    assert_eq!(without_gh.missing.len(), 1);
    assert_eq!(without_gh.missing[0].secret, "gh");
    assert!(!without_gh.missing[0].secret_exists);
    let after = plan(&facts(None), Some(&before), &without_gh.signing, now(), 'z');
    assert_eq!(data(&after.secret, "github-secret"), None);
    assert_eq!(
        data(&after.secret, "linear-signing-secret"),
        Some("lin".into())
    );
    assert_eq!(after.change, TokenChange::Kept, "the token stays");
    assert!(secret::secret_needs_write(&after.secret, Some(&before)));

    // Its key deleted, the Secret still there: the same.
    let emptied = secret_with("gh", "other", "x");
    let no_key = secret::resolve_available_signing_secrets(&w, "spec.triggers[0].webhook", |n| {
        [&emptied, &linear]
            .into_iter()
            .find(|s| s.metadata.name.as_deref() == Some(n))
    });
    assert!(no_key.missing[0].secret_exists);
    assert!(!no_key.signing.contains_key("github-secret"));
}

fn meta(labels: &[(&str, &str)], owners: Vec<OwnerReference>) -> ObjectMeta {
    ObjectMeta {
        name: Some("my-agent-webhook".into()),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        owner_references: Some(owners),
        ..ObjectMeta::default()
    }
}

#[test]
fn only_secrets_labelled_as_managed_are_adopted() {
    use secret::SecretClaim;
    let managed = [(names::MANAGED_BY_LABEL, names::MANAGED_BY)];
    assert_eq!(secret::secret_claim(None, "uid-1"), SecretClaim::Absent);
    assert_eq!(
        secret::secret_claim(Some(&meta(&managed, vec![owner()])), "uid-1"),
        SecretClaim::Controlled
    );
    assert_eq!(
        secret::secret_claim(Some(&meta(&managed, vec![])), "uid-1"),
        SecretClaim::Unclaimed
    );
    assert_eq!(
        secret::secret_claim(Some(&meta(&managed, vec![owner()])), "uid-2"),
        SecretClaim::OwnedElsewhere
    );
    // A user's Secret: no label, or another value, whatever its owner references say.
    for labels in [&[][..], &[(names::MANAGED_BY_LABEL, "helm")][..]] {
        for owners in [vec![], vec![owner()]] {
            assert_eq!(
                secret::secret_claim(Some(&meta(labels, owners)), "uid-1"),
                SecretClaim::NameTaken
            );
        }
    }
    assert_eq!(
        secret::secret_claim(Some(&meta(&managed, vec![owner()])), ""),
        SecretClaim::OwnedElsewhere,
        "an Agent without a uid controls nothing"
    );
}

#[test]
fn a_taken_name_says_what_to_do_and_publishes_no_url() {
    let ready = status::desired_status(None, &ready("https://h/webhooks/ns/a/t"), Some(1), now());
    let taken = Outcome::SecretNameTaken {
        secret_name: "my-agent-webhook".into(),
    };
    let s = status::desired_status(Some(&ready), &taken, Some(2), now());
    assert_eq!(s.webhook_url, None);
    let c = &s.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "SecretNameTaken")
    );
    assert!(
        c.message.contains("\"my-agent-webhook\"")
            && c.message.contains("rename or delete")
            && c.message.contains(names::MANAGED_BY_LABEL),
        "{}",
        c.message
    );
}

fn ready(url: &str) -> Outcome {
    Outcome::WebhookReady {
        status_url: url.into(),
        secret_name: "my-agent-webhook".into(),
        redacted: false,
    }
}

#[test]
fn status_for_each_outcome() {
    let s = status::desired_status(None, &ready("https://h/webhooks/ns/a/t"), Some(3), now());
    assert_eq!(s.webhook_url.as_deref(), Some("https://h/webhooks/ns/a/t"));
    assert_eq!(s.observed_generation, Some(3));
    let c = &s.conditions[0];
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        ("Ready", "True", "WebhookReady")
    );
    assert_eq!(c.observed_generation, Some(3));

    let none = status::desired_status(Some(&s), &Outcome::NoWebhookTrigger, Some(4), now());
    assert_eq!(none.webhook_url, None);
    assert_eq!(none.conditions[0].reason, "NoWebhookTrigger");
    assert_eq!(none.conditions[0].status, "True");
    assert!(none.conditions[0].message.contains("triggers"));

    let missing = status::desired_status(
        Some(&s),
        &Outcome::SecretRefMissing {
            message: "Secret \"linear\" ...".into(),
        },
        Some(4),
        now(),
    );
    assert_eq!(
        missing.webhook_url, s.webhook_url,
        "a missing reference leaves the URL working"
    );
    assert_eq!(missing.conditions[0].status, "False");
    assert_eq!(missing.conditions[0].reason, "SecretRefMissing");

    let invalid = status::desired_status(
        None,
        &Outcome::InvalidSpec {
            message: "spec.models[0]: must not be empty".into(),
        },
        Some(1),
        now(),
    );
    assert_eq!(invalid.conditions[0].reason, "InvalidSpec");
    assert!(invalid.conditions[0].message.contains("spec.models[0]"));
}

#[test]
fn an_unchanged_status_is_not_rewritten_and_keeps_its_transition_time() {
    let first = status::desired_status(None, &ready("u"), Some(1), now());
    let later = now() + SignedDuration::from_hours(1);
    let again = status::desired_status(Some(&first), &ready("u"), Some(1), later);
    assert_eq!(again, first);
    assert!(!status::status_needs_write(&again, Some(&first)));

    // Same status, other reason: the time stays. A flip moves it.
    let none = status::desired_status(Some(&first), &Outcome::NoWebhookTrigger, Some(2), later);
    assert_eq!(
        none.conditions[0].last_transition_time,
        first.conditions[0].last_transition_time
    );
    let broken = status::desired_status(
        Some(&none),
        &Outcome::InvalidSpec {
            message: "x".into(),
        },
        Some(3),
        later,
    );
    assert_ne!(
        broken.conditions[0].last_transition_time,
        first.conditions[0].last_transition_time
    );
    assert!(status::status_needs_write(&broken, Some(&none)));
}

#[test]
fn other_conditions_keep_their_place() {
    let mut existing = status::desired_status(None, &ready("u"), Some(1), now());
    let mut other = existing.conditions[0].clone();
    other.type_ = "Other".into();
    existing.conditions.insert(0, other);
    let again = status::desired_status(Some(&existing), &ready("u"), Some(1), now());
    assert!(!status::status_needs_write(&again, Some(&existing)));
}

#[test]
fn redacted_status_message_points_to_the_secret() {
    let o = Outcome::WebhookReady {
        status_url: "u".into(),
        secret_name: "s".into(),
        redacted: true,
    };
    assert!(o.message().contains("redacted"));
}

#[test]
fn agents_from_yaml_resolve_their_webhook_and_grace() {
    let agent: Agent = serde_yaml::from_str(
        r#"
apiVersion: hookrun.dev/v1alpha1
kind: Agent
metadata:
  name: my-agent
  namespace: team-a
  annotations: {hookrun.dev/rotation-grace: 3s}
spec:
  triggers:
    - {}
    - webhook: {linearSignatureSecretRef: {name: linear, key: k}}
"#,
    )
    .expect("agent yaml");
    assert_eq!(super::rotation_grace(&agent), Ok(Duration::from_secs(3)));
    assert_eq!(super::webhook_path(&agent), "spec.triggers[1].webhook");
    assert!(super::references_secret(&agent, "linear"));
    assert!(!super::references_secret(&agent, "other"));

    let mut bad = agent.clone();
    bad.metadata.annotations = Some(BTreeMap::from([(
        names::ROTATION_GRACE_ANNOTATION.into(),
        "soon".into(),
    )]));
    let message = super::rotation_grace(&bad).expect_err("bad grace");
    assert!(message.contains("hookrun.dev/rotation-grace"), "{message}");
    let _unused: Option<AgentStatus> = None;
}

#[test]
fn long_agent_names_get_valid_secret_names() {
    let long = "a".repeat(253);
    let f = AgentFacts {
        name: &long,
        ..facts(None)
    };
    let p = plan(&f, None, &BTreeMap::new(), now(), 'a');
    let name = p.secret.metadata.name.expect("name");
    assert!(name.len() <= 253 && name.ends_with("-webhook"));
    let label = &p.secret.metadata.labels.expect("labels")[names::AGENT_LABEL];
    assert!(label.len() <= 63);
    assert_eq!(
        p.secret.metadata.annotations.expect("annotations")[secret::AGENT_ANNOTATION],
        long
    );
}

#[test]
fn backoff_grows_and_is_capped() {
    assert_eq!(backoff(1), Duration::from_millis(500));
    assert_eq!(backoff(2), Duration::from_secs(1));
    assert_eq!(backoff(100), Duration::from_secs(300));
}

#[test]
fn a_lagging_cache_does_not_cause_a_second_status_write() {
    let outcome = Outcome::WebhookReady {
        status_url: format!("{BASE}webhooks/ns/a/token"),
        secret_name: "a-webhook".into(),
        redacted: false,
    };
    let t0 = Timestamp::now();
    let written = status::desired_status(None, &outcome, Some(1), t0);
    let last_written = ("41".to_owned(), written.clone());

    // The cache still shows version 41, without our status: compare with our write.
    let base = status::baseline("41", None, Some(&last_written));
    assert_eq!(base, Some(&written));
    let later = status::desired_status(base, &outcome, Some(1), t0 + SignedDuration::from_secs(5));
    assert!(
        !status::status_needs_write(&later, base),
        "only the clock moved"
    );

    // Once the cache moved on, the cache is the truth again.
    let cached = AgentStatus::default();
    assert_eq!(
        status::baseline("42", Some(&cached), Some(&last_written)),
        Some(&cached)
    );
}

fn agent_with(webhook: serde_json::Value) -> Agent {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "hookrun.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "my-agent", "namespace": "team-a"},
        "spec": {
            "triggers": [{"webhook": webhook}],
            "session": {"env": [{"name": "OWN", "value": "x"}]},
        },
    }))
    .expect("an Agent")
}

#[test]
fn a_bad_expression_is_reported_with_its_field_and_position_and_keeps_the_url() {
    let bad = agent_with(serde_json::json!({"filter": "body.action == 'created' &&"}));
    let outcome = super::expression_outcome(&bad, ready("u"));
    assert_eq!(outcome.reason(), status::ReadyReason::InvalidExpression);
    let s = status::desired_status(None, &outcome, Some(2), now());
    assert_eq!(
        s.webhook_url.as_deref(),
        Some("u"),
        "the door answers 500, not 401"
    );
    let condition = &s.conditions[0];
    assert_eq!(condition.status, "False");
    assert_eq!(condition.reason, "InvalidExpression");
    assert!(
        condition
            .message
            .contains("spec.triggers[0].webhook.filter"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("line 1, column"),
        "{}",
        condition.message
    );

    let own = agent_with(serde_json::json!({"env": [{"name": "OWN", "expression": "'y'"}]}));
    let outcome = super::expression_outcome(&own, ready("u"));
    assert!(
        outcome
            .message()
            .contains("spec.triggers[0].webhook.env[0].name")
    );

    let good = agent_with(serde_json::json!({
        "filter": "body.action == 'created'",
        "title": "body.issue.title",
        "env": [{"name": "REPO", "expression": "body.repository.full_name"}],
    }));
    assert_eq!(super::expression_outcome(&good, ready("u")), ready("u"));
}
