//! The checks before a webhook's body is used: the Agent is known and has a webhook, the
//! client address is allowed, the token matches (in constant time), and the signature
//! of the body verifies with one of the Agent's schemes.
use std::net::SocketAddr;
use std::time::SystemTime;

use axum::http::HeaderMap;
use hookrun_crds::agent::SignatureScheme;
use subtle::ConstantTimeEq;

use crate::body::RequestBody;
use crate::client_ip;
use crate::error::HttpError;
use crate::index::{KeyRef, SecretEntry, TargetRef, WebhookTarget};
use crate::signature::{self, SignedRequest, Verified};

use super::AppState;

/// The checks before the body: Agent, address, token.
pub(super) fn authenticate(
    state: &AppState,
    key: KeyRef<'_>,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<WebhookTarget, HttpError> {
    admit(state, key, token, peer, headers, |target| target.shared())
}

/// The checks of [`authenticate`], made under the index's read lock on the entries
/// themselves: a refusal takes no reference to them. `admitted` takes what the caller
/// keeps.
fn admit<T>(
    state: &AppState,
    key: KeyRef<'_>,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
    admitted: impl FnOnce(TargetRef<'_>) -> T,
) -> Result<T, HttpError> {
    let index = state
        .index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !index.is_synced() {
        return Err(HttpError::NotReady);
    }
    let target = index.target(&key).ok_or(HttpError::NotFound)?;
    let (agent, secret) = (target.agent, target.secret);
    if state.trusted_proxies.is_empty() && headers.contains_key("x-forwarded-for") {
        tracing::debug!("X-Forwarded-For ignored: no --trusted-proxies are configured");
    }
    if agent.deny_all {
        return Err(HttpError::AddressNotAllowed);
    }
    if !agent.allow_cidrs.is_empty() {
        let forwarded = client_ip::forwarded_for_values(headers);
        let client = client_ip::resolve_client_ip(peer.ip(), &forwarded, &state.trusted_proxies)
            .map_err(HttpError::BadForwardedFor)?;
        if !client_ip::is_allowed(client, &agent.allow_cidrs) {
            return Err(HttpError::AddressNotAllowed);
        }
    }
    if !token_matches(secret, token, SystemTime::now()) {
        return Err(HttpError::BadToken);
    }
    Ok(admitted(target))
}

/// Whether `presented` is the current token, or the previous one before it expires.
/// Digests are compared in constant time, both always.
pub(super) fn token_matches(
    secret: &SecretEntry,
    presented: Option<&str>,
    now: SystemTime,
) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let digest = hookrun_crds::token::digest(presented);
    let current = secret
        .token
        .map_or(subtle::Choice::from(0), |t| t.ct_eq(&digest));
    let previous = secret
        .previous
        .as_ref()
        .map_or(subtle::Choice::from(0), |p| {
            p.digest.ct_eq(&digest) & subtle::Choice::from(u8::from(now < p.expires_at))
        });
    bool::from(current | previous)
}

pub(super) fn ping(
    state: &AppState,
    key: KeyRef<'_>,
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), HttpError> {
    admit(state, key, token, peer, headers, |_| ())
}

/// 401 when the Agent requires signatures and the request carries none of its schemes'
/// headers.
pub(super) fn require_signature_header(
    target: &WebhookTarget,
    headers: &HeaderMap,
) -> Result<(), HttpError> {
    let schemes = &target.agent.schemes;
    if schemes.is_empty() || schemes.iter().any(|s| carries_signature(headers, *s)) {
        return Ok(());
    }
    let expected = schemes
        .iter()
        .map(|s| signature::signature_header(*s))
        .collect::<Vec<_>>()
        .join(", ");
    Err(HttpError::MissingSignature { expected })
}

fn carries_signature(headers: &HeaderMap, scheme: SignatureScheme) -> bool {
    headers.contains_key(signature::signature_header(scheme))
}

/// Verifies the request with the first of the Agent's schemes whose signature header it
/// carries and that accepts it; `None` when the Agent requires no signature.
pub(super) fn verify_signature(
    target: &WebhookTarget,
    headers: &HeaderMap,
    body: &RequestBody<'_>,
) -> Result<Option<(SignatureScheme, Verified)>, HttpError> {
    let request = SignedRequest {
        headers,
        body,
        now: SystemTime::now(),
    };
    let mut first_error = None;
    let candidates = target
        .agent
        .schemes
        .iter()
        .filter(|s| carries_signature(headers, **s));
    for scheme in candidates {
        let Some(secret) = target.secret.signing.get(scheme) else {
            first_error.get_or_insert(HttpError::SigningSecretPending);
            continue;
        };
        match signature::verifier(*scheme).verify(&request, secret) {
            Ok(verified) => return Ok(Some((*scheme, verified))),
            Err(error) if !error.is_caller_error() => {
                first_error.get_or_insert(HttpError::Misconfigured(error));
            }
            Err(error) => {
                first_error.get_or_insert(HttpError::Signature(error));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(None),
    }
}
