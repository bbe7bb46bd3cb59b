//! Writes the waypoint Gateways planned on demand (`index/on_demand.rs`,
//! published by the pipeline) and removes those no longer planned. The
//! provisioner then turns each into a waypoint like any other Gateway.
//!
//! - Local mode: one file per Gateway,
//!   `<config-dir>/generated/on-demand/<namespace>/<name>.yaml`, written
//!   atomically and only when its content changes (it is read back as
//!   cluster state, and an unchanged plan writes nothing, so the directory
//!   source settles); files of Gateways no longer planned are removed.
//! - Kubernetes mode: server-side apply of each Gateway, field manager
//!   [`FIELD_MANAGER`], forced (the Gateway is istiod-rs's; its status is the
//!   provisioner's, under its own manager); a Gateway of the cluster state
//!   labelled `istio-rs.io/on-demand-waypoint: "true"` that is not planned is
//!   deleted (with its waypoint, through the owner references).
//!
//! Either way a Gateway no rule needs any more first drains
//! ([`Draining`]): it is written once more with an empty
//! `istio-rs.io/needed-by`, which binds nothing to it (while it exists it
//! still serves what it served, for the requests clients sent before they
//! learnt that: `Waypoints::serving` in `index/waypoints.rs`), and
//! removed only after `ProvisionConfig::on_demand_drain`, so every proxy has
//! stopped sending to the waypoint when it goes.
//!
//! Nothing is written before the first plan (a plan is made only once the
//! source has synced), so a restart never removes what a half-listed cluster
//! does not need yet. Failed writes are retried with the provisioner's
//! backoff until they succeed or a new plan supersedes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::manifest::ObjectKey;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use super::directory::{remove_others, write_if_changed, yaml};
use super::{ProvisionConfig, ProvisionError, ProvisionMetrics};
use crate::index::{OnDemandPlan, OnDemandWaypoint};
use crate::state::directory::GENERATED_DIR;
use crate::state::{ClusterState, Store};

/// The field manager of the Gateways istiod-rs creates on demand.
pub const FIELD_MANAGER: &str = "istiod-rs-on-demand";

/// Under `<config-dir>/generated/`: the Gateways created on demand.
pub const ON_DEMAND_DIR: &str = "on-demand";

/// Where the Gateways created on demand go.
pub enum OnDemandSink {
    Directory(DirectoryOnDemand),
    Kube(KubeOnDemand),
}

impl OnDemandSink {
    async fn sync(
        &mut self,
        state: &ClusterState,
        wanted: &Wanted,
        metrics: &ProvisionMetrics,
    ) -> Vec<ProvisionError> {
        match self {
            OnDemandSink::Directory(d) => d.sync(wanted, metrics),
            OnDemandSink::Kube(k) => k.sync(state, wanted, metrics).await,
        }
    }
}

/// Local mode: the Gateways as files.
#[derive(Debug)]
pub struct DirectoryOnDemand {
    dir: PathBuf,
}

impl DirectoryOnDemand {
    pub fn new(config_dir: &Path) -> Self {
        DirectoryOnDemand {
            dir: config_dir.join(GENERATED_DIR).join(ON_DEMAND_DIR),
        }
    }

    /// The file of the Gateway `key`.
    pub fn path(&self, key: &ObjectKey) -> PathBuf {
        self.dir
            .join(&key.namespace)
            .join(format!("{}.yaml", key.name))
    }

    /// Writes what differs from `plan`, removes what is no longer in it.
    pub fn sync(&mut self, wanted: &Wanted, metrics: &ProvisionMetrics) -> Vec<ProvisionError> {
        let mut errors = Vec::new();
        for (key, waypoint) in &wanted.gateways {
            let text = yaml(&format!("Gateway {key}"), &waypoint.gateway()).map(|body| {
                format!(
                    "# Waypoint created on demand by istiod-rs (local mode) for the rules of its\n# istio-rs.io/needed-by annotation; removed when none needs it.\n---\n{body}"
                )
            });
            let written = text.and_then(|text| write_if_changed(&self.path(key), &text, metrics));
            errors.extend(written.err());
        }
        let keys: BTreeSet<&ObjectKey> = wanted.gateways.keys().collect();
        errors.extend(remove_others(&self.dir, &keys));
        errors
    }
}

/// Kubernetes mode: the Gateways through the API server.
pub struct KubeOnDemand {
    client: Client,
    /// The body last applied of each Gateway.
    applied: BTreeMap<ObjectKey, Value>,
    /// Gateways applied and since seen in the cluster state.
    observed: BTreeSet<ObjectKey>,
}

impl KubeOnDemand {
    pub fn new(client: Client) -> Self {
        KubeOnDemand {
            client,
            applied: BTreeMap::new(),
            observed: BTreeSet::new(),
        }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &ApiResource::from_gvk_with_plural(&gvk, "gateways"),
        )
    }

    /// Applies the planned Gateways that differ from what was last applied
    /// or, once seen in the cluster state, are gone from it; deletes the on-demand Gateways
    /// of the cluster state that are not planned.
    pub async fn sync(
        &mut self,
        state: &ClusterState,
        wanted: &Wanted,
        metrics: &ProvisionMetrics,
    ) -> Vec<ProvisionError> {
        let mut errors = Vec::new();
        self.applied
            .retain(|key, _| wanted.gateways.contains_key(key));
        self.observed
            .retain(|key| wanted.gateways.contains_key(key));
        for (key, waypoint) in &wanted.gateways {
            if state.gateways.contains_key(key) {
                self.observed.insert(key.clone());
            } else if self.observed.remove(key) {
                // Deleted by someone: made again.
                self.applied.remove(key);
            }
            let body = waypoint.gateway();
            if self.applied.get(key) == Some(&body) {
                continue;
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let result = self
                .api(&key.namespace)
                .patch(&key.name, &params, &Patch::Apply(&body))
                .await;
            metrics.count("Gateway", result.is_ok());
            match result {
                Ok(_) => {
                    self.applied.insert(key.clone(), body);
                }
                Err(source) => errors.push(ProvisionError::Apply {
                    object: format!("Gateway {key}"),
                    source,
                }),
            }
        }
        let stale = state
            .gateways
            .iter()
            .filter(|(key, gw)| {
                crate::index::is_on_demand_waypoint(gw) && !wanted.gateways.contains_key(key)
            })
            .map(|(key, _)| key);
        for key in stale {
            let result = self
                .api(&key.namespace)
                .delete(&key.name, &DeleteParams::default())
                .await;
            match result {
                Ok(_) => metrics.count("GatewayDelete", true),
                Err(e) if crate::state::kube::is_not_found(&e) => {}
                Err(source) => {
                    metrics.count("GatewayDelete", false);
                    errors.push(ProvisionError::Delete {
                        object: format!("Gateway {key}"),
                        source,
                    });
                }
            }
        }
        errors
    }
}

/// Starts writing the plans: at each new plan, and (Kubernetes mode: a
/// planned Gateway deleted by someone, an on-demand Gateway that is not
/// planned) at each change of the cluster state.
pub fn spawn(
    store: Arc<Store>,
    plans: watch::Receiver<Option<Arc<OnDemandPlan>>>,
    sink: OnDemandSink,
    config: ProvisionConfig,
    metrics: Arc<ProvisionMetrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(store, plans, sink, config, metrics))
}

/// Runs until the pipeline or the store is gone.
pub async fn run(
    store: Arc<Store>,
    mut plans: watch::Receiver<Option<Arc<OnDemandPlan>>>,
    mut sink: OnDemandSink,
    config: ProvisionConfig,
    metrics: Arc<ProvisionMetrics>,
) {
    if plans.wait_for(Option::is_some).await.is_err() {
        return;
    }
    let mut changes = store.changes();
    let mut delay = config.retry_min;
    let mut announced: BTreeSet<ObjectKey> = BTreeSet::new();
    let mut draining = Draining::default();
    loop {
        let Some(plan) = plans.borrow_and_update().clone() else {
            return;
        };
        changes.borrow_and_update();
        announce(&plan, &mut announced);
        let state = store.read();
        let wanted = draining.wanted(&state, &plan, Instant::now(), config.on_demand_drain);
        let errors = sink.sync(&state, &wanted, &metrics).await;
        drop(state);
        for error in &errors {
            warn!(%error, "writing a waypoint created on demand failed; retrying");
        }
        let retry = async {
            if errors.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(delay).await;
        };
        let drained = async {
            match wanted.next_removal {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = plans.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            () = retry => {}
            () = drained => {}
        }
        delay = if errors.is_empty() {
            config.retry_min
        } else {
            (delay * 2).min(config.retry_max)
        };
    }
}

/// The on-demand Gateways that should exist now: those planned, and those
/// no rule needs any more that are draining (written with an empty
/// `istio-rs.io/needed-by`, which unbinds them, so proxies stop sending to
/// the waypoint before it goes) until `drain` has passed since they were
/// first seen unneeded. Every other on-demand Gateway is removed.
#[derive(Debug, Default)]
pub struct Wanted {
    pub gateways: BTreeMap<ObjectKey, OnDemandWaypoint>,
    /// When the first draining Gateway is due for removal.
    pub next_removal: Option<Instant>,
}

/// Since when each on-demand Gateway of the cluster has been unneeded.
#[derive(Debug, Default)]
pub struct Draining {
    since: BTreeMap<ObjectKey, Instant>,
}

impl Draining {
    pub fn wanted(
        &mut self,
        state: &ClusterState,
        plan: &OnDemandPlan,
        now: Instant,
        drain: Duration,
    ) -> Wanted {
        let unneeded: BTreeMap<ObjectKey, OnDemandWaypoint> = state
            .gateways
            .iter()
            .filter(|(key, gw)| {
                crate::index::is_on_demand_waypoint(gw) && !plan.waypoints.contains_key(*key)
            })
            .filter_map(|(key, gw)| Some((key.clone(), OnDemandWaypoint::draining(key, gw)?)))
            .collect();
        self.since.retain(|key, _| unneeded.contains_key(key));
        let mut wanted = Wanted {
            gateways: plan.waypoints.clone(),
            next_removal: None,
        };
        for (key, waypoint) in unneeded {
            let since = *self.since.entry(key.clone()).or_insert(now);
            let due = since + drain;
            if now < due {
                wanted.gateways.insert(key, waypoint);
                wanted.next_removal = Some(wanted.next_removal.map_or(due, |d| d.min(due)));
            }
        }
        wanted
    }
}

/// Logs each on-demand waypoint once when planned and once when no longer.
fn announce(plan: &OnDemandPlan, announced: &mut BTreeSet<ObjectKey>) {
    let now: BTreeSet<ObjectKey> = plan.waypoints.keys().cloned().collect();
    for key in now.difference(announced) {
        let w = &plan.waypoints[key];
        info!(gateway = %key, serves = %w.serves, needed_by = %w.needed_by_annotation(), "creating a waypoint on demand");
    }
    for key in announced.difference(&now) {
        info!(gateway = %key, "no rule needs the waypoint created on demand any more; draining, then removing it");
    }
    *announced = now;
}
