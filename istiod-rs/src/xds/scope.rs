//! What each waypoint may be sent: its scope, computed once per snapshot
//! generation by the relay and shared by every stream of that waypoint.
//!
//! A waypoint's scope is rooted at its `Waypoint` resource (key
//! `<gateway ns>/<gateway name>`): the `RouteTable`s, `HttpAuthorization`s
//! and `JwtAuthentication`s it names; the `istio.workload.Address` Services
//! it serves and every Service a route backend or mirror names; the
//! `TrafficPolicy` of each of those Services (whatever it forwards to); and
//! the Address Workloads that are endpoints of those Services or that it
//! serves directly. Nothing else: another waypoint's resources never appear.
//!
//! The [`ScopeIndex`] keeps what it decoded (Waypoints, RouteTables,
//! Workloads) by resource version and is updated from each step's changed
//! names only, so an unchanged resource is never decoded twice. Per
//! waypoint it publishes a [`WaypointScope`]: the names in scope and the
//! served resources among them (its view), shared with the previous
//! generation when nothing in it changed. The names entering or leaving a
//! waypoint's scope are reported per step ([`ScopeChanges`]) so the change
//! log's fast path stays exact for scoped streams.
//!
//! Workload aliases `<network>/<ip>` (upstream's `AddressInfo.Aliases` in
//! pilot/pkg/model/service.go) are indexed too: a waypoint may look up any
//! workload by address (on-demand, for its clients' metric labels).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use api::l7::{RouteTable, Waypoint, route};
use api::workload::{Address, NetworkMode, address};
use prost::Message;
use proxy_core::log_limit::LogLimit;

use super::LOG_INTERVAL;
use super::served::{Changes, Served};
use crate::snapshot::Resources;

/// The types only waypoints are sent, in the order a push must follow:
/// what is named before what names it.
pub const L7_TYPES: [&str; 5] = [
    api::type_url::TRAFFIC_POLICY,
    api::type_url::JWT_AUTHENTICATION,
    api::type_url::HTTP_AUTHORIZATION,
    api::type_url::ROUTE_TABLE,
    api::type_url::WAYPOINT,
];

/// The types in a waypoint's scope: the workload API's Address, then L7.
const SCOPED_TYPES: [&str; 6] = [
    api::type_url::ADDRESS,
    api::type_url::TRAFFIC_POLICY,
    api::type_url::JWT_AUTHENTICATION,
    api::type_url::HTTP_AUTHORIZATION,
    api::type_url::ROUTE_TABLE,
    api::type_url::WAYPOINT,
];

/// Whether `name` is an on-demand address name, `<network>/<ip>` (the
/// network may be empty). Workload uids (`Kubernetes//Pod/...`) and service
/// keys (`<ns>/<hostname>`) never are.
pub fn is_alias(name: &str) -> bool {
    name.split_once('/')
        .is_some_and(|(_, ip)| ip.parse::<IpAddr>().is_ok())
}

/// `<network>/<ip>` -> the uids of the workloads holding that address.
pub type AliasTable = BTreeMap<String, BTreeSet<String>>;

/// One waypoint's scope in one generation.
#[derive(Debug, Default, PartialEq)]
pub struct WaypointScope {
    /// Type URL -> names in scope (present in the snapshot or not).
    names: BTreeMap<&'static str, BTreeSet<String>>,
    /// Type URL -> the served resources among them.
    view: BTreeMap<&'static str, Resources>,
}

impl WaypointScope {
    /// The resources of `type_url` this waypoint is sent.
    pub fn of_type(&self, type_url: &str) -> &Resources {
        static EMPTY: Resources = BTreeMap::new();
        self.view.get(type_url).unwrap_or(&EMPTY)
    }

    /// How many resources of each type the scope holds, by type URL.
    pub fn sizes(&self) -> BTreeMap<&'static str, usize> {
        SCOPED_TYPES
            .iter()
            .map(|t| (*t, self.of_type(t).len()))
            .collect()
    }
}

/// Every waypoint's scope in one generation, by waypoint key.
pub type Scopes = BTreeMap<String, Arc<WaypointScope>>;

/// Waypoint key -> type URL -> names that entered or left its scope in one step.
pub type ScopeChanges = BTreeMap<String, Changes>;

/// A resource decoded at one version.
#[derive(Debug)]
struct Decoded<T> {
    version: String,
    value: T,
}

/// What a `Waypoint` names, by type URL.
type Named = BTreeMap<&'static str, BTreeSet<String>>;

/// What the scope needs of a Workload.
#[derive(Debug, Default, PartialEq)]
struct WorkloadFacts {
    /// `<ns>/<hostname>` of the Services it is an endpoint of.
    services: Vec<String>,
    /// `<network>/<ip>` of each of its addresses (none on the host network).
    aliases: Vec<String>,
}

/// The decoded resources scopes are computed from, kept across generations.
#[derive(Debug, Default)]
pub struct ScopeIndex {
    /// Waypoint key -> what it names; `None` when it does not decode.
    waypoints: BTreeMap<String, Decoded<Option<Named>>>,
    /// RouteTable key -> the services its backends and mirrors name.
    routes: BTreeMap<String, Decoded<BTreeSet<String>>>,
    /// Workload uid -> its services and addresses. (Address Services are
    /// not decoded: their key is all the scope needs.)
    workloads: BTreeMap<String, Decoded<Option<WorkloadFacts>>>,
    /// Service key -> its endpoints' uids.
    endpoints: BTreeMap<String, BTreeSet<String>>,
    aliases: Arc<AliasTable>,
    scopes: Scopes,
}

impl ScopeIndex {
    /// Brings the index to `served`, where `changes` lists what changed
    /// since the generation it last saw (`None`: look at everything), and
    /// returns every waypoint's scope, the alias table and the names that
    /// entered or left each scope.
    pub fn update(
        &mut self,
        served: &Served,
        changes: Option<&Changes>,
    ) -> (Scopes, Arc<AliasTable>, ScopeChanges) {
        let changed = |type_url: &str| -> Vec<String> {
            match changes {
                Some(c) => c
                    .get(type_url)
                    .map(|names| names.iter().cloned().collect())
                    .unwrap_or_default(),
                None => served.of_type(type_url).keys().cloned().collect(),
            }
        };
        let waypoint_names = changed(api::type_url::WAYPOINT);
        let route_names = changed(api::type_url::ROUTE_TABLE);
        let address_names = changed(api::type_url::ADDRESS);
        let mut structure = false;
        for name in &waypoint_names {
            structure |= refresh(
                &mut self.waypoints,
                served.of_type(api::type_url::WAYPOINT),
                name,
                decode_waypoint,
            );
        }
        for name in &route_names {
            structure |= refresh(
                &mut self.routes,
                served.of_type(api::type_url::ROUTE_TABLE),
                name,
                decode_route_table,
            );
        }
        for name in &address_names {
            structure |= self.refresh_workload(served.of_type(api::type_url::ADDRESS), name);
        }
        let membership_may_change = structure || changes.is_none();

        let mut scopes = Scopes::new();
        let mut scope_changes = ScopeChanges::new();
        let keys: BTreeSet<&String> = self.waypoints.keys().chain(self.scopes.keys()).collect();
        for key in keys {
            let previous = self.scopes.get(key);
            let touched = |p: &WaypointScope| changes.is_some_and(|c| touches(&p.names, c));
            let scope = match previous {
                // Same names: only the resources among them may have changed.
                Some(p) if !membership_may_change && !touched(p) => p.clone(),
                Some(p) if !membership_may_change => Arc::new(view(p.names.clone(), served)),
                _ => {
                    let names = self.scope_names(key);
                    let scope = match previous {
                        Some(p) if p.names == names && !touched(p) => p.clone(),
                        _ => Arc::new(view(names, served)),
                    };
                    let before = previous.map(|p| &p.names);
                    if let Some(diff) = membership_diff(before, &scope.names) {
                        scope_changes.insert(key.clone(), diff);
                    }
                    scope
                }
            };
            if self.waypoints.contains_key(key) {
                scopes.insert(key.clone(), scope);
            }
        }
        self.scopes = scopes.clone();
        (scopes, self.aliases.clone(), scope_changes)
    }

    /// Re-decodes one Address if its version changed; true when the
    /// services it backs changed (what scope membership depends on).
    fn refresh_workload(&mut self, addresses: &Resources, uid: &str) -> bool {
        let before = self.workloads.get(uid);
        let facts = match addresses.get(uid) {
            Some(r) if before.is_some_and(|b| b.version == r.version) => return false,
            Some(r) => Some(Decoded {
                version: r.version.clone(),
                value: decode_workload(uid, &r.body.value),
            }),
            None if before.is_none() => return false,
            None => None,
        };
        let old = match facts {
            Some(new) => self.workloads.insert(uid.to_string(), new),
            None => self.workloads.remove(uid),
        };
        let old = old.and_then(|d| d.value);
        let new = self.workloads.get(uid).and_then(|d| d.value.as_ref());
        if old.as_ref() == new {
            return false;
        }
        let empty = WorkloadFacts::default();
        let (old, new_facts) = (old.as_ref().unwrap_or(&empty), new.unwrap_or(&empty));
        let services_changed = old.services != new_facts.services;
        if services_changed {
            for service in &old.services {
                remove_from(&mut self.endpoints, service, uid);
            }
            for service in &new_facts.services {
                self.endpoints
                    .entry(service.clone())
                    .or_default()
                    .insert(uid.to_string());
            }
        }
        if old.aliases != new_facts.aliases {
            let aliases = Arc::make_mut(&mut self.aliases);
            for alias in &old.aliases {
                remove_from(aliases, alias, uid);
            }
            for alias in &new_facts.aliases {
                aliases
                    .entry(alias.clone())
                    .or_default()
                    .insert(uid.to_string());
            }
        }
        services_changed
    }

    /// The names in the scope of the waypoint `key`.
    fn scope_names(&self, key: &str) -> BTreeMap<&'static str, BTreeSet<String>> {
        let mut names: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
        names
            .entry(api::type_url::WAYPOINT)
            .or_default()
            .insert(key.to_string());
        let Some(Some(named)) = self.waypoints.get(key).map(|d| &d.value) else {
            return names;
        };
        for (type_url, keys) in named {
            names
                .entry(type_url)
                .or_default()
                .extend(keys.iter().cloned());
        }
        // The services routes forward or mirror to.
        let routed: Vec<String> = names
            .get(api::type_url::ROUTE_TABLE)
            .into_iter()
            .flatten()
            .filter_map(|table| self.routes.get(table))
            .flat_map(|d| d.value.iter().cloned())
            .collect();
        let addresses = names.entry(api::type_url::ADDRESS).or_default();
        addresses.extend(routed);
        // Every service it reaches: its TrafficPolicy, and its endpoints.
        let services: Vec<String> = addresses
            .iter()
            .filter(|name| is_service_key(name))
            .cloned()
            .collect();
        for service in &services {
            if let Some(uids) = self.endpoints.get(service) {
                addresses.extend(uids.iter().cloned());
            }
        }
        names
            .entry(api::type_url::TRAFFIC_POLICY)
            .or_default()
            .extend(services);
        names
    }
}

/// A service key `<ns>/<hostname>`: one `/`, unlike a workload uid.
fn is_service_key(name: &str) -> bool {
    name.matches('/').count() == 1 && !is_alias(name)
}

fn remove_from(map: &mut BTreeMap<String, BTreeSet<String>>, key: &str, value: &str) {
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

/// Re-decodes the resource `name` of `resources` into `cache` when its
/// version changed; true when it was added, changed or removed.
fn refresh<T>(
    cache: &mut BTreeMap<String, Decoded<T>>,
    resources: &Resources,
    name: &str,
    decode: fn(&str, &[u8]) -> T,
) -> bool {
    match resources.get(name) {
        Some(r) if cache.get(name).is_some_and(|d| d.version == r.version) => false,
        Some(r) => {
            let value = decode(name, &r.body.value);
            cache.insert(
                name.to_string(),
                Decoded {
                    version: r.version.clone(),
                    value,
                },
            );
            true
        }
        None => cache.remove(name).is_some(),
    }
}

/// A resource istiod itself encoded did not decode: a bug, said loudly
/// but at a bounded rate; the scope then holds less, never more.
fn undecodable(kind: &str, name: &str, e: &prost::DecodeError) {
    static UNDECODABLE: LogLimit = LogLimit::new(LOG_INTERVAL);
    if let Some(suppressed) = UNDECODABLE.allow() {
        tracing::error!(kind, name, error = %e, suppressed, "a served resource does not decode; it names nothing in any waypoint's scope");
    }
}

fn decode_waypoint(name: &str, bytes: &[u8]) -> Option<Named> {
    let waypoint = Waypoint::decode(bytes)
        .map_err(|e| undecodable("Waypoint", name, &e))
        .ok()?;
    let mut named = Named::new();
    let mut add = |type_url: &'static str, key: &str| {
        if !key.is_empty() {
            named.entry(type_url).or_default().insert(key.to_string());
        }
    };
    for k in &waypoint.gateway_authorizations {
        add(api::type_url::HTTP_AUTHORIZATION, k);
    }
    for k in &waypoint.gateway_authentications {
        add(api::type_url::JWT_AUTHENTICATION, k);
    }
    for s in &waypoint.services {
        if !s.namespace.is_empty() && !s.hostname.is_empty() {
            add(
                api::type_url::ADDRESS,
                &format!("{}/{}", s.namespace, s.hostname),
            );
        }
        add(api::type_url::ROUTE_TABLE, &s.route_table);
        for k in &s.authorizations {
            add(api::type_url::HTTP_AUTHORIZATION, k);
        }
        for k in &s.authentications {
            add(api::type_url::JWT_AUTHENTICATION, k);
        }
    }
    for w in &waypoint.workloads {
        add(api::type_url::ADDRESS, &w.uid);
        for k in &w.authorizations {
            add(api::type_url::HTTP_AUTHORIZATION, k);
        }
        for k in &w.authentications {
            add(api::type_url::JWT_AUTHENTICATION, k);
        }
    }
    Some(named)
}

fn decode_route_table(name: &str, bytes: &[u8]) -> BTreeSet<String> {
    let Ok(table) = RouteTable::decode(bytes).map_err(|e| undecodable("RouteTable", name, &e))
    else {
        return BTreeSet::new();
    };
    let mut services = BTreeSet::new();
    for r in &table.routes {
        if let Some(route::Action::Forward(forward)) = &r.action {
            services.extend(forward.backends.iter().map(|b| b.service.clone()));
        }
        services.extend(
            r.mirrors
                .iter()
                .filter_map(|m| m.backend.as_ref())
                .map(|b| b.service.clone()),
        );
    }
    services.remove("");
    services
}

fn decode_workload(name: &str, bytes: &[u8]) -> Option<WorkloadFacts> {
    let address = Address::decode(bytes)
        .map_err(|e| undecodable("Address", name, &e))
        .ok()?;
    let Some(address::Type::Workload(w)) = address.r#type else {
        return None;
    };
    let aliases = if w.network_mode == NetworkMode::HostNetwork as i32 {
        Vec::new()
    } else {
        w.addresses
            .iter()
            .filter_map(|a| ip_of(a))
            .map(|ip| format!("{}/{ip}", w.network))
            .collect()
    };
    Some(WorkloadFacts {
        services: w.services.keys().cloned().collect(),
        aliases,
    })
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// Whether any name in scope changed in this step.
fn touches(names: &BTreeMap<&'static str, BTreeSet<String>>, changes: &Changes) -> bool {
    names.iter().any(|(type_url, in_scope)| {
        changes.get(*type_url).is_some_and(|changed| {
            if changed.len() < in_scope.len() {
                changed.iter().any(|n| in_scope.contains(n))
            } else {
                in_scope.iter().any(|n| changed.contains(n))
            }
        })
    })
}

/// The served resources among `names`.
fn view(names: BTreeMap<&'static str, BTreeSet<String>>, served: &Served) -> WaypointScope {
    let view = names
        .iter()
        .map(|(type_url, in_scope)| {
            let resources = served.of_type(type_url);
            let present: Resources = in_scope
                .iter()
                .filter_map(|n| resources.get(n).map(|r| (n.clone(), r.clone())))
                .collect();
            (*type_url, present)
        })
        .collect();
    WaypointScope { names, view }
}

/// The names that entered or left a scope; `None` when none did.
fn membership_diff(
    before: Option<&BTreeMap<&'static str, BTreeSet<String>>>,
    after: &BTreeMap<&'static str, BTreeSet<String>>,
) -> Option<Changes> {
    static NONE: BTreeSet<String> = BTreeSet::new();
    let mut diff = Changes::new();
    for type_url in SCOPED_TYPES {
        let old = before.and_then(|b| b.get(type_url)).unwrap_or(&NONE);
        let new = after.get(type_url).unwrap_or(&NONE);
        let moved: BTreeSet<String> = old.symmetric_difference(new).cloned().collect();
        if !moved.is_empty() {
            diff.insert(type_url.to_string(), moved);
        }
    }
    (!diff.is_empty()).then_some(diff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{Resource, Snapshot};
    use api::l7::{Backend, Forward, Mirror, Route, ServedService};
    use api::workload::{PortList, Workload};

    fn waypoint(ns: &str, name: &str, services: &[(&str, &str)]) -> Resource {
        let msg = Waypoint {
            namespace: ns.into(),
            name: name.into(),
            services: services
                .iter()
                .map(|(svc, route)| ServedService {
                    namespace: ns.into(),
                    hostname: (*svc).into(),
                    route_table: (*route).into(),
                    authorizations: vec![format!("{ns}/authz-{svc}")],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        Resource::new(api::type_url::WAYPOINT, format!("{ns}/{name}"), &msg)
    }

    fn routes(key: &str, backends: &[&str], mirror: &str) -> Resource {
        let backend = |s: &str| Backend {
            service: s.into(),
            ..Default::default()
        };
        let msg = RouteTable {
            routes: vec![Route {
                action: Some(route::Action::Forward(Forward {
                    backends: backends.iter().map(|b| backend(b)).collect(),
                })),
                mirrors: vec![Mirror {
                    backend: Some(backend(mirror)),
                    per_million: 1,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        Resource::new(api::type_url::ROUTE_TABLE, key, &msg)
    }

    fn workload(uid: &str, ip: [u8; 4], services: &[&str]) -> Resource {
        let msg = Address {
            r#type: Some(address::Type::Workload(Workload {
                uid: uid.into(),
                network: "net".into(),
                addresses: vec![ip.to_vec()],
                services: services
                    .iter()
                    .map(|s| (s.to_string(), PortList::default()))
                    .collect(),
                ..Default::default()
            })),
        };
        Resource::new(api::type_url::ADDRESS, uid, &msg)
    }

    fn served(resources: &[Resource]) -> Snapshot {
        let mut s = Snapshot::default();
        for r in resources {
            s.insert(r.clone());
        }
        s
    }

    fn names_of(scope: &WaypointScope, type_url: &str) -> Vec<String> {
        scope.of_type(type_url).keys().cloned().collect()
    }

    #[test]
    fn scope_holds_served_services_workloads_route_backends_and_endpoints() {
        // It also serves workload w-d directly, with a policy of its own.
        let mut wp = Waypoint::decode(
            waypoint("ns", "wp", &[("a.ns", "ns/a.ns")])
                .body
                .value
                .as_slice(),
        )
        .unwrap();
        wp.workloads.push(api::l7::ServedWorkload {
            uid: "w-d".into(),
            authorizations: vec!["ns/w-d-authz".into()],
            authentications: vec!["ns/w-d-jwt".into()],
            ..Default::default()
        });
        let snapshot = served(&[
            Resource::new(api::type_url::WAYPOINT, "ns/wp", &wp),
            workload("w-d", [10, 0, 0, 9], &[]),
            routes("ns/a.ns", &["ns/b.ns"], "ns/m.ns"),
            workload("w-a", [10, 0, 0, 1], &["ns/a.ns"]),
            workload("w-b", [10, 0, 0, 2], &["ns/b.ns"]),
            workload("w-m", [10, 0, 0, 3], &["ns/m.ns"]),
            workload("w-x", [10, 0, 0, 4], &["ns/x.ns"]),
        ]);
        let (g1, _) = Served::default().next(&snapshot);
        let mut index = ScopeIndex::default();
        let (scopes, aliases, _) = index.update(&g1, None);
        let scope = &scopes["ns/wp"];
        assert_eq!(
            names_of(scope, api::type_url::ADDRESS),
            ["w-a", "w-b", "w-d", "w-m"]
        );
        assert_eq!(names_of(scope, api::type_url::ROUTE_TABLE), ["ns/a.ns"]);
        assert_eq!(names_of(scope, api::type_url::WAYPOINT), ["ns/wp"]);
        let traffic: Vec<&String> = scope.names[api::type_url::TRAFFIC_POLICY].iter().collect();
        assert_eq!(traffic, ["ns/a.ns", "ns/b.ns", "ns/m.ns"]);
        assert_eq!(
            scope.names[api::type_url::HTTP_AUTHORIZATION],
            BTreeSet::from(["ns/authz-a.ns".to_string(), "ns/w-d-authz".to_string()])
        );
        assert_eq!(
            scope.names[api::type_url::JWT_AUTHENTICATION],
            BTreeSet::from(["ns/w-d-jwt".to_string()])
        );
        assert_eq!(aliases["net/10.0.0.4"], BTreeSet::from(["w-x".to_string()]));
    }

    #[test]
    fn unchanged_scopes_are_shared_and_membership_changes_reported() {
        let wp = waypoint("ns", "wp", &[("a.ns", "")]);
        let (g1, _) = Served::default().next(&served(&[
            wp.clone(),
            workload("w-a", [10, 0, 0, 1], &["ns/a.ns"]),
        ]));
        let mut index = ScopeIndex::default();
        let (s1, _, _) = index.update(&g1, None);
        // Another service's workload changes: the scope is the same Arc.
        let (g2, c2) = g1.next(&served(&[
            wp.clone(),
            workload("w-a", [10, 0, 0, 1], &["ns/a.ns"]),
            workload("w-x", [10, 0, 0, 9], &["ns/x.ns"]),
        ]));
        let (s2, _, moved) = index.update(&g2, Some(&c2));
        assert!(Arc::ptr_eq(&s1["ns/wp"], &s2["ns/wp"]));
        assert!(moved.is_empty());
        // The endpoint leaves the service: it leaves the scope.
        let (g3, c3) = g2.next(&served(&[
            wp,
            workload("w-a", [10, 0, 0, 1], &[]),
            workload("w-x", [10, 0, 0, 9], &["ns/x.ns"]),
        ]));
        let (s3, _, moved) = index.update(&g3, Some(&c3));
        assert!(names_of(&s3["ns/wp"], api::type_url::ADDRESS).is_empty());
        assert_eq!(
            moved["ns/wp"][api::type_url::ADDRESS],
            BTreeSet::from(["w-a".to_string()])
        );
        // The Waypoint goes: its scope goes, every name it named reported
        // (the Waypoint itself changed: it is in the step's own changes).
        let (g4, c4) = g3.next(&served(&[workload("w-x", [10, 0, 0, 9], &[])]));
        let (s4, _, moved) = index.update(&g4, Some(&c4));
        assert!(s4.is_empty());
        assert!(c4[api::type_url::WAYPOINT].contains("ns/wp"));
        for t in [
            api::type_url::HTTP_AUTHORIZATION,
            api::type_url::TRAFFIC_POLICY,
        ] {
            assert_eq!(moved["ns/wp"][t].len(), 1, "{t}");
        }
    }

    /// 1,000 services, 10,000 workloads, 20 waypoints of 50 services each:
    /// one endpoint change rebuilds the one scope holding it; every other
    /// waypoint keeps the same scope (no work for its streams).
    #[test]
    fn one_change_touches_only_the_scope_holding_it() {
        let mut resources = Vec::new();
        for w in 0..20 {
            let services: Vec<String> = (0..50).map(|i| format!("svc-{}", w * 50 + i)).collect();
            let served: Vec<(&str, &str)> = services.iter().map(|s| (s.as_str(), "")).collect();
            resources.push(waypoint("ns", &format!("wp-{w}"), &served));
        }
        let endpoint = |i: usize, version: u8| {
            let service = format!("ns/svc-{}", i % 1_000);
            workload(
                &format!("w-{i}"),
                [10, version, (i >> 8) as u8, i as u8],
                &[service.as_str()],
            )
        };
        resources.extend((0..10_000).map(|i| endpoint(i, 0)));
        let (g1, _) = Served::default().next(&served(&resources));
        let mut index = ScopeIndex::default();
        let (s1, _, _) = index.update(&g1, None);
        assert_eq!(s1.len(), 20);
        // 50 services + their 500 endpoints each.
        assert_eq!(s1["ns/wp-3"].of_type(api::type_url::ADDRESS).len(), 500);

        // w-4242 backs svc-242, served by wp-4.
        resources[20 + 4242] = endpoint(4242, 1);
        let (g2, c2) = g1.next(&served(&resources));
        let (s2, _, moved) = index.update(&g2, Some(&c2));
        assert!(moved.is_empty());
        for (key, scope) in &s2 {
            assert_eq!(Arc::ptr_eq(scope, &s1[key]), key != "ns/wp-4", "{key}");
        }
        let changed = &s2["ns/wp-4"].of_type(api::type_url::ADDRESS)["w-4242"];
        assert!(Arc::ptr_eq(
            changed,
            &g2.of_type(api::type_url::ADDRESS)["w-4242"]
        ));
    }

    /// A scoped stream's pushes over the change log (global changes plus
    /// names entering or leaving its scope) must equal full diffs against
    /// its scope. Drives one state per type through pseudo-random
    /// snapshots, ACKs and NACKs.
    #[test]
    fn scoped_changed_name_diffs_equal_full_diffs() {
        use crate::xds::delta::{Current, TypeState, test_support};
        use crate::xds::served::ChangeLog;
        use api::discovery::DeltaDiscoveryRequest;
        use std::time::{Instant, SystemTime};

        let mut next = test_support::xorshift(0x2545_f491_4f6c_dd1d);
        let services = ["a.ns", "b.ns", "c.ns", "d.ns"];
        let random_snapshot = |next: &mut dyn FnMut(usize) -> usize| {
            let mut resources = Vec::new();
            if next(5) != 0 {
                let mut served: Vec<(&str, &str)> = Vec::new();
                for s in services {
                    match next(3) {
                        0 => served.push((s, "ns/routes")),
                        1 => served.push((s, "")),
                        _ => {}
                    }
                }
                resources.push(waypoint("ns", "wp", &served));
            }
            let backends: Vec<String> = services
                .iter()
                .filter(|_| next(3) == 0)
                .map(|s| format!("ns/{s}"))
                .collect();
            let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
            let mirror = format!("ns/{}", services[next(services.len())]);
            resources.push(routes("ns/routes", &backends, &mirror));
            for i in 0..8u8 {
                if next(6) == 0 {
                    continue;
                }
                let backs: Vec<String> = services
                    .iter()
                    .filter(|_| next(3) == 0)
                    .map(|s| format!("ns/{s}"))
                    .collect();
                let backs: Vec<&str> = backs.iter().map(String::as_str).collect();
                resources.push(workload(&format!("w{i}"), [10, 0, 0, i], &backs));
            }
            for s in services {
                let msg = api::l7::TrafficPolicy {
                    hostname: format!("{s}{}", next(2)),
                    ..Default::default()
                };
                resources.push(Resource::new(
                    api::type_url::TRAFFIC_POLICY,
                    format!("ns/{s}"),
                    &msg,
                ));
            }
            served(&resources)
        };

        let (mut current_served, _) = Served::default().next(&random_snapshot(&mut next));
        let mut index = ScopeIndex::default();
        let (mut scopes, _, _) = index.update(&current_served, None);
        let mut log = ChangeLog::default();
        let mut generation = 1;
        let mut states: Vec<(&str, TypeState)> = SCOPED_TYPES
            .iter()
            .map(|t| {
                let req = DeltaDiscoveryRequest {
                    type_url: t.to_string(),
                    resource_names_subscribe: vec!["*".into()],
                    ..Default::default()
                };
                (*t, TypeState::new(&req))
            })
            .collect();
        let mut nonce = 0;
        let mut in_flight: Vec<Option<String>> = vec![None; states.len()];
        let mut fast = 0;
        for round in 0..1_500 {
            if next(3) == 0 {
                let (s, changes) = current_served.next(&random_snapshot(&mut next));
                generation += 1;
                let (sc, _, moved) = index.update(&s, Some(&changes));
                log.record(generation, changes, moved);
                current_served = s;
                scopes = sc;
                for (_, st) in &mut states {
                    st.mark_snapshot(crate::xds::delta::Pending::at(Instant::now()));
                }
            }
            for (i, (type_url, st)) in states.iter_mut().enumerate() {
                let view = scopes.get("ns/wp").map(|s| s.of_type(type_url));
                let empty = Resources::new();
                let resources = view.unwrap_or(&empty);
                let current = Current {
                    type_url,
                    generation,
                    resources,
                    changes: &log,
                    scope: Some("ns/wp"),
                    aliases: None,
                };
                let key = test_support::comparable;
                let full = st.diff(resources);
                let over_log = st.diff_current(&current);
                assert_eq!(key(&over_log), key(&full), "round {round}, {type_url}");
                if !full.is_empty() {
                    fast += 1;
                }
                if let Some(n) = in_flight[i].take() {
                    let req = DeltaDiscoveryRequest {
                        type_url: type_url.to_string(),
                        response_nonce: n.clone(),
                        error_detail: (next(5) == 0).then(|| api::rpc::Status {
                            code: 3,
                            message: "no".into(),
                            details: vec![],
                        }),
                        ..Default::default()
                    };
                    if next(3) != 0 {
                        st.on_request(&req, SystemTime::now());
                    } else {
                        in_flight[i] = Some(n);
                    }
                }
                nonce += 1;
                if let Some(p) = st.next_push(&current, || format!("n{nonce}"), SystemTime::now()) {
                    in_flight[i] = Some(p.nonce);
                }
            }
        }
        // Streams were behind often enough for the comparison to matter.
        assert!(fast > 100, "{fast}");
    }

    #[test]
    fn aliases_are_network_slash_ip() {
        assert!(is_alias("net/10.0.0.1"));
        assert!(is_alias("/10.0.0.1"));
        assert!(is_alias("/fd00::1"));
        assert!(!is_alias("Kubernetes//Pod/ns/name"));
        assert!(!is_alias("ns/a.ns.svc.cluster.local"));
        assert!(!is_alias("10.0.0.1"));
    }
}
