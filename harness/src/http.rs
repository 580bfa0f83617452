//! The one HTTP client the harness uses for the runner API and the model APIs: reqwest
//! with rustls and the compiled-in webpki roots (TLS works in an image with no CA bundle),
//! proxies from the environment for the model APIs, none for the runner API.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// The largest response body read into memory (a model answer is far smaller).
const MAX_RESPONSE_BODY: usize = 16 * 1024 * 1024;

/// A request that got no HTTP answer: bad URL, connection refused, TLS failure, timeout,
/// or a body that could not be read. Always worth a retry except for a bad URL.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URL does not parse; retrying will not help. The URL is kept without its
    /// credentials.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as configured.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// No answer within the time limit.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection, TLS or body read failure.
    #[error("{0}")]
    Io(String),
}

impl TransportError {
    /// Whether trying again could help.
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::InvalidUrl { .. })
    }
}

/// An HTTP answer, body read in full.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The response body.
    pub body: Bytes,
}

/// A cheap-to-clone HTTP(S) client.
#[derive(Clone)]
pub struct HttpClient {
    inner: reqwest::Client,
}

impl HttpClient {
    /// A client for the model providers: HTTPS with the webpki roots, plain HTTP for local
    /// servers, through the proxy the environment names (`HTTPS_PROXY`, `HTTP_PROXY`,
    /// `ALL_PROXY`, with `NO_PROXY` exceptions), as users of HTTP clients expect.
    pub fn new() -> Self {
        Self::build(reqwest::Client::builder())
    }

    /// A client that never goes through a proxy: the runner API is a Service inside the
    /// cluster, which an egress proxy set for the model providers cannot reach.
    pub fn direct() -> Self {
        Self::build(reqwest::Client::builder().no_proxy())
    }

    fn build(builder: reqwest::ClientBuilder) -> Self {
        let inner = builder
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            // Only a TLS backend that fails to load makes this fail; rustls with ring and
            // compiled-in roots always loads.
            .unwrap_or_else(|error| panic!("the HTTP client: {}", describe(&error)));
        Self { inner }
    }

    /// Sends one request with a JSON body (or none) and reads the whole answer.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(HeaderName, HeaderValue)],
        json: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<HttpResponse, TransportError> {
        let invalid = |reason: String| TransportError::InvalidUrl {
            url: crate::redact::scrub(url),
            reason,
        };
        // RFC 3986 first: the WHATWG parser below would quietly percent-encode what is
        // a configuration mistake (a space in a base URL).
        url.parse::<http::Uri>()
            .map_err(|error| invalid(error.to_string()))?;
        let parsed = reqwest::Url::parse(url).map_err(|error| invalid(error.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(invalid(
                "expected an absolute http:// or https:// URL".to_string(),
            ));
        }
        let mut request = self.inner.request(method, parsed);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        if let Some(value) = json {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(value).unwrap_or_default());
        }
        let exchange = async {
            // Without the URL: it may carry credentials, and the caller names the call.
            let mut response = request
                .send()
                .await
                .map_err(|error| TransportError::Io(describe(&error.without_url())))?;
            let status = response.status();
            let headers = std::mem::take(response.headers_mut());
            let mut body = BytesMut::new();
            while let Some(chunk) = response.chunk().await.map_err(|error| {
                TransportError::Io(format!(
                    "reading the answer: {}",
                    describe(&error.without_url())
                ))
            })? {
                if body.len() + chunk.len() > MAX_RESPONSE_BODY {
                    return Err(TransportError::Io(format!(
                        "reading the answer: longer than {MAX_RESPONSE_BODY} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(HttpResponse {
                status,
                headers,
                body: body.freeze(),
            })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(timeout))?
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// The error and its causes on one line (the top-level message alone is vague).
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_outside_rfc_3986_are_refused_before_anything_is_sent() {
        let client = HttpClient::direct();
        for url in [
            "http://127.0.0.1:9/v1 beta",
            "127.0.0.1:9/v1",
            "ftp://127.0.0.1/v1",
        ] {
            let error = client
                .send(Method::GET, url, &[], None, Duration::from_secs(5))
                .await
                .expect_err(url);
            assert!(
                matches!(error, TransportError::InvalidUrl { .. }),
                "{url}: {error}"
            );
            assert!(!error.is_transient(), "{url}");
        }
    }
}
