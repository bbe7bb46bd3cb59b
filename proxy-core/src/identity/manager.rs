//! The certificate manager: one certificate per workload identity the proxy
//! needs, fetched on first use, shared by every caller, renewed in the
//! background at half its lifetime, retried with jittered exponential
//! backoff when the CA fails, and never handed out once expired.
//!
//! Each identity has a worker task that owns the issuing; callers only watch
//! its state. That is what makes "one in-flight request per identity" hold
//! no matter how many connections ask at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use api::SpiffeId;
use backon::BackoffBuilder;
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;

use super::certificate::{CertificateError, CertificateSigner, WorkloadCertificate, issue};

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Lifetime asked of the CA (it may cap it).
    pub validity: Duration,
    /// Node-agent mode: ask the CA for each identity on a pod's behalf
    /// (`ImpersonatedIdentity`) rather than for the proxy's own.
    pub impersonate: bool,
    /// First retry delay after a failed issue; doubles (with jitter) up to
    /// `retry_max`. Short by default: the common failure is a pod so new that
    /// the CA has not yet seen it on this node, which clears within a
    /// fraction of a second, and until then the pod cannot take mTLS.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// While the worker waits out a failure, a caller that needs the
    /// certificate makes it try again at once, at most this often per
    /// identity: after the CA comes back, the first connection gets a
    /// certificate instead of the rest of a backoff of up to `retry_max`.
    pub demand_retry: Duration,
    /// Where each new certificate's trust bundle is published (for the
    /// control-plane channels, [`super::LearnedRoots`]).
    pub learned_roots: Option<super::LearnedRoots>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            validity: Duration::from_secs(24 * 60 * 60),
            impersonate: false,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(30),
            demand_retry: Duration::from_secs(1),
            learned_roots: None,
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no certificate for {identity}: {source}; retrying in the background")]
    Issue {
        identity: SpiffeId,
        #[source]
        source: Arc<CertificateError>,
    },
    #[error(
        "the certificate for {identity} expired at {expired_at} and renewing it failed: {source}; retrying in the background"
    )]
    Expired {
        identity: SpiffeId,
        expired_at: time::OffsetDateTime,
        #[source]
        source: Arc<CertificateError>,
    },
    #[error("{identity} was forgotten while a certificate for it was being fetched")]
    Forgotten { identity: SpiffeId },
}

/// What the manager knows about one identity, for admin endpoints.
#[derive(Clone, Debug)]
pub struct CertificateStatus {
    pub identity: SpiffeId,
    pub certificate: Option<Arc<WorkloadCertificate>>,
    /// Why the last attempt failed, if it did (cleared by a success).
    pub last_error: Option<String>,
    pub issuing: bool,
}

/// Cheap to clone; clones share certificates and workers. Dropping the last
/// clone stops every renewal.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    signer: Arc<dyn CertificateSigner>,
    config: ManagerConfig,
    identities: Mutex<HashMap<SpiffeId, Tracked>>,
}

struct Tracked {
    state: watch::Receiver<State>,
    /// Wakes the worker early (a cert went stale while it slept).
    wake: Arc<Notify>,
    worker: AbortHandle,
}

#[derive(Clone, Default)]
struct State {
    current: Option<Arc<WorkloadCertificate>>,
    last_error: Option<Arc<CertificateError>>,
    /// When the last attempt failed.
    failed_at: Option<std::time::Instant>,
    issuing: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let identities = self.identities.get_mut().unwrap_or_else(|e| e.into_inner());
        for tracked in identities.values() {
            tracked.worker.abort();
        }
    }
}

impl CertificateManager {
    /// Each certificate's trust bundle is the one the CA sends with it.
    pub fn new(signer: Arc<dyn CertificateSigner>, config: ManagerConfig) -> Self {
        CertificateManager {
            inner: Arc::new(Inner {
                signer,
                config,
                identities: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// A valid certificate for `identity`: the cached one, or the one being
    /// issued (concurrent callers wait for the same request). The identity
    /// is renewed in the background from then on, until [`Self::forget`].
    /// Must be called inside a tokio runtime.
    pub async fn fetch(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCertificate>, FetchError> {
        let (mut state, wake) = self.track(identity);
        let mut retried = false;
        loop {
            {
                let state = state.borrow_and_update();
                if let Some(cert) = &state.current
                    && !cert.is_expired_at(SystemTime::now())
                {
                    return Ok(cert.clone());
                }
                let retry_now = !retried
                    && state
                        .failed_at
                        .is_some_and(|at| at.elapsed() >= self.inner.config.demand_retry);
                if !state.issuing && retry_now {
                    // Waiting out a failure: try again now, for this caller.
                    retried = true;
                    wake.notify_one();
                } else if !state.issuing {
                    match (&state.current, &state.last_error) {
                        (None, Some(source)) => {
                            return Err(FetchError::Issue {
                                identity: identity.clone(),
                                source: source.clone(),
                            });
                        }
                        (Some(expired), Some(source)) => {
                            return Err(FetchError::Expired {
                                identity: identity.clone(),
                                expired_at: expired.not_after().into(),
                                source: source.clone(),
                            });
                        }
                        // Expired while the worker waited for its renewal
                        // time (e.g. the host was suspended): renew now.
                        _ => wake.notify_one(),
                    }
                }
            }
            if state.changed().await.is_err() {
                return Err(FetchError::Forgotten {
                    identity: identity.clone(),
                });
            }
        }
    }

    /// Makes every identity whose last attempt failed try again now instead
    /// of at the end of its backoff: the control plane is back (its xDS
    /// stream reconnected), so pods need not wait up to `retry_max` for a
    /// certificate. Returns how many were woken.
    pub fn retry_failed(&self) -> usize {
        let identities = self.inner.lock();
        let mut woken = 0;
        for tracked in identities.values() {
            let failed = {
                let state = tracked.state.borrow();
                !state.issuing && state.last_error.is_some()
            };
            if failed {
                tracked.wake.notify_one();
                woken += 1;
            }
        }
        woken
    }

    /// Stops renewing `identity` (no workload on this node needs it any
    /// more) and drops its certificate. Returns whether it was tracked.
    pub fn forget(&self, identity: &SpiffeId) -> bool {
        let removed = self.inner.lock().remove(identity);
        if let Some(tracked) = &removed {
            tracked.worker.abort();
            tracing::info!(%identity, "stopped renewing certificate");
        }
        removed.is_some()
    }

    /// Every tracked identity and its certificate, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertificateStatus> {
        let mut out: Vec<_> = self
            .inner
            .lock()
            .iter()
            .map(|(identity, tracked)| {
                let state = tracked.state.borrow();
                CertificateStatus {
                    identity: identity.clone(),
                    certificate: state.current.clone(),
                    last_error: state.last_error.as_ref().map(|e| e.to_string()),
                    issuing: state.issuing,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn track(&self, identity: &SpiffeId) -> (watch::Receiver<State>, Arc<Notify>) {
        let mut identities = self.inner.lock();
        if let Some(tracked) = identities.get(identity) {
            return (tracked.state.clone(), tracked.wake.clone());
        }
        // Born issuing, so a caller arriving before the worker runs waits.
        let (tx, rx) = watch::channel(State {
            issuing: true,
            ..State::default()
        });
        let wake = Arc::new(Notify::new());
        let worker = tokio::spawn(renew(
            Worker {
                signer: self.inner.signer.clone(),
                config: self.inner.config.clone(),
                identity: identity.clone(),
                wake: wake.clone(),
            },
            tx,
        ))
        .abort_handle();
        identities.insert(
            identity.clone(),
            Tracked {
                state: rx.clone(),
                wake: wake.clone(),
                worker,
            },
        );
        (rx, wake)
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Tracked>> {
        // The map stays consistent even if a holder panicked: every update is one call.
        self.identities.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a worker needs; deliberately not the manager itself, so workers do
/// not keep it alive.
struct Worker {
    signer: Arc<dyn CertificateSigner>,
    config: ManagerConfig,
    identity: SpiffeId,
    wake: Arc<Notify>,
}

async fn renew(worker: Worker, state: watch::Sender<State>) {
    let Worker {
        signer,
        config,
        identity,
        wake,
    } = worker;
    let mut delays = retry_delays(&config);
    loop {
        state.send_modify(|s| s.issuing = true);
        let result = issue(
            signer.as_ref(),
            &identity,
            config.validity,
            config.impersonate,
        )
        .await;
        let wait = match result {
            Ok(cert) => {
                delays = retry_delays(&config);
                let wait = until_renewal(&cert, SystemTime::now());
                tracing::info!(
                    %identity,
                    serial = cert.serial_number(),
                    expires = %time::OffsetDateTime::from(cert.not_after()),
                    renew_in = ?wait,
                    "certificate issued"
                );
                let bundle_changed = state
                    .borrow()
                    .current
                    .as_ref()
                    .is_some_and(|old| old.roots() != cert.roots());
                if let Some(learned) = &config.learned_roots {
                    learned.store(cert.roots());
                }
                if bundle_changed {
                    tracing::info!(%identity, roots = cert.roots().len(), "the CA sent a new trust bundle; peers are verified against it from now on");
                }
                state.send_modify(|s| {
                    s.current = Some(Arc::new(cert));
                    s.last_error = None;
                    s.failed_at = None;
                    s.issuing = false;
                });
                wait
            }
            Err(e) => {
                let wait = delays.next().unwrap_or(config.retry_max);
                tracing::warn!(%identity, error = %e, retry_in = ?wait, "could not issue certificate");
                state.send_modify(|s| {
                    s.last_error = Some(Arc::new(e));
                    s.failed_at = Some(std::time::Instant::now());
                    s.issuing = false;
                });
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}

/// Half-way through the lifetime; if that has passed already (a CA that
/// back-dates heavily, a slow response), half of what remains, so renewal
/// never spins.
fn until_renewal(cert: &WorkloadCertificate, now: SystemTime) -> Duration {
    renewal_delay(cert.renewal_time(), cert.not_after(), now)
}

fn renewal_delay(renewal_time: SystemTime, not_after: SystemTime, now: SystemTime) -> Duration {
    match renewal_time.duration_since(now) {
        Ok(wait) => wait,
        Err(_) => not_after.duration_since(now).unwrap_or_default() / 2,
    }
}

fn retry_delays(config: &ManagerConfig) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::new()
        .with_min_delay(config.retry_min)
        .with_max_delay(config.retry_max)
        .with_jitter()
        // backon's default seed is fixed without its `std` feature; every
        // proxy retrying in lockstep is what jitter is meant to avoid.
        .with_jitter_seed(rand::random())
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_half_way_or_half_of_what_remains() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let secs = Duration::from_secs;
        // Issued at t0 for 100 s, received at once: renew at t0 + 50.
        assert_eq!(renewal_delay(t0 + secs(50), t0 + secs(100), t0), secs(50));
        // Received after the half-way point: half of the 20 s left.
        assert_eq!(
            renewal_delay(t0 + secs(50), t0 + secs(100), t0 + secs(80)),
            secs(10)
        );
        // Already expired: at once (the fetch path refuses to hand it out).
        assert_eq!(
            renewal_delay(t0 + secs(50), t0 + secs(100), t0 + secs(200)),
            secs(0)
        );
    }

    #[test]
    fn retry_delays_grow_and_stay_bounded() {
        let config = ManagerConfig {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..ManagerConfig::default()
        };
        let delays: Vec<_> = retry_delays(&config).take(20).collect();
        assert_eq!(delays.len(), 20, "retries never give up");
        // Jitter adds up to one more delay on top of each step.
        assert!(
            delays
                .iter()
                .all(|d| *d >= config.retry_min && *d <= 2 * config.retry_max)
        );
        assert!(
            delays[10] >= config.retry_max,
            "grew to the cap: {delays:?}"
        );
    }
}
