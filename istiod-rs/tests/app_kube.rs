//! istiod-rs's app in Kubernetes mode against a mock API server
//! (tower-test): the cluster state comes from the watchers, callers are
//! authenticated with TokenReview (audience `istio-ca`), and the CA's
//! pod -> node check reads the watched pods. A proxy with a token the API
//! server vouches for gets the workloads over xDS and a pod's certificate;
//! one it does not vouch for gets neither.

#[path = "app_support/ads.rs"]
mod ads;

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
use istiod_rs::status::StatusConfig;
use kube::client::Body;
use proxy_core::identity::{CaClient, CertificateManager, ControlPlane, ManagerConfig};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tower_test::mock;

use ads::{AdsStream, names, node_id};

const PATIENCE: Duration = Duration::from_secs(30);
/// The token the mock API server vouches for: node-a's ztunnel.
const NODE_A_TOKEN: &str = "projected-token-node-a";

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
        "/api/v1/pods" => vec![json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "demo", "uid": "uid-web-1"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app", "image": "app"}]},
            "status": {"phase": "Running", "podIP": "10.244.0.11", "conditions": [{"type": "Ready", "status": "True"}]},
        })],
        _ => Vec::new(),
    }
}

/// A TokenReview's answer: node-a's ztunnel for [`NODE_A_TOKEN`] asked
/// with audience `istio-ca`, nobody otherwise.
fn review(body: &Value) -> Value {
    let spec = &body["spec"];
    let vouched = spec["token"] == NODE_A_TOKEN && spec["audiences"] == json!(["istio-ca"]);
    let status = if vouched {
        json!({
            "authenticated": true,
            "audiences": ["istio-ca"],
            "user": {
                "username": "system:serviceaccount:istio-system:ztunnel",
                "extra": {"authentication.kubernetes.io/node-name": ["node-a"]},
            },
        })
    } else {
        json!({"authenticated": false, "error": "invalid bearer token"})
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

#[tokio::test]
async fn kubernetes_mode_watches_the_api_and_checks_tokens_with_token_review() {
    proxy_core::tls::install_default_provider();
    let (client, mut reviews) = api_server();
    let dir = tempfile::tempdir().unwrap();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let app = App::start(AppConfig {
        source: Source::Kubernetes,
        tokens: TokenSource::TokenReview,
        ca: CaConfig::new("cluster.local", dir.path().join("data")),
        grpc: GrpcConfig {
            tls_addr: loopback,
            ..GrpcConfig::default()
        },
        monitoring_addr: loopback,
        mesh: MeshConfig::default(),
        debounce: Debounce::default(),
        status: StatusConfig::default(),
        kube_client: Some(client),
    })
    .await
    .unwrap();
    tokio::time::timeout(PATIENCE, app.ready())
        .await
        .expect("ready once every kind is listed");

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

    // The CA: node-a's ztunnel gets the certificate of the pod on node-a.
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
