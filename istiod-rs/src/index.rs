//! The ambient index: a pure translation of the [`ClusterState`] into the
//! workload API every ztunnel consumes, keyed exactly as upstream istiod keys
//! it and published as a [`Snapshot`]:
//!
//! | resource | type | key |
//! |---|---|---|
//! | Workload (one per pod with an IP) | `istio.workload.Address` | `<cluster>//Pod/<ns>/<name>` |
//! | Workload (a Service's EndpointSlice endpoint that is not a pod) | `istio.workload.Address` | `<cluster>/discovery.k8s.io/EndpointSlice/<ns>/<slice>/<ip>` |
//! | Service (one per Kubernetes Service) | `istio.workload.Address` | `<ns>/<name>.<ns>.svc.<domain>` |
//! | Authorization (AuthorizationPolicy, converted PeerAuthentication) | `istio.security.Authorization` | `<ns>/<name>` |
//! | Authorization (implicit ALLOW-from-waypoint, with [`MeshConfig::auto_allow_waypoint_policy`]) | `istio.security.Authorization` | `<ns>/istio_allow_waypoint_<ns>_<name>` |
//! | Authorization (stand-in DENY of an L7 rule no waypoint serves) | `istio.security.Authorization` | `<ns>/unserved_l7_<kind>_<name>` |
//! | Waypoint (one per Gateway of class `istio-waypoint`) | `istio_rs.l7.v1.Waypoint` | `<ns>/<gateway name>` |
//! | RouteTable (HTTPRoutes and GRPCRoutes with this Service as parent) | `istio_rs.l7.v1.RouteTable` | `<ns>/<name>.<ns>.svc.<domain>` |
//! | HttpAuthorization (AuthorizationPolicy with `targetRefs`) | `istio_rs.l7.v1.HttpAuthorization` | `<ns>/<name>` |
//! | JwtAuthentication (RequestAuthentication with `targetRefs`) | `istio_rs.l7.v1.JwtAuthentication` | `<ns>/<name>` |
//! | TrafficPolicy (DestinationRule, see `l7/traffic.rs`) | `istio_rs.l7.v1.TrafficPolicy` | `<svc ns>/<svc hostname>` |
//! | RouteTable (VirtualService, for a service no HTTPRoute/GRPCRoute attaches to; see `l7/virtual_services.rs`) | `istio_rs.l7.v1.RouteTable` | `<svc ns>/<svc hostname>` |
//!
//! No I/O, no clock: the same state always gives the same bytes, so the
//! snapshot's content hashes change only where the content does.

pub mod analysis;
mod authorization;
mod export_to;
pub mod ip_allocate;
pub mod json;
mod l7;
mod on_demand;
mod peer_authentication;
mod problem;
mod selectors;
mod service_entries;
mod services;
// DestinationRule and VirtualService translation (L7, for waypoints).
#[doc(hidden)]
pub mod testing;
#[path = "index/l7/traffic.rs"]
mod traffic;
#[path = "index/l7/virtual_services.rs"]
mod virtual_services;
mod waypoint_policies;
mod waypoints;
mod workloads;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use api::crd::{
    AuthorizationPolicy, PeerAuthentication, RequestAuthentication, ServiceEntry, WorkloadEntry,
};
use api::manifest::{Kind, ObjectKey};
use gateway_api::experimental::httproutes::HttpRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GrpcRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use api::workload::{Address, address};
use api::{labels, type_url};

pub(crate) use authorization::dry_run;
pub use authorization::validate_authorization_policy;
pub use ip_allocate::IpAllocator;
pub use l7::{Attachment, L7Rule, TargetOutcome, TargetRef, UNSERVED_PREFIX};
pub use on_demand::{OnDemandPlan, OnDemandWaypoint};
pub use peer_authentication::{
    CONVERTED_PREFIX, STATIC_STRICT_POLICY, validate_peer_authentication,
};
pub use problem::{Effect, PolicyProblem, PolicyRef, Unserved};
pub use service_entries::{NOT_SUPPORTED as WAYPOINT_NOT_SUPPORTED, UnboundWaypoint};
pub use traffic::validate_destination_rule;
pub use virtual_services::validate_virtual_service;
pub use waypoints::is_on_demand as is_on_demand_waypoint;
pub use workloads::SharedAddress;

use crate::snapshot::{Resource, Snapshot};
use crate::state::{ClusterState, Objects};

/// The mesh-wide settings the translation depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// Trust domain of workload identities.
    pub trust_domain: String,
    /// Cluster id, the first part of workload uids.
    pub cluster_id: String,
    /// Kubernetes DNS domain of service hostnames.
    pub cluster_domain: String,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Network of every workload and VIP (single-network mesh: empty).
    pub network: String,
    /// Serve each waypoint's workloads an implicit ALLOW of the waypoint's
    /// identities, so that (unless another ALLOW policy applies) only
    /// traffic through the waypoint reaches them: upstream's
    /// `PILOT_AUTO_ALLOW_WAYPOINT_POLICY`, off by default as there. See
    /// `index/waypoint_policies.rs`.
    pub auto_allow_waypoint_policy: bool,
    /// Plan waypoints on demand for the L7 rules no user-bound waypoint
    /// serves ([`Translation::on_demand`], see `index/on_demand.rs`). On by
    /// default; off, such rules stay unbound (and denied at L4).
    pub on_demand_waypoints: bool,
    /// Give ServiceEntries without `spec.addresses` VIPs of their own
    /// (`index/ip_allocate.rs`): upstream's `PILOT_ENABLE_IP_AUTOALLOCATE`,
    /// on by default as there.
    pub auto_allocate_ips: bool,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: labels::DEFAULT_TRUST_DOMAIN.to_string(),
            cluster_id: labels::DEFAULT_CLUSTER_ID.to_string(),
            cluster_domain: labels::DEFAULT_CLUSTER_DOMAIN.to_string(),
            root_namespace: labels::DEFAULT_ROOT_NAMESPACE.to_string(),
            network: String::new(),
            auto_allow_waypoint_policy: false,
            on_demand_waypoints: true,
            auto_allocate_ips: true,
        }
    }
}

impl MeshConfig {
    /// `<name>.<namespace>.svc.<cluster domain>`.
    pub fn service_hostname(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.cluster_domain)
    }

    /// A pod's workload uid, as upstream: `<cluster>//Pod/<ns>/<name>`.
    pub fn pod_uid(&self, namespace: &str, name: &str) -> String {
        format!("{}//Pod/{namespace}/{name}", self.cluster_id)
    }

    /// The trust domain as workloads carry it: empty for the default
    /// `cluster.local` (ztunnel's own default), as upstream sends it.
    fn workload_trust_domain(&self) -> &str {
        if self.trust_domain == labels::DEFAULT_TRUST_DOMAIN {
            ""
        } else {
            &self.trust_domain
        }
    }
}

/// What one translation produced.
#[derive(Debug, Default)]
pub struct Translation {
    pub snapshot: Snapshot,
    /// Policies rejected, or enforced more strictly than written, with why.
    pub problems: Vec<PolicyProblem>,
    /// Every L7 rule and who enforces it at each of its targets.
    pub l7: Vec<L7Rule>,
    /// Addresses more than one pod has.
    pub shared_addresses: Vec<SharedAddress>,
    /// The waypoint Gateways to create on demand (empty when
    /// [`MeshConfig::on_demand_waypoints`] is off).
    pub on_demand: OnDemandPlan,
    /// The VIPs of the ServiceEntries that have none of their own, as their
    /// `status.addresses` should carry them.
    pub allocations: ip_allocate::Allocations,
    /// The served ServiceEntries that ask for a waypoint, and why they are
    /// not bound to it (their `istio.io/WaypointBound` condition).
    pub service_entry_waypoints: BTreeMap<ObjectKey, UnboundWaypoint>,
    /// The `istio.io/WaypointBound` condition of each Service that is bound
    /// to a waypoint or asks for one it cannot use.
    pub service_waypoint_conditions: BTreeMap<ObjectKey, WaypointBound>,
}

/// A Service's `istio.io/WaypointBound` condition, as upstream's
/// `ServiceInfo.GetConditions` (istio/istio pilot/pkg/model/service.go)
/// writes it: True `WaypointAccepted` when bound, False with the reason
/// the waypoint asked for cannot take it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointBound {
    pub bound: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The [`WaypointBound`] condition of a Service bound to `bound` (or to
/// none); `None` when it neither is bound nor asks for a waypoint.
fn service_waypoint_bound(
    state: &ClusterState,
    waypoints: &waypoints::Waypoints,
    namespace: &str,
    labels: &selectors::Labels,
    namespace_labels: Option<&selectors::Labels>,
    bound: Option<&waypoints::Waypoint>,
) -> Option<WaypointBound> {
    if let Some(w) = bound {
        let label_present = labels.contains_key(labels::INGRESS_USE_WAYPOINT)
            || namespace_labels.is_some_and(|n| n.contains_key(labels::INGRESS_USE_WAYPOINT));
        let ingress = if services::ingress_use_waypoint(labels, namespace_labels) {
            ". Ingress traffic will traverse the waypoint"
        } else if label_present {
            ". Ingress traffic is not using the waypoint, set the istio.io/ingress-use-waypoint label to true if desired."
        } else {
            ""
        };
        return Some(WaypointBound {
            bound: true,
            reason: "WaypointAccepted",
            message: format!("Successfully attached to waypoint {}{ingress}", w.key()),
        });
    }
    let (_, checked) = waypoints.asked_for(state, namespace, labels)?;
    let (reason, message) = checked.err()?;
    Some(WaypointBound {
        bound: false,
        reason,
        message,
    })
}

/// Translates the whole cluster state.
pub fn translate(state: &ClusterState, mesh: &MeshConfig) -> Translation {
    Translator::default().translate(state, mesh)
}

/// Translates again and again, reusing the previous translation's work for
/// pods: when nothing but pods changed (the common case, pod churn), a pod
/// whose object is the same (`Arc` identity) keeps its encoded workload.
/// The output is always exactly [`translate`]'s.
#[derive(Debug, Default)]
pub struct Translator {
    previous: Option<Previous>,
    reused: usize,
}

/// What a translation leaves for the next one.
#[derive(Debug)]
struct Previous {
    mesh: MeshConfig,
    inputs: Inputs,
    pods: BTreeMap<ObjectKey, CachedPod>,
    waypoint_policies: Option<waypoint_policies::Dependencies>,
    l7_denials: l7::Denials,
    /// The waypoints with a ready instance: which waypoint a workload is
    /// bound to can follow them (a user's waypoint that becomes ready takes
    /// over from an on-demand one), and they change with other pods.
    ready_waypoints: std::collections::BTreeSet<String>,
}

#[derive(Debug)]
struct CachedPod {
    /// Held so that the identity comparison cannot be fooled by a new
    /// object reusing a freed allocation.
    pod: Arc<Pod>,
    addresses: Vec<IpAddr>,
    backed: Vec<usize>,
    resource: Arc<Resource>,
}

/// Everything besides pods that a workload depends on.
#[derive(Debug)]
struct Inputs {
    namespaces: Objects<Namespace>,
    nodes: Objects<Node>,
    services: Objects<Service>,
    endpoint_slices: Objects<EndpointSlice>,
    gateways: Objects<Gateway>,
    authorization_policies: Objects<AuthorizationPolicy>,
    peer_authentications: Objects<PeerAuthentication>,
    request_authentications: Objects<RequestAuthentication>,
    http_routes: Objects<HttpRoute>,
    grpc_routes: Objects<GrpcRoute>,
    service_entries: Objects<ServiceEntry>,
    workload_entries: Objects<WorkloadEntry>,
}

impl Inputs {
    fn of(state: &ClusterState) -> Self {
        Inputs {
            namespaces: state.namespaces.clone(),
            nodes: state.nodes.clone(),
            services: state.services.clone(),
            endpoint_slices: state.endpoint_slices.clone(),
            gateways: state.gateways.clone(),
            authorization_policies: state.authorization_policies.clone(),
            peer_authentications: state.peer_authentications.clone(),
            request_authentications: state.request_authentications.clone(),
            http_routes: state.http_routes.clone(),
            grpc_routes: state.grpc_routes.clone(),
            service_entries: state.service_entries.clone(),
            workload_entries: state.workload_entries.clone(),
        }
    }

    fn unchanged(&self, state: &ClusterState) -> bool {
        fn same<K>(a: &Objects<K>, b: &Objects<K>) -> bool {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
        }
        same(&self.namespaces, &state.namespaces)
            && same(&self.nodes, &state.nodes)
            && same(&self.services, &state.services)
            && same(&self.endpoint_slices, &state.endpoint_slices)
            && same(&self.gateways, &state.gateways)
            && same(&self.authorization_policies, &state.authorization_policies)
            && same(&self.peer_authentications, &state.peer_authentications)
            && same(
                &self.request_authentications,
                &state.request_authentications,
            )
            && same(&self.http_routes, &state.http_routes)
            && same(&self.grpc_routes, &state.grpc_routes)
            && same(&self.service_entries, &state.service_entries)
            && same(&self.workload_entries, &state.workload_entries)
    }
}

impl Translator {
    /// How many pods the last translation reused.
    pub fn reused(&self) -> usize {
        self.reused
    }

    /// Translates with the VIPs the entries' status gives them (and, for
    /// those it gives none, VIPs allocated as a fresh [`IpAllocator`]
    /// would).
    pub fn translate(&mut self, state: &ClusterState, mesh: &MeshConfig) -> Translation {
        let allocations = IpAllocator::default().allocate(state, mesh.auto_allocate_ips);
        self.translate_allocated(state, mesh, allocations)
    }

    /// Translates with `allocations` as the VIPs of the ServiceEntries
    /// without `spec.addresses` (from the [`IpAllocator`] the caller keeps).
    pub fn translate_allocated(
        &mut self,
        state: &ClusterState,
        mesh: &MeshConfig,
        allocations: ip_allocate::Allocations,
    ) -> Translation {
        let mut previous = self
            .previous
            .take()
            .filter(|p| p.mesh == *mesh && p.inputs.unchanged(state));
        let mut snapshot = Snapshot::default();
        let mut problems = Vec::new();

        // Policies first: workloads list the selector-scoped ones that apply.
        // Their content is served once the waypoints that enforce the L7
        // rules among them are known (see below).
        let mut selector_policies: workloads::SelectorPolicies = BTreeMap::new();
        let mut ztunnel_policies = Vec::new();
        for policy in state.authorization_policies.values() {
            let Some(converted) =
                authorization::convert(&mesh.root_namespace, policy, &mut problems)
            else {
                continue;
            };
            let a = &converted.authorization;
            let key = format!("{}/{}", a.namespace, a.name);
            if let Some(selector) = converted.selector {
                selector_policies
                    .entry(a.namespace.clone())
                    .or_default()
                    .push((key.clone(), selector));
            }
            ztunnel_policies.push((authorization::policy_ref(policy), converted.authorization));
        }
        let peer_authentications = peer_authentication::PeerAuthentications::new(
            state,
            &mesh.root_namespace,
            &mut problems,
        );
        for a in peer_authentications.authorizations() {
            let key = format!("{}/{}", a.namespace, a.name);
            snapshot.insert(Resource::new(type_url::AUTHORIZATION, key, &a));
        }

        let waypoints = waypoints::Waypoints::build(state, mesh);
        let waypoint_policies = waypoint_policies::WaypointPolicies::build(mesh, &waypoints);
        for (key, a) in waypoint_policies.authorizations() {
            snapshot.insert(Resource::new(type_url::AUTHORIZATION, key.to_string(), a));
        }
        let mut services = services::Services::build(state, mesh);
        for (key, svc) in &state.services {
            if let Some(value) =
                selectors::labels_of(&svc.metadata.annotations).get(export_to::ANNOTATION)
            {
                export_to::check(
                    &PolicyRef::new(Kind::Service, &key.namespace, &key.name),
                    &format!("metadata.annotations[{}]", export_to::ANNOTATION),
                    &export_to::annotation_values(value),
                    &mut problems,
                );
            }
        }
        let service_entries =
            service_entries::ServiceEntries::build(state, mesh, &allocations, &mut problems);
        for (key, service) in &service_entries.services {
            // A Kubernetes Service of the same hostname in the namespace
            // wins (it is inserted after).
            let address = Address {
                r#type: Some(address::Type::Service(service.clone())),
            };
            snapshot.insert(Resource::new(type_url::ADDRESS, key.clone(), &address));
        }
        for w in &service_entries.workloads {
            snapshot.insert(workload_resource(w.clone()));
        }
        let service_entry_waypoints = service_entries.unbound_waypoints(state, &waypoints);

        // Which pods are workloads, which services each backs, and the service
        // accounts behind each service (for per-ServiceAccount waypoints).
        let mut pods = Vec::with_capacity(state.pods.len());
        let mut service_accounts: Vec<Option<Option<&str>>> = vec![None; services.entries.len()];
        for (key, pod) in &state.pods {
            let cached = previous
                .as_mut()
                .and_then(|p| p.pods.remove(key))
                .filter(|c| Arc::ptr_eq(&c.pod, pod));
            let (addresses, backed, resource) = match cached {
                Some(c) => (c.addresses, c.backed, Some(c.resource)),
                None => {
                    let Some(addresses) = workloads::addresses(pod) else {
                        continue;
                    };
                    let labels = selectors::labels_of(&pod.metadata.labels);
                    let backed = services.backed_by(&key.namespace, &key.name, labels);
                    (addresses, backed, None)
                }
            };
            let sa = crate::state::pod_service_account(pod);
            for &i in &backed {
                let slot = &mut service_accounts[i];
                *slot = match *slot {
                    None => Some(Some(sa)),
                    Some(Some(s)) if s == sa => Some(Some(s)),
                    Some(_) => Some(None),
                };
            }
            pods.push((key, pod, addresses, backed, resource));
        }

        // DestinationRules: one TrafficPolicy per destination service.
        {
            let endpoints = traffic::Endpoints::of(
                pods.iter()
                    .map(|(key, pod, _, backed, _)| (*key, pod.as_ref(), backed.as_slice())),
            );
            for p in traffic::build(state, mesh, &services, &endpoints, &mut problems) {
                let key = format!("{}/{}", p.namespace, p.hostname);
                snapshot.insert(Resource::new(type_url::TRAFFIC_POLICY, key, &p));
            }
        }

        let shared_addresses = workloads::shared_addresses(
            pods.iter()
                .map(|(key, pod, addresses, ..)| (*key, pod.as_ref(), addresses.as_slice())),
        );

        let mut service_waypoints = Vec::with_capacity(services.entries.len());
        let mut service_waypoint_conditions = BTreeMap::new();
        let mut service_also_served_by = Vec::with_capacity(services.entries.len());
        for (entry, sa) in services.entries.iter_mut().zip(service_accounts) {
            let is_waypoint = selectors::labels_of(&entry.service.metadata.labels)
                .get(labels::GATEWAY_MANAGED)
                .is_some_and(|v| v == labels::GATEWAY_MANAGED_VALUE);
            let serving = (!is_waypoint).then(|| {
                waypoints.serving(
                    state,
                    entry.namespace,
                    entry.labels(),
                    sa.flatten(),
                    Some(&entry.proto.name),
                    waypoints::Traffic::Service,
                )
            });
            let (bound, also) = serving.map_or((None, Vec::new()), |s| (s.bound, s.also));
            entry.proto.waypoint = bound.map(|w| w.address.clone());
            let namespace_labels = state
                .namespace(entry.namespace)
                .map(|ns| selectors::labels_of(&ns.metadata.labels));
            entry.proto.ingress_use_waypoint =
                bound.is_some() && services::ingress_use_waypoint(entry.labels(), namespace_labels);
            if !is_waypoint
                && let Some(condition) = service_waypoint_bound(
                    state,
                    &waypoints,
                    entry.namespace,
                    entry.labels(),
                    namespace_labels,
                    bound,
                )
            {
                let name = entry.service.metadata.name.clone().unwrap_or_default();
                service_waypoint_conditions
                    .insert(ObjectKey::new(entry.namespace, name), condition);
            }
            let bound = bound.map(|w| w.key());
            service_also_served_by.push(also);
            service_waypoints.push(bound);
            let address = Address {
                r#type: Some(address::Type::Service(entry.proto.clone())),
            };
            snapshot.insert(Resource::new(
                type_url::ADDRESS,
                entry.key.clone(),
                &address,
            ));
        }

        // L7 rules no waypoint serves deny at L4 (see l7.rs); the others
        // go to the waypoints.
        let ready_waypoints = &waypoints.ready;
        let pod_workloads = if l7::needs_pod_workloads(state) {
            let pods = pods
                .iter()
                .map(|(key, pod, _, backed, _)| (*key, Arc::as_ref(*pod), backed.clone()));
            pod_workloads(state, &waypoints, pods)
        } else {
            Vec::new()
        };
        let l7_ctx = l7::Context {
            state,
            mesh,
            services: &services,
            service_waypoints: &service_waypoints,
            service_also_served_by: &service_also_served_by,
            ready_waypoints,
            pods: &pod_workloads,
        };
        let mut l7_rules = l7::L7Rules::build(&l7_ctx);
        let on_demand = if mesh.on_demand_waypoints {
            on_demand::plan(state, &waypoints, &services, &mut l7_rules.rules)
        } else {
            OnDemandPlan::default()
        };
        l7_rules.report(&l7_ctx, &mut problems);
        let enforced_by = translate_l7(
            state,
            mesh,
            &waypoints,
            &services,
            &l7_ctx,
            &l7_rules,
            &mut snapshot,
            &mut problems,
        );
        for (rule, enforced_by) in l7_rules.rules.iter_mut().zip(enforced_by) {
            rule.enforced_by = enforced_by;
        }
        // The L4 form of the rules attached by selector or namespace holds
        // for every connection but those from the waypoints enforcing them.
        // Sorted, each once: two waypoints may run as one account.
        let principals = |rule: &L7Rule| {
            let names: std::collections::BTreeSet<String> = (rule.enforced_by.iter())
                .filter_map(|w| waypoints.get(w))
                .flat_map(|w| waypoint_policies::principal_names(mesh, w))
                .collect();
            waypoint_policies::exact(names)
        };
        let workloads_rules: BTreeMap<&PolicyRef, &L7Rule> = l7_rules
            .rules
            .iter()
            .filter(|r| r.attachment == Attachment::Workloads)
            .map(|r| (&r.object, r))
            .collect();
        for (object, mut a) in ztunnel_policies {
            if let Some(rule) = workloads_rules.get(&object) {
                exempt_enforcing_waypoints(&mut a, principals(rule));
                describe_enforcement(rule, &mut problems);
            }
            let key = format!("{}/{}", a.namespace, a.name);
            snapshot.insert(Resource::new(type_url::AUTHORIZATION, key, &a));
        }
        let stand_ins = l7_rules.authorizations(|r| l7::exemption(principals(r), false));
        for (key, a) in stand_ins {
            snapshot.insert(Resource::new(type_url::AUTHORIZATION, key.to_string(), &a));
        }

        let ctx = workloads::Context {
            state,
            mesh,
            waypoints: &waypoints,
            services: &services,
            selector_policies: &selector_policies,
            peer_authentications: &peer_authentications,
            waypoint_policies: &waypoint_policies,
            l7: &l7_ctx,
            l7_rules: &l7_rules,
            service_entries: &service_entries,
        };
        let mut cache = BTreeMap::new();
        let mut reused = 0;
        // Build every pod's workload again when it may depend on other pods:
        // while an L7 rule targets a waypoint, or when what the implicit
        // waypoint policies depend on changed since the last translation.
        let waypoint_dependencies =
            waypoint_policies.dependencies(&service_waypoints, &service_also_served_by);
        let l7_denials = l7_rules.denials();
        let reusable = !l7_rules.depend_on_other_pods()
            && previous.as_ref().is_none_or(|p| {
                p.waypoint_policies == waypoint_dependencies
                    && p.l7_denials == l7_denials
                    && p.ready_waypoints == waypoints.ready
            });
        for (key, pod, addresses, backed, resource) in pods {
            let resource = match resource.filter(|_| reusable) {
                Some(r) => {
                    reused += 1;
                    r
                }
                None => Arc::new(workload_resource(workloads::workload(
                    &ctx, key, pod, &addresses, &backed,
                ))),
            };
            snapshot.insert_shared(resource.clone());
            cache.insert(
                key.clone(),
                CachedPod {
                    pod: pod.clone(),
                    addresses,
                    backed,
                    resource,
                },
            );
        }
        for w in workloads::endpoint_slice_workloads(&ctx) {
            snapshot.insert(workload_resource(w));
        }
        self.reused = reused;
        self.previous = Some(Previous {
            mesh: mesh.clone(),
            inputs: Inputs::of(state),
            pods: cache,
            waypoint_policies: waypoint_dependencies,
            l7_denials,
            ready_waypoints: waypoints.ready.clone(),
        });
        Translation {
            snapshot,
            problems,
            l7: l7_rules.rules,
            shared_addresses,
            on_demand,
            allocations,
            service_entry_waypoints,
            service_waypoint_conditions,
        }
    }
}

/// Every pod that is a workload, as the L7 rules attached by selector or
/// namespace see it (see `l7.rs`).
fn pod_workloads<'a>(
    state: &'a ClusterState,
    waypoints: &waypoints::Waypoints,
    pods: impl Iterator<Item = (&'a ObjectKey, &'a Pod, Vec<usize>)>,
) -> Vec<l7::PodWorkload<'a>> {
    pods.filter_map(|(key, pod, backed)| {
        let namespace = key.namespace.as_str();
        let labels = selectors::labels_of(&pod.metadata.labels);
        if waypoints.is_instance(namespace, labels) {
            return None;
        }
        let account = crate::state::pod_service_account(pod);
        let waypoint = waypoints
            .bound(
                state,
                namespace,
                labels,
                Some(account),
                None,
                waypoints::Traffic::Workload,
            )
            .map(|w| w.key());
        Some(l7::PodWorkload {
            key,
            enrolled: workloads::enrolled(state, waypoints, namespace, pod),
            namespace,
            labels,
            account,
            services: backed,
            waypoint,
        })
    })
    .collect()
}

/// The L4 form of a policy attached by selector or namespace, with the
/// identities of the waypoints that enforce it as written exempted: an
/// ALLOW admits them (one more group), a DENY spares them (one more clause
/// in each group; a connection without identity still matches it).
fn exempt_enforcing_waypoints(
    a: &mut api::security::Authorization,
    principals: Vec<api::security::StringMatch>,
) {
    let allow = a.action == api::security::Action::Allow as i32;
    let Some(clause) = l7::exemption(principals, allow) else {
        return;
    };
    if allow {
        a.rules.push(api::security::Rule {
            clauses: vec![clause],
        });
    } else {
        for rule in &mut a.rules {
            rule.clauses.push(clause.clone());
        }
    }
}

/// Once waypoints enforce a policy attached by selector or namespace, its
/// HTTP attributes problem says so instead of what ztunnel alone does.
fn describe_enforcement(rule: &L7Rule, problems: &mut [PolicyProblem]) {
    if rule.enforced_by.is_empty() {
        return;
    }
    for p in problems.iter_mut() {
        if let PolicyProblem::HttpAttributes { object, effect, .. } = p
            && *object == rule.object
        {
            *effect = Effect::WaypointsEnforce {
                waypoints: rule.enforced_by.join(", "),
                allow: *effect == Effect::HttpRulesMatchNothing,
            };
        }
    }
}

/// The waypoints' configuration: RouteTables, HttpAuthorizations,
/// JwtAuthentications, and the Waypoint resources naming them. Returns,
/// by index of `l7_rules`, the waypoints with a ready instance that
/// enforce each rule attached by selector or namespace.
#[allow(clippy::too_many_arguments)]
fn translate_l7(
    state: &ClusterState,
    mesh: &MeshConfig,
    waypoints: &waypoints::Waypoints,
    services: &services::Services<'_>,
    l7_ctx: &l7::Context<'_>,
    l7_rules: &l7::L7Rules,
    snapshot: &mut Snapshot,
    problems: &mut Vec<PolicyProblem>,
) -> Vec<Vec<String>> {
    // RouteTables: from HTTPRoutes/GRPCRoutes, and from VirtualServices for
    // the services no Gateway API route attaches to.
    let routes = l7::routes::build(state, services, problems);
    let mut route_tables = routes.keys();
    let mut reaches = BTreeMap::new();
    for (key, table) in &routes.tables {
        snapshot.insert(Resource::new(type_url::ROUTE_TABLE, key.clone(), table));
        reaches.insert(key.clone(), l7::binding::Reach::of(table));
    }
    for table in virtual_services::route_tables(state, mesh, services, problems) {
        let key = format!("{}/{}", table.namespace, table.hostname);
        snapshot.insert(Resource::new(type_url::ROUTE_TABLE, key.clone(), &table));
        reaches.insert(key.clone(), l7::binding::Reach::of(&table));
        route_tables.insert(key);
    }
    let mut authorizations = std::collections::BTreeSet::new();
    for (key, policy) in &state.authorization_policies {
        if let Some(a) = l7::http_policies::convert(policy, problems) {
            snapshot.insert(Resource::new(
                type_url::HTTP_AUTHORIZATION,
                key.to_string(),
                &a,
            ));
            authorizations.insert(key.to_string());
        }
    }
    let mut authentications = std::collections::BTreeSet::new();
    for (key, ra) in &state.request_authentications {
        let j = l7::jwt::convert(key, ra, &state.jwks, problems);
        snapshot.insert(Resource::new(
            type_url::JWT_AUTHENTICATION,
            key.to_string(),
            &j,
        ));
        authentications.insert(key.to_string());
    }
    let named = l7::binding::Named {
        rules: &l7_rules.rules,
        authorizations: &authorizations,
        authentications: &authentications,
        route_tables: &route_tables,
        deny_all: &routes.deny_all,
        reaches: &reaches,
    };
    let bindings =
        l7::binding::waypoints(state, mesh, waypoints, services, l7_ctx, &named, problems);
    for (key, w) in &bindings.waypoints {
        snapshot.insert(Resource::new(type_url::WAYPOINT, key.clone(), w));
    }
    bindings.enforced_by
}

fn workload_resource(w: api::workload::Workload) -> Resource {
    let uid = w.uid.clone();
    let address = Address {
        r#type: Some(address::Type::Workload(w)),
    };
    Resource::new(type_url::ADDRESS, uid, &address)
}

/// An address as the workload API carries it: 4 or 16 bytes.
fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
