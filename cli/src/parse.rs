//! Parsers of command-line values: `--env NAME=VALUE` and durations (the same grammar as
//! every hookrun flag and annotation).

use std::time::Duration;

use hookrun_crds::duration::FlagDuration;

/// `NAME=VALUE` of `--env`: a name of letters, digits and `_` not starting with a digit,
/// and not in the reserved `HOOKRUN_` prefix; the value may hold anything, `=` included.
pub fn env_pair(arg: &str) -> Result<(String, String), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!("{arg:?} is not NAME=VALUE"));
    };
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{name:?} is not an environment variable name: use letters, digits and _, not starting with a digit"
        ));
    }
    if name.starts_with("HOOKRUN_") {
        return Err(format!(
            "{name:?} is reserved: hookrun sets the HOOKRUN_ variables itself"
        ));
    }
    Ok((name.to_owned(), value.to_owned()))
}

/// A duration longer than zero: `500ms`, `10s`, `5m`, `1h30m`, or bare seconds.
pub fn positive_duration(arg: &str) -> Result<Duration, String> {
    FlagDuration::parse_positive(arg)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// A duration that may be zero (`--grace 0`: rotate at once).
pub fn duration(arg: &str) -> Result<Duration, String> {
    arg.parse::<FlagDuration>()
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

/// Whole seconds of a duration, at least one (a Grant's `ttlSeconds`).
pub fn whole_seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs().max(1)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_split_at_the_first_equals_sign() {
        assert_eq!(
            env_pair("TICKET=ENG-1=2"),
            Ok(("TICKET".into(), "ENG-1=2".into()))
        );
        assert_eq!(env_pair("_X="), Ok(("_X".into(), String::new())));
        assert!(
            env_pair("TICKET")
                .expect_err("refused")
                .contains("NAME=VALUE")
        );
        assert!(
            env_pair("1X=a")
                .expect_err("refused")
                .contains("not starting")
        );
        assert!(env_pair("A-B=a").expect_err("refused").contains("letters"));
        assert!(env_pair("=a").is_err());
        assert!(
            env_pair("HOOKRUN_SESSION=x")
                .expect_err("refused")
                .contains("reserved")
        );
    }

    #[test]
    fn durations_take_the_flag_grammar() {
        assert_eq!(positive_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(positive_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(positive_duration("7"), Ok(Duration::from_secs(7)));
        assert!(positive_duration("0").is_err());
        assert!(
            positive_duration("soon")
                .expect_err("refused")
                .contains("10s")
        );
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(whole_seconds(Duration::from_millis(500)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(3600)), 3600);
    }
}
