//! Waypoints over the real delta ADS server on loopback: a waypoint stream
//! is bound to its pod's Gateway through the cluster state and its token,
//! and is sent exactly its scope of the L7 types and the workload API;
//! ztunnel streams are served as before and never any L7 type. Snapshots
//! are built by hand with the resources the L7 translation inserts
//! (Waypoint keyed `<gateway ns>/<gateway name>`, RouteTable and
//! TrafficPolicy `<svc ns>/<svc hostname>`, HttpAuthorization and
//! JwtAuthentication `<policy ns>/<name>`).

use crate::support::ads;
use crate::support::http_client;
use crate::support::xds_server;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use api::SpiffeId;
use api::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use api::l7::{
    Backend, Forward, HttpAuthorization, JwtAuthentication, Mirror, Route, RouteTable,
    ServedService, TrafficPolicy, Waypoint, route,
};
use api::manifest::ObjectKey;
use api::security::Authorization;
use api::type_url::{
    ADDRESS, AUTHORIZATION, HTTP_AUTHORIZATION, JWT_AUTHENTICATION, ROUTE_TABLE, TRAFFIC_POLICY,
    WAYPOINT,
};
use api::workload::{Address, PortList, Service, Workload, address};
use istiod_rs::auth::{Caller, CallerPod};
use istiod_rs::snapshot::{Resource, Snapshot};
use istiod_rs::state::Store;
use istiod_rs::xds::{Authentication, XdsServer};
use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;

use ads::{AdsStream, names, removed};
use http_client::{http_get, metric_sample};
use xds_server::{Ports, Tokens, all_synced, serve, type_entry};

/// Only to avoid hanging forever when something is broken.
const PATIENCE: Duration = Duration::from_secs(30);
const NS: &str = "app";
const L7: [&str; 5] = [
    WAYPOINT,
    ROUTE_TABLE,
    HTTP_AUTHORIZATION,
    JWT_AUTHENTICATION,
    TRAFFIC_POLICY,
];

fn host(svc: &str) -> String {
    format!("{svc}.{NS}.svc.cluster.local")
}

/// The key of a service's Address, RouteTable and TrafficPolicy.
fn svc(svc: &str) -> String {
    format!("{NS}/{}", host(svc))
}

fn uid(pod: &str) -> String {
    format!("Kubernetes//Pod/{NS}/{pod}")
}

fn key(name: &str) -> String {
    format!("{NS}/{name}")
}

fn service(name: &str) -> Resource {
    let msg = Address {
        r#type: Some(address::Type::Service(Service {
            name: name.into(),
            namespace: NS.into(),
            hostname: host(name),
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS, svc(name), &msg)
}

fn workload(pod: &str, ip: [u8; 4], services: &[&str]) -> Resource {
    let msg = Address {
        r#type: Some(address::Type::Workload(Workload {
            uid: uid(pod),
            name: pod.into(),
            namespace: NS.into(),
            addresses: vec![ip.to_vec()],
            services: services
                .iter()
                .map(|s| (svc(s), PortList::default()))
                .collect(),
            ..Default::default()
        })),
    };
    Resource::new(ADDRESS, uid(pod), &msg)
}

/// A waypoint serving `services` (`(service, has a RouteTable)`), with one
/// gateway-wide HttpAuthorization and JwtAuthentication of its own.
fn waypoint(name: &str, services: &[(&str, bool)]) -> Resource {
    let msg = Waypoint {
        namespace: NS.into(),
        name: name.into(),
        services: services
            .iter()
            .map(|(s, routed)| ServedService {
                namespace: NS.into(),
                hostname: host(s),
                route_table: if *routed { svc(s) } else { String::new() },
                authorizations: vec![key(&format!("{s}-authz"))],
                ..Default::default()
            })
            .collect(),
        gateway_authorizations: vec![key(&format!("{name}-authz"))],
        gateway_authentications: vec![key(&format!("{name}-jwt"))],
        ..Default::default()
    };
    Resource::new(WAYPOINT, key(name), &msg)
}

fn backend(service: &str) -> Backend {
    Backend {
        service: svc(service),
        weight: 1,
        ..Default::default()
    }
}

fn route_table(service: &str, backends: &[&str], mirror: Option<&str>) -> Resource {
    let msg = RouteTable {
        namespace: NS.into(),
        hostname: host(service),
        routes: vec![Route {
            action: Some(route::Action::Forward(Forward {
                backends: backends.iter().map(|b| backend(b)).collect(),
            })),
            mirrors: mirror
                .map(|m| Mirror {
                    backend: Some(backend(m)),
                    per_million: 1_000_000,
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }],
    };
    Resource::new(ROUTE_TABLE, svc(service), &msg)
}

fn http_authz(name: &str) -> Resource {
    let msg = HttpAuthorization {
        namespace: NS.into(),
        name: name.into(),
        ..Default::default()
    };
    Resource::new(HTTP_AUTHORIZATION, key(name), &msg)
}

fn jwt(name: &str) -> Resource {
    let msg = JwtAuthentication {
        namespace: NS.into(),
        name: name.into(),
        ..Default::default()
    };
    Resource::new(JWT_AUTHENTICATION, key(name), &msg)
}

fn traffic(service: &str, revision: &str) -> Resource {
    let msg = TrafficPolicy {
        namespace: NS.into(),
        hostname: host(service),
        origin: Some(api::l7::Origin {
            kind: "DestinationRule".into(),
            namespace: NS.into(),
            name: revision.into(),
            rule: 0,
        }),
        ..Default::default()
    };
    Resource::new(TRAFFIC_POLICY, svc(service), &msg)
}

fn l4_policy(name: &str) -> Resource {
    let msg = Authorization {
        name: name.into(),
        namespace: NS.into(),
        ..Default::default()
    };
    Resource::new(AUTHORIZATION, key(name), &msg)
}

/// Two waypoints: `wp-a` serves `a` (routed to `b`, mirrored to `m`),
/// `wp-b` serves `c` (no route). `x` and `client-1` belong to neither.
fn mesh() -> Vec<Resource> {
    vec![
        waypoint("wp-a", &[("a", true)]),
        waypoint("wp-b", &[("c", false)]),
        route_table("a", &["b"], Some("m")),
        http_authz("wp-a-authz"),
        http_authz("a-authz"),
        http_authz("wp-b-authz"),
        http_authz("c-authz"),
        jwt("wp-a-jwt"),
        jwt("wp-b-jwt"),
        traffic("a", "1"),
        traffic("b", "1"),
        traffic("c", "1"),
        traffic("x", "1"),
        service("a"),
        service("b"),
        service("m"),
        service("c"),
        service("x"),
        workload("a-1", [10, 0, 0, 1], &["a"]),
        workload("b-1", [10, 0, 0, 2], &["b"]),
        workload("m-1", [10, 0, 0, 3], &["m"]),
        workload("c-1", [10, 0, 0, 4], &["c"]),
        workload("x-1", [10, 0, 0, 5], &["x"]),
        workload("client-1", [10, 0, 0, 99], &[]),
        l4_policy("l4"),
    ]
}

fn sorted<const N: usize>(names: [String; N]) -> Vec<String> {
    let mut names = names.to_vec();
    names.sort();
    names
}

fn snapshot(resources: impl IntoIterator<Item = Resource>) -> Arc<Snapshot> {
    let mut s = Snapshot::default();
    for r in resources {
        s.insert(r);
    }
    Arc::new(s)
}

/// What `wp-a` must hold of each type.
fn scope_a() -> BTreeMap<&'static str, Vec<String>> {
    let mut expected = BTreeMap::from([
        (
            ADDRESS,
            vec![
                svc("a"),
                svc("b"),
                svc("m"),
                uid("a-1"),
                uid("b-1"),
                uid("m-1"),
            ],
        ),
        (WAYPOINT, vec![key("wp-a")]),
        (ROUTE_TABLE, vec![svc("a")]),
        (HTTP_AUTHORIZATION, vec![key("a-authz"), key("wp-a-authz")]),
        (JWT_AUTHENTICATION, vec![key("wp-a-jwt")]),
        (TRAFFIC_POLICY, vec![svc("a"), svc("b")]),
        (AUTHORIZATION, vec![]),
    ]);
    for names in expected.values_mut() {
        names.sort();
    }
    expected
}

fn scope_b() -> BTreeMap<&'static str, Vec<String>> {
    let mut expected = BTreeMap::from([
        (ADDRESS, vec![svc("c"), uid("c-1")]),
        (WAYPOINT, vec![key("wp-b")]),
        (ROUTE_TABLE, vec![]),
        (HTTP_AUTHORIZATION, vec![key("c-authz"), key("wp-b-authz")]),
        (JWT_AUTHENTICATION, vec![key("wp-b-jwt")]),
        (TRAFFIC_POLICY, vec![svc("c")]),
        (AUTHORIZATION, vec![]),
    ]);
    for names in expected.values_mut() {
        names.sort();
    }
    expected
}

/// A waypoint pod in the cluster state.
fn pod(name: &str, gateway: Option<&str>, service_account: &str, ip: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            labels: gateway
                .map(|g| BTreeMap::from([(api::labels::GATEWAY_NAME.to_string(), g.to_string())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            node_name: Some("node1".into()),
            ..Default::default()
        }),
        status: Some(PodStatus {
            pod_ip: Some(ip.into()),
            phase: Some("Running".into()),
            ..Default::default()
        }),
    }
}

const WP_A_POD: (&str, &str) = ("wp-a-7f9c", "10.0.1.1");
const WP_B_POD: (&str, &str) = ("wp-b-5d4e", "10.0.1.2");

fn cluster() -> Arc<Store> {
    let store = Store::new();
    store.update(|state| {
        for p in [
            pod(WP_A_POD.0, Some("wp-a"), "wp-a", WP_A_POD.1),
            pod(WP_B_POD.0, Some("wp-b"), "wp-b", WP_B_POD.1),
            pod("a-1", None, "a", "10.0.0.1"),
        ] {
            let name = p.metadata.name.clone().unwrap();
            state.pods.insert(ObjectKey::new(NS, &name), Arc::new(p));
        }
    });
    store.mark_synced();
    store
}

/// Tokens: each waypoint's (bound to its pod), an app's, and a ztunnel's.
fn tokens() -> Arc<Tokens> {
    let caller = |ns: &str, sa: &str, pod: Option<&str>| Caller {
        identity: SpiffeId::new("cluster.local", ns, sa).unwrap(),
        pod: pod.map(|p| CallerPod {
            name: p.into(),
            uid: format!("uid-{p}"),
        }),
        node: Some("node1".into()),
    };
    Arc::new(Tokens(HashMap::from([
        ("tok-wp-a".into(), caller(NS, "wp-a", Some(WP_A_POD.0))),
        ("tok-wp-b".into(), caller(NS, "wp-b", Some(WP_B_POD.0))),
        ("tok-app".into(), caller(NS, "a", Some("a-1"))),
        (
            "tok-ztunnel".into(),
            caller("istio-system", "ztunnel", None),
        ),
    ])))
}

struct Istiod {
    xds: SocketAddr,
    monitoring: SocketAddr,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

async fn start(initial: Arc<Snapshot>, authentication: Authentication) -> Istiod {
    let (snapshots, rx) = watch::channel(initial);
    let mut registry = Registry::default();
    let server = XdsServer::new(rx, &mut registry).with_pods(cluster());
    let (_, ready) = watch::channel(true);
    let Ports { xds, monitoring } = serve(&server, registry, authentication, ready).await;
    Istiod {
        xds,
        monitoring,
        snapshots,
    }
}

async fn start_mesh() -> Istiod {
    start(snapshot(mesh()), Authentication::Required(tokens())).await
}

fn waypoint_node((pod, ip): (&str, &str)) -> String {
    proxy_core::xds::waypoint_node_id(ip.parse::<IpAddr>().unwrap(), pod, NS)
}

async fn open(istiod: &Istiod, node: String, token: Option<&str>) -> AdsStream {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", istiod.xds))
        .unwrap()
        .connect()
        .await
        .unwrap();
    AdsStream::open(channel, node, token, PATIENCE)
        .await
        .expect("stream opened")
}

/// Subscribes to everything of each type, in this order; returns what
/// arrived per type (each response ACKed).
async fn sync_all(
    proxy: &mut AdsStream,
    types: &[&'static str],
) -> BTreeMap<&'static str, DeltaDiscoveryResponse> {
    let mut got = BTreeMap::new();
    for t in types {
        proxy.subscribe(t, BTreeMap::new()).await;
        let response = proxy.recv().await;
        assert_eq!(response.type_url, *t);
        proxy.ack(&response).await;
        got.insert(*t, response);
    }
    got
}

const ALL_TYPES: [&str; 7] = [
    ADDRESS,
    AUTHORIZATION,
    TRAFFIC_POLICY,
    JWT_AUTHENTICATION,
    HTTP_AUTHORIZATION,
    ROUTE_TABLE,
    WAYPOINT,
];

fn names_by_type(
    got: &BTreeMap<&'static str, DeltaDiscoveryResponse>,
) -> BTreeMap<&'static str, Vec<String>> {
    got.iter().map(|(t, r)| (*t, names(r))).collect()
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http_get(addr, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"))
}

/// `/debug/syncz`'s entry for `proxy`, once `until` holds for it.
async fn syncz_until(istiod: &Istiod, proxy: &str, until: impl Fn(&Value) -> bool) -> Value {
    xds_server::syncz_until(istiod.monitoring, proxy, until).await
}

/// Waits until every type `node` subscribed to is SYNCED (its last ACK
/// processed), so the next snapshot's pushes go out together.
async fn synced(istiod: &Istiod, node: &str) {
    syncz_until(istiod, node, |p| {
        p["types"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "SYNCED" || t["status"] == "NOT SENT")
    })
    .await;
}

#[tokio::test]
async fn a_waypoint_stream_gets_exactly_its_scope() {
    let istiod = start_mesh().await;
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    let got = sync_all(&mut wp_a, &ALL_TYPES).await;
    assert_eq!(names_by_type(&got), scope_a());
    for response in got.values() {
        assert!(response.removed_resources.is_empty(), "{response:?}");
        for r in &response.resources {
            assert_eq!(r.resource.as_ref().unwrap().type_url, response.type_url);
        }
    }

    // /debug/syncz: the stream is bound to its Gateway, with its scope's size.
    let entry = syncz_until(&istiod, &waypoint_node(WP_A_POD), all_synced).await;
    assert_eq!(entry["waypoint"]["gateway"], "app/wp-a");
    let scope = &entry["waypoint"]["scope"];
    assert_eq!(scope["istio.workload.Address"], 6);
    assert_eq!(scope["istio_rs.l7.v1.RouteTable"], 1);
    assert_eq!(scope["istio_rs.l7.v1.HttpAuthorization"], 2);
    assert_eq!(scope["istio_rs.l7.v1.TrafficPolicy"], 2);
    assert_eq!(type_entry(&entry, ROUTE_TABLE)["resources_held"], 1);
    let syncz = get_json(istiod.monitoring, "/debug/syncz").await;
    let waypoints: Vec<(String, u64)> = syncz["waypoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["gateway"].as_str().unwrap().to_string(),
                w["scope"]["istio.workload.Address"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        waypoints,
        [("app/wp-a".to_string(), 6), ("app/wp-b".to_string(), 2)]
    );
}

#[tokio::test]
async fn another_waypoints_resources_never_appear() {
    let istiod = start_mesh().await;
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    let mut wp_b = open(&istiod, waypoint_node(WP_B_POD), Some("tok-wp-b")).await;
    let a = sync_all(&mut wp_a, &ALL_TYPES).await;
    let b = sync_all(&mut wp_b, &ALL_TYPES).await;
    assert_eq!(names_by_type(&b), scope_b());
    for t in ALL_TYPES {
        let (a, b): (BTreeSet<String>, BTreeSet<String>) = (
            names(&a[t]).into_iter().collect(),
            names(&b[t]).into_iter().collect(),
        );
        assert!(a.is_disjoint(&b), "{t}: {a:?} / {b:?}");
    }

    // wp-a's route, policy and endpoints change: only wp-a hears of it.
    let mut next = mesh();
    next.retain(|r| r.name != svc("a") || r.body.type_url != ROUTE_TABLE);
    next.push(route_table("a", &["b", "x"], Some("m")));
    next.push(workload("b-2", [10, 0, 0, 12], &["b"]));
    next.push(traffic("a", "2"));
    istiod.snapshots.send(snapshot(next.clone())).unwrap();
    let mut changed = BTreeMap::new();
    for _ in 0..3 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        changed.insert(response.type_url.clone(), names(&response));
    }
    assert_eq!(
        changed,
        BTreeMap::from([
            (
                ADDRESS.to_string(),
                sorted([svc("x"), uid("b-2"), uid("x-1")])
            ),
            (ROUTE_TABLE.to_string(), vec![svc("a")]),
            (TRAFFIC_POLICY.to_string(), vec![svc("a"), svc("x")]),
        ])
    );
    // Then wp-b starts serving `x`: that is the first thing wp-b hears.
    next.retain(|r| r.name != key("wp-b"));
    next.push(waypoint("wp-b", &[("c", false), ("x", false)]));
    next.push(http_authz("x-authz"));
    istiod.snapshots.send(snapshot(next)).unwrap();
    let mut heard = BTreeMap::new();
    for _ in 0..4 {
        let response = wp_b.recv().await;
        wp_b.ack(&response).await;
        assert!(response.removed_resources.is_empty(), "{response:?}");
        heard.insert(response.type_url.clone(), names(&response));
    }
    assert_eq!(
        heard,
        BTreeMap::from([
            (ADDRESS.to_string(), sorted([svc("x"), uid("x-1")])),
            (HTTP_AUTHORIZATION.to_string(), vec![key("x-authz")]),
            (TRAFFIC_POLICY.to_string(), vec![svc("x")]),
            (WAYPOINT.to_string(), vec![key("wp-b")]),
        ])
    );
}

#[tokio::test]
async fn dependencies_are_pushed_before_the_waypoint_and_removals_after() {
    let istiod = start_mesh().await;
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    sync_all(&mut wp_a, &ALL_TYPES).await;
    synced(&istiod, &waypoint_node(WP_A_POD)).await;

    // The waypoint starts serving `x` with a route, a policy and a
    // JwtAuthentication of its own: everything it names arrives first.
    let mut next = mesh();
    next.retain(|r| r.name != key("wp-a"));
    let wp = {
        let mut msg = Waypoint::default();
        prost::Message::merge(
            &mut msg,
            waypoint("wp-a", &[("a", true), ("x", true)])
                .body
                .value
                .as_slice(),
        )
        .unwrap();
        msg.gateway_authentications.push(key("x-jwt"));
        Resource::new(WAYPOINT, key("wp-a"), &msg)
    };
    next.extend([
        wp,
        route_table("x", &["x"], None),
        http_authz("x-authz"),
        jwt("x-jwt"),
    ]);
    istiod.snapshots.send(snapshot(next)).unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        assert!(response.removed_resources.is_empty());
        order.push(response.type_url.clone());
    }
    assert_eq!(
        order,
        [
            ADDRESS,
            TRAFFIC_POLICY,
            JWT_AUTHENTICATION,
            HTTP_AUTHORIZATION,
            ROUTE_TABLE,
            WAYPOINT
        ]
    );

    synced(&istiod, &waypoint_node(WP_A_POD)).await;
    // It stops serving `x` and the route/policy go: the Waypoint that no
    // longer names them comes first, then their removals.
    istiod.snapshots.send(snapshot(mesh())).unwrap();
    let mut order = Vec::new();
    for _ in 0..6 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        let removes = !response.removed_resources.is_empty();
        order.push((response.type_url.clone(), removes));
    }
    assert_eq!(order[0], (WAYPOINT.to_string(), false));
    assert!(order[1..].iter().all(|(_, removes)| *removes), "{order:?}");
}

#[tokio::test]
async fn a_service_leaving_the_scope_arrives_as_a_removal() {
    let istiod = start_mesh().await;
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    sync_all(&mut wp_a, &ALL_TYPES).await;

    // The route no longer mirrors to `m`: `m`, its endpoint go; nothing
    // else about them changed in the snapshot.
    let mut next = mesh();
    next.retain(|r| r.name != svc("a") || r.body.type_url != ROUTE_TABLE);
    next.push(route_table("a", &["b"], None));
    istiod.snapshots.send(snapshot(next.clone())).unwrap();
    let mut got = BTreeMap::new();
    for _ in 0..2 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        got.insert(
            response.type_url.clone(),
            (names(&response), removed(&response)),
        );
    }
    assert_eq!(
        got,
        BTreeMap::from([
            (ROUTE_TABLE.to_string(), (vec![svc("a")], vec![])),
            (
                ADDRESS.to_string(),
                (vec![], sorted([uid("m-1"), svc("m")]))
            ),
        ])
    );

    // `b`'s endpoint stops backing it: the workload leaves, `b` stays.
    next.retain(|r| r.name != uid("b-1"));
    next.push(workload("b-1", [10, 0, 0, 2], &[]));
    // And the route stops forwarding to `b`: its TrafficPolicy leaves too.
    istiod.snapshots.send(snapshot(next.clone())).unwrap();
    let response = wp_a.recv().await;
    wp_a.ack(&response).await;
    assert_eq!(response.type_url, ADDRESS);
    assert_eq!(removed(&response), [uid("b-1")]);
    assert!(response.resources.is_empty());

    next.retain(|r| r.name != svc("a") || r.body.type_url != ROUTE_TABLE);
    next.push(route_table("a", &["a"], None));
    istiod.snapshots.send(snapshot(next)).unwrap();
    let mut got = BTreeMap::new();
    for _ in 0..3 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        got.insert(
            response.type_url.clone(),
            (names(&response), removed(&response)),
        );
    }
    assert_eq!(got[ADDRESS], (vec![], vec![svc("b")]));
    assert_eq!(got[TRAFFIC_POLICY], (vec![], vec![svc("b")]));
    assert_eq!(got[ROUTE_TABLE], (vec![svc("a")], vec![]));
}

/// Opens a stream as `node` with `token` and sends its first request;
/// returns the status the stream ends with.
async fn refused(istiod: &Istiod, node: String, token: Option<&str>) -> tonic::Status {
    let mut proxy = open(istiod, node, token).await;
    proxy.subscribe(WAYPOINT, BTreeMap::new()).await;
    match proxy.next().await {
        Err(status) => status,
        Ok(other) => panic!("the stream was served: {other:?}"),
    }
}

#[tokio::test]
async fn a_node_id_claiming_another_pods_identity_is_refused() {
    let istiod = start_mesh().await;
    // wp-a's token, wp-b's pod.
    let status = refused(&istiod, waypoint_node(WP_B_POD), Some("tok-wp-a")).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("service account app/wp-b")
            && status
                .message()
                .contains("spiffe://cluster.local/ns/app/sa/wp-a"),
        "{status:?}"
    );
    // An application pod's token claiming a waypoint pod.
    let status = refused(&istiod, waypoint_node(WP_A_POD), Some("tok-app")).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // The right pod, but an address it does not hold.
    let status = refused(
        &istiod,
        waypoint_node((WP_A_POD.0, "10.0.1.2")),
        Some("tok-wp-a"),
    )
    .await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("claims address 10.0.1.2"),
        "{status:?}"
    );
    // A pod that is no waypoint, with its own token.
    let status = refused(&istiod, waypoint_node(("a-1", "10.0.0.1")), Some("tok-app")).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(api::labels::GATEWAY_NAME),
        "{status:?}"
    );
    // A node id that is not a waypoint's.
    let status = refused(&istiod, "waypoint~nope".into(), Some("tok-wp-a")).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    assert_eq!(
        metric_sample(
            &metrics,
            r#"xds_refusals_total{reason="waypoint_identity"}"#
        ),
        5.0,
        "{metrics}"
    );
    // Nobody was registered.
    let syncz = get_json(istiod.monitoring, "/debug/syncz").await;
    assert_eq!(syncz["connected"], 0);
}

#[tokio::test]
async fn an_anonymous_waypoint_stream_is_refused() {
    let istiod = start(snapshot(mesh()), Authentication::Optional(tokens())).await;
    let status = refused(&istiod, waypoint_node(WP_A_POD), None).await;
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("no bearer token"), "{status:?}");
    // With its token it is served.
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    let got = sync_all(&mut wp_a, &[WAYPOINT]).await;
    assert_eq!(names(&got[WAYPOINT]), [key("wp-a")]);
}

#[tokio::test]
async fn ztunnel_streams_are_unchanged_and_get_no_l7_types() {
    let istiod = start_mesh().await;
    let mut ztunnel = open(&istiod, ads::node_id(1), Some("tok-ztunnel")).await;
    let got = sync_all(&mut ztunnel, &[ADDRESS, AUTHORIZATION]).await;
    let everything = snapshot(mesh());
    let all = |t: &str| -> Vec<String> { everything.of_type(t).keys().cloned().collect() };
    assert_eq!(names(&got[ADDRESS]), all(ADDRESS));
    assert_eq!(names(&got[AUTHORIZATION]), all(AUTHORIZATION));
    // Every L7 type is answered empty, nothing held.
    let l7 = sync_all(&mut ztunnel, &L7).await;
    for (t, response) in &l7 {
        assert!(response.resources.is_empty(), "{t}: {response:?}");
        assert!(response.removed_resources.is_empty(), "{t}");
    }
    // An explicit name is not found either.
    ztunnel
        .send(DeltaDiscoveryRequest {
            type_url: ROUTE_TABLE.into(),
            resource_names_subscribe: vec![svc("a")],
            ..Default::default()
        })
        .await;
    let response = ztunnel.recv().await;
    assert!(response.resources.is_empty());
    assert_eq!(response.removed_resources, [svc("a")]);
    ztunnel.ack(&response).await;

    // An L7 change pushes nothing to it; the next Address change is the
    // next thing it hears.
    let mut next = mesh();
    next.push(route_table("x", &["x"], None));
    next.push(traffic("b", "2"));
    istiod.snapshots.send(snapshot(next.clone())).unwrap();
    next.push(workload("x-2", [10, 0, 0, 6], &["x"]));
    istiod.snapshots.send(snapshot(next)).unwrap();
    let response = ztunnel.recv().await;
    assert_eq!(response.type_url, ADDRESS);
    assert_eq!(names(&response), [uid("x-2")]);

    // syncz lists no L7 type it did not ask for, and no waypoint.
    let entry = syncz_until(&istiod, &ads::node_id(1), |_| true).await;
    assert!(entry["waypoint"].is_null());
}

#[tokio::test]
async fn ack_and_nack_per_l7_type() {
    let istiod = start_mesh().await;
    let node = waypoint_node(WP_A_POD);
    let mut wp_a = open(&istiod, node.clone(), Some("tok-wp-a")).await;
    for t in L7 {
        wp_a.subscribe(t, BTreeMap::new()).await;
        let response = wp_a.recv().await;
        assert_eq!(response.type_url, t);
        assert!(!response.resources.is_empty(), "{t}");
        wp_a.nack(&response, &format!("bad {t}")).await;
    }
    let entry = syncz_until(&istiod, &node, |p| {
        L7.iter()
            .all(|t| type_entry(p, t)["last_nack"]["message"].is_string())
    })
    .await;
    for t in L7 {
        let e = type_entry(&entry, t);
        assert_eq!(e["last_nack"]["message"], format!("bad {t}"));
        assert_eq!(e["resources_held"], 0, "{t}");
        assert_eq!(e["status"], "STALE", "{t}");
    }
    let (_, metrics) = http_get(istiod.monitoring, "/metrics").await;
    for t in L7 {
        // Types upstream's GetMetricType does not name are reported by URL.
        let sample = format!(r#"pilot_total_xds_rejects{{type="{t}"}}"#);
        assert_eq!(metric_sample(&metrics, &sample), 1.0, "{sample}: {metrics}");
    }

    // The next snapshot brings everything again; ACKed, every type SYNCED.
    let mut next = mesh();
    next.push(workload("b-2", [10, 0, 0, 12], &["b"]));
    istiod.snapshots.send(snapshot(next)).unwrap();
    let mut resent = BTreeSet::new();
    for _ in L7 {
        let response = wp_a.recv().await;
        wp_a.ack(&response).await;
        assert!(!response.resources.is_empty());
        resent.insert(response.type_url.clone());
    }
    assert_eq!(resent, L7.iter().map(|t| t.to_string()).collect());
    let entry = syncz_until(&istiod, &node, |p| {
        L7.iter().all(|t| type_entry(p, t)["status"] == "SYNCED")
    })
    .await;
    assert_eq!(type_entry(&entry, HTTP_AUTHORIZATION)["resources_held"], 2);
}

#[tokio::test]
async fn a_waypoint_looks_up_any_workload_by_address() {
    let istiod = start_mesh().await;
    let mut wp_a = open(&istiod, waypoint_node(WP_A_POD), Some("tok-wp-a")).await;
    sync_all(&mut wp_a, &[ADDRESS]).await;

    // client-1 (no service, outside the scope) by `<network>/<ip>`, and an
    // address nobody holds.
    wp_a.send(DeltaDiscoveryRequest {
        type_url: ADDRESS.into(),
        resource_names_subscribe: vec!["/10.0.0.99".into(), "/10.9.9.9".into()],
        ..Default::default()
    })
    .await;
    let response = wp_a.recv().await;
    wp_a.ack(&response).await;
    assert_eq!(names(&response), [uid("client-1")]);
    assert_eq!(response.resources[0].aliases, ["/10.0.0.99"]);
    assert_eq!(removed(&response), ["/10.9.9.9"]);

    // The workload changes: the update follows; then it goes.
    let mut next = mesh();
    next.retain(|r| r.name != uid("client-1"));
    next.push(workload("client-1", [10, 0, 0, 99], &["x"]));
    istiod.snapshots.send(snapshot(next.clone())).unwrap();
    let response = wp_a.recv().await;
    wp_a.ack(&response).await;
    assert_eq!(names(&response), [uid("client-1")]);
    assert!(response.removed_resources.is_empty());
    next.retain(|r| r.name != uid("client-1"));
    istiod.snapshots.send(snapshot(next)).unwrap();
    let response = wp_a.recv().await;
    assert_eq!(
        removed(&response),
        ["/10.0.0.99".to_string(), uid("client-1")]
    );

    // A ztunnel's address name is just a name it does not get.
    let mut ztunnel = open(&istiod, ads::node_id(1), Some("tok-ztunnel")).await;
    ztunnel
        .send(DeltaDiscoveryRequest {
            type_url: ADDRESS.into(),
            resource_names_subscribe: vec!["/10.0.0.1".into()],
            ..Default::default()
        })
        .await;
    let response = ztunnel.recv().await;
    assert!(response.resources.is_empty());
    assert_eq!(response.removed_resources, ["/10.0.0.1"]);
}
