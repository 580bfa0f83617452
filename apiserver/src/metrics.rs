//! Prometheus metrics of the public server: requests by route template, method and
//! outcome, and a latency histogram by route template. Labels are low-cardinality: no
//! raw paths, tokens or Agent names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `hookrun_apiserver_requests_total`. Static strings, so counting a request
/// allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) route: &'static str,
    pub(crate) method: &'static str,
    pub(crate) outcome: &'static str,
    pub(crate) status: u16,
}

/// Labels of the per-Agent counters of the webhook expressions. Only Agents that exist
/// and whose token was presented are counted, so the set is the cluster's Agents.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct AgentLabels {
    pub(crate) namespace: String,
    pub(crate) agent: String,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: &'static str,
}

/// Labels of `hookrun_apiserver_auth_reviews_total`: which review the apiserver asked
/// the cluster for (`token_review`, `subject_access_review`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReviewLabels {
    pub(crate) kind: &'static str,
}

/// The label value of an HTTP method: the standard ones, else `other` (a client picks
/// the method, so it must not grow the label set).
pub(crate) fn method_label(method: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    KNOWN.into_iter().find(|m| *m == method).unwrap_or("other")
}

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

/// The server's metrics and the registry that encodes them.
pub struct Metrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// Wait-mode requests held right now.
    pub waiting: Gauge,
    /// TokenReviews and SubjectAccessReviews sent to the cluster, by kind.
    pub(crate) auth_reviews: Family<ReviewLabels, Counter>,
    /// Read requests refused with 429 before a review, their address having spent its
    /// review attempts.
    pub(crate) auth_throttled: Counter,
    /// This process's calls to the Kubernetes API, by verb and resource.
    pub(crate) kube_requests: Family<crate::kube_calls::KubeCallLabels, Counter>,
    /// Signed webhooks the Agent's filter turned away (202, nothing stored).
    pub(crate) filtered: Family<AgentLabels, Counter>,
    /// Title expressions that failed and fell back to the built-in title.
    pub(crate) title_fallbacks: Family<AgentLabels, Counter>,
    registry: Registry,
}

/// Counts one held request in [`Metrics::waiting`] until dropped.
#[derive(Debug)]
pub(crate) struct WaitingGuard(Gauge);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let mut registry = Registry::with_prefix("hookrun_apiserver");
        registry.register(
            "requests",
            "Public requests by route template, method and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a public request, by route template",
            latency.clone(),
        );
        let waiting = Gauge::default();
        registry.register(
            "waiting_requests",
            "Wait-mode webhook requests held until their Session finishes",
            waiting.clone(),
        );
        let auth_reviews = Family::<ReviewLabels, Counter>::default();
        registry.register(
            "auth_reviews",
            "TokenReviews and SubjectAccessReviews sent to the cluster, by kind",
            auth_reviews.clone(),
        );
        let auth_throttled = Counter::default();
        registry.register(
            "auth_throttled",
            "Read requests refused (429) because their address spent its review attempts",
            auth_throttled.clone(),
        );
        let kube_requests = Family::<crate::kube_calls::KubeCallLabels, Counter>::default();
        registry.register(
            "kube_requests",
            "Calls this apiserver made to the Kubernetes API, by verb and resource",
            kube_requests.clone(),
        );
        let filtered = Family::<AgentLabels, Counter>::default();
        registry.register(
            "webhooks_filtered",
            "Signed webhooks the Agent's filter expression turned away, by Agent",
            filtered.clone(),
        );
        let title_fallbacks = Family::<AgentLabels, Counter>::default();
        registry.register(
            "title_expression_fallbacks",
            "Title expressions that failed at run time and fell back to the built-in title, by Agent",
            title_fallbacks.clone(),
        );
        Self {
            requests,
            latency,
            waiting,
            auth_reviews,
            auth_throttled,
            kube_requests,
            filtered,
            title_fallbacks,
            registry,
        }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "cannot encode the metrics");
        }
        text
    }

    /// Counts a held request until the guard drops (also when its client went away).
    pub(crate) fn waiting(&self) -> WaitingGuard {
        self.waiting.inc();
        WaitingGuard(self.waiting.clone())
    }

    /// Counts one review sent to the cluster (`kind` is `token_review` or
    /// `subject_access_review`).
    pub(crate) fn review(&self, kind: &'static str) {
        self.auth_reviews
            .get_or_create(&ReviewLabels { kind })
            .inc();
    }

    /// Counts one call to the Kubernetes API.
    pub(crate) fn kube_call(&self, labels: crate::kube_calls::KubeCallLabels) {
        self.kube_requests.get_or_create(&labels).inc();
    }

    /// Counts one answered request. `route` is a route template and `outcome` a code from
    /// a fixed set, both known at compile time: never a raw path.
    pub(crate) fn observe(
        &self,
        route: &'static str,
        method: &str,
        outcome: &'static str,
        status: u16,
        seconds: f64,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method: method_label(method),
                outcome,
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }
}
