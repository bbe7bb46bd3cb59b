//! The store as upstream ztunnel's `/config_dump` shows it: `workloads`,
//! `services` (each with its `endpoints`), `policies` and `stagedServices`
//! (endpoints of services not received yet), sorted by key so that two dumps
//! of the same state are byte-identical.

use std::collections::BTreeMap;

use serde::ser::SerializeStruct;

use super::{Endpoints, NamespacedHostname, Service, Snapshot};

pub struct SnapshotDump<'a> {
    snapshot: &'a Snapshot,
}

impl<'a> SnapshotDump<'a> {
    pub(super) fn new(snapshot: &'a Snapshot) -> Self {
        SnapshotDump { snapshot }
    }
}

#[derive(serde::Serialize)]
struct ServiceJson<'a> {
    #[serde(flatten)]
    service: &'a Service,
    endpoints: &'a Endpoints,
}

impl serde::Serialize for SnapshotDump<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let snap = self.snapshot;
        let no_endpoints = Endpoints::new();

        let workloads: BTreeMap<_, _> = snap.workloads.iter().map(|(k, w)| (k, &**w)).collect();
        let services: BTreeMap<_, _> = snap
            .services
            .iter()
            .map(|(key, service)| {
                let endpoints = snap.endpoints.get(key).map_or(&no_endpoints, |e| &**e);
                (key, ServiceJson { service, endpoints })
            })
            .collect();
        let policies: BTreeMap<_, _> = snap.policies.iter().map(|(k, p)| (k, &**p)).collect();
        let staged: BTreeMap<&NamespacedHostname, &Endpoints> = snap
            .endpoints
            .iter()
            .filter(|(key, _)| !snap.services.contains_key(*key))
            .map(|(key, eps)| (key, &**eps))
            .collect();

        let mut out = s.serialize_struct("ConfigDump", 4)?;
        out.serialize_field("workloads", &workloads.values().collect::<Vec<_>>())?;
        out.serialize_field("services", &services.values().collect::<Vec<_>>())?;
        out.serialize_field("policies", &policies.values().collect::<Vec<_>>())?;
        out.serialize_field("stagedServices", &staged)?;
        out.end()
    }
}
