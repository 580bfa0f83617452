//! The Agent's CEL expressions on a signed request, before anything is stored: the
//! `filter` (false answers 202 `{"filtered": true}` and gives the rate token back), the
//! `title` (an error falls back to the built-in title, counted) and the `env` mappings (an
//! error or a null leaves the variable unset). The programs were compiled when the index
//! took the Agent in; nothing is compiled here.
use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use hookrun_crds::agent::FilterErrorPolicy;
use hookrun_crds::expression::{Reads, Variables, form_fields};
use hookrun_crds::session::SessionEnvVar;
use serde_json::{Value, json};

use crate::body::RequestBody;
use crate::error::HttpError;
use crate::index::{AgentKey, WebhookTarget};
use crate::metrics::AgentLabels;

use super::AppState;
use super::routes::Answered;

/// What the expressions made of a request that passed the filter.
#[derive(Debug, Default)]
pub(super) struct Mapped {
    /// The title from `title`, when it has one and it evaluated.
    pub(super) title: Option<String>,
    /// The variables from `env` that evaluated.
    pub(super) env: Vec<SessionEnvVar>,
    /// The conversation the request belongs to, from `sessionKey`, when it evaluated to
    /// a non-empty string.
    pub(super) session_key: Option<String>,
}

/// Whether the request goes on, and with what.
pub(super) enum Decision {
    Pass(Mapped),
    Filtered(Answered),
}

/// Runs the Agent's expressions on the request. `provider` is the scheme that verified
/// the signature (`None` for none). 500 `agent_misconfigured` when an expression does
/// not compile; 413 when the body is over the payload budget (expressions read only
/// bodies that could be stored).
pub(super) fn decide(
    state: &AppState,
    key: &AgentKey,
    target: &WebhookTarget,
    headers: &HeaderMap,
    body: &RequestBody<'_>,
    payload: &str,
    provider: Option<&'static str>,
) -> Result<Decision, HttpError> {
    let expressions = match &target.agent.expressions {
        Ok(expressions) if expressions.is_empty() => return Ok(Decision::Pass(Mapped::default())),
        Ok(expressions) => expressions,
        Err(error) => return Err(HttpError::BadExpression(error.clone())),
    };
    target
        .agent
        .input
        .budgets
        .check_payload(payload)
        .map_err(HttpError::OverBudget)?;
    let variables = variables(&expressions.reads, key, headers, body, provider);
    if let Some(filter) = &expressions.filter {
        let (pass, error) = match filter.evaluate_bool(&variables) {
            Ok(pass) => (pass, None),
            Err(error) => (
                expressions.filter_error_policy == FilterErrorPolicy::Accept,
                Some(error),
            ),
        };
        if !pass {
            state.metrics.filtered.get_or_create(&labels(key)).inc();
            tracing::debug!(agent = %key.name, namespace = %key.namespace, error = error.as_deref(), "webhook filtered");
            return Ok(Decision::Filtered(filtered(key, error)));
        }
    }
    let mut mapped = Mapped::default();
    if let Some(title) = &expressions.title {
        match title.evaluate_text(&variables) {
            Ok(text) if !text.trim().is_empty() => mapped.title = Some(text),
            result => {
                state
                    .metrics
                    .title_fallbacks
                    .get_or_create(&labels(key))
                    .inc();
                tracing::debug!(agent = %key.name, namespace = %key.namespace, error = result.err().as_deref(), "title expression fell back to the built-in title");
            }
        }
    }
    for (name, expression) in &expressions.env {
        match expression.evaluate_text(&variables) {
            Ok(value) => mapped.env.push(SessionEnvVar {
                name: name.clone(),
                value,
            }),
            Err(error) => {
                tracing::debug!(agent = %key.name, variable = %name, %error, "env expression left its variable unset");
            }
        }
    }
    if let Some(session_key) = &expressions.session_key {
        match session_key.evaluate_text(&variables) {
            Ok(text) if !text.is_empty() => mapped.session_key = Some(text),
            result => {
                tracing::debug!(agent = %key.name, namespace = %key.namespace, error = result.err().as_deref(), "sessionKey gave no key: an unkeyed Session starts");
            }
        }
    }
    Ok(Decision::Pass(mapped))
}

/// `body`, `headers`, `provider` and `agent` of one request.
pub(crate) fn variables(
    reads: &Reads,
    key: &AgentKey,
    headers: &HeaderMap,
    body: &RequestBody<'_>,
    provider: Option<&'static str>,
) -> Variables {
    let form;
    let json = match body.json() {
        Ok(value) => value,
        Err(_) if is_form(headers) => {
            form = form_fields(body.bytes()).unwrap_or(Value::Null);
            &form
        }
        Err(_) => &Value::Null,
    };
    let header_pairs = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
    Variables::new(
        reads,
        json,
        header_pairs,
        provider.unwrap_or("none"),
        &key.namespace,
        &key.name,
    )
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

fn labels(key: &AgentKey) -> AgentLabels {
    AgentLabels {
        namespace: key.namespace.clone(),
        agent: key.name.clone(),
    }
}

/// 202 `{"filtered": true, "agentDefinition", "filterError"?}`: a 2xx, so that providers
/// do not retry an event the Agent does not want.
fn filtered(key: &AgentKey, error: Option<String>) -> Answered {
    let mut body = json!({"filtered": true, "agentDefinition": key.name});
    if let Some(error) = error {
        body["filterError"] = Value::String(error);
    }
    (
        (StatusCode::ACCEPTED, Json(body)).into_response(),
        "filtered",
    )
}

/// Puts the mapped variables into `env`: a mapped variable replaces one the caller sent.
pub(super) fn merge_env(env: &mut Vec<SessionEnvVar>, mapped: Vec<SessionEnvVar>) {
    for var in mapped {
        env.retain(|e| e.name != var.name);
        env.push(var);
    }
}
