//! Store change -> debounce -> translate -> publish.
//!
//! The pipeline waits until the source has synced (publishing a half-listed
//! cluster would make every proxy drop workloads that do exist), then
//! rebuilds the index after each burst of changes: a build starts once the
//! store has been quiet for `quiet`, or `max_delay` after the burst's first
//! change, whichever is first. A snapshot is published only when it differs
//! from the last one; the xDS server then pushes the keys whose versions
//! changed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::index::{MeshConfig, PolicyProblem, Translator};
use crate::snapshot::Snapshot;
use crate::state::Store;

/// How long to wait for a burst of changes to end.
#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    /// Build once the store has been quiet this long.
    pub quiet: Duration,
    /// ... but never later than this after the first change of a burst.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(15),
            max_delay: Duration::from_millis(150),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProblemLabels {
    /// The object's kind: `AuthorizationPolicy`, `PeerAuthentication`, ...
    pub kind: String,
    /// [`PolicyProblem::reason`]: `invalid_value`, `unsupported_action`, ...
    pub reason: String,
}

/// What the pipeline counts.
#[derive(Debug)]
pub struct PipelineMetrics {
    /// Translations run.
    pub translations: Counter,
    /// Snapshots published (translations whose result differed).
    pub publishes: Counter,
    /// Time to translate the whole state, in seconds.
    pub translation_seconds: Histogram,
    /// Problems of policies and routes now: objects rejected, or enforced
    /// more strictly than written, by kind and reason.
    pub policy_problems: Family<ProblemLabels, Gauge>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            translations: Counter::default(),
            publishes: Counter::default(),
            translation_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            policy_problems: Family::default(),
        }
    }
}

impl PipelineMetrics {
    /// Registers every metric, prefixed `istiod_index_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("istiod_index");
        r.register(
            "translations",
            "Translations of the cluster state run",
            self.translations.clone(),
        );
        r.register(
            "publishes",
            "Snapshots published to the xDS server",
            self.publishes.clone(),
        );
        r.register(
            "translation_seconds",
            "Time to translate the whole cluster state",
            self.translation_seconds.clone(),
        );
        r.register(
            "policy_problems",
            "Problems of policies and routes now (each enforced more strictly than written, or not served), by kind and reason",
            self.policy_problems.clone(),
        );
    }
}

/// Starts the pipeline. The receiver holds an empty snapshot until the first
/// build after the source synced, which is always published (so
/// `changed()` firing once means the initial state is known); later builds
/// are published only when they differ.
pub fn spawn(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Debounce,
    metrics: Arc<PipelineMetrics>,
) -> (watch::Receiver<Arc<Snapshot>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let task = tokio::spawn(run(store, mesh, debounce, tx, metrics));
    (rx, task)
}

/// Runs until the store or every snapshot receiver is gone.
pub async fn run(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Debounce,
    publish: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<PipelineMetrics>,
) {
    let mut synced = store.synced();
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut changes = store.changes();
    // The first build needs no change to trigger it.
    changes.mark_changed();
    let mut reported = BTreeSet::new();
    // The first snapshot is always published, even if empty: receivers
    // take it as "the initial state is known".
    let mut first = true;
    let mut translator = Translator::default();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        if !wait_for_quiet(&mut changes, debounce).await {
            return;
        }
        changes.mark_unchanged();
        let started = Instant::now();
        let (state_store, state_mesh) = (store.clone(), mesh.clone());
        let mut moved = std::mem::take(&mut translator);
        let translation = match tokio::task::spawn_blocking(move || {
            let state = state_store.read();
            let t = moved.translate(&state, &state_mesh);
            (moved, t)
        })
        .await
        {
            Ok((back, t)) => {
                translator = back;
                t
            }
            Err(e) => {
                // The translator's cache went with the failed task; the
                // next translation starts from scratch.
                warn!(error = %e, "translation failed; keeping the last snapshot");
                continue;
            }
        };
        let elapsed = started.elapsed();
        metrics.translations.inc();
        metrics.translation_seconds.observe(elapsed.as_secs_f64());
        report(&translation.problems, &mut reported, &metrics);
        let snapshot = translation.snapshot;
        let resources = snapshot.len();
        let published = publish.send_if_modified(|current| {
            if **current == snapshot && !first {
                false
            } else {
                *current = Arc::new(snapshot);
                true
            }
        });
        first = false;
        if published {
            metrics.publishes.inc();
        }
        debug!(
            ?elapsed,
            resources, published, "translated the cluster state"
        );
        if publish.is_closed() {
            return;
        }
    }
}

/// Waits until no change has come for `quiet`, or `max_delay` has passed.
/// False when the store is gone.
async fn wait_for_quiet(changes: &mut watch::Receiver<u64>, debounce: Debounce) -> bool {
    let deadline = Instant::now() + debounce.max_delay;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        let wait = debounce.quiet.min(deadline - now);
        match tokio::time::timeout(wait, changes.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => return false,
            Err(_) => return true,
        }
    }
}

/// Logs problems once when they appear and once when they go; sets the gauges.
fn report(problems: &[PolicyProblem], reported: &mut BTreeSet<String>, metrics: &PipelineMetrics) {
    let current: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
    for p in current.difference(reported) {
        warn!("{p}");
    }
    for p in reported.difference(&current) {
        info!(resolved = %p, "policy problem resolved");
    }
    *reported = current;
    metrics.policy_problems.clear();
    for p in problems {
        metrics
            .policy_problems
            .get_or_create(&ProblemLabels {
                kind: p.object().kind.to_string(),
                reason: p.reason().to_string(),
            })
            .inc();
    }
}
