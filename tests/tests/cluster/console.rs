//! The console in a real browser: `kubectl-hookrun console` runs against the local control
//! plane (apiserver, operator and the pod runner, so Sessions run for real with the
//! built-in echo model) and headless Chromium drives its page: the Agent list, a Session
//! list that updates live, an invoke from the page whose answer appears in the
//! transcript, a message sent into a live Session and its reply, the refusal of requests
//! without the run's token, and an RBAC refusal shown on the page naming the verb and
//! resource. Screenshots go to `target/console-test/`;
//! `HOOKRUN_CONSOLE_SCREENSHOT=docs/console.png` also saves the live conversation's there.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hookrun_crds::{Agent, Session};
use hookrun_tests::browser::Browser;
use hookrun_tests::control_plane::workspace_root;
use hookrun_tests::door::request;
use hookrun_tests::{TestNamespace, apply_agent, cluster, kubectl, tied, workspace_binary};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::live::Live;

/// How long the page may take to show what the cluster did.
const SHOWN: Duration = Duration::from_secs(30);

/// `kubectl-hookrun console` for `ns`, with the URL it printed.
struct Console {
    _process: tokio::process::Child,
    url: String,
    /// `127.0.0.1:PORT`.
    address: String,
    token: String,
}

impl Console {
    /// Starts the console for `ns` as the identity in `kubeconfig`.
    async fn start(ns: &TestNamespace, kubeconfig: &Path) -> Self {
        let log_path = workspace_root()
            .join("target/test-clusters")
            .join(format!("console-{}.log", ns.name()));
        let log = std::fs::File::create(&log_path).expect("the console's log");
        let mut command = tied::command(workspace_binary("kubectl-hookrun"));
        command
            .arg("console")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["-n", ns.name()])
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        let mut process = tied::spawn(command).await.expect("the console starts");
        let stdout = process.stdout.take().expect("its stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(SHOWN, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no URL printed; see {}", log_path.display()))
            .expect("stdout reads")
            .unwrap_or_else(|| panic!("the console exited; see {}", log_path.display()));
        let url = first
            .strip_prefix("console: ")
            .unwrap_or_else(|| panic!("the first line is the URL: {first:?}"))
            .to_owned();
        let rest = url
            .strip_prefix("http://")
            .expect("an http URL on loopback");
        let (address, query) = rest.split_once("/?").expect("a path and a query");
        let token = query
            .strip_prefix("token=")
            .expect("the token in the query")
            .to_owned();
        assert!(address.starts_with("127.0.0.1:"), "{url}");
        assert_eq!(token.len(), 64, "256 bits in hex");
        Console {
            _process: process,
            address: address.to_owned(),
            url,
            token,
        }
    }
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    workspace_root().join("target/console-test").join(name)
}

/// The text of the transcript's agent bubbles.
const AGENT_TEXT: &str = "[...document.querySelectorAll('#transcript .msg.agent')]\
                          .map(m => m.lastChild.textContent).join('\\n')";

#[tokio::test]
async fn the_console_shows_agents_live_sessions_and_an_invoked_answer_in_a_real_browser() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), ns.name());
    let sessions: Api<Session> = Api::namespaced(client, ns.name());
    let live = Live::start_with(&ns, 1, true, true).await;
    live.agent(
        &agents,
        ns.name(),
        "echo",
        json!({
            "models": ["hookrun/echo"],
            "triggers": [{"webhook": {}}],
            "session": {"timeoutSeconds": 60}
        }),
    )
    .await;
    // The same model, live: it waits for more input after each answer.
    live.agent(
        &agents,
        ns.name(),
        "chat",
        json!({
            "models": ["hookrun/echo"],
            "triggers": [{"webhook": {}}],
            "session": {"timeoutSeconds": 60, "idleTimeoutSeconds": 20}
        }),
    )
    .await;
    // An Agent whose program fails, so the list shows an Error beside the successes.
    live.agent(
        &agents,
        ns.name(),
        "nightly-report",
        json!({
            "exec": {"command": ["false"]},
            "triggers": [{"webhook": {}}],
            "session": {"timeoutSeconds": 60}
        }),
    )
    .await;
    let console = Console::start(&ns, &cluster.kubeconfig_path()).await;

    // Without the token nothing is served: not the page, its assets, nor the API.
    for path in ["/", "/console.js", "/api/agents", "/api/sessions/watch"] {
        let refused = request(&console.address, "GET", path, &[], "").await;
        assert_eq!(refused.status, 403, "{path}: {refused:?}");
        assert!(!refused.text.contains(&console.token));
    }
    let wrong = format!("/api/agents?token={}", "0".repeat(64));
    assert_eq!(
        request(&console.address, "GET", &wrong, &[], "")
            .await
            .status,
        403
    );
    let listed = request(
        &console.address,
        "GET",
        &format!("/api/agents?token={}", console.token),
        &[],
        "",
    )
    .await;
    assert_eq!(listed.status, 200, "{listed:?}");
    let names: Vec<&str> = listed.json["agents"]
        .as_array()
        .expect("a list of Agents")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["chat", "echo", "nightly-report"], "{listed:?}");
    assert_eq!(
        listed.header("content-security-policy"),
        Some(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    );

    let mut browser = Browser::start(1440, 760).await;
    browser.navigate(&console.url).await;

    // The Agent list shows the echo agent, ready, with its webhook trigger.
    let agent = browser
        .wait_for(
            "(() => { const a = document.querySelector('#agents [data-agent=\"echo\"]'); \
             return a && a.querySelector('.dot.ready') ? a.innerText : null })()",
            SHOWN,
        )
        .await
        .expect("the echo Agent is listed as ready");
    let agent = agent.as_str().unwrap_or_default();
    assert!(
        agent.contains("echo") && agent.contains("webhook"),
        "{agent}"
    );
    let live_badge = browser
        .wait_for(
            "document.getElementById('live').classList.contains('on')",
            SHOWN,
        )
        .await;
    assert!(live_badge.is_some(), "the Session watch never connected");
    browser.screenshot(&screenshot_path("1-agents.png")).await;

    // A Session started elsewhere (here: by the admin, through the API) appears in the
    // list without a reload, and its phase follows the cluster.
    for (name, agent, title, phase) in [
        (
            "echo-started-elsewhere",
            "echo",
            "Summarise last night's alerts",
            "Complete",
        ),
        (
            "nightly-report-0412",
            "nightly-report",
            "Build the nightly report",
            "Error",
        ),
    ] {
        let outside: Session = serde_json::from_value(json!({
            "apiVersion": "hookrun.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": name},
            "spec": {"agent": agent, "title": title, "trigger": {"source": "webhook"}}
        }))
        .expect("a Session");
        sessions
            .create(&PostParams::default(), &outside)
            .await
            .expect("the Session is created");
        let shown = browser
            .wait_for(
                &format!(
                    "(() => {{ const row = document.querySelector('#sessions tr[data-session={}]'); \
                     return row && row.querySelector('.badge').dataset.phase === {} }})()",
                    json!(name),
                    json!(phase)
                ),
                SHOWN,
            )
            .await;
        assert!(
            shown.is_some(),
            "the Session list did not show {name} {phase}; it shows {}",
            browser
                .evaluate("document.getElementById('sessions').innerText")
                .await
        );
    }

    // An invoke from the page: the echo agent's answer shows in the transcript.
    let title = "Hello from the console: what is the deploy status?";
    invoke_from_page(&mut browser, "echo", title).await;
    let answered = browser
        .wait_for(&format!("{AGENT_TEXT}.includes({})", json!(title)), SHOWN)
        .await;
    if answered.is_none() {
        browser
            .screenshot(&screenshot_path("failed-invoke.png"))
            .await;
    }
    assert!(
        answered.is_some(),
        "no answer in the transcript; it shows {} (failure banner: {})",
        browser
            .evaluate("document.getElementById('transcript').innerText")
            .await,
        browser
            .evaluate("document.getElementById('failure').innerText")
            .await
    );
    let invoked = browser
        .evaluate("document.getElementById('transcript-title').textContent")
        .await;
    let invoked = invoked.as_str().expect("the transcript names its Session");
    let stored = sessions
        .get(invoked)
        .await
        .expect("the invoked Session exists");
    assert_eq!(stored.spec.title, title);
    assert_eq!(
        stored.spec.trigger.map(|t| t.source).as_deref(),
        Some("cli")
    );
    // The transcript reads as a conversation: the title as the user's turn first, then
    // the agent, then the end; the phase badge and the list row both say Complete.
    let finished = browser
        .wait_for(
            "document.getElementById('transcript-phase').dataset.phase === 'Complete'",
            SHOWN,
        )
        .await;
    assert!(finished.is_some(), "the transcript never showed Complete");
    let kinds = browser
        .evaluate("[...document.querySelectorAll('#transcript > li')].map(li => li.dataset.type)")
        .await;
    let kinds: Vec<&str> = kinds
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|k| k.as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"title"), "{kinds:?}");
    assert!(kinds.contains(&"agent.message"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"status"), "{kinds:?}");
    let row_complete = browser
        .wait_for(
            &format!(
                "(() => {{ const row = document.querySelector('#sessions tr[data-session={}]'); \
                 return row && row.querySelector('.badge').dataset.phase === 'Complete' }})()",
                json!(invoked)
            ),
            SHOWN,
        )
        .await;
    assert!(
        row_complete.is_some(),
        "the list row of {invoked} never showed Complete"
    );
    let rows = browser
        .evaluate("document.querySelectorAll('#sessions tr[data-session]').length")
        .await;
    assert_eq!(rows, json!(3));
    // The sidebar follows too: the echo Agent's recent Sessions, both finished.
    let recent = browser
        .wait_for(
            "document.querySelectorAll('#agents [data-agent=\"echo\"] .recent .Complete').length === 2",
            SHOWN,
        )
        .await;
    assert!(
        recent.is_some(),
        "the echo Agent's recent Sessions were not shown"
    );
    browser
        .screenshot(&screenshot_path("2-transcript.png"))
        .await;

    // A live Session takes more input from the box under its transcript; the agent's
    // reply to it arrives in the same transcript.
    invoke_from_page(&mut browser, "chat", "first turn").await;
    let first = browser
        .wait_for(&format!("{AGENT_TEXT}.includes('first turn')"), SHOWN)
        .await;
    assert!(first.is_some(), "the chat Session never answered its title");
    let chat = browser
        .evaluate("document.getElementById('transcript-title').textContent")
        .await;
    let send_box = browser
        .evaluate("!document.getElementById('send').hidden")
        .await;
    assert_eq!(send_box, json!(true), "a live Session offers the send box");
    browser
        .evaluate(
            "document.getElementById('send-message').value = 'second turn, sent from the page';\
             document.getElementById('send-submit').click(); true",
        )
        .await;
    let second = browser
        .wait_for(
            &format!("{AGENT_TEXT}.includes('second turn, sent from the page')"),
            SHOWN,
        )
        .await;
    assert!(
        second.is_some(),
        "no reply to the sent message in {chat}; transcript: {} (failure banner: {})",
        browser
            .evaluate("document.getElementById('transcript').innerText")
            .await,
        browser
            .evaluate("document.getElementById('failure').innerText")
            .await
    );
    let user_turns = browser
        .evaluate("document.querySelectorAll('#transcript [data-type=\"user.message\"]').length")
        .await;
    assert_eq!(
        user_turns,
        json!(1),
        "the sent message shows as the user's turn"
    );
    let running = browser
        .wait_for(
            "document.querySelector('#agents [data-agent=\"chat\"] .agent-stats')\
             .textContent.startsWith('1 running')",
            SHOWN,
        )
        .await;
    assert!(
        running.is_some(),
        "the sidebar never counted the chat Session as running"
    );
    // Let the highlight of the last change fade before the picture.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live_shot = screenshot_path("3-live-send.png");
    browser.screenshot(&live_shot).await;
    if let Some(path) = std::env::var_os("HOOKRUN_CONSOLE_SCREENSHOT") {
        let path = workspace_root().join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot's directory");
        }
        std::fs::copy(&live_shot, &path).expect("the screenshot is copied");
    }
    drop(live);
}

/// Fills the invoke form and submits it.
async fn invoke_from_page(browser: &mut Browser, agent: &str, title: &str) {
    browser
        .evaluate(&format!(
            "document.getElementById('invoke-agent').value = {};\
             document.getElementById('invoke-title').value = {};\
             document.getElementById('invoke-submit').click(); true",
            json!(agent),
            json!(title)
        ))
        .await;
}

/// A kubeconfig for a user of `ns` who may read Agents and Sessions and nothing more
/// (the ServiceAccount `viewer`), and the token in it.
pub(crate) fn viewer_kubeconfig(admin: &Path, ns: &TestNamespace) -> (std::path::PathBuf, String) {
    ns.apply(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: viewer}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: hookrun-viewer}
rules:
  - apiGroups: [hookrun.dev]
    resources: [agents, sessions]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: hookrun-viewer}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: hookrun-viewer}
subjects:
  - {kind: ServiceAccount, name: viewer}
"#,
    );
    service_account_kubeconfig(admin, ns, "viewer")
}

/// A copy of the admin kubeconfig whose user is the ServiceAccount `account` of `ns`,
/// and the account's token in it.
fn service_account_kubeconfig(
    admin: &Path,
    ns: &TestNamespace,
    account: &str,
) -> (std::path::PathBuf, String) {
    let path = workspace_root()
        .join("target/test-clusters")
        .join(format!("kubeconfig-{}-{account}", ns.name()));
    std::fs::copy(admin, &path).expect("the kubeconfig is copied");
    let token = ns.token(account, &[]);
    for args in [
        vec![
            "config",
            "set-credentials",
            account,
            "--token",
            token.as_str(),
        ],
        vec!["config", "set-context", "--current", "--user", account],
    ] {
        let done = kubectl(&path, &args, None);
        assert!(
            done.status.success(),
            "kubectl {}: {}",
            args[..2].join(" "),
            String::from_utf8_lossy(&done.stderr)
        );
    }
    (path, token)
}

#[tokio::test]
async fn a_user_who_may_not_create_sessions_sees_the_missing_verb_and_resource_on_the_page() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    apply_agent(
        &agents,
        "echo",
        json!({"spec": {"models": ["hookrun/echo"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let (kubeconfig, _) = viewer_kubeconfig(&cluster.kubeconfig_path(), &ns);
    let console = Console::start(&ns, &kubeconfig).await;
    let mut browser = Browser::start(1440, 760).await;
    browser.navigate(&console.url).await;

    // Reading works: the Agent is listed (not ready: no operator runs here) and the
    // Session watch is live.
    let listed = browser
        .wait_for(
            "document.querySelector('#agents [data-agent=\"echo\"]') !== null \
             && document.getElementById('live').classList.contains('on')",
            SHOWN,
        )
        .await;
    assert!(
        listed.is_some(),
        "the viewer's console did not list the Agent"
    );

    browser
        .evaluate(
            "document.getElementById('invoke-agent').value = 'echo';\
             document.getElementById('invoke-title').value = 'may I?';\
             document.getElementById('invoke-submit').click(); true",
        )
        .await;
    let banner = browser
        .wait_for(
            "(() => { const f = document.getElementById('failure'); \
             return f.hidden ? null : f.innerText })()",
            SHOWN,
        )
        .await
        .expect("the refusal is shown");
    let banner = banner.as_str().unwrap_or_default();
    assert!(banner.contains("Forbidden by Kubernetes RBAC"), "{banner}");
    assert!(
        banner.contains("create") && banner.contains("sessions.hookrun.dev"),
        "the message names the verb and resource: {banner}"
    );
    assert!(banner.contains(ns.name()), "and the namespace: {banner}");
    browser
        .screenshot(&screenshot_path("4-forbidden.png"))
        .await;
    let rows = browser
        .evaluate("document.querySelectorAll('#sessions tr[data-session]').length")
        .await;
    assert_eq!(rows, json!(0), "nothing was created");
}
