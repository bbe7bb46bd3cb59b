//! Kubernetes mode: the keeper of the ValidatingWebhookConfiguration over a
//! mock API server. A configuration already pointed at istiod and fail-closed
//! is left alone; when the CA's roots change (a plug-in CA rotation) its
//! `caBundle` is patched to the new roots, keeping `Fail`, guarded by the
//! resourceVersion it was computed from.

use crate::support::kube_mock::{self, Handle, next, respond};

use std::time::Duration;

use istiod_rs::webhook::configuration::ConfigurationKeeper;
use k8s_openapi::ByteString;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NAME: &str = "istio-validator-istio-system";
const PATH: &str = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations";
const OLD: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn bundle(pem: &str) -> Value {
    serde_json::to_value(ByteString(pem.as_bytes().to_vec())).unwrap()
}

fn configuration(pem: &str, version: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": NAME, "resourceVersion": version},
        "webhooks": [{
            "name": "rev.validation.istio.io",
            "clientConfig": {
                "caBundle": bundle(pem),
                "service": {"name": "istiod", "namespace": "istio-system", "path": "/validate"},
            },
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        }],
    })
}

/// Answers the watcher's list with `items`; returns the watch request's
/// answer, held open (an idle watch).
async fn list_then_watch(handle: &mut Handle, items: Vec<Value>) -> kube_mock::Respond {
    let (list, reply) = next(handle).await;
    assert_eq!((list.method.as_str(), list.path.as_str()), ("GET", PATH));
    assert_eq!(
        list.query.get("fieldSelector").map(String::as_str),
        Some("metadata.name%3Distio-validator-istio-system"),
        "{list:?}"
    );
    assert!(!list.query.contains_key("watch"), "{list:?}");
    reply.send_response(respond(
        200,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfigurationList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        }),
    ));
    let (watch, reply) = next(handle).await;
    assert_eq!(
        (
            watch.path.as_str(),
            watch.query.get("watch").map(String::as_str)
        ),
        (PATH, Some("true")),
        "{watch:?}"
    );
    reply
}

#[tokio::test]
async fn the_ca_bundle_follows_the_roots() {
    let (client, mut handle) = kube_mock::pair();
    let (roots, watched) = tokio::sync::watch::channel(OLD.to_string());
    let keeper = ConfigurationKeeper::new(
        client,
        NAME,
        watched,
        "istio-system",
        (Duration::from_millis(10), Duration::from_millis(100)),
    );
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(keeper.run(shutdown.clone()));

    // Pointed at istiod and fail-closed: nothing to write.
    let _watch = list_then_watch(&mut handle, vec![configuration(OLD, "1")]).await;

    // The roots change: the bundle is patched, Fail kept.
    let rotated = format!("{OLD}-----BEGIN CERTIFICATE-----\nMIIC\n-----END CERTIFICATE-----\n");
    roots.send(rotated.clone()).unwrap();
    let (patch, reply) = next(&mut handle).await;
    assert_eq!(
        (patch.method.as_str(), patch.path.as_str()),
        ("PATCH", format!("{PATH}/{NAME}").as_str())
    );
    assert_eq!(patch.content_type, "application/strategic-merge-patch+json");
    assert_eq!(
        patch.body,
        json!({
            "metadata": {"resourceVersion": "1"},
            "webhooks": [{
                "name": "rev.validation.istio.io",
                "clientConfig": {"caBundle": bundle(&rotated)},
                "failurePolicy": "Fail",
            }],
        })
    );
    reply.send_response(respond(200, &configuration(&rotated, "2")));

    // Settled: no further request.
    let more = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
    assert!(
        more.is_err(),
        "an unexpected request: {:?}",
        more.map(|r| r.map(|(req, _)| req.uri().clone()))
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the keeper stops")
        .unwrap();
}
