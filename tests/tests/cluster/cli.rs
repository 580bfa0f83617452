//! `kubectl hookrun`, the plugin binary, run as a user would: with `--kubeconfig` of the
//! test cluster and `-n` of the test namespace, against the real control plane, the real
//! operator and apiserver, and the local pod runner where a Session must run. Also found
//! by the real kubectl through PATH plugin discovery.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hookrun_crds::session::event_types;
use hookrun_crds::{Agent, Grant, Session, SessionPhase, names};
use hookrun_tests::control_plane::{default_tools_bin, workspace_root};
use hookrun_tests::door::{is_known, request, webhook_path};
use hookrun_tests::{TestNamespace, apply_agent, cluster, eventually, workspace_binary};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::{Value, json};

use crate::live::Live;

const BUDGET: Duration = Duration::from_secs(60);

/// What one run of the plugin printed and how it exited.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    fn ok(self, what: &str) -> Self {
        assert_eq!(
            self.code, 0,
            "{what} failed\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `program` with `args`, `NO_COLOR` unset and stdout a pipe (so no colour), and
/// `path_prefix` before `PATH` when given.
async fn run(program: &Path, args: &[&str], path_prefix: Option<&Path>) -> Ran {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null());
    if let Some(prefix) = path_prefix {
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("{}:{path}", prefix.display()));
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not end within 120s", program.display()))
        .expect("the program runs");
    Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The plugin, as one kubeconfig identity in one namespace.
struct Plugin {
    binary: PathBuf,
    kubeconfig: PathBuf,
    namespace: String,
}

impl Plugin {
    fn new(kubeconfig: &Path, ns: &TestNamespace) -> Self {
        Plugin {
            binary: workspace_binary("kubectl-hookrun"),
            kubeconfig: kubeconfig.to_owned(),
            namespace: ns.name().to_owned(),
        }
    }

    async fn run(&self, args: &[&str]) -> Ran {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut all = vec!["--kubeconfig", &kubeconfig, "-n", &self.namespace];
        all.extend_from_slice(args);
        run(&self.binary, &all, None).await
    }
}

/// Applies an Agent and waits until its webhook URL is in status.
async fn agent(agents: &Api<Agent>, ns: &str, name: &str, spec: Value) -> String {
    apply_agent(agents, name, json!({ "spec": spec })).await;
    webhook_path(agents, ns, name).await
}

#[tokio::test]
async fn agents_urls_and_rotation_through_the_plugin_and_kubectl() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let secrets: Api<Secret> = Api::namespaced(client, ns.name());
    let stack = Live::start_with(&ns, 1, false, true).await;
    let path = agent(
        &agents,
        ns.name(),
        "echo",
        json!({"models": ["hookrun/echo"], "triggers": [{"webhook": {}}]}),
    )
    .await;
    let plugin = Plugin::new(&cluster.kubeconfig_path(), &ns);

    // The table: one row, Ready, its trigger kind, no URL unless asked.
    let table = plugin.run(&["agents"]).await.ok("agents");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", table.stdout);
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY") && lines[0].contains("TRIGGERS"),
        "{}",
        lines[0]
    );
    assert!(lines[1].starts_with("echo "), "{}", lines[1]);
    assert!(
        lines[1].contains("True")
            && lines[1].contains("WebhookReady")
            && lines[1].contains("webhook")
    );
    assert!(!table.stdout.contains("\x1b["), "no colour on a pipe");
    assert!(!table.stdout.contains("/webhooks/"), "no URL unless asked");
    let with_url = plugin
        .run(&["agents", "--show-url"])
        .await
        .ok("agents --show-url");
    assert!(
        with_url
            .stdout
            .contains(&format!("/webhooks/{}/echo/****", ns.name()))
    );

    // JSON parses, and -A finds the Agent among all namespaces.
    let listed = plugin
        .run(&["agents", "-o", "json"])
        .await
        .ok("agents -o json")
        .json();
    assert_eq!(listed[0]["name"], "echo");
    assert_eq!(listed[0]["ready"], "True");
    assert_eq!(listed[0]["triggers"], json!(["webhook"]));
    assert_eq!(listed[0]["running"], 0);
    let all = plugin
        .run(&["agents", "-A", "-o", "json"])
        .await
        .ok("agents -A")
        .json();
    assert!(
        all.as_array()
            .expect("a list")
            .iter()
            .any(|a| a["namespace"] == ns.name() && a["name"] == "echo"),
        "{all}"
    );
    let yaml = plugin
        .run(&["agents", "-o", "yaml"])
        .await
        .ok("agents -o yaml");
    let parsed: Value = serde_yaml::from_str(&yaml.stdout).expect("YAML parses");
    assert_eq!(parsed[0]["name"], "echo");

    // url: masked by default, the whole URL with --show-token (the Secret's).
    let masked = plugin.run(&["url", "echo"]).await.ok("url");
    let public = format!("http://{}", stack.public(0));
    assert_eq!(
        masked.stdout.trim(),
        format!("{public}/webhooks/{}/echo/****", ns.name())
    );
    let full = plugin
        .run(&["url", "echo", "--show-token"])
        .await
        .ok("url --show-token");
    assert_eq!(full.stdout.trim(), format!("{public}{path}"));
    let secret = secrets
        .get(&names::webhook_secret_name("echo"))
        .await
        .expect("the Agent's Secret");
    let stored = secret.data.expect("data")[names::secret_keys::URL]
        .0
        .clone();
    assert_eq!(full.stdout.trim().as_bytes(), stored.as_slice());
    let missing = plugin.run(&["url", "nobody"]).await;
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no Agent \"nobody\""),
        "{}",
        missing.stderr
    );

    // rotate --grace 0: a new URL, printed once the operator wrote it; the old token is
    // refused at once, the new one accepted.
    let rotated = plugin
        .run(&["rotate", "echo", "--grace", "0", "--show-token"])
        .await
        .ok("rotate");
    let new_url = rotated.stdout.trim().to_owned();
    assert!(
        new_url.starts_with(&format!("{public}/webhooks/{}/echo/", ns.name())),
        "{new_url}"
    );
    assert_ne!(new_url, full.stdout.trim(), "the token changed");
    let status_url = agents
        .get("echo")
        .await
        .expect("the Agent")
        .status
        .and_then(|s| s.webhook_url);
    assert_eq!(status_url.as_deref(), Some(new_url.as_str()));
    let new_path = new_url.trim_start_matches(&public).to_owned();
    let accepted = eventually(BUDGET, || async {
        is_known(stack.public(0), &new_path).await.then_some(())
    })
    .await;
    assert!(
        accepted.is_some(),
        "the apiserver never accepted the new token"
    );
    let old_refused = eventually(BUDGET, || async {
        (!is_known(stack.public(0), &path).await).then_some(())
    })
    .await;
    assert!(old_refused.is_some(), "the old token still works");
    let masked_rotation = plugin.run(&["rotate", "echo"]).await.ok("rotate, masked");
    assert!(
        masked_rotation.stdout.trim().ends_with("/echo/****"),
        "{}",
        masked_rotation.stdout
    );

    // The real kubectl finds the plugin on PATH and passes its arguments through.
    let kubectl = default_tools_bin().join("kubectl");
    let bin_dir = workspace_binary("kubectl-hookrun")
        .parent()
        .expect("the binary's directory")
        .to_owned();
    let listed = run(&kubectl, &["plugin", "list"], Some(&bin_dir)).await;
    assert!(
        listed.stdout.contains("kubectl-hookrun"),
        "kubectl plugin list: {}\n{}",
        listed.stdout,
        listed.stderr
    );
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let through_kubectl = run(
        &kubectl,
        &[
            "hookrun",
            "--kubeconfig",
            &kubeconfig,
            "-n",
            ns.name(),
            "agents",
            "-o",
            "json",
        ],
        Some(&bin_dir),
    )
    .await
    .ok("kubectl hookrun agents");
    assert_eq!(through_kubectl.json()[0]["name"], "echo");
    let help = run(&kubectl, &["hookrun", "invoke", "--help"], Some(&bin_dir))
        .await
        .ok("kubectl hookrun invoke --help");
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("--wait"),
        "{}",
        help.stdout
    );
}

#[tokio::test]
async fn sessions_run_wait_follow_and_take_input_through_the_plugin() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns.name());
    let grants: Api<Grant> = Api::namespaced(client, ns.name());
    let stack = Live::start_with(&ns, 1, true, true).await;
    let webhook = json!([{"webhook": {}}]);
    agent(
        &agents,
        ns.name(),
        "echo",
        json!({"models": ["hookrun/echo"], "triggers": webhook}),
    )
    .await;
    agent(
        &agents,
        ns.name(),
        "broken",
        json!({"exec": {"command": ["sh", "-c", "echo 'the build is on fire' >&2; exit 3"]}, "triggers": webhook}),
    )
    .await;
    agent(
        &agents,
        ns.name(),
        "slow",
        json!({"exec": {"command": ["sleep", "30"]}, "triggers": webhook}),
    )
    .await;
    agent(
        &agents,
        ns.name(),
        "chat",
        json!({
            "exec": {"command": ["cat"]},
            "triggers": webhook,
            "session": {
                "idleTimeoutSeconds": 60,
                "env": [{"name": "HARNESS_TURN_GAP_MS", "value": "200"}]
            }
        }),
    )
    .await;
    let plugin = Plugin::new(&cluster.kubeconfig_path(), &ns);

    // --wait -o json: the HTTP API's answer object, exit 0 for Complete.
    let done = plugin
        .run(&[
            "invoke",
            "echo",
            "hello from the cli",
            "--wait=60s",
            "-o",
            "json",
            "--env",
            "TICKET=812",
        ])
        .await
        .ok("invoke --wait");
    let answer = done.json();
    assert_eq!(answer["phase"], "Complete", "{answer}");
    assert_eq!(answer["response"], "hello from the cli");
    assert_eq!(answer["agentDefinition"], "echo");
    let name = answer["session"]
        .as_str()
        .expect("a session name")
        .to_owned();
    assert!(name.starts_with("echo-wh-cli-"), "{name}");
    let stored = sessions.get(&name).await.expect("the Session");
    assert_eq!(stored.spec.trigger.expect("a trigger").source, "cli");
    assert_eq!(stored.spec.env[0].name, "TICKET");
    assert_eq!(stored.spec.title, "hello from the cli");

    // An agent that fails: exit 1 and its message.
    let failed = plugin
        .run(&["invoke", "broken", "go", "--wait=60s", "-o", "json"])
        .await;
    assert_eq!(failed.code, 1, "{}\n{}", failed.stdout, failed.stderr);
    let answer = failed.json();
    assert_eq!(answer["phase"], "Error");
    assert!(
        answer["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
    let failed_table = plugin.run(&["invoke", "broken", "go", "--wait=60s"]).await;
    assert_eq!(failed_table.code, 1);
    assert!(
        failed_table.stderr.contains("ended in Error"),
        "{}",
        failed_table.stderr
    );

    // A wait that runs out: exit 2, timedOut, the Session runs on.
    let slow = plugin
        .run(&[
            "invoke",
            "slow",
            "take your time",
            "--wait=2s",
            "-o",
            "json",
        ])
        .await;
    assert_eq!(slow.code, 2, "{}\n{}", slow.stdout, slow.stderr);
    let answer = slow.json();
    assert_eq!(answer["timedOut"], true);
    assert!(answer["response"].is_null());
    let slow_name = answer["session"].as_str().expect("a session").to_owned();
    let slow_phase = sessions
        .get(&slow_name)
        .await
        .expect("the Session")
        .status
        .map(|s| s.phase());
    assert!(!slow_phase.unwrap_or_default().is_finished(), "it runs on");

    // --follow: the events live, then the answer; exit 0.
    let followed = plugin
        .run(&["invoke", "echo", "follow me", "--follow"])
        .await
        .ok("invoke --follow");
    assert!(
        followed.stdout.contains(event_types::STATUS_RUNNING),
        "{}",
        followed.stdout
    );
    assert!(
        followed
            .stdout
            .lines()
            .any(|l| l.contains(event_types::AGENT_MESSAGE) && l.contains("follow me")),
        "{}",
        followed.stdout
    );
    assert!(followed.stdout.contains(event_types::STATUS_CLOSED));
    assert!(
        followed.stderr.contains("phase Complete"),
        "{}",
        followed.stderr
    );
    assert_eq!(followed.stdout.lines().last(), Some("follow me"));

    // sessions: the table and JSON, per Agent.
    let table = plugin.run(&["sessions"]).await.ok("sessions");
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);
    assert!(table.stdout.contains(&name) && table.stdout.contains(&slow_name));
    let echo_only = plugin
        .run(&["sessions", "echo", "-o", "json"])
        .await
        .ok("sessions echo")
        .json();
    let listed = echo_only.as_array().expect("a list");
    assert_eq!(listed.len(), 2, "{echo_only}");
    assert!(
        listed
            .iter()
            .all(|s| s["agent"] == "echo" && s["phase"] == "Complete" && s["source"] == "cli")
    );

    // logs: the events, as text and JSON; --pod says plainly what the cluster lacks.
    let logs = plugin.run(&["logs", &name]).await.ok("logs");
    assert!(
        logs.stdout
            .lines()
            .any(|l| l.contains(event_types::AGENT_MESSAGE) && l.contains("hello from the cli")),
        "{}",
        logs.stdout
    );
    let logs_json = plugin
        .run(&["logs", &name, "-o", "json"])
        .await
        .ok("logs -o json")
        .json();
    assert_eq!(logs_json["session"], name.as_str());
    assert!(
        logs_json["count"].as_u64().is_some_and(|n| n >= 2),
        "{logs_json}"
    );
    assert_eq!(logs_json["events"][0]["id"], 1);
    let followed_logs = plugin
        .run(&["logs", &name, "-f"])
        .await
        .ok("logs -f of a finished Session");
    assert!(followed_logs.stdout.contains(event_types::STATUS_CLOSED));
    // The pod runner is no kubelet: the cluster cannot serve pods/log, and says so.
    let pod_log = plugin.run(&["logs", &name, "--pod"]).await;
    assert_eq!(pod_log.code, 1, "{}\n{}", pod_log.stdout, pod_log.stderr);
    assert!(
        pod_log.stderr.contains("cannot serve the log") && pod_log.stderr.contains("without --pod"),
        "{}",
        pod_log.stderr
    );

    // send: input into a live Session, answered by the program's next turn.
    let chat = plugin
        .run(&["invoke", "chat", "first", "-o", "json"])
        .await
        .ok("invoke chat")
        .json();
    let chat_name = chat["session"].as_str().expect("a session").to_owned();
    let first_turn = eventually(BUDGET, || async {
        let s = sessions.get(&chat_name).await.ok()?;
        s.status?.turn_reply(0).map(str::to_owned)
    })
    .await;
    assert_eq!(first_turn.as_deref().map(str::trim), Some("first"));
    let sent = plugin.run(&["send", &chat_name, "second"]).await.ok("send");
    assert!(
        sent.stdout.starts_with("delivered as event "),
        "{}",
        sent.stdout
    );
    let replied = eventually(BUDGET, || async {
        let s = sessions.get(&chat_name).await.ok()?;
        let status = s.status?;
        let (id, _) = *status.inputs_after(0).first()?;
        status.turn_reply(id).map(str::to_owned)
    })
    .await;
    assert_eq!(replied.as_deref().map(str::trim), Some("second"));
    let sent_json = plugin
        .run(&["send", &chat_name, "third", "-o", "json"])
        .await
        .ok("send -o json")
        .json();
    assert_eq!(sent_json["delivered"], true, "{sent_json}");
    // The Grant it used is gone.
    let left = eventually(BUDGET, || async {
        let all = grants.list(&Default::default()).await.ok()?;
        all.items.is_empty().then_some(())
    })
    .await;
    assert!(left.is_some(), "send left its Grant behind");
    let finished = plugin.run(&["send", &name, "too late"]).await;
    assert_eq!(finished.code, 1);
    assert!(
        finished.stderr.contains("has finished"),
        "{}",
        finished.stderr
    );

    // expose / grants / revoke: a URL that works until revoked.
    let exposed = plugin
        .run(&[
            "expose",
            &chat_name,
            "--ttl",
            "10m",
            "--label",
            "ci: release",
            "-o",
            "json",
        ])
        .await
        .ok("expose")
        .json();
    let grant_name = exposed["grant"].as_str().expect("a grant").to_owned();
    let url = exposed["url"].as_str().expect("a URL").to_owned();
    let hook_path = url
        .strip_prefix(&format!("http://{}", stack.public(0)))
        .unwrap_or_else(|| panic!("{url} is not the apiserver's"))
        .to_owned();
    let body = json!({"message": "from the grant"}).to_string();
    let posted = eventually(BUDGET, || async {
        let answer = request(stack.public(0), "POST", &hook_path, &[], &body).await;
        (answer.status == 200).then_some(answer)
    })
    .await
    .expect("the exposed URL delivers");
    assert_eq!(posted.json["delivered"], true);
    let listed = plugin
        .run(&["grants", "-o", "json"])
        .await
        .ok("grants")
        .json();
    let row = &listed[0];
    assert_eq!(
        (
            row["name"].as_str(),
            row["session"].as_str(),
            row["label"].as_str(),
            row["state"].as_str()
        ),
        (
            Some(grant_name.as_str()),
            Some(chat_name.as_str()),
            Some("ci: release"),
            Some("Active")
        ),
        "{listed}"
    );
    assert!(
        !listed.to_string().contains(&url),
        "grants never lists URLs"
    );
    let table = plugin.run(&["grants"]).await.ok("grants table");
    assert!(table.stdout.contains(&grant_name) && table.stdout.contains("Active"));
    plugin.run(&["revoke", &grant_name]).await.ok("revoke");
    let refused = eventually(BUDGET, || async {
        let answer = request(stack.public(0), "POST", &hook_path, &[], &body).await;
        (answer.status == 403).then_some(())
    })
    .await;
    assert!(refused.is_some(), "the revoked URL still works");
    let listed = plugin
        .run(&["grants", "-o", "json"])
        .await
        .ok("grants after revoke")
        .json();
    assert_eq!(listed[0]["revoked"], true);
    assert_eq!(listed[0]["state"], "Revoked");
    let gone = plugin.run(&["revoke", "no-such-grant"]).await;
    assert!(
        gone.stderr.contains("no Grant \"no-such-grant\""),
        "{}",
        gone.stderr
    );

    let phase = sessions
        .get(&chat_name)
        .await
        .expect("chat")
        .status
        .map(|s| s.phase());
    assert_eq!(phase, Some(SessionPhase::Running), "the chat is still live");
}

#[tokio::test]
async fn a_user_without_create_sessions_is_told_which_verb_and_resource_are_missing() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "echo",
        json!({"spec": {"models": ["hookrun/echo"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let (path, token) = crate::console::viewer_kubeconfig(&cluster.kubeconfig_path(), &ns);
    let viewer = Plugin::new(&path, &ns);

    // Reading works.
    let listed = viewer
        .run(&["agents", "-o", "json"])
        .await
        .ok("agents as the viewer")
        .json();
    assert_eq!(listed[0]["name"], "echo");
    // Starting a Session does not, and the message says what to ask for.
    let refused = viewer.run(&["invoke", "echo", "hi"]).await;
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr.contains(&format!(
            "may not create sessions.hookrun.dev in namespace {}",
            ns.name()
        )),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains(&token), "the token never appears");
    let no_grants = viewer.run(&["grants"]).await;
    assert!(
        no_grants.stderr.contains("may not list grants.hookrun.dev"),
        "{}",
        no_grants.stderr
    );
    let no_rotation = viewer.run(&["rotate", "echo"]).await;
    assert!(
        no_rotation.stderr.contains(&format!(
            "may not patch agents.hookrun.dev in namespace {}",
            ns.name()
        )),
        "{}",
        no_rotation.stderr
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn completion_scripts_are_generated_for_bash_zsh_and_fish() {
    let binary = workspace_binary("kubectl-hookrun");
    for shell in ["bash", "zsh", "fish"] {
        let script = run(&binary, &["completion", shell], None).await.ok(shell);
        assert!(
            script.stdout.contains("kubectl-hookrun"),
            "{shell}: {}",
            script.stdout
        );
        for command in ["invoke", "rotate", "expose", "revoke"] {
            assert!(script.stdout.contains(command), "{shell} lacks {command}");
        }
    }
    // bash loads its script and registers the completion.
    let bash_script = run(&binary, &["completion", "bash"], None).await.stdout;
    let dir = workspace_root().join("target/test-clusters");
    std::fs::create_dir_all(&dir).expect("target/test-clusters");
    let file = dir.join(format!("completion-{}.bash", std::process::id()));
    std::fs::write(&file, bash_script).expect("the script is written");
    let loaded = run(
        Path::new("bash"),
        &[
            "-c",
            &format!("source {} && complete -p kubectl-hookrun", file.display()),
        ],
        None,
    )
    .await
    .ok("bash sources the completion");
    assert!(
        loaded.stdout.contains("kubectl-hookrun"),
        "{}",
        loaded.stdout
    );
    let _ = std::fs::remove_file(&file);
    let bad = run(&binary, &["completion", "tcsh"], None).await;
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("bash") && bad.stderr.contains("fish"),
        "{}",
        bad.stderr
    );
}
