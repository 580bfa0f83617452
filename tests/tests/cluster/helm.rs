//! Cluster tests of the Helm chart: `helm lint`, `helm template` with several
//! value sets accepted by the real kube-apiserver (`--dry-run=server`), and a real
//! `helm install` → RBAC checks → the real operator and apiserver running with tokens of
//! the chart's ServiceAccounts through webhook → Session → Pod → runner API (TokenReview)
//! → Complete → `helm upgrade` → `helm uninstall`. No kubelet runs, so
//! the chart's Deployments never start pods; the binaries run here instead, with the
//! arguments the chart gives them.

use std::{
    path::PathBuf,
    process::{Command, Output},
    time::Instant,
};

use hookrun_crds::{Agent, Session, names};
use hookrun_tests::{
    Cluster, TestNamespace, apply_agent, cluster,
    control_plane::{default_tools_bin, workspace_root},
    door::{ApiServer, BUDGET, Operator, Process, request, webhook_path},
    eventually,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

const PUBLIC_URL: &str = "https://hooks.example.test";
const RELEASE: &str = "hr";
/// Where the tests say the images were pushed: hookrun publishes none, so the chart
/// refuses to render without a registry (or explicit repositories).
const REGISTRY: &str = "registry.example.test/hookrun";

/// Runs the pinned helm against the test cluster, with its config and cache under
/// `target/` (never the user's).
fn helm(cluster: &Cluster, args: &[&str]) -> Output {
    let home = workspace_root().join("target/test-clusters/helm-home");
    Command::new(default_tools_bin().join("helm"))
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .args(args)
        .env_remove("KUBECONFIG")
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("helm runs (make tools builds it)")
}

fn chart() -> String {
    workspace_root()
        .join("charts/hookrun")
        .display()
        .to_string()
}

/// stdout of a command that must succeed.
fn success(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every object of a multi-document YAML stream (helm separates documents with `---`
/// lines).
fn documents(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(doc) = docs.last_mut() {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .filter_map(|doc| serde_yaml::from_str::<Value>(doc).ok())
        .filter(Value::is_object)
        .collect()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// `helm template` for a release in `namespace` with `--set` values (the image registry
/// included).
fn template(cluster: &Cluster, namespace: &str, sets: &[String]) -> String {
    let mut args = vec!["template", RELEASE, "-n", namespace];
    let chart = chart();
    args.push(&chart);
    let registry = format!("global.imageRegistry={REGISTRY}");
    args.extend(["--set", registry.as_str()]);
    for set in sets {
        args.extend(["--set", set.as_str()]);
    }
    success(helm(cluster, &args), "helm template")
}

/// A ServiceMonitor CRD with an open schema, so that the metrics value set can be
/// validated by the server without the Prometheus Operator.
fn install_service_monitor_crd(cluster: &Cluster) {
    let crd = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor, listKind: ServiceMonitorList}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;
    success(
        cluster.kubectl_with_stdin(&["apply", "--server-side", "-f", "-"], Some(crd)),
        "applying the ServiceMonitor CRD",
    );
    success(
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/servicemonitors.monitoring.coreos.com",
        ]),
        "waiting for the ServiceMonitor CRD",
    );
}

#[tokio::test]
async fn the_chart_lints_clean() {
    let cluster = cluster().await;
    let chart = chart();
    let registry = format!("global.imageRegistry={REGISTRY}");
    for extra in [&[][..], &["--set", "watchNamespaces={a,b}"][..]] {
        let mut args = vec![
            "lint",
            "--strict",
            &chart,
            "--set",
            "publicURL=https://h.example.com",
            "--set",
            &registry,
        ];
        args.extend_from_slice(extra);
        let out = success(helm(cluster, &args), "helm lint");
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

#[tokio::test]
async fn every_values_set_renders_and_the_kube_apiserver_accepts_it() {
    let cluster = cluster().await;
    install_service_monitor_crd(cluster);
    let release_ns = TestNamespace::new(cluster).await;
    let (team_a, team_b) = (
        TestNamespace::new(cluster).await,
        TestNamespace::new(cluster).await,
    );
    let rel = release_ns.name();
    let public = format!("publicURL={PUBLIC_URL}");
    let scoped = format!("watchNamespaces={{{},{}}}", team_a.name(), team_b.name());
    let sets: Vec<(&str, Vec<String>)> = vec![
        ("defaults", vec![public.clone()]),
        ("namespace-scoped", vec![public.clone(), scoped.clone()]),
        (
            "ingress",
            vec![
                public.clone(),
                "apiserver.ingress.enabled=true".into(),
                "apiserver.ingress.className=nginx".into(),
                "apiserver.ingress.host=hooks.example.test".into(),
                "apiserver.ingress.tls.enabled=true".into(),
                "apiserver.ingress.tls.secretName=hooks-tls".into(),
                "trustedProxies={10.0.0.0/8,192.168.0.0/16}".into(),
            ],
        ),
        (
            "metrics",
            vec![
                public.clone(),
                "metrics.serviceMonitor.enabled=true".into(),
                "networkPolicy.enabled=true".into(),
                "rbac.aggregateSessionsToEdit=true".into(),
                "redactUrlInStatus=true".into(),
            ],
        ),
    ];
    for (label, values) in &sets {
        let rendered = template(cluster, rel, values);
        let out =
            cluster.kubectl_with_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
        success(out, &format!("kubectl apply --dry-run=server ({label})"));
        let objects = documents(&rendered);
        let kinds = |kind: &str| of_kind(&objects, kind).len();
        assert_eq!(kinds("Deployment"), 2, "{label}");
        assert_eq!(kinds("PodDisruptionBudget"), 1, "{label}");
        assert_runner_service(&objects, label);
        match *label {
            "ingress" => {
                assert_eq!(kinds("Ingress"), 1);
                assert_ingress_routes_only_public_paths(of_kind(&objects, "Ingress")[0]);
            }
            "metrics" => {
                assert_eq!(kinds("ServiceMonitor"), 1);
                assert_eq!(kinds("NetworkPolicy"), 2);
            }
            _ => assert_eq!(kinds("Ingress") + kinds("ServiceMonitor"), 0, "{label}"),
        }
        for deployment in of_kind(&objects, "Deployment") {
            assert_pod_is_locked_down(deployment);
        }
    }

    // Namespace-scoped: Roles in exactly the listed namespaces; the only ClusterRole is
    // the apiserver's TokenReview/SubjectAccessReview one.
    let objects = documents(&template(cluster, rel, &[public.clone(), scoped]));
    let cluster_roles: Vec<&str> = of_kind(&objects, "ClusterRole")
        .into_iter()
        .map(name)
        .collect();
    assert_eq!(cluster_roles, [format!("{rel}-hr-hookrun-apiserver-auth")]);
    let mut role_places: Vec<(String, String)> = of_kind(&objects, "Role")
        .into_iter()
        .map(|r| {
            let ns = r["metadata"]["namespace"].as_str().unwrap_or_default();
            (ns.to_owned(), name(r).to_owned())
        })
        .collect();
    role_places.sort();
    let mut expected = vec![(
        rel.to_owned(),
        "hr-hookrun-operator-leader-election".to_owned(),
    )];
    for ns in [team_a.name(), team_b.name()] {
        expected.push((ns.to_owned(), "hr-hookrun-apiserver".to_owned()));
        expected.push((ns.to_owned(), "hr-hookrun-operator".to_owned()));
    }
    expected.sort();
    assert_eq!(role_places, expected);

    // Nothing of Agents is ever aggregated into the built-in roles; Sessions only on opt-in.
    for (label, values) in &sets {
        for role in of_kind(&documents(&template(cluster, rel, values)), "ClusterRole") {
            let aggregated = role["metadata"]["labels"].as_object().is_some_and(|l| {
                l.keys()
                    .any(|k| k.starts_with("rbac.authorization.k8s.io/aggregate-to"))
            });
            if aggregated {
                assert_eq!(*label, "metrics", "only the opt-in aggregates");
                assert_eq!(
                    role["rules"],
                    json!([
                        {"apiGroups": ["hookrun.dev"], "resources": ["sessions"], "verbs": ["get", "list", "watch", "create", "delete"]},
                        {"apiGroups": ["hookrun.dev"], "resources": ["grants"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                    ])
                );
            }
        }
    }
}

/// The runner API has its own ClusterIP Service on the apiserver's runner port, and the
/// public Service does not carry that port.
fn assert_runner_service(objects: &[Value], label: &str) {
    let services = of_kind(objects, "Service");
    let runner = services
        .iter()
        .find(|s| name(s) == "hr-hookrun-runner")
        .unwrap_or_else(|| panic!("no runner Service ({label})"));
    assert_eq!(runner["spec"]["type"], "ClusterIP", "{label}");
    assert_eq!(
        runner["spec"]["ports"],
        json!([{"name": "runner", "port": 8081, "targetPort": "runner", "protocol": "TCP"}]),
        "{label}"
    );
    let public = services
        .iter()
        .find(|s| name(s) == "hr-hookrun-apiserver")
        .unwrap_or_else(|| panic!("no public Service ({label})"));
    let public_ports: Vec<&Value> = public["spec"]["ports"]
        .as_array()
        .map(|p| p.iter().map(|p| &p["targetPort"]).collect())
        .unwrap_or_default();
    assert_eq!(public_ports, [&json!("http")], "{label}");
    let apiserver = of_kind(objects, "Deployment")
        .into_iter()
        .find(|d| name(d) == "hr-hookrun-apiserver")
        .unwrap_or_else(|| panic!("no apiserver Deployment ({label})"));
    let (_, args) = container_args(apiserver);
    assert!(
        args.iter().any(|a| a == "--runner-listen=0.0.0.0:8081"),
        "{label}: {args:?}"
    );
}

/// The Ingress routes the webhook door and the read API, never the runner API.
fn assert_ingress_routes_only_public_paths(ingress: &Value) {
    let paths: Vec<(String, Value)> = ingress["spec"]["rules"][0]["http"]["paths"]
        .as_array()
        .map(|paths| {
            paths
                .iter()
                .map(|p| {
                    (
                        p["path"].as_str().unwrap_or_default().to_owned(),
                        p["backend"]["service"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let routed: Vec<&str> = paths.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(routed, ["/webhooks", "/agents", "/hook"]);
    for (_, backend) in &paths {
        assert_eq!(
            *backend,
            json!({"name": "hr-hookrun-apiserver", "port": {"name": "http"}})
        );
    }
}

/// Pod security and probes of one rendered Deployment.
fn assert_pod_is_locked_down(deployment: &Value) {
    let pod = &deployment["spec"]["template"]["spec"];
    let what = name(deployment);
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(security["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{what}");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"], "/healthz",
        "{what}"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"], "/readyz",
        "{what}"
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["port"], "admin",
        "{what}"
    );
    let admin = container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == "admin"))
        .map(|p| p["containerPort"].clone());
    assert_eq!(admin, Some(json!(9090)), "{what}");
    assert!(pod["topologySpreadConstraints"].is_array(), "{what}");
}

#[tokio::test]
async fn a_missing_public_url_or_a_misspelt_value_stops_the_install() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let chart = chart();
    let registry = format!("global.imageRegistry={REGISTRY}");
    let out = helm(
        cluster,
        &[
            "install",
            RELEASE,
            &chart,
            "-n",
            ns.name(),
            "--set",
            &registry,
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("publicURL is required"), "{stderr}");
    let left = success(
        ns.kubectl(&["get", "deploy,svc,sa,role", "-o", "name"], None),
        "kubectl get",
    );
    assert!(!left.contains("hookrun"), "nothing is installed: {left}");

    let typo = helm(
        cluster,
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            "publicURL=https://h.example.com",
            "--set",
            &registry,
            "--set",
            "apiserver.replicsa=3",
        ],
    );
    assert!(!typo.status.success());
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(stderr.contains("'replicsa' not allowed"), "{stderr}");

    let bad_url = helm(
        cluster,
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            "publicURL=hooks.example.com",
            "--set",
            &registry,
        ],
    );
    assert!(
        !bad_url.status.success(),
        "a URL without a scheme is refused"
    );
}

/// Every image reference of rendered objects: container images and the operator's
/// `--default-harness-image`.
fn image_references(objects: &[Value]) -> Vec<String> {
    let mut found = Vec::new();
    for deployment in of_kind(objects, "Deployment") {
        let pod = &deployment["spec"]["template"]["spec"];
        for list in ["initContainers", "containers"] {
            for container in pod[list].as_array().into_iter().flatten() {
                found.extend(container["image"].as_str().map(str::to_owned));
            }
        }
        let (_, args) = container_args(deployment);
        found.extend(
            args.iter()
                .filter_map(|a| a.strip_prefix("--default-harness-image="))
                .map(str::to_owned),
        );
    }
    found.sort();
    found
}

#[tokio::test]
async fn images_come_from_where_they_were_pushed_or_the_install_stops_and_says_how() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let chart = chart();
    let public = format!("publicURL={PUBLIC_URL}");

    // No registry and no repositories: the images were never pushed anywhere.
    let out = helm(
        cluster,
        &[
            "install",
            RELEASE,
            &chart,
            "-n",
            ns.name(),
            "--set",
            &public,
        ],
    );
    assert!(!out.status.success(), "installed without images");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for hint in [
        "hookrun publishes no images",
        "make deploy REGISTRY=",
        "global.imageRegistry",
    ] {
        assert!(stderr.contains(hint), "{hint:?} missing from: {stderr}");
    }
    let left = success(
        ns.kubectl(&["get", "deploy,svc,sa,role", "-o", "name"], None),
        "kubectl get",
    );
    assert!(!left.contains("hookrun"), "nothing is installed: {left}");
    // One repository set is not enough: the others still have no registry.
    let partial = helm(
        cluster,
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            &public,
            "--set",
            "operator.image.repository=registry.example.test/op",
        ],
    );
    assert!(!partial.status.success());
    let stderr = String::from_utf8_lossy(&partial.stderr);
    assert!(
        (stderr.contains("no image registry for hookrun-apiserver")
            || stderr.contains("no image registry for hookrun-harness"))
            && !stderr.contains("hookrun-operator"),
        "the refusal names an image without a registry: {stderr}"
    );

    // global.imageRegistry moves all three; a digest replaces the tag.
    let render = |sets: &[&str]| {
        let mut args = vec!["template", RELEASE, &chart, "--set", &public];
        for set in sets {
            args.extend(["--set", set]);
        }
        documents(&success(helm(cluster, &args), "helm template"))
    };
    let digest = format!("sha256:{}", "ab".repeat(32));
    let apiserver_digest = format!("apiserver.image.digest={digest}");
    let objects = render(&[
        "global.imageRegistry=127.0.0.1:5000/team/",
        &apiserver_digest,
    ]);
    assert_eq!(
        image_references(&objects),
        [
            format!("127.0.0.1:5000/team/hookrun-apiserver@{digest}"),
            "127.0.0.1:5000/team/hookrun-harness:0.1.0".to_owned(),
            "127.0.0.1:5000/team/hookrun-operator:0.1.0".to_owned(),
        ]
    );
    // Explicit repositories need no registry, and win over it.
    let objects = render(&[
        "operator.image.repository=a.example/op",
        "operator.image.tag=1.2.3",
        "apiserver.image.repository=a.example/api",
        "harness.image.repository=a.example/harness",
    ]);
    assert_eq!(
        image_references(&objects),
        [
            "a.example/api:0.1.0",
            "a.example/harness:0.1.0",
            "a.example/op:1.2.3"
        ]
    );
    let bad_digest = helm(
        cluster,
        &[
            "template",
            RELEASE,
            &chart,
            "--set",
            &public,
            "--set",
            "global.imageRegistry=r.example",
            "--set",
            "operator.image.digest=latest",
        ],
    );
    assert!(!bad_digest.status.success(), "a digest that is no digest");
}

/// The flags of one rendered Deployment's container, and the binary that takes them.
fn container_args(deployment: &Value) -> (String, Vec<String>) {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let binary = format!("hookrun-{}", container["name"].as_str().unwrap_or_default());
    let args = container["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (binary, args)
}

#[tokio::test]
async fn the_binaries_know_every_flag_the_chart_passes() {
    let cluster = cluster().await;
    let sets = [
        format!("publicURL={PUBLIC_URL}"),
        "watchNamespaces={a}".into(),
        "redactUrlInStatus=true".into(),
        "operator.pendingTimeout=2m".into(),
        "operator.podPolicy.allowedServiceAccounts={builder,deployer}".into(),
        "operator.podPolicy.allowPrivileged=true".into(),
        "operator.podPolicy.allowRoot=true".into(),
        "operator.podPolicy.allowedImagePrefixes={ghcr.io/org/}".into(),
        "operator.podPolicy.allowedTolerationKeys={node-role.kubernetes.io/control-plane}".into(),
    ];
    let objects = documents(&template(cluster, "hookrun-system", &sets));
    for deployment in of_kind(&objects, "Deployment") {
        let (binary, args) = container_args(deployment);
        let help = success(
            Command::new(hookrun_tests::workspace_binary(&binary))
                .arg("--help")
                .output()
                .expect("the binary runs"),
            &format!("{binary} --help"),
        );
        assert!(
            args.iter().any(|a| a == "--log-format=json"),
            "{binary}: the chart's logFormat reaches the binary: {args:?}"
        );
        if binary == "hookrun-operator" {
            for flag in [
                "--allowed-service-accounts=builder,deployer",
                "--allow-privileged",
                "--allow-root",
                "--allowed-image-prefixes=ghcr.io/org/",
                "--allowed-toleration-keys=node-role.kubernetes.io/control-plane",
            ] {
                assert!(
                    args.iter().any(|a| a == flag),
                    "the chart passes no {flag}: {args:?}"
                );
            }
        }
        for arg in &args {
            let flag = arg.split('=').next().unwrap_or_default();
            assert!(
                help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                "{binary} has no {flag}"
            );
        }
    }
}

/// `kubectl auth can-i` as a user (`resource/subresource` allowed): true for "yes".
fn can_i(cluster: &Cluster, user: &str, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    let user = format!("--as={user}");
    let subresource = format!("--subresource={subresource}");
    let mut args = vec!["auth", "can-i", verb, resource, user.as_str()];
    if subresource != "--subresource=" {
        args.push(&subresource);
    }
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let out = cluster.kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// A kubeconfig for `service_account` in `ns`: the admin kubeconfig with a TokenRequest
/// token of that account instead of the admin token.
fn service_account_kubeconfig(cluster: &Cluster, ns: &str, service_account: &str) -> PathBuf {
    let token = success(
        cluster.kubectl(&[
            "create",
            "token",
            service_account,
            "-n",
            ns,
            "--duration=1h",
        ]),
        "kubectl create token",
    );
    let admin = std::fs::read_to_string(cluster.kubeconfig_path()).expect("the admin kubeconfig");
    let replaced: String = admin
        .lines()
        .map(|line| match line.trim_start().strip_prefix("token:") {
            Some(_) => format!("    token: {}", token.trim()),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(admin, replaced, "the admin kubeconfig carries a token line");
    let path = workspace_root().join(format!(
        "target/test-clusters/{ns}-{service_account}.kubeconfig"
    ));
    std::fs::write(&path, replaced).expect("the ServiceAccount kubeconfig");
    path
}

/// The installed Deployment's arguments with listeners moved to free local ports.
fn installed_args(ns: &TestNamespace, deployment: &str) -> Vec<String> {
    let json = success(
        ns.kubectl(&["get", "deploy", deployment, "-o", "json"], None),
        "kubectl get deploy",
    );
    let deployment: Value = serde_json::from_str(&json).expect("a Deployment");
    let (_, args) = container_args(&deployment);
    args.into_iter()
        .map(|arg| match arg.split_once('=') {
            Some((flag @ ("--listen" | "--runner-listen" | "--admin-listen"), _)) => {
                format!("{flag}=127.0.0.1:0")
            }
            _ => arg,
        })
        .collect()
}

fn secret_state(secret: &Secret) -> (Option<String>, Value) {
    (secret.resource_version(), json!(secret.data))
}

#[tokio::test]
async fn install_runs_as_the_charts_service_accounts_and_upgrade_and_uninstall_keep_agents() {
    let cluster = cluster().await;
    let release_ns = TestNamespace::new(cluster).await;
    let team = TestNamespace::new(cluster).await;
    let other = TestNamespace::new(cluster).await;
    let (rel, team_name) = (release_ns.name(), team.name());
    let chart = chart();
    let public = format!("publicURL={PUBLIC_URL}");
    let watch = format!("watchNamespaces={{{team_name}}}");
    let registry = format!("global.imageRegistry={REGISTRY}");

    let started = Instant::now();
    success(
        helm(
            cluster,
            &[
                "install",
                RELEASE,
                &chart,
                "-n",
                rel,
                "--set",
                &public,
                "--set",
                &watch,
                "--set",
                &registry,
                "--set",
                "rbac.aggregateSessionsToEdit=true",
            ],
        ),
        "helm install",
    );
    let install_time = started.elapsed();
    let installed = success(
        release_ns.kubectl(
            &["get", "deploy,svc,sa,pdb,role,rolebinding", "-o", "name"],
            None,
        ),
        "kubectl get",
    );
    for object in [
        "deployment.apps/hr-hookrun-operator",
        "deployment.apps/hr-hookrun-apiserver",
        "service/hr-hookrun-apiserver",
        "service/hr-hookrun-runner",
        "serviceaccount/hr-hookrun-operator",
        "serviceaccount/hr-hookrun-apiserver",
        "poddisruptionbudget.policy/hr-hookrun-apiserver",
        "role.rbac.authorization.k8s.io/hr-hookrun-operator-leader-election",
    ] {
        assert!(
            installed.contains(object),
            "{object} missing from:\n{installed}"
        );
    }

    // Least privilege, checked by the kube-apiserver's own authorizer.
    let operator = format!("system:serviceaccount:{rel}:hr-hookrun-operator");
    let apiserver = format!("system:serviceaccount:{rel}:hr-hookrun-apiserver");
    let expectations: &[(&str, &str, &str, Option<&str>, bool)] = &[
        (&apiserver, "create", "pods", Some(team_name), false),
        (&apiserver, "list", "secrets", Some(team_name), true),
        (&apiserver, "get", "secrets", Some(other.name()), false),
        (&apiserver, "list", "secrets", Some(other.name()), false),
        (&apiserver, "get", "secrets", Some(rel), false),
        (
            &apiserver,
            "create",
            "sessions.hookrun.dev",
            Some(team_name),
            true,
        ),
        (
            &apiserver,
            "create",
            "sessions.hookrun.dev",
            Some(other.name()),
            false,
        ),
        (
            &apiserver,
            "update",
            "agents.hookrun.dev",
            Some(team_name),
            false,
        ),
        (
            &apiserver,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            true,
        ),
        (
            &apiserver,
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            None,
            true,
        ),
        (
            &operator,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            false,
        ),
        (
            &operator,
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            None,
            false,
        ),
        (&operator, "create", "pods", Some(team_name), true),
        (&operator, "create", "pods", Some(other.name()), false),
        (
            &operator,
            "update",
            "agents.hookrun.dev",
            Some(team_name),
            false,
        ),
        (
            &operator,
            "patch",
            "agents.hookrun.dev/status",
            Some(team_name),
            true,
        ),
        // One Session per slot of a schedule trigger.
        (
            &operator,
            "create",
            "sessions.hookrun.dev",
            Some(team_name),
            true,
        ),
        (&operator, "delete", "secrets", Some(other.name()), false),
        (
            &operator,
            "create",
            "leases.coordination.k8s.io",
            Some(rel),
            true,
        ),
        (
            &operator,
            "create",
            "leases.coordination.k8s.io",
            Some(team_name),
            false,
        ),
        (&operator, "create", "pods/exec", Some(team_name), false),
        // Grants: the operator mints, revokes and expires them; the apiserver only
        // watches them; neither may create one.
        (
            &operator,
            "delete",
            "grants.hookrun.dev",
            Some(team_name),
            true,
        ),
        (
            &operator,
            "patch",
            "grants.hookrun.dev/status",
            Some(team_name),
            true,
        ),
        (
            &operator,
            "create",
            "grants.hookrun.dev",
            Some(team_name),
            false,
        ),
        (
            &operator,
            "update",
            "grants.hookrun.dev",
            Some(team_name),
            false,
        ),
        (
            &apiserver,
            "watch",
            "grants.hookrun.dev",
            Some(team_name),
            true,
        ),
        (
            &apiserver,
            "create",
            "grants.hookrun.dev",
            Some(team_name),
            false,
        ),
        (
            &apiserver,
            "patch",
            "grants.hookrun.dev/status",
            Some(team_name),
            false,
        ),
        (
            &apiserver,
            "list",
            "grants.hookrun.dev",
            Some(other.name()),
            false,
        ),
    ];
    for (who, verb, resource, ns, allowed) in expectations {
        assert_eq!(
            can_i(cluster, who, verb, resource, *ns),
            *allowed,
            "{who} {verb} {resource} in {ns:?}"
        );
    }

    // The opt-in aggregation: holders of the built-in `edit` role may start Sessions but
    // still cannot read Agents (whose status holds URLs); `view` gets neither.
    let alice = format!("alice-{rel}");
    let bob = format!("bob-{rel}");
    for (user, role) in [(&alice, "edit"), (&bob, "view")] {
        success(
            team.kubectl(
                &[
                    "create",
                    "rolebinding",
                    user,
                    &format!("--clusterrole={role}"),
                    &format!("--user={user}"),
                ],
                None,
            ),
            "kubectl create rolebinding",
        );
    }
    let aggregated = eventually(BUDGET, || async {
        can_i(
            cluster,
            &alice,
            "create",
            "sessions.hookrun.dev",
            Some(team_name),
        )
        .then_some(())
    })
    .await;
    assert!(
        aggregated.is_some(),
        "edit holders may create Sessions once aggregated"
    );
    assert!(can_i(
        cluster,
        &alice,
        "create",
        "grants.hookrun.dev",
        Some(team_name)
    ));
    assert!(!can_i(
        cluster,
        &bob,
        "create",
        "grants.hookrun.dev",
        Some(team_name)
    ));
    assert!(!can_i(
        cluster,
        &alice,
        "get",
        "agents.hookrun.dev",
        Some(team_name)
    ));
    assert!(!can_i(
        cluster,
        &bob,
        "get",
        "sessions.hookrun.dev",
        Some(team_name)
    ));
    assert!(!can_i(
        cluster,
        &bob,
        "get",
        "agents.hookrun.dev",
        Some(team_name)
    ));

    // The real binaries, as the chart's ServiceAccounts, with the chart's arguments.
    let operator_kubeconfig = service_account_kubeconfig(cluster, rel, "hr-hookrun-operator");
    let apiserver_kubeconfig = service_account_kubeconfig(cluster, rel, "hr-hookrun-apiserver");
    let operator_args = installed_args(&release_ns, "hr-hookrun-operator");
    let apiserver_args = installed_args(&release_ns, "hr-hookrun-apiserver");
    let operator_args: Vec<&str> = operator_args.iter().map(String::as_str).collect();
    let apiserver_args: Vec<&str> = apiserver_args.iter().map(String::as_str).collect();
    let ready_clock = Instant::now();
    let operator = Operator::attach(Process::start_with(
        &operator_kubeconfig,
        "hookrun-operator",
        rel,
        &operator_args,
    ))
    .await;
    let apiserver = ApiServer::attach(Process::start_with(
        &apiserver_kubeconfig,
        "hookrun-apiserver",
        rel,
        &apiserver_args,
    ))
    .await;

    let client = cluster.client().await;
    let agents: Api<Agent> = Api::namespaced(client.clone(), team_name);
    apply_agent(
        &agents,
        "helper",
        json!({"spec": {"models": ["anthropic/claude-sonnet-4-6"], "triggers": [{"webhook": {}}]}}),
    )
    .await;
    let path = webhook_path(&agents, team_name, "helper").await;
    let to_url = ready_clock.elapsed();
    let url = agents
        .get("helper")
        .await
        .expect("the Agent")
        .status
        .and_then(|s| s.webhook_url);
    assert_eq!(url.as_deref(), Some(format!("{PUBLIC_URL}{path}").as_str()));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), team_name);
    let secret_name = names::webhook_secret_name("helper");
    let before = secret_state(&secrets.get(&secret_name).await.expect("the token Secret"));

    // Webhook → Session → Pod, with the apiserver's index fed under its own RBAC.
    let public_addr = apiserver.public.clone();
    let known = eventually(BUDGET, || async {
        (request(&public_addr, "GET", &path, &[], "").await.status == 200).then_some(())
    })
    .await;
    assert!(
        known.is_some(),
        "the apiserver never knew the token: {}",
        apiserver.process.log_text()
    );
    let webhook_clock = Instant::now();
    let answer = request(
        &public_addr,
        "POST",
        &path,
        &[],
        r#"{"title": "hello from helm"}"#,
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{:?}\n{}",
        answer.json,
        apiserver.process.log_text()
    );
    let session_name = answer.json["session"]
        .as_str()
        .expect("a session name")
        .to_owned();
    let sessions: Api<Session> = Api::namespaced(client.clone(), team_name);
    let pods: Api<Pod> = Api::namespaced(client.clone(), team_name);
    let pod = eventually(BUDGET, || async {
        pods.get_opt(&session_name).await.ok().flatten()
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no pod for {session_name}; operator log: {}",
            operator.log_text()
        )
    });
    let to_pod = webhook_clock.elapsed();
    let container = pod
        .spec
        .as_ref()
        .map(|s| s.containers[0].clone())
        .expect("a container");
    let env = |key: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == key)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env(names::env::RUNNER_URL).as_deref(),
        Some(format!("http://hr-hookrun-runner.{rel}.svc:8081").as_str()),
        "the pod calls the chart's in-cluster runner Service"
    );
    assert_eq!(
        container.image.as_deref(),
        Some(format!("{REGISTRY}/hookrun-harness:0.1.0").as_str())
    );
    let pending = eventually(BUDGET, || async {
        let status = sessions.get(&session_name).await.ok()?.status?;
        (status.pod_name.as_deref() == Some(session_name.as_str())).then_some(())
    })
    .await;
    assert!(
        pending.is_some(),
        "the operator recorded the pod in the Session's status"
    );
    // Leader election ran on the Lease the Role names, in the release namespace.
    let holder = success(
        release_ns.kubectl(
            &[
                "get",
                "lease",
                "hr-hookrun-operator",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            None,
        ),
        "kubectl get lease",
    );
    assert!(!holder.is_empty(), "the operator holds its Lease");

    // Play the harness: the pod's bound token reaches the runner API, which checks it
    // with a TokenReview and writes the Session's status, as the chart's apiserver
    // ServiceAccount.
    let uid = pod.metadata.uid.clone().expect("a pod uid");
    let pod_token = success(
        team.kubectl(
            &[
                "create",
                "token",
                "default",
                "--audience",
                names::TOKEN_AUDIENCE,
                "--bound-object-kind=Pod",
                &format!("--bound-object-name={session_name}"),
                &format!("--bound-object-uid={uid}"),
            ],
            None,
        ),
        "kubectl create token (pod-bound)",
    );
    let bearer = format!("Bearer {}", pod_token.trim());
    let auth = [("Authorization", bearer.as_str())];
    let runner_addr = apiserver.runner.clone();
    let hidden = request(&public_addr, "GET", "/runner/v1/session", &auth, "").await;
    assert_eq!(
        hidden.status, 404,
        "the runner API is not on the public port"
    );
    let context = request(&runner_addr, "GET", "/runner/v1/session", &auth, "").await;
    assert_eq!(context.status, 200, "{:?}", context.json);
    assert_eq!(context.json["title"], "hello from helm");
    assert_eq!(
        context.json["models"],
        json!(["anthropic/claude-sonnet-4-6"])
    );
    let message = r#"{"type": "agent.message", "content": "hello from the chart"}"#;
    let posted = request(&runner_addr, "POST", "/runner/v1/events", &auth, message).await;
    assert_eq!(posted.status, 200, "{:?}", posted.json);
    let complete = r#"{"status": "complete"}"#;
    let done = request(&runner_addr, "POST", "/runner/v1/complete", &auth, complete).await;
    assert_eq!(done.json["phase"], "Complete", "{:?}", done.json);
    let response = sessions
        .get(&session_name)
        .await
        .expect("the Session")
        .status
        .and_then(|s| s.response);
    assert_eq!(response.as_deref(), Some("hello from the chart"));
    for process in [&operator.process, &apiserver.process] {
        let log = process.log_text();
        assert!(
            !log.to_lowercase().contains("forbidden"),
            "an RBAC refusal: {log}"
        );
    }

    // Upgrade with changed values: Deployments change, token Secrets do not.
    success(
        helm(
            cluster,
            &[
                "upgrade",
                RELEASE,
                &chart,
                "-n",
                rel,
                "--reuse-values",
                "--set",
                "apiserver.replicas=3",
                "--set",
                "logLevel=debug",
            ],
        ),
        "helm upgrade",
    );
    let replicas = success(
        release_ns.kubectl(
            &[
                "get",
                "deploy",
                "hr-hookrun-apiserver",
                "-o",
                "jsonpath={.spec.replicas}",
            ],
            None,
        ),
        "kubectl get",
    );
    assert_eq!(replicas, "3");
    operator.settled_after("agent", 0.0).await;
    let after = secret_state(&secrets.get(&secret_name).await.expect("the token Secret"));
    assert_eq!(
        before, after,
        "helm upgrade left the token Secret untouched"
    );

    // Uninstall: the chart's objects go; CRDs, Agents and their Secrets stay.
    drop(operator);
    drop(apiserver);
    success(
        helm(cluster, &["uninstall", RELEASE, "-n", rel]),
        "helm uninstall",
    );
    let left = success(
        release_ns.kubectl(&["get", "deploy,sa,role", "-o", "name"], None),
        "kubectl get",
    );
    assert!(
        !left.contains("hr-hookrun"),
        "release objects remain: {left}"
    );
    success(
        cluster.kubectl(&["get", "crd", "agents.hookrun.dev", "sessions.hookrun.dev"]),
        "the CRDs stay",
    );
    assert!(
        agents.get_opt("helper").await.expect("get").is_some(),
        "the Agent stays"
    );
    let kept = secret_state(
        &secrets
            .get(&secret_name)
            .await
            .expect("the token Secret stays"),
    );
    assert_eq!(before, kept);
    assert!(
        sessions
            .get_opt(&session_name)
            .await
            .expect("get")
            .is_some(),
        "the Session stays"
    );

    eprintln!(
        "helm install took {install_time:?}; the chart's operator and apiserver, started as its \
         ServiceAccounts, gave the first Agent its URL {to_url:?} after starting; webhook to \
         session Pod took {to_pod:?}"
    );
}
