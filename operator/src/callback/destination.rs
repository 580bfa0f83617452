//! Where callbacks may go. The operator sends on behalf of namespace users, so a
//! callback must not reach what they could not: loopback, link-local (cloud metadata),
//! unspecified, multicast and broadcast addresses are refused, and so are the networks
//! the admin lists (the cluster's pod and service CIDRs, say). The check is pure; the
//! sender resolves a name once per attempt, checks the addresses and connects to the
//! checked one, so a second lookup cannot answer differently (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The operator's rules for callback destinations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationPolicy {
    /// Allow loopback addresses (127.0.0.0/8, ::1): for tests and local development only.
    pub allow_loopback: bool,
    /// Networks no callback may reach.
    pub denied: Vec<IpNet>,
}

impl DestinationPolicy {
    /// Why `ip` may not be called, or `None` when it may.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        // An IPv4 address written as IPv6 (::ffff:a.b.c.d) is judged as IPv4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let kind = match ip {
            IpAddr::V4(v4) => v4_kind(v4),
            IpAddr::V6(v6) => v6_kind(v6),
        };
        match kind {
            Some("loopback") if self.allow_loopback => {}
            Some(kind) => return Some(format!("{ip} is a {kind} address")),
            None => {}
        }
        self.denied.iter().find(|net| net.contains(&ip)).map(|net| {
            format!("{ip} is in {net}, a network callbacks may not reach (--callback-deny-cidrs)")
        })
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() || ip.octets()[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_link_local() {
        Some("link-local (cloud metadata)")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("multicast or broadcast")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if first & 0xffc0 == 0xfe80 {
        Some("link-local (cloud metadata)")
    } else if ip.is_multicast() {
        Some("multicast or broadcast")
    } else if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        // The IPv6 address of the EC2 instance metadata service.
        Some("link-local (cloud metadata)")
    } else {
        None
    }
}

/// The first address of `resolved` the policy allows, else the reason the first one is
/// refused.
pub fn pick(policy: &DestinationPolicy, resolved: &[IpAddr]) -> Result<IpAddr, String> {
    let mut first_refusal = None;
    for ip in resolved {
        match policy.refusal(*ip) {
            None => return Ok(*ip),
            Some(why) => {
                first_refusal.get_or_insert(why);
            }
        }
    }
    Err(first_refusal.unwrap_or_else(|| "the name resolved to no address".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn the_default_refuses_local_and_metadata_addresses() {
        let policy = DestinationPolicy::default();
        for refused in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(policy.refusal(ip(refused)).is_some(), "{refused}");
        }
        for allowed in ["93.184.216.34", "10.1.2.3", "2606:2800:220:1::1"] {
            assert_eq!(policy.refusal(ip(allowed)), None, "{allowed}");
        }
        let why = policy.refusal(ip("169.254.169.254")).expect("refused");
        assert!(why.contains("link-local"), "{why}");
    }

    #[test]
    fn loopback_is_allowed_only_by_the_flag_and_denied_networks_win() {
        let policy = DestinationPolicy {
            allow_loopback: true,
            denied: vec!["10.96.0.0/12".parse().expect("a net")],
        };
        assert_eq!(policy.refusal(ip("127.0.0.1")), None);
        assert!(policy.refusal(ip("169.254.169.254")).is_some());
        let why = policy.refusal(ip("10.96.0.10")).expect("denied");
        assert!(why.contains("10.96.0.0/12"), "{why}");
        assert_eq!(policy.refusal(ip("10.1.0.1")), None);
        let looped = DestinationPolicy {
            allow_loopback: true,
            denied: vec!["127.0.0.0/8".parse().expect("a net")],
        };
        assert!(looped.refusal(ip("127.0.0.1")).is_some());
    }

    #[test]
    fn the_first_allowed_address_is_picked() {
        let policy = DestinationPolicy::default();
        assert_eq!(
            pick(&policy, &[ip("127.0.0.1"), ip("93.184.216.34")]),
            Ok(ip("93.184.216.34"))
        );
        let why = pick(&policy, &[ip("169.254.169.254")]).expect_err("refused");
        assert!(why.contains("169.254.169.254"), "{why}");
        assert!(pick(&policy, &[]).is_err());
    }
}
