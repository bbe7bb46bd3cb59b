//! Waypoints and who is bound to them.
//!
//! A waypoint is a Gateway of class `istio-waypoint` that can be reached:
//! its `status.addresses` (a hostname preferred over an IP, as upstream), or,
//! before istiod-rs has written that status, the Service it provisioned for
//! it (labelled `gateway.networking.k8s.io/gateway-name`). Proxies reach it
//! with HBONE on 15008.
//!
//! Binding, most specific first:
//! 1. the object's own `istio.io/use-waypoint` (+ `-namespace`) label; `none`
//!    opts out. A named waypoint that is missing, refuses the namespace or
//!    does not take this kind of traffic leaves the object without one (as
//!    upstream: no fall-through to the namespace's).
//! 2. a waypoint annotated `istio.io/for-service-account: <sa>` in the
//!    object's namespace, for a workload running as `<sa>` or a service whose
//!    selected pods all run as it;
//! 3. the namespace's `istio.io/use-waypoint` label (`none` opts out);
//! 4. a waypoint istiod-rs created on demand (labelled
//!    `istio-rs.io/on-demand-waypoint: "true"`, see `on_demand.rs`) that some
//!    rule still needs (its `istio-rs.io/needed-by` annotation is not empty:
//!    istiod-rs empties it before it deletes the Gateway, so proxies stop
//!    using the waypoint before it goes): annotated
//!    `istio.io/for-service-account: <sa>`, as in 2, or, for a service whose
//!    workloads run as several accounts, `istio-rs.io/for-service: <name>`.
//!    A binding a user made always wins over an automatic one, once the
//!    user's waypoint has a ready instance: until then (1 to 3 name a
//!    waypoint that is missing, unusable or not ready) a ready on-demand
//!    waypoint keeps serving, so replacing it refuses no request.
//!
//! A binding changes for clients only when they receive it, so around a
//! change two waypoints serve an object ([`Waypoints::serving`]): its
//! `Waypoint` resource lists the object, with the same rules, and a ready
//! one counts as enforcing them. An on-demand waypoint with a ready
//! instance that no longer binds an object it was made for (a user's
//! waypoint took over, the object opted out, or no rule needs the waypoint
//! and it drains) serves it until its Gateway is deleted: clients still
//! send it what they sent before they learnt the new binding (without
//! this it would answer them 503, no route to the service any more). And a
//! user's waypoint not ready yet already holds the objects it is about to
//! take over, so its first requests find them.
//!
//! `istio.io/waypoint-for` on the Gateway says what traffic it takes:
//! `service` (the default), `workload`, `all` or `none`. A per-ServiceAccount
//! waypoint without the label takes `all`: it exists to serve that account's
//! workloads and services alike.
//!
//! A waypoint's own identities are the service accounts of its instances
//! (pods in its namespace labelled `gateway.networking.k8s.io/gateway-name:
//! <name>`), as upstream's `WaypointsCollection` collects them: what the
//! implicit ALLOW-from-waypoint policies admit (see `waypoint_policies.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use api::labels;
use api::workload::{GatewayAddress, NamespacedHostname, NetworkAddress, gateway_address};
use gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesSelector as NamespaceSelector;
use gateway_api::gateways::{Gateway, GatewayListenersAllowedRoutesNamespacesFrom as From};
use tracing::debug;

use super::MeshConfig;
use super::selectors::{self, Labels, Requirement, labels_of};
use crate::state::{ClusterState, in_namespace, pod_service_account};

/// What traffic a waypoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Traffic {
    Service,
    Workload,
    All,
    None,
}

impl Traffic {
    fn parse(value: &str) -> Traffic {
        match value {
            "service" => Traffic::Service,
            "workload" => Traffic::Workload,
            "all" => Traffic::All,
            // `none`, and values we do not know: take nothing rather than guess.
            _ => Traffic::None,
        }
    }

    fn takes(self, wanted: Traffic) -> bool {
        self == wanted || self == Traffic::All
    }
}

#[derive(Clone, Debug)]
enum AllowedNamespaces {
    Same,
    All,
    Selector(NamespaceSelector),
}

#[derive(Clone, Debug)]
pub(super) struct Waypoint {
    namespace: String,
    name: String,
    pub address: GatewayAddress,
    traffic: Traffic,
    allowed: AllowedNamespaces,
    /// Service accounts its instances run as, sorted, each once.
    pub service_accounts: Vec<String>,
    /// Whether it has a ready instance ([`super::l7::binding::ready_waypoints`]).
    pub ready: bool,
}

impl Waypoint {
    /// `namespace/name` of its Gateway.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Namespace of its Gateway.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Name of its Gateway.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn allows(&self, state: &ClusterState, namespace: &str) -> bool {
        match &self.allowed {
            AllowedNamespaces::Same => self.namespace == namespace,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(sel) => {
                let Some(ns) = state.namespace(namespace) else {
                    return false;
                };
                let exprs = sel.match_expressions.iter().flatten().map(|e| Requirement {
                    key: &e.key,
                    operator: &e.operator,
                    values: e.values.as_deref().unwrap_or_default(),
                });
                selectors::selects(
                    sel.match_labels.as_ref(),
                    exprs,
                    labels_of(&ns.metadata.labels),
                )
            }
        }
    }
}

/// Every usable waypoint of the cluster.
#[derive(Debug, Default)]
pub(super) struct Waypoints {
    by_key: BTreeMap<(String, String), Waypoint>,
    /// (namespace, service account) -> waypoint key, of the waypoints a
    /// user made.
    by_service_account: BTreeMap<(String, String), (String, String)>,
    /// (namespace, service account) -> keys of the waypoints istiod-rs made
    /// on demand for it, needed or draining.
    on_demand_by_service_account: BTreeMap<(String, String), Vec<(String, String)>>,
    /// (namespace, service) -> keys of the waypoints istiod-rs made on
    /// demand for that one service, needed or draining.
    on_demand_by_service: BTreeMap<(String, String), Vec<(String, String)>>,
    /// The on-demand waypoints some rule still needs: the only ones that bind.
    needed: BTreeSet<(String, String)>,
    /// `ns/name` of every waypoint Gateway with a ready instance
    /// ([`super::l7::binding::ready_waypoints`]), computed once per
    /// translation for the bindings here and the L7 rules.
    pub ready: BTreeSet<String>,
}

/// The waypoints serving an object: see [`Waypoints::serving`].
#[derive(Debug)]
pub(super) struct Serving<'a> {
    /// The one it is bound to: where clients send its traffic.
    pub bound: Option<&'a Waypoint>,
    /// The keys (`ns/name`) of the others serving it around a change of
    /// binding, sorted.
    pub also: Vec<String>,
}

/// What the bindings a user made (1 to 3 of the module doc) say.
#[derive(Clone, Copy, Debug)]
pub(super) enum UserBinding<'a> {
    /// Nothing: an on-demand waypoint may serve.
    Unset,
    /// `none`, or the namespace is unknown: no waypoint.
    OptOut,
    /// A waypoint that is missing, refuses the namespace or does not take
    /// this kind of traffic.
    Unusable,
    Bound(&'a Waypoint),
}

/// Whether istiod-rs created this Gateway on demand (its
/// `istio-rs.io/on-demand-waypoint` label is `"true"`).
pub fn is_on_demand(gw: &Gateway) -> bool {
    labels_of(&gw.metadata.labels)
        .get(labels::ON_DEMAND_WAYPOINT)
        .is_some_and(|v| v == labels::ON_DEMAND_WAYPOINT_VALUE)
}

/// Whether an on-demand Gateway is still needed by some rule (its
/// `istio-rs.io/needed-by` annotation is not empty); one that is not is
/// draining: bound to nothing, about to be deleted.
fn still_needed(gw: &Gateway) -> bool {
    labels_of(&gw.metadata.annotations)
        .get(labels::NEEDED_BY)
        .is_some_and(|v| !v.is_empty())
}

/// Why a waypoint cannot take an object: upstream's status reason and
/// message.
pub(super) type Refusal = (&'static str, String);

/// What an object's `use-waypoint` label says.
pub(super) enum UseWaypoint {
    Unset,
    None,
    Named(String, String),
}

pub(super) fn use_waypoint(labels: &Labels, default_namespace: &str) -> UseWaypoint {
    match labels.get(labels::USE_WAYPOINT) {
        None => UseWaypoint::Unset,
        Some(v) if v == "none" => UseWaypoint::None,
        Some(name) => {
            let ns = labels
                .get(labels::USE_WAYPOINT_NAMESPACE)
                .map(String::as_str)
                .unwrap_or(default_namespace);
            UseWaypoint::Named(ns.to_string(), name.clone())
        }
    }
}

impl Waypoints {
    pub fn build(state: &ClusterState, mesh: &MeshConfig) -> Self {
        let mut waypoints = Waypoints {
            ready: super::l7::binding::ready_waypoints(state),
            ..Waypoints::default()
        };
        for (key, gw) in &state.gateways {
            if gw.spec.gateway_class_name != labels::WAYPOINT_GATEWAY_CLASS {
                continue;
            }
            let Some(address) = gateway_address(state, mesh, gw) else {
                debug!(gateway = %key, "waypoint has no address yet; nothing is bound to it");
                continue;
            };
            let annotations = labels_of(&gw.metadata.annotations);
            let for_sa = annotations
                .get(labels::FOR_SERVICE_ACCOUNT)
                .filter(|s| !s.is_empty());
            let default_traffic = if for_sa.is_some() {
                Traffic::All
            } else {
                Traffic::Service
            };
            let traffic = labels_of(&gw.metadata.labels)
                .get(labels::WAYPOINT_FOR)
                .map(|v| Traffic::parse(v))
                .unwrap_or(default_traffic);
            let waypoint_key = (key.namespace.clone(), key.name.clone());
            let on_demand = is_on_demand(gw);
            // An on-demand Gateway binds only while some rule needs it.
            if on_demand && still_needed(gw) {
                waypoints.needed.insert(waypoint_key.clone());
            }
            match for_sa {
                Some(sa) if on_demand => waypoints
                    .on_demand_by_service_account
                    .entry((key.namespace.clone(), sa.clone()))
                    .or_default()
                    .push(waypoint_key.clone()),
                Some(sa) => {
                    waypoints
                        .by_service_account
                        .entry((key.namespace.clone(), sa.clone()))
                        .or_insert_with(|| waypoint_key.clone());
                }
                None => {}
            }
            let for_service = annotations
                .get(labels::FOR_SERVICE)
                .filter(|s| !s.is_empty());
            if let Some(service) = for_service.filter(|_| on_demand) {
                waypoints
                    .on_demand_by_service
                    .entry((key.namespace.clone(), service.clone()))
                    .or_default()
                    .push(waypoint_key.clone());
            }
            waypoints.by_key.insert(
                waypoint_key,
                Waypoint {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    address,
                    traffic,
                    allowed: allowed_namespaces(gw),
                    service_accounts: Vec::new(),
                    ready: waypoints.ready.contains(&key.to_string()),
                },
            );
        }
        for (key, pod) in &state.pods {
            let Some(gateway) = labels_of(&pod.metadata.labels).get(labels::GATEWAY_NAME) else {
                continue;
            };
            if let Some(w) = waypoints
                .by_key
                .get_mut(&(key.namespace.clone(), gateway.clone()))
            {
                w.service_accounts
                    .push(pod_service_account(pod).to_string());
            }
        }
        for w in waypoints.by_key.values_mut() {
            w.service_accounts.sort();
            w.service_accounts.dedup();
        }
        waypoints
    }

    /// The usable waypoint `ns/name`.
    pub fn get(&self, key: &str) -> Option<&Waypoint> {
        let (namespace, name) = key.split_once('/')?;
        self.by_key.get(&(namespace.to_string(), name.to_string()))
    }

    /// Every usable waypoint, by namespace then name.
    pub fn iter(&self) -> impl Iterator<Item = &Waypoint> {
        self.by_key.values()
    }

    /// Whether a pod with these labels is an instance of a waypoint.
    pub fn is_instance(&self, namespace: &str, labels: &Labels) -> bool {
        labels.get(labels::GATEWAY_NAME).is_some_and(|name| {
            self.by_key
                .contains_key(&(namespace.to_string(), name.clone()))
        })
    }

    /// The waypoint bound to an object (pod or service) in `namespace` with
    /// `labels`, for `traffic` of that kind. `service_account` is the identity
    /// its traffic runs as, when there is exactly one; `service` the name of
    /// the service, when the object is one.
    pub fn bound(
        &self,
        state: &ClusterState,
        namespace: &str,
        labels: &Labels,
        service_account: Option<&str>,
        service: Option<&str>,
        traffic: Traffic,
    ) -> Option<&Waypoint> {
        let user = self.user_binding(state, namespace, labels, service_account, traffic);
        self.bind(user, namespace, service_account, service, traffic)
    }

    /// The waypoint bound to an object (as [`Self::bound`]) and the keys of
    /// the others that serve it too, sorted:
    /// - the on-demand waypoints made for it that still have a ready
    ///   instance: a user's waypoint took over, the object opted out, or no
    ///   rule needs them any more and they drain. Clients learn the new
    ///   binding only after istiod-rs decides it, and what they sent before
    ///   is in flight: such a waypoint keeps serving the object until its
    ///   Gateway is deleted, so none of that traffic is refused;
    /// - the waypoint a user bound it to while a ready on-demand one serves
    ///   it instead (the user's has no ready instance yet): its instances
    ///   then hold the object's configuration before they report ready
    ///   (waypoint-rs is ready once its xDS has synced), which is when
    ///   clients start sending to them.
    pub fn serving(
        &self,
        state: &ClusterState,
        namespace: &str,
        labels: &Labels,
        service_account: Option<&str>,
        service: Option<&str>,
        traffic: Traffic,
    ) -> Serving<'_> {
        let user = self.user_binding(state, namespace, labels, service_account, traffic);
        let bound = self.bind(user, namespace, service_account, service, traffic);
        let taking_over = match user {
            UserBinding::Bound(w) => Some(w),
            _ => None,
        };
        let bound_key = bound.map(Waypoint::key);
        let mut also: Vec<String> = self
            .on_demand_candidates(namespace, service_account, service, traffic)
            .filter(|w| w.ready)
            .chain(taking_over)
            .map(Waypoint::key)
            .filter(|k| Some(k) != bound_key.as_ref())
            .collect();
        also.sort();
        also.dedup();
        Serving { bound, also }
    }

    /// Which waypoint binds an object, given what the user's bindings say.
    fn bind<'a>(
        &'a self,
        user: UserBinding<'a>,
        namespace: &str,
        service_account: Option<&str>,
        service: Option<&str>,
        traffic: Traffic,
    ) -> Option<&'a Waypoint> {
        let on_demand = || self.on_demand(namespace, service_account, service, traffic);
        match user {
            UserBinding::OptOut => None,
            UserBinding::Unset => on_demand(),
            UserBinding::Bound(w) if w.ready => Some(w),
            // The user's waypoint is not ready (yet): a ready on-demand one
            // keeps serving until it is.
            UserBinding::Bound(w) => on_demand().filter(|o| o.ready).or(Some(w)),
            UserBinding::Unusable => on_demand().filter(|o| o.ready),
        }
    }

    /// What the bindings a user made say for an object (see [`Self::bound`]).
    pub fn user_binding(
        &self,
        state: &ClusterState,
        namespace: &str,
        labels: &Labels,
        service_account: Option<&str>,
        traffic: Traffic,
    ) -> UserBinding<'_> {
        let named = |ns, name| {
            self.usable(state, ns, name, namespace, traffic)
                .map_or(UserBinding::Unusable, UserBinding::Bound)
        };
        match use_waypoint(labels, namespace) {
            UseWaypoint::None => return UserBinding::OptOut,
            UseWaypoint::Named(ns, name) => return named(ns, name),
            UseWaypoint::Unset => {}
        }
        if let Some(w) = self.for_service_account(namespace, service_account, traffic) {
            return UserBinding::Bound(w);
        }
        let Some(ns) = state.namespace(namespace) else {
            return UserBinding::OptOut;
        };
        match use_waypoint(labels_of(&ns.metadata.labels), namespace) {
            UseWaypoint::Named(ns, name) => named(ns, name),
            UseWaypoint::None => UserBinding::OptOut,
            UseWaypoint::Unset => UserBinding::Unset,
        }
    }

    /// The on-demand waypoint that binds an object: its account's, else its
    /// service's, among those some rule still needs.
    fn on_demand(
        &self,
        namespace: &str,
        service_account: Option<&str>,
        service: Option<&str>,
        traffic: Traffic,
    ) -> Option<&Waypoint> {
        self.on_demand_candidates(namespace, service_account, service, traffic)
            .find(|w| self.needed.contains(&(w.namespace.clone(), w.name.clone())))
    }

    /// Every on-demand waypoint, needed or draining, that is or was made for
    /// an object: its account's, then its service's.
    fn on_demand_candidates<'a>(
        &'a self,
        namespace: &str,
        service_account: Option<&str>,
        service: Option<&str>,
        traffic: Traffic,
    ) -> impl Iterator<Item = &'a Waypoint> {
        let by_account = service_account.and_then(|sa| {
            self.on_demand_by_service_account
                .get(&(namespace.to_string(), sa.to_string()))
        });
        let by_service = service.and_then(|service| {
            self.on_demand_by_service
                .get(&(namespace.to_string(), service.to_string()))
        });
        by_account
            .into_iter()
            .chain(by_service)
            .flatten()
            .filter_map(|key| self.by_key.get(key))
            .filter(move |w| w.traffic.takes(traffic))
    }

    /// The waypoint a user made for `service_account` in `namespace`, when
    /// it takes `traffic`.
    fn for_service_account(
        &self,
        namespace: &str,
        service_account: Option<&str>,
        traffic: Traffic,
    ) -> Option<&Waypoint> {
        let key = (self.by_service_account)
            .get(&(namespace.to_string(), service_account?.to_string()))?;
        self.by_key.get(key).filter(|w| w.traffic.takes(traffic))
    }

    /// Why the waypoint an object of `from_namespace` names cannot take its
    /// `traffic`, as upstream's `fetchWaypointForService` and its
    /// `ReportWaypoint*` messages (istio/istio
    /// pilot/pkg/serviceregistry/kube/controller/ambient: `waypoints.go`
    /// `fetchWaypointForTarget` / `fetchWaypointForService`, `status.go`)
    /// say it: `(reason, message)`; `Ok` when usable.
    pub(super) fn check_named(
        &self,
        state: &ClusterState,
        waypoint_namespace: &str,
        name: &str,
        from_namespace: &str,
        traffic: Traffic,
    ) -> Result<&Waypoint, Refusal> {
        let key = format!("{waypoint_namespace}/{name}");
        let Some(w) = self
            .by_key
            .get(&(waypoint_namespace.to_string(), name.to_string()))
        else {
            return Err((
                "WaypointIsNotReady",
                format!("waypoint {key:?} is not ready"),
            ));
        };
        if !w.allows(state, from_namespace) {
            return Err((
                "AttachmentDenied",
                format!(
                    "we are not permitted to attach to waypoint {key:?} (missing allowedRoutes?)"
                ),
            ));
        }
        if !w.traffic.takes(traffic) {
            let wanted = match traffic {
                Traffic::Service => "service",
                Traffic::Workload => "workload",
                Traffic::All => "all",
                Traffic::None => "none",
            };
            return Err((
                "UnsupportedTrafficType",
                format!(
                    "attempting to bind to traffic type {wanted:?} which the waypoint {key:?} does not support"
                ),
            ));
        }
        Ok(w)
    }

    /// The waypoint a Service or ServiceEntry asks for (its own
    /// `istio.io/use-waypoint`, else its namespace's; `none` on either
    /// stops the search, as upstream's `fetchWaypointForTarget`), as
    /// `ns/name`, and why it cannot take the object's service traffic, if
    /// it cannot ([`Self::check_named`]).
    pub(super) fn asked_for(
        &self,
        state: &ClusterState,
        namespace: &str,
        labels: &Labels,
    ) -> Option<(String, Result<(), Refusal>)> {
        let (ns, name) = match use_waypoint(labels, namespace) {
            UseWaypoint::None => return None,
            UseWaypoint::Named(ns, name) => (ns, name),
            UseWaypoint::Unset => {
                let ns = state.namespace(namespace)?;
                match use_waypoint(labels_of(&ns.metadata.labels), namespace) {
                    UseWaypoint::Named(ns, name) => (ns, name),
                    UseWaypoint::None | UseWaypoint::Unset => return None,
                }
            }
        };
        let checked = self
            .check_named(state, &ns, &name, namespace, Traffic::Service)
            .map(|_| ());
        Some((format!("{ns}/{name}"), checked))
    }

    fn usable(
        &self,
        state: &ClusterState,
        waypoint_namespace: String,
        name: String,
        from_namespace: &str,
        traffic: Traffic,
    ) -> Option<&Waypoint> {
        let key = (waypoint_namespace, name);
        let Some(w) = self.by_key.get(&key) else {
            debug!(waypoint = %format!("{}/{}", key.0, key.1), "bound waypoint is missing or not ready");
            return None;
        };
        if !w.allows(state, from_namespace) {
            debug!(waypoint = %format!("{}/{}", key.0, key.1), namespace = from_namespace, "waypoint does not accept this namespace");
            return None;
        }
        if !w.traffic.takes(traffic) {
            debug!(waypoint = %format!("{}/{}", key.0, key.1), ?traffic, "waypoint does not take this traffic");
            return None;
        }
        Some(w)
    }
}

/// Where the waypoint is reached, as upstream fills it: a status hostname,
/// else a status IP, else the hostname of the Service provisioned for it.
fn gateway_address(
    state: &ClusterState,
    mesh: &MeshConfig,
    gw: &Gateway,
) -> Option<GatewayAddress> {
    let namespace = gw.metadata.namespace.clone().unwrap_or_default();
    let hostname = |hostname: String| GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: namespace.clone(),
            hostname,
        })),
        hbone_mtls_port: api::ports::HBONE as u32,
    };
    let addresses = gw
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    if let Some(a) = addresses
        .iter()
        .find(|a| a.r#type.as_deref() == Some("Hostname"))
    {
        return Some(hostname(a.value.clone()));
    }
    // The API server defaults an untyped address to IPAddress.
    let ip = addresses
        .iter()
        .filter(|a| matches!(a.r#type.as_deref(), None | Some("IPAddress")))
        .find_map(|a| a.value.parse::<IpAddr>().ok());
    if let Some(ip) = ip {
        return Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(NetworkAddress {
                network: mesh.network.clone(),
                address: super::ip_bytes(ip),
            })),
            hbone_mtls_port: api::ports::HBONE as u32,
        });
    }
    let gw_name = gw.metadata.name.as_deref()?;
    in_namespace(&state.services, &namespace)
        .find(|svc| {
            labels_of(&svc.metadata.labels)
                .get(labels::GATEWAY_NAME)
                .map(String::as_str)
                == Some(gw_name)
        })
        .and_then(|svc| svc.metadata.name.as_deref())
        .map(|svc| hostname(mesh.service_hostname(svc, &namespace)))
}

/// The namespaces allowed to bind, from the HBONE listener (port 15008),
/// `Same` when there is none.
fn allowed_namespaces(gw: &Gateway) -> AllowedNamespaces {
    let listener = gw
        .spec
        .listeners
        .iter()
        .find(|l| l.protocol == "HBONE" && l.port == i32::from(api::ports::HBONE));
    let Some(ns) = listener
        .and_then(|l| l.allowed_routes.as_ref())
        .and_then(|r| r.namespaces.as_ref())
    else {
        return AllowedNamespaces::Same;
    };
    match ns.from {
        Some(From::All) => AllowedNamespaces::All,
        Some(From::Selector) => {
            AllowedNamespaces::Selector(ns.selector.clone().unwrap_or_default())
        }
        Some(From::Same) | None => AllowedNamespaces::Same,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Namespace `shop` (with `ns_labels`), a pod-less cluster holding the
    /// waypoints `extra` describes, each with a status address.
    fn state(ns_labels: &str, extra: &str) -> ClusterState {
        let text = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{ns_labels}}}}}\n{extra}"
        );
        let manifest = api::manifest::parse(&text).unwrap();
        assert!(manifest.refused.is_empty(), "{:?}", manifest.refused);
        ClusterState::from_objects(manifest.objects)
    }

    fn gateway(name: &str, labels: &str, annotations: &str) -> String {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}, annotations: {{{annotations}}}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\nstatus:\n  addresses: [{{type: Hostname, value: {name}.shop.svc.cluster.local}}]\n"
        )
    }

    const ON_DEMAND: &str = "istio-rs.io/on-demand-waypoint: \"true\"";
    const NEEDED: &str = "istio-rs.io/needed-by: HTTPRoute shop/r";
    const FOR_WEB: &str = "istio.io/for-service-account: web";

    /// The waypoint bound to a service in `shop` with `labels`, whose pods
    /// run as `web`.
    fn bound_to(state: &ClusterState, labels: &[(&str, &str)]) -> Option<String> {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let waypoints = Waypoints::build(state, &MeshConfig::default());
        waypoints
            .bound(
                state,
                "shop",
                &labels,
                Some("web"),
                Some("web"),
                Traffic::Service,
            )
            .map(Waypoint::key)
    }

    #[test]
    fn an_on_demand_waypoint_serves_what_no_user_binding_does() {
        let s = state(
            "",
            &gateway("web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}")),
        );
        assert_eq!(bound_to(&s, &[]).as_deref(), Some("shop/web-waypoint"));
        // An on-demand waypoint for another account serves nothing here.
        let other = gateway(
            "api-waypoint",
            ON_DEMAND,
            &format!("istio.io/for-service-account: api, {NEEDED}"),
        );
        assert_eq!(bound_to(&state("", &other), &[]), None);
    }

    #[test]
    fn the_objects_own_label_wins_over_an_on_demand_waypoint() {
        let s = state(
            "",
            &(gateway("web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}"))
                + &gateway("mine", "", "")),
        );
        assert_eq!(
            bound_to(&s, &[("istio.io/use-waypoint", "mine")]).as_deref(),
            Some("shop/mine")
        );
        assert_eq!(bound_to(&s, &[("istio.io/use-waypoint", "none")]), None);
    }

    #[test]
    fn a_users_per_account_waypoint_wins_over_an_on_demand_one() {
        // The user's sorts after the on-demand one by name: order is not
        // what decides.
        let s = state(
            "",
            &(gateway("a-web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}"))
                + &gateway("z-mine", "", FOR_WEB)),
        );
        assert_eq!(bound_to(&s, &[]).as_deref(), Some("shop/z-mine"));
    }

    /// A ready instance of waypoint `name`.
    fn instance(name: &str, ip: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-0, namespace: shop, labels: {{gateway.networking.k8s.io/gateway-name: {name}}}}}\nspec: {{nodeName: n, serviceAccountName: {name}, containers: [{{name: w, image: w}}]}}\nstatus: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        )
    }

    #[test]
    fn a_draining_on_demand_waypoint_serves_nothing() {
        let draining = gateway(
            "web-waypoint",
            ON_DEMAND,
            &format!("{FOR_WEB}, istio-rs.io/needed-by: \"\""),
        );
        assert_eq!(bound_to(&state("", &draining), &[]), None);
        let unannotated = gateway("web-waypoint", ON_DEMAND, FOR_WEB);
        assert_eq!(bound_to(&state("", &unannotated), &[]), None);
    }

    #[test]
    fn a_service_of_several_accounts_is_served_by_its_own_on_demand_waypoint() {
        let gw = gateway(
            "waypoint-svc-web",
            &format!("{ON_DEMAND}, istio.io/waypoint-for: service"),
            &format!("istio-rs.io/for-service: web, {NEEDED}"),
        );
        let s = state("", &gw);
        let waypoints = Waypoints::build(&s, &MeshConfig::default());
        let none = Labels::new();
        let service = |name| {
            waypoints
                .bound(&s, "shop", &none, None, Some(name), Traffic::Service)
                .map(Waypoint::key)
        };
        assert_eq!(service("web").as_deref(), Some("shop/waypoint-svc-web"));
        assert_eq!(service("api"), None);
        // Workloads are not its business.
        let workload = waypoints.bound(&s, "shop", &none, Some("web"), None, Traffic::Workload);
        assert!(workload.is_none());
    }

    #[test]
    fn a_ready_on_demand_waypoint_serves_until_the_users_one_is_ready() {
        let on_demand = gateway("web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}"));
        let mine = gateway("mine", "", "");
        let label = [("istio.io/use-waypoint", "mine")];
        // Neither ready: the user's binding stands.
        let s = state("", &format!("{on_demand}{mine}"));
        assert_eq!(bound_to(&s, &label).as_deref(), Some("shop/mine"));
        // The on-demand one ready, the user's starting (or not even there yet).
        let ready = instance("web-waypoint", "10.0.0.1");
        let s = state("", &format!("{on_demand}{mine}{ready}"));
        assert_eq!(bound_to(&s, &label).as_deref(), Some("shop/web-waypoint"));
        let s = state("", &format!("{on_demand}{ready}"));
        assert_eq!(bound_to(&s, &label).as_deref(), Some("shop/web-waypoint"));
        // The user's ready: it wins.
        let s = state(
            "",
            &format!("{on_demand}{mine}{ready}{}", instance("mine", "10.0.0.2")),
        );
        assert_eq!(bound_to(&s, &label).as_deref(), Some("shop/mine"));
        // `none` is never overridden.
        let s = state("", &format!("{on_demand}{ready}"));
        assert_eq!(bound_to(&s, &[("istio.io/use-waypoint", "none")]), None);
    }

    #[test]
    fn around_a_handover_both_waypoints_serve() {
        let needed = gateway("web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}"));
        let draining = gateway(
            "web-waypoint",
            ON_DEMAND,
            &format!("{FOR_WEB}, istio-rs.io/needed-by: \"\""),
        );
        let ready = instance("web-waypoint", "10.0.0.1");
        let mine = gateway("mine", "", "") + &instance("mine", "10.0.0.2");
        let label = [("istio.io/use-waypoint", "mine")];
        let handing_over = |s: &ClusterState, labels: &[(&str, &str)]| {
            let waypoints = Waypoints::build(s, &MeshConfig::default());
            let bound = bound_to(s, labels);
            let labels: Labels = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let (sa, service, traffic) = (Some("web"), Some("web"), Traffic::Service);
            let serving = waypoints.serving(s, "shop", &labels, sa, service, traffic);
            assert_eq!(serving.bound.map(Waypoint::key), bound);
            serving.also
        };
        let web_waypoint = vec!["shop/web-waypoint".to_string()];
        // Serving itself: nothing to hand over.
        let s = state("", &format!("{needed}{ready}{mine}"));
        assert!(handing_over(&s, &[]).is_empty());
        // The user's waypoint took over, or the service opted out.
        assert_eq!(handing_over(&s, &label), web_waypoint);
        assert_eq!(
            handing_over(&s, &[("istio.io/use-waypoint", "none")]),
            web_waypoint
        );
        // No rule needs it any more: it drains, bound to nothing.
        let s = state("", &format!("{draining}{ready}"));
        assert_eq!(bound_to(&s, &[]), None);
        assert_eq!(handing_over(&s, &[]), web_waypoint);
        // Without a ready instance, no traffic can reach it.
        let s = state("", &format!("{draining}{mine}"));
        assert!(handing_over(&s, &label).is_empty());
        // The user's waypoint starting while the on-demand one serves: it
        // holds the service before it is ready.
        let starting = gateway("mine", "", "");
        let s = state("", &format!("{needed}{ready}{starting}"));
        assert_eq!(bound_to(&s, &label).as_deref(), Some("shop/web-waypoint"));
        assert_eq!(handing_over(&s, &label), vec!["shop/mine".to_string()]);
    }

    #[test]
    fn the_namespaces_label_wins_over_an_on_demand_waypoint() {
        let gateways = gateway("web-waypoint", ON_DEMAND, &format!("{FOR_WEB}, {NEEDED}"))
            + &gateway("mine", "", "");
        let s = state("istio.io/use-waypoint: mine", &gateways);
        assert_eq!(bound_to(&s, &[]).as_deref(), Some("shop/mine"));
        let s = state("istio.io/use-waypoint: none", &gateways);
        assert_eq!(bound_to(&s, &[]), None);
    }
}
