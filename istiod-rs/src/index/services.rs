//! Kubernetes Services -> `istio.workload.Service`, and which services each
//! pod backs.
//!
//! As upstream: the key and hostname are `<ns>/<name>.<ns>.svc.<domain>`;
//! VIPs are `spec.clusterIPs` (none for a headless service); ExternalName
//! services are not served; a port's target is its number, or 0 when it
//! names a container port, resolved per pod in the workload's `services`
//! map. A pod backs a service whose non-empty selector its labels satisfy,
//! or (services without selectors) whose EndpointSlices reference it.
//!
//! Every Kubernetes Service is `canonical` for its hostname (our choice: no
//! upstream source in reach says what upstream sets). Each port's
//! `app_protocol` is what `toAppProtocolFromKube` makes of it
//! ([`app_protocol`]; read in agentgateway's port of upstream's ambient
//! index, `constructService` in its services.go). The index sets
//! `ingress_use_waypoint` once the waypoint is known ([`ingress_use_waypoint`],
//! upstream's `ingressUseWaypointFromLabels`).

use std::collections::BTreeMap;

use api::workload::{
    AppProtocol, IpFamilies, LoadBalancing, NetworkAddress, Port, PortList,
    load_balancing::{HealthPolicy, Mode, Scope},
};
use k8s_openapi::api::core::v1::{Pod, Service, ServicePort as KubePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::MeshConfig;
use super::selectors::{Labels, labels_of, subset_of};
use crate::state::ClusterState;

/// Label on an EndpointSlice naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One service port.
#[derive(Debug, Clone)]
struct ServicePort {
    name: Option<String>,
    port: u32,
    /// 0 when the target is a container port name.
    target: u32,
    target_name: Option<String>,
    app_protocol: AppProtocol,
}

/// A service and what is needed to list it on its workloads.
#[derive(Debug)]
pub(super) struct ServiceEntry<'a> {
    /// `namespace/hostname`.
    pub key: String,
    pub namespace: &'a str,
    pub service: &'a Service,
    pub proto: api::workload::Service,
    ports: Vec<ServicePort>,
}

impl ServiceEntry<'_> {
    /// The service port of the port named `name`.
    pub fn port_named(&self, name: &str) -> Option<u32> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }

    pub fn labels(&self) -> &Labels {
        labels_of(&self.service.metadata.labels)
    }

    /// The ports as a given pod serves them: named targets resolved to the
    /// pod's container port, and dropped when the pod has no such port.
    pub fn ports_for(&self, pod: &Pod) -> PortList {
        let ports = self
            .ports
            .iter()
            .filter_map(|p| {
                let target = match &p.target_name {
                    Some(name) => container_port(pod, name)?,
                    None => p.target,
                };
                Some(Port {
                    service_port: p.port,
                    target_port: target,
                    app_protocol: AppProtocol::Unknown as i32,
                })
            })
            .collect();
        PortList { ports }
    }
}

/// A TCP container port of the pod by name.
fn container_port(pod: &Pod, name: &str) -> Option<u32> {
    pod.spec.as_ref()?.containers.iter().find_map(|c| {
        c.ports.iter().flatten().find_map(|p| {
            let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
            (tcp && p.name.as_deref() == Some(name)).then_some(p.container_port as u32)
        })
    })
}

/// All services, and the lookups from a pod to the services it backs.
#[derive(Debug, Default)]
pub(super) struct Services<'a> {
    pub entries: Vec<ServiceEntry<'a>>,
    /// (namespace, label, value) of each selector's first pair -> entries.
    by_first_selector_label: BTreeMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// (namespace, pod name) -> entries whose EndpointSlices name the pod.
    by_endpoint_pod: BTreeMap<(&'a str, &'a str), Vec<usize>>,
    /// (namespace, name) -> entry.
    by_name: BTreeMap<(&'a str, &'a str), usize>,
}

impl<'a> Services<'a> {
    pub fn build(state: &'a ClusterState, mesh: &MeshConfig) -> Self {
        let mut services = Services::default();
        for (key, svc) in &state.services {
            let Some(spec) = svc.spec.as_ref() else {
                continue;
            };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let index = services.entries.len();
            let hostname = mesh.service_hostname(&key.name, &key.namespace);
            if let Some((k, v)) = spec.selector.iter().flatten().next() {
                services
                    .by_first_selector_label
                    .entry((key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(index);
            }
            services
                .by_name
                .insert((key.namespace.as_str(), key.name.as_str()), index);
            let ports: Vec<ServicePort> = spec
                .ports
                .iter()
                .flatten()
                .map(|p| {
                    let (target, target_name) = match &p.target_port {
                        Some(IntOrString::Int(n)) => (*n as u32, None),
                        Some(IntOrString::String(name)) => (0, Some(name.clone())),
                        // The API server defaults the target to the port.
                        None => (p.port as u32, None),
                    };
                    ServicePort {
                        name: p.name.clone(),
                        port: p.port as u32,
                        target,
                        target_name,
                        app_protocol: app_protocol(p),
                    }
                })
                .collect();
            let proto = api::workload::Service {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                hostname: hostname.clone(),
                addresses: vips(svc)
                    .into_iter()
                    .map(|ip| NetworkAddress {
                        network: mesh.network.clone(),
                        address: super::ip_bytes(ip),
                    })
                    .collect(),
                ports: ports
                    .iter()
                    .map(|p| Port {
                        service_port: p.port,
                        target_port: p.target,
                        app_protocol: p.app_protocol as i32,
                    })
                    .collect(),
                load_balancing: load_balancing(svc),
                ip_families: ip_families(svc) as i32,
                // A Kubernetes Service is canonical for its hostname.
                canonical: true,
                ..Default::default()
            };
            services.entries.push(ServiceEntry {
                key: format!("{}/{hostname}", key.namespace),
                namespace: key.namespace.as_str(),
                service: svc,
                proto,
                ports,
            });
        }
        for slice in state.endpoint_slices.values() {
            let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
            let Some(index) = services.for_slice(slice) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                if let Some(r) = &ep.target_ref
                    && r.kind.as_deref() == Some("Pod")
                    && let Some(pod) = r.name.as_deref()
                {
                    let list = services.by_endpoint_pod.entry((ns, pod)).or_default();
                    if !list.contains(&index) {
                        list.push(index);
                    }
                }
            }
        }
        services
    }

    /// The service `namespace/name`, when it is served.
    pub fn named(&self, namespace: &str, name: &str) -> Option<usize> {
        self.by_name.get(&(namespace, name)).copied()
    }

    /// The service an EndpointSlice belongs to (its service-name label).
    pub fn for_slice(&self, slice: &EndpointSlice) -> Option<usize> {
        let ns = slice.metadata.namespace.as_deref()?;
        let name = labels_of(&slice.metadata.labels).get(SERVICE_NAME_LABEL)?;
        self.named(ns, name)
    }

    /// Indices of the services a pod backs, in key order.
    pub fn backed_by(&self, namespace: &str, name: &str, labels: &Labels) -> Vec<usize> {
        let mut found: Vec<usize> = Vec::new();
        for (k, v) in labels {
            if let Some(candidates) =
                self.by_first_selector_label
                    .get(&(namespace, k.as_str(), v.as_str()))
            {
                for &i in candidates {
                    let selector = self.entries[i]
                        .service
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref());
                    if selector.is_some_and(|s| subset_of(s, labels)) {
                        found.push(i);
                    }
                }
            }
        }
        if let Some(by_slice) = self.by_endpoint_pod.get(&(namespace, name)) {
            found.extend(by_slice);
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

pub(super) fn vips(svc: &Service) -> Vec<std::net::IpAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    ips.into_iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

fn ip_families(svc: &Service) -> IpFamilies {
    let families = svc
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.as_deref())
        .unwrap_or_default();
    match families {
        [_, _] => IpFamilies::Dual,
        [f] if f == "IPv4" => IpFamilies::Ipv4Only,
        [_] => IpFamilies::Ipv6Only,
        _ => IpFamilies::Automatic,
    }
}

/// Upstream's load-balancing hints: PreferClose traffic distribution (or
/// its annotation) fails over by locality; a Local internal traffic policy
/// keeps traffic on the node; publishNotReadyAddresses allows all.
fn load_balancing(svc: &Service) -> Option<LoadBalancing> {
    const TRAFFIC_DISTRIBUTION: &str = "networking.istio.io/traffic-distribution";
    let spec = svc.spec.as_ref()?;
    let mut prefer_close = labels_of(&svc.metadata.annotations)
        .get(TRAFFIC_DISTRIBUTION)
        .is_some_and(|v| v.eq_ignore_ascii_case("PreferClose"));
    if let Some(td) = &spec.traffic_distribution {
        prefer_close = td == "PreferClose";
    }
    let mut lb = prefer_close.then(|| LoadBalancing {
        routing_preference: vec![
            Scope::Network as i32,
            Scope::Region as i32,
            Scope::Zone as i32,
            Scope::Subzone as i32,
        ],
        mode: Mode::Failover as i32,
        ..Default::default()
    });
    if spec.internal_traffic_policy.as_deref() == Some("Local") {
        lb = Some(LoadBalancing {
            routing_preference: vec![Scope::Node as i32],
            mode: Mode::Strict as i32,
            ..Default::default()
        });
    }
    if spec.publish_not_ready_addresses == Some(true) {
        lb.get_or_insert_with(LoadBalancing::default).health_policy = HealthPolicy::AllowAll as i32;
    }
    lb
}

/// What a service port speaks, as `toAppProtocolFromKube` in agentgateway's
/// port of upstream's ambient index: kube `ConvertProtocol` (the name
/// from [`protocol_name`], read as the waypoint's port protocol is but
/// without our additions such as `h2c`) gives the protocol, of which `toAppProtocolFromProtocol` keeps HTTP (HTTP11),
/// HTTP2 and GRPC; anything else (gRPC-Web, TCP, TLS, unknown, non-TCP
/// ports) is UNKNOWN.
pub(super) fn app_protocol(port: &KubePort) -> AppProtocol {
    let Some(name) = protocol_name(port) else {
        return AppProtocol::Unknown;
    };
    if name.starts_with("grpc-web") {
        return AppProtocol::Unknown;
    }
    match name.split('-').next().unwrap_or_default() {
        "http" | "http_proxy" => AppProtocol::Http11,
        "http2" => AppProtocol::Http2,
        "grpc" => AppProtocol::Grpc,
        _ => AppProtocol::Unknown,
    }
}

/// The name upstream's `ConvertProtocol` reads a TCP port's protocol from,
/// lowercased: `appProtocol` when set, else the port name. `None` for a
/// port that is not TCP (UDP, SCTP).
pub(super) fn protocol_name(port: &KubePort) -> Option<String> {
    if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
        return None;
    }
    Some(
        port.app_protocol
            .as_deref()
            .or(port.name.as_deref())
            .unwrap_or_default()
            .to_ascii_lowercase(),
    )
}

/// Whether ingress gateways are to use the service's waypoint: the Service's
/// `istio.io/ingress-use-waypoint` label, else its namespace's, as upstream's
/// `ingressUseWaypointFromLabels`; upstream takes `true`, ours also Go
/// `strconv.ParseBool`'s other spellings of true (a value that is not a
/// boolean is false). Only meaningful with a waypoint bound:
/// the caller asks only then, as upstream.
pub(super) fn ingress_use_waypoint(service: &Labels, namespace: Option<&Labels>) -> bool {
    let value = service
        .get(api::labels::INGRESS_USE_WAYPOINT)
        .or_else(|| namespace.and_then(|n| n.get(api::labels::INGRESS_USE_WAYPOINT)));
    value.is_some_and(|v| matches!(v.as_str(), "1" | "t" | "T" | "true" | "TRUE" | "True"))
}

#[cfg(test)]
mod protocol_tests {
    use super::*;

    fn port(name: Option<&str>, app: Option<&str>, protocol: Option<&str>) -> KubePort {
        KubePort {
            name: name.map(str::to_string),
            app_protocol: app.map(str::to_string),
            protocol: protocol.map(str::to_string),
            port: 8080,
            ..Default::default()
        }
    }

    #[test]
    fn app_protocol_follows_app_protocol_then_the_name_prefix() {
        let cases = [
            (Some("http"), None, None, AppProtocol::Http11),
            (Some("http-web"), None, None, AppProtocol::Http11),
            (Some("HTTP2-x"), None, None, AppProtocol::Http2),
            (Some("grpc"), None, None, AppProtocol::Grpc),
            (Some("grpc-web"), None, None, AppProtocol::Unknown),
            (Some("tcp"), None, None, AppProtocol::Unknown),
            (Some("tls-x"), None, None, AppProtocol::Unknown),
            (Some("web"), None, None, AppProtocol::Unknown),
            (None, None, None, AppProtocol::Unknown),
            // appProtocol wins over the name.
            (Some("tcp"), Some("http"), None, AppProtocol::Http11),
            (Some("http"), Some("grpc"), None, AppProtocol::Grpc),
            (Some("http"), Some("tcp"), None, AppProtocol::Unknown),
            // Not TCP: nothing is known of it.
            (Some("http"), None, Some("UDP"), AppProtocol::Unknown),
        ];
        for (name, app, protocol, want) in cases {
            assert_eq!(
                app_protocol(&port(name, app, protocol)),
                want,
                "{name:?} {app:?} {protocol:?}"
            );
        }
    }

    #[test]
    fn ingress_use_waypoint_reads_the_service_then_the_namespace() {
        let l = |v: &str| {
            Labels::from([(api::labels::INGRESS_USE_WAYPOINT.to_string(), v.to_string())])
        };
        let none = Labels::new();
        assert!(ingress_use_waypoint(&l("true"), None));
        assert!(ingress_use_waypoint(&l("T"), Some(&l("false"))));
        assert!(ingress_use_waypoint(&none, Some(&l("1"))));
        // The service's own label wins, even when false.
        assert!(!ingress_use_waypoint(&l("false"), Some(&l("true"))));
        // Not a Go boolean: false (the waypoint's name is a common mistake).
        assert!(!ingress_use_waypoint(&l("my-waypoint"), None));
        assert!(!ingress_use_waypoint(&l("yes"), None));
        assert!(!ingress_use_waypoint(&none, None));
    }
}
