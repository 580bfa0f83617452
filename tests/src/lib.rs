//! Test support for hookrun: the local control plane ([`control_plane`]), one shared
//! cluster per test binary ([`cluster`]), a namespace per test ([`TestNamespace`]), the
//! one launcher of the operator and the apiserver and the one HTTP client ([`door`]), the
//! stand-in for the kubelet that runs session pods as local harness processes
//! ([`pod_runner`]), a scripted model API ([`fake_model`]) and child processes that die
//! with their supervisor ([`tied`]).
//!
//! Cluster tests never read the shell's `KUBECONFIG`: they start their own control plane
//! through the `hookrun-cluster` binary, which stops it when the test process exits.

pub mod browser;
pub mod control_plane;
pub mod door;
pub mod fake_model;
pub mod fixtures;
pub mod pod_runner;
pub mod tied;

/// `println!` for supervisors: a stdout whose reader went away (`make dev | tee log`, then
/// Ctrl-C, which stops `tee` first) is not an error. `println!` would panic on it and skip
/// stopping what the supervisor started.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` for supervisors; see [`say!`].
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        let _ = ::std::writeln!(::std::io::stderr(), $($arg)*);
    }};
}

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use rand::{Rng, distr::Alphanumeric};
use tokio::sync::OnceCell;

/// A control plane shared by every test of one test binary.
pub struct Cluster {
    state_dir: PathBuf,
    /// The `hookrun-cluster run` supervisor; it stops the control plane when this
    /// process exits.
    _supervisor: std::process::Child,
}

impl Cluster {
    /// The admin kubeconfig of this cluster.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.state_dir.join("kubeconfig")
    }

    /// A new admin client. Each test gets its own: a client is bound to the runtime that
    /// made it, and every `#[tokio::test]` has its own runtime.
    pub async fn client(&self) -> Client {
        control_plane::client_for(&self.kubeconfig_path())
            .await
            .expect("a client for the test cluster")
    }

    /// Runs the control plane's kubectl against this cluster.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with_stdin(args, None)
    }

    /// Runs kubectl with `stdin` as its input (for `apply -f -`).
    pub fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(&self.kubeconfig_path(), args, stdin)
    }
}

/// Runs `target/tools/bin/kubectl` with a kubeconfig.
pub fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(control_plane::default_tools_bin().join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs (make tools builds it)");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .expect("kubectl reads its input");
    }
    child.wait_with_output().expect("kubectl finishes")
}

static CLUSTER: OnceCell<Cluster> = OnceCell::const_new();

/// The control plane of this test binary, started on first use with hookrun's CRDs
/// installed and Established. It stops when the test process exits.
pub async fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start_cluster).await
}

/// The path of a workspace binary built with the same profile as the running test
/// (`hookrun-operator`, `hookrun-apiserver`, ...). Test binaries live in
/// `<target>/<profile>/deps`; `make test` builds every binary before the tests run.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

fn cluster_binary() -> PathBuf {
    workspace_binary("hookrun-cluster")
}

async fn start_cluster() -> Cluster {
    let pid = std::process::id();
    let state_dir = control_plane::workspace_root()
        .join("target/test-clusters")
        .join(pid.to_string());
    let _ = std::fs::remove_dir_all(&state_dir);
    let log = state_dir.with_extension("log");
    std::fs::create_dir_all(state_dir.parent().expect("a parent")).expect("target/test-clusters");
    let log_file = std::fs::File::create(&log).expect("the cluster log file");
    let supervisor = Command::new(cluster_binary())
        .args([
            "run",
            "--remove-state",
            "--exit-with-pid",
            &pid.to_string(),
            "--state",
        ])
        .arg(&state_dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .spawn()
        .expect("hookrun-cluster starts");

    let ready = state_dir.join("ready");
    let started = Instant::now();
    while !ready.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "the control plane did not become ready in 180s; see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cluster = Cluster {
        state_dir,
        _supervisor: supervisor,
    };
    install_crds(&cluster.client().await).await;
    cluster
}

/// Applies hookrun's CRDs and waits until they are Established.
pub async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in hookrun_crds::crd::all() {
        let name = crd.metadata.name.clone().expect("a CRD has a name");
        crds.patch(
            &name,
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("the CRD applies");
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("the CRD is Established within 30s")
        .expect("watching the CRD works");
    }
}

/// A namespace of its own for one test, deleted when dropped.
pub struct TestNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl TestNamespace {
    /// Creates `hr-test-<random>` and waits (briefly) for its `default` ServiceAccount,
    /// which pods need.
    pub async fn new(cluster: &Cluster) -> Self {
        let client = cluster.client().await;
        let suffix: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(8)
            .map(|c| char::from(c).to_ascii_lowercase())
            .collect();
        let name = format!("hr-test-{suffix}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .expect("the test namespace is created");
        let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
        let started = Instant::now();
        while accounts.get_opt("default").await.ok().flatten().is_none()
            && started.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        TestNamespace {
            name,
            kubeconfig: cluster.kubeconfig_path(),
        }
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs kubectl in this namespace, with `stdin` as its input when given.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        kubectl(&self.kubeconfig, &all, stdin)
    }

    /// Applies `manifest` (YAML, several documents allowed) in this namespace.
    pub fn apply(&self, manifest: &str) {
        let applied = self.kubectl(&["apply", "-f", "-"], Some(manifest));
        assert!(
            applied.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
    }

    /// A token of the ServiceAccount `account`, with `kubectl create token`'s extra flags
    /// (`--audience`, `--bound-object-*`).
    pub fn token(&self, account: &str, flags: &[&str]) -> String {
        let mut args = vec!["create", "token", account];
        args.extend_from_slice(flags);
        let token = self.kubectl(&args, None);
        assert!(
            token.status.success(),
            "kubectl create token: {}",
            String::from_utf8_lossy(&token.stderr)
        );
        String::from_utf8_lossy(&token.stdout).trim().to_owned()
    }

    /// A `hookrun`-audience token of the `default` ServiceAccount bound to pod `name`
    /// (what a session pod's projected token is).
    pub fn pod_token(&self, name: &str, uid: &str) -> String {
        self.token(
            "default",
            &[
                "--audience",
                "hookrun",
                "--bound-object-kind",
                "Pod",
                "--bound-object-name",
                name,
                "--bound-object-uid",
                uid,
            ],
        )
    }

    /// Creates a ServiceAccount `reader` allowed to `get` Sessions in this namespace (what
    /// the read API asks the cluster) and returns a token of it.
    pub fn session_reader_token(&self) -> String {
        self.apply(&format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: reader}}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: session-reader}}\n\
             rules: [{{apiGroups: [hookrun.dev], resources: [sessions], verbs: [get]}}]\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: session-reader}}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: session-reader}}\n\
             subjects: [{{kind: ServiceAccount, name: reader, namespace: {}}}]\n",
            self.name
        ));
        self.token("reader", &[])
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Synchronous on purpose: Drop cannot await, and a spawned task would die with
        // the test's runtime.
        let _ = kubectl(
            &self.kubeconfig,
            &["delete", "namespace", &self.name, "--wait=false"],
            None,
        );
    }
}

/// Applies an Agent from a JSON manifest (its `spec`, and `metadata` such as annotations)
/// with server-side apply, filling in `apiVersion`, `kind` and the name.
pub async fn apply_agent(
    agents: &Api<hookrun_crds::Agent>,
    name: &str,
    manifest: serde_json::Value,
) {
    let mut manifest = manifest;
    manifest["apiVersion"] = serde_json::json!("hookrun.dev/v1alpha1");
    manifest["kind"] = serde_json::json!("Agent");
    manifest["metadata"]["name"] = serde_json::json!(name);
    agents
        .patch(
            name,
            &PatchParams::apply("hookrun-tests").force(),
            &Patch::Apply(&manifest),
        )
        .await
        .expect("the Agent applies");
}

/// Polls `check` until it returns `Some` or `budget` runs out.
pub async fn eventually<T, F, Fut>(budget: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if started.elapsed() > budget {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
