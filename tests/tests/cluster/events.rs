//! The operator's Event recorder against the real kube-apiserver: a repeat raises the
//! first Event's series instead of creating another, and an Event deleted in the cluster
//! is published anew.

use hookrun_operator::events::{Event, EventType, Recorder, Reporter};
use hookrun_tests::{TestNamespace, cluster};
use k8s_openapi::api::{core::v1::ObjectReference, events::v1::Event as StoredEvent};
use kube::{Api, ResourceExt, api::DeleteParams};

fn event(note: &str) -> Event {
    Event {
        type_: EventType::Warning,
        reason: "Tested".into(),
        note: Some(note.into()),
        action: "Test".into(),
        secondary: None,
    }
}

async fn tested(events: &Api<StoredEvent>) -> Vec<StoredEvent> {
    let list = events.list(&Default::default()).await.expect("the Events");
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Tested"))
        .collect()
}

#[tokio::test]
async fn a_repeated_event_raises_the_first_ones_series_and_a_deleted_one_comes_back() {
    let cluster = cluster().await;
    let ns = TestNamespace::new(cluster).await;
    let client = cluster.client().await;
    let events: Api<StoredEvent> = Api::namespaced(client.clone(), ns.name());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "hookrun-operator".into(),
            instance: Some("events-test".into()),
        },
    );
    let regarding = ObjectReference {
        api_version: Some("hookrun.dev/v1alpha1".into()),
        kind: Some("Agent".into()),
        name: Some("triage".into()),
        namespace: Some(ns.name().into()),
        uid: Some("7c9e6679-7425-40de-944b-e07fc1f90ae7".into()),
        ..ObjectReference::default()
    };
    for _ in 0..3 {
        recorder
            .publish(&event("the same note"), &regarding)
            .await
            .expect("the Event or its repeat is stored");
    }
    recorder
        .publish(&event("another note"), &regarding)
        .await
        .expect("another Event is stored");

    let stored = tested(&events).await;
    assert_eq!(stored.len(), 2, "one Event per note: {stored:?}");
    let repeated = stored
        .iter()
        .find(|e| e.note.as_deref() == Some("the same note"))
        .expect("the repeated Event");
    assert_eq!(repeated.series.as_ref().map(|s| s.count), Some(3));
    assert_eq!(repeated.regarding.as_ref(), Some(&regarding));
    assert_eq!(repeated.reporting_instance.as_deref(), Some("events-test"));
    let other = stored
        .iter()
        .find(|e| e.note.as_deref() == Some("another note"))
        .expect("the other Event");
    assert!(other.series.is_none(), "published once: no series");

    // Gone from the cluster (Events expire there): the next repeat stores it anew.
    events
        .delete(&repeated.name_any(), &DeleteParams::default())
        .await
        .expect("the Event is deleted");
    recorder
        .publish(&event("the same note"), &regarding)
        .await
        .expect("published anew");
    let stored = tested(&events).await;
    let again: Vec<_> = stored
        .iter()
        .filter(|e| e.note.as_deref() == Some("the same note"))
        .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].name_any(), repeated.name_any());
    assert!(again[0].series.is_none());
}
