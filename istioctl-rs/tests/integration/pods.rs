//! Which ztunnel or istiod pod the debugging views read on Kubernetes
//! (`istioctl_rs::pods`), against a scripted API server: the exact list
//! requests (label and node selectors), the order of choice (ready before
//! not ready, then by name), and errors that name the namespace, node or
//! pod and say what to do.

use istioctl_rs::pods::{self, FindError, PodPort, ZtunnelChoice};
use serde_json::{Value, json};

use crate::support::api_server::{self, Recorded};

const NS: &str = "istio-system";

fn pod(name: &str, app: &str, node: &str, phase: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": phase, "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}
        ]}
    })
}

/// An API server holding `items` in istio-system (filtered by the label
/// and node selectors the way the API server does) and pod `app/web-1`
/// on node-b.
fn cluster(items: Vec<Value>) -> impl FnMut(&Recorded) -> (u16, Value) + Send + 'static {
    move |r: &Recorded| {
        if let Some(namespace) = r
            .path
            .strip_prefix("/api/v1/namespaces/")
            .and_then(|rest| rest.strip_suffix("/pods"))
            .filter(|ns| *ns != NS)
        {
            assert_eq!(namespace, "elsewhere", "{}", r.line());
            return api_server::list(vec![]);
        }
        if r.path == format!("/api/v1/namespaces/{NS}/pods") {
            let label = r.query.get("labelSelector").cloned().unwrap_or_default();
            let field = r.query.get("fieldSelector").cloned().unwrap_or_default();
            let (_, app) = label.split_once('=').unwrap();
            let node = field.strip_prefix("spec.nodeName=");
            let matching = items
                .iter()
                .filter(|p| p["metadata"]["labels"]["app"] == app)
                .filter(|p| node.is_none_or(|n| p["spec"]["nodeName"] == n))
                .cloned()
                .collect();
            return api_server::list(matching);
        }
        if r.path == "/api/v1/namespaces/app/pods/web-1" {
            let mut web = pod("web-1", "web", "node-b", "Running", true);
            web["metadata"]["namespace"] = json!("app");
            return (200, web);
        }
        let name = r
            .path
            .strip_prefix(&format!("/api/v1/namespaces/{NS}/pods/"));
        if let Some(found) =
            name.and_then(|name| items.iter().find(|p| p["metadata"]["name"] == name))
        {
            return (200, found.clone());
        }
        api_server::not_found()
    }
}

fn three_ztunnels_and_istiod() -> Vec<Value> {
    vec![
        pod("ztunnel-c", "ztunnel", "node-c", "Running", false),
        pod("ztunnel-b", "ztunnel", "node-b", "Running", true),
        pod("ztunnel-a", "ztunnel", "node-a", "Running", true),
        pod("ztunnel-old", "ztunnel", "node-a", "Failed", false),
        pod("istiod-2", "istiod", "node-a", "Pending", false),
        pod("istiod-1", "istiod", "node-b", "Running", true),
    ]
}

fn port(name: &str, port: u16) -> PodPort {
    PodPort {
        namespace: NS.into(),
        name: name.into(),
        port,
    }
}

#[tokio::test]
async fn a_ztunnel_by_node_by_name_or_any() {
    let (client, requests) = api_server::client(cluster(three_ztunnels_and_istiod()));

    let on_b = ZtunnelChoice::OnNode("node-b".into());
    assert_eq!(
        pods::ztunnel(&client, NS, &on_b).await.unwrap(),
        port("ztunnel-b", 15000)
    );
    // Ready before not ready, then by name; a failed pod is never chosen.
    let any = ZtunnelChoice::Any { single: false };
    assert_eq!(
        pods::ztunnel(&client, NS, &any).await.unwrap(),
        port("ztunnel-a", 15000)
    );
    let named = ZtunnelChoice::Named("ztunnel-c.istio-system".into());
    assert_eq!(
        pods::ztunnel(&client, NS, &named).await.unwrap(),
        port("ztunnel-c", 15000)
    );
    // The ztunnel serving a pod is the one on its node.
    assert_eq!(
        pods::ztunnel_of_pod(&client, NS, "app", "web-1")
            .await
            .unwrap(),
        port("ztunnel-b", 15000)
    );
    assert_eq!(
        pods::istiod(&client, NS).await.unwrap(),
        port("istiod-1", 15014)
    );
    drop(client);

    let lines: Vec<String> = requests
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let mut line = r.line();
            for key in ["labelSelector", "fieldSelector"] {
                if let Some(v) = r.query.get(key) {
                    line.push_str(&format!(" {key}={v}"));
                }
            }
            line
        })
        .collect();
    assert_eq!(
        lines,
        [
            "GET /api/v1/namespaces/istio-system/pods labelSelector=app=ztunnel fieldSelector=spec.nodeName=node-b",
            "GET /api/v1/namespaces/istio-system/pods labelSelector=app=ztunnel",
            "GET /api/v1/namespaces/istio-system/pods/ztunnel-c",
            "GET /api/v1/namespaces/app/pods/web-1",
            "GET /api/v1/namespaces/istio-system/pods labelSelector=app=ztunnel fieldSelector=spec.nodeName=node-b",
            "GET /api/v1/namespaces/istio-system/pods labelSelector=app=istiod",
        ]
    );
}

#[tokio::test]
async fn errors_name_what_is_missing_and_what_to_do() {
    let (client, _requests) = api_server::client(cluster(three_ztunnels_and_istiod()));

    // A per-ztunnel view with several ztunnels: name one or pick a node.
    let single = ZtunnelChoice::Any { single: true };
    let err = pods::ztunnel(&client, NS, &single).await.unwrap_err();
    assert!(
        matches!(err, FindError::SeveralZtunnels { count: 3, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("ztunnel-a, ztunnel-b, ztunnel-c"), "{text}");
    assert!(text.contains("ztunnel-a.istio-system"), "{text}");
    assert!(text.contains("--node NODE"), "{text}");

    let nowhere = ZtunnelChoice::OnNode("node-z".into());
    let text = pods::ztunnel(&client, NS, &nowhere)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains(
            "no running ztunnel pod (label app=ztunnel) in namespace istio-system on node node-z"
        ),
        "{text}"
    );

    let not_a_ztunnel = ZtunnelChoice::Named("istiod-1".into());
    let text = pods::ztunnel(&client, NS, &not_a_ztunnel)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("pod istio-system/istiod-1 is not a ztunnel"),
        "{text}"
    );

    let missing = ZtunnelChoice::Named("ztunnel-x".into());
    let text = pods::ztunnel(&client, NS, &missing)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("pod istio-system/ztunnel-x not found"),
        "{text}"
    );

    let text = pods::ztunnel_of_pod(&client, NS, "app", "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("pod app/nope not found"), "{text}");

    let text = pods::istiod(&client, "elsewhere")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("no running istiod pod (label app=istiod) in namespace elsewhere"),
        "{text}"
    );
    assert!(text.contains("--istio-namespace"), "{text}");
}
