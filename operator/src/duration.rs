//! Durations as people write them in flags and annotations: `90s`, `10m`, `1h`, `1h30m`.

use std::{fmt, str::FromStr, time::Duration};

/// A duration parsed from `<n>h`, `<n>m`, `<n>s`, `<n>ms` parts (`1h30m`, `90s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a duration: write it like 90s, 10m, 1h or 1h30m")]
pub struct DurationError {
    input: String,
}

/// The longest duration accepted, so that adding it to a timestamp cannot overflow.
const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError {
            input: s.to_owned(),
        };
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(err());
        }
        let mut total = Duration::ZERO;
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
            if digits == 0 {
                return Err(err());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| err())?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let part = match &rest[..unit_len] {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(err)?),
                "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(err)?),
                _ => return Err(err()),
            };
            rest = &rest[unit_len..];
            total = total.checked_add(part).ok_or_else(err)?;
        }
        if total > MAX {
            return Err(err());
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_millis() != 0 {
            write!(f, "{}ms", self.0.as_millis())
        } else if secs != 0 && secs.is_multiple_of(3600) {
            write!(f, "{}h", secs / 3600)
        } else if secs != 0 && secs.is_multiple_of(60) {
            write!(f, "{}m", secs / 60)
        } else {
            write!(f, "{secs}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<Duration> {
        s.parse::<HumanDuration>().ok().map(|d| d.0)
    }

    #[test]
    fn units_parse() {
        assert_eq!(parse("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse(" 3s "), Some(Duration::from_secs(3)));
        assert_eq!(parse("0s"), Some(Duration::ZERO));
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "",
            "s",
            "10",
            "10x",
            "-5s",
            "1.5h",
            "m10",
            "10 m",
            "99999999999999999999h",
            "9000h",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["90s", "10m", "1h", "250ms", "0s"] {
            let d: HumanDuration = s.parse().expect("parses");
            assert_eq!(d.to_string(), s);
        }
    }
}
