//! The CRDs install, the contract's example applies, and the schema rejects bad manifests
//! with an error that names the field.

use hookrun_crds::Agent;
use hookrun_tests::{TestNamespace, cluster, control_plane::workspace_root};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;

#[tokio::test]
async fn crds_are_established() {
    let client = cluster().await.client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for name in ["agents.hookrun.dev", "sessions.hookrun.dev"] {
        let crd = crds.get(name).await.expect("the CRD exists");
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        assert!(established, "{name} is Established");
    }
}

#[tokio::test]
async fn the_example_agent_applies_with_kubectl() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let example = workspace_root().join("examples/agent.yaml");
    let out = cluster.kubectl(&[
        "apply",
        "-n",
        ns.name(),
        "-f",
        &example.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let agents: Api<Agent> = Api::namespaced(cluster.client().await, ns.name());
    let agent = agents
        .get("my-agent")
        .await
        .expect("the example Agent is stored");
    assert_eq!(agent.spec.models, ["anthropic/claude-sonnet-4-6"]);
    assert!(agent.spec.webhook().is_some());
}

/// Applies `spec` as an Agent and returns kubectl's error output.
fn apply_agent_error(ns: &TestNamespace, spec: &str) -> String {
    let manifest = format!(
        "apiVersion: hookrun.dev/v1alpha1\nkind: Agent\nmetadata: {{name: bad}}\nspec:\n{spec}\n"
    );
    let out = ns.kubectl(&["apply", "-f", "-"], Some(&manifest));
    assert!(
        !out.status.success(),
        "the manifest was accepted:\n{manifest}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn bad_manifests_are_rejected_naming_the_field() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let cases = [
        (
            "  triggers: [{webhook: {allowCIDRs: [10.0.0.0/8, 10.0.0.300/8]}}]",
            "spec.triggers[0].webhook.allowCIDRs[1]",
        ),
        (
            "  session: {env: [{name: 1BAD, value: x}]}",
            "spec.session.env[0].name",
        ),
        (
            "  session: {env: [{name: HOOKRUN_SESSION, value: x}]}",
            "spec.session.env[0].name",
        ),
        (
            "  triggers: [{webhook: {linearSignatureSecret: s, linearSignatureSecretRef: {name: l, key: k}}}]",
            "spec.triggers[0].webhook.linearSignatureSecretRef",
        ),
        (
            "  session: {timeoutSeconds: 0}",
            "spec.session.timeoutSeconds",
        ),
        (
            "  session: {ttlSecondsAfterFinished: 99999999}",
            "spec.session.ttlSecondsAfterFinished",
        ),
        ("  unknownField: 1", "spec.unknownField"),
        (
            "  triggers: [{webhook: {allowCIDR: []}}]",
            "spec.triggers[0].webhook.allowCIDR",
        ),
    ];
    for (spec, field) in cases {
        let error = apply_agent_error(&ns, spec);
        assert!(
            error.contains(field),
            "the error for\n{spec}\nnames {field}:\n{error}"
        );
    }
}

#[tokio::test]
async fn rust_validation_agrees_with_the_schema_on_accepted_examples() {
    // What the cluster accepts, the operator's own validation accepts too.
    let text = std::fs::read_to_string(workspace_root().join("examples/agent.yaml"))
        .expect("examples/agent.yaml is readable");
    let agent: Agent = serde_yaml::from_str(&text).expect("the example parses as an Agent");
    assert_eq!(
        hookrun_crds::validation::validate_agent_spec(&agent.spec),
        Ok(())
    );
}
