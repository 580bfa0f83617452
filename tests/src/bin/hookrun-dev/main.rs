//! `hookrun-dev`: what `make dev` runs once the binaries are built. On a machine with no
//! cluster it starts the local control plane (or reuses the one `make cluster-up`
//! started), installs the CRDs, starts the operator, the apiserver and a local pod
//! runner that stands in for the kubelet (dev only: it never ships in the chart),
//! applies `examples/`, prints each Agent's webhook URL with ready-to-paste `curl`
//! lines, then prints a line per session until Ctrl-C, which stops everything it
//! started, by pid.

mod children;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use hookrun_crds::{Agent, names};
use hookrun_tests::control_plane::{self, workspace_root};
use hookrun_tests::{door, say, say_err, tied};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use tokio::process::Command;

use children::Started;
use hookrun_tests::pod_runner::PodRunner;

#[derive(Parser)]
#[command(
    version,
    about = "make dev: hookrun on a local control plane, with a local pod runner"
)]
struct Cli {
    /// The control plane's state (shared with `make cluster-up`).
    #[arg(long, default_value_os_t = workspace_root().join("target/dev-cluster"))]
    state: PathBuf,
    /// Logs of the operator, the apiserver and every session.
    #[arg(long, default_value_os_t = workspace_root().join("target/dev-logs"))]
    logs: PathBuf,
    /// The apiserver's public listener; webhook URLs point here.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The apiserver's runner listener; the runner URL of session pods points here.
    #[arg(long, default_value = "127.0.0.1:8081")]
    runner_listen: SocketAddr,
    /// The apiserver's admin listener (health, metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// The operator's admin listener.
    #[arg(long, default_value = "127.0.0.1:9091")]
    operator_admin_listen: SocketAddr,
    /// The one image the local pod runner runs (as the local hookrun-harness binary).
    #[arg(long, default_value = "hookrun-harness:dev")]
    harness_image: String,
    /// The manifests applied once everything runs.
    #[arg(long, default_value_os_t = workspace_root().join("examples"))]
    examples: PathBuf,
}

/// The pid file of what hookrun-dev started, in the logs directory.
const DEV_PIDS: &str = "dev.pids";

/// Everything started so far, stopped in reverse order.
#[derive(Default)]
struct Stack {
    /// The control plane's supervisor, when this run started it.
    cluster: Option<Started>,
    operator: Option<Started>,
    apiserver: Option<Started>,
    runner: Option<(PodRunner, tokio::task::JoinHandle<()>)>,
}

impl Stack {
    async fn stop(mut self, logs: &Path) {
        if let Some((runner, task)) = self.runner.take() {
            runner.stop_all();
            for _ in 0..50 {
                if !runner.busy() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            task.abort();
        }
        for started in [
            self.apiserver.take(),
            self.operator.take(),
            self.cluster.take(),
        ]
        .into_iter()
        .flatten()
        {
            let (name, pid) = (started.name.clone(), started.pid());
            started.stop().await;
            say!("dev: stopped {name} (pid {pid})");
        }
        let _ = std::fs::remove_file(logs.join(DEV_PIDS));
    }

    fn record(&self, logs: &Path) {
        let path = logs.join(DEV_PIDS);
        let _ = std::fs::remove_file(&path);
        for started in [&self.cluster, &self.operator, &self.apiserver]
            .into_iter()
            .flatten()
        {
            if let Err(error) = tied::record(&path, &started.name, started.pid()) {
                say_err!(
                    "dev: cannot record {} in {}: {error}",
                    started.name,
                    path.display()
                );
            }
        }
    }
}

fn binary(name: &str) -> Result<PathBuf, String> {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let path = dir.join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it with `cargo build --bins` (make dev does)",
            path.display()
        ))
    }
}

fn port_free(address: SocketAddr, flag: &str) -> Result<(), String> {
    TcpListener::bind(address).map(drop).map_err(|error| {
        format!(
            "{address} is taken ({error}): is another make dev running? Stop it, or pass \
             {flag} to hookrun-dev"
        )
    })
}

/// Whether a control plane started by `make cluster-up` runs in `state`.
fn running_cluster(state: &Path) -> bool {
    state.join("ready").exists()
        && std::fs::read_to_string(state.join(control_plane::SUPERVISOR_PID_FILE))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| tied::runs(pid, control_plane::SUPERVISOR))
}

/// Says what a cleanup of an earlier run stopped.
fn report_stale(stopped: &[(String, u32)], by: &str) {
    for (name, pid) in stopped {
        say!("dev: stopped {name} (pid {pid}) left running by {by}");
    }
}

async fn http_ok(address: SocketAddr, path: &str) -> bool {
    if tokio::net::TcpStream::connect(address).await.is_err() {
        return false;
    }
    let (address, path) = (address.to_string(), path.to_owned());
    // door::request panics when nobody listens (it serves tests): in its own task, a
    // listener that went away in between is "not yet", not a crash.
    let probe =
        tokio::spawn(
            async move { door::request(&address, "GET", &path, &[], "").await.status == 200 },
        );
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn wait_ready(started: &mut Started, admin: SocketAddr) -> Result<(), String> {
    let begun = Instant::now();
    loop {
        if http_ok(admin, "/readyz").await {
            return Ok(());
        }
        if begun.elapsed() > Duration::from_secs(90) {
            return Err(format!(
                "{} was not ready after 90 s; its log ({}):\n{}",
                started.name,
                started.log.display(),
                tail(&started.log)
            ));
        }
        tokio::select! {
            status = started.exited() => {
                return Err(format!(
                    "{} exited ({status}); its log ({}):\n{}",
                    started.name,
                    started.log.display(),
                    tail(&started.log)
                ));
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Starts everything; answers the client of the cluster.
async fn start(cli: &Cli, stack: &mut Stack) -> Result<Client, String> {
    let cluster_bin = binary("hookrun-cluster")?;
    let operator_bin = binary("hookrun-operator")?;
    let apiserver_bin = binary("hookrun-apiserver")?;
    let harness_bin = binary("hookrun-harness")?;
    std::fs::create_dir_all(cli.logs.join("sessions"))
        .map_err(|e| format!("cannot create {}: {e}", cli.logs.display()))?;
    report_stale(
        &tied::stop_recorded(&cli.logs.join(DEV_PIDS)),
        "an earlier make dev",
    );
    port_free(cli.listen, "--listen")?;
    port_free(cli.runner_listen, "--runner-listen")?;
    port_free(cli.admin_listen, "--admin-listen")?;
    port_free(cli.operator_admin_listen, "--operator-admin-listen")?;

    let kubeconfig = cli.state.join("kubeconfig");
    if running_cluster(&cli.state) {
        say!(
            "dev: reusing the control plane already running in {}",
            cli.state.display()
        );
    } else {
        report_stale(
            &control_plane::stop_stale(&cli.state),
            "an earlier control plane",
        );
        let _ = std::fs::remove_dir_all(&cli.state);
        std::fs::create_dir_all(&cli.state)
            .map_err(|e| format!("cannot create {}: {e}", cli.state.display()))?;
        say!("dev: starting etcd, kube-apiserver and kube-controller-manager");
        let args: Vec<String> = vec![
            "run".into(),
            "--state".into(),
            cli.state.display().to_string(),
            "--remove-state".into(),
            // Even if make dev is killed outright, the control plane goes with it.
            "--exit-with-pid".into(),
            std::process::id().to_string(),
        ];
        let mut cluster = Started::spawn(&cluster_bin, &args, &kubeconfig, &cli.logs).await?;
        let begun = Instant::now();
        while !cli.state.join("ready").exists() {
            if begun.elapsed() > Duration::from_secs(180) {
                stack.cluster = Some(cluster);
                return Err("the control plane was not ready after 180 s".into());
            }
            tokio::select! {
                status = cluster.exited() => {
                    return Err(format!(
                        "the control plane exited ({status}); its log ({}):\n{}",
                        cluster.log.display(),
                        tail(&cluster.log)
                    ));
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        say!(
            "dev: control plane ready after {:.1}s",
            begun.elapsed().as_secs_f64()
        );
        stack.cluster = Some(cluster);
        stack.record(&cli.logs);
    }
    let client = control_plane::client_for(&kubeconfig)
        .await
        .map_err(|e| format!("cannot build a client from {}: {e}", kubeconfig.display()))?;
    // install_crds panics on failure (it serves tests); a task turns that into an error.
    tokio::spawn({
        let client = client.clone();
        async move { hookrun_tests::install_crds(&client).await }
    })
    .await
    .map_err(|_| "installing the CRDs failed".to_string())?;
    say!("dev: CRDs installed");

    let public = format!("http://{}", cli.listen);
    let runner = format!("http://{}", cli.runner_listen);
    let operator_args: Vec<String> = [
        "--public-url",
        &public,
        "--runner-url",
        &runner,
        "--default-harness-image",
        &cli.harness_image,
        "--admin-listen",
        &cli.operator_admin_listen.to_string(),
        // Everything runs on this machine: a callback from one example Agent to another
        // goes to the local apiserver (loopback). Never in a cluster.
        "--callback-allow-loopback",
    ]
    .map(str::to_owned)
    .to_vec();
    stack.operator =
        Some(Started::spawn(&operator_bin, &operator_args, &kubeconfig, &cli.logs).await?);
    let apiserver_args: Vec<String> = [
        "--listen",
        &cli.listen.to_string(),
        "--runner-listen",
        &cli.runner_listen.to_string(),
        "--admin-listen",
        &cli.admin_listen.to_string(),
        // One local replica and no load balancer: nothing to drain towards, so Ctrl-C
        // answers held requests (202 + pollUrl) and exits at once.
        "--drain-period",
        "0s",
    ]
    .map(str::to_owned)
    .to_vec();
    stack.apiserver =
        Some(Started::spawn(&apiserver_bin, &apiserver_args, &kubeconfig, &cli.logs).await?);
    stack.record(&cli.logs);
    for (started, admin) in [
        (stack.operator.as_mut(), cli.operator_admin_listen),
        (stack.apiserver.as_mut(), cli.admin_listen),
    ] {
        if let Some(started) = started {
            wait_ready(started, admin).await?;
            say!(
                "dev: {} ready (pid {}, log {})",
                started.name,
                started.pid(),
                started.log.display()
            );
        }
    }

    let runner = PodRunner::new(
        client.clone(),
        &cli.harness_image,
        harness_bin,
        cli.logs.join("sessions"),
    );
    let task = tokio::spawn(runner.clone().run());
    stack.runner = Some((runner, task));
    say!(
        "dev: local pod runner ready (runs {} as {})",
        cli.harness_image,
        binary("hookrun-harness")?.display()
    );

    let applied = Command::new(control_plane::default_tools_bin().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-n", "default", "-f"])
        .arg(&cli.examples)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run kubectl: {e}"))?;
    let text = String::from_utf8_lossy(&applied.stdout);
    for line in text.lines() {
        say!("dev:   {line}");
    }
    if !applied.status.success() {
        return Err(format!(
            "kubectl apply -f {} failed:\n{}",
            cli.examples.display(),
            String::from_utf8_lossy(&applied.stderr)
        ));
    }
    Ok(client)
}

/// Waits for the Agents' URLs (the echo agent's at least) and prints them.
async fn print_agents(client: &Client) -> Result<(), String> {
    let agents: Api<Agent> = Api::namespaced(client.clone(), "default");
    let begun = Instant::now();
    let mut echo_since: Option<Instant> = None;
    let list = loop {
        let list = agents
            .list(&Default::default())
            .await
            .map_err(|e| format!("cannot list Agents: {e}"))?
            .items;
        let has_url = |a: &Agent| {
            a.status
                .as_ref()
                .and_then(|s| s.webhook_url.as_ref())
                .is_some()
        };
        if echo_since.is_none() && list.iter().any(|a| a.name_any() == "echo" && has_url(a)) {
            echo_since = Some(Instant::now());
        }
        let all = list
            .iter()
            .filter(|a| a.spec.webhook().is_some())
            .all(has_url);
        // The others get a few seconds after echo: a missing Secret can hold one back.
        if all || echo_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
            break list;
        }
        if begun.elapsed() > Duration::from_secs(60) {
            return Err(
                "the echo Agent got no webhook URL within 60 s; see the operator log".into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The quickstart's agent first, then the rest by name.
    let mut list = list;
    list.sort_by_key(|a| (a.name_any() != "echo", a.name_any()));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    say!();
    say!("hookrun is running. Webhook URLs of the Agents in examples/ (namespace default):");
    for agent in &list {
        say!();
        print_agent(agent, &secrets).await;
    }
    say!();
    say!("Sessions appear below as they start and end. Ctrl-C stops everything.");
    Ok(())
}

async fn print_agent(agent: &Agent, secrets: &Api<Secret>) {
    let name = agent.name_any();
    let Some(url) = agent.status.as_ref().and_then(|s| s.webhook_url.clone()) else {
        let why = agent
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "no webhook trigger".into());
        say!("  {name}: no webhook URL ({why})");
        return;
    };
    say!("  {name}  {url}");
    let webhook = agent.spec.webhook();
    let schemes: Vec<String> = webhook
        .map(|w| {
            w.signing_secrets()
                .into_iter()
                .map(|(s, _)| format!("{s:?}"))
                .collect()
        })
        .unwrap_or_default();
    let cidrs = webhook.map(|w| w.allow_cidrs.clone()).unwrap_or_default();
    if !schemes.is_empty() {
        say!(
            "    signed ({}): a plain curl gets 401; send it from the platform (examples/README.md)",
            schemes.join(", ")
        );
    } else if !cidrs.is_empty() {
        say!(
            "    only callers from {} are let in: a curl from here gets 403",
            cidrs.join(", ")
        );
    } else {
        say!("    curl -sS -H 'content-type: application/json' -d '{{\"title\":\"hello\"}}' {url}");
        say!(
            "    curl -sS -H 'content-type: application/json' -d '{{\"title\":\"hello\",\"wait\":60}}' {url}"
        );
    }
    let env = agent
        .spec
        .session
        .as_ref()
        .map(|s| s.env.clone())
        .unwrap_or_default();
    for reference in env
        .iter()
        .filter_map(|v| v.value_from.as_ref()?.secret_key_ref.as_ref())
    {
        let label = format!("{}={}", names::AGENT_ENV_LABEL, names::AGENT_ENV_OPT_IN);
        match secrets.get_opt(&reference.name).await.ok().flatten() {
            None => say!(
                "    sessions need Secret {:?}: kubectl create secret generic {} --from-literal={}=… \
                 && kubectl label secret {} {label}",
                reference.name,
                reference.name,
                reference.key,
                reference.name
            ),
            Some(secret)
                if secret
                    .labels()
                    .get(names::AGENT_ENV_LABEL)
                    .map(String::as_str)
                    != Some(names::AGENT_ENV_OPT_IN) =>
            {
                say!(
                    "    Secret {:?} must opt in to Agent env: kubectl label secret {} {label}",
                    reference.name,
                    reference.name
                )
            }
            Some(_) => {}
        }
    }
}

async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "Ctrl-C";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run(cli: Cli) -> ExitCode {
    let begun = Instant::now();
    let mut stack = Stack::default();
    let started = tokio::select! {
        started = start(&cli, &mut stack) => started,
        why = interrupted() => Err(format!("{why} while starting")),
    };
    let client = match started {
        Ok(client) => client,
        Err(error) => {
            say_err!("dev: {error}");
            stack.stop(&cli.logs).await;
            return ExitCode::FAILURE;
        }
    };
    let shown = tokio::select! {
        shown = print_agents(&client) => shown,
        why = interrupted() => Err(format!("{why} while waiting for webhook URLs")),
    };
    if let Err(error) = shown {
        say_err!("dev: {error}");
        stack.stop(&cli.logs).await;
        return ExitCode::FAILURE;
    }
    say!(
        "dev: ready in {:.1}s (kubectl: export KUBECONFIG={}; logs in {})",
        begun.elapsed().as_secs_f64(),
        cli.state.join("kubeconfig").display(),
        cli.logs.display()
    );

    let code = {
        let operator = stack.operator.as_mut().map(|s| (s.name.clone(), s));
        let apiserver = stack.apiserver.as_mut().map(|s| (s.name.clone(), s));
        match (operator, apiserver) {
            (Some((operator_name, operator)), Some((apiserver_name, apiserver))) => {
                tokio::select! {
                    why = interrupted() => {
                        say!("\ndev: {why}: stopping everything make dev started");
                        ExitCode::SUCCESS
                    }
                    status = operator.exited() => {
                        say_err!("dev: {operator_name} exited ({status}); see {}", operator.log.display());
                        ExitCode::FAILURE
                    }
                    status = apiserver.exited() => {
                        say_err!("dev: {apiserver_name} exited ({status}); see {}", apiserver.log.display());
                        ExitCode::FAILURE
                    }
                }
            }
            _ => ExitCode::FAILURE,
        }
    };
    stack.stop(&cli.logs).await;
    say!("dev: everything make dev started has stopped");
    code
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(error) => {
            say_err!("dev: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        }
    }
}
