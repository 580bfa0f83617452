//! Cluster tests of the operator's Agent controller (issue 3). Each test runs the real
//! `hookrun-operator` binary against the test control plane, watching only the test's
//! own namespace.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use hookrun_crds::{
    Agent,
    names::{self, secret_keys},
};
use hookrun_tests::{
    Cluster, TestNamespace, apply_agent, cluster, control_plane::workspace_root, eventually,
};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;

const PUBLIC_URL: &str = "https://hooks.example.test/";
const BUDGET: Duration = Duration::from_secs(10);

/// The operator binary, built first when it is not there yet.
fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/deps")
        .to_path_buf();
    let path = profile_dir.join("hookrun-operator");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "hookrun-operator"])
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build -p hookrun-operator failed");
    }
    path
}

/// A running `hookrun-operator`, killed when dropped. Logs (JSON lines) go to a file
/// under `target/test-clusters/`.
struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(cluster: &Cluster, ns: &TestNamespace, extra: &[&str]) -> Self {
        Self::start_with_url(cluster, ns, PUBLIC_URL, extra)
    }

    /// Like [`Operator::start`] with its own public URL, so that the URLs an operator
    /// writes into Agent statuses say which operator wrote them.
    fn start_with_url(
        cluster: &Cluster,
        ns: &TestNamespace,
        public_url: &str,
        extra: &[&str],
    ) -> Self {
        let dir = workspace_root().join("target/test-clusters");
        std::fs::create_dir_all(&dir).expect("the log directory");
        let log = dir.join(format!("operator-{}-{}.log", ns.name(), rand_suffix()));
        let file = std::fs::File::create(&log).expect("the operator log");
        let child = Command::new(operator_binary())
            .args([
                "--public-url",
                public_url,
                "--runner-url",
                "http://runner.hookrun.test",
                "--admin-listen",
                "127.0.0.1:0",
                "--namespaces",
                ns.name(),
                "--log-format",
                "json",
            ])
            .args(extra)
            .env("KUBECONFIG", cluster.kubeconfig_path())
            .env("RUST_LOG", "info")
            .env_remove("HOOKRUN_PUBLIC_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("hookrun-operator starts");
        Operator { child, log }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin server's address, from the operator's log.
    async fn admin_address(&self) -> String {
        eventually(BUDGET, || async {
            self.log_text().lines().find_map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).ok()?;
                let fields = value.get("fields")?;
                (fields.get("message")?.as_str()? == "admin server listening")
                    .then(|| fields.get("address")?.as_str().map(str::to_owned))
                    .flatten()
            })
        })
        .await
        .unwrap_or_else(|| panic!("no admin address in {}", self.log.display()))
    }

    /// A metric's value from `/metrics` (0 when the series does not exist yet).
    async fn metric(&self, series: &str) -> f64 {
        let address = self.admin_address().await;
        let body = http_get(&address, "/metrics").await;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Total API writes counted by the operator.
    async fn writes(&self) -> f64 {
        let mut total = 0.0;
        for kind in ["secret_apply", "secret_delete", "status_patch", "event"] {
            total += self
                .metric(&format!(
                    "hookrun_operator_api_writes_total{{controller=\"agent\",kind=\"{kind}\"}}"
                ))
                .await;
        }
        total
    }

    /// Sends SIGTERM and waits up to `budget` for the exit status.
    fn terminate(mut self, budget: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let started = std::time::Instant::now();
        while started.elapsed() < budget {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    )
}

/// A minimal HTTP/1.1 GET, enough for the admin server.
async fn http_get(address: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("the admin server accepts");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response read");
    response
}

fn webhook_agent() -> serde_json::Value {
    json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}})
}

fn data(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

fn ready_reason(agent: &Agent) -> Option<(String, String)> {
    agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Waits until the Agent's status URL ends in a token that differs from `not`, and
/// returns that token.
async fn wait_for_token(agents: &Api<Agent>, name: &str, not: Option<&str>) -> String {
    eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        let url = agent.status?.webhook_url?;
        let token = url.rsplit('/').next()?.to_owned();
        (Some(token.as_str()) != not && token.len() == 43).then_some(token)
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} got no (new) webhook URL within {BUDGET:?}"))
}

async fn wait_for_reason(agents: &Api<Agent>, name: &str, status: &str, reason: &str) -> Agent {
    eventually(BUDGET, || async {
        let agent = agents.get(name).await.ok()?;
        (ready_reason(&agent) == Some((status.to_owned(), reason.to_owned()))).then_some(agent)
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} did not reach Ready={status}/{reason}"))
}

#[tokio::test]
async fn apply_gives_a_url_and_a_secret_and_a_restart_keeps_them() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let operator = Operator::start(cluster, &ns, &[]);

    let started = std::time::Instant::now();
    apply_agent(&agents, "my-agent", webhook_agent()).await;
    let token = wait_for_token(&agents, "my-agent", None).await;
    eprintln!("apply to URL: {:?}", started.elapsed());

    let agent = wait_for_reason(&agents, "my-agent", "True", "WebhookReady").await;
    let status = agent.status.clone().expect("status");
    assert_eq!(
        status.webhook_url.as_deref(),
        Some(
            format!(
                "https://hooks.example.test/webhooks/{}/my-agent/{token}",
                ns.name()
            )
            .as_str()
        )
    );
    assert_eq!(status.observed_generation, agent.metadata.generation);

    let secret = secrets
        .get(&names::webhook_secret_name("my-agent"))
        .await
        .expect("the managed Secret exists");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(token.as_str())
    );
    assert_eq!(data(&secret, secret_keys::URL), status.webhook_url);
    assert_eq!(
        secret
            .labels()
            .get(names::MANAGED_BY_LABEL)
            .map(String::as_str),
        Some("hookrun")
    );
    assert_eq!(
        secret.labels().get(names::AGENT_LABEL).map(String::as_str),
        Some("my-agent")
    );
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("Agent", Some(true))
    );
    assert_eq!(Some(&owner.uid), agent.metadata.uid.as_ref());

    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(cluster.client().await, ns.name());
    let created = eventually(BUDGET, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .any(|e| e.reason.as_deref() == Some("TokenCreated"))
            .then_some(())
    })
    .await;
    assert!(created.is_some(), "no TokenCreated event");

    // Nothing to do: a reconcile writes nothing. Touching the Agent's metadata triggers
    // a reconcile without changing what it should produce.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes_before = operator.writes().await;
    let secret_rv = secrets
        .get(&names::webhook_secret_name("my-agent"))
        .await
        .expect("secret")
        .resource_version();
    agents
        .patch(
            "my-agent",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("label patch");
    let agent_rv = agents
        .get("my-agent")
        .await
        .expect("agent")
        .resource_version();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reconciles = operator
        .metric("hookrun_operator_reconciles_total{controller=\"agent\"}")
        .await;
    assert!(reconciles >= 2.0, "reconciles: {reconciles}");
    assert_eq!(
        operator.writes().await,
        writes_before,
        "a no-op reconcile wrote"
    );
    assert_eq!(
        agents
            .get("my-agent")
            .await
            .expect("agent")
            .resource_version(),
        agent_rv
    );
    assert_eq!(
        secrets
            .get(&names::webhook_secret_name("my-agent"))
            .await
            .expect("secret")
            .resource_version(),
        secret_rv
    );

    // A restart keeps the token and writes nothing.
    operator.stop();
    let operator = Operator::start(cluster, &ns, &[]);
    let address = operator.admin_address().await;
    let synced = eventually(BUDGET, || async {
        http_get(&address, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    assert!(
        synced.is_some(),
        "the restarted operator never became ready"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(wait_for_token(&agents, "my-agent", None).await, token);
    assert_eq!(
        agents
            .get("my-agent")
            .await
            .expect("agent")
            .resource_version(),
        agent_rv
    );
    assert_eq!(operator.writes().await, 0.0, "the restarted operator wrote");
}

#[tokio::test]
async fn deleting_the_secret_gives_a_new_token_and_removing_the_trigger_clears_everything() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, &ns, &[]);
    let secret_name = names::webhook_secret_name("rotating");

    apply_agent(&agents, "rotating", webhook_agent()).await;
    let first = wait_for_token(&agents, "rotating", None).await;
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .expect("the Secret deletes");
    let second = wait_for_token(&agents, "rotating", Some(&first)).await;
    assert_ne!(first, second);
    let secret = secrets.get(&secret_name).await.expect("a new Secret");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(second.as_str())
    );

    // Remove the trigger: the Secret goes, the URL is cleared.
    apply_agent(
        &agents,
        "rotating",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "rotating", "True", "NoWebhookTrigger").await;
    assert_eq!(agent.status.and_then(|s| s.webhook_url), None);
    let gone = eventually(BUDGET, || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "the Secret was not deleted");

    // Put it back, then delete the Agent: garbage collection removes the Secret.
    apply_agent(&agents, "rotating", webhook_agent()).await;
    wait_for_token(&agents, "rotating", None).await;
    agents
        .delete("rotating", &DeleteParams::default())
        .await
        .expect("the Agent deletes");
    // Garbage collection can take a discovery resync (30 s) to learn a new CRD's kind.
    let collected = eventually(Duration::from_secs(90), || async {
        secrets
            .get_opt(&secret_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(collected.is_some(), "the Secret was not garbage-collected");
}

#[tokio::test]
async fn a_missing_secret_ref_waits_for_the_secret_and_follows_its_changes() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, &ns, &[]);

    apply_agent(
        &agents,
        "signed",
        json!({"spec": {"triggers": [{"webhook": {
            "linearSignatureSecretRef": {"name": "linear", "key": "signing-secret"}
        }}]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "signed", "False", "SecretRefMissing").await;
    let message = agent
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("\"linear\"") && message.contains("\"signing-secret\""),
        "{message}"
    );

    let linear = |value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "linear"},
               "stringData": {"signing-secret": value}})
    };
    secrets
        .patch(
            "linear",
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(linear("one")),
        )
        .await
        .expect("the referenced Secret applies");
    wait_for_reason(&agents, "signed", "True", "WebhookReady").await;
    let managed = names::webhook_secret_name("signed");
    let copied = eventually(BUDGET, || async {
        let s = secrets.get(&managed).await.ok()?;
        (data(&s, "linear-signing-secret").as_deref() == Some("one")).then_some(())
    })
    .await;
    assert!(copied.is_some(), "the signing secret was not copied");

    secrets
        .patch(
            "linear",
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(linear("two")),
        )
        .await
        .expect("the referenced Secret changes");
    let followed = eventually(BUDGET, || async {
        let s = secrets.get(&managed).await.ok()?;
        (data(&s, "linear-signing-secret").as_deref() == Some("two")).then_some(())
    })
    .await;
    assert!(
        followed.is_some(),
        "the copy did not follow the referenced Secret"
    );
}

#[tokio::test]
async fn graceful_rotation_keeps_the_previous_token_for_the_grace_period() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, &ns, &[]);
    let managed = names::webhook_secret_name("graceful");

    apply_agent(&agents, "graceful", webhook_agent()).await;
    let old = wait_for_token(&agents, "graceful", None).await;

    let mut rotated = webhook_agent();
    rotated["metadata"]["annotations"] = json!({
        names::ROTATE_TOKEN_ANNOTATION: "2030-01-01",
        names::ROTATION_GRACE_ANNOTATION: "3s",
    });
    apply_agent(&agents, "graceful", rotated).await;
    let new = wait_for_token(&agents, "graceful", Some(&old)).await;
    let secret = secrets.get(&managed).await.expect("secret");
    assert_eq!(
        data(&secret, secret_keys::TOKEN).as_deref(),
        Some(new.as_str())
    );
    assert_eq!(
        data(&secret, secret_keys::PREVIOUS_TOKEN).as_deref(),
        Some(old.as_str())
    );
    assert!(data(&secret, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT).is_some());

    let dropped = eventually(Duration::from_secs(10), || async {
        let s = secrets.get(&managed).await.ok()?;
        data(&s, secret_keys::PREVIOUS_TOKEN).is_none().then_some(s)
    })
    .await
    .expect("the previous token was not dropped after its grace period");
    assert_eq!(
        data(&dropped, secret_keys::TOKEN).as_deref(),
        Some(new.as_str())
    );
    assert!(data(&dropped, secret_keys::PREVIOUS_TOKEN_EXPIRES_AT).is_none());
    // The same annotation does not rotate again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(wait_for_token(&agents, "graceful", None).await, new);
}

#[tokio::test]
async fn an_invalid_spec_says_which_field_and_redaction_hides_the_token() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let _operator = Operator::start(cluster, &ns, &["--redact-url-in-status"]);

    apply_agent(
        &agents,
        "bad",
        json!({"spec": {"models": [""], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let agent = wait_for_reason(&agents, "bad", "False", "InvalidSpec").await;
    let message = agent
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(message.contains("spec.models[0]"), "{message}");

    apply_agent(&agents, "hidden", webhook_agent()).await;
    let agent = wait_for_reason(&agents, "hidden", "True", "WebhookReady").await;
    let url = agent.status.and_then(|s| s.webhook_url).expect("a URL");
    assert!(
        url.ends_with(&format!("/hidden/{}", names::REDACTED_TOKEN)),
        "{url}"
    );
    let secret = secrets
        .get(&names::webhook_secret_name("hidden"))
        .await
        .expect("secret");
    let full = data(&secret, secret_keys::URL).expect("url key");
    assert!(
        !full.contains(names::REDACTED_TOKEN) && full.contains("/hidden/"),
        "{full}"
    );
}

#[tokio::test]
async fn with_leader_election_only_one_operator_writes() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let election = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-lease-duration",
        "3s",
    ];
    let a = Operator::start(cluster, &ns, &election);
    let b = Operator::start(cluster, &ns, &election);

    apply_agent(&agents, "elected", webhook_agent()).await;
    let token = wait_for_token(&agents, "elected", None).await;
    let holder = eventually(BUDGET, || async {
        leases
            .get_opt("hookrun-operator")
            .await
            .ok()??
            .spec?
            .holder_identity
    })
    .await
    .expect("a lease holder");
    let (leader, standby) = if holder.ends_with(&format!("-{}", a.pid())) {
        (a, b)
    } else {
        assert!(
            holder.ends_with(&format!("-{}", b.pid())),
            "holder {holder}"
        );
        (b, a)
    };
    assert!(leader.writes().await >= 2.0);
    assert_eq!(standby.writes().await, 0.0, "the standby wrote");
    let standby_address = standby.admin_address().await;
    assert!(
        http_get(&standby_address, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
    );

    // The leader dies without stepping down: the standby takes over after the lease
    // expires, and then it writes.
    leader.stop();
    let secrets: Api<Secret> = Api::namespaced(cluster.client().await, ns.name());
    secrets
        .delete(
            &names::webhook_secret_name("elected"),
            &DeleteParams::default(),
        )
        .await
        .expect("the Secret deletes");
    let next = eventually(Duration::from_secs(20), || async {
        let agent = agents.get("elected").await.ok()?;
        let url = agent.status?.webhook_url?;
        let t = url.rsplit('/').next()?.to_owned();
        (t != token).then_some(t)
    })
    .await;
    assert!(next.is_some(), "the standby did not take over");
    assert!(standby.writes().await >= 2.0);

    // SIGTERM: the new leader stops cleanly and steps down.
    let status = standby.terminate(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "exit on SIGTERM");
    let lease = leases.get("hookrun-operator").await.expect("the lease");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity),
        None,
        "the lease was not released"
    );
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("hookrun-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test]
async fn a_frozen_leader_writes_nothing_after_a_successor_took_over() {
    const OLD: &str = "https://old-leader.example.test/";
    const NEW: &str = "https://new-leader.example.test/";
    const LEASE: Duration = Duration::from_secs(3);
    const MARKER: &str = "test.hookrun.dev/after-exit";
    const AGENTS: usize = 40;
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let leases: Api<Lease> = Api::namespaced(client, ns.name());
    let election = [
        "--leader-elect",
        "--leader-election-namespace",
        ns.name(),
        "--leader-election-lease-duration",
        "3s",
    ];
    let old = Operator::start_with_url(cluster, &ns, OLD, &election);
    let old_pid = format!("-{}", old.pid());
    eventually(BUDGET, || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&old_pid))
    })
    .await
    .expect("the first operator leads");
    let new = Operator::start_with_url(cluster, &ns, NEW, &election);
    let new_pid = format!("-{}", new.pid());
    let urls = |agents: &Api<Agent>| {
        let agents = agents.clone();
        async move {
            agents
                .list(&Default::default())
                .await
                .map(|list| {
                    list.items
                        .into_iter()
                        .filter_map(|a| a.status?.webhook_url)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };

    // Freeze the leader in the middle of a burst of work, so that it holds reconciles
    // that are past every check of their own when it stops.
    let burst = {
        let agents = agents.clone();
        tokio::spawn(async move {
            futures::future::join_all((0..AGENTS).map(|i| {
                let agents = agents.clone();
                async move { apply_agent(&agents, &format!("a{i}"), webhook_agent()).await }
            }))
            .await
        })
    };
    eventually(BUDGET, || async {
        urls(&agents)
            .await
            .iter()
            .any(|u| u.starts_with(OLD))
            .then_some(())
    })
    .await
    .expect("the first leader starts on the burst");
    signal(old.pid(), "STOP");
    let frozen_at = std::time::Instant::now();
    burst.await.expect("the burst is applied");

    // The standby takes over within the lease duration and a few seconds, judged by its
    // own clock, and writes its own URL everywhere.
    eventually(LEASE + Duration::from_secs(10), || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&new_pid))
    })
    .await
    .expect("the standby takes over from a frozen leader");
    let takeover = frozen_at.elapsed();
    assert!(
        takeover <= LEASE + Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    eventually(Duration::from_secs(30), || async {
        let urls = urls(&agents).await;
        (urls.len() == AGENTS && urls.iter().all(|u| u.starts_with(NEW))).then_some(())
    })
    .await
    .expect("the new leader writes every URL");

    // Record every Agent change from now on, then wake the old leader.
    let recorded = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let watch = {
        let recorded = recorded.clone();
        let stream =
            kube::runtime::watcher(agents.clone(), kube::runtime::watcher::Config::default());
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(event)) = stream.next().await {
                if let kube::runtime::watcher::Event::Apply(agent)
                | kube::runtime::watcher::Event::InitApply(agent) = event
                {
                    let marked = agent.annotations().contains_key(MARKER);
                    if let Some(url) = agent.status.and_then(|s| s.webhook_url) {
                        recorded.lock().expect("the record").push((url, marked));
                    }
                }
            }
        })
    };
    eventually(BUDGET, || async {
        (!recorded.lock().ok()?.is_empty()).then_some(())
    })
    .await
    .expect("the watch sees the Agents");
    signal(old.pid(), "CONT");
    let mut old = old;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(status) = old.child.try_wait().expect("the old leader's status") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the old leader did not exit once it found the lease gone"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!exited.success(), "losing the lease is an error exit");
    // A write after its exit: once the watch shows it, it has shown every earlier write.
    agents
        .patch(
            "a0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {MARKER: "1"}}})),
        )
        .await
        .expect("the marker annotation");
    eventually(BUDGET, || async {
        recorded
            .lock()
            .ok()?
            .iter()
            .any(|(_, marked)| *marked)
            .then_some(())
    })
    .await
    .expect("the watch sees the marker");
    watch.abort();
    let stale: Vec<String> = recorded
        .lock()
        .expect("the record")
        .iter()
        .filter(|(u, _)| !u.starts_with(NEW))
        .map(|(u, _)| {
            u.rsplit_once('/')
                .map_or(u.clone(), |(path, _)| path.to_owned())
        })
        .collect();
    assert!(
        stale.is_empty(),
        "the old leader wrote {} statuses after the new one took over: {stale:?}",
        stale.len()
    );
    assert!(
        old.log_text().contains("stepping down") || old.log_text().contains("took the lease"),
        "the old leader says why it stopped: {}",
        old.log_text()
    );
    drop(new);
}
