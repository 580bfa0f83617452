//! The security leak suite: one scenario on the real binaries (operator, apiserver, and
//! the harness run by the local stand-in for the kubelet) that uses every kind of secret
//! hookrun handles, then greps everything the system produced for them.
//!
//! Secrets: the webhook tokens (valid ones and a wrong one), a signing secret of every
//! scheme (with good and bad signatures), model keys given to the harness through a
//! Secret, model base URLs with credentials in their userinfo, a bearer token of the read
//! API and a junk one. Produced: every log line of the apiserver, the operator and the
//! harness runs, both `/metrics`, every Event of the namespace, every Session and Pod
//! status, and every HTTP answer the suite received. Every secret must appear zero times,
//! in its raw, base64, hex and percent-encoded forms.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use hookrun_tests::control_plane::workspace_root;
use hookrun_tests::door::{self, ApiServer, Operator, is_known, webhook_path};
use hookrun_tests::fake_model::FakeModel;
use hookrun_tests::fixtures::agent_namespace;
use hookrun_tests::pod_runner::PodRunner;
use hookrun_tests::{TestNamespace, apply_agent, eventually, workspace_binary};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, PostParams};
use rand::{Rng, distr::Alphanumeric};
use serde_json::{Value, json};
use sha2::Sha256;

/// The image the operator gives session pods and the pod runner runs as the harness.
const HARNESS_IMAGE: &str = "hookrun-harness:leaks";
/// The Kubernetes Secret holding the signing secrets and model keys.
const KEYS_SECRET: &str = "leak-suite-keys";

fn random(prefix: &str, len: usize) -> String {
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Every form a secret could be written in: raw, base64 (standard and URL-safe), hex and
/// percent-encoded.
fn forms(secret: &str) -> Vec<String> {
    let mut forms = vec![
        secret.to_owned(),
        STANDARD.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        hex::encode(secret),
    ];
    let percent: String = secret
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    forms.push(percent);
    forms.sort();
    forms.dedup();
    forms
}

/// Everything the suite received over HTTP (the answers, not the requests: those carry
/// the secrets on purpose), kept for the grep.
#[derive(Default)]
struct Received(Vec<String>);

impl Received {
    async fn call(
        &mut self,
        address: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> u16 {
        let answer = door::request(address, method, path, headers, body).await;
        let head: Vec<String> = answer
            .headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}"))
            .collect();
        self.0
            .push(format!("{}\n\n{}", head.join("\n"), answer.text));
        answer.status
    }
}

fn kubectl_json(ns: &TestNamespace, args: &[&str]) -> Value {
    let output = ns.kubectl(args, None);
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("kubectl prints JSON")
}

#[tokio::test]
async fn no_secret_reaches_logs_metrics_events_statuses_or_answers() {
    let (cluster, ns, client, agents, sessions) = agent_namespace().await;

    // The secrets, each with what it is for the failure message.
    let linear_secret = random("lin_wh_", 32);
    let github_secret = random("gh-", 32);
    let slack_secret = random("slk", 32);
    let standard_key = random("swk", 30);
    let standard_secret = format!("whsec_{}", STANDARD.encode(&standard_key));
    let hmac_secret = random("hm-", 32);
    let openai_key = random("sk-proj-", 40);
    let anthropic_key = random("sk-ant-", 40);
    let userinfo_password = random("upw-", 24);
    let userinfo_password2 = random("upw-", 24);
    let wrong_token = random("", 43);
    let junk_bearer = random("junk.", 60);

    // A model server that fails: first a 500, then a 401, both quoting the key, the URL
    // with its credentials and the Basic form of them, as careless servers do.
    let basic = STANDARD.encode(format!("mdl-user:{userinfo_password}"));
    let echo = format!(
        "Incorrect API key provided: {openai_key}; you called \
         http://mdl-user:{userinfo_password}@model.internal/v1 with Basic {basic}"
    );
    let model = FakeModel::start_then(
        vec![(
            500,
            vec![("retry-after", "0")],
            json!({"error": {"message": echo, "type": "server_error"}}),
        )],
        Some((
            401,
            json!({"error": {"message": echo, "type": "invalid_request_error", "code": "invalid_api_key"}}),
        )),
    )
    .await;
    let model_port = model.url.rsplit(':').next().expect("a port").to_owned();

    // Labelled: the pod policy lets only opted-in Secrets into session env.
    let keys = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(KEYS_SECRET.into()),
            labels: Some([("hookrun.dev/agent-env".to_owned(), "true".to_owned())].into()),
            ..Default::default()
        },
        string_data: Some(
            [
                ("github", &github_secret),
                ("slack", &slack_secret),
                ("standard", &standard_secret),
                ("hmac", &hmac_secret),
                ("openai", &openai_key),
                ("anthropic", &anthropic_key),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.clone()))
            .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &keys)
        .await
        .expect("the keys Secret is created");

    let apiserver = ApiServer::start(&cluster.kubeconfig_path(), ns.name(), "leaks").await;
    let runner_url = format!("http://{}", apiserver.runner);
    let operator = Operator::start_with(
        &cluster.kubeconfig_path(),
        ns.name(),
        &format!("leaks-{}", ns.name()),
        &[
            "--runner-url",
            &runner_url,
            "--default-harness-image",
            HARNESS_IMAGE,
        ],
    )
    .await;
    let work_dir: PathBuf = workspace_root()
        .join("target/test-clusters")
        .join(format!("leaks-{}", ns.name()));
    std::fs::create_dir_all(&work_dir).expect("the pod runner's directory");
    let pod_runner = PodRunner::new(
        client.clone(),
        HARNESS_IMAGE,
        workspace_binary("hookrun-harness"),
        work_dir.clone(),
    )
    .in_namespace(ns.name());
    let pod_runner_task = tokio::spawn(pod_runner.clone().run());

    // The Agents: one per signature scheme (inline and by reference), two model Agents
    // whose base URLs carry credentials, and a program that prints its key.
    let key_ref = |key: &str| json!({"name": KEYS_SECRET, "key": key});
    let cat = json!({"command": ["cat"]});
    let fast_retries = json!([
        {"name": "HARNESS_RETRY_ATTEMPTS", "value": "2"},
        {"name": "HARNESS_RETRY_SECONDS", "value": "5"},
    ]);
    let signed = [
        ("lin", json!({"linearSignatureSecret": linear_secret})),
        ("gh", json!({"githubSecretRef": key_ref("github")})),
        ("slk", json!({"slackSigningSecretRef": key_ref("slack")})),
        (
            "swh",
            json!({"standardWebhooksSecretRef": key_ref("standard")}),
        ),
        ("hm", json!({"hmacSecretRef": key_ref("hmac")})),
    ];
    for (name, webhook) in &signed {
        apply_agent(
            &agents,
            name,
            json!({"spec": {"exec": cat, "triggers": [{"webhook": webhook}]}}),
        )
        .await;
    }
    let mut openai_env = fast_retries.as_array().expect("a list").clone();
    openai_env.extend([
        json!({"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": key_ref("openai")}}),
        json!({"name": "OPENAI_BASE_URL",
               "value": format!("http://mdl-user:{userinfo_password}@127.0.0.1:{model_port}/v1")}),
    ]);
    apply_agent(
        &agents,
        "model-echo",
        json!({"spec": {
            "models": ["openai/gpt-4o-mini"],
            "triggers": [{"webhook": {}}],
            "session": {"env": openai_env}
        }}),
    )
    .await;
    let mut anthropic_env = fast_retries.as_array().expect("a list").clone();
    anthropic_env.extend([
        json!({"name": "ANTHROPIC_API_KEY", "valueFrom": {"secretKeyRef": key_ref("anthropic")}}),
        // Not a valid URL (a space in the path): the harness cannot even send it.
        json!({"name": "ANTHROPIC_BASE_URL",
               "value": format!("http://mdl-user:{userinfo_password2}@127.0.0.1:{model_port}/v1 beta")}),
    ]);
    apply_agent(
        &agents,
        "model-badurl",
        json!({"spec": {
            "models": ["anthropic/claude-sonnet-4-6"],
            "triggers": [{"webhook": {}}],
            "session": {"env": anthropic_env}
        }}),
    )
    .await;
    apply_agent(
        &agents,
        "prints-key",
        json!({"spec": {
            "exec": {"command": ["sh", "-c",
                "echo \"calling with $OPENAI_API_KEY\"; \
                 echo \"curl -H 'Authorization: Bearer $OPENAI_API_KEY' failed\" >&2; exit 3"]},
            "triggers": [{"webhook": {}}],
            "session": {"env": [
                {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": key_ref("openai")}}
            ]}
        }}),
    )
    .await;

    let mut paths = std::collections::BTreeMap::new();
    for name in [
        "lin",
        "gh",
        "slk",
        "swh",
        "hm",
        "model-echo",
        "model-badurl",
        "prints-key",
    ] {
        let path = webhook_path(&agents, ns.name(), name).await;
        assert!(
            is_known(&apiserver.public, &path).await,
            "the apiserver never accepted {name}'s token: {}",
            apiserver.process.log_text()
        );
        paths.insert(name, path);
    }
    let tokens: Vec<String> = paths
        .values()
        .map(|p| p.rsplit('/').next().expect("a token").to_owned())
        .collect();

    // The requests: for each scheme a good and a bad signature, wrong tokens, pings.
    let public = apiserver.public.clone();
    let mut got = Received::default();
    let wrong = |secret: &str| format!("{secret}-wrong");
    let body = |scheme: &str| json!({"title": format!("signed by {scheme}")}).to_string();
    for good in [true, false] {
        let expected = if good { 200 } else { 401 };
        let pick = |secret: &str| {
            if good {
                secret.to_owned()
            } else {
                wrong(secret)
            }
        };
        let ms = now_seconds() * 1000;
        let linear_body = json!({
            "action": "create", "type": "Issue", "data": {"title": "leak suite"},
            "webhookTimestamp": ms
        })
        .to_string();
        let signature = hex::encode(hmac_sha256(
            pick(&linear_secret).as_bytes(),
            linear_body.as_bytes(),
        ));
        let status = got
            .call(
                &public,
                "POST",
                &paths["lin"],
                &[("Linear-Signature", &signature)],
                &linear_body,
            )
            .await;
        assert_eq!(status, expected, "linear good={good}");

        let gh_body = body("github");
        let signature = format!(
            "sha256={}",
            hex::encode(hmac_sha256(
                pick(&github_secret).as_bytes(),
                gh_body.as_bytes()
            ))
        );
        let delivery = random("d-", 16);
        let status = got
            .call(
                &public,
                "POST",
                &paths["gh"],
                &[
                    ("X-Hub-Signature-256", &signature),
                    ("X-GitHub-Event", "issues"),
                    ("X-GitHub-Delivery", &delivery),
                ],
                &gh_body,
            )
            .await;
        assert_eq!(status, expected, "github good={good}");

        let slack_body = body("slack");
        let ts = now_seconds().to_string();
        let signature = format!(
            "v0={}",
            hex::encode(hmac_sha256(
                pick(&slack_secret).as_bytes(),
                format!("v0:{ts}:{slack_body}").as_bytes()
            ))
        );
        let status = got
            .call(
                &public,
                "POST",
                &paths["slk"],
                &[
                    ("X-Slack-Signature", &signature),
                    ("X-Slack-Request-Timestamp", &ts),
                ],
                &slack_body,
            )
            .await;
        assert_eq!(status, expected, "slack good={good}");

        let swh_body = body("standard webhooks");
        let id = random("msg_", 20);
        let key = if good {
            standard_key.clone()
        } else {
            wrong(&standard_key)
        };
        let signature = format!(
            "v1,{}",
            STANDARD.encode(hmac_sha256(
                key.as_bytes(),
                format!("{id}.{ts}.{swh_body}").as_bytes()
            ))
        );
        let status = got
            .call(
                &public,
                "POST",
                &paths["swh"],
                &[
                    ("webhook-id", &id),
                    ("webhook-timestamp", &ts),
                    ("webhook-signature", &signature),
                ],
                &swh_body,
            )
            .await;
        assert_eq!(status, expected, "standard webhooks good={good}");

        let hm_body = body("hmac");
        let signature = format!(
            "sha256={}",
            hex::encode(hmac_sha256(
                pick(&hmac_secret).as_bytes(),
                hm_body.as_bytes()
            ))
        );
        let status = got
            .call(
                &public,
                "POST",
                &paths["hm"],
                &[("X-Signature", &signature)],
                &hm_body,
            )
            .await;
        assert_eq!(status, expected, "hmac good={good}");
    }
    for name in ["model-echo", "model-badurl", "prints-key"] {
        let status = got
            .call(&public, "POST", &paths[name], &[], r#"{"title": "hello"}"#)
            .await;
        assert_eq!(status, 200, "{name}");
        // The same Agent with a wrong token, posted and pinged.
        let wrong_path = paths[name].replace(
            paths[name].rsplit('/').next().expect("a token"),
            &wrong_token,
        );
        let status = got.call(&public, "POST", &wrong_path, &[], "{}").await;
        assert_eq!(status, 401, "{name} with a wrong token");
        let status = got.call(&public, "GET", &wrong_path, &[], "").await;
        assert_eq!(status, 401, "{name} ping with a wrong token");
        let status = got.call(&public, "GET", &paths[name], &[], "").await;
        assert_eq!(status, 200, "{name} ping");
    }

    // Every session runs to its end.
    const EXPECTED_SESSIONS: usize = 8;
    let finished = eventually(Duration::from_secs(120), || async {
        let list = sessions.list(&ListParams::default()).await.ok()?;
        let done = list
            .items
            .iter()
            .filter(|s| s.status.as_ref().is_some_and(|st| st.is_finished()))
            .count();
        (list.items.len() == EXPECTED_SESSIONS && done == EXPECTED_SESSIONS).then_some(list.items)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the sessions did not all finish: {}",
            kubectl_json(&ns, &["get", "sessions", "-o", "json"])
        )
    });

    // The failures happened the way the scenario meant them to.
    let message_of = |agent: &str| {
        finished
            .iter()
            .find(|s| s.spec.agent == agent)
            .and_then(|s| s.status.as_ref()?.message.clone())
            .unwrap_or_default()
    };
    assert!(
        message_of("model-echo").contains("rejected the request (401)"),
        "{}",
        message_of("model-echo")
    );
    assert!(
        message_of("model-badurl").contains("invalid URL"),
        "{}",
        message_of("model-badurl")
    );
    assert!(
        message_of("prints-key").contains("exited with code 3"),
        "{}",
        message_of("prints-key")
    );
    assert!(model.seen().len() >= 2, "the model server was called");

    // The read API, with a good and a junk bearer token.
    let reader = ns.session_reader_token();
    for session in &finished {
        let name = session.metadata.name.clone().expect("a name");
        for token in [&reader, &junk_bearer] {
            let auth = format!("Bearer {token}");
            for path in [
                format!("/agents/{name}?namespace={}", ns.name()),
                format!("/agents/{name}/events?namespace={}", ns.name()),
            ] {
                got.call(&public, "GET", &path, &[("Authorization", &auth)], "")
                    .await;
            }
        }
    }

    // Everything the system produced.
    pod_runner.stop_all();
    pod_runner_task.abort();
    let mut produced: Vec<(String, String)> = vec![
        ("apiserver log".into(), apiserver.process.log_text()),
        ("operator log".into(), operator.log_text()),
    ];
    let mut harness_logs = 0;
    for entry in std::fs::read_dir(&work_dir)
        .expect("the pod runner's directory")
        .flatten()
    {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            harness_logs += usize::from(!text.is_empty());
            produced.push((format!("harness log {}", entry.path().display()), text));
        }
    }
    assert_eq!(harness_logs, EXPECTED_SESSIONS, "every harness run logged");
    produced.push((
        "apiserver /metrics".into(),
        door::metrics(&apiserver.admin).await,
    ));
    produced.push((
        "operator /metrics".into(),
        door::metrics(&operator.admin).await,
    ));
    produced.push((
        "Events".into(),
        kubectl_json(&ns, &["get", "events", "-o", "json"]).to_string(),
    ));
    produced.push((
        "Sessions".into(),
        kubectl_json(&ns, &["get", "sessions", "-o", "json"]).to_string(),
    ));
    let pods = kubectl_json(&ns, &["get", "pods", "-o", "json"]);
    let pod_statuses: Vec<&Value> = pods["items"]
        .as_array()
        .map(|items| items.iter().map(|p| &p["status"]).collect())
        .unwrap_or_default();
    produced.push(("Pod statuses".into(), json!(pod_statuses).to_string()));
    for (i, text) in got.0.iter().enumerate() {
        produced.push((format!("HTTP answer {i}"), text.clone()));
    }

    let mut secrets: Vec<(String, String)> = vec![
        ("Linear signing secret".into(), linear_secret),
        ("GitHub secret".into(), github_secret),
        ("Slack signing secret".into(), slack_secret),
        ("Standard Webhooks secret".into(), standard_secret),
        ("Standard Webhooks key".into(), standard_key.clone()),
        (
            "Standard Webhooks key, base64".into(),
            STANDARD.encode(&standard_key),
        ),
        ("generic HMAC secret".into(), hmac_secret),
        ("OpenAI key".into(), openai_key),
        ("Anthropic key".into(), anthropic_key),
        ("base URL password".into(), userinfo_password.clone()),
        ("base URL password 2".into(), userinfo_password2),
        (
            "base URL user:password".into(),
            format!("mdl-user:{userinfo_password}"),
        ),
        ("wrong webhook token".into(), wrong_token),
        ("read API bearer token".into(), reader),
        ("junk bearer token".into(), junk_bearer),
    ];
    for (i, token) in tokens.into_iter().enumerate() {
        secrets.push((format!("webhook token {i}"), token));
    }
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret) {
            for (source, text) in &produced {
                let hits = text.matches(form.as_str()).count();
                if hits > 0 {
                    let at = text.find(form.as_str()).unwrap_or(0);
                    let mut start = at.saturating_sub(120);
                    while !text.is_char_boundary(start) {
                        start -= 1;
                    }
                    let mut end = (at + form.len() + 60).min(text.len());
                    while !text.is_char_boundary(end) {
                        end += 1;
                    }
                    leaks.push(format!(
                        "{what} ({hits}x) in {source}: …{}…",
                        &text[start..end]
                    ));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    let _ = std::fs::remove_dir_all(&work_dir);
}
