//! Pods -> `istio.workload.Workload`, as upstream builds them: every running
//! or pending pod with an IP is a workload, enrolled or not, so ztunnel
//! knows every peer. Enrolment decides only whether its traffic is tunnelled
//! (HBONE).
//!
//! Enrolment (DESIGN.md): `istio.io/dataplane-mode=ambient` on the pod or its
//! namespace, the pod's label winning (`none` opts a pod out). The mesh's
//! own pods are never enrolled: pods labelled `istio.io/component`, waypoint
//! instances and other managed gateways, sidecar-injected pods and
//! host-network pods. As upstream, the node agent's
//! `ambient.istio.io/redirection: enabled` annotation also means HBONE, and a
//! pod labelled `networking.istio.io/tunnel: http` terminates HBONE itself;
//! a pod neither of these makes HBONE that carries
//! `security.istio.io/tlsMode: istio` (a sidecar's) is LEGACY_ISTIO_MTLS
//! (upstream's `setTunnelProtocol`, istio/istio
//! pilot/pkg/serviceregistry/kube/controller/ambient/workloads.go).

use std::collections::BTreeMap;
use std::net::IpAddr;

use api::labels;
use api::manifest::ObjectKey;
use api::workload::{
    Locality, NetworkMode, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};
use k8s_openapi::api::core::v1::Pod;

use super::l7;
use super::selectors::{Labels, labels_of, subset_of};
use super::services::Services;
use super::waypoint_policies::WaypointPolicies;
use super::waypoints::{Traffic, Waypoints};
use super::{MeshConfig, peer_authentication::PeerAuthentications};
use crate::state::{ClusterState, pod_is_terminal, pod_service_account};

/// Annotation a sidecar injector leaves on the pods it injected.
const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Label of workloads that terminate HBONE themselves.
const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";
const REGION_LABEL: &str = "topology.kubernetes.io/region";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Selector-scoped AuthorizationPolicies by namespace: (key, selector).
pub(super) type SelectorPolicies = BTreeMap<String, Vec<(String, Labels)>>;

/// What building a workload needs besides the pod.
pub(super) struct Context<'a> {
    pub state: &'a ClusterState,
    pub mesh: &'a MeshConfig,
    pub waypoints: &'a Waypoints,
    pub services: &'a Services<'a>,
    pub selector_policies: &'a SelectorPolicies,
    pub peer_authentications: &'a PeerAuthentications<'a>,
    pub waypoint_policies: &'a WaypointPolicies,
    pub l7: &'a super::l7::Context<'a>,
    pub l7_rules: &'a super::l7::L7Rules,
    pub service_entries: &'a super::service_entries::ServiceEntries<'a>,
}

/// The pod's addresses, when it should be a workload: not finished, and
/// with at least one IP, all valid.
pub(super) fn addresses(pod: &Pod) -> Option<Vec<IpAddr>> {
    if pod_is_terminal(pod) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ips: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|i| i.ip.as_str()).collect(),
        _ => status.pod_ip.iter().map(String::as_str).collect(),
    };
    if ips.is_empty() {
        return None;
    }
    ips.into_iter().map(|ip| ip.parse().ok()).collect()
}

/// An address that more than one pod has, outside host networking (where
/// sharing the node's address is the point). ztunnel finds workloads by
/// address, so it reaches only one of them: a copied pod manifest, or a
/// stale `status.podIP`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SharedAddress {
    pub address: IpAddr,
    /// In key order.
    pub pods: Vec<ObjectKey>,
}

impl std::fmt::Display for SharedAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pods: Vec<String> = self.pods.iter().map(|p| format!("Pod {p}")).collect();
        write!(
            f,
            "{} all have the address {} (status.podIPs); ztunnel reaches only one of them: give each pod its own address",
            pods.join(", "),
            self.address
        )
    }
}

/// The addresses more than one of `pods` (workloads, with their addresses)
/// has, host-network pods left out.
pub(super) fn shared_addresses<'a>(
    pods: impl IntoIterator<Item = (&'a ObjectKey, &'a Pod, &'a [IpAddr])>,
) -> Vec<SharedAddress> {
    let mut by_address: BTreeMap<IpAddr, Vec<ObjectKey>> = BTreeMap::new();
    for (key, pod, addresses) in pods {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        for address in addresses {
            by_address.entry(*address).or_default().push(key.clone());
        }
    }
    by_address
        .into_iter()
        .filter(|(_, pods)| pods.len() > 1)
        .map(|(address, pods)| SharedAddress { address, pods })
        .collect()
}

/// Whether the pod is one of the mesh's own, never captured.
pub(super) fn is_mesh_component(waypoints: &Waypoints, namespace: &str, pod: &Pod) -> bool {
    let labels = labels_of(&pod.metadata.labels);
    labels.contains_key(labels::ISTIO_COMPONENT)
        || labels.contains_key(labels::GATEWAY_MANAGED)
        || waypoints.is_instance(namespace, labels)
        || labels_of(&pod.metadata.annotations).contains_key(SIDECAR_STATUS)
        || pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

/// Whether the pod's traffic is captured into the mesh.
pub(super) fn enrolled(
    state: &ClusterState,
    waypoints: &Waypoints,
    namespace: &str,
    pod: &Pod,
) -> bool {
    if is_mesh_component(waypoints, namespace, pod) {
        return false;
    }
    match labels_of(&pod.metadata.labels)
        .get(labels::DATAPLANE_MODE)
        .map(String::as_str)
    {
        Some(labels::DATAPLANE_MODE_NONE) => false,
        Some(labels::DATAPLANE_MODE_AMBIENT) => true,
        _ => state.namespace(namespace).is_some_and(|ns| {
            labels_of(&ns.metadata.labels)
                .get(labels::DATAPLANE_MODE)
                .map(String::as_str)
                == Some(labels::DATAPLANE_MODE_AMBIENT)
        }),
    }
}

/// Ready condition true, and not being deleted.
pub(super) fn healthy(pod: &Pod) -> bool {
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && pod.metadata.deletion_timestamp.is_none()
}

/// Label that names a pod's workload explicitly.
const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// The name of what runs the pod, upstream's heuristic: the workload-name
/// label if set; else, for a pod with a generated name, its controller,
/// seen through a ReplicaSet to its Deployment (or Argo Rollout) by the
/// template-hash suffix, through an OpenShift ReplicationController to its
/// DeploymentConfig, and through a Job to its CronJob by the timestamp
/// suffix; else the pod's own name.
fn workload_name(pod: &Pod) -> String {
    let meta = &pod.metadata;
    let labels = labels_of(&meta.labels);
    if let Some(name) = labels.get(WORKLOAD_NAME_LABEL) {
        return name.clone();
    }
    let pod_name = meta.name.clone().unwrap_or_default();
    let controller = meta
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    let generated = !meta.generate_name.as_deref().unwrap_or_default().is_empty();
    let Some(controller) = controller.filter(|_| generated) else {
        return pod_name;
    };
    let name = controller.name.as_str();
    let label = |k: &str| labels.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let without_hash = |hash: &str| {
        name.ends_with(hash)
            .then(|| name.strip_suffix(&format!("-{hash}")).unwrap_or(name))
    };
    let derived = match controller.kind.as_str() {
        "ReplicaSet" => label("pod-template-hash")
            .and_then(without_hash)
            .or_else(|| label("rollouts-pod-template-hash").and_then(without_hash))
            .unwrap_or(name),
        "ReplicationController" => label("deploymentconfig").unwrap_or(name),
        "Job" => cron_job_name(name).unwrap_or(name),
        _ => name,
    };
    if derived.is_empty() {
        pod_name
    } else {
        derived.to_string()
    }
}

/// `<cronjob>-<8 to 10 digits>` -> `<cronjob>`.
fn cron_job_name(job: &str) -> Option<&str> {
    let (base, suffix) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (digits && !base.is_empty()).then_some(base)
}

/// Canonical service name and revision, with upstream's label fallbacks.
pub(super) fn canonical(labels: &Labels, workload_name: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    let name = first(&[labels::CANONICAL_NAME, labels::APP_NAME, labels::APP])
        .unwrap_or_else(|| workload_name.to_string());
    let revision = first(&[
        labels::CANONICAL_REVISION,
        labels::APP_VERSION,
        labels::VERSION,
    ])
    .unwrap_or_else(|| "latest".to_string());
    (name, revision)
}

fn locality(state: &ClusterState, node: &str) -> Option<Locality> {
    let node = state.nodes.get(&ObjectKey::cluster(node))?;
    let labels = labels_of(&node.metadata.labels);
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    let l = Locality {
        region: get(REGION_LABEL),
        zone: get(ZONE_LABEL),
        subzone: get(SUBZONE_LABEL),
    };
    (l != Locality::default()).then_some(l)
}

/// Keys of the policies that apply to the pod, in upstream's order: the
/// AuthorizationPolicies (selector-scoped, from the pod's namespace or the
/// root namespace, sorted), the converted PeerAuthentications (sorted), the
/// implicit ALLOW-from-waypoint policies (those of its services' waypoints,
/// then its own `waypoint`'s; among the former, ours: those of the other
/// waypoints serving the pod or its services around a change of binding,
/// `also_served_by`, see `Waypoints::serving`). Then what upstream does not have: the DENY
/// policies of the unserved L7 rules targeting it (sorted). The order
/// changes no decision (ztunnel applies every DENY, then needs one ALLOW
/// when any applies); it only keeps the list stable and readable.
fn policy_keys(
    ctx: &Context<'_>,
    namespace: &str,
    labels: &Labels,
    waypoint: Option<&str>,
    also_served_by: &[String],
    backed: &[usize],
    l7: Option<&l7::Workload<'_>>,
) -> Vec<String> {
    let root = ctx.mesh.root_namespace.as_str();
    let namespaces = if namespace == root {
        vec![namespace]
    } else {
        vec![namespace, root]
    };
    let mut keys: Vec<String> = namespaces
        .into_iter()
        .filter_map(|ns| ctx.selector_policies.get(ns))
        .flatten()
        .filter(|(_, selector)| subset_of(selector, labels))
        .map(|(key, _)| key.clone())
        .collect();
    keys.sort();
    keys.extend(ctx.peer_authentications.workload_keys(namespace, labels));
    let others = backed
        .iter()
        .flat_map(|&i| {
            let bound = ctx.l7.service_waypoints[i].as_deref();
            bound
                .into_iter()
                .chain(ctx.l7.service_also_served_by[i].iter().map(String::as_str))
        })
        .chain(also_served_by.iter().map(String::as_str));
    keys.extend(ctx.waypoint_policies.keys_for(waypoint, others));
    if let Some(w) = l7 {
        keys.extend(ctx.l7_rules.keys_for(ctx.l7, w));
    }
    keys
}

/// The workload for a pod with `addresses`, backing the services `backed`.
pub(super) fn workload(
    ctx: &Context<'_>,
    key: &ObjectKey,
    pod: &Pod,
    addresses: &[IpAddr],
    backed: &[usize],
) -> Workload {
    let namespace = key.namespace.as_str();
    let labels = labels_of(&pod.metadata.labels);
    let spec = pod.spec.as_ref();
    let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
    let sa = pod_service_account(pod);
    let instance = ctx.waypoints.is_instance(namespace, labels);
    let serving = (!instance).then(|| {
        let (state, traffic) = (ctx.state, Traffic::Workload);
        ctx.waypoints
            .serving(state, namespace, labels, Some(sa), None, traffic)
    });
    let (waypoint, also_served_by) = serving.map_or((None, Vec::new()), |s| (s.bound, s.also));
    let waypoint_key = waypoint.map(|w| w.key());
    // Waypoint instances are never targets of the rules they would serve.
    let l7 = (!instance).then(|| l7::Workload {
        namespace,
        labels,
        account: sa,
        services: backed,
        waypoint: waypoint_key.clone(),
    });
    let mut services: BTreeMap<String, api::workload::PortList> = backed
        .iter()
        .map(|&i| {
            let entry = &ctx.services.entries[i];
            (entry.key.clone(), entry.ports_for(pod))
        })
        .collect();
    // ServiceEntries selecting the pod (upstream's
    // `PILOT_ENABLE_SERVICEENTRY_SELECT_PODS`, on by default).
    services.extend(ctx.service_entries.for_pod(namespace, labels));
    let name = workload_name(pod);
    let (canonical_name, canonical_revision) = canonical(labels, &name);
    let mut tunnel = TunnelProtocol::None;
    let mut native_tunnel = false;
    let redirected = labels_of(&pod.metadata.annotations)
        .get(labels::AMBIENT_REDIRECTION)
        .map(String::as_str)
        == Some(labels::AMBIENT_REDIRECTION_ENABLED);
    if redirected || enrolled(ctx.state, ctx.waypoints, namespace, pod) {
        tunnel = TunnelProtocol::Hbone;
    }
    if labels.get(TUNNEL_LABEL).map(String::as_str) == Some("http") {
        tunnel = TunnelProtocol::Hbone;
        native_tunnel = true;
    }
    if tunnel == TunnelProtocol::None
        && labels.get(labels::TLS_MODE).map(String::as_str) == Some(labels::TLS_MODE_ISTIO)
    {
        tunnel = TunnelProtocol::LegacyIstioMtls;
    }
    let host_network = spec.and_then(|s| s.host_network) == Some(true);
    Workload {
        uid: ctx.mesh.pod_uid(namespace, &key.name),
        name: key.name.clone(),
        namespace: namespace.to_string(),
        addresses: addresses.iter().map(|ip| super::ip_bytes(*ip)).collect(),
        network: ctx.mesh.network.clone(),
        tunnel_protocol: tunnel as i32,
        trust_domain: ctx.mesh.workload_trust_domain().to_string(),
        service_account: sa.to_string(),
        waypoint: waypoint.map(|w| w.address.clone()),
        locality: locality(ctx.state, &node),
        node,
        canonical_name,
        canonical_revision,
        workload_type: WorkloadType::Pod as i32,
        workload_name: name,
        native_tunnel,
        authorization_policies: policy_keys(
            ctx,
            namespace,
            labels,
            waypoint_key.as_deref(),
            &also_served_by,
            backed,
            l7.as_ref(),
        ),
        status: if healthy(pod) {
            WorkloadStatus::Healthy
        } else {
            WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: ctx.mesh.cluster_id.clone(),
        services,
        network_mode: if host_network {
            NetworkMode::HostNetwork
        } else {
            NetworkMode::Standard
        } as i32,
        ..Default::default()
    }
}

/// Workloads for the endpoints of a Service's EndpointSlices that are not
/// pods (endpoints added by hand, e.g. for a VM), as upstream: one per
/// address, keyed `<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>`,
/// with no identity, policies or waypoint, and a shared-address network mode
/// since nothing guarantees the address is unique.
pub(super) fn endpoint_slice_workloads(ctx: &Context<'_>) -> Vec<Workload> {
    let mut out = Vec::new();
    for (key, slice) in &ctx.state.endpoint_slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(index) = ctx.services.for_slice(slice) else {
            continue;
        };
        let service = &ctx.services.entries[index];
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
            .filter_map(|p| {
                let target = u32::try_from(p.port?).ok()?;
                let service_port = service.port_named(p.name.as_deref()?)?;
                Some(api::workload::Port {
                    service_port,
                    target_port: target,
                    app_protocol: api::workload::AppProtocol::Unknown as i32,
                })
            })
            .collect();
        let services: BTreeMap<String, api::workload::PortList> =
            [(service.key.clone(), api::workload::PortList { ports })].into();
        let mut seen = std::collections::BTreeSet::new();
        for ep in slice.endpoints.iter().flatten() {
            if ep.target_ref.as_ref().and_then(|r| r.kind.as_deref()) == Some("Pod") {
                continue;
            }
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            if !seen.insert(first.clone()) {
                continue;
            }
            let Ok(addresses) = ep
                .addresses
                .iter()
                .map(|a| a.parse::<IpAddr>().map(super::ip_bytes))
                .collect::<Result<Vec<_>, _>>()
            else {
                continue;
            };
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            out.push(Workload {
                uid: format!(
                    "{}/discovery.k8s.io/EndpointSlice/{}/{}/{first}",
                    ctx.mesh.cluster_id, key.namespace, key.name
                ),
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                addresses,
                network: ctx.mesh.network.clone(),
                trust_domain: ctx.mesh.workload_trust_domain().to_string(),
                services: services.clone(),
                status: if ready {
                    WorkloadStatus::Healthy
                } else {
                    WorkloadStatus::Unhealthy
                } as i32,
                cluster_id: ctx.mesh.cluster_id.clone(),
                network_mode: NetworkMode::HostNetwork as i32,
                ..Default::default()
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_job_suffixes() {
        assert_eq!(cron_job_name("backup-28391234"), Some("backup"));
        assert_eq!(cron_job_name("backup-2839123456"), Some("backup"));
        assert_eq!(cron_job_name("backup-28391234567"), None);
        assert_eq!(cron_job_name("backup-1234567"), None);
        assert_eq!(cron_job_name("backup-abcdefgh"), None);
        assert_eq!(cron_job_name("nodash"), None);
    }

    #[test]
    fn canonical_names_fall_back() {
        let l = |pairs: &[(&str, &str)]| -> Labels {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            canonical(&l(&[("app", "web"), ("version", "v2")]), "web-abc"),
            ("web".into(), "v2".into())
        );
        assert_eq!(
            canonical(
                &l(&[
                    ("app", "web"),
                    (labels::CANONICAL_NAME, "shop"),
                    (labels::APP_VERSION, "1.0")
                ]),
                "x"
            ),
            ("shop".into(), "1.0".into())
        );
        assert_eq!(canonical(&l(&[]), "web"), ("web".into(), "latest".into()));
    }

    #[test]
    fn addresses_of_more_than_one_pod_are_reported_with_every_pod() {
        let pod = |name: &str, ip: &str, extra: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{nodeName: n, containers: []{extra}}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
            )
        };
        let text = [
            pod("a", "10.0.0.1", ""),
            pod("b", "10.0.0.1", ""),
            pod("c", "10.0.0.2", ""),
            // Host networking shares the node's address by design.
            pod("h1", "10.1.0.1", ", hostNetwork: true"),
            pod("h2", "10.1.0.1", ", hostNetwork: true"),
            // A finished pod's address is free again.
            pod("done", "10.0.0.2", "").replace("Running", "Succeeded"),
        ]
        .join("---\n");
        let state = ClusterState::from_objects(api::manifest::parse(&text).unwrap().objects);
        let shared = super::super::translate(&state, &MeshConfig::default()).shared_addresses;
        assert_eq!(
            shared,
            [SharedAddress {
                address: "10.0.0.1".parse().unwrap(),
                pods: vec![ObjectKey::new("shop", "a"), ObjectKey::new("shop", "b")],
            }]
        );
        assert_eq!(
            shared[0].to_string(),
            "Pod shop/a, Pod shop/b all have the address 10.0.0.1 (status.podIPs); ztunnel reaches only one of them: give each pod its own address"
        );
    }
}
