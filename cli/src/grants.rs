//! `expose`, `grants` and `revoke`: capability URLs into live Sessions.

use std::process::ExitCode;

use anyhow::Context as _;
use hookrun_crds::Grant;
use hookrun_crds::grant::GrantState;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;

use crate::cli::{ExposeArgs, RevokeArgs};
use crate::context::{Context, Output};
use crate::ops::{self, explain, is_not_found};
use crate::output::{Style, age, print_value, render_table};
use crate::parse::whole_seconds;

/// `kubectl hookrun expose SESSION`: a Grant for the Session, its full URL printed.
pub async fn expose(ctx: &Context, args: &ExposeArgs) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let sessions: Api<hookrun_crds::Session> = Api::namespaced(ctx.client.clone(), ns);
    let session = sessions
        .get_opt(&args.session)
        .await
        .map_err(|e| explain(e, "get", "sessions.hookrun.dev", ns))?
        .with_context(|| format!("no Session {:?} in namespace {ns}", args.session))?;
    if session.status.as_ref().is_some_and(|s| s.is_finished()) {
        anyhow::bail!(
            "the Session {} has finished: a Grant into it could send nothing",
            args.session
        );
    }
    let grant = ops::create_grant(
        ctx,
        &args.session,
        args.ttl.map(whole_seconds),
        args.label.as_deref(),
    )
    .await?;
    let name = grant.name_any();
    let url = ops::grant_url(ctx, &name).await?;
    let expires = grant
        .status
        .as_ref()
        .and_then(|s| s.expires_at.as_ref())
        .map(|t| t.0.to_string());
    match ctx.output {
        Output::Table => {
            println!("{url}");
            eprintln!(
                "grant/{name} speaks into session/{} until {}; `kubectl hookrun revoke {name}` ends it",
                args.session,
                expires.as_deref().unwrap_or("its TTL passes")
            );
        }
        output => print_value(
            output,
            &json!({"grant": name, "session": args.session, "url": url, "expiresAt": expires}),
        )?,
    }
    Ok(ExitCode::SUCCESS)
}

/// One row of `grants` (never the URL: it is a credential).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantRow {
    pub name: String,
    pub session: String,
    pub label: Option<String>,
    pub expires_at: Option<String>,
    pub revoked: bool,
    /// `Active`, `Revoked` or `Expired`; `Pending` before the operator minted it.
    pub state: String,
}

fn grant_row(grant: &Grant, now: Timestamp) -> GrantRow {
    let expires = grant.status.as_ref().and_then(|s| s.expires_at.as_ref());
    let state = match expires {
        Some(at) => match hookrun_crds::grant::grant_state(&grant.spec, at.0, now) {
            GrantState::Active => "Active",
            GrantState::Revoked => "Revoked",
            GrantState::Expired => "Expired",
        },
        None if grant.spec.revoked => "Revoked",
        None => "Pending",
    };
    GrantRow {
        name: grant.name_any(),
        session: grant.spec.session.clone(),
        label: grant.spec.label.clone(),
        expires_at: expires.map(|t| t.0.to_string()),
        revoked: grant.spec.revoked,
        state: state.to_owned(),
    }
}

/// `kubectl hookrun grants`.
pub async fn list(ctx: &Context) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let grants: Api<Grant> = Api::namespaced(ctx.client.clone(), ns);
    let mut items = grants
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, "list", "grants.hookrun.dev", ns))?
        .items;
    items.sort_by_key(|g| (g.creation_timestamp().map(|t| t.0), g.name_any()));
    let now = Timestamp::now();
    let rows: Vec<GrantRow> = items.iter().map(|g| grant_row(g, now)).collect();
    match ctx.output {
        Output::Table if rows.is_empty() => eprintln!("No Grants in {ns}."),
        Output::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .zip(&items)
                .map(|(r, g)| {
                    vec![
                        r.name.clone(),
                        r.session.clone(),
                        r.state.clone(),
                        r.label.clone().unwrap_or_else(|| "-".to_owned()),
                        r.expires_at.clone().unwrap_or_else(|| "-".to_owned()),
                        g.creation_timestamp()
                            .map_or("-".to_owned(), |t| age(t.0, now)),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &["NAME", "SESSION", "STATE", "LABEL", "EXPIRES", "AGE"],
                    &cells,
                    Style::detect()
                )
            );
        }
        output => print_value(output, &rows)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `kubectl hookrun revoke GRANT`: `spec.revoked: true`.
pub async fn revoke(ctx: &Context, args: &RevokeArgs) -> anyhow::Result<ExitCode> {
    let ns = &ctx.namespace;
    let grants: Api<Grant> = Api::namespaced(ctx.client.clone(), ns);
    let patched = grants
        .patch(
            &args.grant,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"revoked": true}})),
        )
        .await;
    let grant = match patched {
        Ok(grant) => grant,
        Err(e) if is_not_found(&e) => {
            anyhow::bail!("no Grant {:?} in namespace {ns}", args.grant)
        }
        Err(e) => return Err(explain(e, "patch", "grants.hookrun.dev", ns)),
    };
    match ctx.output {
        Output::Table => println!(
            "grant/{} revoked: its URL no longer works",
            grant.name_any()
        ),
        output => print_value(output, &grant_row(&grant, Timestamp::now()))?,
    }
    Ok(ExitCode::SUCCESS)
}
