//! Kubernetes mode: statuses written through each object's status
//! subresource with server-side apply, field manager [`FIELD_MANAGER`],
//! forced (istiod-rs owns these conditions); a ServiceEntry's
//! `status.addresses` with a JSON patch instead ([`addresses_patch`]), its
//! `istio.io/WaypointBound` condition by server-side apply of the
//! conditions alone.
//!
//! The object as the watchers last saw it (in the [`Store`]) says what it
//! carries: nothing is written when istiod-rs's part already equals the
//! desired one, nor again while a write is on its way back through the
//! watch (the object's resourceVersion is still the one the write saw).
//! Conditions and route parents of other writers are applied back as they
//! are: the lists are atomic, so an apply replaces them whole. A condition
//! keeps its lastTransitionTime while its status (True/False) is unchanged.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::crd::service_entry::ServiceEntryAddress;
use api::manifest::Kind;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Clock, Condition, FIELD_MANAGER, ObjectStatus, ROUTE_CONTROLLER, StatusError, Statuses,
    carries, owned, parent_ref, status_json,
};
use crate::index::{PolicyRef, TargetRef};
use crate::state::{ClusterState, Store};

/// Writes statuses through the Kubernetes API.
pub struct KubeStatus {
    client: Client,
    store: Arc<Store>,
    clock: Clock,
    /// What was last written to each object, with the resourceVersion the
    /// object had when it was.
    written: BTreeMap<PolicyRef, (ObjectStatus, Option<String>)>,
}

/// An object as the watchers last saw it: its `status` and resourceVersion.
struct Live {
    status: Option<Value>,
    resource_version: Option<String>,
}

impl KubeStatus {
    pub fn new(client: Client, store: Arc<Store>, clock: Clock) -> Self {
        KubeStatus {
            client,
            store,
            clock,
            written: BTreeMap::new(),
        }
    }

    /// Brings the object's status to `status`; true when a write was made.
    pub async fn apply(
        &mut self,
        object: &PolicyRef,
        status: &ObjectStatus,
    ) -> Result<bool, StatusError> {
        let Some(live) = live(&self.store.read(), object) else {
            // Deleted since the statuses were computed.
            return Ok(false);
        };
        if carries(object.kind, status, live.status.as_ref()) {
            self.written
                .insert(object.clone(), (status.clone(), live.resource_version));
            return Ok(false);
        }
        if let Some((written, seen)) = self.written.get(object)
            && written == status
            && *seen == live.resource_version
        {
            // Written; the watch has not brought the new version back yet.
            return Ok(false);
        }
        // A ServiceEntry: its addresses by JSON patch, its conditions by
        // server-side apply (of the conditions alone), each when it differs.
        let desired = status;
        let mut status = status;
        let conditions_only;
        if let ObjectStatus::ServiceEntry {
            addresses,
            conditions,
        } = status
        {
            let live_addresses = match owned(object.kind, live.status.as_ref()) {
                ObjectStatus::ServiceEntry { addresses, .. } => addresses,
                _ => None,
            };
            let mut written = false;
            if let Some(addresses) = addresses
                && Some(addresses) != live_addresses.as_ref()
            {
                written = self
                    .patch_addresses(object, live.status.as_ref(), addresses)
                    .await?;
            }
            let wanted = ObjectStatus::ServiceEntry {
                addresses: None,
                conditions: conditions.clone(),
            };
            if carries(object.kind, &wanted, live.status.as_ref()) {
                if written {
                    self.written
                        .insert(object.clone(), (desired.clone(), live.resource_version));
                }
                return Ok(written);
            }
            conditions_only = ObjectStatus::Conditions(conditions.clone());
            status = &conditions_only;
        }
        let now = (self.clock)();
        let times = |parent: Option<&TargetRef>, c: &Condition| {
            Some(transition_time(live.status.as_ref(), parent, c).unwrap_or_else(|| now.clone()))
        };
        let (group, plural) = resource(object.kind);
        let body = json!({
            "apiVersion": super::api_version(object.kind),
            "kind": object.kind.as_str(),
            "metadata": {"name": object.key.name, "namespace": object.key.namespace},
            "status": status_json(status, live.status.as_ref(), &times),
        });
        let gvk = GroupVersionKind::gvk(group, "v1", object.kind.as_str());
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &object.key.namespace,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&object.key.name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => {}
            Err(e) if crate::state::kube::is_not_found(&e) => return Ok(false),
            Err(source) => {
                return Err(StatusError::Kube {
                    object: object.clone(),
                    source,
                });
            }
        }
        self.written
            .insert(object.clone(), (desired.clone(), live.resource_version));
        Ok(true)
    }

    /// Replaces a ServiceEntry's `status.addresses` with a JSON patch, as
    /// upstream's `statusPatchForAddresses` (istio/istio
    /// pilot/pkg/controllers/ipallocate/ipallocate.go): `test` that the
    /// addresses are still those the store shows, then `replace` them; or
    /// `add` them (and `status` when there is none). A test that fails (the
    /// object changed meanwhile) is an error, retried once the watch brought
    /// the new version. True when a write was made.
    async fn patch_addresses(
        &self,
        object: &PolicyRef,
        live: Option<&Value>,
        addresses: &[ServiceEntryAddress],
    ) -> Result<bool, StatusError> {
        let operations = addresses_patch(live, addresses);
        let patch: json_patch::Patch =
            serde_json::from_value(operations).map_err(|e| StatusError::Encode {
                object: object.clone(),
                reason: e.to_string(),
            })?;
        let (group, plural) = resource(object.kind);
        let gvk = GroupVersionKind::gvk(group, "v1", object.kind.as_str());
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            &object.key.namespace,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        );
        match api
            .patch_status(
                &object.key.name,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if crate::state::kube::is_not_found(&e) => Ok(false),
            Err(source) => Err(StatusError::Kube {
                object: object.clone(),
                source,
            }),
        }
    }

    /// Forgets objects that are gone (their status went with them).
    pub(super) fn retain(&mut self, statuses: &Statuses) {
        self.written
            .retain(|object, _| statuses.contains_key(object));
    }
}

/// The JSON patch that brings `status.addresses` from what `live` (the
/// object's `status`) carries to `addresses`.
pub(crate) fn addresses_patch(live: Option<&Value>, addresses: &[ServiceEntryAddress]) -> Value {
    match live {
        Some(status) if status.get("addresses").is_some() => json!([
            {"op": "test", "path": "/status/addresses", "value": status["addresses"]},
            {"op": "replace", "path": "/status/addresses", "value": addresses},
        ]),
        // No test of the whole status: other writers' fields would have to
        // read back exactly as this version decodes them.
        Some(status) if status.is_object() => json!([
            {"op": "add", "path": "/status/addresses", "value": addresses},
        ]),
        _ => json!([
            {"op": "add", "path": "/status", "value": {"addresses": addresses}},
        ]),
    }
}

/// The API group and plural of the kinds that carry statuses.
fn resource(kind: Kind) -> (&'static str, &'static str) {
    let plural = match kind {
        Kind::AuthorizationPolicy => "authorizationpolicies",
        Kind::PeerAuthentication => "peerauthentications",
        Kind::RequestAuthentication => "requestauthentications",
        Kind::HttpRoute => "httproutes",
        Kind::GrpcRoute => "grpcroutes",
        Kind::DestinationRule => "destinationrules",
        Kind::VirtualService => "virtualservices",
        Kind::ServiceEntry => "serviceentries",
        Kind::Service => "services",
        // desired() writes no other kind.
        other => unreachable!("no status is written on {other}"),
    };
    (kind.group(), plural)
}

fn live(state: &ClusterState, object: &PolicyRef) -> Option<Live> {
    fn of<S: Serialize>(meta: &kube::api::ObjectMeta, status: &Option<S>) -> Live {
        Live {
            status: status.as_ref().and_then(|s| serde_json::to_value(s).ok()),
            resource_version: meta.resource_version.clone(),
        }
    }
    let key = &object.key;
    match object.kind {
        Kind::AuthorizationPolicy => state
            .authorization_policies
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::PeerAuthentication => state
            .peer_authentications
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::RequestAuthentication => state
            .request_authentications
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::HttpRoute => state
            .http_routes
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::GrpcRoute => state
            .grpc_routes
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::DestinationRule => state
            .destination_rules
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::VirtualService => state
            .virtual_services
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::ServiceEntry => state
            .service_entries
            .get(key)
            .map(|o| of(&o.metadata, &o.status)),
        Kind::Service => state.services.get(key).map(|o| of(&o.metadata, &o.status)),
        _ => None,
    }
}

/// The live lastTransitionTime of a condition whose status is unchanged
/// (of a route parent, when one is given).
pub(crate) fn transition_time(
    live: Option<&Value>,
    parent: Option<&TargetRef>,
    c: &Condition,
) -> Option<String> {
    let live = live?;
    let conditions = match parent {
        None => live.get("conditions")?,
        Some(parent) => live
            .get("parents")?
            .as_array()?
            .iter()
            .find(|p| {
                p.get("controllerName").and_then(Value::as_str) == Some(ROUTE_CONTROLLER)
                    && parent_ref(p).as_ref() == Some(parent)
            })?
            .get("conditions")?,
    };
    let found = conditions.as_array()?.iter().find(|v| {
        Condition::from_json(v).is_some_and(|l| l.type_ == c.type_ && l.status == c.status)
    })?;
    found
        .get("lastTransitionTime")
        .and_then(Value::as_str)
        .map(str::to_string)
}
