//! The operator's pod policy: what an Agent's `spec.session` may ask of its session pods
//! beyond hookrun's locked-down defaults. Creating an Agent is creating pods in its
//! namespace; the policy decides which pods.
//!
//! Pure: [`check`] maps an Agent spec, the policy and which Secrets opted in to Agent env
//! to the list of [`Violation`]s, each naming the field and what the policy allows.

use std::fmt;

use hookrun_crds::{
    AgentSpec,
    names::{AGENT_ENV_LABEL, AGENT_ENV_OPT_IN},
};
use k8s_openapi::api::core::v1::{
    AppArmorProfile, PodSecurityContext, SELinuxOptions, SeccompProfile, SecurityContext,
    WindowsSecurityContextOptions,
};

/// The entry of an allow list that allows everything.
pub const ANY: &str = "*";
/// The ServiceAccount every namespace has, which session pods may always use.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// Taints that keep ordinary pods off control-plane nodes: tolerating them is refused
/// unless the policy allows the key.
pub const CONTROL_PLANE_TAINTS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];
/// The one capability an unprivileged container may add (as in the Pod Security
/// Standards' `restricted` profile).
pub const ADDABLE_CAPABILITY: &str = "NET_BIND_SERVICE";
/// SELinux types an unprivileged container may ask for (the `restricted` profile's).
const SELINUX_TYPES: [&str; 4] = [
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// What the operator lets Agents ask of their pods (its flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPolicy {
    /// ServiceAccounts besides the namespace's `default` that session pods may run as;
    /// `*` allows any.
    pub allowed_service_accounts: Vec<String>,
    /// Privileged containers, privilege escalation, added capabilities (beyond
    /// `NET_BIND_SERVICE`), unconfined seccomp or AppArmor, other SELinux types, unmasked
    /// `/proc`, Windows host processes.
    pub allow_privileged: bool,
    /// `runAsUser: 0` or `runAsNonRoot: false`.
    pub allow_root: bool,
    /// Prefixes `spec.session.image` must start with; empty allows any image.
    pub allowed_image_prefixes: Vec<String>,
    /// Control-plane taint keys session pods may tolerate; `*` allows every toleration,
    /// the key-less one (which tolerates every taint) included.
    pub allowed_toleration_keys: Vec<String>,
}

/// One thing an Agent asks for that the policy does not allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field's path, e.g. `spec.session.securityContext.privileged`.
    pub field: String,
    /// What is refused and what the policy allows.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The message of an Agent outside the policy: every violation, field first.
pub fn describe(violations: &[Violation]) -> String {
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    format!(
        "the Agent is outside the operator's pod policy: {}",
        list.join("; ")
    )
}

fn allows(list: &[String], name: &str) -> bool {
    list.iter().any(|entry| entry == ANY || entry == name)
}

/// `list` for a message, or `none` when it is empty.
fn listed(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(", ")
    }
}

/// Whether `image` starts with `prefix` at a boundary of the reference: the prefix ends
/// with `/`, `:` or `@`, or the image continues with one of them (so
/// `registry.example/team` allows `registry.example/team/agent:1`, not
/// `registry.example/team-evil/agent`).
pub fn image_has_prefix(image: &str, prefix: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let Some(rest) = image.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with(['/', ':', '@']) || rest.is_empty() || rest.starts_with(['/', ':', '@'])
}

/// Every way `spec` leaves `policy`. `secret_opted_in(name)` says whether the Secret
/// `name` of the Agent's namespace carries the opt-in label (a Secret that does not
/// exist has not).
pub fn check(
    spec: &AgentSpec,
    policy: &PodPolicy,
    secret_opted_in: impl Fn(&str) -> bool,
) -> Vec<Violation> {
    let mut found = Vec::new();
    let Some(session) = spec.session.as_ref() else {
        return found;
    };
    let mut refuse = |field: String, message: String| found.push(Violation { field, message });

    if let Some(account) = session.service_account_name.as_deref()
        && account != DEFAULT_SERVICE_ACCOUNT
        && !allows(&policy.allowed_service_accounts, account)
    {
        refuse(
            "spec.session.serviceAccountName".to_owned(),
            format!(
                "ServiceAccount {account:?} is not allowed; the policy allows the namespace's \
                 \"default\" and: {} (operator flag --allowed-service-accounts)",
                listed(&policy.allowed_service_accounts)
            ),
        );
    }

    if let Some(image) = session.image.as_deref().filter(|i| !i.trim().is_empty())
        && !policy.allowed_image_prefixes.is_empty()
        && !policy
            .allowed_image_prefixes
            .iter()
            .any(|p| image_has_prefix(image, p))
    {
        refuse(
            "spec.session.image".to_owned(),
            format!(
                "image {image:?} does not start with an allowed prefix: {} (operator flag \
                 --allowed-image-prefixes; leave the field out for the operator's harness image)",
                listed(&policy.allowed_image_prefixes)
            ),
        );
    }

    if let Some(context) = &session.security_context {
        container_context(context, policy, &mut refuse);
    }
    if let Some(context) = &session.pod_security_context {
        pod_context(context, policy, &mut refuse);
    }

    for (i, toleration) in session.tolerations.iter().enumerate() {
        let key = toleration.key.as_deref().unwrap_or_default();
        let protected = key.is_empty() || CONTROL_PLANE_TAINTS.contains(&key);
        let allowed = allows(&policy.allowed_toleration_keys, ANY)
            || (!key.is_empty() && allows(&policy.allowed_toleration_keys, key));
        if protected && !allowed {
            let what = if key.is_empty() {
                "a toleration without a key tolerates every taint, the control plane's included"
                    .to_owned()
            } else {
                format!("tolerating {key:?} lets session pods onto control-plane nodes")
            };
            refuse(
                format!("spec.session.tolerations[{i}].key"),
                format!(
                    "{what}; the policy allows these control-plane keys: {} (operator flag \
                     --allowed-toleration-keys, `*` for every toleration)",
                    listed(&policy.allowed_toleration_keys)
                ),
            );
        }
    }

    for (i, var) in session.env.iter().enumerate() {
        if let Some(reference) = var
            .value_from
            .as_ref()
            .and_then(|from| from.secret_key_ref.as_ref())
            && !secret_opted_in(&reference.name)
        {
            let name = &reference.name;
            refuse(
                format!("spec.session.env[{i}].valueFrom.secretKeyRef.name"),
                format!(
                    "Secret {name:?} does not exist or has not opted in to Agent env: only \
                     Secrets labelled {AGENT_ENV_LABEL}={AGENT_ENV_OPT_IN} may be read into \
                     session pods (`kubectl label secret {name} \
                     {AGENT_ENV_LABEL}={AGENT_ENV_OPT_IN}`, if every Agent author of the \
                     namespace may read it)"
                ),
            );
        }
    }
    found
}

const PRIVILEGED_FLAG: &str = "(operator flag --allow-privileged)";
const ROOT_FLAG: &str = "(operator flag --allow-root)";

fn container_context(
    context: &SecurityContext,
    policy: &PodPolicy,
    refuse: &mut impl FnMut(String, String),
) {
    let at = |field: &str| format!("spec.session.securityContext.{field}");
    if !policy.allow_privileged {
        if context.privileged == Some(true) {
            refuse(
                at("privileged"),
                format!("privileged containers are not allowed {PRIVILEGED_FLAG}"),
            );
        }
        if context.allow_privilege_escalation == Some(true) {
            refuse(
                at("allowPrivilegeEscalation"),
                format!("privilege escalation is not allowed {PRIVILEGED_FLAG}"),
            );
        }
        if let Some(capabilities) = &context.capabilities {
            for (i, added) in capabilities.add.iter().flatten().enumerate() {
                if added != ADDABLE_CAPABILITY {
                    refuse(
                        at(&format!("capabilities.add[{i}]")),
                        format!(
                            "capability {added:?} is not allowed; only {ADDABLE_CAPABILITY} may be \
                             added {PRIVILEGED_FLAG}"
                        ),
                    );
                }
            }
            if let Some(drop) = &capabilities.drop
                && !drop.iter().any(|c| c == "ALL")
            {
                refuse(
                    at("capabilities.drop"),
                    format!(
                        "must include \"ALL\" (the default drops every capability) {PRIVILEGED_FLAG}"
                    ),
                );
            }
        }
        if let Some(mount) = context.proc_mount.as_deref()
            && mount != "Default"
        {
            refuse(
                at("procMount"),
                format!("only \"Default\" is allowed {PRIVILEGED_FLAG}"),
            );
        }
        shared_privileged(
            "spec.session.securityContext",
            context.seccomp_profile.as_ref(),
            context.app_armor_profile.as_ref(),
            context.se_linux_options.as_ref(),
            context.windows_options.as_ref(),
            refuse,
        );
    }
    if !policy.allow_root {
        root_fields(
            "spec.session.securityContext",
            context.run_as_non_root,
            context.run_as_user,
            refuse,
        );
    }
}

fn pod_context(
    context: &PodSecurityContext,
    policy: &PodPolicy,
    refuse: &mut impl FnMut(String, String),
) {
    if !policy.allow_privileged {
        shared_privileged(
            "spec.session.podSecurityContext",
            context.seccomp_profile.as_ref(),
            context.app_armor_profile.as_ref(),
            context.se_linux_options.as_ref(),
            context.windows_options.as_ref(),
            refuse,
        );
    }
    if !policy.allow_root {
        root_fields(
            "spec.session.podSecurityContext",
            context.run_as_non_root,
            context.run_as_user,
            refuse,
        );
    }
}

/// The checks that pod and container security contexts share.
fn shared_privileged(
    base: &str,
    seccomp: Option<&SeccompProfile>,
    app_armor: Option<&AppArmorProfile>,
    se_linux: Option<&SELinuxOptions>,
    windows: Option<&WindowsSecurityContextOptions>,
    refuse: &mut impl FnMut(String, String),
) {
    if seccomp.is_some_and(|p| p.type_ == "Unconfined") {
        refuse(
            format!("{base}.seccompProfile.type"),
            format!(
                "\"Unconfined\" is not allowed; use RuntimeDefault or Localhost {PRIVILEGED_FLAG}"
            ),
        );
    }
    if app_armor.is_some_and(|p| p.type_ == "Unconfined") {
        refuse(
            format!("{base}.appArmorProfile.type"),
            format!("\"Unconfined\" is not allowed {PRIVILEGED_FLAG}"),
        );
    }
    if let Some(options) = se_linux {
        if let Some(kind) = options.type_.as_deref()
            && !SELINUX_TYPES.contains(&kind)
        {
            refuse(
                format!("{base}.seLinuxOptions.type"),
                format!(
                    "SELinux type {kind:?} is not allowed; allowed: {} {PRIVILEGED_FLAG}",
                    SELINUX_TYPES.join(", ")
                ),
            );
        }
        for (field, value) in [("user", &options.user), ("role", &options.role)] {
            if value.is_some() {
                refuse(
                    format!("{base}.seLinuxOptions.{field}"),
                    format!("setting the SELinux {field} is not allowed {PRIVILEGED_FLAG}"),
                );
            }
        }
    }
    if windows.and_then(|w| w.host_process) == Some(true) {
        refuse(
            format!("{base}.windowsOptions.hostProcess"),
            format!("Windows host processes are not allowed {PRIVILEGED_FLAG}"),
        );
    }
}

fn root_fields(
    base: &str,
    run_as_non_root: Option<bool>,
    run_as_user: Option<i64>,
    refuse: &mut impl FnMut(String, String),
) {
    if run_as_non_root == Some(false) {
        refuse(
            format!("{base}.runAsNonRoot"),
            format!("containers must run as a non-root user {ROOT_FLAG}"),
        );
    }
    if run_as_user == Some(0) {
        refuse(
            format!("{base}.runAsUser"),
            format!("user 0 (root) is not allowed {ROOT_FLAG}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(session: serde_json::Value) -> AgentSpec {
        serde_json::from_value(json!({"session": session})).expect("a valid spec")
    }

    fn fields(violations: &[Violation]) -> Vec<&str> {
        violations.iter().map(|v| v.field.as_str()).collect()
    }

    fn none_opted_in(_: &str) -> bool {
        false
    }

    #[test]
    fn the_defaults_and_plain_agents_pass() {
        let policy = PodPolicy::default();
        assert!(check(&AgentSpec::default(), &policy, none_opted_in).is_empty());
        let plain = spec(json!({
            "image": "registry.example/harness:1",
            "serviceAccountName": "default",
            "env": [
                {"name": "A", "value": "1"},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
            ],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "securityContext": {
                "runAsUser": 1000, "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                "seccompProfile": {"type": "RuntimeDefault"},
                "seLinuxOptions": {"type": "container_t"}
            },
            "podSecurityContext": {"runAsNonRoot": true, "fsGroup": 2000}
        }));
        assert_eq!(check(&plain, &policy, none_opted_in), []);
    }

    #[test]
    fn privileged_asks_are_refused_by_default_and_allowed_by_the_flag() {
        let asks = spec(json!({
            "securityContext": {
                "privileged": true,
                "allowPrivilegeEscalation": true,
                "capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"], "drop": ["NET_RAW"]},
                "procMount": "Unmasked",
                "seccompProfile": {"type": "Unconfined"},
                "appArmorProfile": {"type": "Unconfined"},
                "seLinuxOptions": {"type": "spc_t", "user": "system_u"},
                "windowsOptions": {"hostProcess": true}
            },
            "podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}
        }));
        let found = check(&asks, &PodPolicy::default(), none_opted_in);
        assert_eq!(
            fields(&found),
            [
                "spec.session.securityContext.privileged",
                "spec.session.securityContext.allowPrivilegeEscalation",
                "spec.session.securityContext.capabilities.add[1]",
                "spec.session.securityContext.capabilities.drop",
                "spec.session.securityContext.procMount",
                "spec.session.securityContext.seccompProfile.type",
                "spec.session.securityContext.appArmorProfile.type",
                "spec.session.securityContext.seLinuxOptions.type",
                "spec.session.securityContext.seLinuxOptions.user",
                "spec.session.securityContext.windowsOptions.hostProcess",
                "spec.session.podSecurityContext.seccompProfile.type",
            ]
        );
        assert!(found[0].message.contains("--allow-privileged"), "{found:?}");
        assert!(found[2].message.contains("SYS_ADMIN"), "{found:?}");
        let allowed = PodPolicy {
            allow_privileged: true,
            ..Default::default()
        };
        assert_eq!(check(&asks, &allowed, none_opted_in), []);
    }

    #[test]
    fn root_is_refused_at_both_levels_unless_allowed() {
        let asks = spec(json!({
            "securityContext": {"runAsUser": 0},
            "podSecurityContext": {"runAsNonRoot": false, "runAsUser": 0}
        }));
        let found = check(&asks, &PodPolicy::default(), none_opted_in);
        assert_eq!(
            fields(&found),
            [
                "spec.session.securityContext.runAsUser",
                "spec.session.podSecurityContext.runAsNonRoot",
                "spec.session.podSecurityContext.runAsUser",
            ]
        );
        assert!(found[0].message.contains("--allow-root"));
        let allowed = PodPolicy {
            allow_root: true,
            ..Default::default()
        };
        assert_eq!(check(&asks, &allowed, none_opted_in), []);
    }

    #[test]
    fn service_accounts_other_than_default_need_the_allow_list() {
        let asks = spec(json!({"serviceAccountName": "deployer"}));
        let found = check(&asks, &PodPolicy::default(), none_opted_in);
        assert_eq!(fields(&found), ["spec.session.serviceAccountName"]);
        assert!(found[0].message.contains("\"deployer\""));
        assert!(found[0].message.contains("--allowed-service-accounts"));
        for list in [vec!["deployer".to_owned()], vec![ANY.to_owned()]] {
            let policy = PodPolicy {
                allowed_service_accounts: list,
                ..Default::default()
            };
            assert_eq!(check(&asks, &policy, none_opted_in), []);
        }
        let other = PodPolicy {
            allowed_service_accounts: vec!["builder".to_owned()],
            ..Default::default()
        };
        let found = check(&asks, &other, none_opted_in);
        assert!(found[0].message.contains("builder"), "{found:?}");
    }

    #[test]
    fn control_plane_tolerations_need_the_allow_list() {
        let asks = spec(json!({"tolerations": [
            {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "dedicated", "operator": "Equal", "value": "agents"},
            {"operator": "Exists"},
            {"key": "node-role.kubernetes.io/master", "operator": "Exists"}
        ]}));
        let found = check(&asks, &PodPolicy::default(), none_opted_in);
        assert_eq!(
            fields(&found),
            [
                "spec.session.tolerations[0].key",
                "spec.session.tolerations[2].key",
                "spec.session.tolerations[3].key",
            ]
        );
        assert!(found[1].message.contains("every taint"), "{found:?}");
        let keyed = PodPolicy {
            allowed_toleration_keys: vec![CONTROL_PLANE_TAINTS[0].to_owned()],
            ..Default::default()
        };
        assert_eq!(
            fields(&check(&asks, &keyed, none_opted_in)),
            [
                "spec.session.tolerations[2].key",
                "spec.session.tolerations[3].key",
            ]
        );
        let any = PodPolicy {
            allowed_toleration_keys: vec![ANY.to_owned()],
            ..Default::default()
        };
        assert_eq!(check(&asks, &any, none_opted_in), []);
    }

    #[test]
    fn images_must_start_with_an_allowed_prefix_at_a_boundary() {
        assert!(image_has_prefix(
            "registry.example/team/agent:1",
            "registry.example/team"
        ));
        assert!(image_has_prefix(
            "registry.example/team/agent:1",
            "registry.example/team/"
        ));
        assert!(image_has_prefix(
            "registry.example/team",
            "registry.example/team"
        ));
        assert!(!image_has_prefix(
            "registry.example/team-evil/agent",
            "registry.example/team"
        ));
        assert!(!image_has_prefix("anything", ""));

        let asks = spec(json!({"image": "docker.io/evil/miner:latest"}));
        assert_eq!(check(&asks, &PodPolicy::default(), none_opted_in), []);
        let policy = PodPolicy {
            allowed_image_prefixes: vec!["ghcr.io/hookrun/".to_owned()],
            ..Default::default()
        };
        let found = check(&asks, &policy, none_opted_in);
        assert_eq!(fields(&found), ["spec.session.image"]);
        assert!(found[0].message.contains("ghcr.io/hookrun/"));
        // No image: the operator's own harness image, always allowed.
        assert_eq!(check(&spec(json!({})), &policy, none_opted_in), []);
        let ok = spec(json!({"image": "ghcr.io/hookrun/hookrun-harness:1"}));
        assert_eq!(check(&ok, &policy, none_opted_in), []);
    }

    #[test]
    fn secret_env_needs_a_secret_that_opted_in() {
        let asks = spec(json!({"env": [
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "anthropic", "key": "api-key"}}},
            {"name": "OTHER", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}
        ]}));
        let found = check(&asks, &PodPolicy::default(), |name| name == "anthropic");
        assert_eq!(
            fields(&found),
            ["spec.session.env[1].valueFrom.secretKeyRef.name"]
        );
        assert!(found[0].message.contains("hookrun.dev/agent-env=true"));
        assert!(found[0].message.contains("\"db\""));
        assert_eq!(check(&asks, &PodPolicy::default(), |_| true), []);
        // Even the most permissive flags do not open other Secrets.
        let open = PodPolicy {
            allow_privileged: true,
            allow_root: true,
            allowed_service_accounts: vec![ANY.to_owned()],
            allowed_toleration_keys: vec![ANY.to_owned()],
            allowed_image_prefixes: Vec::new(),
        };
        assert_eq!(check(&asks, &open, |_| false).len(), 2);
    }

    #[test]
    fn the_message_names_every_field() {
        let asks = spec(json!({
            "serviceAccountName": "x",
            "securityContext": {"privileged": true}
        }));
        let message = describe(&check(&asks, &PodPolicy::default(), none_opted_in));
        assert!(message.starts_with("the Agent is outside the operator's pod policy: "));
        assert!(message.contains("spec.session.serviceAccountName: "));
        assert!(message.contains("; spec.session.securityContext.privileged: "));
    }
}
