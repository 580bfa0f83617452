//! Command-line flags (each also read from an environment variable).

use std::{fmt, net::SocketAddr, str::FromStr};

use clap::{Parser, ValueEnum};
use hookrun_crds::duration::FlagDuration;

use crate::pod_policy::PodPolicy;

/// hookrun's operator: gives every Agent with a webhook trigger a token Secret and a
/// webhook URL in its status, and runs every Session in a pod.
#[derive(Clone, Debug, Parser)]
#[command(name = "hookrun-operator", version, about, long_about = None)]
pub struct Args {
    /// The public base of every webhook URL, e.g. https://hooks.example.com (an absolute
    /// http or https URL; a trailing slash is fine).
    #[arg(long, env = "HOOKRUN_PUBLIC_URL")]
    pub public_url: PublicUrl,

    /// Where session pods reach the runner API (the apiserver as seen from inside the
    /// cluster), e.g. http://hookrun-apiserver.hookrun.svc; set in pods as
    /// HOOKRUN_RUNNER_URL.
    #[arg(long, env = "HOOKRUN_RUNNER_URL")]
    pub runner_url: PublicUrl,

    /// The harness image of session pods whose Agent sets no `spec.session.image`.
    #[arg(
        long,
        env = "HOOKRUN_DEFAULT_HARNESS_IMAGE",
        default_value = concat!("ghcr.io/hookrun/hookrun-harness:", env!("CARGO_PKG_VERSION"))
    )]
    pub default_harness_image: String,

    /// How long a session pod may stay Pending because it cannot be scheduled, its image
    /// cannot be pulled or its container cannot be created, before the Session fails
    /// (e.g. 5m, 90s, 1h; a bare number is seconds).
    #[arg(long, env = "HOOKRUN_PENDING_TIMEOUT", default_value = "5m")]
    pub pending_timeout: FlagDuration,

    /// Address of the admin server (/healthz, /readyz, /metrics). Port 0 picks a free one;
    /// the bound address is logged.
    #[arg(long, env = "HOOKRUN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Run the controllers only while holding a coordination.k8s.io Lease, so that only
    /// one replica writes.
    #[arg(long, env = "HOOKRUN_LEADER_ELECT", default_value_t = false)]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "HOOKRUN_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "HOOKRUN_LEADER_ELECTION_ID",
        default_value = "hookrun-operator"
    )]
    pub leader_election_id: String,

    /// How long a Lease stays valid without renewal (e.g. 15s, 1m; a bare number is
    /// seconds).
    #[arg(
        long,
        env = "HOOKRUN_LEADER_ELECTION_LEASE_DURATION",
        default_value = "15s"
    )]
    pub leader_election_lease_duration: FlagDuration,

    /// Namespaces to watch, comma-separated (default: all namespaces).
    #[arg(long, env = "HOOKRUN_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Replace the token in status.webhookUrl with a placeholder; the full URL is then only
    /// in the managed Secret's `url` key.
    #[arg(long, env = "HOOKRUN_REDACT_URL_IN_STATUS", default_value_t = false)]
    pub redact_url_in_status: bool,

    /// The TTL of a Grant that sets no spec.ttlSeconds (e.g. 1h, 30m; a bare number is
    /// seconds).
    #[arg(long, env = "HOOKRUN_GRANT_DEFAULT_TTL", default_value = "1h")]
    pub grant_default_ttl: FlagDuration,

    /// The longest TTL a Grant gets; a longer spec.ttlSeconds is cut to it.
    #[arg(long, env = "HOOKRUN_GRANT_MAX_TTL", default_value = "24h")]
    pub grant_max_ttl: FlagDuration,

    /// Log format.
    #[arg(long, env = "HOOKRUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Pod policy: ServiceAccounts, besides each namespace's `default`, that an Agent's
    /// session pods may run as (spec.session.serviceAccountName), comma-separated; `*`
    /// allows any.
    #[arg(long, env = "HOOKRUN_ALLOWED_SERVICE_ACCOUNTS", value_delimiter = ',')]
    pub allowed_service_accounts: Vec<String>,

    /// Pod policy: let Agents ask for privileged containers, privilege escalation, added
    /// capabilities beyond NET_BIND_SERVICE, unconfined seccomp or AppArmor, other SELinux
    /// types, an unmasked /proc or Windows host processes.
    #[arg(long, env = "HOOKRUN_ALLOW_PRIVILEGED", default_value_t = false)]
    pub allow_privileged: bool,

    /// Pod policy: let Agents run session containers as root (runAsUser: 0,
    /// runAsNonRoot: false).
    #[arg(long, env = "HOOKRUN_ALLOW_ROOT", default_value_t = false)]
    pub allow_root: bool,

    /// Pod policy: prefixes that spec.session.image must start with, comma-separated
    /// (e.g. ghcr.io/my-org/); empty allows any image. The default harness image is
    /// always allowed.
    #[arg(long, env = "HOOKRUN_ALLOWED_IMAGE_PREFIXES", value_delimiter = ',')]
    pub allowed_image_prefixes: Vec<String>,

    /// Pod policy: control-plane taint keys session pods may tolerate
    /// (node-role.kubernetes.io/control-plane, node-role.kubernetes.io/master),
    /// comma-separated; `*` allows every toleration, the key-less one included. Other
    /// keys are always allowed.
    #[arg(long, env = "HOOKRUN_ALLOWED_TOLERATION_KEYS", value_delimiter = ',')]
    pub allowed_toleration_keys: Vec<String>,

    /// Callbacks: networks no callback may reach, comma-separated CIDRs (set the
    /// cluster's pod and service CIDRs here). Loopback, link-local (cloud metadata),
    /// unspecified and multicast addresses are always refused.
    #[arg(long, env = "HOOKRUN_CALLBACK_DENY_CIDRS", value_delimiter = ',')]
    pub callback_deny_cidrs: Vec<String>,

    /// Callbacks: allow loopback destinations (127.0.0.0/8, ::1). For tests and local
    /// development only: in a cluster it would let namespace users reach the operator's
    /// own host.
    #[arg(long, env = "HOOKRUN_CALLBACK_ALLOW_LOOPBACK", default_value_t = false)]
    pub callback_allow_loopback: bool,

    /// Callbacks: the delays between attempts, comma-separated (after attempt n fails,
    /// the next waits the n-th delay, up to 20% more at random, or longer when the
    /// receiver's Retry-After says so, up to 1h); once spent, the delivery is given up.
    #[arg(
        long,
        env = "HOOKRUN_CALLBACK_RETRY_DELAYS",
        value_delimiter = ',',
        default_value = "10s,30s,1m,5m,15m,30m,1h,2h,4h,6h,8h"
    )]
    pub callback_retry_delays: Vec<FlagDuration>,
}

impl Args {
    /// The callback sender's settings; an unparsable CIDR is an error naming it.
    pub fn callback_settings(&self) -> Result<crate::callback::CallbackSettings, String> {
        let denied = self
            .callback_deny_cidrs
            .iter()
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .map(|c| {
                c.parse::<ipnet::IpNet>().map_err(|_| {
                    format!(
                        "--callback-deny-cidrs: {c:?} is not a CIDR such as 10.96.0.0/12 or fd00::/8"
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::callback::CallbackSettings {
            destinations: crate::callback::destination::DestinationPolicy {
                allow_loopback: self.callback_allow_loopback,
                denied,
            },
            schedule: crate::callback::plan::RetrySchedule {
                delays: self.callback_retry_delays.iter().map(|d| d.0).collect(),
            },
            timeout: crate::callback::send::ATTEMPT_TIMEOUT,
        })
    }
}

impl Args {
    /// The pod policy the flags describe (blank list entries are ignored).
    pub fn pod_policy(&self) -> PodPolicy {
        let list = |values: &[String]| {
            values
                .iter()
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        PodPolicy {
            allowed_service_accounts: list(&self.allowed_service_accounts),
            allow_privileged: self.allow_privileged,
            allow_root: self.allow_root,
            allowed_image_prefixes: list(&self.allowed_image_prefixes),
            allowed_toleration_keys: list(&self.allowed_toleration_keys),
        }
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// An absolute http(s) URL that webhook paths are appended to. Kept without a trailing
/// slash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicUrl(String);

impl PublicUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PublicUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for PublicUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(format!("{s:?} must start with http:// or https://")),
        }
        match uri.authority() {
            Some(authority) if !authority.host().is_empty() => {}
            _ => return Err(format!("{s:?} has no host")),
        }
        if uri.query().is_some() || s.contains('#') {
            return Err(format!(
                "{s:?} must not have a query or fragment: webhook paths are appended to it"
            ));
        }
        Ok(PublicUrl(s.trim_end_matches('/').to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_urls() {
        let ok = |s: &str| s.parse::<PublicUrl>().map(|u| u.0);
        assert_eq!(
            ok("https://hooks.example.com/").as_deref(),
            Ok("https://hooks.example.com")
        );
        assert_eq!(
            ok("http://127.0.0.1:8080").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(
            ok("https://example.com/base/").as_deref(),
            Ok("https://example.com/base")
        );
        for bad in [
            "",
            "hooks.example.com",
            "/webhooks",
            "ftp://x",
            "https://x/?a=b",
            "https://x/#f",
            "https://",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flags_parse() {
        let args = Args::try_parse_from([
            "hookrun-operator",
            "--public-url",
            "https://h.example.com/",
            "--runner-url",
            "http://hookrun-apiserver.hookrun.svc:8080",
            "--namespaces",
            "a,b",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .expect("parses");
        assert_eq!(args.namespaces, ["a", "b"]);
        assert_eq!(args.public_url.as_str(), "https://h.example.com");
        assert!(!args.leader_elect);
        assert_eq!(
            args.runner_url.as_str(),
            "http://hookrun-apiserver.hookrun.svc:8080"
        );
        assert_eq!(
            args.default_harness_image,
            format!(
                "ghcr.io/hookrun/hookrun-harness:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(args.pending_timeout.0, std::time::Duration::from_secs(300));
        if std::env::vars().all(|(k, _)| !k.starts_with("HOOKRUN_GRANT")) {
            assert_eq!(
                args.grant_default_ttl.0,
                std::time::Duration::from_secs(3600)
            );
            assert_eq!(args.grant_max_ttl.0, std::time::Duration::from_secs(86_400));
        }
        // The pod policy is locked down unless a flag opens it.
        if std::env::vars().all(|(k, _)| !k.starts_with("HOOKRUN_ALLOW")) {
            assert_eq!(args.pod_policy(), PodPolicy::default());
        }
        assert!(Args::try_parse_from(["hookrun-operator", "--public-url", "nope"]).is_err());
        // The runner URL is required (unless HOOKRUN_RUNNER_URL is set).
        if std::env::var_os("HOOKRUN_RUNNER_URL").is_none() {
            assert!(
                Args::try_parse_from(["hookrun-operator", "--public-url", "https://h.example.com"])
                    .is_err()
            );
        }
    }

    #[test]
    fn pod_policy_flags_parse() {
        let args = Args::try_parse_from([
            "hookrun-operator",
            "--public-url",
            "https://h.example.com",
            "--runner-url",
            "http://r.example.com",
            "--allowed-service-accounts",
            "builder, deployer,",
            "--allow-privileged",
            "--allow-root",
            "--allowed-image-prefixes",
            "ghcr.io/org/",
            "--allowed-toleration-keys",
            "*",
        ])
        .expect("parses");
        assert_eq!(
            args.pod_policy(),
            PodPolicy {
                allowed_service_accounts: vec!["builder".into(), "deployer".into()],
                allow_privileged: true,
                allow_root: true,
                allowed_image_prefixes: vec!["ghcr.io/org/".into()],
                allowed_toleration_keys: vec!["*".into()],
            }
        );
    }

    #[test]
    fn duration_flags_take_the_shared_grammar() {
        let parse = |flag: &str, value: &str| {
            Args::try_parse_from([
                "hookrun-operator",
                "--public-url",
                "https://h.example.com",
                "--runner-url",
                "http://r.example.com",
                flag,
                value,
            ])
        };
        let pending = |v: &str| parse("--pending-timeout", v).map(|a| a.pending_timeout.0);
        assert_eq!(pending("7").ok(), Some(std::time::Duration::from_secs(7)));
        assert_eq!(
            pending("1h").ok(),
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(
            pending("500ms").ok(),
            Some(std::time::Duration::from_millis(500))
        );
        assert!(pending("ten").is_err());
        let lease = |v: &str| {
            parse("--leader-election-lease-duration", v).map(|a| a.leader_election_lease_duration.0)
        };
        assert_eq!(lease("30").ok(), Some(std::time::Duration::from_secs(30)));
        assert_eq!(lease("1m").ok(), Some(std::time::Duration::from_secs(60)));
    }

    #[test]
    fn every_flag_is_documented_in_the_readme() {
        use clap::CommandFactory;
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("the README");
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if matches!(long, "help" | "version") {
                continue;
            }
            assert!(
                readme.contains(&format!("`--{long}")),
                "README.md does not document hookrun-operator --{long}"
            );
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
