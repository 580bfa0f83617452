//! When and how long to wait before trying a request again: exponential backoff with
//! jitter, a server's `Retry-After` taking precedence, bounded in attempts and time.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// How a caller retries transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No retry is started that would begin later than this after the first attempt.
    pub max_elapsed: Duration,
    /// The wait before the second attempt (before jitter).
    pub base: Duration,
    /// The longest backoff wait (a `Retry-After` may ask for more, within `max_elapsed`).
    pub cap: Duration,
}

impl RetryPolicy {
    /// For the model APIs: rate limits and overloads can take a while to clear.
    pub const MODEL: Self = Self {
        max_attempts: 6,
        max_elapsed: Duration::from_secs(300),
        base: Duration::from_millis(1000),
        cap: Duration::from_secs(60),
    };

    /// For the runner API: the apiserver is near, a blip is short.
    pub const RUNNER: Self = Self {
        max_attempts: 6,
        max_elapsed: Duration::from_secs(30),
        base: Duration::from_millis(200),
        cap: Duration::from_secs(5),
    };

    /// The backoff before attempt `attempt + 1`, `attempt` counting from 1.
    /// `jitter` in `[0, 1)` spreads the wait over its upper half (equal jitter), so
    /// retrying clients do not stampede together yet the wait still grows.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(20);
        let full = self
            .base
            .saturating_mul(1u32 << exponent)
            .min(self.cap)
            .as_secs_f64();
        Duration::from_secs_f64(full / 2.0 + full / 2.0 * jitter.clamp(0.0, 1.0))
    }

    /// The wait before the next attempt after `attempt` attempts that took `elapsed` in
    /// all, or `None` when the policy says give up.
    pub fn next_delay(
        &self,
        attempt: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let delay = retry_after.unwrap_or_else(|| self.backoff(attempt, jitter));
        (elapsed + delay <= self.max_elapsed).then_some(delay)
    }
}

/// A random jitter in `[0, 1)`.
pub fn jitter() -> f64 {
    rand::random::<f64>()
}

/// Statuses that mean "try again later": 408, 429 and every 5xx (Anthropic's 529
/// overloaded included).
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
        || status.as_u16() == 529
}

/// `Retry-After` as a number of seconds (fractions allowed). The HTTP-date form and
/// nonsense give `None`, and the caller falls back to its own backoff.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let seconds: f64 = value.parse().ok()?;
    (0.0..=24.0 * 3600.0)
        .contains(&seconds)
        .then(|| Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        max_elapsed: Duration::from_secs(10),
        base: Duration::from_secs(1),
        cap: Duration::from_secs(4),
    };

    #[test]
    fn backoff_doubles_up_to_the_cap_within_its_jitter_band() {
        assert_eq!(POLICY.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(POLICY.backoff(1, 1.0), Duration::from_secs(1));
        assert_eq!(POLICY.backoff(2, 1.0), Duration::from_secs(2));
        assert_eq!(POLICY.backoff(3, 1.0), Duration::from_secs(4));
        assert_eq!(POLICY.backoff(9, 1.0), Duration::from_secs(4));
        assert_eq!(POLICY.backoff(9, 0.0), Duration::from_secs(2));
        // No overflow however many attempts.
        assert_eq!(POLICY.backoff(u32::MAX, 0.5), Duration::from_secs(3));
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        assert_eq!(
            POLICY.next_delay(1, Duration::ZERO, Some(Duration::from_secs(3)), 0.0),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            POLICY.next_delay(1, Duration::ZERO, None, 1.0),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn gives_up_on_attempts_or_time() {
        assert_eq!(POLICY.next_delay(4, Duration::ZERO, None, 0.0), None);
        assert_eq!(
            POLICY.next_delay(1, Duration::from_secs(8), Some(Duration::from_secs(3)), 0.0),
            None
        );
        assert!(
            POLICY
                .next_delay(3, Duration::from_secs(5), None, 0.0)
                .is_some()
        );
    }

    #[test]
    fn retryable_statuses() {
        for code in [408, 429, 500, 502, 503, 504, 529] {
            assert!(
                is_retryable_status(StatusCode::from_u16(code).expect("a status")),
                "{code}"
            );
        }
        for code in [200, 400, 401, 403, 404, 409, 413, 422] {
            assert!(
                !is_retryable_status(StatusCode::from_u16(code).expect("a status")),
                "{code}"
            );
        }
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(
            http::header::RETRY_AFTER,
            "7".parse().expect("a header value"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            http::header::RETRY_AFTER,
            "0.5".parse().expect("a header value"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(500)));
        for nonsense in ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "soon", "1e12"] {
            headers.insert(
                http::header::RETRY_AFTER,
                nonsense.parse().expect("a header value"),
            );
            assert_eq!(retry_after(&headers), None, "{nonsense}");
        }
    }
}
