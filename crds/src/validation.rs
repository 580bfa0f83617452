//! The checks the CRD schema makes, again in Rust: the operator and the apiserver must not
//! trust that the schema ran (an older CRD, a client that skipped validation). Each error
//! names the field, as the schema's would.

use std::fmt;

use ipnet::IpNet;

use crate::agent::{
    AgentSpec, EnvVar, MAX_ALLOW_CIDRS, MAX_ALLOWED_ENV, MAX_CONCURRENT_RANGE, MAX_ENV,
    MAX_STORED_SESSIONS_RANGE, MAX_SYSTEM_BYTES, SecretKeyRef, SignatureScheme,
    TIMEOUT_SECONDS_RANGE, TTL_SECONDS_RANGE, WebhookLimits,
};
use crate::budget::{BudgetPart, MIN_LIMIT_BYTES};

/// The prefix of environment variable names that hookrun sets itself.
pub const RESERVED_ENV_PREFIX: &str = "HOOKRUN_";

/// One thing wrong with a spec: the field's path and what would be accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The path, e.g. `spec.triggers[0].webhook.allowCIDRs[1]`.
    pub field: String,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every error of a spec, in field order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

impl FieldErrors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn into_result(self) -> Result<(), FieldErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

/// Whether `name` is a valid environment variable name: a C identifier.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 256
}

/// `text` quoted for an error message, cut to its first 64 characters: messages go into
/// HTTP answers and logs and must not grow with what a caller sent.
pub fn quoted_head(text: &str) -> String {
    const MAX_CHARS: usize = 64;
    match text.char_indices().nth(MAX_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

/// Checks an environment variable name, including the reserved prefix.
pub fn check_env_name(name: &str) -> Result<(), String> {
    if !is_env_name(name) {
        return Err(format!(
            "{} is not a valid variable name: use at most 256 letters, digits and _, not \
             starting with a digit",
            quoted_head(name)
        ));
    }
    if name.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "{name:?} uses the reserved prefix {RESERVED_ENV_PREFIX}"
        ));
    }
    Ok(())
}

/// Checks one `allowedEnv` entry: a variable name, or a name prefix ending in `*`. A
/// bare `*` and anything that covers `HOOKRUN_` names are refused.
pub fn check_allowed_env_entry(entry: &str) -> Result<(), String> {
    let (base, prefix) = match entry.strip_suffix('*') {
        Some(base) => (base, true),
        None => (entry, false),
    };
    if base.is_empty() {
        return Err(
            "a bare * would let any caller set any variable (LD_PRELOAD, proxies, the model's \
             base URL): list names such as TICKET or prefixes such as GITHUB_*"
                .to_owned(),
        );
    }
    if !is_env_name(base) {
        return Err(format!(
            "{entry:?} is not a variable name or a name prefix ending in *: use letters, \
             digits and _, not starting with a digit, e.g. TICKET or GITHUB_*"
        ));
    }
    if base.starts_with(RESERVED_ENV_PREFIX) || (prefix && RESERVED_ENV_PREFIX.starts_with(base)) {
        return Err(format!(
            "{entry:?} covers the reserved prefix {RESERVED_ENV_PREFIX}: hookrun sets those \
             variables itself"
        ));
    }
    Ok(())
}

/// Whether `allowed` (names and `PREFIX*` entries of `allowedEnv`) lets a webhook set
/// the variable `name`.
pub fn env_name_allowed(allowed: &[String], name: &str) -> bool {
    allowed.iter().any(|entry| match entry.strip_suffix('*') {
        Some(prefix) => !prefix.is_empty() && name.starts_with(prefix),
        None => entry == name,
    })
}

fn check_limits(errors: &mut FieldErrors, field: &str, limits: &WebhookLimits) {
    let parts = [
        (BudgetPart::Title, limits.title_bytes),
        (BudgetPart::Payload, limits.payload_bytes),
        (BudgetPart::Env, limits.env_bytes),
        (BudgetPart::Session, limits.session_bytes),
    ];
    for (part, value) in parts {
        check_range(
            errors,
            &format!("{field}.{}", part.limit_field()),
            value,
            (MIN_LIMIT_BYTES as i64, part.ceiling() as i64),
        );
    }
}

/// Parses one `allowCIDRs` entry.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        format!("{s:?} is not a CIDR: use a form such as 203.0.113.0/24 or 2001:db8::/32")
    })
}

fn check_range(errors: &mut FieldErrors, field: &str, value: Option<i64>, (min, max): (i64, i64)) {
    if let Some(v) = value
        && !(min..=max).contains(&v)
    {
        errors.push(
            field,
            format!("{v} is out of range: use a value from {min} to {max}"),
        );
    }
}

fn check_ref(errors: &mut FieldErrors, field: &str, reference: &SecretKeyRef) {
    if reference.name.is_empty() {
        errors.push(
            format!("{field}.name"),
            "must name a Secret in the Agent's namespace",
        );
    }
    if reference.key.is_empty() {
        errors.push(format!("{field}.key"), "must name a key of that Secret");
    }
}

fn check_env(errors: &mut FieldErrors, field: &str, env: &[EnvVar]) {
    if env.len() > MAX_ENV {
        errors.push(
            field,
            format!("has {} entries: at most {MAX_ENV} are accepted", env.len()),
        );
    }
    for (i, var) in env.iter().enumerate() {
        let at = format!("{field}[{i}]");
        if let Err(message) = check_env_name(&var.name) {
            errors.push(format!("{at}.name"), message);
        }
        if var.value.is_some() && var.value_from.is_some() {
            errors.push(
                format!("{at}.valueFrom"),
                "set value or valueFrom, not both",
            );
        }
        if let Some(source) = &var.value_from {
            match (&source.secret_key_ref, &source.config_map_key_ref) {
                (Some(r), None) => check_ref(errors, &format!("{at}.valueFrom.secretKeyRef"), r),
                (None, Some(r)) => check_ref(errors, &format!("{at}.valueFrom.configMapKeyRef"), r),
                _ => errors.push(
                    format!("{at}.valueFrom"),
                    "set exactly one of secretKeyRef or configMapKeyRef",
                ),
            }
        }
    }
}

/// Checks an Agent's spec; every problem is reported with its field.
pub fn validate_agent_spec(spec: &AgentSpec) -> Result<(), FieldErrors> {
    let mut errors = FieldErrors::default();

    for (i, model) in spec.models.iter().enumerate() {
        if model.trim().is_empty() {
            errors.push(
                format!("spec.models[{i}]"),
                "must not be empty: use <provider>/<model>",
            );
        }
    }
    if let Some(system) = &spec.system
        && system.len() > MAX_SYSTEM_BYTES
    {
        errors.push(
            "spec.system",
            format!("is {} bytes: at most {MAX_SYSTEM_BYTES}", system.len()),
        );
    }

    let webhooks = spec.triggers.iter().filter(|t| t.webhook.is_some()).count();
    if webhooks > 1 {
        errors.push(
            "spec.triggers",
            "has more than one webhook trigger: an Agent has one URL",
        );
    }
    for (i, trigger) in spec.triggers.iter().enumerate() {
        let Some(webhook) = &trigger.webhook else {
            continue;
        };
        let at = format!("spec.triggers[{i}].webhook");
        if webhook.allow_cidrs.len() > MAX_ALLOW_CIDRS {
            errors.push(
                format!("{at}.allowCIDRs"),
                format!(
                    "has {} entries: at most {MAX_ALLOW_CIDRS}",
                    webhook.allow_cidrs.len()
                ),
            );
        }
        for (j, cidr) in webhook.allow_cidrs.iter().enumerate() {
            if let Err(message) = parse_cidr(cidr) {
                errors.push(format!("{at}.allowCIDRs[{j}]"), message);
            }
        }
        if webhook.allowed_env.len() > MAX_ALLOWED_ENV {
            errors.push(
                format!("{at}.allowedEnv"),
                format!(
                    "has {} entries: at most {MAX_ALLOWED_ENV}",
                    webhook.allowed_env.len()
                ),
            );
        }
        for (j, entry) in webhook.allowed_env.iter().enumerate() {
            if let Err(message) = check_allowed_env_entry(entry) {
                errors.push(format!("{at}.allowedEnv[{j}]"), message);
            }
        }
        if let Some(limits) = &webhook.limits {
            check_limits(&mut errors, &format!("{at}.limits"), limits);
        }
        for scheme in SignatureScheme::ALL {
            match webhook.secret_fields(scheme) {
                (Some(_), Some(_)) => errors.push(
                    format!("{at}.{}", scheme.ref_field()),
                    format!(
                        "set {} or {}, not both",
                        scheme.inline_field(),
                        scheme.ref_field()
                    ),
                ),
                (Some(""), None) => errors.push(
                    format!("{at}.{}", scheme.inline_field()),
                    "must not be empty",
                ),
                (None, Some(reference)) => check_ref(
                    &mut errors,
                    &format!("{at}.{}", scheme.ref_field()),
                    reference,
                ),
                _ => {}
            }
        }
    }

    if let Some(session) = &spec.session {
        if session.image.as_deref() == Some("") {
            errors.push(
                "spec.session.image",
                "must not be empty: leave it out for the default",
            );
        }
        check_env(&mut errors, "spec.session.env", &session.env);
        check_range(
            &mut errors,
            "spec.session.timeoutSeconds",
            session.timeout_seconds,
            TIMEOUT_SECONDS_RANGE,
        );
        check_range(
            &mut errors,
            "spec.session.idleTimeoutSeconds",
            session.idle_timeout_seconds,
            crate::agent::IDLE_TIMEOUT_SECONDS_RANGE,
        );
        check_range(
            &mut errors,
            "spec.session.carryOverTurns",
            session.carry_over_turns,
            crate::agent::CARRY_OVER_TURNS_RANGE,
        );
        check_range(
            &mut errors,
            "spec.session.ttlSecondsAfterFinished",
            session.ttl_seconds_after_finished,
            TTL_SECONDS_RANGE,
        );
        check_range(
            &mut errors,
            "spec.session.maxConcurrent",
            session.max_concurrent,
            MAX_CONCURRENT_RANGE,
        );
        check_range(
            &mut errors,
            "spec.session.maxStoredSessions",
            session.max_stored_sessions,
            MAX_STORED_SESSIONS_RANGE,
        );
    }

    errors.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{EnvVarSource, SessionTemplate, Trigger, WebhookTrigger};

    fn spec_from_yaml(yaml: &str) -> AgentSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    fn fields(result: Result<(), FieldErrors>) -> Vec<String> {
        result
            .err()
            .map(|e| e.0.into_iter().map(|e| e.field).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_contract_example_is_valid() {
        let spec = spec_from_yaml(
            r#"
models: [anthropic/claude-sonnet-4-6]
system: You are a helpful agent.
triggers:
  - webhook:
      allowCIDRs: ["35.231.147.226/32", "2001:db8::/32"]
      linearSignatureSecretRef: {name: linear, key: signing-secret}
session:
  env: [{name: LOG_LEVEL, value: info}]
  timeoutSeconds: 3600
  maxConcurrent: 20
"#,
        );
        assert_eq!(validate_agent_spec(&spec), Ok(()));
    }

    #[test]
    fn bad_cidr_is_named() {
        let spec = spec_from_yaml("triggers: [{webhook: {allowCIDRs: [10.0.0.0/8, 300.1.1.1/8]}}]");
        assert_eq!(
            fields(validate_agent_spec(&spec)),
            ["spec.triggers[0].webhook.allowCIDRs[1]"]
        );
    }

    #[test]
    fn both_inline_and_ref_is_refused_for_every_scheme() {
        for scheme in SignatureScheme::ALL {
            let yaml = format!(
                "triggers: [{{webhook: {{{}: s, {}: {{name: n, key: k}}}}}}]",
                scheme.inline_field(),
                scheme.ref_field()
            );
            let spec = spec_from_yaml(&yaml);
            assert_eq!(
                fields(validate_agent_spec(&spec)),
                [format!("spec.triggers[0].webhook.{}", scheme.ref_field())]
            );
        }
    }

    #[test]
    fn env_names_and_sources_are_checked() {
        let spec = AgentSpec {
            session: Some(Box::new(SessionTemplate {
                env: vec![
                    EnvVar {
                        name: "1BAD".into(),
                        value: Some("x".into()),
                        value_from: None,
                    },
                    EnvVar {
                        name: "HOOKRUN_SESSION".into(),
                        value: Some("x".into()),
                        value_from: None,
                    },
                    EnvVar {
                        name: "OK".into(),
                        value: Some("x".into()),
                        value_from: Some(EnvVarSource::default()),
                    },
                ],
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            fields(validate_agent_spec(&spec)),
            [
                "spec.session.env[0].name",
                "spec.session.env[1].name",
                "spec.session.env[2].valueFrom",
                "spec.session.env[2].valueFrom",
            ]
        );
    }

    #[test]
    fn ranges_are_checked() {
        let spec = spec_from_yaml(
            "session: {timeoutSeconds: 0, ttlSecondsAfterFinished: -1, maxConcurrent: 0, \
             maxStoredSessions: 100001}",
        );
        assert_eq!(
            fields(validate_agent_spec(&spec)),
            [
                "spec.session.timeoutSeconds",
                "spec.session.ttlSecondsAfterFinished",
                "spec.session.maxConcurrent",
                "spec.session.maxStoredSessions"
            ]
        );
        assert_eq!(spec.max_stored_sessions(), 100_000);
        assert_eq!(
            AgentSpec::default().max_stored_sessions(),
            crate::agent::DEFAULT_MAX_STORED_SESSIONS
        );
    }

    #[test]
    fn two_webhook_triggers_are_refused() {
        let spec = AgentSpec {
            triggers: vec![
                Trigger {
                    webhook: Some(WebhookTrigger::default()),
                    ..Default::default()
                },
                Trigger {
                    webhook: Some(WebhookTrigger::default()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(fields(validate_agent_spec(&spec)), ["spec.triggers"]);
    }

    #[test]
    fn allowed_env_entries_are_checked() {
        let spec = spec_from_yaml(
            "triggers: [{webhook: {allowedEnv: [TICKET, GITHUB_*, '*', HOOKRUN_X, HOOK*, \
             HOOKRUN_*, 1X, A-B*, _*], limits: {titleBytes: 100, payloadBytes: 262144, \
             envBytes: 65537}}}]",
        );
        assert_eq!(
            fields(validate_agent_spec(&spec)),
            [
                "spec.triggers[0].webhook.allowedEnv[2]",
                "spec.triggers[0].webhook.allowedEnv[3]",
                "spec.triggers[0].webhook.allowedEnv[4]",
                "spec.triggers[0].webhook.allowedEnv[5]",
                "spec.triggers[0].webhook.allowedEnv[6]",
                "spec.triggers[0].webhook.allowedEnv[7]",
                "spec.triggers[0].webhook.limits.titleBytes",
                "spec.triggers[0].webhook.limits.envBytes",
            ]
        );
        let many = (0..=MAX_ALLOWED_ENV)
            .map(|i| format!("V{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let spec = spec_from_yaml(&format!(
            "triggers: [{{webhook: {{allowedEnv: [{many}]}}}}]"
        ));
        assert_eq!(
            fields(validate_agent_spec(&spec)),
            ["spec.triggers[0].webhook.allowedEnv"]
        );
    }

    #[test]
    fn allowed_env_matching() {
        let allowed = vec!["TICKET".to_owned(), "GITHUB_*".to_owned()];
        assert!(env_name_allowed(&allowed, "TICKET"));
        assert!(env_name_allowed(&allowed, "GITHUB_REPO"));
        assert!(env_name_allowed(&allowed, "GITHUB_"));
        assert!(!env_name_allowed(&allowed, "TICKETS"));
        assert!(!env_name_allowed(&allowed, "GITHUB"));
        assert!(!env_name_allowed(&allowed, "OPENAI_BASE_URL"));
        assert!(!env_name_allowed(&[], "TICKET"));
        assert!(!env_name_allowed(&["*".to_owned()], "LD_PRELOAD"));
    }

    proptest::proptest! {
        /// An entry the check accepts never lets a HOOKRUN_ name through, and a bare
        /// name matches only itself.
        #[test]
        fn accepted_entries_never_cover_reserved_names(
            entry in "[A-Z_*]{0,12}",
            suffix in "[A-Z0-9_]{0,8}",
        ) {
            if check_allowed_env_entry(&entry).is_ok() {
                let reserved = format!("{RESERVED_ENV_PREFIX}{suffix}");
                proptest::prop_assert!(!env_name_allowed(std::slice::from_ref(&entry), &reserved));
                if !entry.ends_with('*') {
                    proptest::prop_assert!(env_name_allowed(std::slice::from_ref(&entry), &entry));
                    let longer = format!("{entry}X");
                    proptest::prop_assert!(!env_name_allowed(std::slice::from_ref(&entry), &longer));
                }
            }
        }
    }

    #[test]
    fn env_name_rule() {
        assert!(is_env_name("LOG_LEVEL"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("9X"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name("A.B"));
    }

    #[test]
    fn a_rejected_name_is_quoted_cut() {
        let long = format!("{}-", "A".repeat(100_000));
        let message = check_env_name(&long).expect_err("invalid");
        assert!(message.len() < 300, "{} bytes", message.len());
        assert!(message.contains("(100001 bytes)"), "{message}");
        assert_eq!(quoted_head("A-B"), "\"A-B\"");
        assert_eq!(
            quoted_head(&"é".repeat(70)),
            format!("{:?}… (140 bytes)", "é".repeat(64))
        );
    }
}
