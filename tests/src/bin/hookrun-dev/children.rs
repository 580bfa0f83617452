//! The long-running processes `make dev` starts (the control plane's supervisor, the
//! operator, the apiserver): each in its own process group with a log file, tied to
//! hookrun-dev (the kernel kills them when it dies, however it dies), and recorded by pid
//! so that Ctrl-C, or the next `make dev`, stops exactly them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hookrun_tests::tied;
use tokio::process::Child;

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
    pub async fn spawn(
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
        let mut command = tied::command(binary);
        command
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
            .kill_on_drop(true);
        let child = tied::spawn(command)
            .await
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
        tied::signal(pid, "-TERM");
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
