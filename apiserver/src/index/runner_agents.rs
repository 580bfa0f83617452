//! What the runner API's `GET /runner/v1/session` needs of an Agent (its system prompt,
//! models, exec and literal env), kept for every watched Agent, so a session pod's
//! context is answered without a call to the cluster. Agents are few; Sessions, which
//! are many, are not kept here.

use hookrun_crds::Agent;
use hookrun_crds::agent::{EnvVar, ExecSpec};

/// The parts of an Agent's spec a session's context shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct RunnerAgent {
    pub(crate) system: Option<String>,
    pub(crate) models: Vec<String>,
    pub(crate) exec: Option<ExecSpec>,
    /// `spec.session.env` (only literal values are served).
    pub(crate) env: Vec<EnvVar>,
    /// `spec.session.idleTimeoutSeconds`.
    pub(crate) idle_timeout_seconds: u32,
}

/// The runner's view of `agent`.
pub(crate) fn runner_agent(agent: &Agent) -> RunnerAgent {
    let spec = &agent.spec;
    RunnerAgent {
        system: spec.system.clone(),
        models: spec.models.clone(),
        exec: spec.exec.as_deref().cloned(),
        env: spec
            .session
            .as_ref()
            .map(|s| s.env.clone())
            .unwrap_or_default(),
        idle_timeout_seconds: spec.idle_timeout_seconds(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AgentKey, Index, Scope};
    use crate::index::test_support::agent;
    use serde_json::json;

    #[test]
    fn every_agent_is_kept_for_the_runner_webhook_or_not() {
        let mut index = Index::new(1);
        let key = AgentKey::new("team", "plain");
        let plain = agent(
            "team",
            "plain",
            json!({"models": ["m"], "system": "be brief", "session": {"env": [{"name": "A", "value": "1"}]}}),
        );
        index.apply_agent(&plain);
        let kept = index
            .runner_agent(&key)
            .expect("kept without a webhook trigger");
        assert_eq!(kept.system.as_deref(), Some("be brief"));
        assert_eq!(kept.models, ["m"]);
        assert_eq!(kept.env.len(), 1);
        index.delete_agent(&plain);
        assert!(index.runner_agent(&key).is_none());
        index.reset_agents(&Scope::All, std::slice::from_ref(&plain));
        assert!(index.runner_agent(&key).is_some());
        index.reset_agents(&Scope::Namespace("team".into()), &[]);
        assert!(index.runner_agent(&key).is_none());
    }
}
