//! The supervisors `make dev` and `make cluster-up` run (hookrun-dev, `hookrun-cluster`)
//! leave nothing behind however they die: killed outright, or interrupted after the
//! reader of their piped output went away; and a later start stops what an earlier one
//! left running before it starts its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hookrun_tests::{
    control_plane::{self, PIDS_FILE, SUPERVISOR_PID_FILE, workspace_root},
    eventually, tied, workspace_binary,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::dev::{alive, free_port};

/// How long a killed supervisor's children may take to go.
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// A state and logs directory of one test; on drop, whatever its pid files still name
/// is stopped (a failing test leaks nothing) and the directory is removed.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = workspace_root()
            .join("target/test-clusters")
            .join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Scratch { dir }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }

    /// Every process the pid files name: hookrun-dev's, then the control plane's.
    fn recorded(&self) -> Vec<(String, u32)> {
        let mut all = tied::recorded(&self.logs().join("dev.pids"));
        all.extend(tied::recorded(&self.state().join(PIDS_FILE)));
        all
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        tied::stop_recorded(&self.logs().join("dev.pids"));
        control_plane::stop_stale(&self.state());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// hookrun-dev on free ports with its output piped to this test, as `make dev | tee`.
fn start_dev(scratch: &Scratch) -> Child {
    let port = || format!("127.0.0.1:{}", free_port());
    // No Agents to wait for: one object for `kubectl apply` to apply.
    let examples = scratch.dir.join("examples");
    std::fs::create_dir_all(&examples).expect("an examples directory");
    std::fs::write(
        examples.join("config.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: supervisors-test}\n",
    )
    .expect("an example");
    Command::new(workspace_binary("hookrun-dev"))
        .arg("--state")
        .arg(scratch.state())
        .arg("--logs")
        .arg(scratch.logs())
        .arg("--examples")
        .arg(&examples)
        .args(["--listen", &port()])
        .args(["--runner-listen", &port()])
        .args(["--admin-listen", &port()])
        .args(["--operator-admin-listen", &port()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("hookrun-dev starts")
}

/// Waits until the pid files name every process in `expected`, and answers them all.
async fn wait_recorded(
    scratch: &Scratch,
    expected: &[&str],
    child: &mut Child,
) -> Vec<(String, u32)> {
    let found = eventually(Duration::from_secs(45), || async {
        let all = scratch.recorded();
        let names: Vec<&str> = all.iter().map(|(name, _)| name.as_str()).collect();
        expected
            .iter()
            .all(|name| names.contains(name))
            .then_some(all)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "not all of {expected:?} started within 45 s ({:?}; exited: {:?}); logs in {}",
            scratch.recorded(),
            child.try_wait(),
            scratch.dir.display()
        )
    })
}

/// Asserts that none of `started` still runs its binary within [`GONE_WITHIN`].
async fn assert_all_gone(started: &[(String, u32)], after: &str) {
    let gone = eventually(GONE_WITHIN, || async {
        started
            .iter()
            .all(|(name, pid)| !tied::runs(*pid, name))
            .then_some(())
    })
    .await;
    let left: Vec<_> = started
        .iter()
        .filter(|(name, pid)| tied::runs(*pid, name))
        .collect();
    assert!(
        gone.is_some(),
        "still running {GONE_WITHIN:?} after {after}: {left:?}"
    );
}

const DEV_STACK: [&str; 6] = [
    "hookrun-cluster",
    "hookrun-operator",
    "hookrun-apiserver",
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
];

#[tokio::test]
async fn hookrun_dev_killed_outright_takes_every_process_with_it() {
    let scratch = Scratch::new("sup-dev-kill");
    let mut dev = start_dev(&scratch);
    let started = wait_recorded(&scratch, &DEV_STACK, &mut dev).await;

    dev.start_kill().expect("SIGKILL");
    let _ = dev.wait().await;
    assert_all_gone(&started, "SIGKILL of hookrun-dev").await;
}

#[tokio::test]
async fn hookrun_dev_stops_everything_on_ctrl_c_after_its_output_reader_went_away() {
    let scratch = Scratch::new("sup-dev-pipe");
    let mut dev = start_dev(&scratch);
    let started = wait_recorded(&scratch, &DEV_STACK, &mut dev).await;
    // Up and waiting for Ctrl-C, as a user sees it.
    let mut lines = BufReader::new(dev.stdout.take().expect("its stdout")).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with("dev: ready in") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "hookrun-dev says it is ready within 30 s");

    // `make dev | tee dev.log`, Ctrl-C: tee goes first, hookrun-dev writes into a pipe
    // nobody reads.
    drop(lines);
    drop(dev.stderr.take());
    let pid = dev.id().expect("a pid");
    tied::signal(pid, "-INT");
    let status = tokio::time::timeout(Duration::from_secs(30), dev.wait())
        .await
        .expect("hookrun-dev stops within 30 s of Ctrl-C")
        .expect("its status");
    assert_all_gone(&started, "Ctrl-C of hookrun-dev with a closed stdout").await;
    assert!(
        status.success(),
        "hookrun-dev stopped what it started and exited cleanly: {status}"
    );
}

#[tokio::test]
async fn hookrun_cluster_killed_outright_takes_the_control_plane_with_it() {
    let scratch = Scratch::new("sup-cluster-kill");
    let mut supervisor = Command::new(workspace_binary("hookrun-cluster"))
        .arg("run")
        .arg("--state")
        .arg(scratch.state())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("hookrun-cluster starts");
    let started = wait_recorded(
        &scratch,
        &["etcd", "kube-apiserver", "kube-controller-manager"],
        &mut supervisor,
    )
    .await;

    supervisor.start_kill().expect("SIGKILL");
    let _ = supervisor.wait().await;
    assert_all_gone(&started, "SIGKILL of hookrun-cluster").await;
}

/// A process in its own process group, not tied to this test: what a killed supervisor
/// of old left behind. Killed on drop.
struct Stray(Child);

impl Stray {
    fn start(program: &Path, args: &[String]) -> Self {
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("the stray process starts");
        Stray(child)
    }

    fn pid(&self) -> u32 {
        self.0.id().expect("a pid")
    }
}

#[tokio::test]
async fn cluster_up_stops_a_stale_control_plane_before_starting_its_own() {
    let scratch = Scratch::new("sup-stale");
    let state = scratch.state();
    std::fs::create_dir_all(&state).expect("the state directory");

    // A stale etcd on the state's data, recorded as the control plane's; and an
    // unrelated program whose pid the files also name (as a recycled pid would be):
    // it must survive.
    let etcd_url = format!("http://127.0.0.1:{}", free_port());
    let peer_url = format!("http://127.0.0.1:{}", free_port());
    let stale_etcd = Stray::start(
        &control_plane::default_tools_bin().join("etcd"),
        &[
            format!("--data-dir={}", state.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--log-level=error".into(),
        ],
    );
    let bystander = Stray::start(Path::new("sleep"), &["120".into()]);
    std::fs::write(
        state.join(PIDS_FILE),
        format!(
            "etcd {}\nkube-apiserver {}\n",
            stale_etcd.pid(),
            bystander.pid()
        ),
    )
    .expect("the pid file");
    std::fs::write(state.join(SUPERVISOR_PID_FILE), bystander.pid().to_string())
        .expect("the supervisor's pid file");
    let stale_up = eventually(Duration::from_secs(20), || async {
        tied::runs(stale_etcd.pid(), "etcd").then_some(())
    })
    .await;
    assert!(stale_up.is_some(), "the stale etcd runs");

    let up = tokio::time::timeout(
        Duration::from_secs(50),
        Command::new(workspace_binary("hookrun-cluster"))
            .arg("up")
            .arg("--state")
            .arg(&state)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("cluster-up finishes within 50 s")
    .expect("cluster-up runs");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(up.status.success(), "{output}");
    assert!(
        output.contains(&format!("stopped etcd (pid {})", stale_etcd.pid())),
        "{output}"
    );
    assert!(
        !tied::runs(stale_etcd.pid(), "etcd"),
        "the stale etcd is gone"
    );
    assert!(
        alive(bystander.pid()),
        "a pid that no longer runs the recorded binary is left alone"
    );
    assert!(
        state.join("ready").exists(),
        "the new control plane is ready"
    );

    let started = scratch.recorded();
    let names: Vec<&str> = started.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["etcd", "kube-apiserver", "kube-controller-manager"],
        "the new control plane's own pids replace the stale ones"
    );
    let down = Command::new(workspace_binary("hookrun-cluster"))
        .arg("down")
        .arg("--state")
        .arg(&state)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("cluster-down runs");
    assert!(down.status.success());
    assert_all_gone(&started, "cluster-down").await;
}
