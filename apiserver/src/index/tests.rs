use std::time::{Duration, SystemTime};

use hookrun_crds::agent::SignatureScheme;
use hookrun_crds::session::SessionPhase;
use serde_json::json;

use super::entries::SecretOwner;
use super::test_support::*;
use super::*;

#[test]
fn agent_entries() {
    let a = agent(
        "ns",
        "a",
        json!({"triggers": [{"webhook": {
            "allowCIDRs": ["10.0.0.0/8", "192.0.2.7"],
            "linearSignatureSecret": "s"
        }}], "session": {"maxConcurrent": 3}}),
    );
    let entry = agent_entry(&a).expect("has a webhook");
    assert_eq!(entry.uid, "uid-a");
    assert_eq!(entry.allow_cidrs.len(), 2);
    assert_eq!(entry.schemes, [SignatureScheme::Linear]);
    assert_eq!(entry.max_concurrent, Some(3));

    assert_eq!(agent_entry(&agent("ns", "b", json!({}))), None);
    let bad = agent(
        "ns",
        "c",
        json!({"triggers": [{"webhook": {"allowCIDRs": ["nope"]}}]}),
    );
    let bad = agent_entry(&bad).expect("has a webhook");
    assert!(bad.deny_all && bad.allow_cidrs.is_empty());
    assert!(!entry.deny_all);
}

#[test]
fn secret_entries_keep_digests_and_expiry() {
    let s = secret(
        "ns",
        "a",
        &[
            ("token", "current"),
            ("previous-token", "old"),
            ("previous-token-expires-at", "2030-01-01T00:00:00Z"),
            ("linear-signing-secret", "lin"),
            ("github-secret", ""),
        ],
    );
    assert_eq!(
        secret_owner(&s),
        Some(SecretOwner {
            agent: AgentKey::new("ns", "a"),
            uid: "uid-a".into()
        })
    );
    let e = secret_entry(&s);
    assert_eq!(e.token, Some(hookrun_crds::token::digest("current")));
    let prev = e.previous.clone().expect("previous");
    assert_eq!(prev.digest, hookrun_crds::token::digest("old"));
    assert_eq!(
        prev.expires_at,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    );
    assert_eq!(e.signing.len(), 1);
    assert_eq!(e.signing[&SignatureScheme::Linear], b"lin");
    assert!(!format!("{e:?}").contains("lin\""));

    let no_expiry = secret("ns", "a", &[("token", "t"), ("previous-token", "old")]);
    assert_eq!(secret_entry(&no_expiry).previous, None);
}

#[test]
fn index_joins_agents_and_secrets_and_resets_per_scope() {
    let mut index = Index::new(2);
    assert!(!index.is_synced());
    let spec = json!({"triggers": [{"webhook": {}}]});
    index.reset_agents(
        &Scope::All,
        &[agent("a", "x", spec.clone()), agent("b", "y", spec.clone())],
    );
    index.apply_secret(&secret("a", "x", &[("token", "t")]));
    index.mark_synced();
    index.mark_synced();
    assert!(index.is_synced());
    let target = index.target(&AgentKey::new("a", "x")).expect("x");
    assert_eq!(target.secret.token, Some(hookrun_crds::token::digest("t")));
    assert!(index.target(&AgentKey::new("b", "y")).is_some());

    // A relist of namespace `a` alone leaves `b` alone.
    index.reset_agents(&Scope::Namespace("a".into()), &[]);
    assert!(index.target(&AgentKey::new("a", "x")).is_none());
    assert!(index.target(&AgentKey::new("b", "y")).is_some());

    // Removing the trigger removes the entry.
    index.apply_agent(&agent("b", "y", json!({})));
    assert!(index.target(&AgentKey::new("b", "y")).is_none());
}

/// The operator's Secret of Agent `a` in `ns`, with token `token`.
fn real(token: &str) -> Secret {
    secret("ns", "a", &[("token", token)])
}

/// A Secret a namespace user made: the managed label and an owner reference to `a`,
/// changed by `forge`.
fn forged(token: &str, forge: impl FnOnce(&mut Secret)) -> Secret {
    let mut s = secret("ns", "a", &[("token", token)]);
    forge(&mut s);
    s
}

fn other_name(s: &mut Secret) {
    s.metadata.name = Some("a-webhook-2".into());
}

fn wrong_uid(s: &mut Secret) {
    if let Some(o) = s.metadata.owner_references.as_mut() {
        o[0].uid = "uid-forged".into();
    }
}

fn no_controller(s: &mut Secret) {
    if let Some(o) = s.metadata.owner_references.as_mut() {
        o[0].controller = None;
    }
}

fn token_of(index: &Index) -> Option<[u8; 32]> {
    index.target(&AgentKey::new("ns", "a"))?.secret.token
}

fn webhook_agent() -> Agent {
    agent("ns", "a", json!({"triggers": [{"webhook": {}}]}))
}

/// Every order of `objects` through the watch events and through relists.
fn every_order(objects: &[Obj], check: impl Fn(&Index, &str)) {
    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut all = Vec::new();
        for p in permutations(n - 1) {
            for at in 0..=p.len() {
                let mut q = p.clone();
                q.insert(at, n - 1);
                all.push(q);
            }
        }
        all
    }
    for order in permutations(objects.len()) {
        let mut index = Index::new(2);
        for &i in &order {
            match &objects[i] {
                Obj::Agent(a) => index.apply_agent(a),
                Obj::Secret(s) => index.apply_secret(s),
            }
        }
        check(&index, &format!("events in order {order:?}"));
    }
    let agents: Vec<Agent> = objects
        .iter()
        .filter_map(|o| match o {
            Obj::Agent(a) => Some((**a).clone()),
            Obj::Secret(_) => None,
        })
        .collect();
    let secrets: Vec<Secret> = objects
        .iter()
        .filter_map(|o| match o {
            Obj::Secret(s) => Some((**s).clone()),
            Obj::Agent(_) => None,
        })
        .collect();
    for agents_first in [true, false] {
        let mut index = Index::new(2);
        if agents_first {
            index.reset_agents(&Scope::All, &agents);
            index.reset_secrets(&Scope::Namespace("ns".into()), &secrets);
        } else {
            index.reset_secrets(&Scope::All, &secrets);
            index.reset_agents(&Scope::Namespace("ns".into()), &agents);
        }
        check(&index, &format!("relist, agents first: {agents_first}"));
    }
}

enum Obj {
    Agent(Box<Agent>),
    Secret(Box<Secret>),
}

impl Obj {
    fn secret(s: Secret) -> Self {
        Obj::Secret(Box::new(s))
    }
}

#[test]
fn a_forged_secret_of_another_name_never_adds_or_replaces_a_token() {
    let real_digest = Some(hookrun_crds::token::digest("real"));
    every_order(
        &[
            Obj::Agent(Box::new(webhook_agent())),
            Obj::secret(real("real")),
            Obj::secret(forged("forged", other_name)),
            Obj::secret(forged("forged2", |s| {
                other_name(s);
                s.metadata.name = Some("zzz".into());
            })),
        ],
        |index, how| assert_eq!(token_of(index), real_digest, "{how}"),
    );
    every_order(
        &[
            Obj::Agent(Box::new(webhook_agent())),
            Obj::secret(forged("forged", other_name)),
        ],
        |index, how| assert_eq!(token_of(index), None, "{how}"),
    );
}

#[test]
fn a_secret_with_the_right_name_but_the_wrong_owner_is_no_token() {
    for forge in [wrong_uid, no_controller] {
        every_order(
            &[
                Obj::Agent(Box::new(webhook_agent())),
                Obj::secret(forged("forged", forge)),
            ],
            |index, how| assert_eq!(token_of(index), None, "{how}"),
        );
    }
    let other_group = forged("forged", |s| {
        if let Some(o) = s.metadata.owner_references.as_mut() {
            o[0].api_version = "evil.example/v1".into();
        }
    });
    every_order(
        &[
            Obj::Agent(Box::new(webhook_agent())),
            Obj::secret(other_group),
        ],
        |index, how| assert_eq!(token_of(index), None, "{how}"),
    );
}

#[test]
fn a_forged_secret_replaced_by_the_real_one_gives_way_and_back() {
    let mut index = Index::new(1);
    index.apply_secret(&forged("forged", wrong_uid));
    index.apply_agent(&webhook_agent());
    assert_eq!(token_of(&index), None);
    // The same object updated by the operator: now it is the real one.
    index.apply_secret(&real("real"));
    assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("real")));
    // Edited to carry another owner: it stops counting at once.
    index.apply_secret(&forged("forged", wrong_uid));
    assert_eq!(token_of(&index), None);
    index.apply_secret(&real("real"));
    // Deleting a forged Secret of another name leaves the real one.
    index.delete_secret(&forged("forged", other_name));
    assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("real")));
    index.delete_secret(&real("real"));
    assert_eq!(token_of(&index), None);
}

#[test]
fn an_agent_recreated_with_a_new_uid_does_not_take_the_old_secret() {
    let mut index = Index::new(1);
    index.apply_agent(&webhook_agent());
    index.apply_secret(&real("old"));
    assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("old")));

    let mut recreated = webhook_agent();
    recreated.metadata.uid = Some("uid-a-2".into());
    index.delete_agent(&webhook_agent());
    index.apply_agent(&recreated);
    assert_eq!(token_of(&index), None, "the old Secret must not count");
    // The same after a relist that sees the old Secret first.
    index.reset_secrets(&Scope::All, &[real("old")]);
    index.reset_agents(&Scope::All, std::slice::from_ref(&recreated));
    assert_eq!(token_of(&index), None);

    let new = forged("new", |s| {
        if let Some(o) = s.metadata.owner_references.as_mut() {
            o[0].uid = "uid-a-2".into();
        }
    });
    index.apply_secret(&new);
    assert_eq!(token_of(&index), Some(hookrun_crds::token::digest("new")));
}

#[test]
fn active_sessions_are_counted() {
    let mut index = Index::new(1);
    let key = AgentKey::new("ns", "a");
    index.apply_session(&session("ns", "s1", "a", None));
    index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Running)));
    index.apply_session(&session("ns", "s3", "a", Some(SessionPhase::Complete)));
    assert_eq!(index.active_sessions(&key), 2);
    // Updates do not count twice; finishing frees a slot.
    index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Running)));
    assert_eq!(index.active_sessions(&key), 2);
    index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Error)));
    assert_eq!(index.active_sessions(&key), 1);
    index.delete_session(&session("ns", "s2", "a", None));
    assert_eq!(index.active_sessions(&key), 0);
    assert_eq!(index.session_digest("ns", "s3"), Some(None));
    index.reset_sessions(&Scope::All, &[session("ns", "s4", "a", None)]);
    assert_eq!(index.active_sessions(&key), 1);
    assert_eq!(index.session_digest("ns", "s3"), None);
}

#[test]
fn stored_sessions_are_counted_finished_ones_included_and_capped() {
    let mut index = Index::new(1);
    let key = AgentKey::new("ns", "a");
    index.apply_agent(&agent(
        "ns",
        "a",
        json!({"triggers": [{"webhook": {}}], "session": {"maxStoredSessions": 3}}),
    ));
    index.apply_session(&session("ns", "s1", "a", Some(SessionPhase::Complete)));
    index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Error)));
    index.apply_session(&session("ns", "other", "b", None));
    assert_eq!(index.stored_sessions(&key), 2);
    assert_eq!(index.active_sessions(&key), 0);
    // Updates do not count twice.
    index.apply_session(&session("ns", "s2", "a", Some(SessionPhase::Error)));
    assert_eq!(index.stored_sessions(&key), 2);

    assert_eq!(index.reserve(&key, "s3", None), Reservation::Reserved);
    // Finished Sessions fill the store although none runs.
    assert_eq!(
        index.reserve(&key, "s4", None),
        Reservation::StoreFull { max: 3 }
    );
    index.release("ns", "s3");
    assert_eq!(index.stored_sessions(&key), 2);
    index.apply_session(&session("ns", "s3", "a", None));
    assert_eq!(
        index.reserve(&key, "s4", Some(100)),
        Reservation::StoreFull { max: 3 }
    );
    // Deleting one (the TTL or the operator) frees room.
    index.delete_session(&session("ns", "s1", "a", None));
    assert_eq!(index.stored_sessions(&key), 2);
    assert_eq!(index.reserve(&key, "s4", None), Reservation::Reserved);
    // Another Agent is counted apart; without an entry it gets the default.
    assert_eq!(index.stored_sessions(&AgentKey::new("ns", "b")), 1);
    index.reset_sessions(&Scope::All, &[]);
    assert_eq!(index.stored_sessions(&key), 0);
    assert_eq!(
        agent_entry(&agent("ns", "c", json!({"triggers": [{"webhook": {}}]})))
            .map(|e| e.max_stored),
        Some(hookrun_crds::agent::DEFAULT_MAX_STORED_SESSIONS)
    );
}

#[test]
fn reservations_hold_slots_until_the_watch_or_a_release() {
    let mut index = Index::new(1);
    let key = AgentKey::new("ns", "a");
    assert_eq!(index.reserve(&key, "s1", Some(2)), Reservation::Reserved);
    assert_eq!(index.reserve(&key, "s1", Some(2)), Reservation::Shared);
    // A pending Session is no replay target yet.
    assert_eq!(index.session_digest("ns", "s1"), None);
    assert_eq!(index.reserve(&key, "s2", Some(2)), Reservation::Reserved);
    assert_eq!(
        index.reserve(&key, "s3", Some(2)),
        Reservation::Full { max: 2 }
    );
    assert_eq!(index.reserve(&key, "s3", None), Reservation::Reserved);
    index.release("ns", "s3");
    assert_eq!(index.active_sessions(&key), 2);

    // The watch confirms s1: it stays counted once, and a release no longer drops it.
    index.apply_session(&session("ns", "s1", "a", None));
    assert_eq!(index.active_sessions(&key), 2);
    index.release("ns", "s1");
    assert_eq!(index.active_sessions(&key), 2);
    assert_eq!(index.session_digest("ns", "s1"), Some(None));
    // A failed create gives its slot back.
    index.release("ns", "s2");
    assert_eq!(index.active_sessions(&key), 1);
}

#[test]
fn a_reserved_name_is_dropped_by_its_delete_and_by_a_relist() {
    let index = Index::new(1);
    let key = AgentKey::new("ns", "a");
    // Reserving takes a shared borrow: the index's read lock is enough.
    assert_eq!(index.reserve(&key, "s1", None), Reservation::Reserved);
    assert_eq!(index.reserve(&key, "s2", None), Reservation::Reserved);
    index.confirm("ns", "s2", "sha256:x");
    assert_eq!(
        index.session_digest("ns", "s2"),
        Some(Some("sha256:x".into()))
    );
    let mut index = index;
    index.delete_session(&session("ns", "s1", "a", None));
    assert_eq!(index.active_sessions(&key), 1);
    // A created one is not given back by a release: it waits for the watch.
    index.release("ns", "s2");
    assert_eq!(index.stored_sessions(&key), 1);
    index.reset_sessions(&Scope::All, &[]);
    assert_eq!(
        (index.active_sessions(&key), index.stored_sessions(&key)),
        (0, 0)
    );
    assert_eq!(index.session_digest("ns", "s2"), None);
}

#[test]
fn borrowed_keys_find_what_owned_keys_stored() {
    use std::hash::{BuildHasher, RandomState};
    let hasher = RandomState::new();
    let owned = AgentKey::new("ns", "name");
    let borrowed = KeyRef("ns", "name");
    // `Borrow` requires the same hash and equality as the owned key.
    assert_eq!(
        hasher.hash_one(&owned),
        hasher.hash_one(borrowed.key()),
        "a borrowed pair hashes as the owned key"
    );
    let mut map = HashMap::new();
    map.insert(owned.clone(), 7);
    assert_eq!(map.get(borrowed.key()), Some(&7));
    // The split between namespace and name matters, as for the owned key.
    assert_eq!(map.get(KeyRef("nsn", "ame").key()), None);
    assert_eq!(map.get(KeyRef("ns", "nam").key()), None);
}

#[test]
fn the_newest_generation_of_a_session_key_follows_the_watch() {
    use hookrun_crds::names;
    let keyed = |name: &str, hash: &str, generation: &str| {
        let mut s = session("ns", name, "a", Some(SessionPhase::Complete));
        s.metadata.labels = Some(
            [
                (names::SESSION_KEY_LABEL.to_owned(), hash.to_owned()),
                (
                    names::SESSION_KEY_GENERATION_LABEL.to_owned(),
                    generation.to_owned(),
                ),
            ]
            .into(),
        );
        s
    };
    let mut index = Index::new(1);
    assert_eq!(index.latest_key_generation("ns", "h1"), None);
    let first = keyed("a-k-1", "h1", "0");
    let second = keyed("a-k-2", "h1", "1");
    index.apply_session(&first);
    index.apply_session(&second);
    index.apply_session(&keyed("b-k-1", "h2", "4"));
    index.apply_session(&keyed("bad", "h3", "x"));
    assert_eq!(index.latest_key_generation("ns", "h1"), Some(1));
    assert_eq!(index.latest_key_generation("ns", "h2"), Some(4));
    assert_eq!(index.latest_key_generation("ns", "h3"), None);
    assert_eq!(index.latest_key_generation("other", "h1"), None);
    // The finished first generation deleted after its TTL: the newest stays.
    index.delete_session(&first);
    assert_eq!(index.latest_key_generation("ns", "h1"), Some(1));
    index.delete_session(&second);
    assert_eq!(index.latest_key_generation("ns", "h1"), None);
    index.reset_sessions(&Scope::All, &[keyed("a-k-9", "h1", "9")]);
    assert_eq!(index.latest_key_generation("ns", "h1"), Some(9));
    assert_eq!(index.latest_key_generation("ns", "h2"), None);
}
