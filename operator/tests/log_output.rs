//! What the operator binary writes to a log file: plain text lines without terminal
//! colour codes when stdout is not a terminal, or one JSON object per line with
//! `--log-format json`. The binary runs with a kubeconfig whose cluster is unreachable:
//! it logs its admin address before it needs the cluster.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A kubeconfig naming a cluster nobody listens on.
fn unreachable_kubeconfig(tag: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "hookrun-operator-log-{tag}-{}.kubeconfig",
        std::process::id()
    ));
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: \"https://127.0.0.1:1\"}\nusers:\n- name: none\n  user: {token: unused}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\ncurrent-context: none\n",
    )
    .expect("a kubeconfig");
    path
}

/// The operator with stdout and stderr in a file, as a container runtime or a process
/// supervisor keeps them; killed when dropped.
struct Running {
    child: Child,
    log: PathBuf,
    kubeconfig: PathBuf,
}

impl Running {
    fn start(tag: &str, format: &str) -> Self {
        let kubeconfig = unreachable_kubeconfig(tag);
        let log = std::env::temp_dir().join(format!(
            "hookrun-operator-log-{tag}-{}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("the log file");
        let child = Command::new(env!("CARGO_BIN_EXE_hookrun-operator"))
            .args([
                "--public-url",
                "https://hooks.example.test",
                "--runner-url",
                "http://127.0.0.1:9",
                "--admin-listen",
                "127.0.0.1:0",
                "--log-format",
                format,
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            // Nothing in the environment asks for plain output: the binary must see for
            // itself that its output is not a terminal.
            .env_remove("NO_COLOR")
            .env_remove("HOOKRUN_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file)
            .spawn()
            .expect("the operator starts");
        Self {
            child,
            log,
            kubeconfig,
        }
    }

    /// The log once it holds `needle`, within 10 s.
    fn log_with(&self, needle: &str) -> String {
        let started = Instant::now();
        loop {
            let text = read(&self.log);
            if text.contains(needle) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{needle:?} never logged:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn text_logs_in_a_file_carry_no_terminal_colour_codes() {
    let operator = Running::start("text", "text");
    let log = operator.log_with("admin server listening");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{}",
        log.escape_debug()
    );
    let line = log
        .lines()
        .find(|l| l.contains("admin server listening"))
        .expect("the line");
    assert!(line.contains(" INFO "), "a plain level: {line}");
    assert!(line.contains("address=127.0.0.1:"), "a plain field: {line}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let operator = Running::start("json", "json");
    let log = operator.log_with("admin server listening");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
    }
    assert!(log.contains("\"address\":\"127.0.0.1:"), "{log}");
}
