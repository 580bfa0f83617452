//! The apiserver binary's command line: every flag is documented in the README, and
//! `--log-format` works as the chart passes it: `json` writes one JSON object per line
//! (for log collectors), `text` plain lines without terminal colour codes when stderr is
//! a file. The binary runs with a kubeconfig whose cluster is unreachable: it logs its
//! addresses before it needs the cluster.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const STARTED: &str = "hookrun-apiserver started";

/// The apiserver with its output in a file; killed when dropped.
struct Running {
    child: Child,
    log: PathBuf,
    kubeconfig: PathBuf,
}

impl Running {
    fn start(format: &str) -> Self {
        let tag = format!("{format}-{}", std::process::id());
        let kubeconfig = std::env::temp_dir().join(format!("hookrun-log-format-{tag}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster: {server: \"https://127.0.0.1:1\"}\nusers:\n- name: none\n  user: {token: unused}\ncontexts:\n- name: none\n  context: {cluster: none, user: none}\ncurrent-context: none\n",
        )
        .expect("a kubeconfig");
        let log = std::env::temp_dir().join(format!("hookrun-log-format-{tag}.log"));
        let file = std::fs::File::create(&log).expect("the log file");
        let child = Command::new(env!("CARGO_BIN_EXE_hookrun-apiserver"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--runner-listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                &format!("--log-format={format}"),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("NO_COLOR")
            .env_remove("HOOKRUN_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file"))
            .stderr(file)
            .spawn()
            .expect("the apiserver starts");
        Self {
            child,
            log,
            kubeconfig,
        }
    }

    /// The log once it says the server started, within 10 s.
    fn started_log(&self) -> String {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(STARTED) {
                return text;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{STARTED:?} never logged:\n{text}"
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

#[test]
fn log_format_json_writes_one_object_per_line() {
    let server = Running::start("json");
    let log = server.started_log();
    let mut started = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if value["fields"]["message"] == STARTED {
            started = Some(value);
        }
    }
    let started = started.expect("the start line");
    assert_eq!(started["level"], "INFO");
    for field in ["public", "runner", "admin"] {
        assert!(
            started["fields"][field]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{field} in {started}"
        );
    }
}

#[test]
fn log_format_text_in_a_file_is_plain() {
    let server = Running::start("text");
    let log = server.started_log();
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{}",
        log.escape_debug()
    );
    assert!(serde_json::from_str::<serde_json::Value>(log.lines().next().unwrap_or("")).is_err());
}

#[test]
fn every_flag_is_documented_in_the_readme() {
    use clap::CommandFactory;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the README");
    for arg in hookrun_apiserver::Args::command().get_arguments() {
        let Some(long) = arg.get_long() else {
            continue;
        };
        if matches!(long, "help" | "version") {
            continue;
        }
        assert!(
            readme.contains(&format!("`--{long}")),
            "README.md does not document hookrun-apiserver --{long}"
        );
    }
}
