//! Hot reload of a plug-in CA directory: Kubernetes updates a mounted
//! `cacerts` Secret by swapping the `..data` symlink, so events on the
//! files themselves say little; the directory is polled and its files'
//! contents compared. When they change (and have stayed the same for a
//! moment, so a writer replacing the files one by one can finish), the CA
//! tries the new set ([`CertificateAuthority::reload`]): a complete, valid
//! set is swapped in; anything else is logged with the file and what is
//! wrong, counted, and the CA keeps signing with what it had until the
//! files change again.
//!
//! Upstream istiod watches the directory with fsnotify and acts 100 ms
//! after the last write (istio/istio `pilot/pkg/bootstrap/istio_ca.go`,
//! `handleCACertsFileWatch`); polling needs no new dependency and sees a
//! symlink swap the same way.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::root::{CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
use super::service::CaMetrics;
use super::{CaError, CertificateAuthority, Reload};

/// How often the plug-in directory is checked unless configured.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// A change is acted on once the files have looked the same this long.
const SETTLE: Duration = Duration::from_millis(200);

/// The files of a plug-in directory, in a fixed order.
const FILES: [&str; 4] = [CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT];

/// What a reload attempt came to, as counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    /// The CA signs with the new material.
    swapped,
    /// The files changed but hold what the CA signs with already.
    unchanged,
    /// The new files are incomplete or invalid; the old material stays.
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: ReloadResult,
}

/// `istiod_ca_plugin_reloads{result}`.
#[derive(Clone, Debug, Default)]
pub struct ReloadMetrics {
    reloads: Family<ReloadLabels, Counter>,
}

impl ReloadMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "istiod_ca_plugin_reloads",
            "Changes of the plug-in CA directory acted on, by result (failed: the CA kept its material; istiod's log names the file)",
            self.reloads.clone(),
        );
    }

    pub fn count(&self, result: ReloadResult) -> u64 {
        self.reloads.get_or_create(&ReloadLabels { result }).get()
    }

    fn inc(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }
}

/// The contents of the plug-in files (`None`: missing or unreadable).
type Fingerprint = Vec<Option<Vec<u8>>>;

/// Watches one CA's plug-in directory.
pub struct PluginWatcher {
    ca: Arc<CertificateAuthority>,
    dir: PathBuf,
    metrics: ReloadMetrics,
    ca_metrics: Option<CaMetrics>,
    /// What the files held at the last attempt; `None` before the first,
    /// so files changed between start-up and the first check are seen.
    seen: Option<Fingerprint>,
}

impl PluginWatcher {
    /// `None` when the CA has no plug-in directory (a self-signed root is
    /// never replaced from outside).
    pub fn new(ca: Arc<CertificateAuthority>, metrics: ReloadMetrics) -> Option<Self> {
        let dir = ca.config().plugin_dir.clone()?;
        Some(PluginWatcher {
            ca,
            dir,
            metrics,
            ca_metrics: None,
            seen: None,
        })
    }

    /// Keeps the CA's expiry gauges in step with the material it signs with.
    pub fn with_ca_metrics(mut self, metrics: CaMetrics) -> Self {
        self.ca_metrics = Some(metrics);
        self
    }

    fn fingerprint(&self) -> Fingerprint {
        FILES
            .iter()
            .map(|name| std::fs::read(self.dir.join(name)).ok())
            .collect()
    }

    /// Acts on the files as they are now if they differ from the last
    /// attempt; `None` when they do not.
    pub fn check(&mut self) -> Option<Result<Reload, CaError>> {
        let now = self.fingerprint();
        if self.seen.as_ref() == Some(&now) {
            return None;
        }
        self.seen = Some(now);
        let result = self.ca.reload();
        match &result {
            Ok(Reload::Swapped) => {
                self.metrics.inc(ReloadResult::swapped);
                if let Some(metrics) = &self.ca_metrics {
                    metrics.record_expiry(&self.ca);
                }
            }
            Ok(Reload::Unchanged) => self.metrics.inc(ReloadResult::unchanged),
            Err(error) => {
                self.metrics.inc(ReloadResult::failed);
                tracing::error!(
                    dir = %self.dir.display(),
                    %error,
                    "the plug-in CA directory changed but its files cannot be used; still signing with the previous material, retrying when the files change again"
                );
            }
        }
        Some(result)
    }

    /// Checks every `interval` until `shutdown`.
    pub async fn run(mut self, interval: Duration, shutdown: CancellationToken) {
        tracing::info!(dir = %self.dir.display(), ?interval, "watching the plug-in CA directory");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let first = self.fingerprint();
            if self.seen.as_ref() == Some(&first) {
                continue;
            }
            // A writer replacing the files one by one gets time to finish;
            // if they are still changing, the next round looks again.
            tokio::time::sleep(SETTLE).await;
            if self.fingerprint() != first {
                continue;
            }
            self.check();
        }
    }
}
