//! Who may read istiod's `/debug/*` on the monitoring port: as upstream,
//! a loopback client, or a caller whose bearer token istiod's
//! authenticator accepts and whose service account is in istiod's own
//! namespace (or an allowed one). Anyone else gets 401 (no valid token)
//! or 403 (another namespace), counted; `/metrics` and `/ready` stay open.
//!
//! The router is driven with the peer address the listener hands every
//! request (axum's `ConnectInfo`): tests cannot open a non-loopback
//! connection without a network namespace. The last test runs the app on
//! a real loopback socket.

use crate::support::http_client;
use crate::support::istiod;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use istiod_rs::auth::token_file::TokenFile;
use istiod_rs::monitoring::{DebugAccess, DebugRefusal, Monitoring, Readiness};
use istiod_rs::snapshot::Snapshot;
use istiod_rs::xds::XdsServer;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tower::ServiceExt;

use http_client::http_get;
use istiod::LocalIstiod;

const TOKENS: &str = "\
tokens:
  - {token: istioctl-token, serviceAccount: istio-system/istioctl}
  - {token: client-token, serviceAccount: demo/client}
  - {token: kiali-token, serviceAccount: kiali/kiali}
";

struct Debug {
    router: axum::Router,
    access: DebugAccess,
    registry_text: Arc<dyn Fn() -> String + Send + Sync>,
    _dir: tempfile::TempDir,
}

/// The monitoring router with istiod's debug access: the system namespace
/// plus `allowed`, authenticated by a token file.
fn debug(allowed: &[&str], enforced: bool) -> Debug {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.yaml");
    std::fs::write(&tokens, TOKENS).unwrap();
    let authenticator = Arc::new(TokenFile::open(&tokens, "cluster.local").unwrap());
    let mut registry = Registry::default();
    let (_, snapshots) = watch::channel(Arc::new(Snapshot::default()));
    let xds = XdsServer::new(snapshots, &mut registry);
    let namespaces = std::iter::once("istio-system")
        .chain(allowed.iter().copied())
        .map(String::from);
    let access = DebugAccess::authenticated(authenticator, namespaces, enforced, &mut registry);
    let registry = Arc::new(registry);
    let router = Monitoring::new(registry.clone(), Readiness::new(|| Ok(())), xds.status())
        .with_debug_access(access.clone())
        .router();
    let registry_text = Arc::new(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    });
    Debug {
        router,
        access,
        registry_text,
        _dir: dir,
    }
}

/// A GET of `path` from `peer` (none: a router used without the
/// listener) with an `authorization` header when given.
async fn get(
    router: &axum::Router,
    peer: Option<&str>,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String, Option<String>) {
    let mut request = http::Request::get(path);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let mut request = request.body(axum::body::Body::empty()).unwrap();
    if let Some(peer) = peer {
        let peer: SocketAddr = peer.parse().unwrap();
        request.extensions_mut().insert(ConnectInfo(peer));
    }
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap(), challenge)
}

const POD: Option<&str> = Some("10.244.1.7:41234");

#[tokio::test]
async fn a_pod_needs_a_token_of_the_system_namespace() {
    let d = debug(&[], true);
    for path in ["/debug/config_dump", "/debug/syncz"] {
        // No token, a bad one, a scheme that is not Bearer: 401.
        for authorization in [None, Some("Bearer nope"), Some("Basic aXN0aW86aXN0aW8=")] {
            let (status, body, challenge) = get(&d.router, POD, path, authorization).await;
            assert_eq!(status, 401, "{path} {authorization:?}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer"));
            assert!(body.contains("istio-system"), "{body}");
            assert!(
                !body.contains("Kubernetes//"),
                "nothing of the mesh leaks: {body}"
            );
        }
        // A valid token of another namespace: 403, saying who and why.
        let (status, body, _) = get(&d.router, POD, path, Some("Bearer client-token")).await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("spiffe://cluster.local/ns/demo/sa/client")
                && body.contains("namespace istio-system only"),
            "{body}"
        );
        // A token of the system namespace, whatever the scheme's case: 200.
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let authorization = format!("{scheme} istioctl-token");
            let (status, body, _) = get(&d.router, POD, path, Some(&authorization)).await;
            assert_eq!(status, 200, "{authorization}: {body}");
        }
    }
    assert_eq!(d.access.refusals(DebugRefusal::unauthenticated), 6);
    assert_eq!(d.access.refusals(DebugRefusal::forbidden), 2);
    let text = (d.registry_text)();
    assert!(
        text.contains(r#"istiod_debug_refusals_total{reason="unauthenticated"} 6"#)
            && text.contains(r#"istiod_debug_refusals_total{reason="forbidden"} 2"#),
        "{text}"
    );

    // A request that did not come through the listener has no known peer:
    // it is not loopback.
    assert_eq!(get(&d.router, None, "/debug/syncz", None).await.0, 401);
}

#[tokio::test]
async fn loopback_clients_metrics_and_readiness_need_no_token() {
    let d = debug(&[], true);
    for peer in [
        "127.0.0.1:5000",
        "127.9.9.9:5000",
        "[::1]:5000",
        "[::ffff:127.0.0.1]:5000",
    ] {
        let (status, body, _) = get(&d.router, Some(peer), "/debug/config_dump", None).await;
        assert_eq!(status, 200, "{peer}: {body}");
    }
    for path in ["/metrics", "/ready"] {
        let (status, body, _) = get(&d.router, POD, path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(d.access.refusals(DebugRefusal::unauthenticated), 0);
}

#[tokio::test]
async fn allowed_namespaces_and_the_off_switch() {
    let d = debug(&["kiali"], true);
    assert_eq!(
        get(&d.router, POD, "/debug/syncz", Some("Bearer kiali-token"))
            .await
            .0,
        200
    );
    assert_eq!(
        get(&d.router, POD, "/debug/syncz", Some("Bearer client-token"))
            .await
            .0,
        403
    );
    // ENABLE_DEBUG_ENDPOINT_AUTH=false: anyone.
    let d = debug(&[], false);
    assert_eq!(get(&d.router, POD, "/debug/config_dump", None).await.0, 200);
}

#[tokio::test]
async fn the_app_serves_debug_to_loopback_over_its_listener() {
    let mut istiod = LocalIstiod::start(&[]).await;
    let monitoring = istiod.addresses().monitoring;
    // The listener tells the router the peer: 127.0.0.1, no token needed.
    let (status, body) = http_get(monitoring, "/debug/syncz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = http_get(monitoring, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"istiod_listener_open_connections{listener="monitoring"} 1"#),
        "{metrics}"
    );
    istiod.stop().await;
}
