//! Where an outbound connection goes, decided from one store snapshot
//! without I/O:
//!
//! - an address the store does not know: plain TCP to it (passthrough);
//! - the VIP of a service whose load balancing mode is PASSTHROUGH (a
//!   ServiceEntry with `resolution: NONE`): the same, once its waypoint,
//!   if it has one, is ruled out (upstream's `find_upstream` answers
//!   `OriginalDestination` for it);
//! - a service VIP: a healthy endpoint (random or round robin) at its own
//!   target port for the service port, among those the service's load
//!   balancing prefers for the source (see [`preferred`]); an endpoint
//!   known only by a hostname (a ServiceEntry's DNS endpoint) is a
//!   [`Plan::Resolve`]: the caller looks the hostname up
//!   ([`crate::dns::on_demand`]) and finishes the route with the address
//!   ([`Unresolved::resolved`]), as upstream's
//!   `pick_workload_destination_or_resolve` (istio/ztunnel `src/state.rs`);
//! - a destination (service or workload) bound to a waypoint: HBONE to the
//!   waypoint, CONNECT to the original destination, expecting the
//!   waypoint's identity, unless the source is that waypoint;
//! - a workload speaking HBONE: HBONE to `ip:15008`, CONNECT `ip:port`,
//!   expecting the workload's identity; one that does not: plain TCP.
//!
//! As upstream, traffic addressed to a service follows the service's
//! waypoint only, not the waypoint of the endpoint it lands on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use api::SpiffeId;
use proxy_core::hbone::HboneTarget;
use proxy_core::store::{
    Address, GatewayAddress, GatewayDestination, InboundProtocol, IpFamily,
    LoadBalancing as ServiceLoadBalancing, LoadBalancingMode, LoadBalancingScope,
    NamespacedHostname, Service, Snapshot, Workload,
};
use rand::Rng;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "service {service} has no healthy endpoint serving port {port}; check the service's pods are ready and expose that port"
    )]
    NoHealthyEndpoint {
        service: NamespacedHostname,
        port: u16,
    },
    #[error(
        "{destination} must be reached through waypoint {waypoint}, which is not in the workload store; is the waypoint deployed?"
    )]
    UnknownWaypoint {
        destination: String,
        waypoint: String,
    },
    #[error(
        "service {service} has no endpoint serving port {port} {locality}; its load balancing is STRICT on {scopes}, so endpoints elsewhere are not used"
    )]
    NoLocalEndpoint {
        service: NamespacedHostname,
        port: u16,
        /// Where the source is: `on this node ("node0")`, `in this
        /// locality (region "r", zone "z")`.
        locality: String,
        /// The scopes, as `NODE (internalTrafficPolicy: Local)` or
        /// `NETWORK, REGION`.
        scopes: String,
    },
    #[error("waypoint {waypoint} has no healthy endpoint; is the waypoint running?")]
    NoWaypointEndpoint { waypoint: NamespacedHostname },
    #[error("workload {uid} has no IP address to connect to")]
    NoAddress { uid: String },
}

/// How a service endpoint is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancing {
    #[default]
    Random,
    RoundRobin,
}

impl FromStr for LoadBalancing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "random" => Ok(LoadBalancing::Random),
            "round-robin" => Ok(LoadBalancing::RoundRobin),
            other => Err(format!(
                "unknown load balancing mode {other:?}: use \"random\" or \"round-robin\""
            )),
        }
    }
}

/// Picks endpoints. Round robin keeps one position per service.
#[derive(Debug, Default)]
pub struct Balancer {
    mode: LoadBalancing,
    next: Mutex<HashMap<NamespacedHostname, usize>>,
}

impl Balancer {
    pub fn new(mode: LoadBalancing) -> Self {
        Balancer {
            mode,
            next: Mutex::default(),
        }
    }

    pub fn pick<'a, T>(&self, service: &NamespacedHostname, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        let i = match self.mode {
            LoadBalancing::Random => rand::rng().random_range(0..items.len()),
            LoadBalancing::RoundRobin => {
                let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
                let slot = next.entry(service.clone()).or_default();
                let i = *slot % items.len();
                *slot = slot.wrapping_add(1);
                i
            }
        };
        items.get(i)
    }
}

/// Who is connecting: the pod being proxied.
#[derive(Clone, Debug)]
pub struct Source<'a> {
    pub identity: &'a SpiffeId,
    pub ip: IpAddr,
    /// The pod's workload: its node, locality, cluster and network are what
    /// a service's routing preferences compare endpoints with.
    pub workload: &'a Workload,
}

/// The next hop of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// Plain TCP, from the pod, to this address.
    Tcp(SocketAddr),
    /// An HBONE tunnel.
    Hbone {
        target: HboneTarget,
        /// The peer is a waypoint, not the destination itself.
        via_waypoint: bool,
    },
}

/// The decision for one connection, or what is left to decide once a
/// hostname is resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    Ready(Route),
    Resolve(Unresolved),
}

/// A service endpoint known only by its hostname, chosen for a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub workload: Arc<Workload>,
    pub service: Arc<Service>,
    /// The endpoint's target port for the service port.
    pub port: u16,
    /// The service's IP families, if it is restricted.
    pub ip_families: Option<IpFamily>,
    /// The address the client connected to: its family is preferred.
    pub client_dst: SocketAddr,
    hbone_port: u16,
}

impl Unresolved {
    pub fn hostname(&self) -> &str {
        &self.workload.hostname
    }

    /// The route to the workload at `ip`, as to any workload: HBONE or
    /// plain TCP by its protocol, at the same target port.
    pub fn resolved(self, ip: IpAddr) -> Route {
        Route {
            next_hop: direct(
                &self.workload,
                SocketAddr::new(ip, self.port),
                self.hbone_port,
            ),
            workload: Some(self.workload),
            service: Some(self.service),
        }
    }
}

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub next_hop: NextHop,
    /// The workload the connection is meant for, when known.
    pub workload: Option<Arc<Workload>>,
    /// The service it was addressed to, if any.
    pub service: Option<Arc<Service>>,
}

/// Where to send a connection from `source` to `dst`. Workloads listen for
/// HBONE on `hbone_port` (15008).
pub fn outbound(
    snapshot: &Snapshot,
    network: &str,
    source: &Source<'_>,
    dst: SocketAddr,
    hbone_port: u16,
    balancer: &Balancer,
) -> Result<Plan, Error> {
    let router = Router {
        snapshot,
        source,
        dst,
        hbone_port,
        balancer,
    };
    match snapshot.address(network, dst.ip()) {
        None => Ok(Plan::Ready(Route {
            next_hop: NextHop::Tcp(dst),
            workload: None,
            service: None,
        })),
        Some(Address::Service(service)) => router.to_service(service),
        Some(Address::Workload(workload)) => router.to_workload(workload).map(Plan::Ready),
    }
}

/// Whether `identity` at `ip` is (one of the workloads of) gateway `gateway`:
/// a waypoint is trusted only where it runs, with the identity it has.
pub fn is_gateway(
    snapshot: &Snapshot,
    gateway: &GatewayAddress,
    identity: &SpiffeId,
    ip: IpAddr,
) -> bool {
    let is = |w: &Workload| &w.identity == identity && w.addresses.contains(&ip);
    match snapshot.resolve_gateway(gateway) {
        Some(Address::Workload(w)) => is(&w),
        Some(Address::Service(s)) => snapshot
            .endpoints(&s.key())
            .is_some_and(|eps| eps.values().any(|e| is(&e.workload))),
        None => false,
    }
}

/// The service a connection to `workload` on `port` is for, for metrics:
/// the first of the workload's services that maps a port to it.
pub fn inbound_service(
    snapshot: &Snapshot,
    workload: &Workload,
    port: u16,
) -> Option<Arc<Service>> {
    workload.services.iter().find_map(|(key, own)| {
        let service = snapshot.service(key)?;
        let serves = own.iter().any(|p| p.target_port == port)
            || service
                .ports
                .iter()
                .any(|p| p.target_port == port || (p.target_port == 0 && p.service_port == port));
        serves.then_some(service)
    })
}

/// The service `workload` backs under `hostname`, if any: a peer's word on
/// which service it addressed (the `forwarded` host of its CONNECT) is
/// taken only within this bounded set, as upstream's
/// `guess_inbound_service` does.
pub fn backed_service(
    snapshot: &Snapshot,
    workload: &Workload,
    hostname: &str,
) -> Option<Arc<Service>> {
    workload
        .services
        .keys()
        .filter(|key| key.hostname == hostname)
        .find_map(|key| snapshot.service(key))
}

struct Router<'a> {
    snapshot: &'a Snapshot,
    source: &'a Source<'a>,
    dst: SocketAddr,
    hbone_port: u16,
    balancer: &'a Balancer,
}

impl Router<'_> {
    fn to_service(&self, service: Arc<Service>) -> Result<Plan, Error> {
        if let Some(waypoint) = self.waypoint(service.waypoint.as_ref(), &service.hostname)? {
            return Ok(Plan::Ready(Route {
                next_hop: waypoint,
                workload: None,
                service: Some(service),
            }));
        }
        if service
            .load_balancing
            .as_ref()
            .is_some_and(|lb| lb.mode == LoadBalancingMode::Passthrough)
        {
            // Upstream's `find_upstream` (istio/ztunnel `src/state.rs`)
            // answers `OriginalDestination` and the connection goes out as
            // to an address it does not know: plain TCP to what the client
            // dialled, no workload, no service in its labels.
            return Ok(Plan::Ready(Route {
                next_hop: NextHop::Tcp(self.dst),
                workload: None,
                service: None,
            }));
        }
        let port = self.dst.port();
        // An endpoint without an address of a family the service allows is
        // reached by its hostname, when it has one.
        let candidates: Vec<(Arc<Workload>, Target)> = self
            .snapshot
            .ready_endpoints(&service)
            .into_iter()
            .filter_map(|e| {
                let target_port = e.target_port(&service, port)?;
                let target = match pick_ip(&e.workload, self.dst.ip(), service.ip_families) {
                    Some(ip) => Target::Address(SocketAddr::new(ip, target_port)),
                    None if !e.workload.hostname.is_empty() => Target::Hostname(target_port),
                    None => return None,
                };
                Some((e.workload, target))
            })
            .collect();
        if candidates.is_empty() {
            return Err(Error::NoHealthyEndpoint {
                service: service.key(),
                port,
            });
        }
        let candidates = self.preferred(&service, port, candidates, |(w, _)| w)?;
        let (workload, target) = self
            .balancer
            .pick(&service.key(), &candidates)
            .cloned()
            .ok_or_else(|| Error::NoHealthyEndpoint {
                service: service.key(),
                port,
            })?;
        Ok(match target {
            Target::Address(target) => Plan::Ready(Route {
                next_hop: direct(&workload, target, self.hbone_port),
                workload: Some(workload),
                service: Some(service),
            }),
            Target::Hostname(port) => Plan::Resolve(Unresolved {
                workload,
                ip_families: service.ip_families,
                service,
                port,
                client_dst: self.dst,
                hbone_port: self.hbone_port,
            }),
        })
    }

    fn to_workload(&self, workload: Arc<Workload>) -> Result<Route, Error> {
        let next_hop = match self.waypoint(workload.waypoint.as_ref(), &workload.uid)? {
            Some(waypoint) => waypoint,
            None => direct(&workload, self.dst, self.hbone_port),
        };
        Ok(Route {
            next_hop,
            workload: Some(workload),
            service: None,
        })
    }

    /// The candidates `service`'s load balancing lets this source use
    /// (see [`preferred`]); an error naming the service and the source's
    /// node or locality when a STRICT preference leaves none.
    fn preferred<T>(
        &self,
        service: &Service,
        port: u16,
        candidates: Vec<T>,
        workload: impl Fn(&T) -> &Workload,
    ) -> Result<Vec<T>, Error> {
        let source = self.source.workload;
        let lb = service.load_balancing.as_ref();
        let chosen = preferred(lb, source, candidates, workload);
        match lb {
            Some(lb) if chosen.is_empty() => Err(Error::NoLocalEndpoint {
                service: service.key(),
                port,
                locality: describe_locality(&lb.routing_preference, source),
                scopes: describe_scopes(&lb.routing_preference),
            }),
            _ => Ok(chosen),
        }
    }

    /// The hop to `gateway` (the destination's waypoint) carrying the
    /// original destination; `None` without a waypoint or when the source
    /// is the waypoint itself (its traffic goes on to the destination).
    fn waypoint(
        &self,
        gateway: Option<&GatewayAddress>,
        destination: &str,
    ) -> Result<Option<NextHop>, Error> {
        let Some(gateway) = gateway else {
            return Ok(None);
        };
        if is_gateway(self.snapshot, gateway, self.source.identity, self.source.ip) {
            return Ok(None);
        }
        let unknown = || Error::UnknownWaypoint {
            destination: destination.to_string(),
            waypoint: match &gateway.destination {
                GatewayDestination::Address(a) => a.to_string(),
                GatewayDestination::Hostname(h) => h.to_string(),
            },
        };
        let (workload, ip) = match self.snapshot.resolve_gateway(gateway) {
            None => return Err(unknown()),
            Some(Address::Workload(w)) => {
                let ip = match &gateway.destination {
                    GatewayDestination::Address(a) => Some(a.address),
                    GatewayDestination::Hostname(_) => pick_ip(&w, self.dst.ip(), None),
                };
                (w, ip)
            }
            Some(Address::Service(s)) => {
                let endpoints: Vec<Arc<Workload>> = self
                    .snapshot
                    .ready_endpoints(&s)
                    .into_iter()
                    .map(|e| e.workload)
                    .collect();
                if endpoints.is_empty() {
                    return Err(Error::NoWaypointEndpoint { waypoint: s.key() });
                }
                let port = match gateway.hbone_mtls_port {
                    0 => self.hbone_port,
                    p => p,
                };
                let endpoints = self.preferred(&s, port, endpoints, |w| w)?;
                let w = self
                    .balancer
                    .pick(&s.key(), &endpoints)
                    .cloned()
                    .ok_or_else(|| Error::NoWaypointEndpoint { waypoint: s.key() })?;
                let ip = pick_ip(&w, self.dst.ip(), s.ip_families);
                (w, ip)
            }
        };
        let ip = ip.ok_or_else(|| Error::NoAddress {
            uid: workload.uid.clone(),
        })?;
        let port = match gateway.hbone_mtls_port {
            0 => self.hbone_port,
            p => p,
        };
        Ok(Some(NextHop::Hbone {
            target: HboneTarget {
                identity: workload.identity.clone(),
                address: SocketAddr::new(ip, port),
                authority: self.dst,
            },
            via_waypoint: true,
        }))
    }
}

/// Where a chosen service endpoint is: an address, or its hostname (to be
/// resolved) and the target port.
#[derive(Clone, Debug)]
enum Target {
    Address(SocketAddr),
    Hostname(u16),
}

/// Straight to the workload at `target`; HBONE to it on `hbone_port`.
fn direct(workload: &Workload, target: SocketAddr, hbone_port: u16) -> NextHop {
    match workload.protocol {
        InboundProtocol::Hbone => NextHop::Hbone {
            target: HboneTarget {
                identity: workload.identity.clone(),
                address: SocketAddr::new(target.ip(), hbone_port),
                authority: target,
            },
            via_waypoint: false,
        },
        // ztunnel does not speak a sidecar's mutual TLS (neither does
        // upstream's); the sidecar accepts plain TCP in PERMISSIVE mode.
        InboundProtocol::Tcp | InboundProtocol::LegacyIstioMtls => NextHop::Tcp(target),
    }
}

/// The endpoints among `candidates` (each a `workload`) that a connection
/// from `source` may use under a service's load balancing, ranked as
/// upstream ztunnel ranks them (`ProxyState::load_balance` in
/// istio/ztunnel `src/state.rs`): an endpoint's rank is the number of the
/// routing preference's scopes, from the first, on which it equals the
/// source, stopping at the first that differs.
///
/// - no load balancing, or mode STANDARD / PASSTHROUGH (a PASSTHROUGH
///   service's own VIP never gets here: [`outbound`] sends it on to the
///   original destination; its waypoint's endpoints may): every candidate;
/// - STRICT: only those matching every scope (none is possible: the caller
///   refuses the connection, it does not widen the choice);
/// - FAILOVER: those of the best rank present, so `[NETWORK, REGION, ZONE,
///   SUBZONE]` (istiod's PreferClose) means the same subzone if any, else
///   the same zone, else the same region, else the same network, else any.
///
/// Values compare as strings, empty included: two workloads without a
/// region are in the same region, as upstream.
pub fn preferred<T>(
    lb: Option<&ServiceLoadBalancing>,
    source: &Workload,
    candidates: Vec<T>,
    workload: impl Fn(&T) -> &Workload,
) -> Vec<T> {
    let Some(lb) = lb else {
        return candidates;
    };
    let scopes = &lb.routing_preference;
    let rank = |c: &T| {
        scopes
            .iter()
            .take_while(|scope| same_in(**scope, source, workload(c)))
            .count()
    };
    let wanted = match lb.mode {
        LoadBalancingMode::Standard | LoadBalancingMode::Passthrough => return candidates,
        LoadBalancingMode::Strict => scopes.len(),
        LoadBalancingMode::Failover => match candidates.iter().map(rank).max() {
            Some(best) => best,
            None => return candidates,
        },
    };
    candidates
        .into_iter()
        .filter(|c| rank(c) == wanted)
        .collect()
}

/// Whether `a` and `b` are in the same `scope`.
fn same_in(scope: LoadBalancingScope, a: &Workload, b: &Workload) -> bool {
    match scope {
        LoadBalancingScope::Region => a.locality.region == b.locality.region,
        LoadBalancingScope::Zone => a.locality.zone == b.locality.zone,
        LoadBalancingScope::Subzone => a.locality.subzone == b.locality.subzone,
        LoadBalancingScope::Node => a.node == b.node,
        LoadBalancingScope::Cluster => a.cluster_id == b.cluster_id,
        LoadBalancingScope::Network => a.network == b.network,
    }
}

fn scope_name(scope: LoadBalancingScope) -> &'static str {
    match scope {
        LoadBalancingScope::Region => "REGION",
        LoadBalancingScope::Zone => "ZONE",
        LoadBalancingScope::Subzone => "SUBZONE",
        LoadBalancingScope::Node => "NODE",
        LoadBalancingScope::Cluster => "CLUSTER",
        LoadBalancingScope::Network => "NETWORK",
    }
}

/// `NODE (internalTrafficPolicy: Local)`, `NETWORK, REGION`.
fn describe_scopes(scopes: &[LoadBalancingScope]) -> String {
    if scopes == [LoadBalancingScope::Node] {
        return "NODE (internalTrafficPolicy: Local)".to_string();
    }
    scopes
        .iter()
        .map(|s| scope_name(*s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where the source is, on the scopes that matter:
/// `on this node ("node0")`, `in this locality (region "r", zone "z")`.
fn describe_locality(scopes: &[LoadBalancingScope], source: &Workload) -> String {
    if scopes == [LoadBalancingScope::Node] {
        return format!("on this node ({:?})", source.node);
    }
    let parts: Vec<String> = scopes
        .iter()
        .map(|scope| {
            let value = match scope {
                LoadBalancingScope::Region => &source.locality.region,
                LoadBalancingScope::Zone => &source.locality.zone,
                LoadBalancingScope::Subzone => &source.locality.subzone,
                LoadBalancingScope::Node => &source.node,
                LoadBalancingScope::Cluster => &source.cluster_id,
                LoadBalancingScope::Network => &source.network,
            };
            format!("{} {value:?}", scope_name(*scope).to_lowercase())
        })
        .collect();
    format!("in this locality ({})", parts.join(", "))
}

/// The workload address to connect to: the one asked for if it is one of
/// the workload's, else one of the same family, else any the service allows.
fn pick_ip(workload: &Workload, asked: IpAddr, family: Option<IpFamily>) -> Option<IpAddr> {
    if workload.addresses.contains(&asked) {
        return Some(asked);
    }
    let allowed: Vec<IpAddr> = workload
        .addresses
        .iter()
        .copied()
        .filter(|ip| family.is_none_or(|f| f.accepts(*ip)))
        .collect();
    allowed
        .iter()
        .find(|ip| ip.is_ipv4() == asked.is_ipv4())
        .or_else(|| allowed.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing::xds;
    use proxy_core::store::WorkloadStore;

    const HBONE: u16 = 15008;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// client 10.0.0.1, server pods 10.0.0.2/.3 behind VIP 10.96.0.1
    /// (80 -> 8080), an out-of-mesh pod 10.0.0.9, a pod with a sidecar
    /// 10.0.0.10, waypoint pod 10.0.0.5 behind VIP 10.96.0.5.
    fn store() -> WorkloadStore {
        let store = WorkloadStore::new();
        let server = |name: &str, ip: &str| {
            xds::workload(name, "ns", ip)
                .in_service("ns/server.ns.svc.cluster.local", &[(80, 8080)])
                .hbone()
        };
        xds::apply(
            &store,
            vec![
                xds::workload("client", "ns", "10.0.0.1").hbone().into(),
                server("server-a", "10.0.0.2").into(),
                server("server-b", "10.0.0.3").into(),
                xds::workload("legacy", "ns", "10.0.0.9").into(),
                xds::workload("sidecar", "ns", "10.0.0.10").sidecar().into(),
                xds::workload("waypoint", "ns", "10.0.0.5")
                    .in_service("ns/waypoint.ns.svc.cluster.local", &[(15008, 15008)])
                    .into(),
                xds::service("server", "ns", "10.96.0.1", &[(80, 0)]).into(),
                xds::service("waypoint", "ns", "10.96.0.5", &[(15008, 15008)]).into(),
            ],
        );
        store
    }

    fn route(store: &WorkloadStore, from: &str, dst: &str, lb: &Balancer) -> Result<Route, Error> {
        plan(store, from, dst, lb).map(|plan| match plan {
            Plan::Ready(route) => route,
            Plan::Resolve(u) => panic!("expected a route, got a hostname to resolve: {u:?}"),
        })
    }

    fn plan(store: &WorkloadStore, from: &str, dst: &str, lb: &Balancer) -> Result<Plan, Error> {
        let snapshot = store.snapshot();
        let source = snapshot
            .workload_by_address("", ip(from))
            .expect("the source is a workload of the store");
        outbound(
            &snapshot,
            "",
            &Source {
                identity: &source.identity,
                ip: ip(from),
                workload: &source,
            },
            addr(dst),
            HBONE,
            lb,
        )
    }

    fn hbone(route: &Route) -> (&HboneTarget, bool) {
        match &route.next_hop {
            NextHop::Hbone {
                target,
                via_waypoint,
            } => (target, *via_waypoint),
            other => panic!("expected HBONE, got {other:?}"),
        }
    }

    #[test]
    fn unknown_addresses_pass_through() {
        let r = route(&store(), "10.0.0.1", "192.0.2.7:443", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("192.0.2.7:443")));
        assert!(r.workload.is_none() && r.service.is_none());
    }

    #[test]
    fn workloads_outside_the_mesh_get_plain_tcp() {
        let r = route(&store(), "10.0.0.1", "10.0.0.9:5432", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("10.0.0.9:5432")));
        assert_eq!(r.workload.unwrap().name, "legacy");
    }

    /// ztunnel does not originate a sidecar's mutual TLS (upstream's
    /// neither): a LEGACY_ISTIO_MTLS workload gets plain TCP, not HBONE.
    #[test]
    fn sidecar_workloads_get_plain_tcp() {
        let r = route(&store(), "10.0.0.1", "10.0.0.10:8080", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("10.0.0.10:8080")));
        assert_eq!(r.workload.unwrap().name, "sidecar");
    }

    #[test]
    fn enrolled_workloads_get_hbone_to_15008_with_their_identity() {
        let r = route(&store(), "10.0.0.1", "10.0.0.2:9000", &Balancer::default()).unwrap();
        let (target, via_waypoint) = hbone(&r);
        assert!(!via_waypoint);
        assert_eq!(target.address, addr("10.0.0.2:15008"));
        assert_eq!(target.authority, addr("10.0.0.2:9000"));
        assert_eq!(
            target.identity.to_string(),
            "spiffe://cluster.local/ns/ns/sa/server-a"
        );
    }

    #[test]
    fn service_vips_round_robin_over_endpoints_at_their_target_port() {
        let store = store();
        let lb = Balancer::new(LoadBalancing::RoundRobin);
        let picks: Vec<SocketAddr> = (0..4)
            .map(|_| {
                let r = route(&store, "10.0.0.1", "10.96.0.1:80", &lb).unwrap();
                assert_eq!(r.service.as_ref().unwrap().name, "server");
                hbone(&r).0.authority
            })
            .collect();
        assert_eq!(
            picks,
            [
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080"),
                addr("10.0.0.2:8080"),
                addr("10.0.0.3:8080")
            ]
        );
    }

    #[test]
    fn a_service_without_healthy_endpoints_is_an_error() {
        let store = store();
        xds::apply(
            &store,
            vec![
                xds::workload("server-a", "ns", "10.0.0.2")
                    .in_service("ns/server.ns.svc.cluster.local", &[(80, 8080)])
                    .unhealthy()
                    .into(),
                xds::workload("server-b", "ns", "10.0.0.3").into(),
            ],
        );
        let err = route(&store, "10.0.0.1", "10.96.0.1:80", &Balancer::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service ns/server.ns.svc.cluster.local has no healthy endpoint serving port 80; check the service's pods are ready and expose that port"
        );
    }

    /// Routes a connection from 10.0.0.1 to `dst`, checks it goes to the
    /// test store's waypoint (10.0.0.5) with `dst` as authority, and
    /// returns the HBONE target.
    #[track_caller]
    fn to_test_waypoint(store: &WorkloadStore, dst: &str) -> HboneTarget {
        let r = route(store, "10.0.0.1", dst, &Balancer::default()).unwrap();
        let (target, via_waypoint) = hbone(&r);
        assert!(via_waypoint);
        assert_eq!(target.address, addr("10.0.0.5:15008"));
        assert_eq!(target.authority, addr(dst));
        target.clone()
    }

    #[test]
    fn a_service_bound_to_a_waypoint_goes_there_with_the_vip_as_authority() {
        let store = store();
        xds::apply(
            &store,
            vec![
                xds::service("server", "ns", "10.96.0.1", &[(80, 0)])
                    .waypoint_service("ns", "waypoint.ns.svc.cluster.local")
                    .into(),
            ],
        );
        let target = to_test_waypoint(&store, "10.96.0.1:80");
        assert_eq!(
            target.identity.to_string(),
            "spiffe://cluster.local/ns/ns/sa/waypoint"
        );

        // The waypoint's own traffic to the service goes to an endpoint.
        let r = route(&store, "10.0.0.5", "10.96.0.1:80", &Balancer::default()).unwrap();
        let (target, via_waypoint) = hbone(&r);
        assert!(!via_waypoint);
        assert_eq!(target.authority.port(), 8080);
    }

    #[test]
    fn a_passthrough_service_goes_to_the_address_dialled_unless_it_has_a_waypoint() {
        use api::workload::load_balancing::{HealthPolicy, Mode};
        let store = store();
        let passthrough = || {
            xds::service("server", "ns", "10.96.0.1", &[(80, 0)]).load_balancing(
                &[],
                Mode::Passthrough,
                HealthPolicy::AllowAll,
            )
        };
        xds::apply(&store, vec![passthrough().into()]);
        // Endpoints exist and are healthy, yet none is picked: plain TCP to
        // the VIP and port as dialled, no workload, no service.
        let r = route(&store, "10.0.0.1", "10.96.0.1:80", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("10.96.0.1:80")));
        assert!(r.workload.is_none());
        assert!(r.service.is_none());
        // A port the service does not list goes the same way.
        let r = route(&store, "10.0.0.1", "10.96.0.1:5432", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("10.96.0.1:5432")));

        // Bound to a waypoint: the waypoint first, as for any service.
        xds::apply(
            &store,
            vec![
                passthrough()
                    .waypoint_service("ns", "waypoint.ns.svc.cluster.local")
                    .into(),
            ],
        );
        to_test_waypoint(&store, "10.96.0.1:80");
        // And the waypoint's own connection goes on to the address dialled.
        let r = route(&store, "10.0.0.5", "10.96.0.1:80", &Balancer::default()).unwrap();
        assert_eq!(r.next_hop, NextHop::Tcp(addr("10.96.0.1:80")));
    }

    #[test]
    fn a_workload_bound_to_a_waypoint_by_address_goes_there() {
        let store = store();
        xds::apply(
            &store,
            vec![
                xds::workload("server-a", "ns", "10.0.0.2")
                    .hbone()
                    .waypoint_address("10.96.0.5")
                    .into(),
            ],
        );
        let r = route(&store, "10.0.0.1", "10.0.0.2:9000", &Balancer::default()).unwrap();
        let (target, via_waypoint) = hbone(&r);
        assert!(via_waypoint);
        assert_eq!(target.address, addr("10.0.0.5:15008"));
        assert_eq!(target.authority, addr("10.0.0.2:9000"));
        assert_eq!(r.workload.unwrap().name, "server-a");
    }

    #[test]
    fn a_missing_waypoint_fails_closed() {
        let store = store();
        xds::apply(
            &store,
            vec![
                xds::workload("server-a", "ns", "10.0.0.2")
                    .hbone()
                    .waypoint_service("ns", "gone.ns.svc.cluster.local")
                    .into(),
            ],
        );
        let err = route(&store, "10.0.0.1", "10.0.0.2:9000", &Balancer::default()).unwrap_err();
        assert!(
            matches!(err, Error::UnknownWaypoint { ref waypoint, .. } if waypoint == "ns/gone.ns.svc.cluster.local"),
            "{err}"
        );
    }

    #[test]
    fn the_waypoint_is_recognised_by_identity_and_address_together() {
        let snapshot = store().snapshot();
        let gateway = GatewayAddress {
            destination: GatewayDestination::Hostname(NamespacedHostname::new(
                "ns",
                "waypoint.ns.svc.cluster.local",
            )),
            hbone_mtls_port: 15008,
        };
        let waypoint: SpiffeId = "spiffe://cluster.local/ns/ns/sa/waypoint".parse().unwrap();
        let client: SpiffeId = "spiffe://cluster.local/ns/ns/sa/client".parse().unwrap();
        assert!(is_gateway(&snapshot, &gateway, &waypoint, ip("10.0.0.5")));
        assert!(!is_gateway(&snapshot, &gateway, &waypoint, ip("10.0.0.1")));
        assert!(!is_gateway(&snapshot, &gateway, &client, ip("10.0.0.5")));
    }

    use api::workload::load_balancing::{HealthPolicy, Mode, Scope};

    const LOCAL_KEY: &str = "ns/local.ns.svc.cluster.local";

    /// Service `local` (VIP 10.96.1.1, 80 -> 8080) with this load
    /// balancing, over `endpoints` (name, ip, node, region, zone, healthy),
    /// and clients `client-a` (10.1.0.1, node-a, r1/z1) and `client-c`
    /// (10.1.0.9, node-c, r3/z1).
    fn local_store(
        lb: Option<(&[Scope], Mode, HealthPolicy)>,
        endpoints: &[(&str, &str, &str, &str, &str, bool)],
    ) -> WorkloadStore {
        let store = WorkloadStore::new();
        let mut service = xds::service("local", "ns", "10.96.1.1", &[(80, 8080)]);
        if let Some((scopes, mode, health)) = lb {
            service = service.load_balancing(scopes, mode, health);
        }
        let mut addresses = vec![
            service.into(),
            xds::workload("client-a", "ns", "10.1.0.1")
                .hbone()
                .node("node-a")
                .locality("r1", "z1", "")
                .into(),
            xds::workload("client-c", "ns", "10.1.0.9")
                .hbone()
                .node("node-c")
                .locality("r3", "z1", "")
                .into(),
        ];
        for (name, ip, node, region, zone, healthy) in endpoints {
            let mut w = xds::workload(name, "ns", ip)
                .in_service(LOCAL_KEY, &[(80, 8080)])
                .hbone()
                .node(node)
                .locality(region, zone, "");
            if !healthy {
                w = w.unhealthy();
            }
            addresses.push(w.into());
        }
        xds::apply(&store, addresses);
        store
    }

    /// Who answers `n` connections from `from` to the service, in order.
    fn picks(store: &WorkloadStore, from: &str, n: usize) -> Vec<String> {
        let lb = Balancer::new(LoadBalancing::RoundRobin);
        (0..n)
            .map(|_| {
                let r = route(store, from, "10.96.1.1:80", &lb).unwrap();
                r.workload.unwrap().name.clone()
            })
            .collect()
    }

    const LOCAL: Option<(&[Scope], Mode, HealthPolicy)> =
        Some((&[Scope::Node], Mode::Strict, HealthPolicy::OnlyHealthy));
    const PREFER_CLOSE: Option<(&[Scope], Mode, HealthPolicy)> = Some((
        &[Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone],
        Mode::Failover,
        HealthPolicy::OnlyHealthy,
    ));

    #[test]
    fn internal_traffic_policy_local_uses_only_endpoints_on_the_source_node() {
        let store = local_store(
            LOCAL,
            &[
                ("near", "10.1.0.2", "node-a", "r1", "z1", true),
                ("far", "10.1.0.3", "node-b", "r1", "z1", true),
                ("near-2", "10.1.0.4", "node-a", "r2", "z9", true),
            ],
        );
        let answered = picks(&store, "10.1.0.1", 6);
        assert_eq!(
            answered,
            ["near", "near-2", "near", "near-2", "near", "near-2"]
        );
    }

    #[test]
    fn internal_traffic_policy_local_without_a_local_endpoint_is_an_error() {
        let store = local_store(
            LOCAL,
            &[
                ("near", "10.1.0.2", "node-a", "r1", "z1", false),
                ("far", "10.1.0.3", "node-b", "r1", "z1", true),
            ],
        );
        // No endpoint on node-c at all.
        let err = route(&store, "10.1.0.9", "10.96.1.1:80", &Balancer::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service ns/local.ns.svc.cluster.local has no endpoint serving port 80 on this node (\"node-c\"); its load balancing is STRICT on NODE (internalTrafficPolicy: Local), so endpoints elsewhere are not used"
        );
        // node-a's endpoint is not ready: the healthy one on node-b is
        // still not used.
        let err = route(&store, "10.1.0.1", "10.96.1.1:80", &Balancer::default()).unwrap_err();
        assert!(
            matches!(err, Error::NoLocalEndpoint { ref locality, .. } if locality == "on this node (\"node-a\")"),
            "{err}"
        );
    }

    #[test]
    fn strict_on_several_scopes_names_the_source_locality() {
        let store = local_store(
            Some((
                &[Scope::Region, Scope::Zone],
                Mode::Strict,
                HealthPolicy::OnlyHealthy,
            )),
            &[
                ("same-region", "10.1.0.2", "node-b", "r1", "z2", true),
                ("same-zone", "10.1.0.3", "node-b", "r1", "z1", true),
            ],
        );
        assert_eq!(picks(&store, "10.1.0.1", 2), ["same-zone", "same-zone"]);
        let err = route(&store, "10.1.0.9", "10.96.1.1:80", &Balancer::default()).unwrap_err();
        assert!(
            err.to_string().contains(
                "in this locality (region \"r3\", zone \"z1\"); its load balancing is STRICT on REGION, ZONE"
            ),
            "{err}"
        );
    }

    #[test]
    fn prefer_close_fails_over_from_zone_to_region_to_anywhere() {
        let zone = ("same-zone", "10.1.0.2", "node-b", "r1", "z1", true);
        let region = ("same-region", "10.1.0.3", "node-b", "r1", "z2", true);
        // Same zone name as the client but another region: ranked on the
        // leading scopes only, so it is no closer than any other region.
        let elsewhere = ("elsewhere", "10.1.0.4", "node-b", "r2", "z1", true);
        let elsewhere_2 = ("elsewhere-2", "10.1.0.5", "node-b", "r2", "z2", true);

        let store = local_store(PREFER_CLOSE, &[zone, region, elsewhere, elsewhere_2]);
        assert_eq!(picks(&store, "10.1.0.1", 3), ["same-zone"; 3]);

        let store = local_store(PREFER_CLOSE, &[region, elsewhere, elsewhere_2]);
        assert_eq!(picks(&store, "10.1.0.1", 3), ["same-region"; 3]);

        let store = local_store(PREFER_CLOSE, &[elsewhere, elsewhere_2]);
        assert_eq!(
            picks(&store, "10.1.0.1", 4),
            ["elsewhere", "elsewhere-2", "elsewhere", "elsewhere-2"]
        );

        // An unready endpoint in the zone does not hold traffic there.
        let unready_zone = ("same-zone", "10.1.0.2", "node-b", "r1", "z1", false);
        let store = local_store(PREFER_CLOSE, &[unready_zone, region, elsewhere]);
        assert_eq!(picks(&store, "10.1.0.1", 2), ["same-region"; 2]);
    }

    #[test]
    fn allow_all_makes_unready_endpoints_candidates() {
        let endpoints = [
            ("ready", "10.1.0.2", "node-a", "r1", "z1", true),
            ("unready", "10.1.0.3", "node-a", "r1", "z1", false),
        ];
        let store = local_store(
            Some((&[], Mode::UnspecifiedMode, HealthPolicy::AllowAll)),
            &endpoints,
        );
        assert_eq!(
            picks(&store, "10.1.0.1", 4),
            ["ready", "unready", "ready", "unready"]
        );
        // The default policy skips it.
        let store = local_store(
            Some((&[], Mode::UnspecifiedMode, HealthPolicy::OnlyHealthy)),
            &endpoints,
        );
        assert_eq!(picks(&store, "10.1.0.1", 2), ["ready", "ready"]);
        // With Local: the unready pod on the node serves rather than an error.
        let store = local_store(
            Some((&[Scope::Node], Mode::Strict, HealthPolicy::AllowAll)),
            &[
                ("unready", "10.1.0.3", "node-a", "r1", "z1", false),
                ("far", "10.1.0.4", "node-b", "r1", "z1", true),
            ],
        );
        assert_eq!(picks(&store, "10.1.0.1", 2), ["unready", "unready"]);
    }

    #[test]
    fn without_load_balancing_every_node_and_locality_serves() {
        let endpoints = [
            ("near", "10.1.0.2", "node-a", "r1", "z1", true),
            ("far", "10.1.0.3", "node-b", "r2", "z2", true),
        ];
        // Endpoints come in uid order.
        let store = local_store(None, &endpoints);
        assert_eq!(picks(&store, "10.1.0.1", 4), ["far", "near", "far", "near"]);
        // Preferences without a mode (publishNotReadyAddresses alone) rank
        // nothing either.
        let store = local_store(
            Some((
                &[Scope::Node],
                Mode::UnspecifiedMode,
                HealthPolicy::OnlyHealthy,
            )),
            &endpoints,
        );
        assert_eq!(picks(&store, "10.1.0.1", 2), ["far", "near"]);
    }

    #[test]
    fn a_waypoint_service_follows_its_own_load_balancing() {
        let store = local_store(None, &[("server", "10.1.0.2", "node-b", "r1", "z1", true)]);
        let waypoint = |name: &str, ip: &str, node: &str| {
            xds::workload(name, "ns", ip)
                .service_account("waypoint")
                .node(node)
                .in_service("ns/waypoint.ns.svc.cluster.local", &[(15008, 15008)])
                .into()
        };
        xds::apply(
            &store,
            vec![
                xds::service("local", "ns", "10.96.1.1", &[(80, 8080)])
                    .waypoint_service("ns", "waypoint.ns.svc.cluster.local")
                    .into(),
                xds::service("waypoint", "ns", "10.96.0.5", &[(15008, 15008)])
                    .load_balancing(&[Scope::Node], Mode::Strict, HealthPolicy::OnlyHealthy)
                    .into(),
                waypoint("waypoint-a", "10.1.0.5", "node-a"),
                waypoint("waypoint-b", "10.1.0.6", "node-b"),
            ],
        );
        let lb = Balancer::new(LoadBalancing::RoundRobin);
        for _ in 0..3 {
            let r = route(&store, "10.1.0.1", "10.96.1.1:80", &lb).unwrap();
            assert_eq!(hbone(&r).0.address, addr("10.1.0.5:15008"));
        }
        let err = route(&store, "10.1.0.9", "10.96.1.1:80", &lb).unwrap_err();
        assert!(
            matches!(err, Error::NoLocalEndpoint { ref service, .. } if service.to_string() == "ns/waypoint.ns.svc.cluster.local"),
            "{err}"
        );
    }

    /// Service `external` (VIP 10.96.2.1, 80 -> 8080) whose one endpoint
    /// is known by hostname only, with the client of [`store`].
    fn hostname_store(hbone: bool, families: Option<api::workload::IpFamilies>) -> WorkloadStore {
        let store = store();
        let mut service = xds::service("external", "ns", "10.96.2.1", &[(80, 8080)]);
        if let Some(families) = families {
            service = service.ip_families(families);
        }
        let mut endpoint = xds::workload("external-dns", "ns", "10.0.0.99")
            .hostname_only("backend.example.com")
            .in_service("ns/external.ns.svc.cluster.local", &[(80, 8080)]);
        if hbone {
            endpoint = endpoint.hbone();
        }
        xds::apply(&store, vec![service.into(), endpoint.into()]);
        store
    }

    fn unresolved(plan: Plan) -> Unresolved {
        match plan {
            Plan::Resolve(u) => u,
            Plan::Ready(r) => panic!("expected a hostname to resolve, got {r:?}"),
        }
    }

    #[test]
    fn an_endpoint_known_by_hostname_is_resolved_then_reached_as_any_workload() {
        let lb = Balancer::default();
        let store = hostname_store(false, None);
        let u = unresolved(plan(&store, "10.0.0.1", "10.96.2.1:80", &lb).unwrap());
        assert_eq!(u.hostname(), "backend.example.com");
        assert_eq!(u.port, 8080);
        assert_eq!(u.ip_families, None);
        assert_eq!(u.client_dst, addr("10.96.2.1:80"));
        let route = u.resolved(ip("192.0.2.7"));
        assert_eq!(route.next_hop, NextHop::Tcp(addr("192.0.2.7:8080")));
        assert_eq!(route.service.unwrap().name, "external");
        assert_eq!(route.workload.unwrap().name, "external-dns");

        // Speaking HBONE: a tunnel to the resolved address.
        let store = hostname_store(true, Some(api::workload::IpFamilies::Ipv6Only));
        let u = unresolved(plan(&store, "10.0.0.1", "10.96.2.1:80", &lb).unwrap());
        assert_eq!(u.ip_families, Some(IpFamily::Ipv6));
        let route = u.resolved(ip("2001:db8::7"));
        let (target, via_waypoint) = hbone(&route);
        assert!(!via_waypoint);
        assert_eq!(target.address, addr("[2001:db8::7]:15008"));
        assert_eq!(target.authority, addr("[2001:db8::7]:8080"));
    }

    #[test]
    fn an_endpoint_with_neither_address_nor_hostname_is_not_a_candidate() {
        let store = hostname_store(false, None);
        xds::apply(
            &store,
            vec![
                xds::workload("external-dns", "ns", "10.0.0.99")
                    .hostname_only("")
                    .in_service("ns/external.ns.svc.cluster.local", &[(80, 8080)])
                    .into(),
            ],
        );
        let err = plan(&store, "10.0.0.1", "10.96.2.1:80", &Balancer::default()).unwrap_err();
        assert!(matches!(err, Error::NoHealthyEndpoint { .. }), "{err}");
    }

    #[test]
    fn load_balancing_modes_parse_from_flags() {
        assert_eq!("random".parse(), Ok(LoadBalancing::Random));
        assert_eq!("round-robin".parse(), Ok(LoadBalancing::RoundRobin));
        assert!(
            "fastest"
                .parse::<LoadBalancing>()
                .unwrap_err()
                .contains("round-robin")
        );
    }
}
