//! istiod-rs fetches RequestAuthentication keys itself (`jwks.rs`): over
//! HTTPS from a loopback JWKS server with its own test CA, through OpenID
//! discovery, refusing what is not a key set, an untrusted server, an error
//! status or a server that never answers; and the fetcher keeps the store's
//! JWKS state current (keys, failure, last good keys kept through a failed
//! refresh, recovery), which the translation turns into inline keys or
//! `jwks_error` with a problem.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::manifest::Object;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use istiod_rs::index::{self, MeshConfig, PolicyProblem};
use istiod_rs::jwks::{
    self, JwksClient, JwksConfig, JwksEntry, JwksError, JwksMetrics, JwksSource,
};
use istiod_rs::state::{ClusterState, Store};
use prost::Message;
use proxy_core::testing::TestCa;
use rustls::RootCertStore;

const KEYS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

/// What the server answers on `/keys.json`: (status, body).
type Answer = Arc<Mutex<(u16, String)>>;

/// A loopback HTTPS server for `localhost`: `/keys.json` answers what
/// `answer` holds, `/.well-known/openid-configuration` names it, `/hang`
/// never answers. Returns its base URL.
async fn server(ca: &TestCa, answer: Answer) -> String {
    let tls = tokio_rustls::TlsAcceptor::from(ca.server_tls_config(&["localhost"]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("https://localhost:{port}");
    let discovery = format!(r#"{{"issuer":"{base}","jwks_uri":"{base}/keys.json"}}"#);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (tls, answer, discovery) = (tls.clone(), answer.clone(), discovery.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (answer, discovery) = (answer.clone(), discovery.clone());
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/keys.json" => answer.lock().unwrap().clone(),
                            "/.well-known/openid-configuration" => (200, discovery),
                            "/hang" => std::future::pending().await,
                            _ => (404, "not found".to_string()),
                        };
                        let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    base
}

fn client(ca: &TestCa) -> JwksClient {
    let mut roots = RootCertStore::empty();
    roots.add(ca.root()).unwrap();
    JwksClient::with_roots(roots, 1 << 20)
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn keys_are_fetched_over_https_directly_and_through_openid_discovery() {
    let ca = TestCa::new("cluster.local");
    let answer: Answer = Arc::new(Mutex::new((200, KEYS.to_string())));
    let base = server(&ca, answer.clone()).await;
    let client = client(&ca);

    let direct = JwksSource {
        issuer: "https://issuer.example".into(),
        uri: Some(format!("{base}/keys.json")),
    };
    assert_eq!(client.resolve(&direct, TIMEOUT).await.unwrap(), KEYS);
    let discovered = JwksSource {
        issuer: base.clone(),
        uri: None,
    };
    assert_eq!(client.resolve(&discovered, TIMEOUT).await.unwrap(), KEYS);

    // Not a key set.
    *answer.lock().unwrap() = (200, r#"{"issuer": "x"}"#.into());
    let e = client.resolve(&direct, TIMEOUT).await.unwrap_err();
    assert!(matches!(e, JwksError::Document { .. }), "{e}");
    assert!(e.to_string().contains("has no keys field"), "{e}");
    // An error status, with the body's start.
    *answer.lock().unwrap() = (503, "overloaded".into());
    let e = client.resolve(&direct, TIMEOUT).await.unwrap_err();
    assert!(
        matches!(&e, JwksError::Status { status: 503, body, .. } if body == "overloaded"),
        "{e}"
    );
    // A server whose certificate the client does not trust.
    let stranger = JwksClient::with_roots(RootCertStore::empty(), 1 << 20);
    let e = stranger.resolve(&direct, TIMEOUT).await.unwrap_err();
    assert!(matches!(e, JwksError::Tls { .. }), "{e}");
    // A server that never answers: the rule's timeout ends the fetch.
    let e = client
        .get(&format!("{base}/hang"), Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(e, JwksError::Timeout { .. }), "{e}");
    // Not an http(s) URL.
    let e = client.get("ftp://x/keys", TIMEOUT).await.unwrap_err();
    assert!(matches!(e, JwksError::BadUrl { .. }), "{e}");
}

fn request_authentication(name: &str, uri: &str) -> Object {
    let yaml = format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: {name}, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: '', name: web}}]
  jwtRules: [{{issuer: 'https://issuer.example', jwksUri: '{uri}', timeout: 5s}}]
"
    );
    api::manifest::parse(&yaml).unwrap().objects.remove(0)
}

/// Waits until `check` holds on the store's state (bounded: a missed
/// update fails the test rather than hanging it).
async fn until(store: &Store, check: impl Fn(&ClusterState) -> bool) {
    let mut changes = store.changes();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !check(&store.read()) {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("the fetcher updated the store");
}

fn entry(state: &ClusterState, uri: &str) -> Option<JwksEntry> {
    state
        .jwks
        .get(&JwksSource {
            issuer: "https://issuer.example".into(),
            uri: Some(uri.to_string()),
        })
        .cloned()
}

/// The JwtAuthentication `shop/<name>` of a translation, and its problems.
fn translated(
    state: &ClusterState,
    name: &str,
) -> (api::l7::JwtAuthentication, Vec<PolicyProblem>) {
    let t = index::translate(state, &MeshConfig::default());
    let r = &t.snapshot.of_type(api::type_url::JWT_AUTHENTICATION)[&format!("shop/{name}")];
    let j = api::l7::JwtAuthentication::decode(r.body.value.as_slice()).unwrap();
    let problems = t
        .problems
        .into_iter()
        .filter(|p| matches!(p, PolicyProblem::JwksUnavailable { .. }))
        .collect();
    (j, problems)
}

#[tokio::test]
async fn the_fetcher_keeps_the_keys_current_and_the_translation_fails_closed_without_them() {
    let ca = TestCa::new("cluster.local");
    let answer: Answer = Arc::new(Mutex::new((200, KEYS.to_string())));
    let base = server(&ca, answer.clone()).await;
    let good = format!("{base}/keys.json");
    let missing = format!("{base}/nothing.json");

    let store = Store::new();
    store.update(|s| s.apply(request_authentication("good", &good)));
    let config = JwksConfig {
        // Refresh at once and retry at once: the test drives the server.
        refresh: Duration::from_millis(50),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(100),
        ..JwksConfig::default()
    };
    let metrics = Arc::new(JwksMetrics::default());
    let task = tokio::spawn(jwks::run(
        store.clone(),
        client(&ca),
        config,
        metrics.clone(),
    ));

    until(&store, |s| {
        entry(s, &good) == Some(JwksEntry::Keys(KEYS.into()))
    })
    .await;
    let (j, problems) = translated(&store.read(), "good");
    assert_eq!(
        (j.rules[0].jwks.as_str(), j.rules[0].jwks_error.as_str()),
        (KEYS, "")
    );
    assert!(problems.is_empty(), "{problems:?}");

    // A source that fails from the start: jwks_error, and a problem.
    store.update(|s| s.apply(request_authentication("broken", &missing)));
    until(&store, |s| {
        matches!(entry(s, &missing), Some(JwksEntry::Failed(_)))
    })
    .await;
    let (j, problems) = translated(&store.read(), "broken");
    assert!(j.rules[0].jwks.is_empty());
    assert!(
        j.rules[0].jwks_error.contains("answered status 404"),
        "{}",
        j.rules[0].jwks_error
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].to_string().starts_with(&format!(
            "RequestAuthentication shop/broken: spec.jwtRules[0].jwksUri: the JWKS of {missing} is unavailable: {missing} answered status 404"
        )),
        "{}",
        problems[0]
    );

    // The good server fails its refreshes: the last keys are kept.
    *answer.lock().unwrap() = (500, "down".into());
    let failures = metrics.fetch_fail.get();
    tokio::time::timeout(Duration::from_secs(30), async {
        while metrics.fetch_fail.get() < failures + 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("refreshes were attempted");
    assert_eq!(
        entry(&store.read(), &good),
        Some(JwksEntry::Keys(KEYS.into()))
    );

    // New keys are picked up at the next refresh.
    let rotated = KEYS.replace("\"k1\"", "\"k2\"");
    *answer.lock().unwrap() = (200, rotated.clone());
    until(&store, |s| {
        entry(s, &good) == Some(JwksEntry::Keys(rotated.clone()))
    })
    .await;

    // A RequestAuthentication that goes takes its source with it.
    store.update(|s| {
        s.delete(
            api::manifest::Kind::RequestAuthentication,
            &api::manifest::ObjectKey::new("shop", "broken"),
        );
    });
    until(&store, |s| entry(s, &missing).is_none()).await;
    assert!(metrics.fetch_success.get() >= 2);
    task.abort();
}

#[tokio::test]
async fn the_pipeline_runs_the_fetcher_with_the_system_roots() {
    // The loopback server's test CA is not a system root: the pipeline's
    // own fetcher tries, fails the TLS handshake, and the served
    // JwtAuthentication says so (not "not fetched yet").
    let ca = TestCa::new("cluster.local");
    let base = server(&ca, Arc::new(Mutex::new((200, KEYS.to_string())))).await;
    let uri = format!("{base}/keys.json");
    let store = Store::new();
    store.update(|s| s.apply(request_authentication("remote", &uri)));
    store.mark_synced();
    let (mut outputs, task) = istiod_rs::pipeline::spawn(
        store.clone(),
        MeshConfig::default(),
        istiod_rs::pipeline::Debounce::default(),
        Arc::new(istiod_rs::pipeline::PipelineMetrics::default()),
    );
    let error = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            outputs.snapshots.changed().await.unwrap();
            let snapshot = outputs.snapshots.borrow_and_update().clone();
            let Some(r) = snapshot
                .of_type(api::type_url::JWT_AUTHENTICATION)
                .get("shop/remote")
            else {
                continue;
            };
            let j = api::l7::JwtAuthentication::decode(r.body.value.as_slice()).unwrap();
            if j.rules[0].jwks_error != "not fetched yet" {
                return j.rules[0].jwks_error.clone();
            }
        }
    })
    .await
    .expect("the pipeline's fetcher reported");
    assert!(
        error.starts_with(&format!("TLS with {uri} failed")),
        "{error}"
    );
    task.abort();
}
