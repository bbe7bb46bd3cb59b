//! TokenReview answers, kept a short while: after an istiod restart every
//! ztunnel of the fleet reconnects at once and, per node, opens its xDS
//! stream and asks for the certificate of every pod it holds, all with the
//! same token. Without this, each of those requests is one TokenReview.
//!
//! - Keyed by the SHA-256 of the token: the token itself is never kept.
//! - Bounded: at most `capacity` entries; the oldest go first.
//! - Only **accepted** tokens are kept, for `ttl` and never beyond the
//!   token's own `exp` claim (read, not trusted: it can only shorten the
//!   lifetime). Rejections are not kept: a rejection can be transient (the
//!   API server checks a bound token's pod in its own cache, which may not
//!   have the pod yet), random bad tokens cannot be deduplicated anyway, and
//!   keeping them would let them push accepted tokens out. A client retrying
//!   with one bad token is paced by its own backoff.
//! - Requests with the same token while its review is under way wait for
//!   that one review and share its outcome, whatever it is.
//!
//! A cached acceptance outlives a revoked token by at most `ttl`. The CA's
//! node binding does not depend on it: the caller's pod is looked up in
//! the cluster state on every request.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures::future::{BoxFuture, FutureExt, Shared};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{AuthError, Caller};

type TokenHash = [u8; 32];

/// How a lookup was answered.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Lookup {
    /// A kept acceptance.
    hit,
    /// The review of the same token under way.
    shared,
    /// A new review.
    miss,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookupLabels {
    result: Lookup,
}

/// One review's outcome and until when it may be reused.
#[derive(Clone, Debug)]
struct Reviewed {
    result: Result<Caller, AuthError>,
    /// `None`: not reusable (a rejection or an error).
    reusable_until: Option<Instant>,
}

/// What the cache holds for a token.
enum Found {
    Kept(Result<Caller, AuthError>),
    UnderWay(Shared<BoxFuture<'static, Reviewed>>, u64),
    Stale,
}

struct Slot {
    /// Which insertion this is, so stale entries of `order` are recognised.
    seq: u64,
    review: Shared<BoxFuture<'static, Reviewed>>,
}

#[derive(Default)]
struct Entries {
    slots: HashMap<TokenHash, Slot>,
    /// Insertion order, oldest first; may hold stale `(hash, seq)` pairs.
    order: VecDeque<(TokenHash, u64)>,
    next_seq: u64,
}

impl Entries {
    fn insert(
        &mut self,
        key: TokenHash,
        review: Shared<BoxFuture<'static, Reviewed>>,
        capacity: usize,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.slots.insert(key, Slot { seq, review });
        self.order.push_back((key, seq));
        while self.slots.len() > capacity.max(1) {
            let Some((old, old_seq)) = self.order.pop_front() else {
                break;
            };
            if self.slots.get(&old).is_some_and(|s| s.seq == old_seq) {
                self.slots.remove(&old);
            }
        }
        // Replaced and removed entries leave stale pairs behind; drop them
        // before they outnumber the live ones.
        if self.order.len() > 2 * self.slots.len() + 16 {
            let slots = &self.slots;
            self.order
                .retain(|(k, s)| slots.get(k).is_some_and(|slot| slot.seq == *s));
        }
    }

    fn remove_if(&mut self, key: &TokenHash, seq: u64) {
        if self.slots.get(key).is_some_and(|s| s.seq == seq) {
            self.slots.remove(key);
        }
    }
}

/// Accepted tokens' callers, by token hash, for a short while.
pub struct ReviewCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<Entries>,
    lookups: Family<LookupLabels, Counter>,
}

impl std::fmt::Debug for ReviewCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewCache")
            .field("ttl", &self.ttl)
            .field("capacity", &self.capacity)
            .field("len", &self.len())
            .finish()
    }
}

impl ReviewCache {
    /// Keeps at most `capacity` acceptances, each for at most `ttl` (zero:
    /// none are kept; concurrent requests still share one review).
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        ReviewCache {
            ttl,
            capacity,
            entries: Mutex::new(Entries::default()),
            lookups: Family::default(),
        }
    }

    /// Registers `istiod_token_review_cache_lookups_total{result}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istiod_token_review_cache_lookups",
            "Bearer tokens checked against the TokenReview cache, by how they were answered (hit, shared: joined a review under way, miss: reviewed)",
            self.lookups.clone(),
        );
    }

    /// How many lookups were answered `how`.
    pub fn lookups(&self, how: Lookup) -> u64 {
        self.lookups
            .get_or_create(&LookupLabels { result: how })
            .get()
    }

    /// Entries held (accepted, or under review).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The caller `token` belongs to: a kept acceptance, the outcome of the
    /// review of `token` under way, or else `review()`'s.
    pub async fn get_or_review(
        &self,
        token: &str,
        review: impl FnOnce() -> BoxFuture<'static, Result<Caller, AuthError>>,
    ) -> Result<Caller, AuthError> {
        let key: TokenHash = Sha256::digest(token.as_bytes()).into();
        let (shared, seq) = {
            let mut entries = self.lock();
            let found = entries
                .slots
                .get(&key)
                .map(|slot| match slot.review.peek() {
                    None => Found::UnderWay(slot.review.clone(), slot.seq),
                    Some(done) if done.reusable_until.is_some_and(|t| Instant::now() < t) => {
                        Found::Kept(done.result.clone())
                    }
                    Some(_) => Found::Stale,
                });
            match found {
                Some(Found::Kept(result)) => {
                    self.count(Lookup::hit);
                    return result;
                }
                Some(Found::UnderWay(shared, seq)) => {
                    self.count(Lookup::shared);
                    (shared, seq)
                }
                Some(Found::Stale) | None => self.start(&mut entries, key, token, review),
            }
        };
        let reviewed = shared.await;
        if reviewed.reusable_until.is_none() {
            self.lock().remove_if(&key, seq);
        }
        reviewed.result
    }

    fn start(
        &self,
        entries: &mut Entries,
        key: TokenHash,
        token: &str,
        review: impl FnOnce() -> BoxFuture<'static, Result<Caller, AuthError>>,
    ) -> (Shared<BoxFuture<'static, Reviewed>>, u64) {
        self.count(Lookup::miss);
        let ttl = self.ttl;
        let expiry = token_expiry(token);
        let shared = review()
            .map(move |result| {
                let keep = reusable_for(ttl, expiry, SystemTime::now());
                let reusable_until = match &result {
                    Ok(_) if !keep.is_zero() => Some(Instant::now() + keep),
                    _ => None,
                };
                Reviewed {
                    result,
                    reusable_until,
                }
            })
            .boxed()
            .shared();
        entries.insert(key, shared.clone(), self.capacity);
        (shared, entries.next_seq - 1)
    }

    fn count(&self, how: Lookup) {
        self.lookups
            .get_or_create(&LookupLabels { result: how })
            .inc();
    }
}

/// How long an acceptance may be reused: `ttl`, cut short by the token's
/// expiry when it has one.
fn reusable_for(ttl: Duration, expiry: Option<SystemTime>, now: SystemTime) -> Duration {
    match expiry {
        Some(exp) => ttl.min(exp.duration_since(now).unwrap_or(Duration::ZERO)),
        None => ttl,
    }
}

/// The `exp` claim of a JWT, when `token` is one. Not verified here (the
/// API server verified the token); used only to keep less, never more.
fn token_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn caller(sa: &str) -> Caller {
        Caller::new(api::SpiffeId::new("cluster.local", "demo", sa).unwrap())
    }

    /// A reviewer that counts its calls and accepts every token but `bad`.
    fn reviewer(
        calls: &Arc<AtomicUsize>,
        token: &str,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<Caller, AuthError>> {
        let calls = calls.clone();
        let token = token.to_string();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if token == "bad" {
                    Err(AuthError::InvalidToken("rejected".into()))
                } else {
                    Ok(caller(&token))
                }
            }
            .boxed()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_acceptances_for_the_ttl_and_never_rejections() {
        let cache = ReviewCache::new(Duration::from_secs(60), 100);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..5 {
            let c = cache
                .get_or_review("a", reviewer(&calls, "a"))
                .await
                .unwrap();
            assert_eq!(c.identity.service_account(), "a");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.lookups(Lookup::hit), 4);

        tokio::time::advance(Duration::from_secs(61)).await;
        cache
            .get_or_review("a", reviewer(&calls, "a"))
            .await
            .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "reviewed again after the ttl"
        );

        for _ in 0..3 {
            assert!(
                cache
                    .get_or_review("bad", reviewer(&calls, "bad"))
                    .await
                    .is_err()
            );
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "every rejection is a new review"
        );
        assert_eq!(cache.len(), 1, "only the acceptance is held");
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_keeps_nothing() {
        let cache = ReviewCache::new(Duration::ZERO, 100);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            cache
                .get_or_review("a", reviewer(&calls, "a"))
                .await
                .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_review() {
        let cache = Arc::new(ReviewCache::new(Duration::from_secs(60), 100));
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = released.shared();
        let first = {
            let cache = cache.clone();
            let calls = calls.clone();
            let released = released.clone();
            tokio::spawn(async move {
                cache
                    .get_or_review("a", move || {
                        calls.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let _ = released.await;
                            Ok(caller("a"))
                        }
                        .boxed()
                    })
                    .await
            })
        };
        // Wait until the first review is under way, then join it.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let joiners: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                let calls = calls.clone();
                tokio::spawn(async move { cache.get_or_review("a", reviewer(&calls, "a")).await })
            })
            .collect();
        while cache.lookups(Lookup::shared) < 4 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for j in joiners {
            assert_eq!(j.await.unwrap().unwrap().identity.service_account(), "a");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_oldest_entries_go_first_when_full() {
        let cache = ReviewCache::new(Duration::from_secs(60), 2);
        let calls = Arc::new(AtomicUsize::new(0));
        for t in ["a", "b", "c"] {
            cache.get_or_review(t, reviewer(&calls, t)).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        cache
            .get_or_review("c", reviewer(&calls, "c"))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3, "c is still held");
        cache
            .get_or_review("a", reviewer(&calls, "a"))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 4, "a was evicted");
        // Re-reviewing one token over and over does not grow the order list.
        let cache = ReviewCache::new(Duration::ZERO, 2);
        for _ in 0..1000 {
            cache
                .get_or_review("a", reviewer(&calls, "a"))
                .await
                .unwrap();
        }
        assert!(cache.lock().order.len() <= 2 * 2 + 16);
    }

    #[test]
    fn a_tokens_expiry_shortens_its_stay() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ttl = Duration::from_secs(60);
        assert_eq!(reusable_for(ttl, None, now), ttl);
        let soon = now + Duration::from_secs(5);
        assert_eq!(reusable_for(ttl, Some(soon), now), Duration::from_secs(5));
        let past = now - Duration::from_secs(5);
        assert_eq!(reusable_for(ttl, Some(past), now), Duration::ZERO);
        let later = now + Duration::from_secs(3600);
        assert_eq!(reusable_for(ttl, Some(later), now), ttl);
    }

    #[test]
    fn reads_the_exp_claim_of_a_jwt() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwt = format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(r#"{"sub":"system:serviceaccount:a:b","exp":1700000000}"#)
        );
        assert_eq!(
            token_expiry(&jwt),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for not_a_jwt in ["opaque-token", "a.b.c", &format!("x.{}.y", b64("{}"))] {
            assert_eq!(token_expiry(not_a_jwt), None, "{not_a_jwt}");
        }
    }
}
