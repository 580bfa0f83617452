//! The one duration grammar of every flag and annotation of both binaries: `humantime`
//! durations (`500ms`, `10s`, `5m`, `1h`, `1h30m`), or a bare number of seconds (`7`).

use std::{fmt, str::FromStr, time::Duration};

/// A duration as people write it in flags and annotations: `500ms`, `10s`, `5m`, `1h`,
/// `1h30m` (any unit `humantime` knows), or a bare number meaning seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlagDuration(pub Duration);

/// Why a duration did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "{input:?} is not a duration: write it like 500ms, 10s, 5m, 1h or 1h30m (a bare number means seconds)"
    )]
    Syntax { input: String },
    #[error("{input:?} is longer than the longest duration accepted, 365 days")]
    TooLong { input: String },
    #[error("{input:?} is zero: use a positive duration")]
    Zero { input: String },
}

/// The longest duration accepted, so that adding it to a timestamp cannot overflow.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

impl FlagDuration {
    /// Parses a duration that must be longer than zero (timeouts, lease durations).
    pub fn parse_positive(s: &str) -> Result<Self, DurationError> {
        let d: Self = s.parse()?;
        if d.0.is_zero() {
            return Err(DurationError::Zero {
                input: s.trim().to_owned(),
            });
        }
        Ok(d)
    }
}

impl FromStr for FlagDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        let syntax = || DurationError::Syntax {
            input: input.to_owned(),
        };
        if input.is_empty() {
            return Err(syntax());
        }
        let duration = if input.bytes().all(|b| b.is_ascii_digit()) {
            Duration::from_secs(input.parse().map_err(|_| syntax())?)
        } else {
            humantime::parse_duration(input).map_err(|_| syntax())?
        };
        if duration > MAX {
            return Err(DurationError::TooLong {
                input: input.to_owned(),
            });
        }
        Ok(Self(duration))
    }
}

/// Written back in the largest whole unit: `90s`, `10m`, `1h`, `250ms`.
impl fmt::Display for FlagDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs();
        if self.0.subsec_nanos() != 0 {
            write!(f, "{}", humantime::format_duration(self.0))
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
        s.parse::<FlagDuration>().ok().map(|d| d.0)
    }

    #[test]
    fn units_parse() {
        assert_eq!(parse("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse(" 3s "), Some(Duration::from_secs(3)));
        assert_eq!(parse("0s"), Some(Duration::ZERO));
        assert_eq!(parse("365days"), Some(MAX));
    }

    #[test]
    fn a_bare_number_is_seconds() {
        assert_eq!(parse("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse("0"), Some(Duration::ZERO));
        assert_eq!(parse(" 10 "), Some(Duration::from_secs(10)));
    }

    #[test]
    fn nonsense_is_refused() {
        for bad in [
            "",
            "s",
            "10x",
            "-5s",
            "-5",
            "m10",
            "ten seconds",
            "99999999999999999999",
            "99999999999999999999h",
            "9000h",
            "366days",
        ] {
            assert!(parse(bad).is_none(), "{bad:?} parsed");
        }
    }

    #[test]
    fn errors_name_the_input_and_what_is_accepted() {
        let error = "10x".parse::<FlagDuration>().expect_err("refused");
        let message = error.to_string();
        assert!(message.contains("\"10x\""), "{message}");
        assert!(message.contains("1h30m"), "{message}");
        assert!(message.contains("bare number means seconds"), "{message}");
        assert!(matches!(
            "9000h".parse::<FlagDuration>(),
            Err(DurationError::TooLong { .. })
        ));
    }

    #[test]
    fn positive_refuses_zero() {
        assert!(matches!(
            FlagDuration::parse_positive("0s"),
            Err(DurationError::Zero { .. })
        ));
        assert!(matches!(
            FlagDuration::parse_positive("0"),
            Err(DurationError::Zero { .. })
        ));
        assert_eq!(
            FlagDuration::parse_positive("1h").map(|d| d.0),
            Ok(Duration::from_secs(3600))
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["90s", "10m", "1h", "250ms", "0s"] {
            let d: FlagDuration = s.parse().expect("parses");
            assert_eq!(d.to_string(), s);
        }
    }
}
