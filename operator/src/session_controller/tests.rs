//! Unit tests of the Session controller's pure parts: the pod it builds and the phase
//! decisions. No cluster.

use std::time::Duration;

use hookrun_crds::{
    Agent, AgentSpec, Session, SessionSpec, SessionStatus,
    agent::{EnvVar as AgentEnvVar, EnvVarSource, SecretKeyRef, SessionTemplate},
    names,
    session::{SessionEnvVar, SessionPhase, event_types},
};
use k8s_openapi::{
    api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, EnvVar,
        LocalObjectReference, Pod, PodCondition, PodSecurityContext, PodStatus, SecurityContext,
        Toleration,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use kube::runtime::{reflector, watcher};

use super::{
    cache::{CachedPod, CachedSession, PodIndex},
    expired_sessions,
    phase::{self, Decision, FailReason, Limits, Observed, Transition},
    pod::{self, PodSettings},
    ttl_of,
};

const UID: &str = "session-uid";
const POD_UID: &str = "pod-uid";

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_900_000_000 + seconds).expect("timestamp")
}

fn time(seconds: i64) -> Time {
    Time(at(seconds))
}

fn settings() -> PodSettings {
    PodSettings {
        default_image: "ghcr.io/hookrun/hookrun-harness:test".into(),
        runner_url: "http://runner.example:8080".into(),
    }
}

fn session(env: &[(&str, &str)]) -> Session {
    let mut session = Session::new(
        "my-agent-wh-0a1b2c3d",
        SessionSpec {
            agent: "my-agent".into(),
            title: "hello".into(),
            env: env
                .iter()
                .map(|(name, value)| SessionEnvVar {
                    name: (*name).into(),
                    value: (*value).into(),
                })
                .collect(),
            trigger: None,
            session_key: None,
            history: Vec::new(),
        },
    );
    session.metadata.namespace = Some("team-a".into());
    session.metadata.uid = Some(UID.into());
    session
}

fn agent(template: Option<SessionTemplate>) -> Agent {
    let mut agent = Agent::new(
        "my-agent",
        AgentSpec {
            session: template.map(Box::new),
            ..Default::default()
        },
    );
    agent.metadata.namespace = Some("team-a".into());
    agent
}

fn literal(name: &str, value: &str) -> AgentEnvVar {
    AgentEnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_pairs(env: &[EnvVar]) -> Vec<(String, String)> {
    env.iter()
        .map(|v| {
            let value = match (&v.value, &v.value_from) {
                (Some(value), None) => value.clone(),
                (None, Some(from)) => format!("{from:?}"),
                other => panic!("{}: value and valueFrom: {other:?}", v.name),
            };
            (v.name.clone(), value)
        })
        .collect()
}

// --- the pod ---------------------------------------------------------------

#[test]
fn the_pod_is_named_owned_labelled_and_never_restarted() {
    let template = SessionTemplate {
        timeout_seconds: Some(900),
        ..Default::default()
    };
    let pod = pod::build_pod(&session(&[]), &agent(Some(template)), &settings()).expect("builds");
    assert_eq!(pod.metadata.name.as_deref(), Some("my-agent-wh-0a1b2c3d"));
    assert_eq!(pod.metadata.namespace.as_deref(), Some("team-a"));
    let labels = pod.metadata.labels.clone().expect("labels");
    assert_eq!(labels[names::AGENT_LABEL], "my-agent");
    assert_eq!(labels[names::SESSION_LABEL], "my-agent-wh-0a1b2c3d");
    let owners = pod.metadata.owner_references.clone().expect("owners");
    assert_eq!(
        owners,
        [OwnerReference {
            api_version: "hookrun.dev/v1alpha1".into(),
            kind: "Session".into(),
            name: "my-agent-wh-0a1b2c3d".into(),
            uid: UID.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]
    );
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.active_deadline_seconds, Some(900));
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(spec.containers[0].name, "agent");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("ghcr.io/hookrun/hookrun-harness:test")
    );
    assert_eq!(spec.service_account_name, None);
    assert_eq!(spec.node_selector, None);
    assert_eq!(spec.tolerations, None);
}

#[test]
fn a_session_without_uid_or_namespace_gets_no_pod() {
    let mut no_uid = session(&[]);
    no_uid.metadata.uid = None;
    assert!(pod::build_pod(&no_uid, &agent(None), &settings()).is_err());
    let mut no_ns = session(&[]);
    no_ns.metadata.namespace = None;
    assert!(pod::build_pod(&no_ns, &agent(None), &settings()).is_err());
}

#[test]
fn env_is_agent_then_session_overrides_then_reserved() {
    let template = SessionTemplate {
        env: vec![
            literal("LOG_LEVEL", "info"),
            literal("MODEL", "a"),
            AgentEnvVar {
                name: "API_KEY".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeyRef {
                        name: "keys".into(),
                        key: "anthropic".into(),
                    }),
                    config_map_key_ref: None,
                }),
            },
            AgentEnvVar {
                name: "REGION".into(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: None,
                    config_map_key_ref: Some(SecretKeyRef {
                        name: "settings".into(),
                        key: "region".into(),
                    }),
                }),
            },
            literal("HOOKRUN_SESSION", "forged"),
        ],
        ..Default::default()
    };
    let session = session(&[
        ("MODEL", "b"),
        ("EXTRA", "x"),
        ("HOOKRUN_RUNNER_URL", "http://evil"),
    ]);
    let pod = pod::build_pod(&session, &agent(Some(template)), &settings()).expect("builds");
    let env = pod.spec.expect("spec").containers[0]
        .env
        .clone()
        .expect("env");
    let names: Vec<&str> = env.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "LOG_LEVEL",
            "MODEL",
            "API_KEY",
            "REGION",
            "EXTRA",
            "HOOKRUN_SESSION",
            "HOOKRUN_NAMESPACE",
            "HOOKRUN_AGENT",
            "HOOKRUN_RUNNER_URL",
            "HOOKRUN_TOKEN_FILE",
        ]
    );
    let pairs = env_pairs(&env);
    assert_eq!(pairs[1], ("MODEL".into(), "b".into()));
    assert_eq!(pairs[4], ("EXTRA".into(), "x".into()));
    assert_eq!(pairs[5].1, "my-agent-wh-0a1b2c3d");
    assert_eq!(pairs[6].1, "team-a");
    assert_eq!(pairs[7].1, "my-agent");
    assert_eq!(pairs[8].1, "http://runner.example:8080");
    assert_eq!(pairs[9].1, names::TOKEN_FILE);

    let secret = env[2].value_from.as_ref().expect("valueFrom");
    let secret = secret.secret_key_ref.as_ref().expect("secretKeyRef");
    assert_eq!(
        (secret.name.as_str(), secret.key.as_str()),
        ("keys", "anthropic")
    );
    assert!(env[2].value.is_none());
    let config = env[3].value_from.as_ref().expect("valueFrom");
    assert!(config.secret_key_ref.is_none());
    let config = config.config_map_key_ref.as_ref().expect("configMapKeyRef");
    assert_eq!(
        (config.name.as_str(), config.key.as_str()),
        ("settings", "region")
    );
}

#[test]
fn a_session_override_replaces_a_secret_backed_default() {
    let template = SessionTemplate {
        env: vec![AgentEnvVar {
            name: "TOKEN".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                }),
                config_map_key_ref: None,
            }),
        }],
        ..Default::default()
    };
    let pod = pod::build_pod(
        &session(&[("TOKEN", "lit")]),
        &agent(Some(template)),
        &settings(),
    )
    .expect("builds");
    let env = pod.spec.expect("spec").containers[0]
        .env
        .clone()
        .expect("env");
    assert_eq!(env[0].value.as_deref(), Some("lit"));
    assert!(env[0].value_from.is_none());
}

#[test]
fn the_token_is_projected_for_hookrun_and_the_default_one_is_not_mounted() {
    let pod = pod::build_pod(&session(&[]), &agent(None), &settings()).expect("builds");
    let spec = pod.spec.expect("spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    let volumes = spec.volumes.expect("volumes");
    assert_eq!(volumes.len(), 1);
    let sources = volumes[0]
        .projected
        .as_ref()
        .and_then(|p| p.sources.clone())
        .expect("projected sources");
    let token = sources[0]
        .service_account_token
        .as_ref()
        .expect("a serviceAccountToken source");
    assert_eq!(token.audience.as_deref(), Some(names::TOKEN_AUDIENCE));
    assert_eq!(
        token.expiration_seconds,
        Some(names::TOKEN_EXPIRATION_SECONDS)
    );
    let mounts = spec.containers[0].volume_mounts.clone().expect("mounts");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].name, volumes[0].name);
    assert_eq!(mounts[0].read_only, Some(true));
    assert_eq!(
        format!("{}/{}", mounts[0].mount_path, token.path),
        names::TOKEN_FILE
    );
}

#[test]
fn security_defaults_hold_where_the_agent_does_not_override_them() {
    let pod = pod::build_pod(&session(&[]), &agent(None), &settings()).expect("builds");
    let spec = pod.spec.expect("spec");
    let pod_security = spec.security_context.expect("pod security");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    assert_eq!(
        pod_security.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let container = spec.containers[0]
        .security_context
        .clone()
        .expect("container security");
    assert_eq!(container.allow_privilege_escalation, Some(false));
    assert_eq!(container.run_as_non_root, Some(true));
    assert_eq!(
        container.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        container.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );

    // One field set keeps every other default.
    let template = SessionTemplate {
        pod_security_context: Some(PodSecurityContext {
            fs_group: Some(2000),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                add: Some(vec!["NET_BIND_SERVICE".to_owned()]),
                drop: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = pod::build_pod(&session(&[]), &agent(Some(template)), &settings()).expect("builds");
    let spec = pod.spec.expect("spec");
    let pod_security = spec.security_context.expect("pod security");
    assert_eq!(pod_security.fs_group, Some(2000));
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let container = spec.containers[0]
        .security_context
        .clone()
        .expect("container security");
    assert_eq!(container.read_only_root_filesystem, Some(true));
    assert_eq!(container.run_as_non_root, Some(true));
    assert_eq!(container.allow_privilege_escalation, Some(false));
    let capabilities = container.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(capabilities.add, Some(vec!["NET_BIND_SERVICE".to_owned()]));

    // What the policy may allow: a privileged container may escalate, and user 0 is not
    // forced non-root.
    let template = SessionTemplate {
        pod_security_context: Some(PodSecurityContext {
            run_as_user: Some(0),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = pod::build_pod(&session(&[]), &agent(Some(template)), &settings()).expect("builds");
    let spec = pod.spec.expect("spec");
    let pod_security = spec.security_context.expect("pod security");
    assert_eq!(pod_security.run_as_user, Some(0));
    assert_eq!(pod_security.run_as_non_root, None);
    let container = spec.containers[0]
        .security_context
        .clone()
        .expect("container security");
    assert_eq!(container.privileged, Some(true));
    assert_eq!(container.allow_privilege_escalation, None);
    assert_eq!(container.run_as_non_root, None);
    assert_eq!(
        container.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
}

#[test]
fn scheduling_and_image_settings_come_from_the_agent() {
    let template = SessionTemplate {
        image: Some("registry.example/harness:1".into()),
        service_account_name: Some("runner".into()),
        node_selector: [("pool".to_owned(), "agents".to_owned())].into(),
        tolerations: vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }],
        image_pull_secrets: vec![LocalObjectReference {
            name: "pull".into(),
        }],
        resources: Some(Default::default()),
        ..Default::default()
    };
    let pod = pod::build_pod(&session(&[]), &agent(Some(template)), &settings()).expect("builds");
    let spec = pod.spec.expect("spec");
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("registry.example/harness:1")
    );
    assert_eq!(spec.service_account_name.as_deref(), Some("runner"));
    assert_eq!(spec.node_selector.expect("selector")["pool"], "agents");
    assert_eq!(spec.tolerations.expect("tolerations").len(), 1);
    assert_eq!(
        spec.image_pull_secrets.expect("pull secrets")[0].name,
        "pull"
    );
    assert!(spec.containers[0].resources.is_some());
    assert_eq!(spec.active_deadline_seconds, None);
}

#[test]
fn ttl_defaults_to_a_day() {
    assert_eq!(ttl_of(None), Duration::from_secs(86_400));
    let template = SessionTemplate {
        ttl_seconds_after_finished: Some(1),
        ..Default::default()
    };
    assert_eq!(ttl_of(Some(&agent(Some(template)))), Duration::from_secs(1));
}

// --- the phase decisions ---------------------------------------------------

const LIMITS: Limits = Limits {
    pending_timeout: Duration::from_secs(300),
    ttl: Duration::from_secs(60),
};

/// A pod of the Session, created at second 0, in `phase`.
fn pod_in(phase: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("my-agent-wh-0a1b2c3d".into()),
            uid: Some(POD_UID.into()),
            creation_timestamp: Some(time(0)),
            owner_references: Some(vec![OwnerReference {
                kind: "Session".into(),
                uid: UID.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::PodSpec {
            active_deadline_seconds: Some(900),
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "agent".into(),
                image: Some("harness:1".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some(phase.into()),
            ..Default::default()
        }),
    }
}

fn with_container_state(mut pod: Pod, state: ContainerState) -> Pod {
    let status = pod.status.get_or_insert_with(Default::default);
    status.container_statuses = Some(vec![ContainerStatus {
        name: "agent".into(),
        state: Some(state),
        ..Default::default()
    }]);
    pod
}

fn waiting(pod: Pod, reason: &str) -> Pod {
    with_container_state(
        pod,
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: Some(format!("because {reason}")),
            }),
            ..Default::default()
        },
    )
}

fn unschedulable(mut pod: Pod) -> Pod {
    let status = pod.status.get_or_insert_with(Default::default);
    status.conditions = Some(vec![PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some("0/3 nodes are available".into()),
        ..Default::default()
    }]);
    pod
}

fn recorded(phase: SessionPhase) -> SessionStatus {
    SessionStatus {
        phase: Some(phase),
        pod_name: Some("my-agent-wh-0a1b2c3d".into()),
        pod_uid: Some(POD_UID.into()),
        ..Default::default()
    }
}

fn decide_at(status: Option<&SessionStatus>, pod: Option<&Pod>, now: i64) -> Decision {
    phase::decide(
        Observed {
            session_uid: UID,
            status,
            pod,
            now: at(now),
        },
        LIMITS,
    )
}

fn fail_of(decision: &Decision) -> (FailReason, &str, bool) {
    match decision {
        Decision::Write(Transition::Fail {
            reason,
            message,
            delete_pod,
        }) => (*reason, message.as_str(), *delete_pod),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_new_session_gets_a_pod_and_then_records_it() {
    assert_eq!(decide_at(None, None, 1), Decision::CreatePod);
    let pod = pod_in("Pending");
    assert_eq!(
        decide_at(None, Some(&pod), 1),
        Decision::Write(Transition::PodCreated {
            name: "my-agent-wh-0a1b2c3d".into(),
            uid: POD_UID.into(),
        })
    );
    assert_eq!(
        decide_at(Some(&recorded(SessionPhase::Pending)), Some(&pod), 1),
        Decision::Wait(None)
    );
}

#[test]
fn a_pod_is_never_created_twice() {
    // The status names a pod that is gone: that is an error, not a reason to recreate.
    let decision = decide_at(Some(&recorded(SessionPhase::Pending)), None, 1);
    let (reason, message, delete) = fail_of(&decision);
    assert_eq!(reason, FailReason::PodDeleted);
    assert_eq!(message, "the pod was deleted before the session finished");
    assert!(!delete);
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), None, 1);
    assert_eq!(fail_of(&decision).0, FailReason::PodDeleted);
}

#[test]
fn running_pod_runs_the_session_once() {
    let pod = pod_in("Running");
    assert_eq!(
        decide_at(Some(&recorded(SessionPhase::Pending)), Some(&pod), 1),
        Decision::Write(Transition::Running)
    );
    assert_eq!(
        decide_at(Some(&recorded(SessionPhase::Running)), Some(&pod), 1),
        Decision::Wait(None)
    );
}

#[test]
fn a_succeeded_pod_completes_with_the_last_agent_message() {
    let pod = pod_in("Succeeded");
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), Some(&pod), 1);
    assert_eq!(decision, Decision::Write(Transition::Complete));

    let mut status = recorded(SessionPhase::Running);
    status.push_event(event_types::AGENT_MESSAGE, "first", time(1));
    status.push_event(event_types::AGENT_MESSAGE, "the answer", time(2));
    status.push_event("tool.call", "ls", time(3));
    assert!(phase::apply(&Transition::Complete, &mut status, time(4)));
    assert_eq!(status.phase(), SessionPhase::Complete);
    assert_eq!(status.response.as_deref(), Some("the answer"));
    assert_eq!(status.completion_time, Some(time(4)));
    let last = status.events.last().expect("an event");
    assert_eq!(
        (last.type_.as_str(), last.content.as_str()),
        (event_types::STATUS_CLOSED, "Complete")
    );
    // Only once.
    assert!(!phase::apply(&Transition::Complete, &mut status, time(5)));
}

#[test]
fn a_silent_pod_that_succeeds_from_pending_runs_then_completes_with_no_answer() {
    let mut status = recorded(SessionPhase::Pending);
    assert!(phase::apply(&Transition::Complete, &mut status, time(4)));
    assert_eq!(status.response, None);
    let types: Vec<&str> = status.events.iter().map(|e| e.type_.as_str()).collect();
    assert_eq!(
        types,
        [event_types::STATUS_RUNNING, event_types::STATUS_CLOSED]
    );
}

#[test]
fn the_harness_answer_wins_over_the_pod() {
    // The runner API finished the Session first; the pod's success changes nothing.
    let mut status = recorded(SessionPhase::Running);
    status.finish(SessionPhase::Error, None, Some("harness says no"), time(1));
    let before = status.clone();
    assert!(!phase::apply(&Transition::Complete, &mut status, time(2)));
    assert_eq!(status, before);
    let fail = Transition::Fail {
        reason: FailReason::PodFailed,
        message: "x".into(),
        delete_pod: false,
    };
    assert!(!phase::apply(&fail, &mut status, time(2)));
    assert_eq!(status, before);
}

#[test]
fn a_deadline_failure_names_the_timeout() {
    let mut pod = pod_in("Failed");
    if let Some(status) = pod.status.as_mut() {
        status.reason = Some("DeadlineExceeded".into());
        status.message =
            Some("Pod was active on the node longer than the specified deadline".into());
    }
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), Some(&pod), 1000);
    let (reason, message, delete) = fail_of(&decision);
    assert_eq!(reason, FailReason::DeadlineExceeded);
    assert_eq!(
        message,
        "the session ran past its timeout of 900 s (spec.session.timeoutSeconds)"
    );
    assert!(!delete);
}

#[test]
fn a_failed_container_gives_its_exit_code_and_reason() {
    let pod = with_container_state(
        pod_in("Failed"),
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 137,
                reason: Some("OOMKilled".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), Some(&pod), 10);
    let (reason, message, _) = fail_of(&decision);
    assert_eq!(reason, FailReason::PodFailed);
    assert_eq!(
        message,
        "the agent container exited with code 137 (OOMKilled)"
    );

    let mut evicted = pod_in("Failed");
    if let Some(status) = evicted.status.as_mut() {
        status.reason = Some("Evicted".into());
        status.message = Some("The node was low on resource: memory.".into());
    }
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), Some(&evicted), 10);
    assert_eq!(
        fail_of(&decision).1,
        "the pod failed (Evicted): The node was low on resource: memory."
    );

    let mut status = recorded(SessionPhase::Running);
    assert!(phase::apply(
        &Transition::Fail {
            reason: FailReason::PodFailed,
            message: "boom".into(),
            delete_pod: false
        },
        &mut status,
        time(11)
    ));
    assert_eq!(status.phase(), SessionPhase::Error);
    assert_eq!(status.message.as_deref(), Some("boom"));
    assert_eq!(
        status.events.last().map(|e| e.content.as_str()),
        Some("Error")
    );
}

#[test]
fn unschedulable_waits_out_the_pending_timeout_then_fails_and_deletes() {
    let pod = unschedulable(pod_in("Pending"));
    let status = recorded(SessionPhase::Pending);
    assert_eq!(
        decide_at(Some(&status), Some(&pod), 100),
        Decision::Wait(Some(Duration::from_secs(200)))
    );
    let decision = decide_at(Some(&status), Some(&pod), 300);
    let (reason, message, delete) = fail_of(&decision);
    assert_eq!(reason, FailReason::Unschedulable);
    assert_eq!(
        message,
        "the pod could not be scheduled within 5m: 0/3 nodes are available"
    );
    assert!(delete);
}

#[test]
fn image_pull_trouble_waits_out_the_timeout_but_an_invalid_name_fails_at_once() {
    let status = recorded(SessionPhase::Pending);
    for reason in ["ErrImagePull", "ImagePullBackOff"] {
        let pod = waiting(pod_in("Pending"), reason);
        assert_eq!(
            decide_at(Some(&status), Some(&pod), 299),
            Decision::Wait(Some(Duration::from_secs(1)))
        );
        let decision = decide_at(Some(&status), Some(&pod), 301);
        let (fail, message, delete) = fail_of(&decision);
        assert_eq!(fail, FailReason::ImagePullFailed);
        assert_eq!(
            message,
            format!(
                "the image \"harness:1\" could not be pulled within 5m ({reason}: because {reason})"
            )
        );
        assert!(delete);
    }
    let pod = waiting(pod_in("Pending"), "InvalidImageName");
    let decision = decide_at(Some(&status), Some(&pod), 1);
    let (fail, message, delete) = fail_of(&decision);
    assert_eq!(fail, FailReason::InvalidImageName);
    assert!(
        message.contains("\"harness:1\" is not a valid image name"),
        "{message}"
    );
    assert!(delete);

    let pod = waiting(pod_in("Pending"), "CreateContainerConfigError");
    let (fail, _, delete) = fail_of(&decide_at(Some(&status), Some(&pod), 400));
    assert_eq!(fail, FailReason::ContainerCreateFailed);
    assert!(delete);
}

#[test]
fn a_pod_that_is_merely_starting_is_left_alone() {
    let status = recorded(SessionPhase::Pending);
    let pod = waiting(pod_in("Pending"), "ContainerCreating");
    assert_eq!(
        decide_at(Some(&status), Some(&pod), 10_000),
        Decision::Wait(None)
    );
    assert_eq!(
        decide_at(Some(&status), Some(&pod_in("Pending")), 10_000),
        Decision::Wait(None)
    );
}

#[test]
fn a_pod_of_someone_else_is_not_adopted() {
    let mut foreign = pod_in("Running");
    foreign.metadata.owner_references = None;
    let decision = decide_at(None, Some(&foreign), 1);
    let (reason, message, delete) = fail_of(&decision);
    assert_eq!(reason, FailReason::PodNotOwned);
    assert!(message.contains("already exists"), "{message}");
    assert!(!delete);
    // A pod of an earlier Session of the same name that is being deleted: wait for it.
    foreign.metadata.deletion_timestamp = Some(time(0));
    assert_eq!(decide_at(None, Some(&foreign), 1), Decision::Wait(None));
    // Our recorded pod replaced by another of the same name: ours is gone.
    let mut replaced = pod_in("Running");
    replaced.metadata.uid = Some("another-uid".into());
    let decision = decide_at(Some(&recorded(SessionPhase::Running)), Some(&replaced), 1);
    assert_eq!(fail_of(&decision).0, FailReason::PodDeleted);
}

#[test]
fn finished_sessions_are_deleted_after_their_ttl() {
    let mut status = recorded(SessionPhase::Running);
    status.finish(SessionPhase::Complete, Some("done"), None, time(100));
    // Whatever the pod does now, only the TTL matters.
    let pod = pod_in("Failed");
    // The stamp is cut to its second: the Session is kept from the end of that second.
    assert_eq!(
        decide_at(Some(&status), Some(&pod), 130),
        Decision::Wait(Some(Duration::from_secs(31)))
    );
    assert_eq!(
        decide_at(Some(&status), None, 160),
        Decision::Wait(Some(Duration::from_secs(1)))
    );
    assert_eq!(decide_at(Some(&status), None, 161), Decision::DeleteSession);
    assert_eq!(
        decide_at(Some(&status), None, 1000),
        Decision::DeleteSession
    );
}

#[test]
fn a_stamp_cut_to_its_second_still_keeps_the_session_its_whole_ttl() {
    // Finished at 99.990 s and stamped 99 s (the API keeps whole seconds), a TTL of 1 s.
    let mut status = recorded(SessionPhase::Running);
    status.finish(SessionPhase::Complete, Some("done"), None, time(99));
    let limits = Limits {
        ttl: Duration::from_secs(1),
        ..LIMITS
    };
    let decide = |ms: i64| {
        let now = Timestamp::from_millisecond(at(0).as_millisecond() + ms).expect("timestamp");
        phase::decide(
            Observed {
                session_uid: UID,
                status: Some(&status),
                pod: None,
                now,
            },
            limits,
        )
    };
    // 25 ms after it finished: counted from the stamp, its second would be up.
    assert_eq!(
        decide(100_015),
        Decision::Wait(Some(Duration::from_millis(985)))
    );
    assert_eq!(decide(101_000), Decision::DeleteSession);
}

#[test]
fn recording_the_pod_is_idempotent_and_keeps_a_later_phase() {
    let created = Transition::PodCreated {
        name: "p".into(),
        uid: "u".into(),
    };
    let mut status = SessionStatus::default();
    assert!(phase::apply(&created, &mut status, time(0)));
    assert_eq!(status.phase(), SessionPhase::Pending);
    assert_eq!(status.pod_uid.as_deref(), Some("u"));
    assert!(!phase::apply(&created, &mut status, time(1)));

    let mut running = SessionStatus {
        phase: Some(SessionPhase::Running),
        ..Default::default()
    };
    assert!(phase::apply(&created, &mut running, time(1)));
    assert_eq!(running.phase(), SessionPhase::Running);
}

#[test]
fn a_missing_agent_is_named() {
    let transition = phase::agent_not_found("ghost");
    match &transition {
        Transition::Fail {
            reason, message, ..
        } => {
            assert_eq!(*reason, FailReason::AgentNotFound);
            assert_eq!(message, "agent ghost not found");
        }
        other => panic!("{other:?}"),
    }
    let mut status = SessionStatus::default();
    assert!(phase::apply(&transition, &mut status, time(0)));
    assert_eq!(status.phase(), SessionPhase::Error);
}

#[test]
fn the_cached_session_keeps_what_the_decisions_read() {
    let mut status = recorded(SessionPhase::Running);
    status.push_event(event_types::AGENT_MESSAGE, &"x".repeat(10_000), time(1));
    status.finish(SessionPhase::Complete, Some("answer"), None, time(2));
    let mut whole = session(&[("A", "b")]);
    whole.status = Some(status.clone());
    whole.metadata.annotations = Some([("a".to_owned(), "b".repeat(1024))].into());
    let json = serde_json::to_vec(&whole).expect("JSON");
    let cached: CachedSession = serde_json::from_slice(&json).expect("a cached Session");
    let slim = cached.status.clone().expect("status");
    assert!(slim.events.is_empty());
    assert_eq!(slim.response, None);
    assert_eq!(cached.spec.agent, "my-agent");
    assert_eq!(cached.metadata.uid, whole.metadata.uid);
    assert_eq!(cached.metadata.annotations, None);
    assert_eq!(slim.completion_time, status.completion_time);
    for now in [3, 100] {
        assert_eq!(
            decide_at(Some(&slim), None, now),
            decide_at(Some(&status), None, now)
        );
    }
    let fresh: CachedSession = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "s"}, "spec": {"agent": "a"}}),
    )
    .expect("a Session without status");
    assert!(fresh.status.is_none());
}

#[test]
fn a_forbidden_pod_is_retried_soon_then_less_often_and_by_the_timeout() {
    let ms = Duration::from_millis;
    let secs = Duration::from_secs;
    // A new Session of a new namespace: looked at again within a quarter second.
    assert_eq!(phase::forbidden_retry(ms(10), secs(2)), ms(250));
    assert_eq!(phase::forbidden_retry(secs(1), secs(1)), ms(500));
    // Long refusals cost a call every 10 s at most.
    assert_eq!(phase::forbidden_retry(secs(120), secs(180)), secs(10));
    // Never later than just past the pending timeout.
    assert_eq!(phase::forbidden_retry(secs(1), ms(50)), ms(150));
}

#[test]
fn a_refused_pod_fails_at_once_when_invalid_and_after_the_timeout_when_forbidden() {
    let timeout = Duration::from_secs(300);
    let invalid = phase::pod_create_refused(
        422,
        "Pod \"x\" is invalid: spec...",
        Duration::ZERO,
        timeout,
    )
    .expect("an invalid pod ends the Session");
    assert!(matches!(
        &invalid,
        Transition::Fail { reason: FailReason::PodCreateRefused, message, .. }
            if message == "the pod was refused by the cluster: Pod \"x\" is invalid: spec..."
    ));
    let forbidden = "pods \"x\" is forbidden: error looking up service account ns/runner";
    assert_eq!(
        phase::pod_create_refused(403, forbidden, Duration::from_secs(10), timeout),
        None
    );
    let late = phase::pod_create_refused(403, forbidden, timeout, timeout).expect("ends");
    assert!(matches!(
        &late,
        Transition::Fail { message, .. }
            if message == &format!("the pod could not be created within 5m: {forbidden}")
    ));
    for transient in [429, 500, 503] {
        assert_eq!(
            phase::pod_create_refused(transient, "busy", Duration::from_secs(3600), timeout),
            None
        );
    }
}

#[test]
fn the_cached_pod_decides_like_the_whole_pod() {
    let terminated = ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: 2,
            reason: Some("Error".into()),
            message: Some("bad".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut deadline = pod_in("Failed");
    if let Some(status) = deadline.status.as_mut() {
        status.reason = Some("DeadlineExceeded".into());
    }
    let pods = [
        pod_in("Pending"),
        pod_in("Running"),
        pod_in("Succeeded"),
        with_container_state(pod_in("Failed"), terminated),
        deadline,
        waiting(pod_in("Pending"), "ImagePullBackOff"),
        waiting(pod_in("Pending"), "InvalidImageName"),
        waiting(pod_in("Pending"), "CreateContainerConfigError"),
        unschedulable(pod_in("Pending")),
    ];
    for whole in pods {
        let mut whole = whole;
        whole.metadata.namespace = Some("ns".into());
        // What the cache drops: other containers, volumes, env, annotations, fields.
        if let Some(spec) = whole.spec.as_mut() {
            spec.containers.push(k8s_openapi::api::core::v1::Container {
                name: "sidecar".into(),
                image: Some("other:1".into()),
                ..Default::default()
            });
            spec.containers[0].env = Some(vec![EnvVar {
                name: "BIG".into(),
                value: Some("x".repeat(4096)),
                ..Default::default()
            }]);
        }
        whole.metadata.annotations = Some([("a".to_owned(), "b".repeat(1024))].into());
        let json = serde_json::to_vec(&whole).expect("JSON");
        let mut cached: CachedPod = serde_json::from_slice(&json).expect("a cached pod");
        cached.trim();
        // Through the pod index, as reconciles read it.
        let index = PodIndex::default();
        index.apply(&watcher::Event::Apply(cached.clone()));
        let (namespace, name) = (
            whole.metadata.namespace.clone().unwrap_or_default(),
            whole.metadata.name.clone().unwrap_or_default(),
        );
        let indexed = index.get(&namespace, &name).expect("the indexed pod");
        assert_eq!(indexed.metadata.name, whole.metadata.name);
        assert_eq!(indexed.metadata.uid, whole.metadata.uid);
        assert_eq!(
            index.with(&namespace, &name, |p| p.phase().map(str::to_owned)),
            Some(whole.status.as_ref().and_then(|s| s.phase.clone()))
        );
        let cached = cached.to_pod();
        assert!(cached.metadata.annotations.is_none());
        let owner = |pod: &Pod| {
            pod.metadata
                .owner_references
                .iter()
                .flatten()
                .map(|o| (o.uid.clone(), o.controller))
                .collect::<Vec<_>>()
        };
        assert_eq!(owner(&cached), owner(&whole));
        if let Some(spec) = cached.spec.as_ref() {
            assert_eq!(spec.containers.len(), 1);
            assert!(spec.containers[0].env.is_none());
        }
        for status in [SessionPhase::Pending, SessionPhase::Running] {
            for now in [1, 10_000] {
                let of_whole = decide_at(Some(&recorded(status)), Some(&whole), now);
                assert_eq!(
                    decide_at(Some(&recorded(status)), Some(&cached), now),
                    of_whole,
                    "{whole:?}"
                );
                assert_eq!(
                    decide_at(Some(&recorded(status)), Some(&indexed), now),
                    of_whole,
                    "indexed: {whole:?}"
                );
            }
        }
    }
}

#[test]
fn a_queued_session_records_why_once_and_its_pod_clears_it() {
    let queue = Transition::Queue {
        message: "queued: the Agent runs 2 Sessions and allows 2 at once".into(),
    };
    assert_eq!(queue.phase(), SessionPhase::Queued);
    let mut status = SessionStatus::default();
    assert!(phase::apply(&queue, &mut status, time(1)));
    assert_eq!(status.phase(), SessionPhase::Queued);
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("allows 2"))
    );
    assert!(!phase::apply(&queue, &mut status, time(2)), "written once");
    // Still no pod: it is created when a slot frees.
    assert_eq!(decide_at(Some(&status), None, 3), Decision::CreatePod);
    let created = Transition::PodCreated {
        name: "my-agent-wh-0a1b2c3d".into(),
        uid: POD_UID.into(),
    };
    assert!(phase::apply(&created, &mut status, time(4)));
    assert_eq!(status.phase(), SessionPhase::Pending);
    assert_eq!(status.message, None);
    assert!(
        !phase::apply(&queue, &mut status, time(5)),
        "a started Session is never queued again"
    );
    assert_eq!(
        decide_at(Some(&status), Some(&pod_in("Running")), 6),
        Decision::Write(Transition::Running)
    );
    let mut finished = recorded(SessionPhase::Running);
    finished.finish(SessionPhase::Complete, Some("done"), None, time(7));
    assert!(!phase::apply(&queue, &mut finished, time(8)));
}

#[test]
fn the_pod_index_follows_lists_applies_and_deletes() {
    let cached = |pod: Pod| -> CachedPod {
        let mut cached: CachedPod =
            serde_json::from_slice(&serde_json::to_vec(&pod).expect("JSON")).expect("a pod");
        cached.trim();
        cached
    };
    let named = |name: &str, phase: &str| {
        let mut pod = pod_in(phase);
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("ns".into());
        cached(pod)
    };
    let namespace = "ns";
    let index = PodIndex::default();
    assert!(!index.is_ready(), "not ready before a first list");
    index.apply(&watcher::Event::Init);
    index.apply(&watcher::Event::InitApply(named("a", "Running")));
    index.apply(&watcher::Event::InitApply(named("b", "Pending")));
    assert!(index.is_empty(), "a list in progress is not read from");
    index.apply(&watcher::Event::InitDone);
    assert!(index.is_ready());
    assert_eq!(index.len(), 2);
    index.apply(&watcher::Event::Apply(named("b", "Succeeded")));
    assert_eq!(
        index.with(namespace, "b", |p| p.phase().map(str::to_owned)),
        Some(Some("Succeeded".to_owned()))
    );
    index.apply(&watcher::Event::Delete(named("a", "Running")));
    assert!(index.get(namespace, "a").is_none());
    // A relist replaces what the index held: a pod gone meanwhile goes.
    index.apply(&watcher::Event::Init);
    index.apply(&watcher::Event::InitApply(named("c", "Running")));
    index.apply(&watcher::Event::InitDone);
    assert!(index.get(namespace, "b").is_none());
    assert!(index.get(namespace, "c").is_some());
    assert_eq!(index.len(), 1);
}

#[test]
fn the_ttl_sweep_brings_only_finished_sessions_whose_ttl_ran_out() {
    let (sessions, mut session_writer) = reflector::store::<CachedSession>();
    let (agents, mut agent_writer) = reflector::store::<Agent>();
    // The Agent keeps finished Sessions 60 s.
    let template = SessionTemplate {
        ttl_seconds_after_finished: Some(60),
        ..Default::default()
    };
    agent_writer.apply_watcher_event(&watcher::Event::Apply(agent(Some(template))));
    let cached = |name: &str, agent: &str, status: Option<SessionStatus>, deleting: bool| {
        let mut whole = session(&[]);
        whole.metadata.name = Some(name.into());
        whole.spec.agent = agent.into();
        whole.status = status;
        if deleting {
            whole.metadata.deletion_timestamp = Some(time(5));
        }
        let json = serde_json::to_vec(&whole).expect("JSON");
        let cached: CachedSession = serde_json::from_slice(&json).expect("a cached Session");
        cached
    };
    let finished_at = |seconds: i64| {
        let mut status = recorded(SessionPhase::Running);
        status.finish(SessionPhase::Complete, Some("done"), None, time(seconds));
        Some(status)
    };
    for session in [
        cached("expired", "my-agent", finished_at(0), false),
        cached("fresh", "my-agent", finished_at(50), false),
        cached("deleting", "my-agent", finished_at(0), true),
        cached(
            "running",
            "my-agent",
            Some(recorded(SessionPhase::Running)),
            false,
        ),
        cached("new", "my-agent", None, false),
        // An Agent not in the cache: the default TTL of a day.
        cached("default-ttl", "gone", finished_at(0), false),
    ] {
        session_writer.apply_watcher_event(&watcher::Event::Apply(session));
    }
    let due = |seconds: i64| {
        let mut names: Vec<String> = expired_sessions(&sessions, &agents, at(seconds))
            .into_iter()
            .map(|r| r.name)
            .collect();
        names.sort();
        names
    };
    assert_eq!(due(60), Vec::<String>::new());
    assert_eq!(due(61), ["expired"]);
    assert_eq!(due(111), ["expired", "fresh"]);
    assert_eq!(due(86_401), ["default-ttl", "expired", "fresh"]);
}
