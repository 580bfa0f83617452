//! The long-running processes `make dev` starts (operator, apiserver): each in its own
//! process group with a log file, recorded by pid so that Ctrl-C — or the next
//! `make dev`, if this one was killed — stops exactly them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A started binary.
pub struct Started {
    /// Its name (`hookrun-operator`).
    pub name: String,
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Started {
    /// Starts `binary` with `args`, the dev kubeconfig, and its output in `log_dir`.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        kubeconfig: &Path,
        log_dir: &Path,
    ) -> Result<Self, String> {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(binary)
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().map(Stdio::from).unwrap_or(Stdio::null()))
            .stderr(Stdio::from(file))
            // Ctrl-C reaches make dev only; it stops these in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        Ok(Self { name, child, log })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resolves when it exits on its own.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        }
    }

    /// SIGTERM, up to 10 s to finish, then SIGKILL.
    pub async fn stop(mut self) {
        let pid = self.pid();
        send_signal(pid, "-TERM");
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Sends a signal with kill(1) (this crate forbids unsafe code).
pub fn send_signal(pid: u32, signal: &str) {
    if pid > 0 {
        let _ = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether `pid` runs the binary `name` (checked through /proc, so a recycled pid of
/// some other program is never touched).
fn runs(pid: u32, name: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|cmdline| {
            let exe = cmdline.split(|b| *b == 0).next()?.to_vec();
            Some(String::from_utf8_lossy(&exe).ends_with(name))
        })
        .unwrap_or(false)
}

/// Writes `name pid` lines.
pub fn record(path: &Path, started: &[(&str, u32)]) {
    let text: String = started
        .iter()
        .map(|(name, pid)| format!("{name} {pid}\n"))
        .collect();
    let _ = std::fs::write(path, text);
}

/// Stops what an earlier `make dev` recorded in `path` and left running (it was killed
/// before it could clean up).
pub async fn stop_leftovers(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let (Some(name), Some(pid)) = (fields.next(), fields.next().and_then(|p| p.parse().ok()))
        else {
            continue;
        };
        if runs(pid, name) {
            println!("dev: stopping {name} (pid {pid}) left running by an earlier make dev");
            send_signal(pid, "-TERM");
            for _ in 0..100 {
                if !runs(pid, name) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if runs(pid, name) {
                send_signal(pid, "-KILL");
            }
        }
    }
    let _ = std::fs::remove_file(path);
}
