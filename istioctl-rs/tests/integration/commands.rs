//! `x precheck` and `version` against a scripted API server: what each
//! check reports (a permission missing, our install or another Istio, the
//! nodes, what cannot be checked), and each component's running version.

use crate::support::api_server;

use api_server::{Recorded, list, not_found, version};
use istioctl_rs::manifest;
use istioctl_rs::precheck::{self, Outcome};
use istioctl_rs::values::Values;
use istioctl_rs::version::components;
use serde_json::{Value, json};

fn node(name: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

#[tokio::test]
async fn precheck_reports_each_check() {
    let (client, server) =
        api_server::client(|r: &Recorded| match (r.method.as_str(), r.path.as_str()) {
            ("GET", "/version") => version(31),
            ("GET", "/apis/apps/v1/deployments") | ("GET", "/apis/apps/v1/daemonsets") => {
                list(vec![])
            }
            ("GET", "/api/v1/nodes") => list(vec![node("a", true), node("b", false)]),
            ("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews") => {
                let attributes = &r.body["spec"]["resourceAttributes"];
                // May do everything but create ClusterRoles.
                let allowed =
                    !(attributes["resource"] == "clusterroles" && attributes["verb"] == "create");
                let mut review = r.body.clone();
                review["status"] = json!({"allowed": allowed});
                (201, review)
            }
            _ => panic!("unexpected {}", r.line()),
        });
    let manifest = manifest::generate(&Values::default()).unwrap();
    let checks = precheck::run(&client, &manifest).await.unwrap();
    drop(client);
    let requests = server.await.unwrap();

    let outcome = |name: &str| {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .outcome
            .clone()
    };
    assert!(matches!(outcome("Kubernetes version"), Outcome::Pass(t) if t.starts_with("v1.31.3")));
    assert_eq!(outcome("existing Istio"), Outcome::Pass("none".into()));
    assert_eq!(
        outcome("permissions"),
        Outcome::Fail("these credentials may not: create clusterroles.rbac.authorization.k8s.io; ask a cluster admin, or use a kubeconfig with cluster-admin".into())
    );
    assert_eq!(
        outcome("nodes"),
        Outcome::Warn("1 of 2 nodes ready; the others get ztunnel-rs once ready".into())
    );
    assert!(
        matches!(outcome("CNI configuration on nodes"), Outcome::NotChecked(t) if t.contains("/etc/cni/net.d"))
    );
    // One review per verb, kind and namespace: create and patch, each once.
    let reviews: Vec<(String, String, String)> = requests
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| {
            let a = &r.body["spec"]["resourceAttributes"];
            (
                a["verb"].as_str().unwrap().to_string(),
                a["resource"].as_str().unwrap().to_string(),
                a["namespace"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert!(reviews.contains(&("patch".into(), "deployments".into(), "istio-system".into())));
    assert!(reviews.contains(&(
        "create".into(),
        "customresourcedefinitions".into(),
        "".into()
    )));
    let unique: std::collections::BTreeSet<_> = reviews.iter().collect();
    assert_eq!(unique.len(), reviews.len());
    let rendered = checks.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert!(
        rendered
            .iter()
            .any(|l| l.starts_with("permissions") && l.contains("FAIL: these credentials"))
    );
}

#[tokio::test]
async fn version_reads_each_components_pods() {
    let workload = |kind: &str, name: &str, key: &str, value: &str| {
        json!({"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name, "namespace": "istio-system"},
               "spec": {"selector": {"matchLabels": {key: value}}, "template": {}}})
    };
    let (client, server) = api_server::client(move |r: &Recorded| match r.path.as_str() {
        "/apis/apps/v1/namespaces/istio-system/deployments/istiod" => {
            (200, workload("Deployment", "istiod", "istio", "pilot"))
        }
        "/apis/apps/v1/namespaces/istio-system/daemonsets/istio-cni-node" => (
            200,
            workload("DaemonSet", "istio-cni-node", "k8s-app", "istio-cni-node"),
        ),
        "/apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel" => not_found(),
        "/api/v1/namespaces/istio-system/pods" => match r.query["labelSelector"].as_str() {
            "istio=pilot" => {
                let pod = |tag: &str| {
                    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                    "spec": {"containers": [{"name": "discovery", "image": format!("istio-rs/istiod-rs:{tag}")}]}})
                };
                list(vec![pod("0.1.0"), pod("0.1.0"), pod("0.2.0")])
            }
            "k8s-app=istio-cni-node" => list(vec![]),
            other => panic!("selector {other}"),
        },
        _ => panic!("unexpected {}", r.line()),
    });
    let manifest = manifest::generate(&Values::default()).unwrap();
    let versions = components(&client, &manifest).await.unwrap();
    drop(client);
    server.await.unwrap();
    let lines: Vec<String> = versions.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "Deployment istio-system/istiod: 0.1.0 (2 pods), 0.2.0 (1 pod)",
            "DaemonSet istio-system/istio-cni-node: no pods",
            "DaemonSet istio-system/ztunnel: not installed",
        ]
    );
}
