//! The real `hookrun-operator` and `hookrun-apiserver` as child processes watching one
//! test namespace, and a minimal HTTP/1.1 client for the apiserver's door.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
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
            .env("RUST_LOG", "info")
            // The operator's sessions flag; an address no pod reaches in these tests.
            .env("HOOKRUN_RUNNER_URL", "http://127.0.0.1:9/")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{binary} starts: {e}"));
        Process { child, log }
    }

    /// Its process id (for reading its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
        let process = Process::start_with(kubeconfig, "hookrun-apiserver", tag, &args);
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

/// The value of the first ` name=value` field in a log text.
pub fn logged_field(text: &str, name: &str) -> Option<String> {
    let rest = text.split(&format!(" {name}=")).nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

/// The operator and the apiserver, both watching only `ns`.
pub struct Door {
    _operator: Process,
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
        let operator = Process::start(
            cluster,
            "hookrun-operator",
            ns.name(),
            &[
                "--public-url",
                "https://hooks.example.test/",
                "--admin-listen",
                "127.0.0.1:0",
                "--namespaces",
                ns.name(),
            ],
        );
        let apiserver = ApiServer::start_with_args(kubeconfig, ns.name(), ns.name(), extra).await;
        Door {
            _operator: operator,
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
    pub json: Value,
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

/// A minimal HTTP/1.1 request with `Connection: close`.
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
    stream
        .read_to_end(&mut response)
        .await
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
