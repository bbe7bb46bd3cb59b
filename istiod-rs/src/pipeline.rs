//! Store change -> debounce -> translate -> publish.
//!
//! The pipeline waits until the source has synced (publishing a half-listed
//! cluster would make every proxy drop workloads that do exist), then
//! rebuilds the index after each burst of changes: a build starts once the
//! store has been quiet for `quiet`, or `max_delay` after the burst's first
//! change, whichever is first. A snapshot is published only when it differs
//! from the last one; the xDS server then pushes the keys whose versions
//! changed. Each build also computes the status every policy and route
//! should carry ([`crate::status::desired`]), published the same way for the
//! status writer, which runs on its own task, and so is the plan of the
//! waypoints to create on demand, for `provision::on_demand`. The JWKS fetcher
//! ([`crate::jwks`]) runs on the same task and writes what it fetched into
//! the store, which triggers a build like any other change. The allocator
//! of ServiceEntry VIPs (`index/ip_allocate.rs`) runs before each
//! translation and is kept from one build to the next.

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

use crate::index::{IpAllocator, MeshConfig, OnDemandPlan, PolicyProblem, Translator};
use crate::jwks::{self, JwksClient, JwksConfig, JwksMetrics};
use crate::snapshot::Snapshot;
use crate::state::Store;
use crate::status::{self, Statuses};

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
    /// Addresses more than one pod has now (host networking aside).
    pub shared_pod_addresses: Gauge,
    /// The JWKS fetcher's counts.
    pub jwks: Arc<JwksMetrics>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics {
            translations: Counter::default(),
            publishes: Counter::default(),
            translation_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            policy_problems: Family::default(),
            shared_pod_addresses: Gauge::default(),
            jwks: Arc::default(),
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
        r.register(
            "shared_pod_addresses",
            "Addresses more than one pod has now, host-network pods aside (ztunnel reaches only one of them)",
            self.shared_pod_addresses.clone(),
        );
        self.jwks.register(registry);
    }
}

/// What the pipeline publishes.
#[derive(Debug)]
pub struct Outputs {
    /// Holds an empty snapshot until the first build after the source
    /// synced, which is always published (so `changed()` firing once means
    /// the initial state is known); later builds are published only when
    /// they differ.
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The statuses of the last build, published when they differ.
    pub statuses: watch::Receiver<Arc<Statuses>>,
    /// The waypoints to create on demand: `None` until the first build,
    /// then published when they differ.
    pub on_demand: watch::Receiver<Option<Arc<OnDemandPlan>>>,
}

/// Starts the pipeline, fetching JWKS with the defaults of
/// [`JwksConfig`].
pub fn spawn(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Debounce,
    metrics: Arc<PipelineMetrics>,
) -> (Outputs, tokio::task::JoinHandle<()>) {
    spawn_with_jwks(
        store,
        mesh,
        debounce,
        JwksConfig::default(),
        IpAllocator::default(),
        metrics,
    )
}

/// [`spawn`], with how JWKS are fetched and refreshed, and the allocator of
/// ServiceEntry VIPs (seeded with what a previous run recorded, where the
/// cluster state does not carry it).
pub fn spawn_with_jwks(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Debounce,
    config: JwksConfig,
    allocator: IpAllocator,
    metrics: Arc<PipelineMetrics>,
) -> (Outputs, tokio::task::JoinHandle<()>) {
    let (snapshots_tx, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let (statuses_tx, statuses) = watch::channel(Arc::new(Statuses::new()));
    let (on_demand_tx, on_demand) = watch::channel(None);
    // The JWKS fetcher feeds the store for as long as the pipeline runs.
    let fetcher = jwks::run(
        store.clone(),
        JwksClient::native(config.max_body),
        config,
        metrics.jwks.clone(),
    );
    let senders = Senders {
        publish: snapshots_tx,
        statuses: statuses_tx,
        on_demand: on_demand_tx,
    };
    let pipeline = run(store, mesh, debounce, allocator, senders, metrics);
    let task = tokio::spawn(async move {
        tokio::select! {
            () = pipeline => {}
            () = fetcher => {}
        }
    });
    (
        Outputs {
            snapshots,
            statuses,
            on_demand,
        },
        task,
    )
}

/// Where each build's results go (the other ends are [`Outputs`]).
pub struct Senders {
    pub publish: watch::Sender<Arc<Snapshot>>,
    pub statuses: watch::Sender<Arc<Statuses>>,
    pub on_demand: watch::Sender<Option<Arc<OnDemandPlan>>>,
}

/// Runs until the store or every snapshot receiver is gone.
pub async fn run(
    store: Arc<Store>,
    mesh: MeshConfig,
    debounce: Debounce,
    mut allocator: IpAllocator,
    senders: Senders,
    metrics: Arc<PipelineMetrics>,
) {
    let Senders {
        publish,
        statuses,
        on_demand,
    } = senders;
    let mut synced = store.synced();
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut changes = store.changes();
    // The first build needs no change to trigger it.
    changes.mark_changed();
    let mut reported = BTreeSet::new();
    let mut reported_addresses = BTreeSet::new();
    // The first snapshot is always published, even if empty: receivers
    // take it as "the initial state is known".
    let mut first = true;
    let mut translator = Translator::default();
    loop {
        if changes.changed().await.is_err() {
            return;
        }
        let first_change = std::time::Instant::now();
        if !wait_for_quiet(&mut changes, debounce).await {
            return;
        }
        changes.mark_unchanged();
        let started = Instant::now();
        let (state_store, state_mesh) = (store.clone(), mesh.clone());
        let mut moved = std::mem::take(&mut translator);
        let mut moved_allocator = std::mem::take(&mut allocator);
        let (translation, desired) = match tokio::task::spawn_blocking(move || {
            let state = state_store.read();
            let allocations = moved_allocator.allocate(&state, state_mesh.auto_allocate_ips);
            let t = moved.translate_allocated(&state, &state_mesh, allocations);
            let desired = status::desired(&state, &t);
            (moved, moved_allocator, t, desired)
        })
        .await
        {
            Ok((back, back_allocator, t, desired)) => {
                translator = back;
                allocator = back_allocator;
                (t, desired)
            }
            Err(e) => {
                // The translator's cache went with the failed task; the
                // next translation starts from scratch, and the allocator
                // from the entries' status.
                warn!(error = %e, "translation failed; keeping the last snapshot");
                continue;
            }
        };
        let elapsed = started.elapsed();
        metrics.translations.inc();
        metrics.translation_seconds.observe(elapsed.as_secs_f64());
        report(&translation.problems, &mut reported, &metrics);
        announce(
            &translation.shared_addresses,
            &mut reported_addresses,
            "address shared by pods resolved",
        );
        metrics
            .shared_pod_addresses
            .set(i64::try_from(translation.shared_addresses.len()).unwrap_or(i64::MAX));
        // Never waits: the status writer reads the latest when it can.
        // The first is always sent: it is what the writer waits for.
        statuses.send_if_modified(|current| {
            let changed = first || **current != desired;
            if changed {
                *current = Arc::new(desired);
            }
            changed
        });
        let plan = translation.on_demand;
        on_demand.send_if_modified(|current| {
            let changed = current.as_deref() != Some(&plan);
            if changed {
                *current = Some(Arc::new(plan));
            }
            changed
        });
        let mut snapshot = translation.snapshot;
        snapshot.set_changed_at(first_change);
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
    announce(problems, reported, "policy problem resolved");
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

/// Logs each of `current` once when it appears (`warn`), and once when it
/// goes (`info`, as `resolved`); `reported` is what was logged as present.
fn announce<P: std::fmt::Display>(
    current: &[P],
    reported: &mut BTreeSet<String>,
    resolved: &'static str,
) {
    let current: BTreeSet<String> = current.iter().map(ToString::to_string).collect();
    for p in current.difference(reported) {
        warn!("{p}");
    }
    for p in reported.difference(&current) {
        info!(resolved = %p, "{resolved}");
    }
    *reported = current;
}
