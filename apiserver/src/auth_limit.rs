//! Per-client-address limit on the Kubernetes reviews (TokenReview, SubjectAccessReview)
//! that callers of the read API can cause. Every review a request needs takes one token
//! from its address's bucket before the call; a request that turns out allowed gives it
//! back. So denied callers (random bearer tokens, names they may not read) spend at most
//! the burst and then the refill rate of reviews per address, and allowed ones spend
//! nothing.
//!
//! The map of buckets is bounded: past its capacity, new addresses share one overflow
//! bucket. IPv6 clients are keyed by their /64, which one host usually holds whole.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use crate::rate_limit::{RateLimit, RetryAfter, TokenBucket};

/// The most addresses with a bucket of their own.
pub(crate) const DEFAULT_CAPACITY: usize = 10_000;

/// The key of a client address: IPv4 as is, IPv6 by its /64.
pub(crate) fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Token buckets of review attempts by client address.
#[derive(Debug)]
pub(crate) struct ReviewLimiter {
    limit: RateLimit,
    capacity: usize,
    buckets: HashMap<IpAddr, TokenBucket>,
    overflow: TokenBucket,
}

impl ReviewLimiter {
    /// Buckets of shape `limit`, for at most `capacity` addresses.
    pub(crate) fn new(limit: RateLimit, capacity: usize, now: Instant) -> Self {
        Self {
            limit,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            overflow: TokenBucket::new(limit, now),
        }
    }

    /// Takes one review attempt for `ip`, or says when the next one is possible.
    pub(crate) fn try_acquire(&mut self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        let key = client_key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.capacity {
            self.prune(now);
        }
        let limit = self.limit;
        let bucket = if self.buckets.contains_key(&key) || self.buckets.len() < self.capacity {
            self.buckets
                .entry(key)
                .or_insert_with(|| TokenBucket::new(limit, now))
        } else {
            &mut self.overflow
        };
        bucket.try_acquire(now).map(|_| ())
    }

    /// Gives back the attempt of a request that was allowed.
    pub(crate) fn give_back(&mut self, ip: IpAddr) {
        match self.buckets.get_mut(&client_key(ip)) {
            Some(bucket) => bucket.give_back(),
            None => self.overflow.give_back(),
        };
    }

    /// Forgets the buckets that refilled: a new one would be the same.
    pub(crate) fn prune(&mut self, now: Instant) {
        let capacity = self.limit.capacity();
        self.buckets
            .retain(|_, bucket| bucket.remaining(now) < capacity);
    }

    /// How many addresses have a bucket of their own.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address has a bucket of its own.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(burst: u32, per_second: f64, capacity: usize, now: Instant) -> ReviewLimiter {
        ReviewLimiter::new(
            RateLimit::new(burst, per_second).expect("a valid limit"),
            capacity,
            now,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("an address")
    }

    #[test]
    fn an_address_gets_its_burst_then_waits_and_allowed_requests_cost_nothing() {
        let t0 = Instant::now();
        let mut limiter = limiter(3, 1.0, 10, t0);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(limiter.try_acquire(a, t0).is_ok());
        }
        let retry = limiter.try_acquire(a, t0).expect_err("spent");
        assert_eq!(retry.seconds(), 1);
        // Another address is not affected.
        assert!(limiter.try_acquire(ip("192.0.2.2"), t0).is_ok());
        // An allowed request gives its attempt back.
        limiter.give_back(a);
        assert!(limiter.try_acquire(a, t0).is_ok());
        assert!(limiter.try_acquire(a, t0).is_err());
        assert!(limiter.try_acquire(a, t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_64_and_mapped_v4_is_v4() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        let t0 = Instant::now();
        let mut limiter = limiter(1, 0.001, 10, t0);
        assert!(limiter.try_acquire(ip("2001:db8::1"), t0).is_ok());
        assert!(limiter.try_acquire(ip("2001:db8::ffff:2"), t0).is_err());
    }

    #[test]
    fn the_map_is_bounded_and_newcomers_share_the_overflow_bucket() {
        let t0 = Instant::now();
        let mut limiter = limiter(2, 0.001, 3, t0);
        for i in 0..1000 {
            let _ = limiter.try_acquire(IpAddr::from([10, 0, (i / 256) as u8, i as u8]), t0);
        }
        assert_eq!(limiter.len(), 3);
        // The overflow bucket is spent by the flood: a new address waits too.
        assert!(limiter.try_acquire(ip("198.51.100.1"), t0).is_err());
        // Once the buckets refilled, they are forgotten and addresses get their own again.
        let later = t0 + Duration::from_secs(10_000);
        assert!(limiter.try_acquire(ip("198.51.100.1"), later).is_ok());
        assert_eq!(limiter.len(), 1);
        limiter.prune(later + Duration::from_secs(10_000));
        assert!(limiter.is_empty());
    }
}
