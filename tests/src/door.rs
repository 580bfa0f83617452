//! The one launcher of the workspace binaries: the real `hookrun-operator`
//! ([`Operator`]) and `hookrun-apiserver` ([`ApiServer`], both together as [`Door`]) as
//! child processes watching one test namespace, their addresses read from their logs
//! (every listener binds `127.0.0.1:0`), their metrics, signals and exit; and the one
//! HTTP/1.1 client of the tests ([`request`], [`get`], [`metrics`]).

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hookrun_crds::{Agent, names};
use kube::Api;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Cluster, TestNamespace, control_plane::workspace_root, eventually, workspace_binary};

/// How long the helpers wait for the binaries to get somewhere.
pub const BUDGET: Duration = Duration::from_secs(20);

/// A child process killed when dropped, logging to a file under `target/test-clusters/`.
pub struct Process {
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Process {
    /// Starts `binary` (a workspace binary) with the cluster's kubeconfig.
    pub fn start(cluster: &Cluster, binary: &str, tag: &str, args: &[&str]) -> Self {
        Self::start_with(&cluster.kubeconfig_path(), binary, tag, args)
    }

    /// Starts `binary` with `kubeconfig`; `tag` goes into the log file's name.
    pub fn start_with(
        kubeconfig: &std::path::Path,
        binary: &str,
        tag: &str,
        args: &[&str],
    ) -> Self {
        let dir = workspace_root().join("target/test-clusters");
        std::fs::create_dir_all(&dir).expect("the log directory");
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let log = dir.join(format!("{binary}-{tag}-{nanos}.log"));
        let file = std::fs::File::create(&log).expect("the log file");
        let child = Command::new(workspace_binary(binary))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            // `HOOKRUN_TEST_LOG` widens what the binaries log when a failure needs more.
            .env(
                "RUST_LOG",
                std::env::var("HOOKRUN_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            // The operator's sessions flag; an address no pod reaches in these tests.
            .env("HOOKRUN_RUNNER_URL", "http://127.0.0.1:9/")
            .env("NO_COLOR", "1")
            // Only the flags a test passes decide the public URL.
            .env_remove("HOOKRUN_PUBLIC_URL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
        Process { child, log }
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (for signals, and for reading its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits up to `budget` for the process to exit and returns its exit status.
    pub async fn wait_exit(&mut self, budget: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if started.elapsed() > budget {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits up to `budget` for the exit status.
    pub async fn terminate(&mut self, budget: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait_exit(budget).await
    }

    /// Waits up to [`BUDGET`] until a log line holding `message` carries the field
    /// `name`, and returns its value.
    pub async fn logged(&self, message: &str, name: &str) -> String {
        eventually(BUDGET, || async {
            let text = self.log_text();
            let line = text.lines().find(|l| l.contains(message))?;
            logged_field(line, name)
        })
        .await
        .unwrap_or_else(|| panic!("no {name} logged with {message:?}: {}", self.log.display()))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real apiserver alone, watching one namespace (tests that play the operator).
pub struct ApiServer {
    pub process: Process,
    /// `host:port` of the public listener (webhooks, read API).
    pub public: String,
    /// `host:port` of the runner listener (`/runner/v1/...`).
    pub runner: String,
    /// `host:port` of the admin listener.
    pub admin: String,
}

impl ApiServer {
    /// Starts `hookrun-apiserver` with `kubeconfig`, watching `namespace`, and waits for
    /// the addresses it logs; `tag` goes into the log file's name.
    pub async fn start(kubeconfig: &std::path::Path, namespace: &str, tag: &str) -> Self {
        Self::start_with_args(kubeconfig, namespace, tag, &[]).await
    }

    /// Like [`ApiServer::start`], with `extra` flags after the usual ones.
    pub async fn start_with_args(
        kubeconfig: &std::path::Path,
        namespace: &str,
        tag: &str,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--runner-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--namespaces",
            namespace,
            "--rate-limit-burst",
            "1000",
            "--rate-limit-per-second",
            "100",
        ];
        args.extend_from_slice(extra);
        Self::attach(Process::start_with(
            kubeconfig,
            "hookrun-apiserver",
            tag,
            &args,
        ))
        .await
    }

    /// Takes over a started `hookrun-apiserver` (with flags of the caller's choice) and
    /// waits for the addresses it logs.
    pub async fn attach(process: Process) -> Self {
        let addresses = eventually(BUDGET, || async {
            let text = process.log_text();
            let field = |name: &str| logged_field(&text, name);
            Some((field("public")?, field("runner")?, field("admin")?))
        })
        .await
        .unwrap_or_else(|| panic!("the apiserver logged no address: {}", process.log.display()));
        let (public, runner, admin) = addresses;
        ApiServer {
            process,
            public,
            runner,
            admin,
        }
    }
}

/// The value of the first field `name` in a log text: ` name=value` in the text format,
/// `"name":"value"` in the JSON format.
pub fn logged_field(text: &str, name: &str) -> Option<String> {
    if let Some(rest) = text.split(&format!(" {name}=")).nth(1) {
        return Some(rest.split_whitespace().next()?.trim_matches('"').to_owned());
    }
    let rest = text.split(&format!("\"{name}\":\"")).nth(1)?;
    Some(rest.split('"').next()?.to_owned())
}

/// The public URL the operator writes into statuses unless a test passes its own.
pub const PUBLIC_URL: &str = "https://hooks.example.test/";

/// The real operator, watching one namespace, with its admin address.
pub struct Operator {
    pub process: Process,
    /// `host:port` of the admin listener (`/metrics`, `/readyz`).
    pub admin: String,
}

impl Operator {
    /// Starts `hookrun-operator` on `namespace` with the cluster's kubeconfig and
    /// `extra` flags, and waits for its admin address. `--public-url` is
    /// [`PUBLIC_URL`] unless `extra` has one; the runner URL is an address no pod
    /// reaches unless `extra` has `--runner-url`.
    pub async fn start(cluster: &Cluster, namespace: &str, extra: &[&str]) -> Self {
        Self::start_with(&cluster.kubeconfig_path(), namespace, namespace, extra).await
    }

    /// Like [`Operator::start`] with `kubeconfig`; `tag` goes into the log file's name.
    pub async fn start_with(
        kubeconfig: &std::path::Path,
        namespace: &str,
        tag: &str,
        extra: &[&str],
    ) -> Self {
        let mut args = vec!["--admin-listen", "127.0.0.1:0", "--namespaces", namespace];
        if !extra.contains(&"--public-url") {
            args.extend_from_slice(&["--public-url", PUBLIC_URL]);
        }
        args.extend_from_slice(extra);
        Self::attach(Process::start_with(
            kubeconfig,
            "hookrun-operator",
            tag,
            &args,
        ))
        .await
    }

    /// Takes over a started `hookrun-operator` (with flags of the caller's choice) and
    /// waits for the admin address it logs.
    pub async fn attach(process: Process) -> Self {
        let admin = process.logged("admin server listening", "address").await;
        Operator { process, admin }
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Waits until its caches have synced (it logs `caches synced: ready`).
    pub async fn ready(&self) {
        eventually(BUDGET, || async {
            self.log_text()
                .contains("caches synced: ready")
                .then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the operator never got ready: {}",
                self.process.log.display()
            )
        });
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// A series' value from `/metrics` (0 while the series does not exist).
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&metrics(&self.admin).await, series)
    }

    /// API writes of `controller` (`agent`, `session`) counted so far.
    pub async fn writes(&self, controller: &str) -> f64 {
        let text = metrics(&self.admin).await;
        let prefix = format!("hookrun_operator_api_writes_total{{controller=\"{controller}\",");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    }

    /// Reconciles of `controller` finished so far.
    pub async fn reconciled(&self, controller: &str) -> f64 {
        self.metric(&format!(
            "hookrun_operator_reconcile_duration_seconds_count{{controller=\"{controller}\"}}"
        ))
        .await
    }

    /// What a failure message needs to tell a stalled controller from one that never
    /// heard of the object: the reconciles each controller started and finished, and
    /// the last lines the operator logged.
    pub async fn state(&self) -> String {
        let text = metrics(&self.admin).await;
        let mut state = String::new();
        for controller in ["agent", "session"] {
            let started = metric(
                &text,
                &format!("hookrun_operator_reconciles_total{{controller=\"{controller}\"}}"),
            );
            let done = metric(
                &text,
                &format!(
                    "hookrun_operator_reconcile_duration_seconds_count{{controller=\"{controller}\"}}"
                ),
            );
            state.push_str(&format!(
                "{controller} reconciles: {started} started, {done} finished\n"
            ));
        }
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        state.push_str(&format!(
            "the operator's last lines ({}):\n",
            self.process.log.display()
        ));
        for line in &lines[lines.len().saturating_sub(20)..] {
            state.push_str(line);
            state.push('\n');
        }
        state
    }

    /// Waits until more than `finished` reconciles of `controller` have finished and
    /// none is running, and returns the finished count.
    pub async fn settled_after(&self, controller: &str, finished: f64) -> f64 {
        let started = format!("hookrun_operator_reconciles_total{{controller=\"{controller}\"}}");
        let done = format!(
            "hookrun_operator_reconcile_duration_seconds_count{{controller=\"{controller}\"}}"
        );
        eventually(BUDGET, || async {
            let text = metrics(&self.admin).await;
            let (started, done) = (metric(&text, &started), metric(&text, &done));
            (done > finished && started == done).then_some(done)
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "the {controller} controller did not settle after {finished} reconciles: {}",
                self.process.log.display()
            )
        })
    }
}

/// The operator and the apiserver, both watching only `ns`.
pub struct Door {
    pub operator: Operator,
    pub apiserver: Process,
    /// `host:port` of the public listener.
    pub public: String,
    /// `host:port` of the runner listener.
    pub runner: String,
    /// `host:port` of the admin listener.
    pub admin: String,
}

impl Door {
    /// Starts both binaries on `ns` and waits for the apiserver's addresses.
    pub async fn start(cluster: &Cluster, ns: &TestNamespace) -> Self {
        Self::start_with(cluster, ns, &cluster.kubeconfig_path()).await
    }

    /// Like [`Door::start`], with the apiserver reaching the cluster through
    /// `kubeconfig`.
    pub async fn start_with(
        cluster: &Cluster,
        ns: &TestNamespace,
        kubeconfig: &std::path::Path,
    ) -> Self {
        Self::start_with_args(cluster, ns, kubeconfig, &[]).await
    }

    /// Like [`Door::start_with`], with `extra` flags for the apiserver.
    pub async fn start_with_args(
        cluster: &Cluster,
        ns: &TestNamespace,
        kubeconfig: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let operator = Operator::start(cluster, ns.name(), &[]).await;
        let apiserver = ApiServer::start_with_args(kubeconfig, ns.name(), ns.name(), extra).await;
        Door {
            operator,
            apiserver: apiserver.process,
            public: apiserver.public,
            runner: apiserver.runner,
            admin: apiserver.admin,
        }
    }

    /// A POST to the public listener.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        request(&self.public, "POST", path, headers, body).await
    }

    /// Waits until the apiserver knows the Agent's current token (a GET ping is 200).
    pub async fn wait_until_known(&self, path: &str) {
        assert!(
            is_known(&self.public, path).await,
            "the apiserver never accepted the token; log: {}",
            self.apiserver.log_text()
        );
    }
}

/// Whether the apiserver at `address` comes to accept the webhook `path` (a GET ping is
/// 200) within [`BUDGET`].
pub async fn is_known(address: &str, path: &str) -> bool {
    eventually(BUDGET, || async {
        (request(address, "GET", path, &[], "").await.status == 200).then_some(())
    })
    .await
    .is_some()
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: Value,
    /// The body as text (an SSE stream, the metrics).
    pub text: String,
}

impl Answer {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A GET with no headers.
pub async fn get(address: &str, path: &str) -> Answer {
    request(address, "GET", path, &[], "").await
}

/// The text of `GET /metrics` on an admin listener.
pub async fn metrics(admin: &str) -> String {
    let answer = get(admin, "/metrics").await;
    assert_eq!(answer.status, 200, "GET /metrics on {admin}");
    answer.text
}

/// The value of `series` (its name and labels exactly as exposed) in a metrics text, 0
/// while the series does not exist.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter(|rest| rest.starts_with(' '))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}

/// How long [`request`] waits for a whole answer.
const ANSWER_BUDGET: Duration = Duration::from_secs(90);

/// A minimal HTTP/1.1 request with `Connection: close`, read until the server closes
/// (within 90 s, long enough for a held wait-mode request).
pub async fn request(
    address: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("the apiserver accepts");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .expect("request sent");
    stream.write_all(body.as_bytes()).await.expect("body sent");
    let mut response = Vec::new();
    tokio::time::timeout(ANSWER_BUDGET, stream.read_to_end(&mut response))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no whole answer within {ANSWER_BUDGET:?}"))
        .expect("response read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        json: serde_json::from_str(body).unwrap_or(Value::Null),
        text: body.to_owned(),
    }
}

/// The Agent's webhook path, once the operator minted its token.
pub async fn webhook_path(agents: &Api<Agent>, ns: &str, name: &str) -> String {
    webhook_path_other_than(agents, ns, name, None).await
}

/// The Agent's webhook path once its token is not `not`.
pub async fn webhook_path_other_than(
    agents: &Api<Agent>,
    ns: &str,
    name: &str,
    not: Option<&str>,
) -> String {
    let token = eventually(BUDGET, || async {
        let url = agents.get(name).await.ok()?.status?.webhook_url?;
        let token = url.rsplit('/').next()?.to_owned();
        (token.len() == 43 && Some(url.as_str()) != not).then_some(token)
    })
    .await
    .unwrap_or_else(|| panic!("agent {name} got no webhook URL"));
    names::webhook_path(ns, name, &token)
}

/// Who holds the operator's Lease in `leases`' namespace, if anyone.
pub async fn lease_holder(
    leases: &Api<k8s_openapi::api::coordination::v1::Lease>,
) -> Option<String> {
    leases
        .get_opt("hookrun-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Two operators electing a leader in `namespace` with leases of `lease` (e.g. "4s"),
/// each telling Agents its own public URL: the first, once it holds the Lease, then the
/// second, standing by.
pub async fn elected_pair(
    cluster: &Cluster,
    namespace: &str,
    lease: &str,
    leader_url: &str,
    standby_url: &str,
) -> (Operator, Operator) {
    let leases = Api::namespaced(cluster.client().await, namespace);
    let election = [
        "--leader-elect",
        "--leader-election-namespace",
        namespace,
        "--leader-election-lease-duration",
        lease,
    ];
    let leader = Operator::start(
        cluster,
        namespace,
        &[&["--public-url", leader_url][..], &election].concat(),
    )
    .await;
    let leader_pid = format!("-{}", leader.pid());
    eventually(BUDGET, || async {
        lease_holder(&leases)
            .await
            .filter(|h| h.ends_with(&leader_pid))
    })
    .await
    .expect("the first operator leads");
    let standby = Operator::start(
        cluster,
        namespace,
        &[&["--public-url", standby_url][..], &election].concat(),
    )
    .await;
    (leader, standby)
}
