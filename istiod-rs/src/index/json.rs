//! A readable JSON view of served resources: IPs as text, enums by name,
//! fields named as in the proto's JSON mapping (lowerCamelCase), defaults
//! left out (as proto3 JSON does). Used by the fixture goldens and by
//! `/debug/config_dump`.

use std::net::IpAddr;

use api::security::{self, Authorization, string_match::MatchType};
use api::type_url;
use api::workload::{
    self, Address, GatewayAddress, NetworkAddress, PortList, address, gateway_address,
};
use prost::Message;
use serde_json::{Map, Value, json};

use crate::snapshot::{Resource, Snapshot};

/// Every resource of the snapshot, by kind then key:
/// `{"workloads": {uid: ..}, "services": {key: ..}, "authorizations": {key: ..}}`.
pub fn snapshot_json(snapshot: &Snapshot) -> Value {
    let mut out = json!({"workloads": {}, "services": {}, "authorizations": {}});
    for url in snapshot.type_urls() {
        for (name, r) in snapshot.of_type(url) {
            let (group, value) = decode(r);
            out[group][name] = value;
        }
    }
    out
}

/// One resource as JSON; a body that does not decode says so.
pub fn resource_json(r: &Resource) -> Value {
    decode(r).1
}

/// The resource's group in [`snapshot_json`] and its JSON.
fn decode(r: &Resource) -> (&'static str, Value) {
    let bytes = r.body.value.as_slice();
    let decoded = match r.body.type_url.as_str() {
        type_url::ADDRESS => Address::decode(bytes).ok().and_then(|a| match a.r#type? {
            address::Type::Workload(w) => Some(("workloads", workload_json(&w))),
            address::Type::Service(s) => Some(("services", service_json(&s))),
        }),
        type_url::AUTHORIZATION => Authorization::decode(bytes)
            .ok()
            .map(|a| ("authorizations", authorization_json(&a))),
        type_url::TRAFFIC_POLICY => api::l7::TrafficPolicy::decode(bytes)
            .ok()
            .map(|p| ("trafficPolicies", super::traffic::json(&p))),
        type_url::ROUTE_TABLE => api::l7::RouteTable::decode(bytes)
            .ok()
            .map(|t| ("routeTables", super::virtual_services::route_table_json(&t))),
        _ => None,
    };
    decoded.unwrap_or_else(|| {
        (
            "undecodable",
            json!({"error": format!("cannot decode a {} resource", r.body.type_url)}),
        )
    })
}

/// Builds an object, leaving out empty values.
#[derive(Default)]
struct Obj(Map<String, Value>);

impl Obj {
    fn put(mut self, key: &str, value: impl Into<Value>) -> Self {
        let v = value.into();
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            Value::Bool(b) => !b,
            Value::Number(n) => n.as_u64() == Some(0),
        };
        if !empty {
            self.0.insert(key.to_string(), v);
        }
        self
    }

    /// Enums are always shown: their zero value (e.g. HEALTHY) is meaningful to a reader.
    fn name(mut self, key: &str, name: &str) -> Self {
        self.0
            .insert(key.to_string(), Value::String(name.to_string()));
        self
    }

    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn ip_text(bytes: &[u8]) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4).to_string()
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6).to_string()
    } else {
        format!("invalid address of {} bytes", bytes.len())
    }
}

fn network_address(a: &NetworkAddress) -> Value {
    Obj::default()
        .put("network", a.network.clone())
        .put("address", ip_text(&a.address))
        .done()
}

fn gateway_json(g: &Option<GatewayAddress>) -> Value {
    let Some(g) = g else {
        return Value::Null;
    };
    let o = match &g.destination {
        Some(gateway_address::Destination::Hostname(h)) => Obj::default().put(
            "hostname",
            json!({"namespace": h.namespace, "hostname": h.hostname}),
        ),
        Some(gateway_address::Destination::Address(a)) => {
            Obj::default().put("address", network_address(a))
        }
        None => Obj::default(),
    };
    o.put("hboneMtlsPort", g.hbone_mtls_port).done()
}

fn ports_json(ports: &[workload::Port]) -> Value {
    ports
        .iter()
        .map(|p| json!({"servicePort": p.service_port, "targetPort": p.target_port}))
        .collect()
}

fn workload_json(w: &workload::Workload) -> Value {
    let services: Map<String, Value> = w
        .services
        .iter()
        .map(|(k, PortList { ports })| (k.clone(), ports_json(ports)))
        .collect();
    Obj::default()
        .put("uid", w.uid.clone())
        .put("name", w.name.clone())
        .put("namespace", w.namespace.clone())
        .put(
            "addresses",
            w.addresses.iter().map(|a| ip_text(a)).collect::<Vec<_>>(),
        )
        .put("hostname", w.hostname.clone())
        .put("network", w.network.clone())
        .name("tunnelProtocol", w.tunnel_protocol().as_str_name())
        .put("nativeTunnel", w.native_tunnel)
        .put("trustDomain", w.trust_domain.clone())
        .put("serviceAccount", w.service_account.clone())
        .put("waypoint", gateway_json(&w.waypoint))
        .put("node", w.node.clone())
        .put("canonicalName", w.canonical_name.clone())
        .put("canonicalRevision", w.canonical_revision.clone())
        .name("workloadType", w.workload_type().as_str_name())
        .put("workloadName", w.workload_name.clone())
        .put("authorizationPolicies", w.authorization_policies.clone())
        .name("status", w.status().as_str_name())
        .put("clusterId", w.cluster_id.clone())
        .put("services", Value::Object(services))
        .put(
            "locality",
            w.locality.as_ref().map(|l| {
                Obj::default()
                    .put("region", l.region.clone())
                    .put("zone", l.zone.clone())
                    .put("subzone", l.subzone.clone())
                    .done()
            }),
        )
        .name("networkMode", w.network_mode().as_str_name())
        .done()
}

fn service_json(s: &workload::Service) -> Value {
    Obj::default()
        .put("name", s.name.clone())
        .put("namespace", s.namespace.clone())
        .put("hostname", s.hostname.clone())
        .put(
            "addresses",
            s.addresses.iter().map(network_address).collect::<Vec<_>>(),
        )
        .put("ports", ports_json(&s.ports))
        .put("waypoint", gateway_json(&s.waypoint))
        .put(
            "loadBalancing",
            s.load_balancing.as_ref().map(|lb| {
                Obj::default()
                    .put(
                        "routingPreference",
                        lb.routing_preference()
                            .map(|p| p.as_str_name())
                            .collect::<Vec<_>>(),
                    )
                    .name("mode", lb.mode().as_str_name())
                    .name("healthPolicy", lb.health_policy().as_str_name())
                    .done()
            }),
        )
        .name("ipFamilies", s.ip_families().as_str_name())
        .done()
}

fn string_match(m: &security::StringMatch) -> Value {
    match &m.match_type {
        Some(MatchType::Exact(s)) => json!({"exact": s}),
        Some(MatchType::Prefix(s)) => json!({"prefix": s}),
        Some(MatchType::Suffix(s)) => json!({"suffix": s}),
        Some(MatchType::Presence(())) => json!({"presence": {}}),
        None => json!({}),
    }
}

fn cidrs(a: &[security::Address]) -> Vec<String> {
    a.iter()
        .map(|a| format!("{}/{}", ip_text(&a.address), a.length))
        .collect()
}

fn match_json(m: &security::Match) -> Value {
    let sm = |v: &[security::StringMatch]| v.iter().map(string_match).collect::<Vec<_>>();
    let sa = |v: &[security::ServiceAccountMatch]| {
        v.iter()
            .map(|s| json!({"namespace": s.namespace, "serviceAccount": s.service_account}))
            .collect::<Vec<_>>()
    };
    Obj::default()
        .put("namespaces", sm(&m.namespaces))
        .put("notNamespaces", sm(&m.not_namespaces))
        .put("principals", sm(&m.principals))
        .put("notPrincipals", sm(&m.not_principals))
        .put("sourceIps", cidrs(&m.source_ips))
        .put("notSourceIps", cidrs(&m.not_source_ips))
        .put("destinationIps", cidrs(&m.destination_ips))
        .put("notDestinationIps", cidrs(&m.not_destination_ips))
        .put("destinationPorts", m.destination_ports.clone())
        .put("notDestinationPorts", m.not_destination_ports.clone())
        .put("serviceAccounts", sa(&m.service_accounts))
        .put("notServiceAccounts", sa(&m.not_service_accounts))
        .done()
}

fn authorization_json(a: &Authorization) -> Value {
    // Groups and rules are kept even when empty: an empty rule list means
    // "matches everything", which a reader must see.
    let groups: Vec<Value> = a
        .groups
        .iter()
        .map(|g| {
            let rules: Vec<Value> = g
                .rules
                .iter()
                .map(|r| json!({"matches": r.matches.iter().map(match_json).collect::<Vec<_>>()}))
                .collect();
            json!({ "rules": rules })
        })
        .collect();
    let mut o = Obj::default()
        .put("name", a.name.clone())
        .put("namespace", a.namespace.clone())
        .name("scope", a.scope().as_str_name())
        .name("action", a.action().as_str_name())
        .done();
    o["groups"] = Value::Array(groups);
    o
}
