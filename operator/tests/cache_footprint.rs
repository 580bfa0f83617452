//! What the Session controller's caches cost per finished Session and its pod: the
//! resident memory a process gains while its caches hold many of them, decoded from the
//! JSON the API serves (whole objects, as webhooks and the kubelet leave them).
//!
//! One test per binary, so that no other test's allocations land in the measurement.

use hookrun_operator::session_controller::cache::{CachedPod, CachedSession, PodIndex};
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

const NOW: &str = "2026-01-01T00:00:00Z";

fn managed_fields(manager: &str) -> Value {
    json!([{
        "manager": manager, "operation": "Update", "apiVersion": "v1", "time": NOW,
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:hookrun.dev/session": {}}},
                      "f:status": {"f:phase": {}, "f:conditions": {}, "f:containerStatuses": {}}}
    }])
}

/// A finished Session as the API serves it: title, env, payload and events near their
/// budgets.
fn session(i: usize) -> Value {
    let name = format!("session-{i:06}");
    let events: Vec<_> = (0..4)
        .map(|e| json!({"type": "agent.message", "content": format!("{e}: {}", "m".repeat(1000)), "timestamp": NOW}))
        .collect();
    json!({
        "apiVersion": "hookrun.dev/v1alpha1", "kind": "Session",
        "metadata": {
            "name": name, "namespace": "bench-ns",
            "uid": format!("0b9c4e2a-6f1d-4c3e-9a7b-{i:012}"),
            "resourceVersion": format!("{}", 100_000 + i), "generation": 1,
            "creationTimestamp": NOW,
            "labels": {"hookrun.dev/agent": "agent-1"},
            "managedFields": managed_fields("hookrun-apiserver"),
        },
        "spec": {
            "agent": "agent-1", "title": "t".repeat(1024),
            "env": [{"name": "TICKET", "value": "LIN-1234"}, {"name": "PRIORITY", "value": "high"}],
            "trigger": {"source": "linear", "deliveryId": format!("{name}-delivery"),
                        "payloadDigest": format!("sha256:{}", "ab".repeat(32)),
                        "payload": format!("{{\"data\":\"{}\"}}", "p".repeat(4096))},
        },
        "status": {
            "phase": "Complete", "podName": name, "podUid": format!("7d1e2f3a-1b2c-4d5e-8f90-{i:012}"),
            "startTime": NOW, "completionTime": NOW, "response": "done", "events": events,
        },
    })
}

/// The Succeeded pod of `session(i)`, with the spec the operator builds and the status a
/// kubelet writes.
fn pod(i: usize) -> Value {
    let name = format!("session-{i:06}");
    let conditions: Vec<_> = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
        .iter()
        .map(|t| json!({"type": t, "status": "False", "lastTransitionTime": NOW, "reason": "PodCompleted"}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "bench-ns",
            "uid": format!("7d1e2f3a-1b2c-4d5e-8f90-{i:012}"),
            "resourceVersion": format!("{}", 200_000 + i), "creationTimestamp": NOW,
            "labels": {"hookrun.dev/session": name, "hookrun.dev/agent": "agent-1"},
            "ownerReferences": [{"apiVersion": "hookrun.dev/v1alpha1", "kind": "Session", "name": name,
                                 "uid": format!("0b9c4e2a-6f1d-4c3e-9a7b-{i:012}"),
                                 "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kubelet"),
        },
        "spec": {
            "restartPolicy": "Never", "activeDeadlineSeconds": 3600,
            "automountServiceAccountToken": false, "enableServiceLinks": false,
            "containers": [{
                "name": "agent", "image": "ghcr.io/hookrun/harness:0.1.0",
                "env": (0..8).map(|e| json!({"name": format!("HOOKRUN_VAR_{e}"), "value": "x".repeat(64)})).collect::<Vec<_>>(),
                "resources": {"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
                "securityContext": {"runAsNonRoot": true, "allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
            }],
        },
        "status": {
            "phase": "Succeeded", "hostIP": "10.0.0.1", "podIP": "10.1.2.3",
            "podIPs": [{"ip": "10.1.2.3"}], "hostIPs": [{"ip": "10.0.0.1"}], "startTime": NOW,
            "conditions": conditions,
            "containerStatuses": [{
                "name": "agent", "ready": false, "restartCount": 0, "started": false,
                "image": "ghcr.io/hookrun/harness:0.1.0",
                "imageID": format!("ghcr.io/hookrun/harness@sha256:{}", "cd".repeat(32)),
                "containerID": format!("containerd://{}", "ef".repeat(32)),
                "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": NOW, "finishedAt": NOW}},
            }],
        },
    })
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Pairs cached for the measurement: enough that allocator noise is small beside them.
const PAIRS: usize = 10_000;

#[test]
fn a_cached_session_and_pod_cost_little_memory() {
    // Sessions in the controller's reflector store, pods in their index, as `run` keeps them.
    let (sessions, mut session_writer) = reflector::store::<CachedSession>();
    let pods = PodIndex::default();
    pods.apply(&watcher::Event::Init);
    let before = rss_kib();
    for i in 0..PAIRS {
        // Decoded from the bytes the API sends, as the watcher does.
        let bytes = serde_json::to_vec(&session(i)).expect("session JSON");
        let mut cached: CachedSession = serde_json::from_slice(&bytes).expect("a Session");
        cached.trim();
        session_writer.apply_watcher_event(&watcher::Event::Apply(cached));
        let bytes = serde_json::to_vec(&pod(i)).expect("pod JSON");
        let mut cached: CachedPod = serde_json::from_slice(&bytes).expect("a Pod");
        cached.trim();
        pods.apply(&watcher::Event::InitApply(cached));
    }
    pods.apply(&watcher::Event::InitDone);
    let after = rss_kib();
    assert_eq!(sessions.len(), PAIRS);
    assert_eq!(pods.len(), PAIRS);
    let per_pair = (after.saturating_sub(before)) as f64 * 1024.0 / PAIRS as f64;
    println!(
        "cache: {per_pair:.0} bytes per Session+Pod ({before} KiB -> {after} KiB for {PAIRS})"
    );
    assert!(
        per_pair <= 2048.0,
        "a cached Session+Pod costs {per_pair:.0} bytes; the budget is 2048"
    );
}
