//! Prometheus metrics of the controllers: reconciles, failures by reason, reconcile
//! duration, API writes, Session phase transitions and the Session-to-pod latency.
//! Labels are low-cardinality: controller, reason, kind, phase.

use std::time::Instant;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub controller: &'static str,
    /// What was written: `secret_write`, `secret_delete`, `status_patch`, `event`,
    /// `pod_create`, `pod_delete`, `session_delete`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// The phase a Session moved to.
    pub phase: &'static str,
    /// Why: `PodCreated`, `PodRunning`, `PodSucceeded`, `DeadlineExceeded`, ...
    pub reason: &'static str,
}

/// The metrics of every controller of this process.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub writes: Family<WriteLabels, Counter>,
    pub session_transitions: Family<TransitionLabels, Counter>,
    /// From a Session's creation to its pod's creation.
    pub pod_create_latency: Histogram,
    /// Callback attempts by Agent and outcome.
    pub callback_deliveries: Family<CallbackLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallbackLabels {
    pub namespace: String,
    pub agent: String,
    /// `delivered`, `retry`, `failed` or `refused`.
    pub outcome: &'static str,
}

impl Metrics {
    /// Creates the metrics and registers them under `hookrun_operator_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Metrics {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
            }),
            writes: Family::default(),
            session_transitions: Family::default(),
            pod_create_latency: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            callback_deliveries: Family::default(),
        };
        let sub = registry.sub_registry_with_prefix("hookrun_operator");
        sub.register(
            "reconciles",
            "Reconciles started",
            metrics.reconciles.clone(),
        );
        sub.register(
            "reconcile_failures",
            "Reconciles that failed, by reason",
            metrics.failures.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            metrics.duration.clone(),
        );
        sub.register(
            "api_writes",
            "Writes to the Kubernetes API, by kind",
            metrics.writes.clone(),
        );
        sub.register(
            "session_transitions",
            "Session phase changes the operator wrote, by phase and reason",
            metrics.session_transitions.clone(),
        );
        sub.register(
            "session_pod_create_latency_seconds",
            "Time from a Session's creation to the creation of its pod (the API stamps creation to the second, so single values can be up to 1 s high)",
            metrics.pod_create_latency.clone(),
        );
        sub.register(
            "callback_attempts",
            "Callback attempts, by Agent and outcome (delivered, retry, failed, refused)",
            metrics.callback_deliveries.clone(),
        );
        metrics
    }

    pub fn callback_delivery(&self, namespace: &str, agent: &str, outcome: &'static str) {
        self.callback_deliveries
            .get_or_create(&CallbackLabels {
                namespace: namespace.to_owned(),
                agent: agent.to_owned(),
                outcome,
            })
            .inc();
    }

    pub fn session_transition(&self, phase: &'static str, reason: &'static str) {
        self.session_transitions
            .get_or_create(&TransitionLabels { phase, reason })
            .inc();
    }

    pub fn pod_created(&self, seconds_after_session: f64) {
        self.pod_create_latency.observe(seconds_after_session);
    }

    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer {
        self.reconciles
            .get_or_create(&ControllerLabels { controller })
            .inc();
        ReconcileTimer {
            metrics: self.clone(),
            controller,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { controller, reason })
            .inc();
    }

    pub fn wrote(&self, controller: &'static str, kind: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { controller, kind })
            .inc();
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer {
    metrics: Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&ControllerLabels {
                controller: self.controller,
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
