//! Cluster tests of the operator's Session controller: the real
//! `hookrun-operator` turns Sessions into pods and follows them. No kubelet runs, so the
//! tests play it by writing pod status through the `pods/status` subresource, and play
//! the runner API by appending `agent.message` events to the Session status.

use std::time::Duration;

use hookrun_crds::{
    Agent, Session, SessionSpec,
    names::{self, env},
    session::{SessionEnvVar, SessionPhase, event_types},
};
use hookrun_tests::{Cluster, TestNamespace, apply_agent, cluster, door::Operator, eventually};
use k8s_openapi::{
    api::{core::v1::Pod, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const BUDGET: Duration = Duration::from_secs(20);
const RUNNER_URL: &str = "http://runner.hookrun.test:8080";

/// A test namespace with an operator watching it.
struct Setup {
    ns: TestNamespace,
    agents: Api<Agent>,
    sessions: Api<Session>,
    pods: Api<Pod>,
    events: Api<Event>,
    operator: Operator,
}

impl Setup {
    /// A namespace whose operator lets pods stay Pending for an hour: tests that act on
    /// a Pending pod are not raced by the pending timeout, however loaded the machine.
    async fn new(cluster: &Cluster) -> Self {
        Self::with_pending_timeout(cluster, "1h").await
    }

    /// [`Setup::new`] with the operator's `--pending-timeout`.
    async fn with_pending_timeout(cluster: &Cluster, pending_timeout: &str) -> Self {
        let ns = TestNamespace::new(cluster).await;
        let client = cluster.client().await;
        let operator = Operator::start(
            cluster,
            ns.name(),
            &[
                "--runner-url",
                RUNNER_URL,
                "--pending-timeout",
                pending_timeout,
                // Past the pod policy, so that the cluster's own refusal of a missing
                // ServiceAccount can be tested.
                "--allowed-service-accounts",
                "*",
            ],
        )
        .await;
        operator.ready().await;
        Setup {
            agents: Api::namespaced(client.clone(), ns.name()),
            sessions: Api::namespaced(client.clone(), ns.name()),
            pods: Api::namespaced(client.clone(), ns.name()),
            events: Api::namespaced(client, ns.name()),
            ns,
            operator,
        }
    }

    /// Touches the Session's labels and waits until the operator has reconciled since,
    /// so that what it would do on a reconcile is done.
    async fn reconciled(&self, name: &str) {
        let before = self.operator.settled_after("session", 0.0).await;
        self.sessions
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
            )
            .await
            .expect("label patch");
        self.operator.settled_after("session", before).await;
    }

    async fn agent(&self, name: &str, session: Value) {
        apply_agent(
            &self.agents,
            name,
            json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "session": session}}),
        )
        .await;
    }

    /// Creates a Session as the apiserver would.
    async fn session(&self, name: &str, agent: &str, env: &[(&str, &str)]) -> Session {
        let session = Session::new(
            name,
            SessionSpec {
                agent: agent.to_owned(),
                title: "say hello".to_owned(),
                env: env
                    .iter()
                    .map(|(name, value)| SessionEnvVar {
                        name: (*name).to_owned(),
                        value: (*value).to_owned(),
                    })
                    .collect(),
                trigger: None,
                session_key: None,
                history: Vec::new(),
            },
        );
        self.sessions
            .create(&PostParams::default(), &session)
            .await
            .expect("the Session is created")
    }

    async fn pod(&self, name: &str) -> Pod {
        eventually(BUDGET, || async {
            self.pods.get_opt(name).await.ok().flatten()
        })
        .await
        .unwrap_or_else(|| panic!("no pod {name} within {BUDGET:?}"))
    }

    /// Waits until the Session is in `phase`, and returns it.
    async fn phase(&self, name: &str, phase: SessionPhase) -> Session {
        let found = eventually(BUDGET, || async {
            let session = self.sessions.get(name).await.ok()?;
            (session.status.as_ref()?.phase == Some(phase)).then_some(session)
        })
        .await;
        match found {
            Some(session) => session,
            None => {
                let now = self.sessions.get(name).await.ok().and_then(|s| s.status);
                let operator = self.operator.state().await;
                panic!("session {name} did not reach {phase:?}; its status: {now:?}\n{operator}")
            }
        }
    }

    /// Plays the kubelet: writes the pod's status.
    async fn set_pod_status(&self, name: &str, status: Value) {
        self.pods
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .expect("the pod status is written");
    }

    /// Plays the runner API: appends an event to the Session status with the agreed
    /// read, change, merge patch with resourceVersion, again on a conflict.
    async fn append_event(&self, name: &str, type_: &str, content: &str) {
        for _ in 0..50 {
            let session = self.sessions.get(name).await.expect("the Session");
            let mut status = session.status.clone().unwrap_or_default();
            status.push_event(type_, content, Time(Timestamp::now()));
            let patch = json!({
                "metadata": {"resourceVersion": session.resource_version()},
                "status": status,
            });
            match self
                .sessions
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(conflict)) if conflict.code == 409 => {}
                Err(error) => panic!("appending an event failed: {error}"),
            }
        }
        panic!("appending an event kept conflicting");
    }

    /// The reasons of the Kubernetes Events about a Session.
    async fn event_reasons(&self, session: &str) -> Vec<String> {
        self.events
            .list(&Default::default())
            .await
            .expect("events list")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(session))
            .filter_map(|e| e.reason)
            .collect()
    }
}

fn event_types_of(session: &Session) -> Vec<String> {
    session
        .status
        .as_ref()
        .map(|s| s.events.iter().map(|e| e.type_.clone()).collect())
        .unwrap_or_default()
}

fn env_value(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.value.clone())
}

#[tokio::test]
async fn a_session_gets_one_pod_with_the_agreed_spec() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    // Env from a Secret needs a Secret that opted in (the pod policy).
    for args in [
        &[
            "create",
            "secret",
            "generic",
            "keys",
            "--from-literal=anthropic=k",
        ][..],
        &["label", "secret", "keys", "hookrun.dev/agent-env=true"][..],
    ] {
        let out = setup.ns.kubectl(args, None);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    setup
        .agent(
            "builder",
            json!({
                "image": "registry.example/harness:1",
                "timeoutSeconds": 600,
                "env": [
                    {"name": "LOG_LEVEL", "value": "info"},
                    {"name": "MODEL", "value": "a"},
                    {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "keys", "key": "anthropic"}}}
                ],
                "nodeSelector": {"pool": "agents"}
            }),
        )
        .await;
    let started = std::time::Instant::now();
    let session = setup
        .session("builder-wh-00000001", "builder", &[("MODEL", "b")])
        .await;
    let pod = setup.pod("builder-wh-00000001").await;
    eprintln!("session to pod: {:?}", started.elapsed());

    let labels = pod.labels();
    assert_eq!(labels[names::AGENT_LABEL], "builder");
    assert_eq!(labels[names::SESSION_LABEL], "builder-wh-00000001");
    let owner = &pod.owner_references()[0];
    assert_eq!(owner.kind, "Session");
    assert_eq!(Some(&owner.uid), session.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));

    let spec = pod.spec.clone().expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.node_selector.expect("selector")["pool"], "agents");
    assert_eq!(spec.containers.len(), 1);
    let container = &spec.containers[0];
    assert_eq!(container.name, "agent");
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/harness:1")
    );
    let security = container.security_context.clone().expect("security");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(
        spec.security_context
            .and_then(|s| s.seccomp_profile)
            .map(|p| p.type_)
            .as_deref(),
        Some("RuntimeDefault")
    );

    let names_in_order: Vec<String> = container
        .env
        .clone()
        .expect("env")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(
        names_in_order,
        [
            "LOG_LEVEL",
            "MODEL",
            "API_KEY",
            env::SESSION,
            env::NAMESPACE,
            env::AGENT,
            env::RUNNER_URL,
            env::TOKEN_FILE
        ]
    );
    assert_eq!(env_value(&pod, "MODEL").as_deref(), Some("b"));
    assert_eq!(
        env_value(&pod, env::SESSION).as_deref(),
        Some("builder-wh-00000001")
    );
    assert_eq!(
        env_value(&pod, env::NAMESPACE).as_deref(),
        Some(setup.ns.name())
    );
    assert_eq!(env_value(&pod, env::AGENT).as_deref(), Some("builder"));
    assert_eq!(
        env_value(&pod, env::RUNNER_URL).as_deref(),
        Some(RUNNER_URL)
    );
    assert_eq!(
        env_value(&pod, env::TOKEN_FILE).as_deref(),
        Some(names::TOKEN_FILE)
    );

    let volume = &spec.volumes.expect("volumes")[0];
    let token = volume
        .projected
        .as_ref()
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.clone())
        .expect("a projected token");
    assert_eq!(token.audience.as_deref(), Some(names::TOKEN_AUDIENCE));
    let mount = &container.volume_mounts.clone().expect("mounts")[0];
    assert_eq!(
        format!("{}/{}", mount.mount_path, token.path),
        names::TOKEN_FILE
    );

    let session = setup
        .phase("builder-wh-00000001", SessionPhase::Pending)
        .await;
    let status = session.status.expect("status");
    assert_eq!(status.pod_name.as_deref(), Some("builder-wh-00000001"));
    assert_eq!(status.pod_uid, pod.metadata.uid);
}

#[tokio::test]
async fn a_running_then_succeeded_pod_completes_with_the_last_agent_message() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup.agent("helper", json!({})).await;
    setup.session("helper-wh-00000001", "helper", &[]).await;
    setup.pod("helper-wh-00000001").await;
    setup
        .phase("helper-wh-00000001", SessionPhase::Pending)
        .await;

    setup
        .set_pod_status("helper-wh-00000001", json!({"phase": "Running"}))
        .await;
    let running = setup
        .phase("helper-wh-00000001", SessionPhase::Running)
        .await;
    assert_eq!(event_types_of(&running), [event_types::STATUS_RUNNING]);
    assert!(
        running
            .status
            .as_ref()
            .and_then(|s| s.start_time.as_ref())
            .is_some()
    );

    setup
        .append_event("helper-wh-00000001", event_types::AGENT_MESSAGE, "thinking")
        .await;
    setup
        .append_event(
            "helper-wh-00000001",
            event_types::AGENT_MESSAGE,
            "hello there",
        )
        .await;
    setup
        .set_pod_status("helper-wh-00000001", json!({"phase": "Succeeded"}))
        .await;
    let done = setup
        .phase("helper-wh-00000001", SessionPhase::Complete)
        .await;
    let status = done.status.clone().expect("status");
    assert_eq!(status.response.as_deref(), Some("hello there"));
    assert!(status.completion_time.is_some());
    assert_eq!(
        event_types_of(&done),
        [
            event_types::STATUS_RUNNING,
            event_types::AGENT_MESSAGE,
            event_types::AGENT_MESSAGE,
            event_types::STATUS_CLOSED
        ]
    );
    assert_eq!(status.events[3].content, "Complete");

    // Nothing more happens: the closing event stays single.
    setup.reconciled("helper-wh-00000001").await;
    let later = setup
        .sessions
        .get("helper-wh-00000001")
        .await
        .expect("session");
    assert_eq!(event_types_of(&later).len(), 4);
}

#[tokio::test]
async fn events_appended_while_the_operator_writes_are_all_kept() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup.agent("chatty", json!({})).await;
    setup.session("chatty-wh-00000001", "chatty", &[]).await;
    setup.pod("chatty-wh-00000001").await;
    setup
        .phase("chatty-wh-00000001", SessionPhase::Pending)
        .await;

    // Two "replicas" append while the operator records the pod running.
    let appends = |replica: usize| {
        let setup = &setup;
        async move {
            for i in 0..10 {
                let content = format!("replica {replica} message {i}");
                setup
                    .append_event("chatty-wh-00000001", event_types::AGENT_MESSAGE, &content)
                    .await;
            }
        }
    };
    let running = async {
        setup
            .set_pod_status("chatty-wh-00000001", json!({"phase": "Running"}))
            .await;
    };
    tokio::join!(appends(1), appends(2), running);
    setup
        .phase("chatty-wh-00000001", SessionPhase::Running)
        .await;
    setup
        .set_pod_status("chatty-wh-00000001", json!({"phase": "Succeeded"}))
        .await;
    let done = setup
        .phase("chatty-wh-00000001", SessionPhase::Complete)
        .await;
    let status = done.status.clone().expect("status");
    let types = event_types_of(&done);
    let count = |t: &str| types.iter().filter(|x| x.as_str() == t).count();
    assert_eq!(count(event_types::AGENT_MESSAGE), 20, "{types:?}");
    assert_eq!(count(event_types::STATUS_RUNNING), 1, "{types:?}");
    assert_eq!(count(event_types::STATUS_CLOSED), 1, "{types:?}");
    assert_eq!(
        types.last().map(String::as_str),
        Some(event_types::STATUS_CLOSED)
    );
    assert_eq!(status.response.as_deref(), status.last_agent_message());
    assert!(status.response.is_some());
}

#[tokio::test]
async fn a_pod_past_its_deadline_is_an_error_that_names_the_timeout() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup.agent("slow", json!({"timeoutSeconds": 30})).await;
    setup.session("slow-wh-00000001", "slow", &[]).await;
    setup.pod("slow-wh-00000001").await;
    setup
        .set_pod_status("slow-wh-00000001", json!({"phase": "Running"}))
        .await;
    setup.phase("slow-wh-00000001", SessionPhase::Running).await;
    setup
        .set_pod_status(
            "slow-wh-00000001",
            json!({
                "phase": "Failed",
                "reason": "DeadlineExceeded",
                "message": "Pod was active on the node longer than the specified deadline"
            }),
        )
        .await;
    let failed = setup.phase("slow-wh-00000001", SessionPhase::Error).await;
    let status = failed.status.clone().expect("status");
    assert_eq!(
        status.message.as_deref(),
        Some("the session ran past its timeout of 30 s (spec.session.timeoutSeconds)")
    );
    assert_eq!(status.response, None);
    assert_eq!(
        event_types_of(&failed),
        [event_types::STATUS_RUNNING, event_types::STATUS_CLOSED]
    );
    assert_eq!(status.events[1].content, "Error");
    let reasons = eventually(BUDGET, || async {
        let reasons = setup.event_reasons("slow-wh-00000001").await;
        (!reasons.is_empty()).then_some(reasons)
    })
    .await
    .expect("a Kubernetes Event about the Session");
    assert_eq!(reasons, ["DeadlineExceeded"]);
}

#[tokio::test]
async fn a_deleted_pod_is_an_error_and_is_not_recreated() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup.agent("fragile", json!({})).await;
    setup.session("fragile-wh-00000001", "fragile", &[]).await;
    setup.pod("fragile-wh-00000001").await;
    setup
        .phase("fragile-wh-00000001", SessionPhase::Pending)
        .await;
    setup
        .pods
        .delete(
            "fragile-wh-00000001",
            &DeleteParams::default().grace_period(0),
        )
        .await
        .expect("the pod is deleted");
    let failed = setup
        .phase("fragile-wh-00000001", SessionPhase::Error)
        .await;
    assert_eq!(
        failed.status.and_then(|s| s.message).as_deref(),
        Some("the pod was deleted before the session finished")
    );
    setup.reconciled("fragile-wh-00000001").await;
    assert!(
        setup
            .pods
            .get_opt("fragile-wh-00000001")
            .await
            .expect("get")
            .is_none(),
        "a finished Session got a new pod"
    );
}

#[tokio::test]
async fn a_pod_unschedulable_past_the_pending_timeout_fails_and_is_removed() {
    let cluster = cluster().await;
    let setup = Setup::with_pending_timeout(cluster, "2s").await;
    setup.agent("big", json!({})).await;
    setup.session("big-wh-00000001", "big", &[]).await;
    setup.pod("big-wh-00000001").await;
    setup
        .set_pod_status(
            "big-wh-00000001",
            json!({
                "phase": "Pending",
                "conditions": [{
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient memory."
                }]
            }),
        )
        .await;
    let failed = setup.phase("big-wh-00000001", SessionPhase::Error).await;
    assert_eq!(
        failed.status.and_then(|s| s.message).as_deref(),
        Some(
            "the pod could not be scheduled within 2s: 0/3 nodes are available: 3 Insufficient memory."
        )
    );
    let gone = eventually(BUDGET, || async {
        match setup.pods.get_opt("big-wh-00000001").await {
            Ok(None) => Some(()),
            Ok(Some(pod)) if pod.metadata.deletion_timestamp.is_some() => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(gone.is_some(), "the stuck pod was not deleted");
    assert!(
        setup
            .event_reasons("big-wh-00000001")
            .await
            .contains(&"Unschedulable".to_owned())
    );
}

#[tokio::test]
async fn a_pod_the_cluster_refuses_past_the_pending_timeout_is_an_error() {
    let cluster = cluster().await;
    let setup = Setup::with_pending_timeout(cluster, "2s").await;
    setup
        .agent("lost", json!({"serviceAccountName": "no-such-account"}))
        .await;
    setup.session("lost-wh-00000001", "lost", &[]).await;
    let failed = setup.phase("lost-wh-00000001", SessionPhase::Error).await;
    let message = failed.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.starts_with("the pod could not be created within 2s: ")
            && message.contains("no-such-account"),
        "{message}"
    );
    assert!(
        setup
            .pods
            .get_opt("lost-wh-00000001")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn a_session_of_a_missing_agent_is_an_error_without_a_pod() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup.session("ghost-wh-00000001", "ghost", &[]).await;
    let failed = setup.phase("ghost-wh-00000001", SessionPhase::Error).await;
    assert_eq!(
        failed.status.and_then(|s| s.message).as_deref(),
        Some("agent ghost not found")
    );
    assert!(
        setup
            .pods
            .get_opt("ghost-wh-00000001")
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn finished_sessions_and_their_pods_go_after_the_ttl() {
    let cluster = cluster().await;
    let setup = Setup::new(cluster).await;
    setup
        .agent("brief", json!({"ttlSecondsAfterFinished": 1}))
        .await;
    setup.session("brief-wh-00000001", "brief", &[]).await;
    setup.pod("brief-wh-00000001").await;
    setup
        .phase("brief-wh-00000001", SessionPhase::Pending)
        .await;
    setup
        .set_pod_status("brief-wh-00000001", json!({"phase": "Succeeded"}))
        .await;
    setup
        .phase("brief-wh-00000001", SessionPhase::Complete)
        .await;
    let session_gone = eventually(BUDGET, || async {
        matches!(setup.sessions.get_opt("brief-wh-00000001").await, Ok(None)).then_some(())
    })
    .await;
    assert!(session_gone.is_some(), "the Session outlived its TTL");
    // kube-controller-manager's garbage collector removes the owned pod.
    let pod_gone = eventually(Duration::from_secs(60), || async {
        matches!(setup.pods.get_opt("brief-wh-00000001").await, Ok(None)).then_some(())
    })
    .await;
    assert!(pod_gone.is_some(), "the pod outlived its Session");
}
