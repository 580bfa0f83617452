//! Per-Agent rate limiting: a token bucket per key, driven by explicit `Instant`s so it is
//! tested without sleeping, and the `X-RateLimit-*` / `Retry-After` header values.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};

/// `X-RateLimit-Limit`: the bucket's capacity.
pub(crate) const LIMIT_HEADER: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`: whole tokens left after this request.
pub(crate) const REMAINING_HEADER: HeaderName = HeaderName::from_static("x-ratelimit-remaining");

/// A bucket's shape: how many requests may come at once and how fast the allowance
/// comes back.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    capacity: u32,
    per_second: f64,
}

/// A rate limit that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    /// No request could ever pass.
    #[error("the rate-limit burst must be at least 1")]
    ZeroCapacity,
    /// The bucket would never refill.
    #[error("the rate limit must be a positive, finite number of requests per second")]
    BadRate,
}

impl RateLimit {
    /// A bucket of `capacity` requests refilled at `per_second` requests per second.
    pub fn new(capacity: u32, per_second: f64) -> Result<Self, RateLimitError> {
        if capacity == 0 {
            return Err(RateLimitError::ZeroCapacity);
        }
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(RateLimitError::BadRate);
        }
        Ok(Self {
            capacity,
            per_second,
        })
    }

    /// The burst size, which is what `X-RateLimit-Limit` reports.
    pub(crate) fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// Whole requests left in the bucket after an accepted one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Remaining(pub u32);

/// How long until the next request would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for `Retry-After`, rounded up (and at least 1), so a client that
    /// obeys it is never refused again for being early.
    pub(crate) fn seconds(&self) -> u64 {
        let d = self.0;
        let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        whole.max(1)
    }
}

/// The `X-RateLimit-Limit` and `X-RateLimit-Remaining` headers of an answer.
pub(crate) fn rate_limit_headers(limit: u32, remaining: u32) -> [(HeaderName, HeaderValue); 2] {
    [
        (LIMIT_HEADER, HeaderValue::from(limit)),
        (REMAINING_HEADER, HeaderValue::from(remaining)),
    ]
}

/// One token bucket. It starts full.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    limit: RateLimit,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(limit: RateLimit, now: Instant) -> Self {
        Self {
            limit,
            tokens: f64::from(limit.capacity),
            updated: now,
        }
    }

    /// Takes one token, or says how long until one is there. An `Instant` earlier than
    /// the last one seen adds nothing (time never runs backwards for the bucket).
    pub(crate) fn try_acquire(&mut self, now: Instant) -> Result<Remaining, RetryAfter> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            // Floor: never promise a request that would be refused.
            Ok(Remaining(self.tokens as u32))
        } else {
            let missing = 1.0 - self.tokens;
            Err(RetryAfter(Duration::from_secs_f64(
                missing / self.limit.per_second,
            )))
        }
    }

    /// Puts back a token taken for a request that turned out not to count; never above
    /// the capacity. Returns the whole tokens now in the bucket.
    pub(crate) fn give_back(&mut self) -> u32 {
        self.tokens = (self.tokens + 1.0).min(f64::from(self.limit.capacity));
        self.tokens as u32
    }

    /// Whole tokens in the bucket at `now`, without taking one.
    pub(crate) fn remaining(&mut self, now: Instant) -> u32 {
        self.refill(now);
        self.tokens as u32
    }

    /// Whether the bucket is full at `now`, so forgetting it changes nothing.
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= f64::from(self.limit.capacity)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated);
        if now > self.updated {
            self.updated = now;
        }
        let capacity = f64::from(self.limit.capacity);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.limit.per_second).min(capacity);
    }
}

/// A token bucket per key (an Agent's `namespace/name`). Not synchronised: the server
/// holds it behind a mutex, never across an `.await`.
#[derive(Clone, Debug)]
pub struct RateLimiter<K> {
    limit: RateLimit,
    buckets: HashMap<K, TokenBucket>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// Every key gets a bucket of this shape.
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: HashMap::new(),
        }
    }

    /// The shape of every bucket.
    pub(crate) fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one token from `key`'s bucket. The key is copied only for a new bucket.
    pub(crate) fn try_acquire(&mut self, key: &K, now: Instant) -> Result<Remaining, RetryAfter> {
        if let Some(bucket) = self.buckets.get_mut(key) {
            return bucket.try_acquire(now);
        }
        let mut bucket = TokenBucket::new(self.limit, now);
        let taken = bucket.try_acquire(now);
        self.buckets.insert(key.clone(), bucket);
        taken
    }

    /// Puts back a token taken from `key`'s bucket for a request that was refused later
    /// on; nothing when the bucket is gone (it was full, so nothing is owed).
    pub(crate) fn give_back(&mut self, key: &K) {
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.give_back();
        }
    }

    /// Forgets buckets that have refilled completely: a new bucket would be the same, and
    /// keys of deleted Agents must not pile up.
    pub(crate) fn prune(&mut self, now: Instant) {
        self.buckets.retain(|_, bucket| !bucket.is_full(now));
    }

    /// How many keys have a bucket.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key has a bucket.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(capacity: u32, per_second: f64) -> RateLimit {
        RateLimit::new(capacity, per_second).expect("a valid limit")
    }

    #[test]
    fn bad_limits_are_refused() {
        assert_eq!(RateLimit::new(0, 1.0), Err(RateLimitError::ZeroCapacity));
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(
                RateLimit::new(1, rate),
                Err(RateLimitError::BadRate),
                "{rate}"
            );
        }
    }

    #[test]
    fn a_token_given_back_counts_again_up_to_the_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(2, 0.001), t0);
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(1)));
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(0)));
        assert_eq!(bucket.give_back(), 1);
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(0)));
        assert_eq!(bucket.give_back(), 1);
        assert_eq!(bucket.give_back(), 2);
        assert_eq!(bucket.give_back(), 2, "never above the capacity");
    }

    #[test]
    fn a_burst_then_refusal_with_retry_after() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(3, 0.5), t0);
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(2)));
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(1)));
        assert_eq!(bucket.try_acquire(t0), Ok(Remaining(0)));
        // Empty; one token takes 2 s at 0.5/s.
        let retry = bucket.try_acquire(t0).expect_err("empty");
        assert_eq!(retry, RetryAfter(Duration::from_secs(2)));
        assert_eq!(retry.seconds(), 2);
        // 1.5 s later, half a second is still missing: Retry-After rounds up to 1.
        let retry = bucket
            .try_acquire(t0 + Duration::from_millis(1500))
            .expect_err("still empty");
        assert_eq!(retry.0, Duration::from_millis(500));
        assert_eq!(retry.seconds(), 1);
        // At 2 s a token is back, exactly.
        assert_eq!(
            bucket.try_acquire(t0 + Duration::from_secs(2)),
            Ok(Remaining(0))
        );
    }

    #[test]
    fn refill_is_capped_at_capacity() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(2, 10.0), t0);
        assert!(bucket.try_acquire(t0).is_ok());
        assert!(bucket.try_acquire(t0).is_ok());
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.remaining(later), 2);
        assert_eq!(bucket.try_acquire(later), Ok(Remaining(1)));
    }

    #[test]
    fn time_never_runs_backwards() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        let mut bucket = TokenBucket::new(limit(1, 1.0), t1);
        assert!(bucket.try_acquire(t1).is_ok());
        // An earlier reading neither refills nor panics...
        assert!(bucket.try_acquire(t0).is_err());
        // ...and does not move the clock back, so a later one refills from t1.
        assert!(bucket.try_acquire(t1 + Duration::from_millis(999)).is_err());
        assert!(bucket.try_acquire(t1 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn retry_after_rounds_up_and_is_at_least_one() {
        assert_eq!(RetryAfter(Duration::ZERO).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_nanos(1)).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_secs(1)).seconds(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(1001)).seconds(), 2);
        assert_eq!(RetryAfter(Duration::from_secs(60)).seconds(), 60);
        assert_eq!(RetryAfter(Duration::from_millis(2500)).seconds(), 3);
    }

    #[test]
    fn header_values() {
        let [(limit_name, limit), (remaining_name, remaining)] = rate_limit_headers(60, 59);
        assert_eq!(limit_name.as_str(), "x-ratelimit-limit");
        assert_eq!(limit, "60");
        assert_eq!(remaining_name.as_str(), "x-ratelimit-remaining");
        assert_eq!(remaining, "59");
    }

    #[test]
    fn keys_have_separate_buckets_and_full_ones_are_pruned() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(1, 1.0));
        assert!(limiter.try_acquire(&"team-a/one", t0).is_ok());
        assert!(limiter.try_acquire(&"team-a/one", t0).is_err());
        assert!(limiter.try_acquire(&"team-a/two", t0).is_ok());
        assert_eq!(limiter.len(), 2);
        limiter.prune(t0 + Duration::from_millis(500));
        assert_eq!(limiter.len(), 2);
        limiter.prune(t0 + Duration::from_secs(1));
        assert!(limiter.is_empty());
        assert_eq!(limiter.limit().capacity(), 1);
    }

    #[test]
    fn a_token_given_back_is_taken_again_by_its_key_only() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(limit(1, 1.0));
        assert_eq!(limiter.try_acquire(&"a", t0), Ok(Remaining(0)));
        assert!(limiter.try_acquire(&"a", t0).is_err());
        limiter.give_back(&"a");
        assert_eq!(limiter.try_acquire(&"a", t0), Ok(Remaining(0)));
        assert!(limiter.try_acquire(&"a", t0).is_err());
        // A key without a bucket owes nothing: giving back creates none.
        limiter.give_back(&"b");
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn sustained_rate_matches_the_limit() {
        // 10/s with a burst of 5: over 10 s of one request every 10 ms, 5 + 100 pass.
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(limit(5, 10.0), t0);
        let passed = (0..1000)
            .filter(|i| {
                bucket
                    .try_acquire(t0 + Duration::from_millis(10 * i))
                    .is_ok()
            })
            .count();
        assert!((104..=106).contains(&passed), "{passed}");
    }
}
