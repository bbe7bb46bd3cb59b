//! The validating admission webhook end to end: istiod-rs's app with the
//! webhook on a loopback port, a client speaking HTTPS to it as the API
//! server does (verifying istiod's certificate against the mesh root as
//! `istiod.istio-system.svc`), AdmissionReview v1 bodies in and out.

use crate::support::http_client;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use istiod_rs::app::{App, AppConfig, Source, TokenSource};
use istiod_rs::ca::CaConfig;
use istiod_rs::state::Store;
use istiod_rs::webhook::WebhookConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Only turns a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);
const MAX_BODY: usize = 64 * 1024;

struct Webhook {
    app: App,
    _dir: tempfile::TempDir,
    roots: Vec<CertificateDer<'static>>,
}

impl Webhook {
    async fn start() -> Webhook {
        proxy_core::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.yaml");
        std::fs::write(&tokens, "tokens: []\n").unwrap();
        let store = Store::new();
        store.mark_synced();
        let mut config = AppConfig::on_loopback(
            Source::Store(store),
            TokenSource::File(tokens),
            CaConfig::new("cluster.local", dir.path().join("data")),
        );
        config.webhook = Some(WebhookConfig {
            max_body_bytes: MAX_BODY,
            handshake_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_millis(300),
            ..WebhookConfig::on_loopback()
        });
        let app = App::start(config).await.unwrap();
        let roots = app.ca().roots().to_vec();
        Webhook {
            app,
            _dir: dir,
            roots,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.app.addresses().webhook.expect("the webhook is served")
    }

    /// A TLS connection as the API server opens it.
    async fn connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for root in &self.roots {
            roots.add(root.clone()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(proxy_core::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.addr()).await.unwrap();
        let name = ServerName::try_from("istiod.istio-system.svc").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("istiod's certificate verifies as istiod.istio-system.svc")
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Bytes) {
        let tls = self.connect().await;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "istiod.istio-system.svc")
            .header("content-type", content_type)
            .body(Full::new(body.into()))
            .unwrap();
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .unwrap()
            .unwrap();
        let status = response.status();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }

    /// Posts `review` and returns the AdmissionReview answer's `response`.
    async fn review(&self, review: &Value) -> Value {
        let (status, body) = self
            .request(
                Method::POST,
                "/validate",
                "application/json",
                serde_json::to_vec(review).unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        answer["response"].clone()
    }
}

/// An AdmissionReview for `operation` of `object` (its kind and name taken
/// from it) in namespace `demo`.
fn admission_review(operation: &str, object: Value) -> Value {
    let kind = object["kind"].as_str().unwrap().to_string();
    let resource = format!("{}s", kind.to_lowercase()).replace("policys", "policies");
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{}", object["metadata"]["name"].as_str().unwrap()),
            "kind": {"group": "security.istio.io", "version": "v1", "kind": kind},
            "resource": {"group": "security.istio.io", "version": "v1", "resource": resource},
            "requestKind": {"group": "security.istio.io", "version": "v1", "kind": kind},
            "name": object["metadata"]["name"],
            "namespace": "demo",
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin", "groups": ["system:masters"]},
            "object": object,
            "oldObject": null,
            "dryRun": false,
        },
    })
}

fn authorization_policy(name: &str, rule: Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        // As kubectl sends a create: no namespace in the object itself.
        "metadata": {"name": name},
        "spec": {"action": "ALLOW", "rules": [rule]},
    })
}

fn denial(response: &Value) -> String {
    assert_eq!(response["allowed"], false, "{response}");
    response["status"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn refuses_policies_with_unreadable_values_naming_the_field() {
    let webhook = Webhook::start().await;

    let peer_authentication = |name: &str, mode: &str| {
        json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": name},
            "spec": {"mtls": {"mode": mode}},
        })
    };
    // (operation, object) -> what the refusal must say
    let cases = [
        (
            "CREATE",
            authorization_policy(
                "bad-port",
                json!({"to": [{"operation": {"ports": ["http"]}}]}),
            ),
            [
                "AuthorizationPolicy demo/bad-port",
                "rules[0].to[0].operation.ports[0]",
                "\"http\"",
            ],
        ),
        (
            "UPDATE",
            authorization_policy(
                "bad-cidr",
                json!({"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}),
            ),
            [
                "AuthorizationPolicy demo/bad-cidr",
                "rules[0].from[0].source.ipBlocks[0]",
                "10.0.0.0/33",
            ],
        ),
        (
            "CREATE",
            peer_authentication("bad-mode", "STRICTLY"),
            ["PeerAuthentication demo/bad-mode", "mtls.mode", "STRICTLY"],
        ),
        // A field of the wrong type is named too.
        (
            "CREATE",
            authorization_policy("bad-shape", json!({"to": "everything"})),
            [
                "AuthorizationPolicy demo/bad-shape",
                "spec.rules[0].to",
                "expected a sequence",
            ],
        ),
    ];
    for (operation, object, says) in cases {
        let response = webhook.review(&admission_review(operation, object)).await;
        let message = denial(&response);
        for words in says {
            assert!(message.contains(words), "{message:?} should say {words:?}");
        }
    }

    let (_, metrics) = http_client::http_get(webhook.app.addresses().monitoring, "/metrics").await;
    let sample = |s: &str| http_client::metric_sample(&metrics, s);
    assert_eq!(
        sample(
            r#"galley_validation_failed_total{resource="authorizationpolicies",reason="invalid_resource"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            r#"galley_validation_failed_total{resource="peerauthentications",reason="invalid_resource"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            r#"galley_validation_failed_total{resource="authorizationpolicies",reason="yaml_decode_error"}"#
        ),
        1.0
    );
    webhook.app.shutdown().await;
}

#[tokio::test]
async fn admits_valid_policies_and_other_operations() {
    let webhook = Webhook::start().await;
    let good = authorization_policy(
        "good",
        json!({
            "from": [{"source": {"ipBlocks": ["10.0.0.0/8", "fd00::/64"], "principals": ["cluster.local/ns/demo/sa/client"]}}],
            "to": [{"operation": {"ports": ["8080"]}}],
        }),
    );
    let response = webhook.review(&admission_review("CREATE", good)).await;
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("status").is_none(), "{response}");

    let strict = json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict"},
        "spec": {"mtls": {"mode": "STRICT"}},
    });
    let response = webhook.review(&admission_review("UPDATE", strict)).await;
    assert_eq!(response["allowed"], true, "{response}");

    // Deleting is never refused, even a bad object.
    let bad = authorization_policy("bad", json!({"to": [{"operation": {"ports": ["http"]}}]}));
    let response = webhook.review(&admission_review("DELETE", bad)).await;
    assert_eq!(response["allowed"], true, "{response}");

    // A kind this webhook does not validate is refused: the configuration's
    // rules should not send it.
    let mut other = admission_review(
        "CREATE",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
    );
    other["request"]["kind"]["group"] = json!("");
    let message = denial(&webhook.review(&other).await);
    assert!(message.contains("ConfigMap"), "{message}");
    webhook.app.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_a_clear_http_error() {
    let webhook = Webhook::start().await;
    let review = serde_json::to_vec(&admission_review(
        "CREATE",
        authorization_policy("x", json!({})),
    ))
    .unwrap();
    let json = "application/json";
    let cases: Vec<(Method, &str, &str, Bytes, StatusCode, &str)> = vec![
        (Method::POST, "/validate", json, Bytes::from_static(b"{not json"), StatusCode::BAD_REQUEST, "not an AdmissionReview"),
        (Method::POST, "/validate", json, Bytes::from_static(b""), StatusCode::BAD_REQUEST, "not an AdmissionReview"),
        (
            Method::POST,
            "/validate",
            json,
            Bytes::from_static(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u"}}"#),
            StatusCode::BAD_REQUEST,
            "request",
        ),
        (
            Method::POST,
            "/validate",
            json,
            Bytes::from_static(br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#),
            StatusCode::BAD_REQUEST,
            "admission.k8s.io/v1beta1",
        ),
        (
            Method::POST,
            "/validate",
            json,
            Bytes::from_static(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            StatusCode::BAD_REQUEST,
            "no request",
        ),
        (Method::POST, "/validate", "text/yaml", Bytes::from(review.clone()), StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json"),
        (Method::GET, "/validate", json, Bytes::new(), StatusCode::METHOD_NOT_ALLOWED, "POST"),
        (Method::POST, "/admitpilot", json, Bytes::from(review), StatusCode::NOT_FOUND, "/validate"),
        (Method::POST, "/validate", json, Bytes::from(vec![b' '; MAX_BODY + 1]), StatusCode::PAYLOAD_TOO_LARGE, "--webhook-max-body"),
    ];
    for (method, path, content_type, body, status, says) in cases {
        let (got, text) = webhook
            .request(method.clone(), path, content_type, body)
            .await;
        let text = String::from_utf8_lossy(&text);
        assert_eq!(got, status, "{method} {path}: {text}");
        assert!(
            text.contains(says),
            "{method} {path}: {text:?} should say {says:?}"
        );
    }
    // The server is still there.
    let response = webhook
        .review(&admission_review(
            "CREATE",
            authorization_policy("after", json!({})),
        ))
        .await;
    assert_eq!(response["allowed"], true);
    webhook.app.shutdown().await;
}

/// A client that stalls is dropped: before its TLS handshake, in its
/// headers, or in its body.
#[tokio::test]
async fn stalled_clients_are_dropped() {
    let webhook = Webhook::start().await;
    let closed = |what: &'static str, mut stream: Box<dyn ReadWrite>| async move {
        let mut buf = [0u8; 1024];
        let mut seen = Vec::new();
        loop {
            match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                Err(_) => panic!("{what}: the connection was never closed"),
                Ok(Ok(0)) | Ok(Err(_)) => return String::from_utf8_lossy(&seen).to_string(),
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    // No handshake at all.
    let tcp = tokio::net::TcpStream::connect(webhook.addr())
        .await
        .unwrap();
    closed("no handshake", Box::new(tcp)).await;
    // Half the headers.
    let mut tls = webhook.connect().await;
    tls.write_all(b"POST /validate HTTP/1.1\r\nhost: istiod\r\n")
        .await
        .unwrap();
    closed("half the headers", Box::new(tls)).await;
    // Headers, then half the body.
    let mut tls = webhook.connect().await;
    tls.write_all(b"POST /validate HTTP/1.1\r\nhost: istiod\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"apiVersion\"")
        .await
        .unwrap();
    let answer = closed("half the body", Box::new(tls)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    webhook.app.shutdown().await;
}

trait ReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ReadWrite for T {}
