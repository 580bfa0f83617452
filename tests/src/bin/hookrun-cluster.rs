//! `hookrun-cluster`: starts and stops the local control plane.
//!
//! - `up`: starts it in the background (or reuses a running one) and prints the
//!   `export KUBECONFIG=...` line;
//! - `down`: stops every process it started, by pid, and removes its state;
//! - `run`: the supervisor that `up` and the cluster tests start; it owns the processes
//!   and stops them on SIGTERM, when one of them dies, or when `--exit-with-pid` exits;
//!   they die with it if it is killed outright.
//!
//! `up` and `run` first stop what an earlier supervisor of the same state directory left
//! running (recorded in its pid files, matched by binary name).

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use hookrun_tests::control_plane::{self, ControlPlane, SUPERVISOR, SUPERVISOR_PID_FILE};
use hookrun_tests::{say, say_err, tied};

#[derive(Parser)]
#[command(
    version,
    about = "Start and stop hookrun's local Kubernetes control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the control plane in the background, or reuse the running one.
    Up {
        #[arg(long, default_value_os_t = default_state())]
        state: PathBuf,
    },
    /// Stop the control plane started by `up` and remove its state.
    Down {
        #[arg(long, default_value_os_t = default_state())]
        state: PathBuf,
    },
    /// Run the control plane in the foreground until SIGTERM/SIGINT.
    Run {
        #[arg(long, default_value_os_t = default_state())]
        state: PathBuf,
        /// Stop when this process exits (the test binary that started us).
        #[arg(long)]
        exit_with_pid: Option<u32>,
        /// Remove the state directory after stopping.
        #[arg(long)]
        remove_state: bool,
        /// Do not start kube-controller-manager.
        #[arg(long)]
        no_controller_manager: bool,
    },
}

fn default_state() -> PathBuf {
    control_plane::workspace_root().join("target/dev-cluster")
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                !stat
                    .split(") ")
                    .nth(1)
                    .is_some_and(|rest| rest.starts_with('Z'))
            })
            .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn print_env(state: &Path) {
    say!("control plane ready; use it with:");
    say!("  export KUBECONFIG={}", state.join("kubeconfig").display());
}

fn up(state: &Path) -> ExitCode {
    if let Some(pid) = read_pid(&state.join(SUPERVISOR_PID_FILE))
        && tied::runs(pid, SUPERVISOR)
        && state.join("ready").exists()
    {
        say!("cluster-up: reusing the control plane already running (pid {pid})");
        print_env(state);
        return ExitCode::SUCCESS;
    }
    for (name, pid) in control_plane::stop_stale(state) {
        say!("cluster-up: stopped {name} (pid {pid}) left running by an earlier control plane");
    }
    let _ = std::fs::remove_dir_all(state);
    if let Err(error) = std::fs::create_dir_all(state) {
        say_err!("cluster-up: cannot create {}: {error}", state.display());
        return ExitCode::FAILURE;
    }
    let log_path = state.join("supervisor.log");
    let Ok(log) = std::fs::File::create(&log_path) else {
        say_err!("cluster-up: cannot create {}", log_path.display());
        return ExitCode::FAILURE;
    };
    let Ok(exe) = std::env::current_exe() else {
        say_err!("cluster-up: cannot find my own executable");
        return ExitCode::FAILURE;
    };
    use std::os::unix::process::CommandExt;
    let spawned = Command::new(exe)
        .arg("run")
        .arg("--state")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("a log file handle"))
        .stderr(log)
        // Its own process group: a Ctrl-C in the shell that ran `make cluster-up` must
        // not stop the cluster; `make cluster-down` does.
        .process_group(0)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(error) => {
            say_err!("cluster-up: cannot start the supervisor: {error}");
            return ExitCode::FAILURE;
        }
    };
    say!(
        "cluster-up: starting etcd, kube-apiserver and kube-controller-manager (pid {})",
        child.id()
    );
    let started = Instant::now();
    while !state.join("ready").exists() {
        if !alive(child.id()) || started.elapsed() > Duration::from_secs(180) {
            say_err!(
                "cluster-up: the control plane did not start; log: {}",
                log_path.display()
            );
            if let Ok(text) = std::fs::read_to_string(&log_path) {
                say_err!(
                    "{}",
                    text.lines()
                        .rev()
                        .take(20)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say!(
        "cluster-up: /readyz answered after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    print_env(state);
    ExitCode::SUCCESS
}

fn down(state: &Path) -> ExitCode {
    // The supervisor stops its components on SIGTERM; whatever it could not stop is
    // stopped by its recorded pid.
    let stopped = control_plane::stop_stale(state);
    if stopped.is_empty() {
        say!(
            "cluster-down: no control plane running in {}",
            state.display()
        );
    }
    for (name, pid) in stopped {
        say!("cluster-down: stopped {name} (pid {pid})");
    }
    let _ = std::fs::remove_dir_all(state);
    say!("cluster-down: removed {}", state.display());
    ExitCode::SUCCESS
}

async fn run(
    state: PathBuf,
    exit_with: Option<u32>,
    remove_state: bool,
    controller_manager: bool,
) -> ExitCode {
    let config = control_plane::Config {
        state_dir: state.clone(),
        tools_bin: control_plane::default_tools_bin(),
        controller_manager,
    };
    for (name, pid) in control_plane::stop_stale(&state) {
        say_err!(
            "hookrun-cluster: stopped {name} (pid {pid}) left running by an earlier supervisor"
        );
    }
    if let Err(error) = std::fs::create_dir_all(&state).and_then(|()| {
        std::fs::write(
            state.join(SUPERVISOR_PID_FILE),
            std::process::id().to_string(),
        )
    }) {
        say_err!(
            "hookrun-cluster: cannot write {}: {error}",
            state.join(SUPERVISOR_PID_FILE).display()
        );
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let mut plane = match ControlPlane::start(config).await {
        Ok(plane) => plane,
        Err(error) => {
            say_err!("hookrun-cluster: {error}");
            if remove_state {
                let _ = std::fs::remove_dir_all(&state);
            }
            return ExitCode::FAILURE;
        }
    };
    let _ = std::fs::write(state.join("ready"), plane.server());
    say_err!(
        "hookrun-cluster: ready at {} after {:.1}s",
        plane.server(),
        started.elapsed().as_secs_f64()
    );

    let owner_gone = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if exit_with.is_some_and(|pid| !alive(pid)) {
                return;
            }
        }
    };
    let mut sigterm = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        Ok(s) => s,
        Err(error) => {
            say_err!("hookrun-cluster: cannot listen for SIGTERM: {error}");
            plane.stop().await;
            return ExitCode::FAILURE;
        }
    };
    let code = tokio::select! {
        _ = sigterm.recv() => ExitCode::SUCCESS,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
        () = owner_gone => ExitCode::SUCCESS,
        component = plane.wait_any_exit() => {
            say_err!("hookrun-cluster: {component} exited; stopping the rest");
            ExitCode::FAILURE
        }
    };
    plane.stop().await;
    let _ = std::fs::remove_file(state.join("ready"));
    if remove_state {
        let _ = std::fs::remove_dir_all(&state);
    }
    say_err!("hookrun-cluster: stopped");
    code
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up { state } => up(&state),
        Cmd::Down { state } => down(&state),
        Cmd::Run {
            state,
            exit_with_pid,
            remove_state,
            no_controller_manager,
        } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(error) => {
                    say_err!("hookrun-cluster: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(
                state,
                exit_with_pid,
                remove_state,
                !no_controller_manager,
            ))
        }
    }
}
