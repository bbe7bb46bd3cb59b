//! The Kubernetes source over a mock API server (tower-test): the exact list
//! and watch requests for every kind, "synced" only once every initial list
//! has arrived, and watch events applied to the store.

use std::collections::BTreeMap;
use std::time::Duration;

use api::manifest::{Kind, ObjectKey};
use http::{Request, Response};
use istiod_rs::state::{Store, kube as kube_source};
use kube::client::Body;
use serde_json::json;
use tokio::sync::mpsc;
use tower_test::mock;

type Respond = mock::SendResponse<Response<Body>>;

/// Every request the mock API server receives, with a way to answer it.
struct ApiServer {
    requests: mpsc::UnboundedReceiver<(http::Uri, Respond)>,
}

impl ApiServer {
    fn start() -> (kube::Client, ApiServer) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                assert_eq!(request.method(), http::Method::GET, "{}", request.uri());
                if tx.send((request.uri().clone(), respond)).is_err() {
                    return;
                }
            }
        });
        (
            kube::Client::new(service, "default"),
            ApiServer { requests: rx },
        )
    }

    async fn next(&mut self) -> (http::Uri, Respond) {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("the source made no further request")
            .expect("mock closed")
    }
}

/// The collection path of each kind, as the API server serves it.
fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::Namespace => "/api/v1/namespaces",
        Kind::Node => "/api/v1/nodes",
        Kind::ServiceAccount => "/api/v1/serviceaccounts",
        Kind::Pod => "/api/v1/pods",
        Kind::Service => "/api/v1/services",
        Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
        Kind::Gateway => "/apis/gateway.networking.k8s.io/v1/gateways",
        Kind::HttpRoute => "/apis/gateway.networking.k8s.io/v1/httproutes",
        Kind::GrpcRoute => "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        Kind::AuthorizationPolicy => "/apis/security.istio.io/v1/authorizationpolicies",
        Kind::PeerAuthentication => "/apis/security.istio.io/v1/peerauthentications",
        Kind::RequestAuthentication => "/apis/security.istio.io/v1/requestauthentications",
        Kind::DestinationRule => "/apis/networking.istio.io/v1/destinationrules",
        Kind::VirtualService => "/apis/networking.istio.io/v1/virtualservices",
        Kind::ServiceEntry => "/apis/networking.istio.io/v1/serviceentries",
        Kind::WorkloadEntry => "/apis/networking.istio.io/v1/workloadentries",
    }
}

/// The kind a request is for.
fn kind_of(uri: &http::Uri) -> Kind {
    Kind::ALL
        .into_iter()
        .find(|k| uri.path() == path(*k))
        .unwrap_or_else(|| panic!("unexpected request {uri}"))
}

/// An API server error, as a Status.
fn failure(code: u16, reason: &str, message: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "message": message, "code": code,
    });
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&status).unwrap()))
        .unwrap()
}

fn query(uri: &http::Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "resourceVersion": "11",
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip},
    })
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

fn list(kind: Kind, items: Vec<serde_json::Value>) -> Response<Body> {
    json_response(json!({
        "apiVersion": "v1",
        "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": format!("{}", 100 + kind as u32)},
        "items": items,
    }))
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn lists_then_watches_every_kind_and_syncs_after_all_lists() {
    let (client, mut server) = ApiServer::start();
    let store = Store::new();
    let tasks = kube_source::spawn(client, store.clone());

    // Every kind is listed first, once, with client-go's page size.
    let mut held_gateway_list = None;
    let mut listed = Vec::new();
    for _ in Kind::ALL {
        let (uri, respond) = server.next().await;
        let kind = kind_of(&uri);
        let q = query(&uri);
        assert_eq!(q.get("limit").map(String::as_str), Some("500"), "{uri}");
        assert!(!q.contains_key("watch"), "a list, not a watch: {uri}");
        listed.push(kind);
        match kind {
            Kind::Gateway => held_gateway_list = Some(respond),
            Kind::Pod => respond.send_response(list(kind, vec![pod("web-1", "10.0.0.1")])),
            _ => respond.send_response(list(kind, vec![])),
        }
    }
    listed.sort();
    assert_eq!(listed, Kind::ALL.to_vec());

    // Every other kind listed, the pods applied, but not synced: Gateways are missing.
    eventually("pods listed", || {
        store
            .read()
            .pods
            .contains_key(&ObjectKey::new("shop", "web-1"))
    })
    .await;
    assert!(!store.is_synced());
    // Stored without managedFields.
    assert!(
        store
            .read()
            .pods
            .values()
            .all(|p| p.metadata.managed_fields.is_none())
    );

    // Watches follow each list from the list's resourceVersion.
    let mut watches = BTreeMap::new();
    for _ in 0..Kind::ALL.len() - 1 {
        let (uri, respond) = server.next().await;
        let q = query(&uri);
        assert_eq!(q.get("watch").map(String::as_str), Some("true"), "{uri}");
        assert_eq!(
            q.get("allowWatchBookmarks").map(String::as_str),
            Some("true"),
            "{uri}"
        );
        let kind = kind_of(&uri);
        assert_eq!(
            q.get("resourceVersion"),
            Some(&format!("{}", 100 + kind as u32)),
            "{uri}"
        );
        watches.insert(kind, respond);
    }
    assert!(!watches.contains_key(&Kind::Gateway));

    held_gateway_list
        .unwrap()
        .send_response(list(Kind::Gateway, vec![]));
    let mut synced = store.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
        .await
        .expect("synced after the last list")
        .unwrap();
    let (uri, gateway_watch) = server.next().await;
    assert_eq!(uri.path(), path(Kind::Gateway));
    assert_eq!(query(&uri).get("watch").map(String::as_str), Some("true"));

    // Watch events reach the store.
    let events = [
        json!({"type": "ADDED", "object": pod("web-2", "10.0.0.2")}),
        json!({"type": "DELETED", "object": pod("web-1", "10.0.0.1")}),
        json!({"type": "MODIFIED", "object": pod("web-2", "10.0.0.22")}),
    ];
    let body: Vec<u8> = events
        .iter()
        .flat_map(|e| {
            let mut line = serde_json::to_vec(e).unwrap();
            line.push(b'\n');
            line
        })
        .collect();
    watches.remove(&Kind::Pod).unwrap().send_response(
        Response::builder()
            .status(200)
            .body(Body::from(body))
            .unwrap(),
    );
    eventually("watch events applied", || {
        let state = store.read();
        let ip = state
            .pods
            .get(&ObjectKey::new("shop", "web-2"))
            .and_then(|p| p.status.as_ref()?.pod_ip.clone());
        state.count(Kind::Pod) == 1 && ip.as_deref() == Some("10.0.0.22")
    })
    .await;
    assert!(store.has_pod_on_node("shop", "web", "node-a"));

    drop(gateway_watch);
    drop(watches);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn a_failed_list_is_retried() {
    let (client, mut server) = ApiServer::start();
    let store = Store::new();
    let tasks = kube_source::spawn(client, store.clone());
    let mut pending = Vec::new();
    let mut pod_lists = 0;
    // Fail the first pod list with a server error; answer everything else.
    while pod_lists < 2 {
        let (uri, respond) = server.next().await;
        let kind = kind_of(&uri);
        let is_watch = query(&uri).contains_key("watch");
        if kind == Kind::Pod && !is_watch {
            pod_lists += 1;
            if pod_lists == 1 {
                respond.send_response(failure(500, "InternalError", "etcd unavailable"));
                continue;
            }
        }
        if is_watch {
            pending.push(respond);
        } else {
            respond.send_response(list(kind, vec![]));
        }
    }
    let mut synced = store.synced();
    tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
        .await
        .expect("synced once the retried list succeeded")
        .unwrap();
    for t in tasks {
        t.abort();
    }
}

/// A kind whose CRD is not installed (404) does not keep istiod-rs from
/// syncing, and its objects are picked up once it is served.
#[tokio::test]
async fn a_kind_that_is_not_served_counts_as_empty() {
    not_served_counts_as_empty(|| {
        failure(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    })
    .await;
}

/// The same when no kind of the group is served (no Gateway API CRD at
/// all): a real API server then answers a plain-text `404 page not found`,
/// not a Status object, which kube-rs turns into a Status without the
/// NotFound reason.
#[tokio::test]
async fn a_group_that_is_not_served_counts_as_empty() {
    not_served_counts_as_empty(|| {
        Response::builder()
            .status(404)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Body::from(b"404 page not found\n".to_vec()))
            .unwrap()
    })
    .await;
}

async fn not_served_counts_as_empty(not_found: fn() -> Response<Body>) {
    let (client, mut server) = ApiServer::start();
    let store = Store::new();
    let tasks = kube_source::spawn(client, store.clone());
    let mut pending = Vec::new();
    let mut gateway_lists = 0;
    let mut retried_gateway_list = None;
    let mut synced = store.synced();
    // Until synced: the first Gateway list answers 404, a retry is parked.
    loop {
        let (uri, respond) = tokio::select! {
            done = synced.wait_for(|s| *s) => {
                done.unwrap();
                break;
            }
            request = server.next() => request,
        };
        let kind = kind_of(&uri);
        if query(&uri).contains_key("watch") {
            pending.push(respond);
        } else if kind != Kind::Gateway {
            respond.send_response(list(kind, vec![]));
        } else {
            gateway_lists += 1;
            if gateway_lists > 1 {
                retried_gateway_list = Some(respond);
                continue;
            }
            respond.send_response(not_found());
        }
    }
    assert_eq!(gateway_lists.min(1), 1, "the Gateway list was tried");
    assert_eq!(store.read().count(Kind::Gateway), 0);

    // The CRD appeared: the retried list brings its objects.
    let respond = match retried_gateway_list {
        Some(r) => r,
        None => loop {
            let (uri, respond) = server.next().await;
            if uri.path() == path(Kind::Gateway) && !query(&uri).contains_key("watch") {
                break respond;
            }
            pending.push(respond);
        },
    };
    respond.send_response(list(
        Kind::Gateway,
        vec![json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop", "resourceVersion": "5"},
            "spec": {"gatewayClassName": "istio-waypoint", "listeners": []},
        })],
    ));
    eventually("the Gateway arrives", || {
        store.read().count(Kind::Gateway) == 1
    })
    .await;
    for t in tasks {
        t.abort();
    }
}
