//! A real, local Kubernetes control plane: etcd, kube-apiserver and
//! kube-controller-manager started from the binaries `make tools` builds, on loopback
//! ports, with an admin token and a ServiceAccount signing key (TokenRequest,
//! TokenReview and projected tokens work). `make cluster-up` and the cluster tests both
//! start it through this code.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use rand::{Rng, distr::Alphanumeric};
use tokio::process::Child;

use crate::tied;

/// The component pid file in the state directory: `name pid` lines, one a component,
/// written as each starts.
pub const PIDS_FILE: &str = "pids";
/// The supervisor's pid file in the state directory (the pid alone).
pub const SUPERVISOR_PID_FILE: &str = "supervisor.pid";
/// The supervisor binary that records itself in [`SUPERVISOR_PID_FILE`].
pub const SUPERVISOR: &str = "hookrun-cluster";

/// What went wrong starting or stopping the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{binary} is missing: run `make tools` (it builds the control plane from Go modules)")]
    MissingBinary { binary: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {component}: {source}")]
    Spawn {
        component: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{component} exited early ({status}); its log is {log}")]
    Exited {
        component: &'static str,
        status: std::process::ExitStatus,
        log: PathBuf,
    },
    #[error("kube-apiserver was not ready after {0:?}; logs are in {1}")]
    NotReady(Duration, PathBuf),
    #[error("cannot generate the ServiceAccount signing key: {0}")]
    Key(#[from] rcgen::Error),
    #[error("no free loopback port: {0}")]
    Port(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the control plane keeps its state and finds its binaries.
#[derive(Clone, Debug)]
pub struct Config {
    /// etcd data, certificates, keys, logs and the kubeconfig live here.
    pub state_dir: PathBuf,
    /// The directory holding etcd, kube-apiserver and kube-controller-manager.
    pub tools_bin: PathBuf,
    /// Start kube-controller-manager (garbage collection, namespace deletion,
    /// ServiceAccounts).
    pub controller_manager: bool,
}

/// The workspace root, found from this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// `target/tools/bin` under the workspace, or `$HOOKRUN_TOOLS_BIN`.
pub fn default_tools_bin() -> PathBuf {
    std::env::var_os("HOOKRUN_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/tools/bin"))
}

/// Why a client could not be built from a kubeconfig.
pub type ClientError = Box<dyn std::error::Error + Send + Sync>;

/// A client for the cluster a kubeconfig file describes.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client, ClientError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Stops what an earlier control plane in `state_dir` left running (its supervisor was
/// killed before it could stop them, or they were started by hand): the supervisor
/// recorded in [`SUPERVISOR_PID_FILE`], then the components in [`PIDS_FILE`], each only
/// while its pid still runs the recorded binary. Answers what was stopped.
pub fn stop_stale(state_dir: &Path) -> Vec<(String, u32)> {
    let mut stopped = Vec::new();
    let supervisor = state_dir.join(SUPERVISOR_PID_FILE);
    if let Some(pid) = std::fs::read_to_string(&supervisor)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        && pid != std::process::id()
        && tied::stop(pid, SUPERVISOR, Duration::from_secs(10))
    {
        stopped.push((SUPERVISOR.to_owned(), pid));
    }
    stopped.extend(tied::stop_recorded(&state_dir.join(PIDS_FILE)));
    stopped
}

/// A running control plane. Dropping it kills its processes; they also die with this
/// process however it dies, and are recorded in `<state_dir>/pids`.
pub struct ControlPlane {
    config: Config,
    children: Vec<(&'static str, Child)>,
    /// The flags each component was started with, to start it again the same way.
    args: Vec<(&'static str, Vec<String>)>,
    server: String,
    admin_token: String,
}

const KUBE_APISERVER: &str = "kube-apiserver";

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(Error::Port)?;
    Ok(listener.local_addr().map_err(Error::Port)?.port())
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        action: "write",
        path: path.into(),
        source,
    })
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (optionally) kube-controller-manager and waits
    /// until the apiserver's `/readyz` answers. Writes `<state_dir>/kubeconfig`.
    pub async fn start(config: Config) -> Result<Self> {
        for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            let path = config.tools_bin.join(binary);
            if !path.exists() {
                return Err(Error::MissingBinary { binary: path });
            }
        }
        let dir = &config.state_dir;
        // Stale components of an earlier run in the same directory would hold its etcd
        // data and ports.
        tied::stop_recorded(&dir.join(PIDS_FILE));
        for sub in ["", "etcd", "certs", "logs"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                action: "create",
                path: path.clone(),
                source,
            })?;
        }

        let admin_token: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        write(
            &dir.join("tokens.csv"),
            &format!("{admin_token},admin,admin,\"system:masters\"\n"),
        )?;
        let key = rcgen::KeyPair::generate()?;
        write(&dir.join("sa.key"), &key.serialize_pem())?;
        write(&dir.join("sa.pub"), &key.public_key_pem())?;

        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");

        let mut plane = ControlPlane {
            config: config.clone(),
            children: Vec::new(),
            args: Vec::new(),
            server,
            admin_token,
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        plane
            .spawn(
                "etcd",
                vec![
                    format!("--data-dir={}", dir.join("etcd").display()),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    format!("--listen-peer-urls={peer_url}"),
                    format!("--initial-advertise-peer-urls={peer_url}"),
                    format!("--initial-cluster=default={peer_url}"),
                    "--unsafe-no-fsync=true".into(),
                    "--log-level=warn".into(),
                ],
            )
            .await?;

        let path = |name: &str| dir.join(name).display().to_string();
        plane
            .spawn(
                "kube-apiserver",
                vec![
                    format!("--etcd-servers={etcd_url}"),
                    format!("--cert-dir={}", path("certs")),
                    format!("--secure-port={api_port}"),
                    "--bind-address=127.0.0.1".into(),
                    "--advertise-address=127.0.0.1".into(),
                    format!("--token-auth-file={}", path("tokens.csv")),
                    "--authorization-mode=RBAC".into(),
                    // As hardened clusters run it: an owner reference that blocks its
                    // owner's deletion needs `update` on the owner's finalizers, which the
                    // chart's RBAC must then grant (the chart test proves it does).
                    "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".into(),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                    format!("--service-account-key-file={}", path("sa.pub")),
                    format!("--service-account-signing-key-file={}", path("sa.key")),
                    "--service-cluster-ip-range=10.96.0.0/16".into(),
                    "--endpoint-reconciler-type=none".into(),
                    "--allow-privileged=true".into(),
                    "--v=0".into(),
                ],
            )
            .await?;

        plane.write_kubeconfig()?;
        plane.wait_ready(Duration::from_secs(120)).await?;

        if config.controller_manager {
            plane.spawn("kube-controller-manager", vec![
                format!("--kubeconfig={}", path("kubeconfig")),
                format!("--authentication-kubeconfig={}", path("kubeconfig")),
                format!("--authorization-kubeconfig={}", path("kubeconfig")),
                format!("--root-ca-file={}", path("certs/apiserver.crt")),
                format!("--service-account-private-key-file={}", path("sa.key")),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--use-service-account-credentials=false".into(),
                "--controllers=*,-nodeipam,-nodelifecycle,-persistentvolume-binder,-attachdetach,-persistentvolume-expander,-cloud-node-lifecycle,-ttl,-bootstrapsigner,-tokencleaner".into(),
                "--v=0".into(),
            ]).await?;
        }
        Ok(plane)
    }

    async fn spawn(&mut self, component: &'static str, args: Vec<String>) -> Result<()> {
        let log_path = self
            .config
            .state_dir
            .join("logs")
            .join(format!("{component}.log"));
        // Appended to, so that a component started again keeps its earlier log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| Error::Io {
                action: "create",
                path: log_path.clone(),
                source,
            })?;
        let err = log.try_clone().map_err(|source| Error::Io {
            action: "open",
            path: log_path,
            source,
        })?;
        let mut command = tied::command(self.config.tools_bin.join(component));
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        let child = tied::spawn(command)
            .await
            .map_err(|source| Error::Spawn { component, source })?;
        let pids = self.config.state_dir.join(PIDS_FILE);
        if let Some(pid) = child.id() {
            tied::record(&pids, component, pid).map_err(|source| Error::Io {
                action: "write",
                path: pids,
                source,
            })?;
        }
        self.children.push((component, child));
        self.args.retain(|(name, _)| *name != component);
        self.args.push((component, args));
        Ok(())
    }

    /// Kills kube-apiserver (SIGKILL, as a crash or a lost node does) and waits for it to
    /// exit; etcd and the other components keep running. Its port, certificates and
    /// flags are kept for [`ControlPlane::start_kube_apiserver`].
    pub async fn stop_kube_apiserver(&mut self) {
        if let Some(at) = self.children.iter().position(|(c, _)| *c == KUBE_APISERVER) {
            let (_, mut child) = self.children.remove(at);
            let _ = child.kill().await;
        }
    }

    /// Starts kube-apiserver again after [`ControlPlane::stop_kube_apiserver`], with the
    /// same flags (so the same port, certificates and etcd), and waits up to `budget`
    /// for its `/readyz`.
    pub async fn start_kube_apiserver(&mut self, budget: Duration) -> Result<()> {
        if self.children.iter().any(|(c, _)| *c == KUBE_APISERVER) {
            return Ok(());
        }
        let args = self
            .args
            .iter()
            .find(|(c, _)| *c == KUBE_APISERVER)
            .map(|(_, args)| args.clone())
            .unwrap_or_default();
        self.spawn(KUBE_APISERVER, args).await?;
        self.wait_ready(budget).await
    }

    fn write_kubeconfig(&self) -> Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: hookrun-local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: hookrun-local
  context: {{cluster: hookrun-local, user: admin, namespace: default}}
current-context: hookrun-local
",
            server = self.server,
            ca = self.config.state_dir.join("certs/apiserver.crt").display(),
            token = self.admin_token,
        );
        write(&self.kubeconfig_path(), &kubeconfig)
    }

    async fn wait_ready(&mut self, budget: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            for (component, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = self
                        .config
                        .state_dir
                        .join("logs")
                        .join(format!("{component}.log"));
                    return Err(Error::Exited {
                        component,
                        status,
                        log,
                    });
                }
            }
            if self.readyz().await {
                return Ok(());
            }
            if started.elapsed() > budget {
                return Err(Error::NotReady(budget, self.config.state_dir.join("logs")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn readyz(&self) -> bool {
        let Ok(client) = self.client().await else {
            return false;
        };
        let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
            return false;
        };
        matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Result<kube::Client, ClientError> {
        client_for(&self.kubeconfig_path()).await
    }

    /// `<state_dir>/kubeconfig`, an admin kubeconfig.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.config.state_dir.join("kubeconfig")
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// The pids of the running components, for `cluster-down` to stop them by pid.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children
            .iter()
            .filter_map(|(name, child)| Some((*name, child.id()?)))
            .collect()
    }

    /// Returns when one of the components exits, naming it.
    pub async fn wait_any_exit(&mut self) -> &'static str {
        loop {
            for (component, child) in &mut self.children {
                if let Ok(Some(_)) = child.try_wait() {
                    return component;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stops every component, newest first, and waits for each to exit.
    pub async fn stop(&mut self) {
        while let Some((_, mut child)) = self.children.pop() {
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(self.config.state_dir.join(PIDS_FILE));
    }
}
