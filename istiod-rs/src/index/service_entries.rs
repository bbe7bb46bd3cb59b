//! ServiceEntries and WorkloadEntries -> `istio.workload.Service`s and
//! `Workload`s, as upstream's ambient index (istio/istio
//! pilot/pkg/serviceregistry/kube/controller/ambient/services.go:
//! `serviceEntriesInfo`, `constructServiceEntries`; workloads.go:
//! `serviceEntryWorkloadBuilder`, `workloadEntryWorkloadBuilder`,
//! `constructServicesFromWorkloadEntry`, `setTunnelProtocol`).
//!
//! - One Service per host, key `<se ns>/<host>`, name and namespace the
//!   ServiceEntry's, VIPs from `addresses`, ports `number` -> `targetPort`
//!   (the number when unset), `subjectAltNames` carried. An entry without
//!   `addresses` gets, per host, the VIPs allocated to that host
//!   (`index/ip_allocate.rs`, written to its `status.addresses`), as
//!   upstream's `constructServiceEntries`; none for `resolution: NONE`,
//!   wildcard hosts, or an entry labelled
//!   `networking.istio.io/enable-autoallocate-ip: "false"`.
//! - `resolution: NONE` (the default): the Services carry load balancing
//!   mode PASSTHROUGH, health policy ALLOW_ALL, as upstream's
//!   `constructServiceEntries`: ztunnel sends a connection to one of their
//!   addresses on to that address (after the service's waypoint, if any)
//!   instead of picking an endpoint. Endpoints are still built as for any
//!   resolution (upstream's `serviceEntryWorkloadBuilder` does not look at
//!   it), so a selected pod still lists the hosts.
//! - Inline `endpoints`: one workload each, uid
//!   `<cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/<address>`,
//!   backing every host; an address that is not an IP is the workload's
//!   `hostname` (ztunnel resolves it when a connection is routed to the
//!   endpoint: ztunnel-rs `dns/on_demand.rs`). `resolution: DNS` (or
//!   `DNS_ROUND_ROBIN`) without endpoints nor selector: one workload per
//!   host, its hostname the host, backing that host only.
//! - `workloadSelector` (non-empty `labels`) selects pods
//!   ([`ServiceEntries::for_pod`], listed in the pod workload's services)
//!   and WorkloadEntries of the ServiceEntry's namespace.
//! - WorkloadEntry objects: uid
//!   `<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>`, backing the
//!   ServiceEntries that select them; a port named in the entry's `ports`
//!   map is its target port.
//! - Tunnel as upstream's `setTunnelProtocol`: HBONE when annotated
//!   `ambient.istio.io/redirection: enabled` or labelled
//!   `networking.istio.io/tunnel: http` (native tunnel); plain TCP
//!   otherwise. A pod selected by a ServiceEntry keeps its own workload
//!   (HBONE when enrolled).
//!
//! `exportTo` is checked and reported, never applied, as upstream
//! (`index/export_to.rs`).
//!
//! A value that cannot be read is a [`PolicyProblem::InvalidValue`] naming
//! the object and field: the ServiceEntry (an address, a port, an unknown
//! resolution or location) or the endpoint (its address) is left out; the
//! rest flows.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use api::crd::service_entry::{Location, Resolution, ServiceEntry, WorkloadEntrySpec};
use api::labels;
use api::manifest::{Kind, ObjectKey};
use api::workload::{
    LoadBalancing, Locality, NetworkAddress, Port, PortList, TunnelProtocol, Workload,
    WorkloadStatus, WorkloadType,
    load_balancing::{HealthPolicy, Mode},
};

use super::ip_allocate::{Allocations, status_addresses};
use super::selectors::{Labels, labels_of, subset_of};
use super::waypoints::Waypoints;
use super::{Effect, MeshConfig, PolicyProblem, PolicyRef};
use crate::state::ClusterState;

/// Our `istio.io/WaypointBound` reason for an entry whose waypoint could
/// take it: istiod-rs does not bind ServiceEntries to waypoints.
pub const NOT_SUPPORTED: &str = "NotSupported";

/// A ServiceEntry that asks for a waypoint and is not bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnboundWaypoint {
    /// `ns/name` of the waypoint asked for.
    pub waypoint: String,
    /// Upstream's `WaypointIsNotReady`, `AttachmentDenied`,
    /// `UnsupportedTrafficType`, or [`NOT_SUPPORTED`].
    pub reason: &'static str,
    pub message: String,
}

/// Label asking for the HBONE tunnel natively (upstream's `TunnelHTTP`).
const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// One ServiceEntry port.
#[derive(Debug, Clone)]
struct SePort {
    name: String,
    number: u32,
    /// `targetPort`, or the number when unset.
    target: u32,
}

/// A ServiceEntry that selects workloads by label.
#[derive(Debug)]
struct Selecting<'a> {
    namespace: &'a str,
    selector: &'a BTreeMap<String, String>,
    /// Keys of its services (one per host).
    keys: Vec<String>,
    ports: Vec<SePort>,
}

/// Every served ServiceEntry and WorkloadEntry.
#[derive(Debug, Default)]
pub(super) struct ServiceEntries<'a> {
    /// `(key, service)`, in ServiceEntry then host order.
    pub services: Vec<(String, api::workload::Service)>,
    /// Inline endpoints, implicit DNS endpoints and WorkloadEntries.
    pub workloads: Vec<Workload>,
    selecting: Vec<Selecting<'a>>,
    /// The entries served (whose values could be read), in key order.
    served: Vec<(&'a ObjectKey, &'a ServiceEntry)>,
}

impl<'a> ServiceEntries<'a> {
    pub fn build(
        state: &'a ClusterState,
        mesh: &MeshConfig,
        allocations: &Allocations,
        problems: &mut Vec<PolicyProblem>,
    ) -> Self {
        let mut out = ServiceEntries::default();
        let cluster_ips = cluster_ips(state);
        for (key, se) in &state.service_entries {
            let exports: Vec<&str> = se.spec.export_to.iter().map(String::as_str).collect();
            super::export_to::check(
                &PolicyRef::new(Kind::ServiceEntry, &key.namespace, &key.name),
                "spec.exportTo",
                &exports,
                problems,
            );
            let Some(entry) = read(key, se, problems) else {
                continue;
            };
            if takes_another_namespaces_address(key, &entry.vips, &cluster_ips, problems) {
                continue;
            }
            out.served.push((key, se));
            let spec = &se.spec;
            let namespace = key.namespace.as_str();
            let keys: Vec<String> = spec
                .hosts
                .iter()
                .map(|h| format!("{namespace}/{h}"))
                .collect();
            let allocated = allocations
                .get(key)
                .map(|a| status_addresses(a))
                .unwrap_or_default();
            for (host, svc_key) in spec.hosts.iter().zip(&keys) {
                // Only an entry without addresses of its own has allocated
                // ones (upstream's constructServiceEntries: per host).
                let vips = if entry.vips.is_empty() {
                    allocated.get(host.as_str()).map_or(&[][..], Vec::as_slice)
                } else {
                    entry.vips.as_slice()
                };
                out.services.push((
                    svc_key.clone(),
                    api::workload::Service {
                        name: key.name.clone(),
                        namespace: namespace.to_string(),
                        hostname: host.clone(),
                        addresses: vips
                            .iter()
                            .map(|ip| NetworkAddress {
                                network: mesh.network.clone(),
                                address: super::ip_bytes(*ip),
                            })
                            .collect(),
                        ports: service_ports(&entry.ports),
                        subject_alt_names: spec.subject_alt_names.clone(),
                        load_balancing: passthrough(spec.resolution.as_ref()),
                        ..Default::default()
                    },
                ));
            }
            let se_labels = labels_of(&se.metadata.labels);
            let se_annotations = labels_of(&se.metadata.annotations);
            let refer = PolicyRef::new(Kind::ServiceEntry, namespace, &key.name);
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let field = format!("spec.endpoints[{i}].address");
                let Some((addresses, hostname)) = endpoint_address(&ep.address) else {
                    problems.push(PolicyProblem::InvalidValue {
                        object: refer.clone(),
                        field,
                        value: ep.address.clone(),
                        expected: "an IP address or a DNS name",
                        effect: Effect::EndpointLeftOut,
                    });
                    continue;
                };
                let services = ports_of_entry(ep, &keys, &entry.ports);
                let mut w = entry_workload(mesh, namespace, &key.name, ep, services);
                w.uid = format!(
                    "{}/networking.istio.io/ServiceEntry/{namespace}/{}/{}",
                    mesh.cluster_id, key.name, ep.address
                );
                w.addresses = addresses;
                w.hostname = hostname;
                (w.canonical_name, w.canonical_revision) =
                    super::workloads::canonical(se_labels, &key.name);
                set_tunnel(se_labels, se_annotations, &mut w);
                out.workloads.push(w);
            }
            let dns = matches!(
                spec.resolution,
                Some(Resolution::Dns | Resolution::DnsRoundRobin)
            );
            if spec.endpoints.is_empty() && spec.workload_selector.is_none() && dns {
                for (host, svc_key) in spec.hosts.iter().zip(&keys) {
                    let ep = WorkloadEntrySpec {
                        address: host.clone(),
                        ..Default::default()
                    };
                    let services = ports_of_entry(&ep, std::slice::from_ref(svc_key), &entry.ports);
                    let mut w = entry_workload(mesh, namespace, &key.name, &ep, services);
                    w.uid = format!(
                        "{}/networking.istio.io/ServiceEntry/{namespace}/{}/{host}",
                        mesh.cluster_id, key.name
                    );
                    w.hostname = host.clone();
                    (w.canonical_name, w.canonical_revision) =
                        super::workloads::canonical(se_labels, &key.name);
                    set_tunnel(se_labels, se_annotations, &mut w);
                    out.workloads.push(w);
                }
            }
            if let Some(selector) = &spec.workload_selector
                && !selector.labels.is_empty()
            {
                out.selecting.push(Selecting {
                    namespace,
                    selector: &selector.labels,
                    keys,
                    ports: entry.ports,
                });
            }
        }
        for (key, we) in &state.workload_entries {
            let namespace = key.namespace.as_str();
            let Some((addresses, hostname)) = endpoint_address(&we.spec.address) else {
                problems.push(PolicyProblem::InvalidValue {
                    object: PolicyRef::new(Kind::WorkloadEntry, namespace, &key.name),
                    field: "spec.address".to_string(),
                    value: we.spec.address.clone(),
                    expected: "an IP address or a DNS name",
                    effect: Effect::EndpointLeftOut,
                });
                continue;
            };
            let we_labels = workload_entry_labels(we);
            let mut services = BTreeMap::new();
            for s in out.selecting_in(namespace, &we_labels) {
                services.extend(ports_of_entry(&we.spec, &s.keys, &s.ports));
            }
            let mut w = entry_workload(mesh, namespace, &key.name, &we.spec, services);
            w.uid = format!(
                "{}/networking.istio.io/WorkloadEntry/{namespace}/{}",
                mesh.cluster_id, key.name
            );
            w.addresses = addresses;
            w.hostname = hostname;
            (w.canonical_name, w.canonical_revision) =
                super::workloads::canonical(&we_labels, &key.name);
            set_tunnel(&we_labels, labels_of(&we.metadata.annotations), &mut w);
            out.workloads.push(w);
        }
        out
    }

    /// The served entries that ask for a waypoint (their own
    /// `istio.io/use-waypoint` label, else their namespace's, as upstream's
    /// `fetchWaypointForService`), with why none is bound: the waypoint
    /// cannot take them (upstream's reasons), or it could but istiod-rs
    /// does not bind ServiceEntries to waypoints (ours: `NotSupported`).
    /// Upstream's condition for a bound entry (True, `WaypointAccepted`)
    /// is therefore never written.
    pub fn unbound_waypoints(
        &self,
        state: &ClusterState,
        waypoints: &Waypoints,
    ) -> BTreeMap<ObjectKey, UnboundWaypoint> {
        let mut out = BTreeMap::new();
        for (key, se) in &self.served {
            let namespace = key.namespace.as_str();
            let Some((waypoint, checked)) =
                waypoints.asked_for(state, namespace, labels_of(&se.metadata.labels))
            else {
                continue;
            };
            let (reason, message) = checked.err().unwrap_or_else(|| {
                (
                    NOT_SUPPORTED,
                    format!(
                        "waypoint {waypoint:?} would be bound, but istiod-rs does not bind ServiceEntries to waypoints yet: connections to the entry's addresses do not go through it"
                    ),
                )
            });
            out.insert(
                (*key).clone(),
                UnboundWaypoint {
                    waypoint,
                    reason,
                    message,
                },
            );
        }
        out
    }

    fn selecting_in<'s>(
        &'s self,
        namespace: &'s str,
        labels: &'s Labels,
    ) -> impl Iterator<Item = &'s Selecting<'a>> + 's {
        self.selecting
            .iter()
            .filter(move |s| s.namespace == namespace && subset_of(s.selector, labels))
    }

    /// The services of the ServiceEntries selecting a pod, with the ports
    /// it serves them on, as upstream's `constructServices` for a
    /// ServiceEntry (no named target ports: the target as written).
    pub fn for_pod(&self, namespace: &str, labels: &Labels) -> Vec<(String, PortList)> {
        let mut out = Vec::new();
        for s in self.selecting_in(namespace, labels) {
            let ports = PortList {
                ports: service_ports(&s.ports),
            };
            for key in &s.keys {
                out.push((key.clone(), ports.clone()));
            }
        }
        out
    }
}

/// The ports as upstream's `constructServiceEntries` lists them.
fn service_ports(ports: &[SePort]) -> Vec<Port> {
    ports
        .iter()
        .map(|p| Port {
            service_port: p.number,
            target_port: p.target,
            ..Default::default()
        })
        .collect()
}

/// `resolution: NONE` (or unset): connections to the service's addresses
/// go to the address the client dialled, not to an endpoint. Upstream's
/// `constructServiceEntries` (istio/istio
/// pilot/pkg/serviceregistry/kube/controller/ambient/services.go, since
/// istio/istio#57656) says so with load balancing mode PASSTHROUGH and
/// health policy ALLOW_ALL; ztunnel then connects to the original
/// destination (istio/ztunnel `src/state.rs` `find_upstream`), after the
/// service's waypoint if it has one.
fn passthrough(resolution: Option<&Resolution>) -> Option<LoadBalancing> {
    matches!(resolution, None | Some(Resolution::None)).then(|| LoadBalancing {
        mode: Mode::Passthrough as i32,
        health_policy: HealthPolicy::AllowAll as i32,
        ..Default::default()
    })
}

/// What is served of a ServiceEntry, once its values are read.
struct Read {
    vips: Vec<IpAddr>,
    ports: Vec<SePort>,
}

/// The ServiceEntry's values, or `None` (with the problems) when it cannot
/// be served: upstream drops a ServiceEntry whose address does not parse.
fn read(key: &ObjectKey, se: &ServiceEntry, problems: &mut Vec<PolicyProblem>) -> Option<Read> {
    let object = PolicyRef::new(Kind::ServiceEntry, &key.namespace, &key.name);
    let before = problems.len();
    let mut invalid = |field: String, value: String, expected: &'static str| {
        problems.push(PolicyProblem::InvalidValue {
            object: object.clone(),
            field,
            value,
            expected,
            effect: Effect::EntryNotServed,
        });
    };
    let spec = &se.spec;
    if let Some(Location::Unknown(v)) = &spec.location {
        invalid(
            "spec.location".into(),
            v.clone(),
            "MESH_EXTERNAL or MESH_INTERNAL",
        );
    }
    if let Some(Resolution::Unknown(v)) = &spec.resolution {
        invalid(
            "spec.resolution".into(),
            v.clone(),
            "NONE, STATIC, DNS or DNS_ROUND_ROBIN",
        );
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        if h.is_empty() || h.contains('/') || h.chars().any(char::is_whitespace) {
            invalid(format!("spec.hosts[{i}]"), h.clone(), "a DNS name");
        }
    }
    let mut vips = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        match single_address(a) {
            Some(ip) => vips.push(ip),
            None => invalid(
                format!("spec.addresses[{i}]"),
                a.clone(),
                "an IP address (a CIDR of one address at most)",
            ),
        }
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&p.number) {
            invalid(
                format!("spec.ports[{i}].number"),
                p.number.to_string(),
                "a port number (1-65535)",
            );
        }
        if let Some(t) = p.target_port
            && !(1..=65535).contains(&t)
        {
            invalid(
                format!("spec.ports[{i}].targetPort"),
                t.to_string(),
                "a port number (1-65535)",
            );
        }
        ports.push(SePort {
            name: p.name.clone(),
            number: p.number,
            target: p.target_port.unwrap_or(p.number),
        });
    }
    (problems.len() == before).then_some(Read { vips, ports })
}

/// Every Kubernetes Service's ClusterIPs, with the Service.
fn cluster_ips(state: &ClusterState) -> HashMap<IpAddr, &ObjectKey> {
    if state.service_entries.is_empty() {
        return HashMap::new();
    }
    state
        .services
        .iter()
        .flat_map(|(key, svc)| {
            super::services::vips(svc)
                .into_iter()
                .map(move |ip| (ip, key))
        })
        .collect()
}

/// Whether the entry names the ClusterIP of a Kubernetes Service of another
/// namespace, which would make ztunnel send that Service's traffic by the
/// entry's rules (its endpoints, or passthrough in plain TCP): the entry is
/// left out, with a problem naming the address. The API server gives each
/// ClusterIP to one Service; a namespace may only alias its own. Ours:
/// upstream's ambient index does not check this (istio/istio
/// pilot/pkg/serviceregistry/kube/controller/ambient/services.go,
/// `constructServiceEntries` takes `addresses` as they are).
fn takes_another_namespaces_address(
    key: &ObjectKey,
    vips: &[IpAddr],
    cluster_ips: &HashMap<IpAddr, &ObjectKey>,
    problems: &mut Vec<PolicyProblem>,
) -> bool {
    let mut taken = false;
    for (i, ip) in vips.iter().enumerate() {
        if let Some(owner) = cluster_ips.get(ip).filter(|o| o.namespace != key.namespace) {
            problems.push(PolicyProblem::NotHonoured {
                object: PolicyRef::new(Kind::ServiceEntry, &key.namespace, &key.name),
                field: format!("spec.addresses[{i}]"),
                reason: format!(
                    "{ip} is the ClusterIP of Service {}/{}; a ServiceEntry may not take the address of a Service of another namespace",
                    owner.namespace, owner.name
                ),
                effect: Effect::EntryNotServed,
            });
            taken = true;
        }
    }
    taken
}

/// An address, or a CIDR covering one address.
pub(super) fn single_address(text: &str) -> Option<IpAddr> {
    match text.split_once('/') {
        None => text.parse().ok(),
        Some((ip, len)) => {
            let ip: IpAddr = ip.parse().ok()?;
            let full = if ip.is_ipv4() { "32" } else { "128" };
            (len == full).then_some(ip)
        }
    }
}

/// An endpoint's addresses, or its hostname when it is a DNS name.
fn endpoint_address(address: &str) -> Option<(Vec<Vec<u8>>, String)> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Some((vec![super::ip_bytes(ip)], String::new()));
    }
    let dns_name = !address.is_empty()
        && address.len() <= 253
        && address.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    dns_name.then(|| (Vec::new(), address.to_string()))
}

/// The ports an entry serves each service on, as upstream's
/// `constructServicesFromWorkloadEntry` for a ServiceEntry: the entry's
/// port of the service port's name, else the service's target.
fn ports_of_entry(
    entry: &WorkloadEntrySpec,
    keys: &[String],
    ports: &[SePort],
) -> BTreeMap<String, PortList> {
    let list = PortList {
        ports: ports
            .iter()
            .map(|p| Port {
                service_port: p.number,
                target_port: entry.ports.get(&p.name).copied().unwrap_or(p.target),
                ..Default::default()
            })
            .collect(),
    };
    keys.iter().map(|k| (k.clone(), list.clone())).collect()
}

/// The fields every entry workload shares.
fn entry_workload(
    mesh: &MeshConfig,
    namespace: &str,
    name: &str,
    entry: &WorkloadEntrySpec,
    services: BTreeMap<String, PortList>,
) -> Workload {
    Workload {
        name: name.to_string(),
        namespace: namespace.to_string(),
        network: if entry.network.is_empty() {
            mesh.network.clone()
        } else {
            entry.network.clone()
        },
        cluster_id: mesh.cluster_id.clone(),
        service_account: entry.service_account.clone(),
        services,
        status: WorkloadStatus::Healthy as i32,
        trust_domain: mesh.workload_trust_domain().to_string(),
        locality: locality(&entry.locality),
        capacity: entry.weight.filter(|w| *w > 0),
        workload_name: name.to_string(),
        workload_type: WorkloadType::Pod as i32,
        tunnel_protocol: TunnelProtocol::None as i32,
        ..Default::default()
    }
}

/// `region/zone/subzone`, as upstream's `SplitLocalityLabel`.
fn locality(text: &str) -> Option<Locality> {
    let mut parts = text.splitn(3, '/');
    let mut next = || parts.next().unwrap_or_default().to_string();
    let l = Locality {
        region: next(),
        zone: next(),
        subzone: next(),
    };
    (l != Locality::default()).then_some(l)
}

/// A WorkloadEntry's labels: its object's, and its spec's on top.
fn workload_entry_labels(we: &api::crd::WorkloadEntry) -> Labels {
    let mut out = labels_of(&we.metadata.labels).clone();
    out.extend(we.spec.labels.clone());
    out
}

/// Upstream's `setTunnelProtocol`.
fn set_tunnel(labels: &Labels, annotations: &Labels, w: &mut Workload) {
    if annotations
        .get(labels::AMBIENT_REDIRECTION)
        .map(String::as_str)
        == Some(labels::AMBIENT_REDIRECTION_ENABLED)
    {
        w.tunnel_protocol = TunnelProtocol::Hbone as i32;
    }
    if labels.get(TUNNEL_LABEL).map(String::as_str) == Some("http") {
        w.tunnel_protocol = TunnelProtocol::Hbone as i32;
        w.native_tunnel = true;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Translator, json::snapshot_json};
    use super::*;

    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: api, namespace: shop, labels: {app: api}}\n\
        spec: {nodeName: n, containers: []}\nstatus: {phase: Running, podIP: 10.1.0.5}\n";
    const ENTRY: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
        metadata: {name: api, namespace: shop}\n\
        spec: {hosts: [api.example.com], ports: [{number: 80, name: http}], workloadSelector: {labels: {app: api}}}\n";

    fn state(text: &str) -> ClusterState {
        ClusterState::from_objects(api::manifest::parse(text).unwrap().objects)
    }

    fn pod_services(t: &mut Translator, s: &ClusterState) -> serde_json::Value {
        let json = snapshot_json(&t.translate(s, &MeshConfig::default()).snapshot);
        json["workloads"]["Kubernetes//Pod/shop/api"]["services"].clone()
    }

    #[test]
    fn a_pod_reused_by_the_translator_follows_the_entries_that_select_it() {
        let mut t = Translator::default();
        let without = state(POD);
        assert_eq!(pod_services(&mut t, &without), serde_json::Value::Null);
        // Only the ServiceEntry changed: the pod object is the same.
        let mut with = without.clone();
        with.apply(api::manifest::parse(ENTRY).unwrap().objects.remove(0));
        assert_eq!(
            pod_services(&mut t, &with),
            serde_json::json!({"shop/api.example.com": [{"servicePort": 80, "targetPort": 80}]})
        );
        assert_eq!(pod_services(&mut t, &without), serde_json::Value::Null);
    }

    /// The VIPs of each service of the translation, by key.
    fn vips(s: &ClusterState, mesh: &MeshConfig) -> BTreeMap<String, serde_json::Value> {
        let json = snapshot_json(&Translator::default().translate(s, mesh).snapshot);
        json["services"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v["addresses"].clone()))
            .collect()
    }

    #[test]
    fn an_entry_without_addresses_serves_the_vips_allocated_to_each_host() {
        let text = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
            metadata: {name: ext, namespace: shop}\n\
            spec: {hosts: [a.example.com, b.example.com], resolution: DNS}\n\
            status: {addresses: [{host: b.example.com, value: 240.240.0.7}]}\n\
            ---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
            metadata: {name: own, namespace: shop}\n\
            spec: {hosts: [c.example.com], resolution: DNS, addresses: [10.9.0.1]}\n";
        let s = state(text);
        let addresses = |ips: &[&str]| {
            serde_json::Value::Array(
                ips.iter()
                    .map(|ip| serde_json::json!({"address": ip}))
                    .collect(),
            )
        };
        let got = vips(&s, &MeshConfig::default());
        assert_eq!(
            got["shop/a.example.com"],
            addresses(&["240.240.0.1", "2001:2::1"])
        );
        assert_eq!(got["shop/b.example.com"], addresses(&["240.240.0.7"]));
        assert_eq!(got["shop/c.example.com"], addresses(&["10.9.0.1"]));
        // Turned off: the status is not used either, as upstream.
        let off = MeshConfig {
            auto_allocate_ips: false,
            ..MeshConfig::default()
        };
        let got = vips(&s, &off);
        assert_eq!(got["shop/b.example.com"], serde_json::Value::Null);
        assert_eq!(got["shop/c.example.com"], addresses(&["10.9.0.1"]));
    }

    #[test]
    fn an_entry_may_not_take_the_cluster_ip_of_another_namespaces_service() {
        let entry = |name: &str, namespace: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {{name: {name}, namespace: {namespace}}}\n\
                 spec: {{hosts: [{name}.example.com], addresses: [10.9.0.1, 10.96.0.50], ports: [{{number: 80}}]}}\n"
            )
        };
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: payments, namespace: bank}}\n\
             spec: {{clusterIP: 10.96.0.50, ports: [{{port: 80}}]}}\n{}{}",
            entry("thief", "shop"),
            entry("alias", "bank"),
        );
        let s = state(&text);
        let mut problems = Vec::new();
        let entries = ServiceEntries::build(
            &s,
            &MeshConfig::default(),
            &Allocations::default(),
            &mut problems,
        );
        let served: Vec<&str> = entries.services.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            served,
            ["bank/alias.example.com"],
            "the owner's namespace may alias it"
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        let problem = problems[0].to_string();
        assert!(
            problem.contains("ServiceEntry shop/thief")
                && problem.contains("spec.addresses[1]")
                && problem.contains("10.96.0.50 is the ClusterIP of Service bank/payments")
                && problem.contains("not served"),
            "{problem}"
        );
    }

    #[test]
    fn resolution_none_or_unset_is_passthrough_and_other_resolutions_are_not() {
        let entry = |name: &str, resolution: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
                 metadata: {{name: {name}, namespace: shop}}\n\
                 spec: {{hosts: [{name}.example.com], addresses: [10.9.0.1], ports: [{{number: 80}}]{resolution}}}\n"
            )
        };
        let text = [
            entry("unset", ""),
            entry("none", ", resolution: NONE"),
            entry(
                "static",
                ", resolution: STATIC, endpoints: [{address: 10.0.0.1}]",
            ),
            entry("dns", ", resolution: DNS"),
        ]
        .join("---\n");
        let json = snapshot_json(
            &Translator::default()
                .translate(&state(&text), &MeshConfig::default())
                .snapshot,
        );
        let lb = |host: &str| json["services"][format!("shop/{host}")]["loadBalancing"].clone();
        let passthrough = serde_json::json!({"mode": "PASSTHROUGH", "healthPolicy": "ALLOW_ALL"});
        assert_eq!(lb("unset.example.com"), passthrough);
        assert_eq!(lb("none.example.com"), passthrough);
        assert_eq!(lb("static.example.com"), serde_json::Value::Null);
        assert_eq!(lb("dns.example.com"), serde_json::Value::Null);
    }

    #[test]
    fn an_empty_selector_selects_nothing_as_upstream() {
        let text = format!("{POD}---\n{}", ENTRY.replace("{labels: {app: api}}", "{}"));
        let mut t = Translator::default();
        assert_eq!(pod_services(&mut t, &state(&text)), serde_json::Value::Null);
    }
}
