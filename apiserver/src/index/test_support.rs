//! Objects for tests and benchmarks of the index and of the handlers (the `test-support`
//! feature).

use hookrun_crds::{AgentSpec, SessionSpec};
use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use hookrun_crds::names;
use hookrun_crds::session::SessionPhase;
use hookrun_crds::{Agent, Session};
use k8s_openapi::api::core::v1::Secret;

pub fn agent(ns: &str, name: &str, spec: serde_json::Value) -> Agent {
    let spec: AgentSpec = serde_json::from_value(spec).expect("a valid spec");
    let mut agent = Agent::new(name, spec);
    agent.metadata.namespace = Some(ns.into());
    agent.metadata.uid = Some(format!("uid-{name}"));
    agent
}

pub fn secret(ns: &str, agent: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(names::webhook_secret_name(agent)),
            namespace: Some(ns.into()),
            owner_references: Some(vec![OwnerReference {
                api_version: "hookrun.dev/v1alpha1".into(),
                kind: "Agent".into(),
                name: agent.into(),
                uid: format!("uid-{agent}"),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

pub fn session(ns: &str, name: &str, agent: &str, phase: Option<SessionPhase>) -> Session {
    let mut s = Session::new(
        name,
        SessionSpec {
            agent: agent.into(),
            title: "t".into(),
            ..Default::default()
        },
    );
    s.metadata.namespace = Some(ns.into());
    s.status = phase.map(|phase| hookrun_crds::session::SessionStatus {
        phase: Some(phase),
        ..Default::default()
    });
    s
}
