//! The shapes of Kubernetes names that requests carry: a namespace is a DNS-1123 label,
//! an object name a DNS-1123 subdomain. Checked before anything else reads them, so a
//! name can neither grow a cache nor reach into a Kubernetes URL (`s%2Fstatus`,
//! `%3F...`).

/// The longest DNS-1123 label (a namespace).
pub(crate) const MAX_LABEL_LEN: usize = 63;
/// The longest DNS-1123 subdomain (an object name).
pub(crate) const MAX_SUBDOMAIN_LEN: usize = 253;

/// Whether `s` is a DNS-1123 label: 1 to 63 of `a-z`, `0-9` and `-`, starting and ending
/// with a letter or digit.
pub(crate) fn is_dns_label(s: &str) -> bool {
    s.len() <= MAX_LABEL_LEN && is_label_shaped(s)
}

/// Whether `s` is a DNS-1123 subdomain as Kubernetes checks object names: at most 253
/// characters of label-shaped parts joined by dots (Kubernetes does not cap each part
/// at 63).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= MAX_SUBDOMAIN_LEN && s.split('.').all(is_label_shaped)
}

/// One or more of `a-z`, `0-9` and `-`, starting and ending with a letter or digit.
fn is_label_shaped(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn labels() {
        for good in ["a", "team-a", "0", "a1-b2", &"a".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a_b",
            "a/b",
            "a?b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn subdomains() {
        for good in ["s", "agent-wh-0123abcd", "a.b.c", &"a".repeat(253)] {
            assert!(is_dns_subdomain(good), "{good}");
        }
        for bad in [
            "",
            "s/status",
            "s?x=1",
            "a..b",
            ".a",
            "a.",
            "S",
            "..",
            "%2F",
            &"a".repeat(254),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn accepted_names_are_safe_in_a_url_path(s in "\\PC{0,300}") {
            if is_dns_subdomain(&s) {
                prop_assert!(s.len() <= MAX_SUBDOMAIN_LEN);
                prop_assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
            }
            if is_dns_label(&s) {
                prop_assert!(is_dns_subdomain(&s));
                prop_assert!(!s.contains('.'));
            }
        }
    }
}
