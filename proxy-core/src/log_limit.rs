//! Bounded logging for warnings a peer can trigger at will (a refused
//! request, an accept failing at file-descriptor exhaustion): each call site
//! keeps a [`LogLimit`] and logs at most once per interval, saying how many
//! occurrences it left out since the last line. Metrics still count every
//! occurrence; only the log lines are bounded.
//!
//! ```
//! use std::time::Duration;
//! use proxy_core::log_limit::LogLimit;
//!
//! static ACCEPT_FAILED: LogLimit = LogLimit::new(Duration::from_secs(10));
//! if let Some(suppressed) = ACCEPT_FAILED.allow() {
//!     tracing::warn!(suppressed, "accept failed");
//! }
//! ```

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One call site's budget: a line per interval. `const`, so it can be a
/// `static` beside the code that logs.
#[derive(Debug)]
pub struct LogLimit {
    interval_ms: u64,
    /// Milliseconds since the process's reference instant at which the next
    /// line may be logged.
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl LogLimit {
    pub const fn new(interval: Duration) -> Self {
        LogLimit {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many
    /// were left out since the last logged one; `None` when it is left out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(self.interval_ms),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_what_was_left_out() {
        let limit = LogLimit::new(Duration::from_secs(10));
        assert_eq!(limit.allow_at(1_000), Some(0));
        for t in 1_001..1_006 {
            assert_eq!(limit.allow_at(t), None);
        }
        // Still inside the interval.
        assert_eq!(limit.allow_at(10_999), None);
        // The next line reports the six left out.
        assert_eq!(limit.allow_at(11_000), Some(6));
        assert_eq!(limit.allow_at(11_001), None);
        // A quiet period: the next occurrence is logged at once.
        assert_eq!(limit.allow_at(60_000), Some(1));
    }

    #[test]
    fn concurrent_callers_let_exactly_one_line_through() {
        static LIMIT: LogLimit = LogLimit::new(Duration::from_secs(3600));
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1000).filter(|_| LIMIT.allow().is_some()).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(allowed, 1);
        assert_eq!(LIMIT.suppressed.load(Ordering::Relaxed), 7999);
    }
}
