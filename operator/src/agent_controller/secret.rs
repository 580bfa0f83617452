//! The managed Secret of an Agent, built as a pure function of the Agent, the Secret that
//! exists now and the resolved signing secrets; and the decision whether it must be written.
//!
//! The token rules live here: an existing token is kept, a missing one is minted, and a
//! new `hookrun.dev/rotate-token` value mints a new one while the old one stays valid as
//! `previous-token` until its expiry.

use std::{collections::BTreeMap, time::Duration};

use hookrun_crds::{
    agent::{SecretKeyRef, SecretSource, SignatureScheme, WebhookTrigger},
    names::{self, secret_keys},
    token::{RandomnessError, WebhookToken},
};
use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    jiff::{SignedDuration, Timestamp},
};

/// The annotation on the managed Secret that names its Agent in full (the label may be
/// shortened with a hash).
pub const AGENT_ANNOTATION: &str = names::AGENT_LABEL;

/// What the managed Secret is built from, taken from the Agent.
#[derive(Clone, Debug)]
pub struct AgentFacts<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// The controller owner reference to the Agent.
    pub owner: OwnerReference,
    /// The value of `hookrun.dev/rotate-token`, if set.
    pub rotate_token: Option<&'a str>,
    /// How long a rotated-out token stays valid.
    pub rotation_grace: Duration,
}

/// What happened to the token in this plan, for Events and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenChange {
    /// The existing token is kept.
    Kept,
    /// There was no (usable) token: a new one was minted.
    Created,
    /// A graceful rotation: a new token, the old one valid until `previous_expires_at`.
    Rotated,
}

/// The managed Secret as it should be.
#[derive(Clone, Debug)]
pub struct SecretPlan {
    pub secret: Secret,
    pub token: WebhookToken,
    pub change: TokenChange,
    /// When the previous token stops being valid, if one is kept: the next reconcile
    /// must happen then, to drop it.
    pub previous_expires_at: Option<Timestamp>,
}

/// Every data key the operator owns in a managed Secret. A key of this list that the plan
/// leaves out must be removed from the Secret; other keys are someone else's.
pub fn owned_keys() -> impl Iterator<Item = &'static str> {
    [
        secret_keys::TOKEN,
        secret_keys::URL,
        secret_keys::PREVIOUS_TOKEN,
        secret_keys::PREVIOUS_TOKEN_EXPIRES_AT,
    ]
    .into_iter()
    .chain(
        SignatureScheme::ALL
            .into_iter()
            .map(SignatureScheme::secret_key),
    )
}

fn data_str<'s>(secret: &'s Secret, key: &str) -> Option<&'s str> {
    let bytes = secret.data.as_ref()?.get(key)?;
    std::str::from_utf8(&bytes.0).ok()
}

fn annotation<'s>(meta: &'s ObjectMeta, key: &str) -> Option<&'s str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// The token stored in a Secret, if it is one this operator could have minted.
pub fn stored_token(secret: &Secret) -> Option<WebhookToken> {
    data_str(secret, secret_keys::TOKEN).and_then(WebhookToken::parse)
}

/// The previous token of a Secret with its expiry, if it is still valid at `now`.
fn live_previous_token(secret: &Secret, now: Timestamp) -> Option<(String, Timestamp)> {
    let token = data_str(secret, secret_keys::PREVIOUS_TOKEN)?;
    let expires: Timestamp = data_str(secret, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT)?
        .parse()
        .ok()?;
    (expires > now && hookrun_crds::token::is_well_formed(token))
        .then(|| (token.to_owned(), expires))
}

/// Builds the managed Secret. `mint` is called only when a new token is needed.
pub fn plan_secret(
    agent: &AgentFacts<'_>,
    existing: Option<&Secret>,
    signing: &BTreeMap<String, Vec<u8>>,
    public_url: &str,
    now: Timestamp,
    mint: impl FnOnce() -> Result<WebhookToken, RandomnessError>,
) -> Result<SecretPlan, RandomnessError> {
    // Whole seconds, so that the stored expiry reads back as the same instant.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let existing_token = existing.and_then(stored_token);
    let rotated_for = existing.and_then(|s| annotation(&s.metadata, names::ROTATED_FOR_ANNOTATION));

    let (token, change, previous) = match existing_token {
        None => (mint()?, TokenChange::Created, None),
        Some(current) => match agent.rotate_token {
            Some(wanted) if rotated_for != Some(wanted) => {
                let grace =
                    SignedDuration::try_from(agent.rotation_grace).unwrap_or(SignedDuration::ZERO);
                let previous = now
                    .checked_add(grace)
                    .ok()
                    .filter(|expires| *expires > now)
                    .map(|expires| (current.expose().to_owned(), expires));
                (mint()?, TokenChange::Rotated, previous)
            }
            _ => (
                current,
                TokenChange::Kept,
                existing.and_then(|s| live_previous_token(s, now)),
            ),
        },
    };

    let url = names::webhook_url(public_url, agent.namespace, agent.name, token.expose());
    let mut data = BTreeMap::new();
    data.insert(
        secret_keys::TOKEN.to_owned(),
        ByteString(token.expose().as_bytes().to_vec()),
    );
    data.insert(secret_keys::URL.to_owned(), ByteString(url.into_bytes()));
    if let Some((previous_token, expires)) = &previous {
        data.insert(
            secret_keys::PREVIOUS_TOKEN.to_owned(),
            ByteString(previous_token.as_bytes().to_vec()),
        );
        data.insert(
            secret_keys::PREVIOUS_TOKEN_EXPIRES_AT.to_owned(),
            ByteString(expires.to_string().into_bytes()),
        );
    }
    for (key, value) in signing {
        data.insert(key.clone(), ByteString(value.clone()));
    }

    let labels = BTreeMap::from([
        (
            names::MANAGED_BY_LABEL.to_owned(),
            names::MANAGED_BY.to_owned(),
        ),
        (
            names::AGENT_LABEL.to_owned(),
            names::label_value(agent.name),
        ),
    ]);
    let mut annotations = BTreeMap::from([(AGENT_ANNOTATION.to_owned(), agent.name.to_owned())]);
    // The rotation this token answers; a fresh Secret answers the current value too, so
    // that deleting the Secret does not also count as a graceful rotation.
    if let Some(value) = agent.rotate_token.or(rotated_for) {
        annotations.insert(names::ROTATED_FOR_ANNOTATION.to_owned(), value.to_owned());
    }

    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names::webhook_secret_name(agent.name)),
            namespace: Some(agent.namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![agent.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    Ok(SecretPlan {
        secret,
        token,
        change,
        previous_expires_at: previous.map(|(_, e)| e),
    })
}

fn map_contains(
    have: Option<&BTreeMap<String, String>>,
    want: Option<&BTreeMap<String, String>>,
) -> bool {
    want.into_iter()
        .flatten()
        .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
}

/// Whether `existing` differs from `desired` in anything the operator owns, so that an
/// apply is needed. A Secret that is already right is not written at all: not even a
/// server-side apply that would change nothing.
pub fn secret_needs_write(desired: &Secret, existing: Option<&Secret>) -> bool {
    let Some(existing) = existing else {
        return true;
    };
    if !map_contains(
        existing.metadata.labels.as_ref(),
        desired.metadata.labels.as_ref(),
    ) || !map_contains(
        existing.metadata.annotations.as_ref(),
        desired.metadata.annotations.as_ref(),
    ) {
        return true;
    }
    let has_owners = desired
        .metadata
        .owner_references
        .iter()
        .flatten()
        .all(|want| {
            existing
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|have| {
                    have.uid == want.uid
                        && have.controller == want.controller
                        && have.kind == want.kind
                })
        });
    if !has_owners || existing.type_ != desired.type_ {
        return true;
    }
    let empty = BTreeMap::new();
    let want = desired.data.as_ref().unwrap_or(&empty);
    let have = existing.data.as_ref().unwrap_or(&empty);
    if want.iter().any(|(k, v)| have.get(k) != Some(v)) {
        return true;
    }
    // A key we own but no longer want (an expired previous token, a dropped signing
    // secret) must go.
    owned_keys().any(|k| have.contains_key(k) && !want.contains_key(k))
}

/// The Secret to replace `existing` with: `desired`'s keys, labels, annotations and
/// owner, over what others put on the Secret (their labels, annotations, owners and data
/// keys stay; keys the operator owns but no longer wants go). The result keeps
/// `existing`'s `resourceVersion`, so the replace is refused with 409 if anyone wrote the
/// Secret since it was read: a former leader resumed after a freeze cannot put back a
/// token its successor already replaced.
pub fn replacement(desired: &Secret, existing: &Secret) -> Secret {
    let mut next = existing.clone();
    let meta = &mut next.metadata;
    let want = &desired.metadata;
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .extend(want.labels.clone().unwrap_or_default());
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .extend(want.annotations.clone().unwrap_or_default());
    let wanted_owners = want.owner_references.clone().unwrap_or_default();
    let mut owners: Vec<OwnerReference> = meta
        .owner_references
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|have| wanted_owners.iter().all(|w| w.uid != have.uid))
        .collect();
    owners.extend(wanted_owners);
    meta.owner_references = Some(owners);
    meta.managed_fields = None;
    let data = next.data.get_or_insert_with(BTreeMap::new);
    for key in owned_keys() {
        data.remove(key);
    }
    data.extend(desired.data.clone().unwrap_or_default());
    next.string_data = None;
    next.type_ = desired.type_.clone();
    next
}

/// A signing secret the spec references but that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingRef {
    /// The spec field that holds the reference.
    pub field: String,
    pub secret: String,
    pub key: String,
    /// Whether the Secret exists (then the key is what is missing).
    pub secret_exists: bool,
}

impl MissingRef {
    /// A sentence a person can act on.
    pub fn message(&self) -> String {
        if self.secret_exists {
            format!(
                "Secret {:?} has no key {:?} (referenced by {}): add the key or fix the reference",
                self.secret, self.key, self.field
            )
        } else {
            format!(
                "Secret {:?} (key {:?}, referenced by {}) does not exist in the Agent's namespace: create it or fix the reference",
                self.secret, self.key, self.field
            )
        }
    }
}

/// Who the Secret under the managed Secret's name belongs to, and so what the operator
/// may do with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretClaim {
    /// There is none: the operator creates it.
    Absent,
    /// The operator's own: labelled as managed and controlled by this Agent.
    Controlled,
    /// Labelled as managed but controlled by nobody (an earlier write lost its owner
    /// reference): the operator adopts it.
    Unclaimed,
    /// Labelled as managed and controlled by another object (an Agent of the same name
    /// that is being deleted): wait for it to go.
    OwnedElsewhere,
    /// Not labelled as managed: somebody else's Secret. Never written, owned or deleted.
    NameTaken,
}

/// Classifies the metadata of `existing` for the Agent with uid `agent_uid`. Only the managed-by label
/// makes a Secret the operator's to adopt: an owner reference alone can be written by
/// anyone who may edit the Secret.
pub fn secret_claim(existing: Option<&ObjectMeta>, agent_uid: &str) -> SecretClaim {
    let Some(existing) = existing else {
        return SecretClaim::Absent;
    };
    let managed = existing
        .labels
        .as_ref()
        .and_then(|l| l.get(names::MANAGED_BY_LABEL))
        .is_some_and(|v| v == names::MANAGED_BY);
    if !managed {
        return SecretClaim::NameTaken;
    }
    let controller = existing
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    match controller {
        None => SecretClaim::Unclaimed,
        Some(owner) if !agent_uid.is_empty() && owner.uid == agent_uid => SecretClaim::Controlled,
        Some(_) => SecretClaim::OwnedElsewhere,
    }
}

/// The names of the Secrets a webhook trigger references.
pub fn referenced_secrets(webhook: &WebhookTrigger) -> Vec<&SecretKeyRef> {
    webhook
        .signing_secrets()
        .into_iter()
        .filter_map(|(_, source)| match source {
            SecretSource::Ref(reference) => Some(reference),
            SecretSource::Inline(_) => None,
        })
        .collect()
}

/// The signing secrets to copy into the managed Secret, keyed by their managed key.
/// `lookup` answers the referenced Secrets by name (`None`: it does not exist).
/// `trigger_path` is the webhook trigger's field path, for messages.
pub fn resolve_signing_secrets<'s>(
    webhook: &WebhookTrigger,
    trigger_path: &str,
    lookup: impl Fn(&str) -> Option<&'s Secret>,
) -> Result<BTreeMap<String, Vec<u8>>, MissingRef> {
    let resolved = resolve_available_signing_secrets(webhook, trigger_path, lookup);
    match resolved.missing.into_iter().next() {
        Some(missing) => Err(missing),
        None => Ok(resolved.signing),
    }
}

/// The signing secrets that can be read now, and the references that cannot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedSigning {
    /// What to copy into the managed Secret, keyed by the managed key.
    pub signing: BTreeMap<String, Vec<u8>>,
    /// The references whose Secret or key is missing. Their schemes get no copy at all:
    /// a copy kept from before would go on accepting signatures made with a secret that
    /// was revoked by deleting it.
    pub missing: Vec<MissingRef>,
}

/// Like [`resolve_signing_secrets`], but resolves what it can and lists the rest.
pub fn resolve_available_signing_secrets<'s>(
    webhook: &WebhookTrigger,
    trigger_path: &str,
    lookup: impl Fn(&str) -> Option<&'s Secret>,
) -> ResolvedSigning {
    let mut resolved = ResolvedSigning::default();
    for (scheme, source) in webhook.signing_secrets() {
        let value = match source {
            SecretSource::Inline(value) => value.as_bytes().to_vec(),
            SecretSource::Ref(reference) => {
                let secret = lookup(&reference.name);
                let value = secret
                    .and_then(|s| s.data.as_ref())
                    .and_then(|d| d.get(&reference.key))
                    .filter(|v| !v.0.is_empty());
                match value {
                    Some(value) => value.0.clone(),
                    None => {
                        resolved.missing.push(MissingRef {
                            field: format!("{trigger_path}.{}", scheme.ref_field()),
                            secret: reference.name.clone(),
                            key: reference.key.clone(),
                            secret_exists: secret.is_some(),
                        });
                        continue;
                    }
                }
            }
        };
        resolved
            .signing
            .insert(scheme.secret_key().to_owned(), value);
    }
    resolved
}
