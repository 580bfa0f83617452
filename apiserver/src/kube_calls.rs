//! The apiserver's own calls to the Kubernetes API, counted in
//! `hookrun_apiserver_kube_requests_total{verb, resource}`, so what each answer costs the
//! cluster can be measured (a webhook should cost one create, a cached read nothing).
//! Labels come from a fixed set: never a name, a namespace or a raw path.

use std::sync::Arc;

use http::{Method, Request};
use prometheus_client::encoding::EncodeLabelSet;

use crate::metrics::Metrics;

/// Labels of `hookrun_apiserver_kube_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KubeCallLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or `other`.
    pub(crate) verb: &'static str,
    /// The resource, with its subresource (`sessions/status`), or `other`.
    pub(crate) resource: &'static str,
}

/// The resources the apiserver calls (anything else is `other`).
const RESOURCES: [&str; 7] = [
    "agents",
    "secrets",
    "sessions",
    "sessions/status",
    "tokenreviews",
    "subjectaccessreviews",
    "leases",
];

/// The labels of one call, from its method, path and query alone.
pub(crate) fn kube_call_labels(method: &Method, path: &str, query: Option<&str>) -> KubeCallLabels {
    // /api/v1[/namespaces/{ns}]/{resource}[/{name}[/{sub}]] or
    // /apis/{group}/{version}[/namespaces/{ns}]/{resource}[/{name}[/{sub}]]
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] | ["apis", _, _version, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _ns, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => (String::new(), false),
    };
    let resource = RESOURCES
        .into_iter()
        .find(|r| *r == resource)
        .unwrap_or("other");
    let watch = query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let verb = match *method {
        Method::GET if watch => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    };
    KubeCallLabels { verb, resource }
}

/// A Kubernetes client (from the kubeconfig or the in-cluster config) whose every call
/// is counted in `metrics`.
pub(crate) async fn counted_client(metrics: Arc<Metrics>) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    let count = tower::util::MapRequestLayer::new(move |request: Request<kube::client::Body>| {
        let uri = request.uri();
        metrics.kube_call(kube_call_labels(request.method(), uri.path(), uri.query()));
        request
    });
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(&count).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(method: Method, path: &str, query: Option<&str>) -> (&'static str, &'static str) {
        let l = kube_call_labels(&method, path, query);
        (l.verb, l.resource)
    }

    #[test]
    fn calls_are_labelled_by_verb_and_resource_only() {
        let sessions = "/apis/hookrun.dev/v1alpha1/namespaces/team/sessions";
        assert_eq!(
            labels(Method::GET, &format!("{sessions}/s-1"), None),
            ("get", "sessions")
        );
        assert_eq!(labels(Method::GET, sessions, None), ("list", "sessions"));
        assert_eq!(
            labels(
                Method::GET,
                "/apis/hookrun.dev/v1alpha1/sessions",
                Some("watch=true&resourceVersion=1")
            ),
            ("watch", "sessions")
        );
        assert_eq!(
            labels(Method::PATCH, &format!("{sessions}/s-1/status"), None),
            ("patch", "sessions/status")
        );
        assert_eq!(labels(Method::POST, sessions, None), ("create", "sessions"));
        assert_eq!(
            labels(
                Method::GET,
                "/apis/hookrun.dev/v1alpha1/namespaces/team/agents",
                Some("fieldSelector=metadata.name%3Da")
            ),
            ("list", "agents")
        );
        assert_eq!(
            labels(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                None
            ),
            ("create", "tokenreviews")
        );
        assert_eq!(
            labels(
                Method::GET,
                "/api/v1/namespaces/team/secrets",
                Some("watch=1")
            ),
            ("watch", "secrets")
        );
        // A namespace called like a resource is still a namespace.
        assert_eq!(
            labels(Method::GET, "/api/v1/namespaces/sessions", None),
            ("get", "other")
        );
        assert_eq!(labels(Method::GET, "/version", None), ("list", "other"));
        assert_eq!(
            labels(Method::GET, "/api/v1/namespaces/a/pods/p", None),
            ("get", "other")
        );
    }
}
