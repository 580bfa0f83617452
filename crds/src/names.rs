//! Names, labels, annotations and URL shapes that the operator writes and the apiserver
//! reads. Kept in one place so the two binaries cannot disagree.

use sha2::{Digest, Sha256};

/// `app.kubernetes.io/managed-by` on every object hookrun creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "hookrun";
/// The label naming the Agent an object belongs to (hashed when the name is too long).
pub const AGENT_LABEL: &str = "hookrun.dev/agent";
/// The label naming the schedule trigger that started a Session.
pub const SCHEDULE_LABEL: &str = "hookrun.dev/schedule";
/// The label naming the Session a pod belongs to.
pub const SESSION_LABEL: &str = "hookrun.dev/session";
/// On a Session started for a session key: the key's hash (see [`session_key_hash`]), so
/// that the Sessions of one conversation are found by label.
pub const SESSION_KEY_LABEL: &str = "hookrun.dev/session-key";
/// On a Session started for a session key: which of the key's Sessions it is (0 first;
/// a follow-up after it finished starts the next).
pub const SESSION_KEY_GENERATION_LABEL: &str = "hookrun.dev/session-key-generation";
/// The label naming the Grant a token Secret belongs to (hashed when the name is too
/// long); the apiserver watches the managed Secrets that carry it as Grant tokens.
pub const GRANT_LABEL: &str = "hookrun.dev/grant";
/// Label selector for the Grant token Secrets.
pub const GRANT_SECRET_SELECTOR: &str = "app.kubernetes.io/managed-by=hookrun,hookrun.dev/grant";
/// Label selector for the Secrets the operator manages.
pub const MANAGED_SECRET_SELECTOR: &str = "app.kubernetes.io/managed-by=hookrun";

/// The label by which a Secret opts in to being read into Agents' session env
/// (`valueFrom.secretKeyRef`); its value must be [`AGENT_ENV_OPT_IN`].
pub const AGENT_ENV_LABEL: &str = "hookrun.dev/agent-env";
/// The value of [`AGENT_ENV_LABEL`] that opts a Secret in.
pub const AGENT_ENV_OPT_IN: &str = "true";
/// Label selector for the Secrets that opted in to Agent env.
pub const AGENT_ENV_SELECTOR: &str = "hookrun.dev/agent-env=true";

/// Set to a new value on an Agent to rotate its token with a grace period.
pub const ROTATE_TOKEN_ANNOTATION: &str = "hookrun.dev/rotate-token";
/// How long the previous token stays valid after a graceful rotation (`10m`, `1h`, `90s`).
pub const ROTATION_GRACE_ANNOTATION: &str = "hookrun.dev/rotation-grace";
/// On the managed Secret: the `rotate-token` value that its current token answers.
pub const ROTATED_FOR_ANNOTATION: &str = "hookrun.dev/rotated-for";

/// Keys of the managed Secret.
pub mod secret_keys {
    /// The current URL token.
    pub const TOKEN: &str = "token";
    /// The full webhook URL, token included.
    pub const URL: &str = "url";
    /// The token replaced by the last graceful rotation, valid until
    /// [`PREVIOUS_TOKEN_EXPIRES_AT`].
    pub const PREVIOUS_TOKEN: &str = "previous-token";
    /// RFC 3339 time after which [`PREVIOUS_TOKEN`] is no longer accepted.
    pub const PREVIOUS_TOKEN_EXPIRES_AT: &str = "previous-token-expires-at";
}

/// Keys of a Grant's token Secret (besides [`secret_keys::TOKEN`] and
/// [`secret_keys::URL`]).
pub mod grant_secret_keys {
    /// The Session the token speaks into, fixed when the token is minted.
    pub const SESSION: &str = "session";
    /// RFC 3339 time after which the token is refused.
    pub const EXPIRES_AT: &str = "expires-at";
}

/// The audience of the pod-bound tokens session pods present to the runner API.
pub const TOKEN_AUDIENCE: &str = "hookrun";
/// Where a session pod finds its pod-bound token.
pub const TOKEN_FILE: &str = "/var/run/secrets/hookrun/token";
/// Seconds a session pod's projected token lives before the kubelet refreshes it
/// (the shortest Kubernetes allows).
pub const TOKEN_EXPIRATION_SECONDS: i64 = 600;

/// Environment variables hookrun sets in every session pod (the `HOOKRUN_` prefix is
/// reserved for them).
pub mod env {
    /// The Session's name.
    pub const SESSION: &str = "HOOKRUN_SESSION";
    /// The Session's namespace.
    pub const NAMESPACE: &str = "HOOKRUN_NAMESPACE";
    /// The Agent's name.
    pub const AGENT: &str = "HOOKRUN_AGENT";
    /// The base URL of the runner API (the apiserver as pods reach it).
    pub const RUNNER_URL: &str = "HOOKRUN_RUNNER_URL";
    /// The path of the pod-bound token file.
    pub const TOKEN_FILE: &str = "HOOKRUN_TOKEN_FILE";
}

/// What replaces the token in `status.webhookUrl` when URLs are redacted.
pub const REDACTED_TOKEN: &str = "REDACTED";

/// The longest object name Kubernetes accepts (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label value Kubernetes accepts.
pub const MAX_LABEL_LEN: usize = 63;

fn short_hash(input: &str) -> String {
    hex::encode(&Sha256::digest(input.as_bytes())[..4])
}

/// Cuts `name` so that `name + suffix` fits in `max`, and when it had to cut, keeps the
/// result unique by adding a hash of the whole name. The result still starts and ends
/// with an alphanumeric character, as names and label values must.
fn fit(name: &str, suffix: &str, max: usize) -> String {
    if name.len() + suffix.len() <= max {
        return format!("{name}{suffix}");
    }
    let hash = short_hash(name);
    let keep = max.saturating_sub(suffix.len() + hash.len() + 1);
    let prefix =
        name[..keep.min(name.len())].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        format!("{hash}{suffix}")
    } else {
        format!("{prefix}-{hash}{suffix}")
    }
}

/// The name of the Secret that holds an Agent's token: `<agent>-webhook`, shortened with
/// a hash when that would be too long.
pub fn webhook_secret_name(agent: &str) -> String {
    fit(agent, "-webhook", MAX_NAME_LEN)
}

/// The name of the Secret that holds a Grant's token: `<grant>-grant`, shortened with a
/// hash when that would be too long.
pub fn grant_secret_name(grant: &str) -> String {
    fit(grant, "-grant", MAX_NAME_LEN)
}

/// The path of a Grant's hook: `/hook/<token>`.
pub fn hook_path(token: &str) -> String {
    format!("/hook/{token}")
}

/// The full hook URL under a public base (a trailing slash on the base is fine).
pub fn hook_url(public_base: &str, token: &str) -> String {
    format!("{}{}", public_base.trim_end_matches('/'), hook_path(token))
}

/// A label value that stands for `name`: the name itself when it fits in 63 characters,
/// otherwise a prefix and a hash.
pub fn label_value(name: &str) -> String {
    fit(name, "", MAX_LABEL_LEN)
}

/// The name of a Session started by a webhook: `<agent>-wh-<suffix>`, with the agent part
/// cut so the whole fits in a label value (pods and labels carry it).
pub fn session_name(agent: &str, suffix: &str) -> String {
    let tail = format!("-wh-{suffix}");
    fit(agent, &tail, MAX_LABEL_LEN)
}

/// The name of the Session a schedule trigger starts for one slot:
/// `<agent>-sc-<10 hex>`, the hex a hash of (agent, trigger, slot in Unix seconds). The
/// same slot always gets the same name, so that creating it twice fails with
/// AlreadyExists, whichever operator tries.
pub fn scheduled_session_name(agent: &str, trigger: &str, slot_unix_seconds: i64) -> String {
    let digest = Sha256::digest(format!("{agent}\0{trigger}\0{slot_unix_seconds}").as_bytes());
    let tail = format!("-sc-{}", &hex::encode(digest)[..10]);
    fit(agent, &tail, MAX_LABEL_LEN)
}

/// The hash of a session key as it appears in labels and names: 32 hex of SHA-256 over
/// (namespace, agent, key), so equal keys of different Agents never meet.
pub fn session_key_hash(namespace: &str, agent: &str, key: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}\0{agent}\0{key}").as_bytes());
    hex::encode(&digest[..16])
}

/// The name of generation `generation` of the Session of a session key:
/// `<agent>-k-<12 hex of the key hash>-<generation>`. Every replica computes the same
/// name, so that of concurrent first requests exactly one create succeeds and the others
/// get AlreadyExists and deliver into it.
pub fn keyed_session_name(agent: &str, key_hash: &str, generation: u32) -> String {
    let hash = &key_hash[..key_hash.len().min(12)];
    let tail = format!("-k-{hash}-{generation}");
    fit(agent, &tail, MAX_LABEL_LEN)
}

/// The path of an Agent's webhook: `/webhooks/<namespace>/<agent>/<token>`.
pub fn webhook_path(namespace: &str, agent: &str, token: &str) -> String {
    format!("/webhooks/{namespace}/{agent}/{token}")
}

/// The full webhook URL under a public base (a trailing slash on the base is fine).
pub fn webhook_url(public_base: &str, namespace: &str, agent: &str, token: &str) -> String {
    format!(
        "{}{}",
        public_base.trim_end_matches('/'),
        webhook_path(namespace, agent, token)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_session_names_are_deterministic_and_fit_a_label() {
        let hash = session_key_hash("team", "triage", "github/o/r#7");
        assert_eq!(hash.len(), 32);
        assert_ne!(hash, session_key_hash("team", "other", "github/o/r#7"));
        assert_eq!(
            keyed_session_name("triage", &hash, 0),
            format!("triage-k-{}-0", &hash[..12])
        );
        assert_ne!(
            keyed_session_name("triage", &hash, 0),
            keyed_session_name("triage", &hash, 1)
        );
        let long = keyed_session_name(&"a".repeat(200), &hash, u32::MAX);
        assert!(long.len() <= MAX_LABEL_LEN, "{long}");
        assert!(long.ends_with(&format!("-k-{}-{}", &hash[..12], u32::MAX)));
    }

    fn is_dns_label_like(s: &str) -> bool {
        let bytes = s.as_bytes();
        !s.is_empty()
            && bytes[0].is_ascii_alphanumeric()
            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    }

    #[test]
    fn short_names_are_kept() {
        assert_eq!(webhook_secret_name("my-agent"), "my-agent-webhook");
        assert_eq!(label_value("my-agent"), "my-agent");
        assert_eq!(session_name("my-agent", "0a1b2c3d"), "my-agent-wh-0a1b2c3d");
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let long = "a".repeat(253);
        let secret = webhook_secret_name(&long);
        assert!(secret.len() <= MAX_NAME_LEN, "{}", secret.len());
        assert!(secret.ends_with("-webhook"));
        assert!(is_dns_label_like(&secret));

        let label = label_value(&long);
        assert_eq!(label.len(), MAX_LABEL_LEN);
        assert!(is_dns_label_like(&label));

        let session = session_name(&long, "deadbeef");
        assert!(session.len() <= MAX_LABEL_LEN);
        assert!(session.ends_with("-wh-deadbeef"));
        assert!(is_dns_label_like(&session));
    }

    #[test]
    fn cut_names_stay_distinct() {
        let a = format!("{}a", "x".repeat(100));
        let b = format!("{}b", "x".repeat(100));
        assert_ne!(label_value(&a), label_value(&b));
        assert_ne!(session_name(&a, "00000000"), session_name(&b, "00000000"));
    }

    #[test]
    fn cut_never_ends_in_punctuation() {
        // The cut lands right after a dash: it must be trimmed, not kept.
        let name = format!("{}-{}", "a".repeat(49), "b".repeat(60));
        let label = label_value(&name);
        assert!(is_dns_label_like(&label), "{label}");
    }

    #[test]
    fn scheduled_names_are_stable_valid_and_distinct() {
        let a = scheduled_session_name("nightly", "report", 1_800_000_000);
        assert_eq!(
            a,
            scheduled_session_name("nightly", "report", 1_800_000_000)
        );
        assert!(
            a.starts_with("nightly-sc-") && a.len() == "nightly-sc-".len() + 10,
            "{a}"
        );
        assert_ne!(
            a,
            scheduled_session_name("nightly", "report", 1_800_000_001)
        );
        assert_ne!(
            a,
            scheduled_session_name("nightly", "triage", 1_800_000_000)
        );
        assert_ne!(
            a,
            scheduled_session_name("nightly-x", "report", 1_800_000_000)
        );
        let long = scheduled_session_name(&"a".repeat(253), "report", 0);
        assert!(
            long.len() <= MAX_LABEL_LEN && is_dns_label_like(&long),
            "{long}"
        );
    }

    #[test]
    fn grant_names_and_urls() {
        assert_eq!(grant_secret_name("ci"), "ci-grant");
        assert!(grant_secret_name(&"g".repeat(253)).len() <= MAX_NAME_LEN);
        assert_eq!(
            hook_url("https://hooks.example.com/", "tok"),
            "https://hooks.example.com/hook/tok"
        );
        assert_ne!(grant_secret_name("x"), webhook_secret_name("x"));
    }

    #[test]
    fn urls_join_without_double_slashes() {
        assert_eq!(
            webhook_url("https://hooks.example.com/", "team-a", "my-agent", "tok"),
            "https://hooks.example.com/webhooks/team-a/my-agent/tok"
        );
        assert_eq!(
            webhook_url("http://127.0.0.1:8080", "ns", "a", "t"),
            "http://127.0.0.1:8080/webhooks/ns/a/t"
        );
    }
}
