//! Kubernetes mode: each waypoint's objects by server-side apply, field
//! manager [`FIELD_MANAGER`], forced: they are istiod-rs's, and a conflict
//! with another manager must not leave a waypoint half-updated (upstream's
//! deployment controller applies with `Force: true` too,
//! `pilot/pkg/config/kube/gateway/deploymentcontroller.go`). The template's
//! owner reference to the Gateway lets Kubernetes' garbage collector delete
//! them with it. Before them, the `istio-ca-root-cert` ConfigMap of the
//! namespace ([`root_cert`]). Then the Gateway's status, through its status
//! subresource with the same field manager.
//!
//! An object is applied again only when its rendered body differs from the
//! one last applied (a change of the Gateway or of the template's values),
//! or when the ServiceAccount or Service, once seen in the cluster state, is
//! gone from it (deleted by hand). A Deployment deleted by hand is not seen
//! (istiod-rs does not watch Deployments) until the Gateway changes or
//! istiod-rs restarts. The status is written only when istiod-rs's part
//! differs from what the Gateway carries, and not again while a write is on
//! its way back through the watch; a condition keeps its
//! lastTransitionTime while its status is unchanged.

use std::collections::{BTreeMap, BTreeSet};

use api::manifest::ObjectKey;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::gateway_status::{self, GatewayStatus};
use super::{FIELD_MANAGER, Plan, ProvisionError, ProvisionMetrics, Rendered, describe, root_cert};
use crate::state::ClusterState;
use crate::status::Clock;

/// Provisions waypoints through the Kubernetes API.
pub struct KubeProvisioner {
    client: Client,
    clock: Clock,
    roots_pem: watch::Receiver<String>,
    /// The body last applied of each object, by `Kind ns/name`.
    applied: BTreeMap<String, Value>,
    /// ServiceAccounts and Services applied and since seen in the cluster
    /// state, by `Kind ns/name`.
    observed: BTreeSet<String>,
    /// The status last written to each Gateway, with the resourceVersion
    /// the Gateway had when it was.
    written: BTreeMap<ObjectKey, (GatewayStatus, Option<String>)>,
}

impl KubeProvisioner {
    /// `roots_pem`: the mesh roots, published in each namespace with a
    /// waypoint, again whenever they change.
    pub fn new(client: Client, roots_pem: watch::Receiver<String>, clock: Clock) -> Self {
        KubeProvisioner {
            client,
            clock,
            roots_pem,
            applied: BTreeMap::new(),
            observed: BTreeSet::new(),
            written: BTreeMap::new(),
        }
    }

    /// The roots it publishes, as they change.
    pub fn roots(&self) -> watch::Receiver<String> {
        self.roots_pem.clone()
    }

    /// Applies what differs from `plan`; the errors of failed writes.
    pub async fn sync(
        &mut self,
        state: &ClusterState,
        plan: &Plan,
        metrics: &ProvisionMetrics,
    ) -> Vec<ProvisionError> {
        let mut errors = Vec::new();
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        let namespaces: BTreeSet<&str> = plan
            .values()
            .filter(|w| w.rendered.is_ok())
            .map(|w| w.key.namespace.as_str())
            .collect();
        let mut root_failed: BTreeMap<&str, ProvisionError> = BTreeMap::new();
        for namespace in namespaces {
            let roots_pem = self.roots_pem.borrow().clone();
            let body = root_cert::config_map(namespace, &roots_pem);
            wanted.insert(describe(&body));
            if let Err(e) = self.apply_if_changed(&body, metrics).await {
                root_failed.insert(namespace, e);
            }
        }
        for waypoint in plan.values() {
            let mut failed = root_failed.remove(waypoint.key.namespace.as_str());
            if let Ok(rendered) = &waypoint.rendered {
                self.forget_deleted(state, &waypoint.key.namespace, rendered);
                for object in &rendered.objects {
                    wanted.insert(describe(object));
                    if failed.is_some() {
                        continue;
                    }
                    if let Err(e) = self.apply_if_changed(object, metrics).await {
                        failed = Some(e);
                    }
                }
            }
            let status = gateway_status::desired(state, waypoint, failed.as_ref());
            errors.extend(failed);
            if let Err(e) = self
                .write_status(state, &waypoint.key, &status, metrics)
                .await
            {
                errors.push(e);
            }
        }
        // Objects of Gateways that are gone went with them (owner
        // references); forget them so a Gateway made again is applied.
        self.applied.retain(|object, _| wanted.contains(object));
        self.observed.retain(|object| wanted.contains(object));
        self.written.retain(|key, _| plan.contains_key(key));
        errors
    }

    /// A ServiceAccount or Service seen in the cluster state and gone from
    /// it since (deleted by someone) is applied again.
    fn forget_deleted(&mut self, state: &ClusterState, namespace: &str, rendered: &Rendered) {
        let key = |name: &str| ObjectKey::new(namespace, name);
        for (id, exists) in [
            (
                format!("ServiceAccount {namespace}/{}", rendered.service_account),
                state
                    .service_accounts
                    .contains_key(&key(&rendered.service_account)),
            ),
            (
                format!("Service {namespace}/{}", rendered.service),
                state.services.contains_key(&key(&rendered.service)),
            ),
        ] {
            if exists {
                self.observed.insert(id);
            } else if self.observed.remove(&id) {
                self.applied.remove(&id);
            }
        }
    }

    async fn apply_if_changed(
        &mut self,
        object: &Value,
        metrics: &ProvisionMetrics,
    ) -> Result<(), ProvisionError> {
        let name = describe(object);
        if self.applied.get(&name) == Some(object) {
            return Ok(());
        }
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let api = self.api(object);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = api
            .patch(
                object["metadata"]["name"].as_str().unwrap_or_default(),
                &params,
                &Patch::Apply(object),
            )
            .await;
        metrics.count(&kind, result.is_ok());
        result.map_err(|source| ProvisionError::Apply {
            object: name.clone(),
            source,
        })?;
        self.applied.insert(name, object.clone());
        Ok(())
    }

    fn api(&self, object: &Value) -> Api<DynamicObject> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let kind = object["kind"].as_str().unwrap_or_default();
        let gvk = GroupVersionKind::gvk(group, version, kind);
        Api::namespaced_with(
            self.client.clone(),
            object["metadata"]["namespace"].as_str().unwrap_or_default(),
            &ApiResource::from_gvk_with_plural(&gvk, plural(kind)),
        )
    }

    async fn write_status(
        &mut self,
        state: &ClusterState,
        key: &ObjectKey,
        status: &GatewayStatus,
        metrics: &ProvisionMetrics,
    ) -> Result<(), ProvisionError> {
        let Some(gateway) = state.gateways.get(key) else {
            return Ok(());
        };
        let live = gateway
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok());
        let version = gateway.metadata.resource_version.clone();
        if gateway_status::owned(live.as_ref()) == *status {
            self.written.insert(key.clone(), (status.clone(), version));
            return Ok(());
        }
        if let Some((written, seen)) = self.written.get(key)
            && written == status
            && *seen == version
        {
            // Written; the watch has not brought the new version back yet.
            return Ok(());
        }
        let now = (self.clock)();
        let time = |c: &crate::status::Condition| {
            Some(
                crate::status::kube::transition_time(live.as_ref(), None, c)
                    .unwrap_or_else(|| now.clone()),
            )
        };
        let body = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": key.name, "namespace": key.namespace},
            "status": gateway_status::status_json(status, &time),
        });
        let api = self.api(&body);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let result = api
            .patch_status(&key.name, &params, &Patch::Apply(&body))
            .await;
        match result {
            Ok(_) => metrics.count("GatewayStatus", true),
            // Deleted since: nothing to write.
            Err(e) if crate::state::kube::is_not_found(&e) => return Ok(()),
            Err(source) => {
                metrics.count("GatewayStatus", false);
                return Err(ProvisionError::Apply {
                    object: format!("the status of Gateway {key}"),
                    source,
                });
            }
        }
        self.written.insert(key.clone(), (status.clone(), version));
        Ok(())
    }
}

/// The resource name of each kind the provisioner writes.
fn plural(kind: &str) -> &'static str {
    match kind {
        "ServiceAccount" => "serviceaccounts",
        "Deployment" => "deployments",
        "Service" => "services",
        "ConfigMap" => "configmaps",
        "Gateway" => "gateways",
        // The template's kinds are checked when it is rendered.
        other => unreachable!("the provisioner writes no {other}"),
    }
}
