//! The control plane is real: etcd, kube-apiserver, kube-controller-manager
//! and kube-scheduler built from the Kubernetes release's Go modules, run
//! in the topology's control-plane namespace. A Deployment gets its
//! ReplicaSet and Pod from the controller manager, a registered Node gets a
//! pod CIDR, the scheduler binds the Pod to it, a node reaches the API
//! server over the fabric, and a pod-bound TokenRequest token passes a
//! TokenReview (the API istiod-rs's CA authenticates with) while a forged
//! one does not.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::time::Duration;

use e2e::kube::{KubeRun, Kubectl, register_node};
use e2e::privilege;
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(90);

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
  namespace: shop
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 1
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      serviceAccountName: web
      containers:
        - name: echo
          image: istio-rs/echo
"#;

fn owner_kind(o: &Value) -> Option<&str> {
    o["metadata"]["ownerReferences"][0]["kind"].as_str()
}

#[test]
fn kube_control_plane() {
    if !privilege::enter_for_test() {
        return;
    }
    let kube = KubeRun::start(1).expect("the control plane starts");
    let kubectl = kube.control_plane.kubectl();

    // The release that was built is the one serving.
    let version = kubectl.json(&["version"]).expect("kubectl version");
    assert_eq!(
        version["serverVersion"]["gitVersion"], "v1.36.3",
        "{version}"
    );

    // A node reaches the API server over the fabric, at the address the
    // `kubernetes` Service's endpoints advertise.
    let node_kubectl = Kubectl {
        netns: kube.topology.nodes[0].netns.clone(),
        ..kubectl.clone()
    };
    assert_eq!(
        node_kubectl
            .run(&["get", "--raw", "/readyz"])
            .expect("readyz from node0")
            .trim(),
        "ok"
    );
    let endpoints = kubectl
        .get("endpointslice", Some("default"), "kubernetes")
        .expect("get the kubernetes EndpointSlice")
        .expect("the kubernetes EndpointSlice exists");
    assert_eq!(
        endpoints["endpoints"][0]["addresses"][0], "172.30.0.2",
        "{endpoints}"
    );
    let service = kubectl
        .get("service", Some("default"), "kubernetes")
        .unwrap()
        .unwrap();
    assert_eq!(service["spec"]["clusterIP"], "10.96.0.1");

    // The controller manager: Deployment -> ReplicaSet -> Pod.
    kubectl.apply(WORKLOAD).expect("the workload applies");
    let pod = kubectl
        .wait_for("the Deployment's Pod", PATIENCE, |k| {
            let pods = k.json(&["get", "pods", "-n", "shop", "-l", "app=web"])?;
            Ok(pods["items"].as_array().and_then(|p| p.first()).cloned())
        })
        .expect("the controller manager creates a ReplicaSet and its Pod");
    assert_eq!(owner_kind(&pod), Some("ReplicaSet"), "{pod}");
    let replica_set = kubectl
        .get(
            "replicaset",
            Some("shop"),
            pod["metadata"]["ownerReferences"][0]["name"]
                .as_str()
                .unwrap(),
        )
        .unwrap()
        .expect("the Pod's ReplicaSet exists");
    assert_eq!(owner_kind(&replica_set), Some("Deployment"));
    let pod_name = pod["metadata"]["name"].as_str().unwrap().to_string();
    let pod_uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    assert!(pod["spec"]["nodeName"].is_null(), "no node yet: {pod}");

    // The scheduler binds it once a Ready node exists; the controller
    // manager gives the node a pod CIDR.
    register_node(&kubectl, "node0").expect("node0 registers and reports Ready");
    let bound = kubectl
        .wait_for("the Pod to be bound to node0", PATIENCE, |k| {
            let p = k.get("pod", Some("shop"), &pod_name)?;
            Ok(p.filter(|p| p["spec"]["nodeName"] == "node0"))
        })
        .expect("the scheduler binds the Pod");
    assert_eq!(bound["metadata"]["uid"], pod_uid.as_str());
    let cidr = kubectl
        .wait_for("node0's pod CIDR", PATIENCE, |k| {
            let n = k.get("node", None, "node0")?;
            Ok(n.and_then(|n| n["spec"]["podCIDR"].as_str().map(str::to_string)))
        })
        .expect("the controller manager allocates a pod CIDR");
    assert!(
        cidr.starts_with("10.244.") && cidr.ends_with("/24"),
        "{cidr}"
    );

    // TokenRequest: a token bound to the pod, for istiod-rs's CA audience;
    // TokenReview vouches for it, with the pod and its node.
    let token = kubectl
        .run(&[
            "create",
            "token",
            "web",
            "-n",
            "shop",
            "--audience",
            "istio-ca",
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod_name,
            "--bound-object-uid",
            &pod_uid,
        ])
        .expect("TokenRequest")
        .trim()
        .to_string();
    let review = |token: &str| {
        kubectl
            .create(
                &json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": token, "audiences": ["istio-ca"]},
                })
                .to_string(),
            )
            .expect("TokenReview")
    };
    let status = review(&token)["status"].clone();
    assert_eq!(status["authenticated"], true, "{status}");
    assert_eq!(status["user"]["username"], "system:serviceaccount:shop:web");
    assert_eq!(status["audiences"], json!(["istio-ca"]));
    let extra = &status["user"]["extra"];
    assert_eq!(
        extra["authentication.kubernetes.io/pod-name"],
        json!([pod_name])
    );
    assert_eq!(
        extra["authentication.kubernetes.io/pod-uid"],
        json!([pod_uid])
    );
    assert_eq!(
        extra["authentication.kubernetes.io/node-name"],
        json!(["node0"])
    );

    // A token whose signature is not the cluster's is refused.
    let (head, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.AAAA");
    let status = review(&forged)["status"].clone();
    assert_ne!(status["authenticated"], true, "{status}");
}
