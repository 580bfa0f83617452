//! The pod of a Session, built as a pure function of the Session, its Agent and the
//! operator's settings: name, labels, owner, deadline, image, environment, the
//! pod-bound token volume and the security defaults.

use std::collections::BTreeMap;

use hookrun_crds::{
    Agent, Session,
    agent::{EnvVar as AgentEnvVar, SessionTemplate},
    names,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapKeySelector, Container, EnvVar, EnvVarSource, PodSecurityContext,
    PodSpec, ProjectedVolumeSource, SeccompProfile, SecretKeySelector, SecurityContext,
    ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use kube::{Resource, ResourceExt, api::ObjectMeta};

/// The one container of a session pod.
pub const CONTAINER: &str = "agent";
/// The volume that holds the pod-bound token.
pub const TOKEN_VOLUME: &str = "hookrun-token";

/// What the operator decides for every session pod, from its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSettings {
    /// The image when the Agent names none.
    pub default_image: String,
    /// `HOOKRUN_RUNNER_URL`: where pods reach the runner API.
    pub runner_url: String,
}

/// Why a pod cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodBuildError {
    #[error("the Session has no {0}")]
    MissingSessionKey(&'static str),
}

/// The directory and file name of [`names::TOKEN_FILE`].
fn token_dir_and_file() -> (&'static str, &'static str) {
    names::TOKEN_FILE
        .rsplit_once('/')
        .unwrap_or(("/var/run/secrets/hookrun", "token"))
}

/// The pod that runs `session` of `agent`.
pub fn build_pod(
    session: &Session,
    agent: &Agent,
    settings: &PodSettings,
) -> Result<Pod, PodBuildError> {
    let name = session.name_any();
    let namespace = session
        .namespace()
        .ok_or(PodBuildError::MissingSessionKey("namespace"))?;
    let mut owner = session
        .controller_owner_ref(&())
        .ok_or(PodBuildError::MissingSessionKey("uid"))?;
    // Foreground deletion of a Session then waits for its pod.
    owner.block_owner_deletion = Some(true);
    let template = agent.spec.session.clone().unwrap_or_default();
    let (pod_security, container_security) = security_contexts(&template);
    let (token_dir, token_file) = token_dir_and_file();

    let labels = BTreeMap::from([
        (
            names::MANAGED_BY_LABEL.to_owned(),
            names::MANAGED_BY.to_owned(),
        ),
        (
            names::AGENT_LABEL.to_owned(),
            names::label_value(&session.spec.agent),
        ),
        (names::SESSION_LABEL.to_owned(), names::label_value(&name)),
    ]);

    let container = Container {
        name: CONTAINER.to_owned(),
        image: Some(
            template
                .image
                .clone()
                .filter(|i| !i.trim().is_empty())
                .unwrap_or_else(|| settings.default_image.clone()),
        ),
        env: Some(environment(session, &namespace, &template, settings)),
        resources: template.resources.clone(),
        security_context: Some(container_security),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: token_dir.to_owned(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };

    let token_volume = Volume {
        name: TOKEN_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(names::TOKEN_AUDIENCE.to_owned()),
                    expiration_seconds: Some(names::TOKEN_EXPIRATION_SECONDS),
                    path: token_file.to_owned(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_owned()),
            active_deadline_seconds: template.timeout_seconds,
            automount_service_account_token: Some(false),
            service_account_name: template.service_account_name.clone(),
            node_selector: (!template.node_selector.is_empty())
                .then(|| template.node_selector.clone()),
            tolerations: non_empty(template.tolerations.clone()),
            image_pull_secrets: non_empty(template.image_pull_secrets.clone()),
            security_context: Some(pod_security),
            containers: vec![container],
            volumes: Some(vec![token_volume]),
            ..Default::default()
        }),
        status: None,
    })
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

/// The container's environment: the Agent's defaults, the Session's overrides (which
/// replace a default of the same name where it stands), then the reserved `HOOKRUN_*`
/// variables. A user variable in the reserved prefix is dropped: validation refuses
/// them, and an old object must not shadow what hookrun sets.
pub fn environment(
    session: &Session,
    namespace: &str,
    template: &SessionTemplate,
    settings: &PodSettings,
) -> Vec<EnvVar> {
    let mut env: Vec<EnvVar> = template
        .env
        .iter()
        .filter(|v| !is_reserved(&v.name))
        .map(agent_env_var)
        .collect();
    for over in session.spec.env.iter().filter(|v| !is_reserved(&v.name)) {
        let var = literal(&over.name, &over.value);
        match env.iter_mut().find(|v| v.name == over.name) {
            Some(slot) => *slot = var,
            None => env.push(var),
        }
    }
    env.extend([
        literal(names::env::SESSION, &session.name_any()),
        literal(names::env::NAMESPACE, namespace),
        literal(names::env::AGENT, &session.spec.agent),
        literal(names::env::RUNNER_URL, &settings.runner_url),
        literal(names::env::TOKEN_FILE, names::TOKEN_FILE),
    ]);
    env
}

fn is_reserved(name: &str) -> bool {
    name.starts_with("HOOKRUN_")
}

fn literal(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        value_from: None,
    }
}

/// An Agent's env entry as the pod's: a literal, or a Secret or ConfigMap key.
fn agent_env_var(var: &AgentEnvVar) -> EnvVar {
    let value_from = var.value_from.as_ref().map(|from| EnvVarSource {
        secret_key_ref: from.secret_key_ref.as_ref().map(|r| SecretKeySelector {
            name: r.name.clone(),
            key: r.key.clone(),
            optional: None,
        }),
        config_map_key_ref: from
            .config_map_key_ref
            .as_ref()
            .map(|r| ConfigMapKeySelector {
                name: r.name.clone(),
                key: r.key.clone(),
                optional: None,
            }),
        ..Default::default()
    });
    EnvVar {
        name: var.name.clone(),
        // A `valueFrom` entry carries no literal, not even an empty one.
        value: if value_from.is_some() {
            None
        } else {
            Some(var.value.clone().unwrap_or_default())
        },
        value_from,
    }
}

/// `over` laid onto `base`: every field `over` sets wins, objects are merged field by
/// field, the rest of `base` stays.
fn overlay<T: serde::Serialize + serde::de::DeserializeOwned>(base: T, over: &T) -> T {
    fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
        match (base, over) {
            (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
                for (key, value) in over {
                    match base.get_mut(&key) {
                        Some(slot) => merge(slot, value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (slot, value) => *slot = value,
        }
    }
    let (Ok(mut merged), Ok(over_value)) =
        (serde_json::to_value(&base), serde_json::to_value(over))
    else {
        return base;
    };
    merge(&mut merged, over_value);
    serde_json::from_value(merged).unwrap_or(base)
}

/// The pod and container security contexts: hookrun's defaults with the Agent's fields
/// laid over them, so that an Agent that sets one field keeps the others locked down.
/// The operator's pod policy decides which overrides an Agent may make. Two defaults
/// give way to what the Agent explicitly asks for, as the API and the kubelet require: a
/// privileged container may escalate, and a pod that asks for user 0 is not forced
/// non-root where the Agent does not say.
pub fn security_contexts(template: &SessionTemplate) -> (PodSecurityContext, SecurityContext) {
    let pod_asks = template.pod_security_context.as_ref();
    let container_asks = template.security_context.as_ref();
    let mut pod = match pod_asks {
        Some(asks) => overlay(default_pod_security(), asks),
        None => default_pod_security(),
    };
    let mut container = match container_asks {
        Some(asks) => overlay(default_container_security(), asks),
        None => default_container_security(),
    };
    if container_asks.is_some_and(|c| c.privileged == Some(true))
        && container_asks.is_some_and(|c| c.allow_privilege_escalation.is_none())
    {
        container.allow_privilege_escalation = None;
    }
    let asks_root = pod_asks.is_some_and(|p| p.run_as_user == Some(0))
        || container_asks.is_some_and(|c| c.run_as_user == Some(0));
    if asks_root {
        if pod_asks.is_none_or(|p| p.run_as_non_root.is_none()) {
            pod.run_as_non_root = None;
        }
        if container_asks.is_none_or(|c| c.run_as_non_root.is_none()) {
            container.run_as_non_root = None;
        }
    }
    (pod, container)
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

/// The pod security context when the Agent gives none: non-root, RuntimeDefault seccomp.
pub fn default_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

/// The container security context when the Agent gives none: non-root, no privilege
/// escalation, every capability dropped, RuntimeDefault seccomp.
pub fn default_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}
