//! Which address a webhook came from: the TCP peer, or, behind trusted proxies, the first
//! untrusted hop of `X-Forwarded-For` read from the right; and the `allowCIDRs` check.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddrV4};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};

/// The longest part of a bad entry that an error message quotes; the header comes from
/// the outside and must not fill our logs.
const MAX_QUOTED: usize = 64;

/// The proxies whose `X-Forwarded-For` entries are believed (`--trusted-proxies`).
///
/// Networks are kept normalized: an IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) is
/// stored as the IPv4 network it stands for, so that both spellings of a peer match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts the given networks.
    pub(crate) fn new(nets: impl IntoIterator<Item = IpNet>) -> Self {
        Self(nets.into_iter().map(normalize_net).collect())
    }

    /// Trusts no proxy: the TCP peer is always the client.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether no proxy is trusted.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    /// The trusted networks, normalized.
    pub(crate) fn nets(&self) -> &[IpNet] {
        &self.0
    }

    /// Whether `ip` is inside one of the trusted networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = normalize_ip(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// A `--trusted-proxies` entry that is neither a CIDR nor an address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "--trusted-proxies entry {position} ({entry:?}) is not a CIDR: use comma-separated \
     networks such as 10.0.0.0/8,2001:db8::/32 or single addresses such as 192.0.2.1"
)]
pub struct TrustedProxiesError {
    /// The 1-based position of the entry in the list.
    pub(crate) position: usize,
    /// The entry as given (cut when long).
    pub(crate) entry: String,
}

impl FromStr for TrustedProxies {
    type Err = TrustedProxiesError;

    /// Parses a comma-separated list of CIDRs or single addresses; an empty string (or
    /// only spaces) trusts nothing.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for (i, entry) in s.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let net = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| TrustedProxiesError {
                    position: i + 1,
                    entry: quote(entry),
                })?;
            nets.push(net);
        }
        Ok(Self::new(nets))
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// An `X-Forwarded-For` entry that the walk reached and could not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "X-Forwarded-For entry {entry:?} is not an IP address: a trusted proxy must send \
     addresses such as 203.0.113.7, 2001:db8::7, 203.0.113.7:4711 or [2001:db8::7]:4711"
)]
pub struct XffError {
    /// The entry as received (cut when long).
    pub(crate) entry: String,
}

/// The address of the client that sent a request.
///
/// The TCP `peer` is the client unless it is a trusted proxy. Then the `X-Forwarded-For`
/// values (every such header, in the order received, each split at commas) are read from
/// the right, skipping trusted hops: the first untrusted address is the client. When
/// every hop is trusted, the left-most one is. Entries left of the client are never read,
/// so a spoofed or malformed entry there changes nothing; a malformed entry that the walk
/// does reach is an error. A header value that is empty or only spaces holds no hop. IPv4-mapped IPv6 addresses come back as IPv4.
pub fn resolve_client_ip(
    peer: IpAddr,
    xff_headers: &[&str],
    trusted: &TrustedProxies,
) -> Result<IpAddr, XffError> {
    let peer = normalize_ip(peer);
    if !trusted.contains(peer) {
        return Ok(peer);
    }
    let mut client = peer;
    // A header with nothing in it carries no hop (some proxies send one); an empty entry
    // between commas is garbage like any other.
    let values = xff_headers.iter().rev().filter(|h| !h.trim().is_empty());
    for entry in values.flat_map(|h| h.rsplit(',')) {
        let ip = parse_forwarded_entry(entry).ok_or_else(|| XffError {
            entry: quote(entry.trim()),
        })?;
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    Ok(client)
}

/// The `X-Forwarded-For` values of a request, in the order received, for
/// [`resolve_client_ip`]. A value that is not visible ASCII stays in the list as a
/// placeholder that fails to parse, so it is an error only if the walk reaches it.
pub(crate) fn forwarded_for_values(headers: &http::HeaderMap) -> Vec<&str> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or("<not text>"))
        .collect()
}

/// Whether `ip` may call an Agent whose `allowCIDRs` are `allowed`; an empty list allows
/// every address. IPv4-mapped IPv6 addresses and networks match their IPv4 forms.
pub(crate) fn is_allowed(ip: IpAddr, allowed: &[IpNet]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let ip = normalize_ip(ip);
    allowed.iter().any(|net| normalize_net(*net).contains(&ip))
}

/// Reads one `X-Forwarded-For` entry: a bare address, `[v6]`, `[v6]:port` or `v4:port`,
/// with surrounding spaces. Anything else (`unknown`, obfuscated identifiers, empty) is
/// refused.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(normalize_ip(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let ip = inside.parse::<Ipv6Addr>().ok()?;
        if !after.is_empty() {
            after.strip_prefix(':')?.parse::<u16>().ok()?;
        }
        return Some(normalize_ip(IpAddr::V6(ip)));
    }
    entry
        .parse::<SocketAddrV4>()
        .ok()
        .map(|addr| IpAddr::V4(*addr.ip()))
}

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is kept.
fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// `::ffff:a.b.c.d/(96+n)` becomes `a.b.c.d/n`; every other network is kept.
fn normalize_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        other => other,
    }
}

fn quote(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTED);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    fn proxies(s: &str) -> TrustedProxies {
        s.parse().expect("test proxies parse")
    }

    #[test]
    fn trusted_proxies_parse_lists_and_single_addresses() {
        let t = proxies(" 10.0.0.0/8, 2001:db8::/32 ,192.0.2.1,");
        assert_eq!(t.nets().len(), 3);
        assert!(t.contains(ip("10.1.2.3")));
        assert!(t.contains(ip("2001:db8::1")));
        assert!(t.contains(ip("192.0.2.1")));
        assert!(!t.contains(ip("192.0.2.2")));
        assert_eq!(t.to_string(), "10.0.0.0/8,2001:db8::/32,192.0.2.1/32");
    }

    #[test]
    fn empty_trusted_proxies_trust_nothing() {
        assert!(proxies("").is_empty());
        assert!(proxies("  ").is_empty());
        assert_eq!(proxies(""), TrustedProxies::none());
    }

    #[test]
    fn bad_trusted_proxy_is_named_by_position() {
        let err = "10.0.0.0/8,10.0.0.0/33"
            .parse::<TrustedProxies>()
            .expect_err("the input is refused");
        assert_eq!(err.position, 2);
        assert!(err.to_string().contains("\"10.0.0.0/33\""), "{err}");
        assert!(err.to_string().contains("--trusted-proxies"), "{err}");
    }

    #[test]
    fn mapped_networks_match_both_spellings() {
        let t = proxies("::ffff:10.0.0.0/104");
        assert_eq!(t.to_string(), "10.0.0.0/8");
        assert!(t.contains(ip("10.9.9.9")));
        assert!(t.contains(ip("::ffff:10.9.9.9")));
        let t = proxies("10.0.0.0/8");
        assert!(t.contains(ip("::ffff:10.9.9.9")));
    }

    #[test]
    fn untrusted_peer_is_the_client() {
        let t = proxies("10.0.0.0/8");
        let got = resolve_client_ip(ip("198.51.100.1"), &["203.0.113.9"], &t)
            .expect("the input is accepted");
        assert_eq!(got, ip("198.51.100.1"));
        // Garbage is not read either.
        let got = resolve_client_ip(ip("198.51.100.1"), &["nonsense"], &t)
            .expect("the input is accepted");
        assert_eq!(got, ip("198.51.100.1"));
    }

    #[test]
    fn no_trusted_proxies_ignore_the_header() {
        let got = resolve_client_ip(ip("10.0.0.1"), &["203.0.113.9"], &TrustedProxies::none())
            .expect("the input is accepted");
        assert_eq!(got, ip("10.0.0.1"));
    }

    #[test]
    fn walk_from_the_right_skips_trusted_hops() {
        let t = proxies("10.0.0.0/8");
        let got = resolve_client_ip(
            ip("10.0.0.1"),
            &["1.1.1.1, 203.0.113.9, 10.0.0.7", "10.0.0.8"],
            &t,
        )
        .expect("the input is accepted");
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn all_trusted_gives_the_left_most() {
        let t = proxies("10.0.0.0/8");
        let got = resolve_client_ip(ip("10.0.0.1"), &["10.0.0.5, 10.0.0.6"], &t)
            .expect("the input is accepted");
        assert_eq!(got, ip("10.0.0.5"));
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        let t = proxies("10.0.0.0/8");
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), &[], &t).expect("the input is accepted"),
            ip("10.0.0.1")
        );
        assert_eq!(
            resolve_client_ip(ip("10.0.0.1"), &["", "  "], &t).expect("the input is accepted"),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn entries_with_ports_and_brackets_are_read() {
        let t = proxies("10.0.0.0/8");
        let cases = [
            ("203.0.113.9:4711", "203.0.113.9"),
            ("[2001:db8::9]", "2001:db8::9"),
            ("[2001:db8::9]:443", "2001:db8::9"),
            ("  2001:db8::9  ", "2001:db8::9"),
            ("::ffff:203.0.113.9", "203.0.113.9"),
            ("[::ffff:203.0.113.9]:80", "203.0.113.9"),
        ];
        for (entry, want) in cases {
            let got =
                resolve_client_ip(ip("10.0.0.1"), &[entry], &t).expect("the input is accepted");
            assert_eq!(got, ip(want), "{entry}");
        }
    }

    #[test]
    fn garbage_is_an_error_only_when_reached() {
        let t = proxies("10.0.0.0/8");
        for bad in [
            "unknown",
            " , ",
            "1.2.3.4:99999",
            "[2001:db8::1",
            "2001:db8::1:80x",
            "_hidden",
        ] {
            let err =
                resolve_client_ip(ip("10.0.0.1"), &[bad], &t).expect_err("the input is refused");
            assert!(bad.contains(&err.entry), "{bad:?} {err}");
            // Left of an untrusted hop, the same entry is never read.
            let header = format!("{bad}, 203.0.113.9");
            let got =
                resolve_client_ip(ip("10.0.0.1"), &[&header], &t).expect("the input is accepted");
            assert_eq!(got, ip("203.0.113.9"));
        }
    }

    #[test]
    fn long_garbage_is_quoted_short() {
        let t = proxies("10.0.0.0/8");
        let bad = "x".repeat(10_000);
        let err = resolve_client_ip(ip("10.0.0.1"), &[&bad], &t).expect_err("the input is refused");
        assert_eq!(err.entry.len(), MAX_QUOTED);
    }

    #[test]
    fn mapped_peer_is_normalized() {
        let t = proxies("10.0.0.0/8");
        let got = resolve_client_ip(ip("::ffff:10.0.0.1"), &["203.0.113.9"], &t)
            .expect("the input is accepted");
        assert_eq!(got, ip("203.0.113.9"));
        let got =
            resolve_client_ip(ip("::ffff:198.51.100.1"), &[], &t).expect("the input is accepted");
        assert_eq!(got, ip("198.51.100.1"));
    }

    #[test]
    fn forwarded_for_values_keep_order_and_mark_binary() {
        let mut headers = http::HeaderMap::new();
        headers.append(
            "X-Forwarded-For",
            "203.0.113.9".parse().expect("the input is accepted"),
        );
        headers.append(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff10.0.0.9").expect("the input is accepted"),
        );
        headers.append(
            "x-forwarded-for",
            "10.0.0.8".parse().expect("the input is accepted"),
        );
        let values = forwarded_for_values(&headers);
        assert_eq!(values, ["203.0.113.9", "<not text>", "10.0.0.8"]);
        let t = proxies("10.0.0.0/8");
        assert!(resolve_client_ip(ip("10.0.0.1"), &values, &t).is_err());
        let t = proxies("10.0.0.8/32");
        assert!(resolve_client_ip(ip("10.0.0.8"), &values, &t).is_err());
        let t = proxies("0.0.0.0/0");
        assert!(resolve_client_ip(ip("10.0.0.8"), &values[2..], &t).is_ok());
    }

    #[test]
    fn allow_list() {
        let allowed: Vec<IpNet> = vec![
            "35.231.147.226/32".parse().expect("the input is accepted"),
            "2001:db8::/32".parse().expect("the input is accepted"),
        ];
        assert!(is_allowed(ip("35.231.147.226"), &allowed));
        assert!(is_allowed(ip("::ffff:35.231.147.226"), &allowed));
        assert!(is_allowed(ip("2001:db8::1"), &allowed));
        assert!(!is_allowed(ip("35.231.147.227"), &allowed));
        assert!(!is_allowed(ip("2001:db9::1"), &allowed));
        assert!(is_allowed(ip("1.2.3.4"), &[]));
        let mapped: Vec<IpNet> = vec![
            "::ffff:35.231.147.0/120"
                .parse()
                .expect("the input is accepted"),
        ];
        assert!(is_allowed(ip("35.231.147.9"), &mapped));
    }

    // --- property tests ---------------------------------------------------------------

    /// Proxies inside 10.0.0.0/8 and fd00::/8 are trusted in the properties below.
    fn trusted() -> TrustedProxies {
        proxies("10.0.0.0/8,fd00::/8")
    }

    fn trusted_hop() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 3]>().prop_map(|b| IpAddr::from([10, b[0], b[1], b[2]])),
            any::<[u16; 7]>()
                .prop_map(|s| { IpAddr::from([0xfd00, s[0], s[1], s[2], s[3], s[4], s[5], s[6]]) }),
            // The same trusted IPv4 hops, IPv4-mapped.
            any::<[u8; 3]>().prop_map(|b| {
                IpAddr::V6(std::net::Ipv4Addr::new(10, b[0], b[1], b[2]).to_ipv6_mapped())
            }),
        ]
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u16; 8]>().prop_map(IpAddr::from),
            any::<[u8; 4]>().prop_map(|b| IpAddr::V6(std::net::Ipv4Addr::from(b).to_ipv6_mapped())),
        ]
    }

    fn untrusted_ip() -> impl Strategy<Value = IpAddr> {
        any_ip().prop_filter("outside the trusted networks", |ip| {
            !trusted().contains(*ip)
        })
    }

    /// How a hop may be written by a proxy.
    fn spelled(ip: IpAddr, style: u8) -> String {
        match (ip, style % 3) {
            (IpAddr::V4(v4), 1) => format!("{v4}:{}", 1000 + u16::from(style)),
            (IpAddr::V6(v6), 1) => format!("[{v6}]"),
            (IpAddr::V6(v6), 2) => format!("[{v6}]:443"),
            (ip, _) => format!(" {ip} "),
        }
    }

    /// Joins entries into one or more headers, splitting after the entries in `cuts`.
    fn headers(entries: &[String], cuts: &[bool]) -> Vec<String> {
        let mut out = vec![Vec::new()];
        for (i, e) in entries.iter().enumerate() {
            out.last_mut().expect("never empty").push(e.clone());
            if cuts.get(i).copied().unwrap_or(false) {
                out.push(Vec::new());
            }
        }
        out.into_iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.join(","))
            .collect()
    }

    proptest! {
        /// Whatever a client writes at the left of the header, the answer is the first
        /// untrusted hop from the right.
        #[test]
        fn left_most_spoof_never_changes_the_result(
            spoof in prop_oneof![any_ip().prop_map(|ip| ip.to_string()), ".{0,40}"],
            client in untrusted_ip(),
            hops in prop::collection::vec((trusted_hop(), any::<u8>()), 0..5),
            peer in trusted_hop(),
            cuts in prop::collection::vec(any::<bool>(), 0..8),
            style in any::<u8>(),
        ) {
            let t = trusted();
            let mut entries = vec![spelled(client, style)];
            entries.extend(hops.iter().map(|(ip, s)| spelled(*ip, *s)));
            let honest = headers(&entries, &cuts);
            let honest: Vec<&str> = honest.iter().map(String::as_str).collect();

            let mut spoofed_entries = vec![spoof.replace(',', "")];
            spoofed_entries.extend(entries.iter().cloned());
            let spoofed = headers(&spoofed_entries, &cuts);
            let spoofed: Vec<&str> = spoofed.iter().map(String::as_str).collect();

            let want = normalize_ip(client);
            prop_assert_eq!(resolve_client_ip(peer, &honest, &t), Ok(want));
            prop_assert_eq!(resolve_client_ip(peer, &spoofed, &t), Ok(want));
        }

        /// An untrusted peer is the client, whatever the headers say.
        #[test]
        fn untrusted_peer_ignores_the_header(
            peer in untrusted_ip(),
            values in prop::collection::vec(".{0,60}", 0..4),
        ) {
            let values: Vec<&str> = values.iter().map(String::as_str).collect();
            prop_assert_eq!(resolve_client_ip(peer, &values, &trusted()), Ok(normalize_ip(peer)));
        }

        /// Splitting the same entries over several headers changes nothing.
        #[test]
        fn header_boundaries_do_not_matter(
            hops in prop::collection::vec((any_ip(), any::<u8>()), 1..6),
            peer in trusted_hop(),
            cuts in prop::collection::vec(any::<bool>(), 0..8),
        ) {
            let entries: Vec<String> = hops.iter().map(|(ip, s)| spelled(*ip, *s)).collect();
            let one = entries.join(",");
            let many = headers(&entries, &cuts);
            let many: Vec<&str> = many.iter().map(String::as_str).collect();
            let t = trusted();
            prop_assert_eq!(
                resolve_client_ip(peer, &[&one], &t),
                resolve_client_ip(peer, &many, &t)
            );
        }

        /// The result is always IPv4 for IPv4-mapped input and never a trusted hop unless
        /// every hop was trusted.
        #[test]
        fn result_is_normalized(
            hops in prop::collection::vec((any_ip(), any::<u8>()), 0..6),
            peer in trusted_hop(),
        ) {
            let entries: Vec<String> = hops.iter().map(|(ip, s)| spelled(*ip, *s)).collect();
            let header = entries.join(",");
            let got = resolve_client_ip(peer, &[&header], &trusted());
            let got = got.expect("every entry is well-formed");
            if let IpAddr::V6(v6) = got {
                prop_assert!(v6.to_ipv4_mapped().is_none());
            }
            let all_trusted = hops.iter().all(|(ip, _)| trusted().contains(*ip));
            prop_assert_eq!(trusted().contains(got), all_trusted);
        }

        /// Parsing a list and printing it round-trips.
        #[test]
        fn trusted_proxies_round_trip(nets in prop::collection::vec(any_ip(), 0..5)) {
            let t = TrustedProxies::new(nets.into_iter().map(IpNet::from));
            let again: TrustedProxies = t.to_string().parse().expect("printed list parses");
            prop_assert_eq!(again, t);
        }
    }
}
