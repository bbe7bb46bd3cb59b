//! The handlers that join the xDS client to the workload store: one per
//! resource type, each turning one response into one store batch.

use api::security::Authorization as XdsAuthorization;
use api::workload::{Address as XdsAddress, address};

use super::{Handler, Rejected, Update, rejections};
use crate::authorization::Authorization;
use crate::store::{Service, Workload, WorkloadStore};

/// `type.googleapis.com/istio.workload.Address`: workloads keyed by uid,
/// services keyed by `namespace/hostname`.
#[derive(Clone, Debug)]
pub struct AddressHandler {
    store: WorkloadStore,
}

impl AddressHandler {
    pub fn new(store: WorkloadStore) -> Self {
        AddressHandler { store }
    }
}

impl Handler<XdsAddress> for AddressHandler {
    fn apply(&self, updates: Vec<Update<XdsAddress>>) -> Result<(), Vec<Rejected>> {
        let mut rejected = Vec::new();
        self.store.update(|batch| {
            for Update { name, resource } in updates {
                let Some(resource) = resource else {
                    batch.remove_address(&name);
                    continue;
                };
                match resource.r#type {
                    Some(address::Type::Workload(w)) => match Workload::try_from(w) {
                        Ok(w) if w.uid != name => rejected.push(Rejected::new(
                            name,
                            format!("uid {:?} must equal the resource name", w.uid),
                        )),
                        Ok(w) => batch.insert_workload(w),
                        Err(e) => rejected.push(Rejected::new(name, format!("workload {e}"))),
                    },
                    Some(address::Type::Service(s)) => match Service::try_from(s) {
                        Ok(s) if s.key().to_string() != name => rejected.push(Rejected::new(
                            name,
                            format!(
                                "namespace/hostname {:?} must equal the resource name",
                                s.key().to_string()
                            ),
                        )),
                        Ok(s) => batch.insert_service(s),
                        Err(e) => rejected.push(Rejected::new(name, format!("service {e}"))),
                    },
                    None => rejected.push(Rejected::new(
                        name,
                        "the Address holds neither a workload nor a service",
                    )),
                }
            }
        });
        rejections(rejected)
    }
}

/// `type.googleapis.com/istio.security.Authorization`, keyed `namespace/name`.
#[derive(Clone, Debug)]
pub struct AuthorizationHandler {
    store: WorkloadStore,
}

impl AuthorizationHandler {
    pub fn new(store: WorkloadStore) -> Self {
        AuthorizationHandler { store }
    }
}

impl Handler<XdsAuthorization> for AuthorizationHandler {
    fn apply(&self, updates: Vec<Update<XdsAuthorization>>) -> Result<(), Vec<Rejected>> {
        let mut rejected = Vec::new();
        self.store.update(|batch| {
            for Update { name, resource } in updates {
                let Some(resource) = resource else {
                    batch.remove_policy(&name);
                    continue;
                };
                match Authorization::try_from(resource) {
                    Ok(p) if p.key() != name => rejected.push(Rejected::new(
                        name,
                        format!("namespace/name {:?} must equal the resource name", p.key()),
                    )),
                    Ok(p) => batch.insert_policy(p),
                    Err(e) => rejected.push(Rejected::new(name, format!("authorization {e}"))),
                }
            }
        });
        rejections(rejected)
    }
}

/// Wires both handlers for `store` into `client`.
pub fn subscribe_store(client: super::XdsClient, store: &WorkloadStore) -> super::XdsClient {
    client
        .with_handler(api::type_url::ADDRESS, AddressHandler::new(store.clone()))
        .with_handler(
            api::type_url::AUTHORIZATION,
            AuthorizationHandler::new(store.clone()),
        )
}
