//! istiod-rs's app in Kubernetes mode against a mock API server
//! (tower-test): the cluster state comes from the watchers, callers are
//! authenticated with TokenReview (audience `istio-ca`), and the CA's
//! pod -> node check reads the watched pods. A proxy with a token the API
//! server vouches for gets the workloads over xDS and a pod's certificate;
//! one it does not vouch for gets neither.
//!
//! The tokens carry the `pod-name` / `pod-uid` extras and no `node-name`
//! (as on Kubernetes before 1.30): node agents are bound to their node
//! through their own pod in the watched state.

#[path = "app_support/ads.rs"]
mod ads;
#[path = "ca_support/client.rs"]
mod ca_client;
#[path = "app_support/http_client.rs"]
mod http_client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::SpiffeId;
use api::type_url::ADDRESS;
use http::{Request, Response};
use http_body_util::BodyExt;
use istiod_rs::app::{App, AppConfig, Source, TokenSource};
use istiod_rs::ca::CaConfig;
use istiod_rs::grpc::GrpcConfig;
use istiod_rs::index::MeshConfig;
use istiod_rs::pipeline::Debounce;
use kube::client::Body;
use proxy_core::identity::{CaClient, CertificateManager, ControlPlane, ManagerConfig};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock;

use ads::{AdsStream, names, node_id};

const PATIENCE: Duration = Duration::from_secs(30);
/// The tokens the mock API server vouches for: node-a's and node-b's
/// ztunnels, and a token of node-a's ztunnel's previous pod (same name,
/// another uid).
const NODE_A_TOKEN: &str = "projected-token-node-a";
const NODE_B_TOKEN: &str = "projected-token-node-b";
const OLD_POD_TOKEN: &str = "projected-token-old-ztunnel-pod";

fn json_response(status: u16, value: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&value).unwrap()))
        .unwrap()
}

/// The objects of a list request, by collection path.
fn items(path: &str) -> Vec<Value> {
    match path {
        "/api/v1/namespaces" => vec![json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}},
        })],
        "/api/v1/pods" => vec![
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-1", "namespace": "demo", "uid": "uid-web-1"},
                "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]},
                "status": {"phase": "Running", "podIP": "10.244.0.11", "conditions": [{"type": "Ready", "status": "True"}]},
            }),
            ztunnel_pod("ztunnel-a", "node-a"),
            ztunnel_pod("ztunnel-b", "node-b"),
        ],
        _ => Vec::new(),
    }
}

/// A ztunnel pod (host network: no pod IP of its own in the mesh).
fn ztunnel_pod(name: &str, node: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "istio-system", "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": "ztunnel", "containers": [{"name": "istio-proxy", "image": "ztunnel"}]},
        "status": {"phase": "Running"},
    })
}

/// A TokenReview's answer: a ztunnel's pod-bound token (pod name and uid,
/// no node name) for the tokens it knows, asked with audience `istio-ca`;
/// nobody otherwise.
fn review(body: &Value) -> Value {
    let spec = &body["spec"];
    let pod = match spec["token"].as_str() {
        Some(NODE_A_TOKEN) => Some(("ztunnel-a", "uid-ztunnel-a")),
        Some(NODE_B_TOKEN) => Some(("ztunnel-b", "uid-ztunnel-b")),
        Some(OLD_POD_TOKEN) => Some(("ztunnel-a", "uid-ztunnel-a-before")),
        _ => None,
    };
    let status = match pod {
        Some((name, uid)) if spec["audiences"] == json!(["istio-ca"]) => json!({
            "authenticated": true,
            "audiences": ["istio-ca"],
            "user": {
                "username": "system:serviceaccount:istio-system:ztunnel",
                "extra": {
                    "authentication.kubernetes.io/pod-name": [name],
                    "authentication.kubernetes.io/pod-uid": [uid],
                },
            },
        }),
        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": spec, "status": status,
    })
}

/// Answers lists with [`items`], holds watches open, answers TokenReviews;
/// reports each TokenReview body it received.
fn api_server() -> (kube::Client, mpsc::UnboundedReceiver<Value>) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (reviews, reviewed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut watches = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let path = parts.uri.path().to_string();
            let query = parts.uri.query().unwrap_or_default().to_string();
            if parts.method == http::Method::POST {
                assert_eq!(path, "/apis/authentication.k8s.io/v1/tokenreviews");
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                respond.send_response(json_response(201, review(&body)));
                let _ = reviews.send(body);
            } else if query.contains("watch=true") {
                // Nothing changes: the watch stays open.
                watches.push(respond);
            } else {
                respond.send_response(json_response(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"},
                        "items": items(&path),
                    }),
                ));
            }
        }
    });
    (kube::Client::new(service, "default"), reviewed)
}

async fn start(client: kube::Client, dir: &std::path::Path) -> App {
    proxy_core::tls::install_default_provider();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let app = App::start(AppConfig {
        source: Source::Kubernetes,
        tokens: TokenSource::TokenReview(Default::default()),
        ca: CaConfig::new("cluster.local", dir.join("data")),
        grpc: GrpcConfig {
            tls_addr: loopback,
            ..GrpcConfig::default()
        },
        monitoring_addr: loopback,
        mesh: MeshConfig::default(),
        debounce: Debounce::default(),
        kube_client: Some(client),
    })
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, app.ready())
        .await
        .expect("ready once every kind is listed");
    app
}

#[tokio::test]
async fn kubernetes_mode_watches_the_api_and_checks_tokens_with_token_review() {
    let (client, mut reviews) = api_server();
    let dir = tempfile::tempdir().unwrap();
    let app = start(client, dir.path()).await;

    let roots = proxy_core::tls::load_pem_certificates(app.root_cert_path()).unwrap();
    let tls = app.addresses().grpc_tls.to_string();
    let channel = || ControlPlane::tls(&tls, roots.clone()).channel().unwrap();

    // xDS with a token the API server vouches for: the watched pod.
    let mut proxy = AdsStream::open(channel(), node_id(1), Some(NODE_A_TOKEN), PATIENCE)
        .await
        .unwrap();
    proxy.subscribe(ADDRESS, Default::default()).await;
    let initial = proxy.recv().await;
    assert_eq!(names(&initial), ["Kubernetes//Pod/demo/web-1"]);
    let asked = reviews.recv().await.unwrap();
    assert_eq!(asked["spec"]["token"], NODE_A_TOKEN);
    assert_eq!(asked["spec"]["audiences"], json!(["istio-ca"]));

    // ... and with one it does not: refused.
    let refused = match AdsStream::open(channel(), node_id(2), Some("stolen"), PATIENCE).await {
        Err(status) => status,
        Ok(mut stream) => {
            stream.subscribe(ADDRESS, Default::default()).await;
            stream.next().await.unwrap_err()
        }
    };
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    // The CA: node-a's ztunnel gets the certificate of the pod on node-a,
    // its node found through its own pod (the token names no node).
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, NODE_A_TOKEN).unwrap();
    let ca = CaClient::new(&ControlPlane::tls(&tls, roots.clone()).with_token_path(&token_file))
        .unwrap();
    let manager = CertificateManager::new(
        Arc::new(ca),
        roots,
        ManagerConfig {
            impersonate: true,
            ..ManagerConfig::default()
        },
    );
    let web = SpiffeId::new("cluster.local", "demo", "web").unwrap();
    let cert = tokio::time::timeout(PATIENCE, manager.fetch(&web))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cert.identity(), &web);

    app.shutdown().await;
}

/// The CA end to end in Kubernetes mode: each node agent is bound to the
/// node of the pod its token names, never beyond; each token is reviewed
/// once however many requests carry it.
#[tokio::test]
async fn the_ca_binds_node_agents_to_their_pods_node_and_reviews_each_token_once() {
    let (client, mut reviews) = api_server();
    let dir = tempfile::tempdir().unwrap();
    let app = start(client, dir.path()).await;
    let roots = proxy_core::tls::load_pem_certificates(app.root_cert_path()).unwrap();
    let mut ca = tokio::time::timeout(
        PATIENCE,
        ca_client::tls_channel(app.addresses().grpc_tls, &roots),
    )
    .await
    .unwrap()
    .unwrap();
    let web = "spiffe://cluster.local/ns/demo/sa/web";
    let key = rcgen::KeyPair::generate().unwrap();
    let mut create = async |token: &str| {
        let request = ca_client::request(ca_client::csr_pem(&key), Some(token), 0, Some(web));
        tokio::time::timeout(PATIENCE, ca.create_certificate(request))
            .await
            .unwrap()
    };

    // node-a's ztunnel, many times over (a reconnecting node): web runs on node-a.
    for _ in 0..5 {
        let chain = create(NODE_A_TOKEN).await.unwrap().into_inner().cert_chain;
        assert!(!chain.is_empty());
    }
    // node-b's ztunnel: web has no pod on node-b.
    let denied = create(NODE_B_TOKEN).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // A token of a previous ztunnel-a pod (same name, another uid).
    let stale = create(OLD_POD_TOKEN).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::PermissionDenied, "{stale:?}");

    let (status, metrics) = http_client::http_get(app.addresses().monitoring, "/metrics").await;
    assert_eq!(status, 200);
    for (sample, want) in [
        (r#"istiod_ca_impersonations_total{source="pod"}"#, 5.0),
        (
            r#"istiod_ca_impersonation_refusals_total{reason="no_pod_on_node"}"#,
            1.0,
        ),
        (
            r#"istiod_ca_impersonation_refusals_total{reason="pod_uid_mismatch"}"#,
            1.0,
        ),
        (
            r#"istiod_token_review_cache_lookups_total{result="hit"}"#,
            4.0,
        ),
    ] {
        assert_eq!(
            http_client::metric_sample(&metrics, sample),
            want,
            "{sample}"
        );
    }
    app.shutdown().await;

    // One TokenReview per token, however many requests carried it.
    let mut reviewed = Vec::new();
    while let Ok(body) = reviews.try_recv() {
        reviewed.push(body["spec"]["token"].as_str().unwrap().to_string());
    }
    reviewed.sort();
    assert_eq!(reviewed, [NODE_A_TOKEN, NODE_B_TOKEN, OLD_POD_TOKEN]);
}
