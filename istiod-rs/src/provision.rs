//! Waypoint provisioning: each Gateway of class `istio-waypoint` becomes a
//! ServiceAccount, a Deployment running waypoint-rs and a Service, rendered
//! from `manifests/templates/waypoint.yaml` ([`render`]), and the Gateway's
//! status says where the waypoint is and whether it runs
//! ([`gateway_status`]).
//!
//! Two sinks, as for the status writer:
//! - [`kube`]: server-side apply of each object, field manager
//!   [`FIELD_MANAGER`], forced (the objects are istiod-rs's, as upstream's
//!   deployment controller forces its own), owner reference to the Gateway
//!   so Kubernetes deletes them with it; the `istio-ca-root-cert` ConfigMap
//!   the pods mount ([`root_cert`]) in each namespace with a waypoint; the
//!   Gateway's `status.addresses` and `Accepted` / `Programmed` through its
//!   status subresource.
//! - [`directory`] (local mode): the objects as one file per Gateway,
//!   `<config-dir>/generated/waypoints/<namespace>/<gateway>.yaml`, removed
//!   when the Gateway goes; the Gateway's status as
//!   `<config-dir>/generated/status/Gateway/<namespace>/<name>.yaml`, as the
//!   status writer does for policies and routes.
//!
//! [`on_demand`] writes the waypoint Gateways the index plans on demand
//! (`index/on_demand.rs`); once they are in the cluster state they are
//! provisioned here like any other.
//!
//! [`plan`] is pure (cluster state in, what each waypoint Gateway becomes
//! out). [`spawn`] runs the sink on its own task: on every change of the
//! cluster state it writes what differs from what it last wrote, and retries
//! failures with backoff. A Gateway that cannot be provisioned (an invalid
//! name or annotation, a template that does not render) gets `Accepted`
//! False with a message naming the field; the others keep flowing.

pub mod directory;
pub mod gateway_status;
pub mod kube;
pub mod on_demand;
pub mod render;
pub mod root_cert;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use api::manifest::ObjectKey;
use gateway_api::gateways::Gateway;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::state::{ClusterState, Store};
use crate::status::WriteLabels;

pub use render::Rendered;

/// The field manager of every object and Gateway status istiod-rs applies
/// for waypoints.
pub const FIELD_MANAGER: &str = "istiod-rs-provisioner";

/// On a Gateway: the ServiceAccount its provisioned pods run as (default:
/// the Gateway's name), upstream's `annotation.GatewayServiceAccount`.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "gateway.istio.io/service-account";

/// How waypoints are provisioned: the install values the template takes
/// (the placeholders of `manifests/install/`), and how failed writes are
/// retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvisionConfig {
    /// `${hub}`: image repository (`<hub>/waypoint-rs:<tag>`).
    pub hub: String,
    /// `${tag}`.
    pub tag: String,
    /// `${imagePullPolicy}`: Always, IfNotPresent or Never.
    pub image_pull_policy: String,
    /// `${logLevel}`: the waypoint's RUST_LOG.
    pub log_level: String,
    /// `${trustDomain}`.
    pub trust_domain: String,
    /// `${xdsAddress}`: where waypoints reach istiod (host:port).
    pub xds_address: String,
    /// DNS domain of service hostnames (the Gateway's status address).
    pub cluster_domain: String,
    /// First delay after a failed write; doubles up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long a waypoint created on demand that no rule needs any more
    /// stays, unbound, before it is deleted: time for every proxy to stop
    /// sending to it.
    pub on_demand_drain: Duration,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            hub: "istio-rs".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            image_pull_policy: "IfNotPresent".into(),
            log_level: "info".into(),
            trust_domain: api::labels::DEFAULT_TRUST_DOMAIN.into(),
            xds_address: format!(
                "istiod.{}.svc:{}",
                api::labels::DEFAULT_ROOT_NAMESPACE,
                api::ports::ISTIOD_TLS
            ),
            cluster_domain: api::labels::DEFAULT_CLUSTER_DOMAIN.into(),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            on_demand_drain: Duration::from_secs(5),
        }
    }
}

impl ProvisionConfig {
    /// Checks each value is a scalar that cannot change the structure of the
    /// YAML it lands in; the error names the flag.
    pub fn validate(&self) -> Result<(), ProvisionError> {
        let scalar = |flag: &'static str, value: &str, extra: &str| {
            let ok = !value.is_empty()
                && value.chars().all(|c| {
                    c.is_ascii_alphanumeric() || "._-/:@".contains(c) || extra.contains(c)
                });
            if ok {
                Ok(())
            } else {
                Err(ProvisionError::Flag {
                    flag,
                    reason: format!(
                        "{value:?} is empty or has characters other than letters, digits and ._-/:@{extra}"
                    ),
                })
            }
        };
        scalar("--waypoint-hub", &self.hub, "")?;
        scalar("--waypoint-tag", &self.tag, "")?;
        scalar("--waypoint-log-level", &self.log_level, "=,")?;
        scalar("--waypoint-xds-address", &self.xds_address, "[]")?;
        scalar("--trust-domain", &self.trust_domain, "")?;
        if !["Always", "IfNotPresent", "Never"].contains(&self.image_pull_policy.as_str()) {
            return Err(ProvisionError::Flag {
                flag: "--waypoint-image-pull-policy",
                reason: format!(
                    "{:?} is not Always, IfNotPresent or Never",
                    self.image_pull_policy
                ),
            });
        }
        Ok(())
    }
}

/// Why a waypoint could not be provisioned, or a flag is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
    /// A field of the Gateway the waypoint cannot be made from.
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    #[error("the rendered waypoint template is not valid: {0}")]
    Rendered(String),
    #[error("could not apply {object} through the API server: {source}")]
    Apply {
        object: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("could not delete {object} through the API server: {source}")]
    Delete {
        object: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("could not write {}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not encode {object}: {reason}")]
    Encode { object: String, reason: String },
}

/// What one waypoint Gateway becomes.
#[derive(Debug)]
pub struct Waypoint {
    pub key: ObjectKey,
    /// The Gateway's `metadata.generation` (conditions' observedGeneration).
    pub generation: Option<i64>,
    /// Its objects, or why there are none.
    pub rendered: Result<Rendered, ProvisionError>,
}

/// Every waypoint Gateway of the cluster, by namespace and name.
pub type Plan = BTreeMap<ObjectKey, Waypoint>;

/// What each Gateway of class `istio-waypoint` that istiod-rs manages
/// becomes.
pub fn plan(state: &ClusterState, config: &ProvisionConfig) -> Plan {
    state
        .gateways
        .iter()
        .filter(|(_, gw)| gw.spec.gateway_class_name == api::labels::WAYPOINT_GATEWAY_CLASS)
        .filter(|(_, gw)| managed(gw))
        .map(|(key, gw)| {
            let waypoint = Waypoint {
                key: key.clone(),
                generation: gw.metadata.generation,
                rendered: render::render(key, gw, config),
            };
            (key.clone(), waypoint)
        })
        .collect()
}

/// What the provisioner counts.
/// Whether istiod-rs provisions the Gateway: not when its `spec.addresses`
/// point at something that exists (one Hostname address, or more than one
/// address), as upstream's `IsManaged`
/// (`pilot/pkg/config/kube/gateway/conversion.go`): "If user explicitly sets
/// addresses, we are assuming they are pointing to an existing deployment."
pub fn managed(gateway: &Gateway) -> bool {
    match gateway.spec.addresses.as_deref() {
        None | Some([]) => true,
        Some([one]) => matches!(one.r#type.as_deref(), None | Some("IPAddress")),
        Some(_) => false,
    }
}

#[derive(Debug, Default)]
pub struct ProvisionMetrics {
    /// Writes made, by kind (`ServiceAccount`, `Deployment`, `Service`,
    /// `ConfigMap`, `GatewayStatus`; `File` in local mode) and result.
    pub writes: Family<WriteLabels, Counter>,
    /// Waypoint Gateways that cannot be provisioned as they are now.
    pub invalid_gateways: Gauge,
}

impl ProvisionMetrics {
    /// Registers every metric, prefixed `istiod_provision_`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("istiod_provision");
        r.register(
            "writes",
            "Writes of waypoint objects and Gateway statuses, by kind and result (ok, error); errors are retried",
            self.writes.clone(),
        );
        r.register(
            "invalid_gateways",
            "Waypoint Gateways that cannot be provisioned as they are now (their Accepted condition says why)",
            self.invalid_gateways.clone(),
        );
    }

    pub(crate) fn count(&self, kind: &str, ok: bool) {
        self.writes
            .get_or_create(&WriteLabels {
                kind: kind.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }
}

/// Where waypoints are provisioned.
pub enum Sink {
    Kube(kube::KubeProvisioner),
    Directory(directory::DirectoryProvisioner),
}

impl Sink {
    /// The mesh roots the sink publishes, when it publishes them.
    fn roots(&self) -> Option<watch::Receiver<String>> {
        match self {
            Sink::Kube(k) => Some(k.roots()),
            Sink::Directory(_) => None,
        }
    }

    /// Brings what is provisioned in line with `plan`; the errors of the
    /// writes that failed (to retry).
    async fn sync(
        &mut self,
        state: &ClusterState,
        plan: &Plan,
        metrics: &ProvisionMetrics,
    ) -> Vec<ProvisionError> {
        match self {
            Sink::Kube(k) => k.sync(state, plan, metrics).await,
            Sink::Directory(d) => d.sync(state, plan, metrics),
        }
    }
}

/// Starts the provisioner: once the source has synced, provisions, then
/// again on every change of the cluster state, retrying failed writes with
/// backoff until they succeed or are superseded.
pub fn spawn(
    store: Arc<Store>,
    sink: Sink,
    config: ProvisionConfig,
    metrics: Arc<ProvisionMetrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(store, sink, config, metrics))
}

/// Runs until the store is gone.
pub async fn run(
    store: Arc<Store>,
    mut sink: Sink,
    config: ProvisionConfig,
    metrics: Arc<ProvisionMetrics>,
) {
    // A half-listed cluster would remove the files of Gateways not listed yet.
    let mut synced = store.synced();
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut changes = store.changes();
    let mut roots = sink.roots();
    let mut invalid: BTreeMap<ObjectKey, String> = BTreeMap::new();
    let mut delay = config.retry_min;
    // The plan of the Gateways last seen: most changes are of pods, which
    // only the statuses depend on. The sources replace only the objects
    // that changed, so an unchanged Gateway is the same `Arc`.
    let mut planned: Option<(Vec<Arc<Gateway>>, Plan)> = None;
    loop {
        changes.borrow_and_update();
        let state = store.read();
        let gateways: Vec<Arc<Gateway>> = state.gateways.values().cloned().collect();
        let (gateways, plan) = match planned.take() {
            Some((seen, plan)) if same_objects(&seen, &gateways) => (seen, plan),
            _ => {
                let plan = self::plan(&state, &config);
                report_invalid(&plan, &mut invalid, &metrics);
                (gateways, plan)
            }
        };
        let errors = sink.sync(&state, &plan, &metrics).await;
        planned = Some((gateways, plan));
        for error in &errors {
            warn!(%error, "waypoint provisioning failed; retrying");
        }
        if errors.is_empty() {
            delay = config.retry_min;
            if !next_change(&mut changes, &mut roots).await {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            more = next_change(&mut changes, &mut roots) => if !more { return },
        }
        delay = (delay * 2).min(config.retry_max);
    }
}

/// Waits for a change of the cluster state or of the published roots;
/// false once the store is gone.
async fn next_change<T>(
    changes: &mut watch::Receiver<T>,
    roots: &mut Option<watch::Receiver<String>>,
) -> bool {
    match roots {
        Some(roots) => tokio::select! {
            r = changes.changed() => r.is_ok(),
            Ok(()) = roots.changed() => true,
        },
        None => changes.changed().await.is_ok(),
    }
}

/// Whether both lists hold the very same objects, in the same order.
fn same_objects<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| Arc::ptr_eq(a, b))
}

/// Logs each Gateway that cannot be provisioned once when it appears and
/// once when resolved; sets the gauge.
fn report_invalid(
    plan: &Plan,
    reported: &mut BTreeMap<ObjectKey, String>,
    metrics: &ProvisionMetrics,
) {
    let now: BTreeMap<ObjectKey, String> = plan
        .iter()
        .filter_map(|(key, w)| {
            w.rendered
                .as_ref()
                .err()
                .map(|e| (key.clone(), e.to_string()))
        })
        .collect();
    for (key, error) in &now {
        if reported.get(key) != Some(error) {
            warn!(gateway = %key, %error, "waypoint Gateway cannot be provisioned");
        }
    }
    for key in reported.keys() {
        if !now.contains_key(key) {
            info!(gateway = %key, "waypoint Gateway can be provisioned again (or is gone)");
        }
    }
    metrics
        .invalid_gateways
        .set(i64::try_from(now.len()).unwrap_or(i64::MAX));
    *reported = now;
}

/// `kind namespace/name` of a rendered object, for messages.
pub(crate) fn describe(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("object"),
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(addresses: &str) -> Gateway {
        serde_saphyr::from_str(&format!(
            "metadata: {{name: w, namespace: a}}\nspec: {{gatewayClassName: istio-waypoint, listeners: [], {addresses}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn gateways_with_addresses_of_their_own_are_not_provisioned() {
        assert!(managed(&gateway("addresses: []")));
        assert!(managed(&gateway("addresses: [{value: 10.0.0.1}]")));
        assert!(managed(&gateway(
            "addresses: [{type: IPAddress, value: 10.0.0.1}]"
        )));
        assert!(!managed(&gateway(
            "addresses: [{type: Hostname, value: my-waypoint.a.svc.cluster.local}]"
        )));
        assert!(!managed(&gateway(
            "addresses: [{value: 10.0.0.1}, {value: 10.0.0.2}]"
        )));
        let mut state = ClusterState::default();
        state.gateways.insert(
            ObjectKey::new("a", "w"),
            Arc::new(gateway("addresses: [{type: Hostname, value: elsewhere}]")),
        );
        assert!(plan(&state, &ProvisionConfig::default()).is_empty());
        state
            .gateways
            .insert(ObjectKey::new("a", "w"), Arc::new(gateway("addresses: []")));
        assert_eq!(plan(&state, &ProvisionConfig::default()).len(), 1);
    }
}
