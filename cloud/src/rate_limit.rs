//! Leaky-bucket rate limits: one bucket per client address (checked before authentication, so
//! floods of bad tokens are limited too) and one per terminal (checked after it).
//!
//! Buckets live in a bounded map kept in recency order (`hashlink::LruCache`): a request moves
//! its bucket to the back in O(1); when the map is full the least recently used bucket goes,
//! also O(1), so an attacker cycling addresses cannot grow memory without bound, and a fleet of
//! 100 000 keys costs the same per request as ten. Idle buckets are dropped from the front
//! (oldest first) until the first one still in use: O(dropped), never a scan of the whole map.
//! An evicted bucket comes back full, which only ever errs on the side of admitting.

use hashlink::LruCache;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use leaky_bucket::RateLimiter;

/// The knobs of one kind of bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests admitted at once from a full bucket.
    pub burst: u32,
}

impl Default for RateLimit {
    /// docs/rate-limits.md defaults: 20 requests/s, burst 40.
    fn default() -> Self {
        RateLimit {
            per_second: 20,
            burst: 40,
        }
    }
}

impl RateLimit {
    /// Refill schedule as `(tokens, every)`. leaky-bucket counts intervals in whole
    /// milliseconds, so rates above 1000/s refill several tokens per millisecond. A zero rate
    /// is treated as one per second so a bad flag cannot make a bucket that never refills.
    fn refill(&self) -> (usize, Duration) {
        let rate = u64::from(self.per_second.max(1));
        if rate <= 1000 {
            (1, Duration::from_millis(1000 / rate))
        } else {
            ((rate / 1000) as usize, Duration::from_millis(1))
        }
    }

    fn bucket(&self) -> RateLimiter {
        let burst = self.burst.max(1) as usize;
        let (tokens, every) = self.refill();
        RateLimiter::builder()
            .max(burst)
            .initial(burst)
            .refill(tokens)
            .interval(every)
            .build()
    }

    /// Whole seconds (≥ 1) after which one token will be back.
    pub fn retry_after_secs(&self) -> u64 {
        let (tokens, every) = self.refill();
        (every.as_secs_f64() / tokens as f64).ceil().max(1.0) as u64
    }
}

struct Slot {
    bucket: RateLimiter,
    last_used: Instant,
}

/// A bounded set of buckets keyed by `K` (an address or a terminal id).
pub struct Buckets<K: Eq + Hash> {
    limit: RateLimit,
    idle_after: Duration,
    slots: Mutex<LruCache<K, Slot>>,
}

/// Whether a request may proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A token was taken.
    Admitted,
    /// The bucket is empty; retry after this many whole seconds.
    Refused {
        /// `Retry-After` value.
        retry_after_secs: u64,
    },
}

impl<K: Eq + Hash + Clone> Buckets<K> {
    /// `capacity` bounds the number of keys tracked; buckets unused for `idle_after` are
    /// dropped first when room is needed.
    pub fn new(limit: RateLimit, capacity: usize, idle_after: Duration) -> Self {
        Buckets {
            limit,
            idle_after,
            slots: Mutex::new(LruCache::new(capacity.max(1))),
        }
    }

    /// Takes one token from `key`'s bucket.
    pub fn check(&self, key: &K) -> Admission {
        let now = Instant::now();
        // A poisoned lock only means another thread panicked mid-update; the map is still
        // usable, and refusing all traffic would be worse.
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::drop_idle(&mut slots, now, self.idle_after);
        // `get_mut` moves the key to the most recent end; a new key goes there too, pushing the
        // least recently used one out when the cache is full.
        if slots.get_mut(key).is_none() {
            slots.insert(
                key.clone(),
                Slot {
                    bucket: self.limit.bucket(),
                    last_used: now,
                },
            );
        }
        let Some(slot) = slots.get_mut(key) else {
            return Admission::Admitted;
        };
        slot.last_used = now;
        if slot.bucket.try_acquire(1) {
            Admission::Admitted
        } else {
            Admission::Refused {
                retry_after_secs: self.limit.retry_after_secs(),
            }
        }
    }

    /// Drops idle buckets from the least recently used end: the order is by last use, so the
    /// first bucket still in use ends the walk.
    fn drop_idle(slots: &mut LruCache<K, Slot>, now: Instant, idle_after: Duration) {
        // `iter` runs from the least recently used end.
        while slots
            .iter()
            .next()
            .is_some_and(|(_, s)| now.duration_since(s.last_used) >= idle_after)
        {
            slots.remove_lru();
        }
    }

    /// Drops buckets idle for longer than `idle_after` (called periodically).
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::drop_idle(&mut slots, now, self.idle_after);
    }

    /// Number of buckets tracked now.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no bucket is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_admitted_then_refused_with_retry_after() {
        let b = Buckets::new(
            RateLimit {
                per_second: 1,
                burst: 3,
            },
            10,
            Duration::from_secs(60),
        );
        for _ in 0..3 {
            assert_eq!(b.check(&"a"), Admission::Admitted);
        }
        assert_eq!(
            b.check(&"a"),
            Admission::Refused {
                retry_after_secs: 1
            }
        );
        // Another key has its own bucket.
        assert_eq!(b.check(&"b"), Admission::Admitted);
    }

    #[test]
    fn map_stays_bounded_by_capacity() {
        let b = Buckets::new(RateLimit::default(), 4, Duration::from_secs(60));
        for i in 0..100 {
            b.check(&i);
        }
        assert!(b.len() <= 4, "{}", b.len());
    }

    #[test]
    fn the_least_recently_used_key_goes_first() {
        let b = Buckets::new(
            RateLimit {
                per_second: 1,
                burst: 2,
            },
            3,
            Duration::from_secs(60),
        );
        for k in [1, 2, 3] {
            b.check(&k);
        }
        b.check(&1); // 1 is now the most recent: 2 is the oldest
        assert_eq!(
            b.check(&1),
            Admission::Refused {
                retry_after_secs: 1
            }
        );
        b.check(&4); // evicts 2
        assert_eq!(b.len(), 3);
        // 1 kept its (empty) bucket; 2 comes back full
        assert_eq!(
            b.check(&1),
            Admission::Refused {
                retry_after_secs: 1
            }
        );
        assert_eq!(b.check(&2), Admission::Admitted);
    }

    #[test]
    fn idle_buckets_are_swept() {
        let b = Buckets::new(RateLimit::default(), 4, Duration::ZERO);
        b.check(&1);
        b.sweep();
        assert!(b.is_empty());
    }

    #[test]
    fn any_rate_builds_a_valid_bucket() {
        for per_second in [0, 1, 3, 20, 999, 1000, 1001, 100_000, u32::MAX] {
            let l = RateLimit {
                per_second,
                burst: 1,
            };
            let (tokens, every) = l.refill();
            assert!(tokens >= 1 && every.as_millis() >= 1, "{per_second}");
            let _ = l.bucket();
        }
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(RateLimit::default().retry_after_secs(), 1);
        assert_eq!(
            RateLimit {
                per_second: 0,
                burst: 1
            }
            .retry_after_secs(),
            1
        );
    }
}
