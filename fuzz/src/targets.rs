//! One function per parser of untrusted bytes. Each takes the fuzzer's bytes, calls the
//! parser (a thin call, so the target follows the parser when it changes), asserts the
//! parser's invariants where they are cheap to state, and answers an outcome class
//! (`ok`, `err:<field>`) that the engine uses to keep inputs that behave differently.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use hookrun_apiserver::body::{
    self, MAX_ENV_ENTRIES, MAX_ENV_VALUE_BYTES, MAX_IDEMPOTENCY_KEY_CHARS, MAX_WAIT, RequestBody,
    WaitMode,
};
use hookrun_apiserver::client_ip::{TrustedProxies, resolve_client_ip};
use hookrun_apiserver::signature::{self, SignedRequest, slack};
use hookrun_apiserver::{runner, title};
use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::budget;
use hookrun_crds::session::{MAX_PAYLOAD_BYTES, MAX_TITLE_BYTES};
use hookrun_crds::validation::is_env_name;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use sha2::Sha256;

/// The longest error message a parser may produce: errors go into HTTP answers and logs,
/// so they must not grow with the input.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// A fuzz target.
pub struct Target {
    /// Its name (`make fuzz` prints it; corpus and crash directories use it).
    pub name: &'static str,
    /// Runs one input; panics when an invariant breaks; answers the outcome class.
    pub run: fn(&[u8]) -> String,
    /// Valid and near-valid inputs to start from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Tokens the mutator inserts for this target.
    pub dictionary: &'static [&'static str],
}

/// Every target.
pub const ALL: &[Target] = &[
    Target {
        name: "hook_body",
        run: hook_body,
        seeds: hook_body_seeds,
        dictionary: &[
            "\"message\"",
            "\"from\"",
            "\"idempotency_key\"",
            "null",
            "\"\\u0001\"",
        ],
    },
    Target {
        name: "webhook_body",
        run: webhook_body,
        seeds: webhook_body_seeds,
        dictionary: &[
            "\"title\"",
            "\"env\"",
            "\"name\"",
            "\"value\"",
            "\"wait\"",
            "\"idempotency_key\"",
            "HOOKRUN_X",
            "LD_PRELOAD",
        ],
    },
    Target {
        name: "prefer_wait",
        run: prefer_wait,
        seeds: || {
            vec![
                b"wait=30".to_vec(),
                b"respond-async, wait=\"10\"; x=y".to_vec(),
            ]
        },
        dictionary: &["wait", "=", ";", ",", "\""],
    },
    Target {
        name: "idempotency_key",
        run: idempotency_key,
        seeds: || vec![b"0f8fad5b-d9cb-469f-a165-70867728950e".to_vec()],
        dictionary: &["\u{7f}", "\u{85}", "\t"],
    },
    Target {
        name: "signature_linear",
        run: |data| signature(SignatureScheme::Linear, data),
        seeds: || signed_seeds(SignatureScheme::Linear),
        dictionary: &[
            "Linear-Signature",
            "Linear-Delivery",
            "webhookTimestamp",
            ": ",
        ],
    },
    Target {
        name: "signature_github",
        run: |data| signature(SignatureScheme::Github, data),
        seeds: || signed_seeds(SignatureScheme::Github),
        dictionary: &[
            "X-Hub-Signature-256",
            "sha256=",
            "X-GitHub-Delivery",
            "X-GitHub-Event",
            ": ",
        ],
    },
    Target {
        name: "signature_slack",
        run: |data| signature(SignatureScheme::Slack, data),
        seeds: || signed_seeds(SignatureScheme::Slack),
        dictionary: &[
            "X-Slack-Signature",
            "v0=",
            "X-Slack-Request-Timestamp",
            "url_verification",
            "\"challenge\"",
            ": ",
        ],
    },
    Target {
        name: "signature_standard_webhooks",
        run: |data| signature(SignatureScheme::StandardWebhooks, data),
        seeds: || signed_seeds(SignatureScheme::StandardWebhooks),
        dictionary: &[
            "webhook-id",
            "webhook-timestamp",
            "webhook-signature",
            "v1,",
            "v1a,",
            " ",
            ": ",
        ],
    },
    Target {
        name: "signature_hmac",
        run: |data| signature(SignatureScheme::Hmac, data),
        seeds: || signed_seeds(SignatureScheme::Hmac),
        dictionary: &["X-Signature", "sha256=", ": "],
    },
    Target {
        name: "client_ip",
        run: client_ip,
        seeds: || {
            vec![
                b"\x0110.0.0.1\n203.0.113.7, 10.1.2.3".to_vec(),
                b"\x02\n2001:db8::7, [2001:db8::1]:443\n::ffff:10.0.0.9".to_vec(),
                b"\x00\n203.0.113.7:4711,garbage".to_vec(),
            ]
        },
        dictionary: &[
            ",",
            ":",
            "[",
            "]",
            "::ffff:",
            "10.",
            "2001:db8::",
            "unknown",
            "\"",
            " ",
        ],
    },
    Target {
        name: "provider_title",
        run: provider_title,
        seeds: provider_title_seeds,
        dictionary: &[
            "\"type\"",
            "\"action\"",
            "\"data\"",
            "\"title\"",
            "\"body\"",
            "\"event\"",
            "\"text\"",
            "\"repository\"",
            "\"full_name\"",
            "\"issue\"",
            "\"pull_request\"",
            "X-GitHub-Event: ",
        ],
    },
    Target {
        name: "runner_event",
        run: runner_event,
        seeds: || vec![br#"{"type":"agent.message","content":"hello"}"#.to_vec()],
        dictionary: &["\"type\"", "\"content\"", "session.", "agent.", "-", "_"],
    },
    Target {
        name: "runner_inputs_query",
        run: runner_inputs_query,
        seeds: || vec![b"after=12&wait=25".to_vec(), b"wait=1".to_vec()],
        dictionary: &["after=", "wait=", "&", "=", "18446744073709551615"],
    },
    Target {
        name: "runner_completion",
        run: runner_completion,
        seeds: || {
            vec![
                br#"{"status":"complete","response":"done"}"#.to_vec(),
                br#"{"status":"error","message":"boom"}"#.to_vec(),
            ]
        },
        dictionary: &[
            "\"status\"",
            "\"complete\"",
            "\"error\"",
            "\"response\"",
            "\"message\"",
        ],
    },
    Target {
        name: "read_request",
        run: read_request,
        seeds: || {
            vec![
                b"echo-wh-0a1b2c3d?namespace=default".to_vec(),
                b"echo-wh-0a1b2c3d/events?namespace=team-a&event_type=agent.message".to_vec(),
                b"\x01echo-wh-0a1b2c3d/stream?namespace=default".to_vec(),
            ]
        },
        dictionary: &[
            "?",
            "&",
            "namespace=",
            "event_type=",
            "%2F",
            "%3F",
            "%00",
            "/events",
            "/stream",
            "..",
            "%",
        ],
    },
    Target {
        name: "model_answer",
        run: model_answer,
        seeds: || {
            vec![
                br#"{"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn"}"#.to_vec(),
                br#"{"choices":[{"message":{"content":"hi","refusal":null},"finish_reason":"stop"}]}"#.to_vec(),
                br#"{"error":{"type":"invalid_request_error","message":"bad","code":"insufficient_quota"}}"#.to_vec(),
            ]
        },
        dictionary: &[
            "\"content\"",
            "\"choices\"",
            "\"message\"",
            "\"text\"",
            "\"error\"",
            "\"refusal\"",
            "\"code\"",
        ],
    },
    Target {
        name: "cel_expression",
        run: cel_expression,
        seeds: || {
            vec![
                format!(
                    "{}\n{}",
                    "body.action == 'created' && body.comment.body.contains('@' + agent.name)",
                    r#"{"action":"created","comment":{"body":"@bot hi"}}"#
                )
                .into_bytes(),
                b"body.l.exists(x, x == 'b') || size(body.l + body.l) > 3\n{\"l\":[\"a\",\"b\"]}"
                    .to_vec(),
                b"headers['x-github-event'] + string(body.n)\n{\"n\":1}".to_vec(),
            ]
        },
        dictionary: &[
            "body",
            "headers",
            "provider",
            "agent",
            ".exists(x, ",
            ".map(x, ",
            ".all(x, ",
            ".filter(x, ",
            "has(",
            "size(",
            "string(",
            " + ",
            " && ",
            " || ",
            " == ",
            " ? ",
            "[",
            "]",
            "{",
            "}",
            "'",
            "\"",
        ],
    },
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

fn class_of(field: &str) -> String {
    // Indices would make every entry a class of its own.
    let field: String = field.chars().filter(|c| !c.is_ascii_digit()).collect();
    format!("err:{field}")
}

fn assert_bounded(message: &str, what: &str) {
    assert!(
        message.len() <= MAX_ERROR_MESSAGE,
        "{what}: an error message of {} bytes grows with the input: {}…",
        message.len(),
        message.chars().take(200).collect::<String>()
    );
}

/// The generic webhook body, and the storage budget's measure of it: the measure is never
/// below what serde_json writes, and a cut stays within the budget.
pub fn webhook_body(data: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(data) {
        let measured = budget::encoded_str_len(text);
        let written = serde_json::to_string(text).map_or(0, |s| s.len());
        assert!(
            measured >= written,
            "measured {measured} < written {written}"
        );
        let (kept, cut) = budget::cut_encoded(text, MAX_PAYLOAD_BYTES);
        assert!(budget::encoded_str_len(kept) - 2 <= MAX_PAYLOAD_BYTES);
        assert!(text.starts_with(kept));
        assert_eq!(cut, kept.len() < text.len());
    }
    match body::parse_webhook_body(data) {
        Ok(parsed) => {
            if let Some(title) = &parsed.title {
                assert!(title.len() <= MAX_TITLE_BYTES && !title.trim().is_empty());
            }
            assert!(parsed.env.len() <= MAX_ENV_ENTRIES);
            let mut names = std::collections::HashSet::new();
            for var in &parsed.env {
                assert!(is_env_name(&var.name), "accepted env name {:?}", var.name);
                assert!(names.insert(var.name.as_str()), "duplicate {:?}", var.name);
                assert!(var.value.len() <= MAX_ENV_VALUE_BYTES);
            }
            if let WaitMode::Wait(wait) = parsed.wait {
                assert!(!wait.is_zero() && wait <= MAX_WAIT);
            }
            if let Some(key) = &parsed.idempotency_key {
                let count = key.chars().count();
                assert!((1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&count));
                assert!(!key.chars().any(char::is_control));
            }
            // What was accepted re-serializes and parses back to itself.
            let again = json!({
                "title": parsed.title,
                "env": parsed.env.iter().map(|v| json!({"name": v.name, "value": v.value})).collect::<Vec<_>>(),
                "wait": match parsed.wait {
                    WaitMode::FireAndForget => json!(false),
                    WaitMode::Wait(d) => json!(d.as_secs()),
                },
                "idempotency_key": parsed.idempotency_key,
            });
            let reparsed = body::parse_webhook_body(again.to_string().as_bytes())
                .expect("an accepted body re-serializes to an accepted body");
            assert_eq!(reparsed, parsed);
            "ok".into()
        }
        Err(error) => {
            assert!(!error.field.is_empty());
            assert_bounded(&error.to_string(), "webhook body");
            class_of(&error.field)
        }
    }
}

/// The body of `POST /hook`: what is accepted has a non-blank message whose stored form
/// fits one Session event, a bounded sender and a valid key, and parses back to itself.
pub fn hook_body(data: &[u8]) -> String {
    use hookrun_apiserver::grant::body::{HookBodyError, MAX_FROM_CHARS, parse_hook_body};
    use hookrun_crds::session::MAX_EVENT_CONTENT_BYTES;
    match parse_hook_body(data) {
        Ok(parsed) => {
            assert!(!parsed.message.trim().is_empty());
            assert!(budget::encoded_str_len(&parsed.content()) <= MAX_EVENT_CONTENT_BYTES);
            if let Some(from) = &parsed.from {
                assert!(from.chars().count() <= MAX_FROM_CHARS && !from.trim().is_empty());
                assert!(parsed.content().starts_with(&format!("[{from}] ")));
            }
            if let Some(key) = &parsed.idempotency_key {
                let count = key.chars().count();
                assert!((1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&count));
                assert!(!key.chars().any(char::is_control));
            }
            let again = json!({
                "message": parsed.message,
                "from": parsed.from,
                "idempotency_key": parsed.idempotency_key,
            });
            let reparsed = parse_hook_body(again.to_string().as_bytes())
                .expect("an accepted body re-serializes to an accepted body");
            assert_eq!(reparsed, parsed);
            "ok".into()
        }
        Err(HookBodyError::Bad(error)) => {
            assert!(!error.field.is_empty());
            assert_bounded(&error.to_string(), "hook body");
            class_of(&error.field)
        }
        Err(HookBodyError::TooLarge { field, .. }) => format!("too-large:{field}"),
    }
}

fn hook_body_seeds() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        br#"{"message":"the build is red"}"#.to_vec(),
        br#"{"message":"hi","from":"ci","idempotency_key":"run-7"}"#.to_vec(),
        br#"{"message":" ","from":null}"#.to_vec(),
        br#"{"message":"a","extra":1}"#.to_vec(),
    ]
}

/// The `Prefer: wait=` header.
pub fn prefer_wait(data: &[u8]) -> String {
    let value = String::from_utf8_lossy(data);
    match body::parse_prefer_wait(&value) {
        Some(WaitMode::Wait(wait)) => {
            assert!(!wait.is_zero() && wait <= MAX_WAIT);
            "wait".into()
        }
        Some(WaitMode::FireAndForget) => "no-wait".into(),
        None => "none".into(),
    }
}

/// The `Idempotency-Key` header.
pub fn idempotency_key(data: &[u8]) -> String {
    let key = String::from_utf8_lossy(data);
    match body::check_idempotency_key("Idempotency-Key", &key) {
        Ok(accepted) => {
            assert_eq!(accepted, key);
            "ok".into()
        }
        Err(error) => {
            assert_bounded(&error.to_string(), "idempotency key");
            "err".into()
        }
    }
}

/// Headers and body from fuzz bytes: `Name: value` lines up to the first empty line,
/// then the body. Lines that are not a valid header are skipped.
pub fn split_request(data: &[u8]) -> (HeaderMap, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (&data[..0], data),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..]
            .strip_prefix(b" ")
            .unwrap_or(&line[colon + 1..]);
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    (headers, body)
}

const SECRET: &str = "fuzz-signing-secret-0123456789";
/// The Standard Webhooks secret: `whsec_` and the base64 of the key.
fn standard_secret() -> String {
    format!("whsec_{}", STANDARD.encode(SECRET))
}

fn secret_of(scheme: SignatureScheme) -> Vec<u8> {
    match scheme {
        SignatureScheme::StandardWebhooks => standard_secret().into_bytes(),
        _ => SECRET.as_bytes().to_vec(),
    }
}

fn other_secret(scheme: SignatureScheme) -> Vec<u8> {
    match scheme {
        SignatureScheme::StandardWebhooks => {
            format!("whsec_{}", STANDARD.encode("another-secret-0123456789")).into_bytes()
        }
        _ => b"another-secret-0123456789".to_vec(),
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sets the headers a correct signature of `body` needs (timestamps now), as the
/// provider would send them.
fn sign(scheme: SignatureScheme, headers: &mut HeaderMap, body: &[u8]) {
    let ts = now_seconds().to_string();
    let set = |headers: &mut HeaderMap, name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    let hex_mac = |message: &[u8]| hex::encode(hmac_sha256(SECRET.as_bytes(), message));
    match scheme {
        SignatureScheme::Linear => set(headers, "linear-signature", hex_mac(body)),
        SignatureScheme::Github => {
            set(
                headers,
                "x-hub-signature-256",
                format!("sha256={}", hex_mac(body)),
            );
        }
        SignatureScheme::Hmac => set(headers, "x-signature", format!("sha256={}", hex_mac(body))),
        SignatureScheme::Slack => {
            let mut message = format!("v0:{ts}:").into_bytes();
            message.extend_from_slice(body);
            set(headers, "x-slack-request-timestamp", ts.clone());
            set(
                headers,
                "x-slack-signature",
                format!("v0={}", hex_mac(&message)),
            );
        }
        SignatureScheme::StandardWebhooks => {
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
                .unwrap_or("msg_fuzz")
                .trim()
                .to_owned();
            let mut message = format!("{id}.{ts}.").into_bytes();
            message.extend_from_slice(body);
            let signature = STANDARD.encode(hmac_sha256(SECRET.as_bytes(), &message));
            set(headers, "webhook-id", id);
            set(headers, "webhook-timestamp", ts.clone());
            set(headers, "webhook-signature", format!("v1,{signature}"));
        }
    }
}

/// A signature scheme's verifier: a request is accepted only under the secret it was
/// signed with, errors stay bounded, and the same request signed correctly is never
/// refused as a mismatch.
pub fn signature(scheme: SignatureScheme, data: &[u8]) -> String {
    let (mut headers, body) = split_request(data);
    let verifier = signature::verifier(scheme);
    let secret = secret_of(scheme);
    let now = SystemTime::now();
    let payload = RequestBody::new(body);
    let request = SignedRequest {
        headers: &headers,
        body: &payload,
        now,
    };
    let class = match verifier.verify(&request, &secret) {
        Ok(_) => {
            // Only a request signed with this secret passes: another secret refuses it.
            assert!(
                verifier.verify(&request, &other_secret(scheme)).is_err(),
                "{scheme:?}: a request was accepted whatever the secret"
            );
            "ok".to_owned()
        }
        Err(error) => {
            assert_bounded(&error.to_string(), "signature");
            format!("err:{}", error.code())
        }
    };
    if scheme == SignatureScheme::Slack
        && let Some(challenge) = slack::url_verification_challenge(&payload)
    {
        assert!(challenge.len() <= body.len());
    }
    sign(scheme, &mut headers, body);
    match verifier.verify(
        &SignedRequest {
            headers: &headers,
            body: &RequestBody::new(body),
            now,
        },
        &secret,
    ) {
        Ok(verified) => {
            if let Some(key) = &verified.dedup_key {
                assert!(key.len() <= 1024, "a dedup key of {} bytes", key.len());
            }
            format!("{class}/signed-ok")
        }
        Err(error) => {
            assert_ne!(
                error.code(),
                "bad_signature",
                "{scheme:?}: a correctly signed request was refused: {error}"
            );
            assert_bounded(&error.to_string(), "signature");
            format!("{class}/signed-{}", error.code())
        }
    }
}

/// Trusted proxies of the `client_ip` target.
fn trusted() -> &'static TrustedProxies {
    static TRUSTED: OnceLock<TrustedProxies> = OnceLock::new();
    TRUSTED.get_or_init(|| {
        "10.0.0.0/8,2001:db8::/32,::ffff:192.168.0.0/112"
            .parse()
            .expect("valid networks")
    })
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What an `X-Forwarded-For` entry could mean, read independently of the apiserver.
fn entry_ips(entry: &str) -> Vec<IpAddr> {
    let entry = entry.trim().trim_matches('"');
    let mut ips = Vec::new();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        ips.push(ip);
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        ips.push(addr.ip());
    }
    if let Ok(ip) = entry
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        ips.push(ip);
    }
    if let Some((host, _)) = entry.rsplit_once(':')
        && let Ok(ip) = host.parse::<IpAddr>()
    {
        ips.push(ip);
    }
    ips.into_iter().map(normalize).collect()
}

/// `X-Forwarded-For` resolution: the client is the TCP peer, or an address that one of
/// the headers' entries spells; an untrusted peer is always the client.
pub fn client_ip(data: &[u8]) -> String {
    let (selector, rest) = data.split_first().unwrap_or((&0, &[]));
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let named = lines.next().and_then(|l| l.trim().parse::<IpAddr>().ok());
    let peer = match selector % 4 {
        0 => IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
        1 => named.unwrap_or(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
        2 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        _ => IpAddr::V6(Ipv4Addr::new(192, 168, 0, 1).to_ipv6_mapped()),
    };
    let headers: Vec<&str> = lines.collect();
    match resolve_client_ip(peer, &headers, trusted()) {
        Ok(ip) => {
            let peer = normalize(peer);
            if !trusted().contains(peer) {
                assert_eq!(ip, peer, "an untrusted peer is the client");
                return "untrusted-peer".into();
            }
            let spelled = headers
                .iter()
                .flat_map(|h| h.split(','))
                .any(|entry| entry_ips(entry).contains(&ip));
            assert!(
                ip == peer || spelled,
                "client {ip} is neither the peer {peer} nor in {headers:?}"
            );
            if ip == peer { "peer" } else { "forwarded" }.into()
        }
        Err(error) => {
            assert_bounded(&error.to_string(), "X-Forwarded-For");
            "err".into()
        }
    }
}

fn provider_title_seeds() -> Vec<Vec<u8>> {
    vec![
        b"\x00\n\n{\"action\":\"create\",\"type\":\"Issue\",\"data\":{\"title\":\"Hello\"}}".to_vec(),
        b"\x01X-GitHub-Event: issues\n\n{\"action\":\"opened\",\"repository\":{\"full_name\":\"o/r\"},\"issue\":{\"title\":\"Fix\"}}".to_vec(),
        b"\x02\n\n{\"type\":\"event_callback\",\"event\":{\"type\":\"app_mention\",\"text\":\"deploy\"}}".to_vec(),
    ]
}

/// Title composition from a provider's payload (and, for GitHub, its event header).
pub fn provider_title(data: &[u8]) -> String {
    let (selector, rest) = data.split_first().unwrap_or((&0, &[]));
    let scheme = [
        SignatureScheme::Linear,
        SignatureScheme::Github,
        SignatureScheme::Slack,
        SignatureScheme::StandardWebhooks,
        SignatureScheme::Hmac,
    ][usize::from(*selector) % 5];
    let (headers, body) = split_request(rest);
    let cut = title::cut_title(String::from_utf8_lossy(body).into_owned());
    assert!(cut.len() <= MAX_TITLE_BYTES);
    match title::provider_title(scheme, &headers, &RequestBody::new(body)) {
        Some(title) => {
            assert!(
                title.len() <= MAX_TITLE_BYTES,
                "a title of {} bytes",
                title.len()
            );
            format!("{scheme:?}:some")
        }
        None => format!("{scheme:?}:none"),
    }
}

/// `POST /runner/v1/events` bodies.
pub fn runner_event(data: &[u8]) -> String {
    match runner::parse_event(data) {
        Ok(event) => {
            assert!(runner::validate_event_type(&event.type_).is_ok());
            assert!(!event.type_.starts_with("session."));
            let again = json!({"type": event.type_, "content": event.content}).to_string();
            assert_eq!(
                runner::parse_event(again.as_bytes()).expect("re-serialized event"),
                event
            );
            "ok".into()
        }
        Err(error) => {
            assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
            assert_bounded(&error.to_string(), "runner event");
            "err".into()
        }
    }
}

/// Queries of `GET /runner/v1/inputs` (`after=<event id>&wait=<seconds>`).
pub fn runner_inputs_query(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    match runner::parse_input_query(Some(&text)) {
        Ok(query) => {
            assert!(query.wait <= Duration::from_secs(runner::MAX_INPUT_WAIT_SECONDS));
            "ok".into()
        }
        Err(error) => {
            assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
            assert_bounded(&error.to_string(), "runner inputs query");
            "err".into()
        }
    }
}

/// `POST /runner/v1/complete` bodies.
pub fn runner_completion(data: &[u8]) -> String {
    match runner::parse_completion(data) {
        Ok(completion) => {
            let status = match completion.phase {
                hookrun_crds::session::SessionPhase::Complete => "complete",
                hookrun_crds::session::SessionPhase::Error => "error",
                other => panic!("a completion in phase {other:?}"),
            };
            let again = json!({
                "status": status,
                "response": completion.response,
                "message": completion.message,
            })
            .to_string();
            assert_eq!(
                runner::parse_completion(again.as_bytes()).expect("re-serialized completion"),
                completion
            );
            format!("ok:{status}")
        }
        Err(error) => {
            assert_eq!(error.status(), http::StatusCode::BAD_REQUEST);
            assert_bounded(&error.to_string(), "runner completion");
            "err".into()
        }
    }
}

/// The read API's router, with no cluster behind it.
fn read_router() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static READ: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    READ.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // A cluster that refuses every connection: building the client needs the runtime.
        let client = {
            let _entered = runtime.enter();
            let url = "http://127.0.0.1:1".parse().expect("a URL");
            kube::Client::try_from(kube::Config::new(url)).expect("a client")
        };
        let state = hookrun_apiserver::api::ApiState::new(
            client,
            hookrun_apiserver::hub::SessionHub::new(),
            std::sync::Arc::new(hookrun_apiserver::metrics::Metrics::default()),
        );
        (runtime, hookrun_apiserver::read::router(state))
    })
}

/// The read API's path and query, through its real router (no cluster: anything that
/// passes validation and authentication ends in 503). Byte 0 bit 0 adds a bearer token.
pub fn read_request(data: &[u8]) -> String {
    use tower::ServiceExt;
    let (selector, rest) = data.split_first().unwrap_or((&0, &[]));
    let target = format!("/agents/{}", String::from_utf8_lossy(rest));
    let Ok(uri) = target.parse::<http::Uri>() else {
        return "bad-uri".into();
    };
    let mut request = http::Request::get(uri);
    if selector & 1 == 1 {
        request = request.header("authorization", "Bearer fuzz.token.value");
    }
    let Ok(request) = request.body(axum::body::Body::empty()) else {
        return "bad-request".into();
    };
    let (runtime, router) = read_router();
    let response = runtime
        .block_on(router.clone().oneshot(request))
        .expect("the router is infallible");
    let status = response.status();
    assert!(
        !status.is_server_error() || status == http::StatusCode::SERVICE_UNAVAILABLE,
        "{target}: {status}"
    );
    let body = runtime
        .block_on(axum::body::to_bytes(response.into_body(), 64 * 1024))
        .expect("a small answer");
    assert!(
        body.len() <= MAX_ERROR_MESSAGE + 128,
        "{status}: an answer of {} bytes grows with the request",
        body.len()
    );
    if !body.is_empty() && status.as_u16() >= 400 {
        let value: Value = serde_json::from_slice(&body).expect("error answers are JSON");
        assert!(value.get("error").is_some() && value.get("message").is_some());
    }
    format!("{}", status.as_u16())
}

/// What the harness reads from a model server: answers and error bodies of both APIs.
pub fn model_answer(data: &[u8]) -> String {
    use hookrun_harness::provider::{anthropic, openai};
    let mut class = String::new();
    for (name, answer) in [
        ("anthropic", anthropic::answer(data)),
        ("openai", openai::answer(data)),
    ] {
        match answer {
            Ok(text) => {
                assert!(
                    !text.trim().is_empty(),
                    "{name}: an empty answer was accepted"
                );
                class.push_str(&format!("{name}:ok "));
            }
            Err(reason) => {
                assert_bounded(&reason, name);
                class.push_str(&format!("{name}:err "));
            }
        }
    }
    let _ = anthropic::error_message(data);
    let _ = openai::error_message(data);
    if openai::is_permanent_429(data) {
        class.push_str("quota");
    }
    class
}

fn webhook_body_seeds() -> Vec<Vec<u8>> {
    vec![
        Vec::new(),
        br#"{"title":"nightly"}"#.to_vec(),
        br#"{"title":"t","env":[{"name":"LOG_LEVEL","value":"debug"}],"wait":30,"idempotency_key":"k-1"}"#.to_vec(),
        br#"{"env":[{"name":"A","value":"1"},{"name":"A","value":"2"}]}"#.to_vec(),
        br#"{"wait":true,"title":null}"#.to_vec(),
    ]
}

fn signed_seeds(scheme: SignatureScheme) -> Vec<Vec<u8>> {
    let body = match scheme {
        SignatureScheme::Linear => format!(
            r#"{{"action":"create","type":"Issue","data":{{"title":"Hi"}},"webhookTimestamp":{}}}"#,
            now_seconds() * 1000
        ),
        SignatureScheme::Slack => {
            r#"{"type":"url_verification","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}"#.to_owned()
        }
        _ => r#"{"title":"nightly"}"#.to_owned(),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        "webhook-id",
        HeaderValue::from_static("msg_p5jXN8AQM9LWM0D4loKWxJek"),
    );
    headers.insert(
        "x-github-delivery",
        HeaderValue::from_static("72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    );
    headers.insert(
        "linear-delivery",
        HeaderValue::from_static("234d1a4e-b617-4388-90fe-adc3633d6b72"),
    );
    sign(scheme, &mut headers, body.as_bytes());
    let mut head = String::new();
    for (name, value) in &headers {
        head.push_str(&format!("{}: {}\n", name, value.to_str().unwrap_or("")));
    }
    // A correctly signed seed with a stale signature: the fuzzer starts from real shapes.
    vec![format!("{head}\n{body}").into_bytes(), body.into_bytes()]
}

/// A webhook trigger's CEL expression (the first line) compiled and evaluated on a body
/// (the rest, JSON or else null): compiling never panics and its errors name the field
/// and stay short; an expression that compiles evaluates, within the bound, to a value or
/// a short error.
pub fn cel_expression(data: &[u8]) -> String {
    use hookrun_crds::expression::{MAX_EXPRESSION_BYTES, Reads, Variables, compile};
    let text = String::from_utf8_lossy(data);
    let (source, body) = text.split_once('\n').unwrap_or((&text, ""));
    let field = "spec.triggers[0].webhook.filter";
    let expression = match compile(field, source) {
        Ok(expression) => expression,
        Err(error) => {
            assert_eq!(error.field, field);
            assert_bounded(&error.message, "compile");
            return class_of(error.message.split(':').next().unwrap_or_default());
        }
    };
    assert!(source.len() <= MAX_EXPRESSION_BYTES);
    let body: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let headers = [("x-github-event", "issue_comment")];
    let variables =
        |reads: &Reads| Variables::new(reads, &body, headers, "github", "team-a", "bot");
    let (everything, read) = (
        variables(&Reads::everything()),
        variables(expression.reads()),
    );
    // Converting only what the expression reads must not change what it evaluates to,
    // whenever the whole body could be converted at all: the same value, or an error
    // both ways (an error's text may print a map, whose order is not fixed).
    let same = |what: &str, read: Result<String, String>, whole: Result<String, String>| {
        if read.is_ok() || whole.is_ok() {
            assert_eq!(read, whole, "{what} of {source:?}");
        }
    };
    let whole = expression.evaluate_bool(&everything);
    if !whole.as_ref().is_err_and(|e| e.contains("JSON values")) {
        same(
            "filter",
            expression.evaluate_bool(&read).map(|b| b.to_string()),
            whole.map(|b| b.to_string()),
        );
        same(
            "text",
            expression.evaluate_text(&read),
            expression.evaluate_text(&everything),
        );
    }
    let variables = read;
    let started = std::time::Instant::now();
    let filter = expression.evaluate_bool(&variables);
    let text = expression.evaluate_text(&variables);
    // Generous for loaded test machines; the bound measured on release builds is far
    // below it (docs/security.md).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "evaluation took {:?}",
        started.elapsed()
    );
    for message in [filter.as_ref().err(), text.as_ref().err()]
        .into_iter()
        .flatten()
    {
        assert_bounded(message, "evaluate");
    }
    match (filter, text) {
        (Ok(b), _) => format!("ok:bool:{b}"),
        (_, Ok(_)) => "ok:text".to_owned(),
        (Err(_), Err(_)) => "err:evaluate".to_owned(),
    }
}

/// Runs every committed regression input of every target (`fuzz/regressions/<target>/`).
pub fn regressions(dir: &std::path::Path) -> Vec<(&'static str, usize, Result<(), String>)> {
    ALL.iter()
        .map(|target| {
            let inputs = crate::engine::files(dir, target.name);
            let result = inputs
                .iter()
                .try_for_each(|input| crate::engine::run_one(target, input).map(|_| ()));
            (target.name, inputs.len(), result)
        })
        .collect()
}

/// How long the smoke test runs each target (`FUZZ_SMOKE_SECONDS`, default 1 s of CPU).
pub fn smoke_budget() -> Duration {
    std::env::var("FUZZ_SMOKE_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(1), Duration::from_secs_f64)
}
