//! Per-caller rate limits on certificate requests: each authenticated
//! caller has a token bucket (`per_second` refill, `burst` capacity), so
//! one identity that asks in a loop gets RESOURCE_EXHAUSTED while every
//! other caller is served as before.
//!
//! A caller is its identity and, when its credential is bound to one, its
//! pod (else its node): every node's ztunnel runs as the same service
//! account, and a node agent restarting on one node must not use up the
//! budget of the agents on the others. Buckets that are full again are
//! dropped (a full bucket is what a new caller gets), so memory follows the
//! callers active in the last `burst / per_second` seconds.
//!
//! Pure: the caller passes the time, so the arithmetic is table-tested.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use api::SpiffeId;

use crate::auth::Caller;

/// The budget of each caller; part of the CA's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallerRateLimit {
    /// Requests a caller may make per second, sustained.
    pub per_second: f64,
    /// Requests a caller may make at once (a node agent starting with a
    /// node full of pods asks for one certificate per identity).
    pub burst: u32,
}

impl CallerRateLimit {
    /// A ztunnel on a node at Kubernetes' default pod limit (110) asks for
    /// at most that many identities at start, then one renewal per
    /// identity per half certificate lifetime: a burst of 200 and 10 per
    /// second never delay it. Upstream istiod has no per-caller limit.
    pub const DEFAULT: CallerRateLimit = CallerRateLimit {
        per_second: 10.0,
        burst: 200,
    };
}

impl Default for CallerRateLimit {
    fn default() -> Self {
        CallerRateLimit::DEFAULT
    }
}

/// Who a bucket belongs to.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CallerKey {
    identity: SpiffeId,
    /// The caller's pod (name and uid) or node, when its credential names one.
    instance: Option<String>,
}

impl CallerKey {
    fn of(caller: &Caller) -> Self {
        let instance = match (&caller.pod, &caller.node) {
            (Some(pod), _) => Some(format!("pod {}/{}", pod.name, pod.uid)),
            (None, Some(node)) => Some(format!("node {node}")),
            (None, None) => None,
        };
        CallerKey {
            identity: caller.identity.clone(),
            instance,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Buckets are swept of full ones once the map holds this many.
const SWEEP_AT: usize = 1024;

/// The buckets of every caller.
#[derive(Debug)]
pub struct RateLimiter {
    limit: CallerRateLimit,
    buckets: HashMap<CallerKey, Bucket>,
    sweep_at: usize,
}

impl RateLimiter {
    pub fn new(limit: CallerRateLimit) -> Self {
        RateLimiter {
            limit,
            buckets: HashMap::new(),
            sweep_at: SWEEP_AT,
        }
    }

    /// Takes a token from `caller`'s bucket at `now`; `Err(wait)` (how long
    /// until the next one) when it is empty.
    pub fn take(&mut self, caller: &Caller, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() >= self.sweep_at {
            self.sweep(now);
        }
        let limit = self.limit;
        let capacity = f64::from(limit.burst);
        let bucket = self.buckets.entry(CallerKey::of(caller)).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        bucket.refill(now, limit);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        // A rate so small the wait overflows a Duration: "never".
        let wait = Duration::try_from_secs_f64((1.0 - bucket.tokens) / limit.per_second)
            .unwrap_or(Duration::MAX);
        Err(wait)
    }

    /// Drops the buckets that are full at `now`; if that frees too little,
    /// the next sweep waits until the map has doubled.
    fn sweep(&mut self, now: Instant) {
        let limit = self.limit;
        self.buckets.retain(|_, bucket| {
            bucket.refill(now, limit);
            bucket.tokens < f64::from(limit.burst)
        });
        self.sweep_at = (self.buckets.len() * 2).max(SWEEP_AT);
    }

    /// How many callers have a bucket that is not full (for tests).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

impl Bucket {
    fn refill(&mut self, now: Instant, limit: CallerRateLimit) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * limit.per_second).min(f64::from(limit.burst));
        self.updated = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::CallerPod;

    fn caller(sa: &str, node: Option<&str>) -> Caller {
        Caller {
            identity: SpiffeId::new("cluster.local", "ns", sa).unwrap(),
            pod: None,
            node: node.map(str::to_string),
        }
    }

    const LIMIT: CallerRateLimit = CallerRateLimit {
        per_second: 2.0,
        burst: 3,
    };

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        let a = caller("a", None);
        for _ in 0..3 {
            assert_eq!(limiter.take(&a, t0), Ok(()));
        }
        assert_eq!(limiter.take(&a, t0), Err(Duration::from_millis(500)));
        // Half a second later: one token back, one request.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.take(&a, t1), Ok(()));
        assert!(limiter.take(&a, t1).is_err());
        // Long idle: back to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.take(&a, t2), Ok(()));
        }
        assert!(limiter.take(&a, t2).is_err());
    }

    #[test]
    fn a_vanishing_rate_means_never_not_a_panic() {
        let mut limiter = RateLimiter::new(CallerRateLimit {
            per_second: 1e-300,
            burst: 1,
        });
        let now = Instant::now();
        let a = caller("a", None);
        assert_eq!(limiter.take(&a, now), Ok(()));
        assert_eq!(limiter.take(&a, now), Err(Duration::MAX));
    }

    #[test]
    fn callers_do_not_share_a_bucket() {
        let mut limiter = RateLimiter::new(LIMIT);
        let now = Instant::now();
        let hog = caller("hog", None);
        while limiter.take(&hog, now).is_ok() {}
        assert_eq!(limiter.take(&caller("other", None), now), Ok(()));
        // ztunnels share a service account, not a bucket: each node has its own.
        let ztunnel_a = caller("ztunnel", Some("node-a"));
        while limiter.take(&ztunnel_a, now).is_ok() {}
        assert_eq!(
            limiter.take(&caller("ztunnel", Some("node-b")), now),
            Ok(())
        );
        // So does each pod of one service account.
        let pod = |name: &str, uid: &str| Caller {
            pod: Some(CallerPod {
                name: name.into(),
                uid: uid.into(),
            }),
            ..caller("waypoint", None)
        };
        while limiter.take(&pod("w-1", "u1"), now).is_ok() {}
        assert_eq!(limiter.take(&pod("w-2", "u2"), now), Ok(()));
    }

    #[test]
    fn full_buckets_are_forgotten() {
        let mut limiter = RateLimiter::new(LIMIT);
        let t0 = Instant::now();
        for i in 0..SWEEP_AT {
            limiter.take(&caller(&format!("c{i}"), None), t0).unwrap();
        }
        assert_eq!(limiter.tracked(), SWEEP_AT);
        // Once every bucket has refilled, the next request sweeps them.
        let later = t0 + Duration::from_secs(10);
        limiter.take(&caller("new", None), later).unwrap();
        assert_eq!(limiter.tracked(), 1);
    }
}
