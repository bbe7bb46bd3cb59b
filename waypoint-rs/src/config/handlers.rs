//! One xDS handler per L7 resource type, joining `proxy_core::xds` to the
//! [`L7Store`], in the style of `proxy_core::xds::handlers`: a response is
//! applied as one snapshot, a resource that does not validate (or whose
//! content names another resource than its xDS name) is NACKed by name with
//! the field path, and keeps its last good version.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use api::l7;
use proxy_core::xds::{Handler, Rejected, Update, XdsClient, rejections};

use super::store::{L7Snapshot, L7Store};
use super::traffic::TrafficPolicy;
use super::waypoint::Waypoint;
use crate::http::authorization::Policy as AuthorizationPolicy;
use crate::http::jwt::Authentication;
use crate::http::route::RouteTable;
use crate::request::FromProto;

/// One L7 resource type: its proto, validated form, name and map in the snapshot.
pub trait Kind: Send + Sync + 'static {
    type Proto: Send + 'static;
    type Value: FromProto<Self::Proto> + Send + Sync + 'static;
    /// Lower-case name for rejection reasons.
    const NAME: &'static str;
    /// The key the resource's content gives itself (must equal its xDS name).
    fn key(p: &Self::Proto) -> String;
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<Self::Value>>;
}

/// The handler of one resource type.
pub struct L7Handler<K> {
    store: L7Store,
    kind: PhantomData<fn() -> K>,
}

impl<K> L7Handler<K> {
    pub fn new(store: L7Store) -> Self {
        L7Handler {
            store,
            kind: PhantomData,
        }
    }
}

impl<K: Kind> Handler<K::Proto> for L7Handler<K> {
    fn apply(&self, updates: Vec<Update<K::Proto>>) -> Result<(), Vec<Rejected>> {
        // Validate outside the writer lock; regex compilation can take a while.
        let mut rejected = Vec::new();
        let mut valid = Vec::new();
        for Update { name, resource } in updates {
            let Some(proto) = resource else {
                valid.push((name, None));
                continue;
            };
            let key = K::key(&proto);
            if key != name {
                rejected.push(Rejected::new(
                    name,
                    format!(
                        "{} names itself {key:?}; it must equal the resource name",
                        K::NAME
                    ),
                ));
                continue;
            }
            match K::Value::from_proto(&proto) {
                Ok(value) => valid.push((name, Some(Arc::new(value)))),
                Err(e) => rejected.push(Rejected::new(name, format!("{} {e}", K::NAME))),
            }
        }
        self.store.update(|snapshot| {
            let map = K::map(snapshot);
            for (name, value) in valid {
                match value {
                    Some(v) => map.insert(name, v),
                    None => map.remove(&name),
                };
            }
        });
        rejections(rejected)
    }
}

pub struct Waypoints;
pub struct RouteTables;
pub struct HttpAuthorizations;
pub struct JwtAuthentications;
pub struct TrafficPolicies;

impl Kind for Waypoints {
    type Proto = l7::Waypoint;
    type Value = Waypoint;
    const NAME: &'static str = "waypoint";
    fn key(p: &l7::Waypoint) -> String {
        format!("{}/{}", p.namespace, p.name)
    }
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<Waypoint>> {
        &mut s.waypoints
    }
}

impl Kind for RouteTables {
    type Proto = l7::RouteTable;
    type Value = RouteTable;
    const NAME: &'static str = "route table";
    fn key(p: &l7::RouteTable) -> String {
        format!("{}/{}", p.namespace, p.hostname)
    }
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<RouteTable>> {
        &mut s.route_tables
    }
}

impl Kind for HttpAuthorizations {
    type Proto = l7::HttpAuthorization;
    type Value = AuthorizationPolicy;
    const NAME: &'static str = "authorization";
    fn key(p: &l7::HttpAuthorization) -> String {
        format!("{}/{}", p.namespace, p.name)
    }
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<AuthorizationPolicy>> {
        &mut s.authorizations
    }
}

impl Kind for JwtAuthentications {
    type Proto = l7::JwtAuthentication;
    type Value = Authentication;
    const NAME: &'static str = "authentication";
    fn key(p: &l7::JwtAuthentication) -> String {
        format!("{}/{}", p.namespace, p.name)
    }
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<Authentication>> {
        &mut s.authentications
    }
}

impl Kind for TrafficPolicies {
    type Proto = l7::TrafficPolicy;
    type Value = TrafficPolicy;
    const NAME: &'static str = "traffic policy";
    fn key(p: &l7::TrafficPolicy) -> String {
        format!("{}/{}", p.namespace, p.hostname)
    }
    fn map(s: &mut L7Snapshot) -> &mut BTreeMap<String, Arc<TrafficPolicy>> {
        &mut s.traffic_policies
    }
}

pub type WaypointHandler = L7Handler<Waypoints>;
pub type RouteTableHandler = L7Handler<RouteTables>;
pub type AuthorizationHandler = L7Handler<HttpAuthorizations>;
pub type AuthenticationHandler = L7Handler<JwtAuthentications>;
pub type TrafficPolicyHandler = L7Handler<TrafficPolicies>;

/// Wires the five L7 handlers for `store` into `client` (next to
/// `proxy_core::xds::handlers::subscribe_store` for the workload API).
pub fn subscribe(client: XdsClient, store: &L7Store) -> XdsClient {
    client
        .with_handler(api::type_url::WAYPOINT, WaypointHandler::new(store.clone()))
        .with_handler(
            api::type_url::ROUTE_TABLE,
            RouteTableHandler::new(store.clone()),
        )
        .with_handler(
            api::type_url::HTTP_AUTHORIZATION,
            AuthorizationHandler::new(store.clone()),
        )
        .with_handler(
            api::type_url::JWT_AUTHENTICATION,
            AuthenticationHandler::new(store.clone()),
        )
        .with_handler(
            api::type_url::TRAFFIC_POLICY,
            TrafficPolicyHandler::new(store.clone()),
        )
}
