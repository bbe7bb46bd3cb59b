//! `/config_dump` section `l7`: what the waypoint serves and the routes and
//! traffic policies it holds, by name, so an operator can see why a request
//! went where it went. Policy internals are listed by key only.

use serde_json::{Value, json};

use proxy_core::admin::DumpSection;

use super::store::{L7Snapshot, L7Store};
use crate::http::route::{Action, Route};
use crate::request::Protocol;

impl DumpSection for L7Store {
    fn key(&self) -> &'static str {
        "l7"
    }

    fn dump(&self) -> Value {
        self.snapshot().dump()
    }
}

impl L7Snapshot {
    pub fn dump(&self) -> Value {
        // The contract's names (`l7::Protocol`).
        let protocol = |p: &Protocol| match p {
            Protocol::Detect => "DETECT",
            Protocol::Http1 => "HTTP",
            Protocol::Http2 => "HTTP2",
            Protocol::Grpc => "GRPC",
            Protocol::Tcp => "TCP",
        };
        let ports = |ports: &[(u16, Protocol)]| {
            ports
                .iter()
                .map(|(port, p)| json!({"port": port, "protocol": protocol(p)}))
                .collect::<Vec<_>>()
        };
        let waypoints: Vec<Value> = self
            .waypoints
            .values()
            .map(|w| {
                json!({
                    "waypoint": w.key(),
                    "gatewayAuthorizations": w.gateway_authorizations,
                    "gatewayAuthentications": w.gateway_authentications,
                    "forwardClientIdentity": w.forward_client_identity,
                    "services": w.services.iter().map(|s| json!({
                        "service": s.service.to_string(),
                        "ports": ports(&s.ports),
                        "routeTable": s.route_table,
                        "authorizations": s.authorizations,
                        "authentications": s.authentications,
                        "denyAllReason": s.deny_all_reason,
                    })).collect::<Vec<_>>(),
                    "workloads": w.workloads.iter().map(|wl| json!({
                        "uid": wl.uid,
                        "addresses": wl.addresses,
                        "ports": ports(&wl.ports),
                        "authorizations": wl.authorizations,
                        "authentications": wl.authentications,
                        "denyAllReason": wl.deny_all_reason,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let routes: serde_json::Map<String, Value> = self
            .route_tables
            .iter()
            .map(|(key, t)| {
                (
                    key.clone(),
                    Value::from(t.routes.iter().map(route).collect::<Vec<_>>()),
                )
            })
            .collect();
        let traffic: serde_json::Map<String, Value> = self
            .traffic_policies
            .iter()
            .map(|(key, t)| {
                (
                    key.clone(),
                    json!({
                        "origin": t.origin.to_string(),
                        "loadBalancer": format!("{:?}", t.default_policy.load_balancer()),
                        "outlierDetection": t.default_policy.outlier_detection.is_some(),
                        "ports": t.ports.iter().map(|(p, _)| p).collect::<Vec<_>>(),
                        "subsets": t.subsets.iter().map(|s| json!({
                            "name": s.name,
                            "workloadUids": s.workload_uids,
                        })).collect::<Vec<_>>(),
                    }),
                )
            })
            .collect();
        json!({
            "generation": self.generation(),
            "waypoints": waypoints,
            "routeTables": routes,
            "authorizations": self.authorizations.keys().collect::<Vec<_>>(),
            "authentications": self.authentications.keys().collect::<Vec<_>>(),
            "trafficPolicies": traffic,
        })
    }
}

fn route(r: &Route) -> Value {
    let action = match &r.action {
        Action::Forward(f) => json!({"forward": f.backends.iter().map(|b| json!({
            "service": b.service.to_string(),
            "port": b.port,
            "subset": b.subset,
            "weight": b.weight,
            "invalidReason": b.invalid_reason,
        })).collect::<Vec<_>>()}),
        Action::Redirect(rd) => json!({"redirect": {
            "status": rd.status.as_u16(),
            "scheme": rd.scheme,
            "hostname": rd.hostname,
            "port": rd.port,
        }}),
        Action::DirectResponse { status, .. } => json!({"directResponse": status.as_u16()}),
    };
    json!({
        "origin": r.origin.to_string(),
        "ports": r.ports,
        "matches": r.matches.len(),
        "action": action,
        "fault": r.fault.is_some(),
        "retryAttempts": r.retry.as_ref().map(|p| p.attempts),
    })
}
