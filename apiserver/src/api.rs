//! What the runner API ([`crate::runner`]) and the read API ([`crate::read`]) share: the
//! cluster client, their state, and the bearer token of a request.

use std::sync::Arc;

use axum::http::{HeaderMap, header};
use kube::Client;

use crate::auth::Authenticator;
use crate::client_ip::TrustedProxies;
use crate::hub::SessionHub;
use crate::index::SharedIndex;
use crate::metrics::Metrics;
use crate::rate_limit::RateLimit;
use crate::session_status::StatusWriter;

/// The largest body the runner API reads.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the runner and read routers share.
#[derive(Clone)]
pub struct ApiState {
    /// The one Kubernetes client, built at start.
    pub(crate) client: Client,
    pub(crate) auth: Arc<Authenticator>,
    pub(crate) hub: Arc<SessionHub>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) status: Arc<StatusWriter>,
    /// Whose `X-Forwarded-For` names the client whose review attempts are counted.
    pub(crate) trusted_proxies: Arc<TrustedProxies>,
    /// The watched index, once wired: the runner API reads Agents from it.
    pub(crate) index: Option<SharedIndex>,
}

impl ApiState {
    /// A state with fresh caches over `client`, `hub` and `metrics`, no trusted proxy
    /// and the default review limit.
    pub fn new(client: Client, hub: Arc<SessionHub>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            auth: Arc::new(Authenticator::new(
                metrics.clone(),
                crate::auth::default_review_limit(),
            )),
            hub,
            metrics,
            status: Arc::new(StatusWriter::default()),
            trusted_proxies: Arc::new(TrustedProxies::none()),
            index: None,
        }
    }

    /// The same state, reading Agents from `index` instead of the cluster.
    pub(crate) fn with_index(mut self, index: SharedIndex) -> Self {
        self.index = Some(index);
        self
    }

    /// The same state, with the client address read through `trusted_proxies` and
    /// denied read callers limited to `reviews` reviews per address.
    pub(crate) fn with_review_limit(
        mut self,
        trusted_proxies: TrustedProxies,
        reviews: RateLimit,
    ) -> Self {
        self.auth = Arc::new(Authenticator::new(self.metrics.clone(), reviews));
        self.trusted_proxies = Arc::new(trusted_proxies);
        self
    }
}

/// A client whose cluster refuses every connection, for handler tests: every call that
/// reaches it fails like a cluster that is down.
#[cfg(test)]
pub(crate) fn unreachable_client() -> Client {
    let url = "http://127.0.0.1:1".parse().expect("a URL");
    Client::try_from(kube::Config::new(url)).expect("a client")
}

/// The credential in `Authorization: Bearer <token>`, if one is there.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  x.y "),
        );
        assert_eq!(bearer_token(&headers), Some("x.y"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }
}
