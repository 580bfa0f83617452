//! The Grant controller: for every Grant, keeps a controller-owned Secret with a 256-bit
//! token and publishes `<public-url>/hook/<token>` and the expiry in its status. A revoked
//! Grant loses its Secret and is listed until its expiry; an expired Grant is deleted.
//!
//! Reconcile reads top to bottom: validate → read the Secret live → decide the state
//! (pure, in [`plan`]) → create or delete the Secret → patch the status if it differs.
//! Every write is conditional on what was read (create fails if the Secret appeared;
//! deletes and the status patch carry the resourceVersion read), so a write held up in a
//! former leader cannot land over its successor's. Writes go through the operator's
//! gated client: only the elected leader makes them.

pub mod plan;

use std::{sync::Arc, time::Duration};

use futures::{Future, StreamExt};
use hookrun_crds::{
    Grant,
    grant::{self, GrantState},
    names,
    token::WebhookToken,
};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector, watcher,
    },
};
use serde_json::json;

use self::plan::{GrantFacts, Outcome};
use crate::{
    agent_controller::{FIELD_MANAGER, LIST_PAGE, backoff},
    cli::PublicUrl,
    error::{Error, Result},
    metrics::Metrics,
};

/// The controller's name in metrics.
pub const CONTROLLER: &str = "grant";
/// How often a Grant that is right is looked at again anyway.
const RESYNC: Duration = Duration::from_secs(3600);
/// Reconciles in flight at once.
const MAX_CONCURRENT_RECONCILES: u16 = 8;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub public_url: PublicUrl,
    pub redact_url_in_status: bool,
    /// The TTL of a Grant without `spec.ttlSeconds`.
    pub default_ttl: Duration,
    /// The longest TTL any Grant gets.
    pub max_ttl: Duration,
    pub metrics: Metrics,
}

/// The Grant controller for one namespace (`None`: all namespaces): the future that runs
/// it until `shutdown`.
pub fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> + Send {
    let (grants, secrets): (Api<Grant>, Api<Secret>) = match namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let (store, writer) = reflector::store();
    let events = reflector::reflector(
        writer,
        watcher(
            grants,
            watcher::Config::default()
                .any_semantic()
                .page_size(LIST_PAGE),
        )
        .default_backoff(),
    )
    .applied_objects();
    Controller::for_stream(events, store)
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES))
        .owns(
            secrets,
            watcher::Config::default()
                .labels(names::GRANT_SECRET_SELECTOR)
                .any_semantic()
                .page_size(LIST_PAGE),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "grant controller event");
            }
        })
}

async fn reconcile(grant: Arc<Grant>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(CONTROLLER);
    reconcile_grant(&grant, &ctx).await
}

/// Comes back a little after `at` (so the Grant is past it when looked at), within
/// [`RESYNC`].
fn requeue_at(at: Timestamp, now: Timestamp) -> Action {
    let left = at.duration_since(now).as_millis().max(0);
    let left = Duration::from_millis(u64::try_from(left).unwrap_or(u64::MAX));
    Action::requeue((left + Duration::from_millis(500)).min(RESYNC))
}

async fn reconcile_grant(grant: &Grant, ctx: &Context) -> Result<Action> {
    let namespace = grant
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let name = grant.name_any();
    if grant.meta().deletion_timestamp.is_some() {
        // The owner reference lets garbage collection remove the Secret.
        return Ok(Action::await_change());
    }
    let uid = grant.uid().ok_or(Error::MissingObjectKey("uid"))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = names::grant_secret_name(&name);
    let now = Timestamp::now();

    if let Err(message) = grant::validate_grant_spec(&grant.spec) {
        write_status(grant, ctx, &Outcome::InvalidSpec { message }, None).await?;
        return Ok(Action::await_change());
    }
    // Read live, not from a cache: a stale cache that lacks the Secret would mint a
    // second token.
    let existing = secrets.get_opt(&secret_name).await?;
    let held = existing
        .as_ref()
        .and_then(|secret| plan::existing_token(secret, &uid));
    let created = grant
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let ttl = grant::effective_ttl(grant.spec.ttl_seconds, ctx.default_ttl, ctx.max_ttl);
    // The expiry is fixed when the token is minted; later edits of the TTL change nothing.
    let expires_at = held
        .as_ref()
        .map(|(_, at)| *at)
        .or_else(|| grant.status.as_ref()?.expires_at.as_ref().map(|t| t.0))
        .unwrap_or_else(|| grant::expires_at(created, ttl));

    match grant::grant_state(&grant.spec, expires_at, now) {
        GrantState::Expired => {
            if held.is_some()
                && let Some(secret) = &existing
            {
                delete_secret(ctx, &secrets, secret).await?;
            }
            let grants: Api<Grant> = Api::namespaced(ctx.client.clone(), &namespace);
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: grant.resource_version(),
                }),
                ..DeleteParams::default()
            };
            match grants.delete(&name, &params).await {
                Ok(_) => {
                    ctx.metrics.wrote(CONTROLLER, "grant_delete");
                    tracing::info!(grant = %name, %namespace, "grant expired: deleted it");
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error.into()),
            }
            Ok(Action::await_change())
        }
        GrantState::Revoked => {
            if held.is_some()
                && let Some(secret) = &existing
            {
                delete_secret(ctx, &secrets, secret).await?;
                tracing::info!(grant = %name, %namespace, "grant revoked: deleted its token");
            }
            write_status(grant, ctx, &Outcome::Revoked, Some(expires_at)).await?;
            Ok(requeue_at(expires_at, now))
        }
        GrantState::Active => {
            let token = match (held, existing) {
                (Some((token, _)), _) => token,
                (None, Some(_)) => {
                    tracing::warn!(grant = %name, %namespace, secret = %secret_name, "a Secret hookrun does not control has the Grant's Secret name; leaving it alone");
                    let outcome = Outcome::SecretNameTaken { secret_name };
                    write_status(grant, ctx, &outcome, Some(expires_at)).await?;
                    return Ok(Action::requeue(Duration::from_secs(60)));
                }
                (None, None) => {
                    let token = WebhookToken::generate().map_err(Error::Randomness)?;
                    let owner = grant
                        .controller_owner_ref(&())
                        .ok_or(Error::MissingObjectKey("uid"))?;
                    let facts = GrantFacts {
                        name: &name,
                        namespace: &namespace,
                        session: &grant.spec.session,
                        owner,
                        expires_at,
                    };
                    let secret = plan::token_secret(&facts, &token, ctx.public_url.as_str());
                    let params = PostParams {
                        field_manager: Some(FIELD_MANAGER.to_owned()),
                        ..PostParams::default()
                    };
                    // Fails with 409 if the Secret appeared since it was read: the next
                    // reconcile reads the token that won.
                    secrets.create(&params, &secret).await?;
                    ctx.metrics.wrote(CONTROLLER, "secret_write");
                    tracing::info!(grant = %name, %namespace, session = %grant.spec.session, expires_at = %expires_at, "minted a grant token");
                    token
                }
            };
            let shown = if ctx.redact_url_in_status {
                names::REDACTED_TOKEN
            } else {
                token.expose()
            };
            let url = names::hook_url(ctx.public_url.as_str(), shown);
            write_status(grant, ctx, &Outcome::Active { url }, Some(expires_at)).await?;
            Ok(requeue_at(expires_at, now))
        }
    }
}

/// Deletes the Grant's token Secret, conditional on the version read.
async fn delete_secret(ctx: &Context, secrets: &Api<Secret>, secret: &Secret) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: secret.uid(),
            resource_version: secret.resource_version(),
        }),
        ..DeleteParams::default()
    };
    match secrets.delete(&secret.name_any(), &params).await {
        Ok(_) => {
            ctx.metrics.wrote(CONTROLLER, "secret_delete");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Patches the status if it differs from what the Grant shows, conditional on the
/// resourceVersion read.
async fn write_status(
    grant: &Grant,
    ctx: &Context,
    outcome: &Outcome,
    expires_at: Option<Timestamp>,
) -> Result<()> {
    let desired = plan::desired_status(
        grant.status.as_ref(),
        outcome,
        expires_at,
        grant.meta().generation,
        Timestamp::now(),
    );
    if grant.status.as_ref() == Some(&desired) {
        return Ok(());
    }
    let namespace = grant
        .namespace()
        .ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<Grant> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut body = serde_json::to_value(&desired).map_err(|source| Error::Serialize {
        what: "status",
        source,
    })?;
    if let Some(map) = body.as_object_mut()
        && desired.url.is_none()
    {
        // A merge patch leaves out what it does not name: clear the URL explicitly.
        map.insert("url".to_owned(), serde_json::Value::Null);
    }
    api.patch_status(
        &grant.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": { "resourceVersion": grant.resource_version() },
            "status": body,
        })),
    )
    .await?;
    ctx.metrics.wrote(CONTROLLER, "status_patch");
    Ok(())
}

fn error_policy(grant: Arc<Grant>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_failed(CONTROLLER, error.metric_label());
    // Conflicts are the common error (another write landed first): retry soon.
    let delay = backoff(1);
    tracing::warn!(grant = %grant.name_any(), namespace = ?grant.namespace(), %error, retry_in = ?delay, "grant reconcile failed");
    Action::requeue(delay)
}
