//! Cluster tests of payload-aware triggers (the real `hookrun-operator` and
//! `hookrun-apiserver` against the real kube-apiserver): a filtered event answers 202 and
//! stores nothing, a passing one stores a Session whose title and env come from the
//! Agent's expressions, and an expression that does not compile makes the Agent
//! `InvalidExpression` and its webhook 500 naming the field, until it is fixed (no restart).

use hookrun_crds::session::SessionEnvVar;
use hookrun_tests::door::{BUDGET, Door, webhook_path};
use hookrun_tests::fixtures::{agent_namespace, ready_condition, session_count};
use hookrun_tests::{apply_agent, eventually};
use serde_json::{Value, json};

fn deploy_agent(filter: &str) -> Value {
    json!({"spec": {
        "models": ["openai/gpt"],
        "triggers": [{"webhook": {
            "filter": filter,
            "title": "'Deploy ' + body.service + ' to ' + headers['x-environment']",
            "env": [{"name": "SERVICE", "expression": "body.service"}],
        }}],
    }})
}

const FILTER: &str = "body.kind == 'deploy' && provider == 'none'";

#[tokio::test]
async fn filters_titles_and_env_come_from_the_agents_expressions() {
    let (cluster, ns, _, agents, sessions) = agent_namespace().await;
    let door = Door::start(cluster, &ns).await;
    apply_agent(&agents, "deployer", deploy_agent(FILTER)).await;
    let path = webhook_path(&agents, ns.name(), "deployer").await;
    door.wait_until_known(&path).await;

    // Filtered, fire-and-forget and wait mode alike: 202 and no Session.
    for body in [
        json!({"kind": "build", "service": "api"}),
        json!({"kind": "build", "service": "api", "title": "t", "wait": 5}),
    ] {
        let answer = door.post(&path, &[], &body.to_string()).await;
        assert_eq!(answer.status, 202, "{answer:?}");
        assert_eq!(answer.json["filtered"], true, "{answer:?}");
        assert_eq!(answer.json["agentDefinition"], "deployer", "{answer:?}");
    }
    assert_eq!(
        session_count(&sessions).await,
        0,
        "a filtered event stored a Session"
    );

    let answer = door
        .post(
            &path,
            &[("x-environment", "staging")],
            &json!({"kind": "deploy", "service": "api"}).to_string(),
        )
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let name = answer.json["session"].as_str().expect("a Session name");
    let stored = sessions.get(name).await.expect("the Session");
    assert_eq!(stored.spec.title, "Deploy api to staging");
    assert_eq!(
        stored.spec.env,
        [SessionEnvVar {
            name: "SERVICE".into(),
            value: "api".into()
        }]
    );

    // A filter that does not compile: the Agent says so, the door answers 500 naming it.
    apply_agent(&agents, "deployer", deploy_agent("body.kind ==")).await;
    let condition = eventually(BUDGET, || async {
        let agent = agents.get("deployer").await.ok()?;
        let condition = ready_condition(&agent)?.clone();
        (condition.reason == "InvalidExpression").then_some(condition)
    })
    .await
    .expect("the Agent became InvalidExpression");
    assert_eq!(condition.status, "False");
    assert!(
        condition
            .message
            .contains("spec.triggers[0].webhook.filter"),
        "{}",
        condition.message
    );
    assert!(
        condition.message.contains("line 1, column"),
        "{}",
        condition.message
    );
    let deploy = json!({"kind": "deploy", "service": "api", "n": 2}).to_string();
    let refused = eventually(BUDGET, || async {
        let answer = door.post(&path, &[], &deploy).await;
        (answer.status == 500).then_some(answer)
    })
    .await
    .expect("the door answered 500 for the bad expression");
    assert_eq!(refused.json["error"], "agent_misconfigured");
    assert!(
        refused.json["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.triggers[0].webhook.filter")),
        "{refused:?}"
    );
    assert_eq!(session_count(&sessions).await, 1);

    // Fixed: both recover without a restart.
    apply_agent(&agents, "deployer", deploy_agent(FILTER)).await;
    eventually(BUDGET, || async {
        let agent = agents.get("deployer").await.ok()?;
        (ready_condition(&agent)?.reason == "WebhookReady").then_some(())
    })
    .await
    .expect("the Agent became ready again");
    let accepted = eventually(BUDGET, || async {
        let answer = door
            .post(&path, &[("x-environment", "prod")], &deploy)
            .await;
        (answer.status == 200).then_some(answer)
    })
    .await
    .expect("the door accepts again");
    assert!(accepted.json["session"].is_string(), "{accepted:?}");
    assert_eq!(session_count(&sessions).await, 2);
}
