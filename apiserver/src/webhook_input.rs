//! What a webhook may store in a Session: the env names its Agent allows (none unless
//! `allowedEnv` lists them, never one the Agent sets itself) and the storage budgets of
//! the Session, measured as the JSON bytes that reach etcd. Pure: the policy is built from
//! the Agent once, when the index takes it in, and checked per request.

use hookrun_crds::AgentSpec;
use hookrun_crds::budget::{OverBudget, SessionBudgets, cut_encoded};
use hookrun_crds::callback::CallbackPolicy;
use hookrun_crds::session::SessionEnvVar;
use hookrun_crds::validation::{check_allowed_env_entry, env_name_allowed};

use crate::body::BodyError;

/// One Agent's rules for webhook input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct InputPolicy {
    /// `allowedEnv`: names and `PREFIX*` entries. Invalid entries are left out (the
    /// operator's validation refuses them; this guards Agents it has not seen yet).
    pub(crate) allowed_env: Vec<String>,
    /// The names the Agent's `spec.session.env` sets: a webhook may not replace them.
    pub(crate) agent_env: Vec<String>,
    /// The storage budgets, from `limits` and the defaults.
    pub(crate) budgets: SessionBudgets,
    /// Where a request's own `callbackUrl` may point (`spec.callbackPolicy`).
    pub(crate) callbacks: CallbackPolicy,
}

impl InputPolicy {
    /// The policy of an Agent's webhook trigger (the defaults when it has none).
    pub(crate) fn of(spec: &AgentSpec) -> Self {
        let webhook = spec.webhook();
        let allowed_env = webhook
            .map(|w| w.allowed_env.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|entry| check_allowed_env_entry(entry).is_ok())
            .cloned()
            .collect();
        let agent_env = spec
            .session
            .as_ref()
            .map(|s| s.env.iter().map(|e| e.name.clone()).collect())
            .unwrap_or_default();
        InputPolicy {
            allowed_env,
            agent_env,
            budgets: SessionBudgets::from_limits(webhook.and_then(|w| w.limits.as_ref())),
            callbacks: spec.callback_policy.clone().unwrap_or_default(),
        }
    }

    /// Checks a request's `callbackUrl` against `spec.callbackPolicy.allowedUrlPrefixes`:
    /// 400 naming the field and the prefixes allowed.
    pub(crate) fn check_callback_url(&self, url: &str) -> Result<(), BodyError> {
        if self.callbacks.allows(url) {
            return Ok(());
        }
        let allowed = &self.callbacks.allowed_url_prefixes;
        let message = if allowed.is_empty() {
            "this Agent accepts no callbackUrl (its spec.callbackPolicy.allowedUrlPrefixes              is empty)"
                .to_owned()
        } else {
            format!(
                "is not within this Agent's spec.callbackPolicy.allowedUrlPrefixes: use a URL                  starting with {}",
                allowed.join(" or ")
            )
        };
        Err(BodyError {
            field: "callbackUrl".to_owned(),
            message,
        })
    }

    /// What the caller may set, for messages.
    fn allowed_text(&self) -> String {
        if self.allowed_env.is_empty() {
            "this Agent lets a webhook set no variables (its \
             spec.triggers[].webhook.allowedEnv is empty)"
                .to_owned()
        } else {
            format!(
                "this Agent lets a webhook set only {} (spec.triggers[].webhook.allowedEnv)",
                self.allowed_env.join(", ")
            )
        }
    }

    /// Checks every name of a webhook's `env`: 400 naming `env[i].name` and the allowed
    /// names for the first one outside `allowedEnv` or set by the Agent itself.
    pub(crate) fn check_env(&self, env: &[SessionEnvVar]) -> Result<(), BodyError> {
        for (i, var) in env.iter().enumerate() {
            let name = &var.name;
            let problem = if self.agent_env.iter().any(|own| own == name) {
                format!(
                    "{name:?} is set by the Agent (spec.session.env) and a webhook cannot replace it"
                )
            } else if !env_name_allowed(&self.allowed_env, name) {
                format!("{name:?} may not be set by a webhook")
            } else {
                continue;
            };
            return Err(BodyError {
                field: format!("env[{i}].name"),
                message: format!("{problem}: {}", self.allowed_text()),
            });
        }
        Ok(())
    }

    /// A title composed by hookrun (from a provider's payload, or the default), cut to
    /// the title budget: the caller did not choose it, so it is not refused.
    pub(crate) fn fit_title(&self, title: String) -> String {
        match cut_encoded(&title, self.budgets.title) {
            (_, false) => title,
            (cut, true) => cut.to_owned(),
        }
    }

    /// Checks the parts a caller chose against their budgets: the title (when the caller
    /// gave it), the payload kept for the harness and the env list.
    pub(crate) fn check_parts(
        &self,
        caller_title: Option<&str>,
        payload: &str,
        env: &[SessionEnvVar],
    ) -> Result<(), OverBudget> {
        if let Some(title) = caller_title {
            self.budgets.check_title(title)?;
        }
        self.budgets.check_payload(payload)?;
        self.budgets.check_env(env)
    }
}

#[cfg(test)]
mod tests {
    use hookrun_crds::budget::{BudgetPart, DEFAULT_ENV_BYTES, DEFAULT_TITLE_BYTES};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn policy(spec: serde_json::Value) -> InputPolicy {
        InputPolicy::of(&serde_json::from_value(spec).expect("a spec"))
    }

    fn var(name: &str, value: &str) -> SessionEnvVar {
        SessionEnvVar {
            name: name.into(),
            value: value.into(),
        }
    }

    #[test]
    fn without_allowed_env_no_variable_may_be_set() {
        let policy = policy(json!({"triggers": [{"webhook": {}}]}));
        let err = policy
            .check_env(&[var("TICKET", "1")])
            .expect_err("refused");
        assert_eq!(err.field, "env[0].name");
        assert!(err.message.contains("allowedEnv is empty"), "{err}");
        assert_eq!(policy.check_env(&[]), Ok(()));
    }

    #[test]
    fn only_listed_names_and_prefixes_pass() {
        let policy = policy(json!({
            "triggers": [{"webhook": {"allowedEnv": ["TICKET", "GITHUB_*", "*", "HOOKRUN_*"]}}],
            "session": {"env": [{"name": "GITHUB_TOKEN_SCOPE", "value": "x"}]},
        }));
        assert_eq!(policy.allowed_env, ["TICKET", "GITHUB_*"]);
        assert_eq!(
            policy.check_env(&[var("TICKET", "1"), var("GITHUB_REPO", "o/r")]),
            Ok(())
        );
        for (env, field) in [
            (vec![var("OPENAI_BASE_URL", "http://evil")], "env[0].name"),
            (
                vec![var("TICKET", "1"), var("LD_PRELOAD", "/x.so")],
                "env[1].name",
            ),
            (vec![var("GITHUB_TOKEN_SCOPE", "all")], "env[0].name"),
        ] {
            let err = policy.check_env(&env).expect_err("refused");
            assert_eq!(err.field, field);
            assert!(err.message.contains("TICKET, GITHUB_*"), "{err}");
        }
        let own = policy
            .check_env(&[var("GITHUB_TOKEN_SCOPE", "all")])
            .expect_err("refused");
        assert!(own.message.contains("spec.session.env"), "{own}");
    }

    #[test]
    fn composed_titles_are_cut_and_caller_parts_are_measured() {
        let policy = policy(json!({"triggers": [{"webhook": {"limits": {"titleBytes": 2048}}}]}));
        assert_eq!(policy.fit_title("x".repeat(5000)).len(), 2048);
        assert_eq!(policy.fit_title("short".into()), "short");
        let err = policy
            .check_parts(Some(&"\u{1}".repeat(400)), "", &[])
            .expect_err("2400 encoded bytes");
        assert_eq!(err.part, BudgetPart::Title);
        let defaults = InputPolicy::default();
        assert!(
            defaults
                .check_parts(Some(&"x".repeat(DEFAULT_TITLE_BYTES)), "{}", &[])
                .is_ok()
        );
        let env: Vec<_> = (0..20)
            .map(|i| var(&format!("V{i}"), &"v".repeat(DEFAULT_ENV_BYTES / 20)))
            .collect();
        assert_eq!(
            defaults.check_parts(None, "", &env).map_err(|e| e.part),
            Err(BudgetPart::Env)
        );
        let payload = "\u{0}".repeat(20 * 1024);
        assert_eq!(
            defaults
                .check_parts(None, &payload, &[])
                .map_err(|e| e.part),
            Err(BudgetPart::Payload)
        );
    }

    #[test]
    fn callback_urls_must_be_within_the_allowed_prefixes() {
        let none = policy(json!({"triggers": [{"webhook": {}}]}));
        let err = none
            .check_callback_url("https://ci.example/x")
            .expect_err("no prefixes");
        assert_eq!(err.field, "callbackUrl");
        assert!(err.message.contains("accepts no callbackUrl"), "{err}");
        let some = policy(json!({
            "triggers": [{"webhook": {}}],
            "callbackPolicy": {"allowedUrlPrefixes": ["https://ci.example/hooks/"]},
        }));
        assert_eq!(
            some.check_callback_url("https://ci.example/hooks/7"),
            Ok(())
        );
        let err = some
            .check_callback_url("https://evil.example/hooks/7")
            .expect_err("outside");
        assert_eq!(err.field, "callbackUrl");
        assert!(err.message.contains("https://ci.example/hooks/"), "{err}");
    }

    proptest! {
        /// Whatever the names, a variable the Agent sets is refused and the answer names
        /// the entry.
        #[test]
        fn agent_variables_are_never_replaced(names in proptest::collection::vec("[A-Z][A-Z0-9_]{0,8}", 1..8), pick in 0usize..8) {
            let own = names[pick % names.len()].clone();
            let policy = InputPolicy {
                allowed_env: vec!["A*".into(), "B*".into(), own.clone()],
                agent_env: vec![own.clone()],
                budgets: SessionBudgets::default(),
                callbacks: CallbackPolicy::default(),
            };
            let env: Vec<_> = names.iter().map(|n| var(n, "v")).collect();
            let err = policy.check_env(&env).expect_err("the Agent's own name is in it");
            let index: usize = err.field.trim_start_matches("env[").trim_end_matches("].name").parse().expect("an index");
            prop_assert!(index <= names.iter().position(|n| *n == own).expect("present"));
        }
    }
}
