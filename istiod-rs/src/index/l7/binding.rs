//! The `Waypoint` resource: what one waypoint serves, the root of its scope.
//!
//! One per Gateway of class `istio-waypoint`, key `<ns>/<name>`:
//! - `services`: every Service bound to it (the bindings of
//!   `index/waypoints.rs`), each with its ports and their protocol, the key
//!   of its RouteTable (when a route attaches), the HttpAuthorization and
//!   JwtAuthentication keys that target it (`targetRefs` kind Service), and a
//!   `deny_all_reason` when an L7 rule for it cannot be translated at all;
//! - `workloads`: the pods bound to it directly (`waypoint-for: workload` or
//!   `all`), protocol detected on every port;
//! - `gateway_authorizations` / `gateway_authentications`: the keys of the
//!   policies whose `targetRefs` name the waypoint Gateway itself.
//!
//! Policies are listed by target, whether or not the waypoint is ready: its
//! configuration holds them before the L4 stand-in DENY goes away.
//!
//! Protocol of a service port, as upstream's `ConvertProtocol`
//! (istio/istio pkg/config/kube/conversion.go) and `protocol.Parse`
//! (pkg/config/protocol/instance.go): UDP ports are not served; the name
//! read is `appProtocol` when set, else the port name; `grpc-web...` is
//! gRPC-Web, otherwise the part before the first `-` is parsed case-
//! insensitively: `http` / `http_proxy` -> HTTP, `http2` -> HTTP2, `grpc` /
//! `grpc-web` -> GRPC, `tcp` / `tls` / `https` / `mongo` / `redis` / `mysql` ->
//! TCP (opaque), anything else -> DETECT, except on the server-first ports
//! 25, 53, 3306 and 27017 which upstream never sniffs (TCP). Beyond
//! upstream's list, Gateway API's `kubernetes.io/h2c` and a name `h2c` are
//! HTTP2 (prior knowledge) and `kubernetes.io/ws` is HTTP; `kubernetes.io/wss`
//! is TCP (TLS inside).

use std::collections::{BTreeMap, BTreeSet};

use api::l7::{Protocol, ServedPort, ServedService, ServedWorkload, Waypoint};
use api::labels;
use api::manifest::Kind;
use k8s_openapi::api::core::v1::ServicePort;

use super::super::selectors::labels_of;
use super::super::services::Services;
use super::super::waypoints::{Traffic, Waypoints};
use super::super::{MeshConfig, ip_bytes, workloads};
use super::{L7Rule, TargetOutcome};
use crate::state::{ClusterState, pod_service_account};

/// Waypoints (`ns/name`) with at least one ready instance: a pod in the
/// Gateway's namespace labelled `gateway.networking.k8s.io/gateway-name:
/// <name>`, condition Ready True and not being deleted.
pub(in crate::index) fn ready_waypoints(state: &ClusterState) -> BTreeSet<String> {
    state
        .pods
        .iter()
        .filter(|(_, pod)| workloads::healthy(pod) && workloads::addresses(pod).is_some())
        .filter_map(|(key, pod)| {
            let name = labels_of(&pod.metadata.labels).get(labels::GATEWAY_NAME)?;
            let gateway = state.gateways.get(&api::manifest::ObjectKey::new(
                &key.namespace,
                name.as_str(),
            ))?;
            (gateway.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS)
                .then(|| format!("{}/{name}", key.namespace))
        })
        .collect()
}

/// The protocol a waypoint speaks on a service port (see the module doc).
/// `None`: not served (UDP, SCTP).
pub(in crate::index) fn protocol(port: &ServicePort) -> Option<Protocol> {
    if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
        return None;
    }
    let name = port
        .app_protocol
        .as_deref()
        .or(port.name.as_deref())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let parsed = match name.as_str() {
        "kubernetes.io/h2c" => Some(Protocol::Http2),
        "kubernetes.io/ws" => Some(Protocol::Http),
        "kubernetes.io/wss" => Some(Protocol::Tcp),
        n if n.starts_with("grpc-web") => Some(Protocol::Grpc),
        n => match n.split('-').next().unwrap_or_default() {
            "http" | "http_proxy" => Some(Protocol::Http),
            "http2" | "h2c" => Some(Protocol::Http2),
            "grpc" => Some(Protocol::Grpc),
            "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" => Some(Protocol::Tcp),
            _ => None,
        },
    };
    Some(parsed.unwrap_or(match port.port {
        25 | 53 | 3306 | 27017 => Protocol::Tcp,
        _ => Protocol::Detect,
    }))
}

/// What the other L7 translations produced that the bindings name.
pub(in crate::index) struct Named<'a> {
    pub rules: &'a [L7Rule],
    /// Keys of the HttpAuthorization resources served.
    pub authorizations: &'a BTreeSet<String>,
    /// Keys of the JwtAuthentication resources served.
    pub authentications: &'a BTreeSet<String>,
    /// Keys of the RouteTable resources served (service keys).
    pub route_tables: &'a BTreeSet<String>,
    /// Service index -> why it must be refused entirely.
    pub deny_all: &'a BTreeMap<usize, Vec<String>>,
}

/// One `Waypoint` per waypoint Gateway, by key.
pub(in crate::index) fn waypoints(
    state: &ClusterState,
    mesh: &MeshConfig,
    waypoints: &Waypoints,
    services: &Services<'_>,
    service_waypoints: &[Option<String>],
    named: &Named<'_>,
) -> BTreeMap<String, Waypoint> {
    let mut out: BTreeMap<String, Waypoint> = state
        .gateways
        .iter()
        .filter(|(_, gw)| gw.spec.gateway_class_name == labels::WAYPOINT_GATEWAY_CLASS)
        .map(|(key, _)| {
            (
                key.to_string(),
                Waypoint {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    ..Waypoint::default()
                },
            )
        })
        .collect();

    // Policy keys by what they target.
    let mut by_service: BTreeMap<usize, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for rule in named.rules {
        let key = rule.object.key.to_string();
        let list = match rule.object.kind {
            Kind::AuthorizationPolicy if named.authorizations.contains(&key) => 0,
            Kind::RequestAuthentication if named.authentications.contains(&key) => 1,
            _ => continue,
        };
        for t in &rule.targets {
            if let Some(i) = TargetOutcome::service(t) {
                let lists = by_service.entry(i).or_default();
                push_unique(
                    if list == 0 {
                        &mut lists.0
                    } else {
                        &mut lists.1
                    },
                    &key,
                );
            }
            if let Some(w) = t.waypoint()
                && let Some(wp) = out.get_mut(w)
            {
                let l = if list == 0 {
                    &mut wp.gateway_authorizations
                } else {
                    &mut wp.gateway_authentications
                };
                push_unique(l, &key);
            }
        }
    }

    for (i, (entry, bound)) in services.entries.iter().zip(service_waypoints).enumerate() {
        let Some(wp) = bound.as_ref().and_then(|w| out.get_mut(w)) else {
            continue;
        };
        let spec = entry.service.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| {
                Some(ServedPort {
                    port: u32::try_from(p.port).ok()?,
                    protocol: protocol(p)? as i32,
                })
            })
            .collect();
        let (authorizations, authentications) = by_service.remove(&i).unwrap_or_default();
        wp.services.push(ServedService {
            namespace: entry.namespace.to_string(),
            hostname: entry.proto.hostname.clone(),
            ports,
            route_table: if named.route_tables.contains(&entry.key) {
                entry.key.clone()
            } else {
                String::new()
            },
            authorizations,
            authentications,
            deny_all_reason: named
                .deny_all
                .get(&i)
                .map(|r| r.join("; "))
                .unwrap_or_default(),
        });
    }

    for (key, pod) in &state.pods {
        let pod_labels = labels_of(&pod.metadata.labels);
        if waypoints.is_instance(&key.namespace, pod_labels) {
            continue;
        }
        let Some(addresses) = workloads::addresses(pod) else {
            continue;
        };
        let bound = waypoints.bound(
            state,
            &key.namespace,
            pod_labels,
            Some(pod_service_account(pod)),
            Traffic::Workload,
        );
        let Some(wp) = bound.and_then(|w| out.get_mut(&w.key())) else {
            continue;
        };
        wp.workloads.push(ServedWorkload {
            uid: mesh.pod_uid(&key.namespace, &key.name),
            addresses: addresses.into_iter().map(ip_bytes).collect(),
            ..ServedWorkload::default()
        });
    }
    out
}

fn push_unique(list: &mut Vec<String>, key: &str) {
    if !list.iter().any(|k| k == key) {
        list.push(key.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(
        name: Option<&str>,
        app: Option<&str>,
        number: i32,
        proto: Option<&str>,
    ) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            app_protocol: app.map(str::to_string),
            port: number,
            protocol: proto.map(str::to_string),
            ..ServicePort::default()
        }
    }

    #[test]
    fn protocol_follows_app_protocol_then_the_port_name_prefix() {
        let cases = [
            (port(Some("http-web"), None, 80, None), Some(Protocol::Http)),
            (port(Some("HTTP2"), None, 80, None), Some(Protocol::Http2)),
            (
                port(Some("grpc-web-ui"), None, 80, None),
                Some(Protocol::Grpc),
            ),
            (port(Some("grpc"), None, 80, None), Some(Protocol::Grpc)),
            (port(Some("h2c-api"), None, 80, None), Some(Protocol::Http2)),
            (port(Some("tcp-db"), None, 80, None), Some(Protocol::Tcp)),
            (port(Some("https"), None, 443, None), Some(Protocol::Tcp)),
            (port(Some("web"), None, 80, None), Some(Protocol::Detect)),
            (port(None, None, 80, None), Some(Protocol::Detect)),
            // appProtocol wins over the name.
            (
                port(Some("tcp"), Some("http"), 80, None),
                Some(Protocol::Http),
            ),
            (
                port(Some("web"), Some("kubernetes.io/h2c"), 80, None),
                Some(Protocol::Http2),
            ),
            (
                port(Some("web"), Some("kubernetes.io/ws"), 80, None),
                Some(Protocol::Http),
            ),
            (
                port(Some("web"), Some("kubernetes.io/wss"), 80, None),
                Some(Protocol::Tcp),
            ),
            // Server-first ports are never sniffed.
            (port(Some("db"), None, 3306, None), Some(Protocol::Tcp)),
            (port(Some("http"), None, 3306, None), Some(Protocol::Http)),
            // UDP is not served.
            (port(Some("dns"), None, 53, Some("UDP")), None),
        ];
        for (p, want) in cases {
            assert_eq!(protocol(&p), want, "{p:?}");
        }
    }
}
