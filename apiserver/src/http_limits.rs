//! Limits on what the HTTP server reads before any handler runs, so that each connection
//! costs a small, bounded amount of memory whatever a client sends: at most
//! [`MAX_HEADERS`] headers and [`MAX_HEAD_BYTES`] of request line and headers (431), a
//! request target of at most [`MAX_TARGET_BYTES`] (414), and read and write buffers of
//! at most [`MAX_CONNECTION_BUFFER_BYTES`] each. Both refusals close the connection.
//! Bodies are read by the one reader every handler uses ([`read_body`]): within a size
//! limit and [`BODY_READ_TIMEOUT`].

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, Uri, header};
use hyper::server::conn::http1;
use hyper_util::rt::TokioTimer;

use crate::error::HttpError;

/// The most headers a request may carry (hyper's own ceiling, kept as its default so
/// headers stay on the stack; like nginx's, a request needs far fewer). One more is 431.
#[allow(dead_code)] // Documents hyper's default, which is not set: setting it moves headers to the heap.
pub(crate) const MAX_HEADERS: usize = 100;
/// The most bytes of request line and headers together (nginx allows 4 × 8 KiB). More is
/// 431.
pub(crate) const MAX_HEAD_BYTES: usize = 32 * 1024;
/// The longest request target (path and query). Webhook URLs are about 150 bytes. Longer
/// is 414.
pub(crate) const MAX_TARGET_BYTES: usize = 2 * 1024;
/// The largest read buffer, and write buffer, of one connection (hyper's default is about
/// 400 KiB). Bodies stream through it in pieces.
pub(crate) const MAX_CONNECTION_BUFFER_BYTES: usize = 48 * 1024;
/// How long a client may take to send the body once the headers are in: the header read
/// timeout ends there, and a body that trickles must not hold a connection and a task
/// forever.
pub(crate) const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP/1 server settings of every listener: the limits above and a header read
/// timeout that holds (hyper needs a timer for it).
pub(crate) fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_CONNECTION_BUFFER_BYTES);
    builder
}

/// A 414 answer that closes the connection, when the request target of `uri` is longer
/// than [`MAX_TARGET_BYTES`]; `None` for every other request.
pub(crate) fn refuse_long_target(uri: &Uri) -> Option<Response<Body>> {
    let length = uri.path_and_query().map_or(0, |p| p.as_str().len());
    if length <= MAX_TARGET_BYTES {
        return None;
    }
    static BODY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        serde_json::json!({
            "error": "uri_too_long",
            "message": format!(
                "the request path and query are longer than {MAX_TARGET_BYTES} bytes: use \
                 the webhook URL as the Agent's status gives it"
            ),
        })
        .to_string()
    });
    let mut response = Response::new(Body::from(BODY.as_str()));
    *response.status_mut() = StatusCode::URI_TOO_LONG;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(response)
}

/// Reads a request body of at most `limit` bytes within [`BODY_READ_TIMEOUT`]: 413 when
/// `Content-Length` or the bytes read pass the limit (without reading further), 408 when
/// the body does not arrive in time, 400 when it cannot be read.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, HttpError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(HttpError::TooLarge { limit });
    }
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| HttpError::BodyTimeout)?;
    read.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError::TooLarge { limit }
        } else {
            HttpError::BodyRead(error.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, RwLock};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::*;
    use crate::client_ip::TrustedProxies;
    use crate::index::Index;
    use crate::index::test_support::{agent, secret};
    use crate::metrics::Metrics;
    use crate::rate_limit::{RateLimit, RateLimiter};
    use crate::store::MemorySessionStore;
    use crate::webhook::{self, AppState};

    #[tokio::test]
    async fn bodies_are_bounded_by_what_is_read_and_what_is_declared() {
        let none = HeaderMap::new();
        let read = read_body(&none, Body::from("{}"), 2).await;
        assert_eq!(read.as_deref().ok(), Some(&b"{}"[..]));
        let read = read_body(&none, Body::from("abc"), 2).await;
        assert_eq!(read.err(), Some(HttpError::TooLarge { limit: 2 }));
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from(3u64));
        let read = read_body(&declared, Body::empty(), 2).await;
        assert_eq!(read.err(), Some(HttpError::TooLarge { limit: 2 }));
    }

    const PING: &str = "/webhooks/team/plain/tok-plain";
    const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

    /// The real public server (hyper and the door's router) on a free port.
    async fn serve() -> (SocketAddr, watch::Sender<bool>) {
        let mut index = Index::new(1);
        index.apply_agent(&agent(
            "team",
            "plain",
            serde_json::json!({"triggers": [{"webhook": {}}]}),
        ));
        index.apply_secret(&secret("team", "plain", &[("token", "tok-plain")]));
        index.mark_synced();
        let state = AppState {
            index: Arc::new(RwLock::new(index)),
            sessions: Arc::new(MemorySessionStore::default()),
            trusted_proxies: Arc::new(TrustedProxies::none()),
            max_body_bytes: 1024 * 1024,
            rate_limiter: Arc::new(Mutex::new(RateLimiter::new(
                RateLimit::new(100, 1.0).expect("a valid limit"),
            ))),
            metrics: Arc::new(Metrics::default()),
            hub: crate::hub::SessionHub::new(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("an address");
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(crate::serve_public(
            listener,
            webhook::app(state),
            HEADER_READ_TIMEOUT,
            stopped,
        ));
        (addr, stop)
    }

    /// What the server sent on one connection before closing it.
    struct Exchange {
        status: u16,
        /// The server closed the connection after answering.
        closed: bool,
        text: String,
    }

    /// Sends `head` (a request head without its blank line) on a keep-alive connection
    /// and reads until the server closes it, or until 300 ms pass in silence after a whole
    /// answer (well within the header read timeout, which closes an idle connection).
    async fn exchange(addr: SocketAddr, head: &str) -> Exchange {
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        // The server may refuse before it read everything; a write it never reads is
        // not the point of these tests.
        let _ = stream.write_all(format!("{head}\r\n").as_bytes()).await;
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            let answered = received.ends_with(b"}");
            let patience = if answered {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(10)
            };
            match tokio::time::timeout(patience, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        let text = String::from_utf8_lossy(&received).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Exchange {
            status,
            closed,
            text,
        }
    }

    fn head(path: &str, headers: &[(String, String)]) -> String {
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: hookrun.test\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head
    }

    #[tokio::test]
    async fn every_part_of_a_request_is_bounded_on_the_real_http_stack() {
        let (addr, _stop) = serve().await;

        // A request near every ceiling is served, and its connection stays open.
        let fine: Vec<_> = (0..90)
            .map(|i| (format!("x-fine-{i}"), "v".repeat(300)))
            .collect();
        let ok = exchange(addr, &head(PING, &fine)).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
        assert!(ok.text.contains(r#"{"ok":true}"#), "{}", ok.text);
        assert!(!ok.closed, "a keep-alive connection stays open");
        let long_ok = format!("{PING}?{}", "q".repeat(MAX_TARGET_BYTES - PING.len() - 1));
        let ok = exchange(addr, &head(&long_ok, &[])).await;
        assert_eq!(ok.status, 200, "{}", ok.text);

        // Too many headers.
        let many: Vec<_> = (0..=MAX_HEADERS)
            .map(|i| (format!("x-many-{i}"), "v".into()))
            .collect();
        let refused = exchange(addr, &head(PING, &many)).await;
        assert_eq!(refused.status, 431, "{}", refused.text);
        assert!(refused.closed);

        // One huge header, and many headers that add up.
        let huge = vec![("x-huge".to_owned(), "h".repeat(MAX_HEAD_BYTES + 1024))];
        let refused = exchange(addr, &head(PING, &huge)).await;
        assert_eq!(refused.status, 431, "{}", refused.text);
        assert!(refused.closed);
        let bulky: Vec<_> = (0..80)
            .map(|i| (format!("x-bulk-{i}"), "b".repeat(500)))
            .collect();
        let refused = exchange(addr, &head(PING, &bulky)).await;
        assert_eq!(refused.status, 431, "{}", refused.text);
        assert!(refused.closed);

        // A long path.
        let long = format!("/webhooks/team/plain/{}", "p".repeat(MAX_TARGET_BYTES));
        let refused = exchange(addr, &head(&long, &[])).await;
        assert_eq!(refused.status, 414, "{}", refused.text);
        assert!(refused.text.contains("uri_too_long"), "{}", refused.text);
        assert!(refused.closed);

        // Still serving.
        let ok = exchange(addr, &head(PING, &[])).await;
        assert_eq!(ok.status, 200, "{}", ok.text);
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
        let (addr, _stop) = serve().await;
        let started = std::time::Instant::now();
        let mut silent = TcpStream::connect(addr).await.expect("connects");
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(HEADER_READ_TIMEOUT * 5, silent.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open after {:?}",
            started.elapsed()
        );
        // Also between requests on a keep-alive connection.
        let mut idle = TcpStream::connect(addr).await.expect("connects");
        idle.write_all(format!("{}\r\n", head(PING, &[])).as_bytes())
            .await
            .expect("sent");
        let mut received = Vec::new();
        let closed = tokio::time::timeout(HEADER_READ_TIMEOUT * 5, async {
            loop {
                match idle.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "an idle keep-alive connection stays open");
        let text = String::from_utf8_lossy(&received);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }

    #[test]
    fn targets_up_to_the_limit_pass() {
        let at = format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1));
        assert!(refuse_long_target(&at.parse().expect("a uri")).is_none());
        let over = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
        let refused = refuse_long_target(&over.parse().expect("a uri")).expect("refused");
        assert_eq!(refused.status(), StatusCode::URI_TOO_LONG);
        assert_eq!(refused.headers()[header::CONNECTION], "close");
    }
}
