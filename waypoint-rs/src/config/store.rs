//! The L7 store: one immutable [`L7Snapshot`] behind an `ArcSwap`, replaced
//! whole by each xDS response, and the lookups the request path needs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::{HeaderMap, StatusCode};
use tokio::sync::watch;

use proxy_core::store::{NamespacedHostname, Snapshot};

use super::traffic::TrafficPolicy;
use super::waypoint::{ServedService, ServedWorkload, Waypoint};
use crate::http::authorization::Policy as AuthorizationPolicy;
use crate::http::jwt::Authentication;
use crate::http::route::RouteTable;
use crate::request::{Authz, Protocol, Refusal, ResponseFlag, Target};

/// Every L7 resource the waypoint holds, by resource name. Cheap to clone
/// (maps of `Arc`s).
#[derive(Clone, Default)]
pub struct L7Snapshot {
    pub(super) waypoints: BTreeMap<String, Arc<Waypoint>>,
    pub(super) route_tables: BTreeMap<String, Arc<RouteTable>>,
    pub(super) authorizations: BTreeMap<String, Arc<AuthorizationPolicy>>,
    pub(super) authentications: BTreeMap<String, Arc<Authentication>>,
    pub(super) traffic_policies: BTreeMap<String, Arc<TrafficPolicy>>,
    generation: u64,
}

impl fmt::Debug for L7Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("L7Snapshot")
            .field("generation", &self.generation)
            .field("waypoints", &self.waypoints.keys().collect::<Vec<_>>())
            .field("route_tables", &self.route_tables.len())
            .field("authorizations", &self.authorizations.len())
            .field("authentications", &self.authentications.len())
            .field("traffic_policies", &self.traffic_policies.len())
            .finish()
    }
}

/// What a CONNECT addressed, as this waypoint serves it, with everything
/// its requests are evaluated against.
#[derive(Clone)]
pub struct Served {
    pub target: Target,
    /// The Waypoint resource that serves it (`<ns>/<name>`).
    pub waypoint: String,
    /// `None`: no route attaches; `http::route::route` forwards to the target.
    pub routes: Option<Arc<RouteTable>>,
    /// In evaluation order: the waypoint's `gateway_authorizations`, then the
    /// target's own (DENYs of all first, then ALLOWs: the evaluator's rule).
    pub authorizations: Vec<Arc<AuthorizationPolicy>>,
    /// In order: the waypoint's `gateway_authentications`, then the target's.
    pub authentications: Vec<Arc<Authentication>>,
    /// The addressed service's DestinationRule (a routed backend's comes
    /// from [`L7Snapshot::traffic_policy`]).
    pub traffic_policy: Option<Arc<TrafficPolicy>>,
    /// Set when the target must be refused whatever the request: answer
    /// `Unservable::refusal` to every request (or refuse a TCP CONNECT).
    pub refusal: Option<Unservable>,
    /// The serving Waypoint's `forward_client_identity`.
    pub forward_client_identity: bool,
}

impl fmt::Debug for Served {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Served")
            .field("target", &self.target)
            .field("waypoint", &self.waypoint)
            .field(
                "routes",
                &self.routes.as_ref().map(|r| r.service.to_string()),
            )
            .field("authorizations", &self.authorizations.len())
            .field("authentications", &self.authentications.len())
            .field(
                "traffic_policy",
                &self.traffic_policy.as_ref().map(|t| t.service.to_string()),
            )
            .field("refusal", &self.refusal)
            .field("forward_client_identity", &self.forward_client_identity)
            .finish()
    }
}

/// Why a served target takes no traffic: both fail closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unservable {
    /// istiod could not serve an L7 rule for it as written.
    DenyAll { reason: String },
    /// A resource it names has not arrived (yet): deny, never "no policy".
    MissingConfig { kind: &'static str, key: String },
}

impl fmt::Display for Unservable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unservable::DenyAll { reason } => write!(f, "deny_all: {reason}"),
            Unservable::MissingConfig { kind, key } => {
                write!(f, "missing_config: {kind} {key} has not arrived")
            }
        }
    }
}

impl Unservable {
    /// As an authorization outcome, for the access log and metrics.
    pub fn authz(&self) -> Authz {
        Authz::Denied {
            policy: match self {
                Unservable::DenyAll { .. } => "deny_all".to_string(),
                Unservable::MissingConfig { .. } => "missing_config".to_string(),
            },
        }
    }

    /// The response: a deny-all is an authorization denial (403, Envoy's
    /// RBAC body); missing configuration is the waypoint not being ready
    /// for this target (503).
    pub fn refusal(&self) -> Refusal {
        match self {
            Unservable::DenyAll { .. } => Refusal {
                status: StatusCode::FORBIDDEN,
                body: "RBAC: access denied".into(),
                flag: ResponseFlag::None,
                headers: HeaderMap::new(),
            },
            Unservable::MissingConfig { .. } => Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: "waypoint configuration incomplete".into(),
                flag: ResponseFlag::None,
                headers: HeaderMap::new(),
            },
        }
    }
}

impl L7Snapshot {
    /// Bumped by every applied response.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn waypoints(&self) -> impl Iterator<Item = &Arc<Waypoint>> {
        self.waypoints.values()
    }

    pub fn route_table(&self, key: &str) -> Option<&Arc<RouteTable>> {
        self.route_tables.get(key)
    }

    /// The DestinationRule of a destination service (a routed backend).
    pub fn traffic_policy(&self, service: &NamespacedHostname) -> Option<&Arc<TrafficPolicy>> {
        self.traffic_policies.get(&service.to_string())
    }

    /// Whether this waypoint serves a CONNECT to `connect`, and how.
    /// `connect` is a VIP:port of a service one of the Waypoint resources
    /// lists (the Service found in `workloads` by VIP, the port one of its
    /// ports), or an IP:port of a listed workload. `None`: refuse the
    /// CONNECT. Cost: one lookup per served service (per CONNECT, not per
    /// request).
    pub fn served(&self, connect: SocketAddr, workloads: &Snapshot) -> Option<Served> {
        let (ip, port) = (connect.ip(), connect.port());
        for waypoint in self.waypoints.values() {
            for s in &waypoint.services {
                let Some(service) = workloads.service(&s.service) else {
                    continue;
                };
                if !service.vips.iter().any(|v| v.address == ip)
                    || !service.ports.iter().any(|p| p.service_port == port)
                {
                    continue;
                }
                return Some(self.served_service(waypoint, s, port));
            }
            for w in &waypoint.workloads {
                if w.addresses.contains(&ip) {
                    return Some(self.served_workload(waypoint, w, port));
                }
            }
        }
        None
    }

    fn served_service(&self, waypoint: &Waypoint, s: &ServedService, port: u16) -> Served {
        let target = Target::Service {
            namespace: s.service.namespace.clone(),
            hostname: s.service.hostname.clone(),
            port,
            protocol: protocol(&s.ports, port),
        };
        let mut missing = None;
        let routes = s.route_table.as_ref().and_then(|key| {
            let table = self.route_tables.get(key).cloned();
            if table.is_none() {
                missing.get_or_insert(("RouteTable", key.clone()));
            }
            table
        });
        self.finish(
            waypoint,
            target,
            routes,
            &s.authorizations,
            &s.authentications,
            self.traffic_policy(&s.service).cloned(),
            s.deny_all_reason.as_deref(),
            missing,
        )
    }

    fn served_workload(&self, waypoint: &Waypoint, w: &ServedWorkload, port: u16) -> Served {
        let target = Target::Workload {
            uid: w.uid.clone(),
            port,
            protocol: protocol(&w.ports, port),
        };
        self.finish(
            waypoint,
            target,
            None,
            &w.authorizations,
            &w.authentications,
            None,
            w.deny_all_reason.as_deref(),
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        waypoint: &Waypoint,
        target: Target,
        routes: Option<Arc<RouteTable>>,
        authorizations: &[String],
        authentications: &[String],
        traffic_policy: Option<Arc<TrafficPolicy>>,
        deny_all_reason: Option<&str>,
        mut missing: Option<(&'static str, String)>,
    ) -> Served {
        let authorizations = collect(
            &self.authorizations,
            waypoint.gateway_authorizations.iter().chain(authorizations),
            "HttpAuthorization",
            &mut missing,
        );
        let authentications = collect(
            &self.authentications,
            waypoint
                .gateway_authentications
                .iter()
                .chain(authentications),
            "JwtAuthentication",
            &mut missing,
        );
        let refusal = match (deny_all_reason, missing) {
            (Some(reason), _) => Some(Unservable::DenyAll {
                reason: reason.to_string(),
            }),
            (None, Some((kind, key))) => Some(Unservable::MissingConfig { kind, key }),
            (None, None) => None,
        };
        Served {
            target,
            waypoint: waypoint.key(),
            routes,
            authorizations,
            authentications,
            traffic_policy,
            refusal,
            forward_client_identity: waypoint.forward_client_identity,
        }
    }
}

fn protocol(ports: &[(u16, Protocol)], port: u16) -> Protocol {
    ports
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, proto)| *proto)
        .unwrap_or(Protocol::Detect)
}

fn collect<'k, T>(
    map: &BTreeMap<String, Arc<T>>,
    keys: impl Iterator<Item = &'k String>,
    kind: &'static str,
    missing: &mut Option<(&'static str, String)>,
) -> Vec<Arc<T>> {
    keys.filter_map(|k| {
        let found = map.get(k).cloned();
        if found.is_none() {
            missing.get_or_insert((kind, k.clone()));
        }
        found
    })
    .collect()
}

/// The store: readers take [`L7Store::snapshot`] (lock-free); the xDS
/// handlers apply one response as one new snapshot.
#[derive(Clone)]
pub struct L7Store {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<L7Snapshot>,
    writer: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl fmt::Debug for L7Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("L7Store").field(&self.snapshot()).finish()
    }
}

impl Default for L7Store {
    fn default() -> Self {
        Self::new()
    }
}

impl L7Store {
    pub fn new() -> Self {
        L7Store {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(L7Snapshot::default()),
                writer: Mutex::new(()),
                changed: watch::Sender::new(0),
            }),
        }
    }

    pub fn snapshot(&self) -> Arc<L7Snapshot> {
        self.inner.current.load_full()
    }

    /// Applies `f` to a copy of the current snapshot and publishes it as one
    /// new generation.
    pub fn update<R>(&self, f: impl FnOnce(&mut L7Snapshot) -> R) -> R {
        let _writer = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = L7Snapshot::clone(&self.inner.current.load());
        let result = f(&mut next);
        next.generation += 1;
        let generation = next.generation;
        self.inner.current.store(Arc::new(next));
        self.inner.changed.send_replace(generation);
        result
    }

    /// Wakes on every new generation (the data path rebuilds per-destination
    /// balancers when their TrafficPolicy changed).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}
