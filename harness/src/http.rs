//! The one HTTP client the harness uses for the runner API and the model APIs: hyper 1
//! with rustls and the compiled-in webpki roots, so TLS works in an image with no CA
//! bundle.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;

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
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// A client that speaks plain HTTP (the runner API inside the cluster) and HTTPS with
    /// the webpki roots (the model providers).
    pub fn new() -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            // The ring provider supports the default protocol versions: this cannot fail.
            .unwrap_or_else(|error| panic!("rustls with ring: {error}"))
            .https_or_http()
            .enable_http1()
            .build();
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
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
        let uri: Uri =
            url.parse()
                .map_err(|error: http::uri::InvalidUri| TransportError::InvalidUrl {
                    url: crate::redact::scrub(url),
                    reason: error.to_string(),
                })?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(TransportError::InvalidUrl {
                url: crate::redact::scrub(url),
                reason: "expected an absolute http:// or https:// URL".to_string(),
            });
        }
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let body = match json {
            Some(value) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(value).unwrap_or_default())
            }
            None => Bytes::new(),
        };
        let request =
            builder
                .body(Full::new(body))
                .map_err(|error| TransportError::InvalidUrl {
                    url: crate::redact::scrub(url),
                    reason: error.to_string(),
                })?;
        let exchange = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|error| TransportError::Io(describe(&error)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BODY)
                .collect()
                .await
                .map_err(|error| TransportError::Io(format!("reading the answer: {error}")))?
                .to_bytes();
            Ok(HttpResponse {
                status: parts.status,
                headers: parts.headers,
                body,
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

/// The error and its causes on one line (hyper's top-level message alone is vague).
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
