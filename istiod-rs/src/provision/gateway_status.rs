//! What a waypoint Gateway's status says, in upstream's terms
//! (istio/istio `pilot/pkg/config/kube/gateway/conversion.go`
//! `reportGatewayStatus`, and the Gateway API's condition reasons):
//!
//! | case | Accepted | Programmed | addresses |
//! |---|---|---|---|
//! | provisioned, a ready pod | True `Accepted` | True `Programmed` "Resource programmed, assigned to service(s) <host>:15008" | the Service's hostname, then its ClusterIP |
//! | provisioned, no ready pod yet | True `Accepted` | False `AddressNotAssigned` | none (kept once reported) |
//! | a write failed | True `Accepted` | False `Pending`, the error | as above |
//! | cannot be provisioned | False `InvalidParameters`, the field | False `Invalid` | kept as they are |
//!
//! As upstream, an address is reported only once the waypoint has a ready
//! pod (its Deployment has a ready replica; istiod-rs reads the pods, which
//! it watches anyway) and, once reported, never removed: proxies keep
//! reaching the waypoint while its pods restart. The index reads these
//! addresses to bind workloads and services to the waypoint.

use api::labels;
use serde_json::{Value, json};

use super::{ProvisionError, Waypoint};
use crate::state::{ClusterState, in_namespace, pod_is_terminal};
use crate::status::Condition;

pub const ACCEPTED: &str = "Accepted";
pub const PROGRAMMED: &str = "Programmed";
/// The condition types the provisioner owns on a Gateway.
pub const OWNED_CONDITIONS: [&str; 2] = [ACCEPTED, PROGRAMMED];

/// One `status.addresses[]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// `Hostname` or `IPAddress`.
    pub type_: String,
    pub value: String,
}

/// istiod-rs's part of a waypoint Gateway's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayStatus {
    pub addresses: Vec<Address>,
    pub conditions: Vec<Condition>,
}

fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation: generation,
    }
}

/// The status `waypoint` should carry, `failed` being the error of a write
/// of its objects that failed.
pub fn desired(
    state: &ClusterState,
    waypoint: &Waypoint,
    failed: Option<&ProvisionError>,
) -> GatewayStatus {
    let key = &waypoint.key;
    let generation = waypoint.generation;
    let live = live(state, waypoint);
    let rendered = match &waypoint.rendered {
        Ok(rendered) => rendered,
        Err(error) => {
            return GatewayStatus {
                addresses: live,
                conditions: vec![
                    condition(
                        ACCEPTED,
                        false,
                        "InvalidParameters",
                        format!("the waypoint cannot be provisioned: {error}"),
                        generation,
                    ),
                    condition(
                        PROGRAMMED,
                        false,
                        "Invalid",
                        "not provisioned: the Gateway is not accepted".into(),
                        generation,
                    ),
                ],
            };
        }
    };
    let accepted = condition(
        ACCEPTED,
        true,
        "Accepted",
        "Resource accepted".into(),
        generation,
    );
    let ready = ready_pods(state, &key.namespace, &key.name);
    let programmed = match failed {
        Some(error) => condition(
            PROGRAMMED,
            false,
            "Pending",
            format!("the waypoint's objects could not all be written (retrying): {error}"),
            generation,
        ),
        None if ready > 0 => condition(
            PROGRAMMED,
            true,
            "Programmed",
            format!(
                "Resource programmed, assigned to service(s) {}:{}",
                rendered.hostname,
                api::ports::HBONE
            ),
            generation,
        ),
        None => condition(
            PROGRAMMED,
            false,
            "AddressNotAssigned",
            format!(
                "Failed to assign to any requested addresses: Deployment {}/{} has no ready replica yet",
                key.namespace, rendered.service
            ),
            generation,
        ),
    };
    let addresses = if ready > 0 || !live.is_empty() {
        let mut addresses = vec![Address {
            type_: "Hostname".into(),
            value: rendered.hostname.clone(),
        }];
        let cluster_ip = state
            .services
            .get(&api::manifest::ObjectKey::new(
                key.namespace.as_str(),
                rendered.service.as_str(),
            ))
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.cluster_ip.clone())
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok());
        if let Some(ip) = cluster_ip {
            addresses.push(Address {
                type_: "IPAddress".into(),
                value: ip,
            });
        }
        addresses
    } else {
        Vec::new()
    };
    GatewayStatus {
        addresses,
        conditions: vec![accepted, programmed],
    }
}

/// Pods of the waypoint (labelled with its Gateway's name) that are ready.
fn ready_pods(state: &ClusterState, namespace: &str, gateway: &str) -> usize {
    in_namespace(&state.pods, namespace)
        .filter(|pod| {
            pod.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(labels::GATEWAY_NAME))
                .map(String::as_str)
                == Some(gateway)
        })
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && !pod_is_terminal(pod))
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count()
}

/// The addresses the Gateway carries now.
fn live(state: &ClusterState, waypoint: &Waypoint) -> Vec<Address> {
    state
        .gateways
        .get(&waypoint.key)
        .and_then(|gw| gw.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .map(|a| Address {
            // The API server defaults an untyped address to IPAddress.
            type_: a.r#type.clone().unwrap_or_else(|| "IPAddress".into()),
            value: a.value.clone(),
        })
        .collect()
}

/// istiod-rs's part of a Gateway's `status` as the API carries it.
pub fn owned(status: Option<&Value>) -> GatewayStatus {
    let list = |field: &str| {
        status
            .and_then(|s| s.get(field))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    GatewayStatus {
        addresses: list("addresses")
            .iter()
            .map(|a| Address {
                type_: a
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("IPAddress")
                    .to_string(),
                value: a
                    .get("value")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect(),
        conditions: list("conditions")
            .iter()
            .filter_map(Condition::from_json)
            .filter(|c| OWNED_CONDITIONS.contains(&c.type_.as_str()))
            .collect(),
    }
}

/// The `status` to write; `time` gives each condition its
/// lastTransitionTime (none in local mode).
pub fn status_json(status: &GatewayStatus, time: &dyn Fn(&Condition) -> Option<String>) -> Value {
    let mut v = json!({
        "conditions": status
            .conditions
            .iter()
            .map(|c| c.to_json(time(c).as_deref()))
            .collect::<Vec<_>>(),
    });
    if !status.addresses.is_empty() {
        v["addresses"] = status
            .addresses
            .iter()
            .map(|a| json!({"type": a.type_, "value": a.value}))
            .collect();
    }
    v
}
