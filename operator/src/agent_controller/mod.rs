//! The Agent controller: for every Agent with a webhook trigger, keeps a controller-owned
//! Secret with its token, URL and signing secrets, and publishes the URL in its status.
//!
//! Reconcile is a pipeline: validate → resolve signing secrets → build the Secret (pure,
//! in [`secret`]) → apply it only if it differs → build the status (pure, in [`status`])
//! → patch it only if it differs. A reconcile that finds everything right writes nothing.

pub mod secret;
pub mod status;

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Future, Stream, StreamExt};
use hookrun_crds::{
    Agent, AgentStatus,
    duration::FlagDuration,
    names::{self, ROTATE_TOKEN_ANNOTATION, ROTATION_GRACE_ANNOTATION},
    token::WebhookToken,
    validation::validate_agent_spec,
};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, PartialObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde_json::json;

use self::{
    secret::{AgentFacts, MissingRef, SecretClaim, TokenChange},
    status::Outcome,
};
use crate::{
    cli::PublicUrl,
    error::{Error, Result},
    events::{Event, EventType, Recorder},
    metrics::Metrics,
    pod_policy,
    policy_guard::{self, PolicyGuard, SecretMeta},
};

/// The controller's name in metrics and Events.
pub const CONTROLLER: &str = "agent";
/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "hookrun-operator";
/// The grace period of a graceful rotation when the Agent does not set one.
pub const DEFAULT_ROTATION_GRACE: Duration = Duration::from_secs(600);
/// Reconciles in flight at once. Each may hold an API connection (with its TLS
/// buffers) open; unbounded, a burst of 1000 Agents opened hundreds of them and the
/// pool kept them, which cost ~50 KiB of memory per Agent.
const MAX_CONCURRENT_RECONCILES: u16 = 16;
/// How often every Agent is looked at again anyway: one tick for all of them, not a
/// timer per Agent (each of which the controller's scheduler keeps with a copy of the
/// Agent's key, most of a kilobyte apiece).
const RESYNC: Duration = Duration::from_secs(3600);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub public_url: PublicUrl,
    pub redact_url_in_status: bool,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// The pod policy Agents are checked against.
    pub guard: Arc<PolicyGuard>,
    /// Consecutive failures per Agent, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<Agent>, u32>>,
    /// The last status this process wrote per Agent, with the resourceVersion it replaced:
    /// while the cache still shows that version, the write is known to be done.
    written_status: Mutex<HashMap<ObjectRef<Agent>, (String, AgentStatus)>>,
}

impl Context {
    pub fn new(
        client: Client,
        public_url: PublicUrl,
        redact_url_in_status: bool,
        metrics: Metrics,
        recorder: Recorder,
        guard: Arc<PolicyGuard>,
    ) -> Self {
        Self {
            client,
            public_url,
            redact_url_in_status,
            metrics,
            recorder,
            guard,
            failures: Mutex::default(),
            written_status: Mutex::default(),
        }
    }
}

/// The Agent controller for one namespace (`None`: all namespaces). Returns the Agent
/// cache (to wait for its sync) and the future that runs the controller until `shutdown`.
/// `env_secret_changes` (from [`policy_guard::watch`] of the same scope) brings back the
/// Agents that read a Secret whose opt-in changed.
pub fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    env_secret_changes: impl Stream<Item = Result<SecretMeta, watcher::Error>> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Store<Agent>, impl Future<Output = ()> + Send) {
    type Meta = PartialObjectMeta<Secret>;
    let (agents, secrets, secret_meta): (Api<Agent>, Api<Secret>, Api<Meta>) = match namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (
            Api::all(ctx.client.clone()),
            Api::all(ctx.client.clone()),
            Api::all(ctx.client.clone()),
        ),
    };
    let (store, writer) = reflector::store();
    let agent_events = reflector::reflector(
        writer,
        watcher(
            agents,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE),
        )
        .default_backoff()
        .modify(slim),
    )
    .applied_objects();
    let controller = Controller::for_stream(agent_events, store.clone())
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES))
        .reconcile_all_on(crate::ticks(RESYNC));
    let agent_index = store.clone();
    let env_index = store.clone();
    // Referenced Secrets are watched by metadata only (no data of the cluster's other
    // Secrets crosses the wire); a change maps back to the Agents that name them, and to
    // the Agent whose webhook Secret name it has (a user's Secret there blocks it until
    // it goes, and the managed-label watch does not see that one).
    let controller = controller
        .owns(
            secrets,
            watcher::Config::default()
                .labels(names::MANAGED_SECRET_SELECTOR)
                .any_semantic()
                .page_size(LIST_PAGE),
        )
        .watches(
            secret_meta,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE),
            move |secret: Meta| {
                let (ns, name) = (secret.namespace(), secret.name_any());
                agent_index
                    .state()
                    .into_iter()
                    .filter(|agent| {
                        agent.namespace() == ns
                            && (references_secret(agent, &name)
                                || names::webhook_secret_name(&agent.name_any()) == name)
                    })
                    .map(|agent| ObjectRef::from_obj(&*agent))
                    .collect::<Vec<_>>()
            },
        )
        .watches_stream(env_secret_changes, move |secret: SecretMeta| {
            let (ns, name) = (secret.namespace(), secret.name_any());
            env_index
                .state()
                .into_iter()
                .filter(|agent| {
                    agent.namespace() == ns && policy_guard::reads_env_secret(agent, &name)
                })
                .map(|agent| ObjectRef::from_obj(&*agent))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown);
    let runner = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                // A watch that fails is retried with backoff; say so, since decisions
                // (and the Session controller's pod policy) wait for its cache.
                Err(controller::Error::QueueError(error)) => {
                    tracing::warn!(%error, "a watch of the agent controller failed; retrying")
                }
                Err(error) => tracing::debug!(%error, "agent controller event"),
                Ok(_) => {}
            }
        });
    (store, runner)
}

/// Objects per page of the initial lists and relists: a page is held whole while it is
/// decoded, so small pages keep a start with many Agents and Secrets from peaking (the
/// allocator seldom gives such a peak back).
pub(crate) const LIST_PAGE: u32 = 25;

/// The annotation `kubectl apply` keeps a whole copy of the last applied manifest in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Keeps in the cache what reconciling reads: the spec, status and own annotations; not
/// the managed fields or kubectl's copy of the manifest, which double an Agent's size.
fn slim(agent: &mut Agent) {
    agent.metadata.managed_fields = None;
    if let Some(annotations) = agent.metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

fn references_secret(agent: &Agent, secret: &str) -> bool {
    agent.spec.webhook().is_some_and(|w| {
        secret::referenced_secrets(w)
            .iter()
            .any(|r| r.name == secret)
    })
}

/// The grace period an Agent asks for, or why its annotation is wrong.
fn rotation_grace(agent: &Agent) -> Result<Duration, String> {
    match agent.annotations().get(ROTATION_GRACE_ANNOTATION) {
        None => Ok(DEFAULT_ROTATION_GRACE),
        Some(value) => value
            .parse::<FlagDuration>()
            .map(|d| d.0)
            .map_err(|error| format!("metadata.annotations[{ROTATION_GRACE_ANNOTATION}]: {error}")),
    }
}

/// The path of the Agent's webhook trigger, for messages.
fn webhook_path(agent: &Agent) -> String {
    let index = agent
        .spec
        .triggers
        .iter()
        .position(|t| t.webhook.is_some())
        .unwrap_or(0);
    format!("spec.triggers[{index}].webhook")
}

async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    let result = reconcile_agent(&agent, &ctx).await;
    if result.is_ok()
        && let Ok(mut failures) = ctx.failures.lock()
    {
        failures.remove(&ObjectRef::from_obj(&*agent));
    }
    result
}

async fn reconcile_agent(agent: &Agent, ctx: &Context) -> Result<Action> {
    let namespace = agent
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let name = agent.name_any();
    if agent.meta().deletion_timestamp.is_some() {
        // The owner reference lets garbage collection remove the Secret.
        return Ok(Action::await_change());
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = names::webhook_secret_name(&name);
    // A right Agent waits for a change, or for the next resync tick.
    let mut action = Action::await_change();

    let spec_check = validate_agent_spec(&agent.spec)
        .map_err(|errors| errors.to_string())
        .and_then(|()| rotation_grace(agent))
        .map_err(|message| Outcome::InvalidSpec { message })
        .and_then(|grace| {
            crate::schedule::check_schedules(&agent.spec)
                .map(|()| grace)
                .map_err(|message| Outcome::InvalidSchedule { message })
        });
    let outcome = match (spec_check, agent.spec.webhook()) {
        (Err(outcome), _) => {
            action = Action::await_change();
            outcome
        }
        (Ok(_), None) => {
            remove_secret(agent, ctx, &secrets, &secret_name).await?;
            Outcome::NoWebhookTrigger
        }
        (Ok(grace), Some(webhook)) => {
            let wanted: BTreeSet<&str> = secret::referenced_secrets(webhook)
                .iter()
                .map(|r| r.name.as_str())
                .collect();
            let mut referenced = HashMap::new();
            for wanted_name in wanted {
                referenced.insert(wanted_name, secrets.get_opt(wanted_name).await?);
            }
            let resolved =
                secret::resolve_available_signing_secrets(webhook, &webhook_path(agent), |n| {
                    referenced.get(n).and_then(Option::as_ref)
                });
            // With a reference missing, an existing Secret still loses the copy of that
            // signing secret (deleting it revokes it), but no new token is minted.
            let mint = resolved.missing.is_empty();
            let applied = apply_secret(
                agent,
                ctx,
                &secrets,
                &secret_name,
                grace,
                &resolved.signing,
                mint,
            )
            .await?;
            let (outcome, requeue) = applied.unwrap_or((Outcome::NoWebhookTrigger, None));
            if let Some(requeue) = requeue {
                action = Action::requeue(requeue.min(RESYNC));
            }
            match (&outcome, resolved.missing.first()) {
                (Outcome::SecretNameTaken { .. }, _) => {
                    // The metadata watch on Secrets brings the Agent back when it goes.
                    action = Action::await_change();
                    outcome
                }
                (_, Some(missing)) => {
                    // The watch on referenced Secrets brings the Agent back when it appears.
                    if requeue.is_none() {
                        action = Action::await_change();
                    }
                    secret_ref_missing(&name, missing)
                }
                (_, None) => outcome,
            }
        }
    };

    let violations = ctx.guard.violations(agent).await;
    let outcome = match outcome {
        Outcome::WebhookReady { status_url, .. } if !violations.is_empty() => {
            Outcome::PolicyViolation {
                message: pod_policy::describe(&violations),
                status_url: Some(status_url),
            }
        }
        Outcome::NoWebhookTrigger if !violations.is_empty() => Outcome::PolicyViolation {
            message: pod_policy::describe(&violations),
            status_url: None,
        },
        other => other,
    };
    let outcome = expression_outcome(agent, outcome);
    write_status(agent, ctx, &outcome).await?;
    Ok(action)
}

/// A webhook whose expressions do not compile is not ready: the URL stays published (so
/// the door can answer its callers that the Agent is misconfigured) and the condition
/// names the field and the parser's message.
fn expression_outcome(agent: &Agent, outcome: Outcome) -> Outcome {
    let status_url = match &outcome {
        Outcome::WebhookReady { status_url, .. } => Some(status_url.clone()),
        // What keeps the webhook from working at all is reported first.
        _ => return outcome,
    };
    match check_expressions(agent) {
        Ok(()) => outcome,
        Err(message) => Outcome::InvalidExpression {
            message,
            status_url,
        },
    }
}

/// Compiles the webhook trigger's expressions as the apiserver will.
pub(crate) fn check_expressions(agent: &Agent) -> Result<(), String> {
    let Some(webhook) = agent.spec.webhook() else {
        return Ok(());
    };
    let agent_env: Vec<String> = agent
        .spec
        .session
        .as_ref()
        .map(|s| s.env.iter().map(|e| e.name.clone()).collect())
        .unwrap_or_default();
    hookrun_crds::expression::compile_trigger(&webhook_path(agent), webhook, &agent_env)
        .map(drop)
        .map_err(|error| error.to_string())
}

fn secret_ref_missing(agent: &str, missing: &MissingRef) -> Outcome {
    tracing::info!(agent, secret = %missing.secret, key = %missing.key, "referenced signing secret is missing");
    Outcome::SecretRefMissing {
        message: format!(
            "{}; until then webhooks that need this signing secret are refused (the \
             operator removed its copy)",
            missing.message()
        ),
    }
}

/// Builds the managed Secret and applies it if it differs from the one that exists.
/// Returns the outcome and, when a previous token is kept, when to come back to drop it;
/// `None` when there is no Secret and `mint` is false.
async fn apply_secret(
    agent: &Agent,
    ctx: &Context,
    secrets: &Api<Secret>,
    secret_name: &str,
    rotation_grace: Duration,
    signing: &std::collections::BTreeMap<String, Vec<u8>>,
    mint: bool,
) -> Result<Option<(Outcome, Option<Duration>)>> {
    let name = agent.name_any();
    let namespace = agent
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let owner = agent
        .controller_owner_ref(&())
        .ok_or(Error::MissingObjectKey("uid"))?;
    // Read live, not from a cache: a stale cache that lacks the Secret would mint a new
    // token, and an existing token must never be replaced by accident.
    let existing = secrets.get_opt(secret_name).await?;
    match secret::secret_claim(existing.as_ref().map(|s| &s.metadata), &owner.uid) {
        SecretClaim::Absent if !mint => return Ok(None),
        SecretClaim::Absent | SecretClaim::Controlled | SecretClaim::Unclaimed => {}
        SecretClaim::OwnedElsewhere => {
            return Err(Error::SecretOwnedElsewhere(secret_name.to_owned()));
        }
        SecretClaim::NameTaken => {
            tracing::warn!(agent = %name, %namespace, secret = secret_name, "a Secret hookrun did not create has the webhook Secret's name; leaving it alone");
            let outcome = Outcome::SecretNameTaken {
                secret_name: secret_name.to_owned(),
            };
            return Ok(Some((outcome, None)));
        }
    }
    let facts = AgentFacts {
        name: &name,
        namespace: &namespace,
        owner,
        rotate_token: agent
            .annotations()
            .get(ROTATE_TOKEN_ANNOTATION)
            .map(String::as_str),
        rotation_grace,
    };
    let now = Timestamp::now();
    let plan = secret::plan_secret(
        &facts,
        existing.as_ref(),
        signing,
        ctx.public_url.as_str(),
        now,
        WebhookToken::generate,
    )
    .map_err(Error::Randomness)?;

    if secret::secret_needs_write(&plan.secret, existing.as_ref()) {
        // Both writes are conditional: create fails if the Secret appeared since it was
        // read, replace if it changed. Either way the token that wins is the one the
        // next reconcile reads, never one a stalled writer held on to.
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match &existing {
            None => secrets.create(&params, &plan.secret).await?,
            Some(existing) => {
                let next = secret::replacement(&plan.secret, existing);
                secrets.replace(secret_name, &params, &next).await?
            }
        };
        ctx.metrics.wrote(CONTROLLER, "secret_write");
        match plan.change {
            TokenChange::Created => {
                tracing::info!(agent = %name, %namespace, secret = secret_name, "minted a webhook token");
                publish(
                    ctx,
                    agent,
                    EventType::Normal,
                    "TokenCreated",
                    "Provision",
                    format!("minted a new webhook token in Secret {secret_name:?}"),
                )
                .await;
            }
            TokenChange::Rotated => {
                let until = plan
                    .previous_expires_at
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "now".to_owned());
                tracing::info!(agent = %name, %namespace, secret = secret_name, previous_valid_until = %until, "rotated the webhook token");
                publish(ctx, agent, EventType::Normal, "TokenRotated", "Rotate", format!(
                    "rotated the webhook token in Secret {secret_name:?}; the previous token stays valid until {until}"
                ))
                .await;
            }
            TokenChange::Kept => {
                tracing::info!(agent = %name, %namespace, secret = secret_name, "updated the webhook Secret");
            }
        }
    }

    let requeue = plan.previous_expires_at.map(|expires| {
        let left = expires.duration_since(now).as_millis().max(0);
        // A little after expiry, so that the token is gone when we look.
        Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX)) + Duration::from_millis(500)
    });
    let token = if ctx.redact_url_in_status {
        names::REDACTED_TOKEN
    } else {
        plan.token.expose()
    };
    let outcome = Outcome::WebhookReady {
        status_url: names::webhook_url(ctx.public_url.as_str(), &namespace, &name, token),
        secret_name: secret_name.to_owned(),
        redacted: ctx.redact_url_in_status,
    };
    Ok(Some((outcome, requeue)))
}

/// Deletes the managed Secret of an Agent that no longer has a webhook trigger.
async fn remove_secret(
    agent: &Agent,
    ctx: &Context,
    secrets: &Api<Secret>,
    secret_name: &str,
) -> Result<()> {
    let Some(existing) = secrets.get_metadata_opt(secret_name).await? else {
        return Ok(());
    };
    // Only the operator's own Secret goes: a user's Secret of the same name stays.
    let uid = agent.uid().unwrap_or_default();
    if secret::secret_claim(Some(&existing.metadata), &uid) != SecretClaim::Controlled {
        return Ok(());
    }
    match secrets.delete(secret_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => return Err(error.into()),
    }
    ctx.metrics.wrote(CONTROLLER, "secret_delete");
    tracing::info!(agent = %agent.name_any(), secret = secret_name, "webhook trigger removed: deleted its Secret");
    publish(
        ctx,
        agent,
        EventType::Normal,
        "WebhookRemoved",
        "Deprovision",
        format!(
            "the webhook trigger was removed: deleted Secret {secret_name:?} and cleared the URL"
        ),
    )
    .await;
    Ok(())
}

/// Patches the status if it differs from what the Agent shows.
async fn write_status(agent: &Agent, ctx: &Context, outcome: &Outcome) -> Result<()> {
    let key = ObjectRef::from_obj(agent);
    let seen_version = agent.resource_version().unwrap_or_default();
    let last_written = ctx.written_status.lock().ok().and_then(|mut written| {
        // Once the cache has moved past our write, the entry has done its job: drop it so
        // the map holds only writes the cache has not caught up with.
        if written
            .get(&key)
            .is_some_and(|(replaced, _)| *replaced != seen_version)
        {
            written.remove(&key);
        }
        written.get(&key).cloned()
    });
    let current = status::baseline(&seen_version, agent.status.as_ref(), last_written.as_ref());
    let desired =
        status::desired_status(current, outcome, agent.meta().generation, Timestamp::now());
    if !status::status_needs_write(&desired, current) {
        return Ok(());
    }

    let namespace = agent
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &namespace);
    let body = serde_json::to_value(&desired).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })?;
    let mut body = body;
    if let Some(map) = body.as_object_mut() {
        // A merge patch leaves out what it does not name: clear the URL explicitly.
        if desired.webhook_url.is_none() {
            map.insert("webhookUrl".to_owned(), serde_json::Value::Null);
        }
        // The scheduler writes these; a copy from this cache could be older than its write.
        map.remove("schedules");
        map.remove("nextScheduleTime");
    }
    // The resourceVersion read makes the patch conditional: refused with 409 if the Agent
    // changed since, so a write held up (a frozen former leader) cannot land over a newer
    // one. The next reconcile starts from the newer version.
    api.patch_status(
        &agent.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": { "resourceVersion": seen_version },
            "status": body,
        })),
    )
    .await?;
    ctx.metrics.wrote(CONTROLLER, "status_patch");
    if let Ok(mut written) = ctx.written_status.lock() {
        written.insert(key, (seen_version, desired.clone()));
    }

    let previous_reason = agent
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == status::READY))
        .map(|c| c.reason.as_str());
    let reason = outcome.reason();
    if previous_reason != Some(reason.as_str()) && !reason.is_ready() {
        tracing::warn!(agent = %agent.name_any(), %namespace, reason = reason.as_str(), detail = %outcome.message(), "agent is not ready");
        publish(
            ctx,
            agent,
            EventType::Warning,
            reason.as_str(),
            "Reconcile",
            outcome.message(),
        )
        .await;
    }
    Ok(())
}

/// Publishes an Event about an Agent. An Event that cannot be written is logged, not
/// retried: it must not hold up the reconcile.
async fn publish(
    ctx: &Context,
    agent: &Agent,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    match ctx.recorder.publish(&event, &agent.object_ref(&())).await {
        Ok(()) => ctx.metrics.wrote(CONTROLLER, "event"),
        Err(error) => {
            tracing::warn!(agent = %agent.name_any(), %error, "could not publish an event")
        }
    }
}

/// Requeues a failed reconcile with a per-Agent exponential backoff (0.5 s doubling up to
/// 5 min).
fn error_policy(agent: Arc<Agent>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    let attempts = match ctx.failures.lock() {
        Ok(mut failures) => {
            let n = failures.entry(ObjectRef::from_obj(&*agent)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let delay = backoff(attempts);
    tracing::warn!(agent = %agent.name_any(), namespace = ?agent.namespace(), %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay before retry number `attempts`.
pub fn backoff(attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(10);
    (Duration::from_millis(500) * 2u32.pow(exponent)).min(Duration::from_secs(300))
}

#[cfg(test)]
mod tests;
