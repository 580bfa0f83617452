//! What the index keeps of each watched object, built by pure functions from the object
//! alone: an Agent's webhook entry ([`agent_entry`]), a managed Secret's digests and
//! signing secrets ([`secret_entry`]) and the Agent it claims ([`secret_owner`]), and a
//! Session's owner, activity and payload digest.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::expression::{self, TriggerExpressions};
use hookrun_crds::names::{self, secret_keys};
use hookrun_crds::session::SessionPhase;
use hookrun_crds::validation::FieldError;
use hookrun_crds::{Agent, Session};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::AgentKey;

/// What the index keeps of an Agent with a webhook trigger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AgentEntry {
    /// The Agent's uid, for the Session's owner reference.
    pub(crate) uid: String,
    /// The parsed `allowCIDRs`; empty allows every address unless `deny_all`.
    pub(crate) allow_cidrs: Vec<IpNet>,
    /// `allowCIDRs` is set but none of it is readable: nobody is allowed.
    pub(crate) deny_all: bool,
    /// The schemes the trigger configures a signing secret for.
    pub(crate) schemes: Vec<SignatureScheme>,
    /// `spec.session.maxConcurrent`.
    pub(crate) max_concurrent: Option<u32>,
    /// What a webhook may put in a Session's `env`, and its storage budgets.
    pub(crate) input: crate::webhook_input::InputPolicy,
    /// `spec.session.maxStoredSessions` (or its default).
    pub(crate) max_stored: u32,
    /// `spec.session.idleTimeoutSeconds`: above 0, Sessions take input after their first
    /// turn, and a waiting caller is answered with its own turn's reply.
    pub(crate) idle_timeout_seconds: u32,
    /// `spec.session.carryOverTurns`: how many turns of a key's finished Session its
    /// next Session starts from.
    pub(crate) carry_over_turns: u32,
    /// The generation the entry was built from: its expressions are compiled once per
    /// generation.
    pub(crate) generation: Option<i64>,
    /// The trigger's CEL expressions, compiled; the first compile error (field and
    /// message) when one does not compile, so that the door answers 500 naming it.
    pub(crate) expressions: Result<Arc<TriggerExpressions>, FieldError>,
}

/// A token digest that stops being accepted at `expires_at`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ExpiringDigest {
    pub(crate) digest: [u8; 32],
    pub(crate) expires_at: SystemTime,
}

/// What the index keeps of an Agent's managed Secret: digests, never tokens.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct SecretEntry {
    /// SHA-256 of the current token.
    pub(crate) token: Option<[u8; 32]>,
    /// SHA-256 of the previous token within its rotation grace.
    pub(crate) previous: Option<ExpiringDigest>,
    /// The signing secret of each scheme the operator copied in.
    pub(crate) signing: HashMap<SignatureScheme, Vec<u8>>,
}

impl std::fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEntry")
            .field("token", &self.token.is_some())
            .field("previous", &self.previous.as_ref().map(|p| p.expires_at))
            .field("signing", &self.signing.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Everything a request to one Agent's webhook is checked against. Both parts are shared
/// with the index, so a lookup costs two reference-count increments, not copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WebhookTarget {
    pub(crate) agent: Arc<AgentEntry>,
    pub(crate) secret: Arc<SecretEntry>,
}

/// A [`WebhookTarget`] borrowed from the index, for checks that keep nothing.
#[derive(Clone, Copy)]
pub(crate) struct TargetRef<'a> {
    pub(crate) agent: &'a Arc<AgentEntry>,
    pub(crate) secret: &'a Arc<SecretEntry>,
}

impl TargetRef<'_> {
    /// The entries, shared.
    pub(crate) fn shared(self) -> WebhookTarget {
        WebhookTarget {
            agent: self.agent.clone(),
            secret: self.secret.clone(),
        }
    }
}

/// The webhook entry of an Agent, `None` when it has no webhook trigger. `allowCIDRs`
/// entries that do not parse are dropped with a warning (the operator's validation
/// refuses them, so this only happens for Agents it has not validated yet).
#[cfg(test)]
pub(crate) fn agent_entry(agent: &Agent) -> Option<AgentEntry> {
    agent_entry_after(agent, None)
}

/// [`agent_entry`], taking the compiled expressions of `previous` when it was built from
/// the same generation: a status write or a relist compiles nothing.
pub(crate) fn agent_entry_after(
    agent: &Agent,
    previous: Option<&AgentEntry>,
) -> Option<AgentEntry> {
    let webhook = agent.spec.webhook()?;
    let generation = agent.metadata.generation;
    let expressions = match previous {
        Some(previous) if generation.is_some() && previous.generation == generation => {
            previous.expressions.clone()
        }
        _ => compile_expressions(agent, webhook),
    };
    let allow_cidrs = webhook
        .allow_cidrs
        .iter()
        .filter_map(|c| parse_cidr(c))
        .collect::<Vec<_>>();
    if allow_cidrs.len() != webhook.allow_cidrs.len() {
        tracing::warn!(agent = %agent.name_any(), "allowCIDRs has entries that are not networks");
    }
    Some(AgentEntry {
        uid: agent.uid().unwrap_or_default(),
        // Fail closed: an allowlist with nothing readable in it allows nobody.
        deny_all: !webhook.allow_cidrs.is_empty() && allow_cidrs.is_empty(),
        allow_cidrs,
        schemes: webhook
            .signing_secrets()
            .into_iter()
            .map(|(s, _)| s)
            .collect(),
        max_concurrent: agent
            .spec
            .session
            .as_ref()
            .and_then(|s| s.max_concurrent)
            .map(|m| u32::try_from(m.max(0)).unwrap_or(u32::MAX)),
        input: crate::webhook_input::InputPolicy::of(&agent.spec),
        max_stored: agent.spec.max_stored_sessions(),
        idle_timeout_seconds: agent.spec.idle_timeout_seconds(),
        carry_over_turns: agent.spec.carry_over_turns(),
        generation,
        expressions,
    })
}

/// Compiles the trigger's expressions, with the field path the operator reports.
fn compile_expressions(
    agent: &Agent,
    webhook: &hookrun_crds::agent::WebhookTrigger,
) -> Result<Arc<TriggerExpressions>, FieldError> {
    let index = agent
        .spec
        .triggers
        .iter()
        .position(|t| t.webhook.is_some())
        .unwrap_or(0);
    let agent_env: Vec<String> = agent
        .spec
        .session
        .as_ref()
        .map(|s| s.env.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default();
    let compiled = expression::compile_trigger(
        &format!("spec.triggers[{index}].webhook"),
        webhook,
        &agent_env,
    );
    if let Err(error) = &compiled {
        tracing::warn!(agent = %agent.name_any(), field = %error.field, "a webhook expression does not compile");
    }
    compiled.map(Arc::new)
}

/// A CIDR, or a bare address as a host network.
fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// The Agent a managed Secret claims to belong to: its controller owner reference to an
/// Agent, when the Secret also has the name the operator gives that Agent's Secret.
/// A Secret that fails either is nobody's token (anyone who may create Secrets in the
/// namespace can add the managed label and an owner reference).
pub(crate) fn secret_owner(secret: &Secret) -> Option<SecretOwner> {
    let namespace = secret.namespace()?;
    let owner = secret.owner_references().iter().find(|o| {
        o.kind == "Agent"
            && o.controller == Some(true)
            && o.api_version.split('/').next() == Some(hookrun_crds::GROUP)
    })?;
    if secret.metadata.name.as_deref() != Some(names::webhook_secret_name(&owner.name).as_str()) {
        return None;
    }
    Some(SecretOwner {
        agent: AgentKey::new(namespace, owner.name.clone()),
        uid: owner.uid.clone(),
    })
}

/// The Agent a managed Secret names as its controller, with the uid that must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SecretOwner {
    pub(crate) agent: AgentKey,
    pub(crate) uid: String,
}

/// A managed Secret the watch delivered, kept by its own name until an Agent with the
/// owner's name and uid takes it.
#[derive(Clone, Debug)]
pub(super) struct SecretCandidate {
    pub(super) owner: SecretOwner,
    pub(super) entry: Arc<SecretEntry>,
}

/// A Secret's namespace and its own name.
pub(super) fn secret_key(secret: &Secret) -> Option<AgentKey> {
    Some(AgentKey::new(
        secret.namespace()?,
        secret.metadata.name.clone()?,
    ))
}

/// What the index keeps of a managed Secret. A previous token without a readable expiry
/// is not accepted (fail closed).
pub(crate) fn secret_entry(secret: &Secret) -> SecretEntry {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| std::str::from_utf8(&v.0).ok())
            .map(str::to_owned)
    };
    let token = text(secret_keys::TOKEN)
        .filter(|t| !t.is_empty())
        .map(|t| hookrun_crds::token::digest(&t));
    let previous = match (
        text(secret_keys::PREVIOUS_TOKEN).filter(|t| !t.is_empty()),
        text(secret_keys::PREVIOUS_TOKEN_EXPIRES_AT),
    ) {
        (Some(token), Some(expiry)) => expiry
            .trim()
            .parse::<k8s_openapi::jiff::Timestamp>()
            .ok()
            .map(|at| ExpiringDigest {
                digest: hookrun_crds::token::digest(&token),
                expires_at: SystemTime::from(at),
            }),
        _ => None,
    };
    let signing = SignatureScheme::ALL
        .into_iter()
        .filter_map(|s| {
            data.get(s.secret_key())
                .filter(|v| !v.0.is_empty())
                .map(|v| (s, v.0.clone()))
        })
        .collect();
    SecretEntry {
        token,
        previous,
        signing,
    }
}

/// Whether a Session still counts against its Agent's `maxConcurrent`.
pub(crate) fn is_active(session: &Session) -> bool {
    !session
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(SessionPhase::is_finished)
}

/// What the index keeps of a Session: whose it is, whether it runs, and the digest that
/// tells an idempotent replay from a conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SessionEntry {
    pub(crate) agent: AgentKey,
    pub(crate) active: bool,
    pub(crate) payload_digest: Option<String>,
    /// The session key's hash and generation (from the Session's labels), when it was
    /// started for one.
    pub(crate) key: Option<(String, u32)>,
}

pub(super) fn session_entry(session: &Session) -> Option<(AgentKey, SessionEntry)> {
    let namespace = session.namespace()?;
    let name = session.name_any();
    let agent = AgentKey::new(namespace.clone(), session.spec.agent.clone());
    Some((
        AgentKey::new(namespace, name),
        SessionEntry {
            agent,
            active: is_active(session),
            payload_digest: session
                .spec
                .trigger
                .as_ref()
                .and_then(|t| t.payload_digest.clone()),
            key: session_key_labels(session),
        },
    ))
}

/// The session key hash and generation a Session's labels carry.
fn session_key_labels(session: &Session) -> Option<(String, u32)> {
    let labels = session.metadata.labels.as_ref()?;
    let hash = labels.get(names::SESSION_KEY_LABEL)?;
    let generation = labels
        .get(names::SESSION_KEY_GENERATION_LABEL)?
        .parse()
        .ok()?;
    Some((hash.clone(), generation))
}
