//! One attempt of a delivery over HTTP: resolve the host once, check the address, connect
//! to that very address (the client is pinned to it), POST the signed body, follow no
//! redirect, give up after the timeout. Errors are described without the URL, whose
//! query string may hold a secret.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hookrun_crds::callback::sign;

use super::destination::{DestinationPolicy, pick};
use super::plan::Outcome;

/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// What one attempt sends.
pub struct Attempt<'a> {
    pub url: &'a str,
    pub id: &'a str,
    pub body: &'a [u8],
    /// The decoded Standard Webhooks key.
    pub key: &'a [u8],
    pub timestamp_seconds: i64,
}

/// Makes one attempt under `policy`.
pub async fn attempt(
    policy: &DestinationPolicy,
    attempt: &Attempt<'_>,
    timeout: Duration,
) -> Outcome {
    let url = match reqwest::Url::parse(attempt.url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => url,
        _ => return Outcome::Refused("the callback URL is not an absolute http(s) URL".into()),
    };
    let Some(host) = url.host_str().map(str::to_owned) else {
        return Outcome::Refused("the callback URL has no host".into());
    };
    let Some(port) = url.port_or_known_default() else {
        return Outcome::Refused("the callback URL has no port".into());
    };
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let resolved: Vec<IpAddr> = match literal {
        Some(ip) => vec![ip],
        None => match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port)))
            .await
        {
            Ok(Ok(addresses)) => addresses.map(|a| a.ip()).collect(),
            Ok(Err(_)) => {
                return Outcome::Unanswered("the callback host name did not resolve".into());
            }
            Err(_) => {
                return Outcome::Unanswered("resolving the callback host timed out".into());
            }
        },
    };
    let ip = match pick(policy, &resolved) {
        Ok(ip) => ip,
        Err(why) => return Outcome::Refused(why),
    };
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .no_proxy()
        .user_agent(concat!("hookrun-operator/", env!("CARGO_PKG_VERSION")));
    if literal.is_none() {
        // Every connection to this host goes to the checked address; TLS still checks
        // the certificate against the host name.
        builder = builder.resolve(&host, SocketAddr::new(ip, port));
    }
    let client = match builder.build() {
        Ok(client) => client,
        Err(error) => {
            return Outcome::Unanswered(format!("no HTTP client: {}", error.without_url()));
        }
    };
    let signature = sign(
        attempt.key,
        attempt.id,
        attempt.timestamp_seconds,
        attempt.body,
    );
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", attempt.id)
        .header("webhook-timestamp", attempt.timestamp_seconds.to_string())
        .header("webhook-signature", signature)
        .body(attempt.body.to_vec())
        .send()
        .await;
    match sent {
        Ok(response) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            Outcome::Answered {
                status: response.status().as_u16(),
                retry_after,
            }
        }
        Err(error) => {
            let what = if error.is_timeout() {
                "the attempt timed out"
            } else if error.is_connect() {
                "the connection failed"
            } else {
                "the connection dropped before an answer"
            };
            Outcome::Unanswered(what.to_owned())
        }
    }
}
