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

use crate::support::ads;
use crate::support::ca_client;
use crate::support::http_client;

use std::sync::Arc;
use std::time::Duration;

use api::SpiffeId;
use api::type_url::ADDRESS;
use base64::Engine;
use http::{Request, Response};
use http_body_util::BodyExt;
use istiod_rs::app::{App, AppConfig, Source, TokenSource};
use istiod_rs::ca::CaConfig;
use istiod_rs::webhook::WebhookConfig;
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

/// The webhook configuration as installed from
/// `manifests/install/istiod-validating-webhook.yaml` (no caBundle,
/// failurePolicy Ignore).
fn installed_webhook_configuration() -> Value {
    let mut installed = manifest_object("ValidatingWebhookConfiguration");
    installed["metadata"]["resourceVersion"] = json!("1");
    installed
}

/// The object of `kind` in the webhook's install manifest.
fn manifest_object(kind: &str) -> Value {
    let text = include_str!("../../../manifests/install/istiod-validating-webhook.yaml");
    serde_saphyr::from_multiple::<Value>(text)
        .unwrap()
        .into_iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("the install manifest has a {kind}"))
}

/// A request that is not a read (its path checked by the server): method,
/// query, content type, body.
#[derive(Debug)]
struct Write {
    method: http::Method,
    query: String,
    content_type: String,
    body: Value,
}

const WEBHOOK_CONFIGURATION_PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";

/// Answers lists with [`items`] (and the installed webhook configuration),
/// holds watches open, answers TokenReviews (reported on the first
/// channel), applies strategic-merge patches of the webhook configuration
/// and refuses dry-run AuthorizationPolicies as the webhook would (reported
/// on the second).
fn api_server() -> (
    kube::Client,
    mpsc::UnboundedReceiver<Value>,
    mpsc::UnboundedReceiver<Write>,
) {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (reviews, reviewed) = mpsc::unbounded_channel();
    let (writes, written) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut watches = Vec::new();
        let mut configuration = installed_webhook_configuration();
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let path = parts.uri.path().to_string();
            let query = parts.uri.query().unwrap_or_default().to_string();
            if parts.method == http::Method::POST && path.ends_with("/tokenreviews") {
                assert_eq!(path, "/apis/authentication.k8s.io/v1/tokenreviews");
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                respond.send_response(json_response(201, review(&body)));
                let _ = reviews.send(body);
            } else if parts.method == http::Method::POST || parts.method == http::Method::PATCH {
                let content_type = parts.headers[http::header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .to_string();
                let bytes = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                if parts.method == http::Method::PATCH {
                    assert_eq!(
                        path,
                        format!("{WEBHOOK_CONFIGURATION_PATH}/istio-validator-istio-system")
                    );
                    merge_webhooks(&mut configuration, &body);
                    respond.send_response(json_response(200, configuration.clone()));
                } else {
                    assert_eq!(
                        path,
                        "/apis/security.istio.io/v1/namespaces/istio-system/authorizationpolicies"
                    );
                    respond.send_response(json_response(400, json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "BadRequest", "code": 400,
                        "message": "admission webhook \"validation.istio.io\" denied the request: AuthorizationPolicy istio-system/istiod-rs-webhook-probe: rules[0].to[0].operation.ports[0]: not a port",
                    })));
                }
                let _ = writes.send(Write {
                    method: parts.method,
                    query,
                    content_type,
                    body,
                });
            } else if query.contains("watch=true") {
                // Nothing changes: the watch stays open.
                watches.push(respond);
            } else {
                respond.send_response(json_response(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "1"},
                        "items": if path == WEBHOOK_CONFIGURATION_PATH {
                            vec![configuration.clone()]
                        } else {
                            items(&path)
                        },
                    }),
                ));
            }
        }
    });
    (kube::Client::new(service, "default"), reviewed, written)
}

/// A strategic merge of `patch` into the configuration's webhooks (merge
/// key: name), as the API server does; bumps the resource version.
fn merge_webhooks(configuration: &mut Value, patch: &Value) {
    let version: u64 = configuration["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        patch["metadata"]["resourceVersion"],
        json!(version.to_string()),
        "patches carry the version they were computed from"
    );
    for change in patch["webhooks"].as_array().unwrap() {
        let webhooks = configuration["webhooks"].as_array_mut().unwrap();
        let webhook = webhooks
            .iter_mut()
            .find(|w| w["name"] == change["name"])
            .unwrap();
        if let Some(bundle) = change["clientConfig"].get("caBundle") {
            webhook["clientConfig"]["caBundle"] = bundle.clone();
        }
        if let Some(policy) = change.get("failurePolicy") {
            webhook["failurePolicy"] = policy.clone();
        }
    }
    configuration["metadata"]["resourceVersion"] = json!((version + 1).to_string());
}

async fn start(client: kube::Client, dir: &std::path::Path) -> App {
    proxy_core::tls::install_default_provider();
    let mut config = AppConfig::on_loopback(
        Source::Kubernetes,
        TokenSource::TokenReview(Default::default()),
        CaConfig::new("cluster.local", dir.join("data")),
    );
    config.webhook = Some(WebhookConfig::on_loopback());
    config.kube_client = Some(client);
    let app = App::start(config).await.unwrap();
    tokio::time::timeout(PATIENCE, app.ready())
        .await
        .expect("ready once every kind is listed");
    app
}

#[tokio::test]
async fn kubernetes_mode_watches_the_api_and_checks_tokens_with_token_review() {
    let (client, mut reviews, _writes) = api_server();
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
    let (client, mut reviews, _writes) = api_server();
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

/// Kubernetes mode keeps the ValidatingWebhookConfiguration pointed at
/// istiod: the mesh root as every webhook's caBundle, then, once a dry run
/// of an invalid AuthorizationPolicy is denied by the webhook, failurePolicy
/// Fail. The exact patches, in order.
#[tokio::test]
async fn kubernetes_mode_points_the_webhook_configuration_at_istiod() {
    let (client, _reviews, mut writes) = api_server();
    let dir = tempfile::tempdir().unwrap();
    let app = start(client, dir.path()).await;
    let bundle = base64::engine::general_purpose::STANDARD.encode(app.ca().roots_pem());
    let mut next = async || {
        tokio::time::timeout(PATIENCE, writes.recv())
            .await
            .expect("the next write")
            .unwrap()
    };

    let first = next().await;
    assert_eq!(first.method, http::Method::PATCH);
    assert!(
        first
            .query
            .split('&')
            .any(|p| p == "fieldManager=istiod-rs"),
        "{}",
        first.query
    );
    assert_eq!(first.content_type, "application/strategic-merge-patch+json");
    assert_eq!(
        first.body,
        json!({
            "metadata": {"resourceVersion": "1"},
            "webhooks": [{"name": "validation.istio.io", "clientConfig": {"caBundle": bundle}}],
        })
    );

    let probe = next().await;
    assert_eq!(probe.method, http::Method::POST);
    assert!(
        probe.query.split('&').any(|p| p == "dryRun=All"),
        "{}",
        probe.query
    );
    assert_eq!(
        probe.body["metadata"],
        json!({"name": "istiod-rs-webhook-probe", "namespace": "istio-system"})
    );
    assert_eq!(
        probe.body["spec"]["rules"],
        json!([{"to": [{"operation": {"ports": ["istiod-rs-probe-not-a-port"]}}]}])
    );

    let second = next().await;
    assert_eq!(second.method, http::Method::PATCH);
    assert_eq!(
        second.body,
        json!({
            "metadata": {"resourceVersion": "2"},
            "webhooks": [{
                "name": "validation.istio.io",
                "clientConfig": {"caBundle": bundle},
                "failurePolicy": "Fail",
            }],
        })
    );
    app.shutdown().await;
    // Settled: nothing more to change.
    assert!(writes.try_recv().is_err());
}
