//! The mesh installed the way users install it, on a real control plane
//! (`e2e::kube`) with two netns nodes running pods (`e2e::kube::node`):
//! `istioctl-rs install -y` from nothing until every component is Ready on
//! every node, timed:
//! - the istiod-rs Deployment's pod Ready (its readiness probe, from its node);
//! - a ztunnel-rs pod Ready on each node (`/healthz/ready`: xDS synced from
//!   istiod-rs over TLS with its projected token, and the node agent's ZDS
//!   snapshot received);
//! - a node agent pod Ready on each node, whose CNI installer chained
//!   `istio-cni-rs` into the node's own conflist (the file the node
//!   runtime's container runtime reads for every new pod).
//!
//! Port-forward through the API server (kube-rs) then answers `GET
//! /config_dump` from every ztunnel-rs admin (127.0.0.1:15000 inside its
//! pod) and `GET /ready` from istiod-rs's monitoring port (15014): what
//! istioctl-rs reads.
//!
//! Then the echo app runs as a Deployment in namespace `demo` with a client
//! pod beside it, `kubectl label namespace demo
//! istio.io/dataplane-mode=ambient` enrols the running pods (the node
//! agents mark them `ambient.istio.io/redirection: enabled`), and the
//! client's request to the echo Service's ClusterIP is carried in HBONE:
//! the ztunnel-rs of the client's node counts it in
//! `istio_tcp_connections_opened_total` with
//! `connection_security_policy="mutual_tls"`.
//!
//! The install itself (and the cluster without DNS) is
//! [`e2e::kube::KubeMesh::install`]'s.
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::time::Duration;

use e2e::kube::KubeMesh;
use e2e::kube::mesh::{ISTIOD, NODE_AGENT, SYSTEM_NAMESPACE, ZTUNNEL};
use e2e::kube::node::NodeRuntime;
use e2e::kube::samples::{ECHO_APP, client_pod, condition};
use e2e::privilege;
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(120);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

/// The conflist the node's container runtime uses (the lexicographically
/// first configuration of its conf dir), as JSON.
fn primary_conflist(node: &NodeRuntime) -> (String, Value) {
    let dir = node.cni_conf_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".conflist") || n.ends_with(".conf") || n.ends_with(".json"))
        .collect();
    names.sort();
    let name = names
        .first()
        .unwrap_or_else(|| panic!("{} holds no CNI configuration", dir.display()))
        .clone();
    let json = std::fs::read_to_string(dir.join(&name)).expect("read the conflist");
    (
        name,
        serde_json::from_str(&json).expect("the conflist is JSON"),
    )
}

#[test]
fn kube_mesh_install_to_ready() {
    if !privilege::enter_for_test() {
        return;
    }
    let mut mesh = KubeMesh::start(2).expect("the control plane and nodes start");
    for node in &mesh.nodes {
        let (name, conflist) = primary_conflist(node);
        assert!(
            !conflist.to_string().contains("istio-cni-rs"),
            "{}: {name} chains istio-cni-rs before any install",
            node.name()
        );
    }

    let install_took = mesh.install(&[]).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("e2e: timing: istioctl-rs install from nothing to all Ready in {install_took:?}");

    // What install's wait judged, checked pod by pod: one Ready istiod-rs,
    // a Ready ztunnel-rs and node agent on every node.
    let istiod = mesh.pods(SYSTEM_NAMESPACE, ISTIOD).expect("list istiod");
    assert!(
        istiod
            .iter()
            .any(|p| condition(p, "Ready").as_deref() == Some("True")),
        "no Ready istiod-rs pod:\n{}",
        mesh.describe(SYSTEM_NAMESPACE, ISTIOD)
    );
    for selector in [ZTUNNEL, NODE_AGENT] {
        let ready_on: Vec<String> = mesh
            .pods(SYSTEM_NAMESPACE, selector)
            .expect("list pods")
            .iter()
            .filter(|p| condition(p, "Ready").as_deref() == Some("True"))
            .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_string))
            .collect();
        for node in &mesh.nodes {
            assert!(
                ready_on.iter().any(|n| n == node.name()),
                "no Ready {selector} pod on {}:\n{}",
                node.name(),
                mesh.describe(SYSTEM_NAMESPACE, selector)
            );
        }
    }

    // Port-forward reaches what istioctl-rs will read: every ztunnel-rs
    // admin (127.0.0.1:15000 in its pod) and istiod-rs's monitoring port.
    for (selector, port, path) in [(ZTUNNEL, 15000, "/config_dump"), (ISTIOD, 15014, "/ready")] {
        for pod in mesh.pods(SYSTEM_NAMESPACE, selector).expect("list pods") {
            let name = pod["metadata"]["name"].as_str().unwrap();
            let answer = mesh
                .kube
                .control_plane
                .port_forward_get(SYSTEM_NAMESPACE, name, port, path, PATIENCE)
                .unwrap_or_else(|e| panic!("port-forward to {name}:{port}: {e}"));
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "GET {path} on {name}:{port} through port-forward: {answer}"
            );
        }
    }

    // The node agents' installers chained istio-cni-rs last into each
    // node's own primary conflist, and put the plugin where the runtime
    // runs plugins from.
    for node in &mesh.nodes {
        let (name, conflist) = primary_conflist(node);
        let plugins = conflist["plugins"].as_array().expect("a conflist");
        assert_eq!(
            plugins.last().and_then(|p| p["type"].as_str()),
            Some("istio-cni-rs"),
            "{}: {name}: {conflist}",
            node.name()
        );
        assert!(
            node.cni_bin_dir().join("istio-cni-rs").is_file(),
            "{}: istio-cni-rs is not in {}",
            node.name(),
            node.cni_bin_dir().display()
        );
    }
    let kubectl = mesh.kubectl.clone();

    // The app, running before its namespace joins the mesh.
    kubectl.apply(ECHO_APP).expect("the echo app applies");
    kubectl
        .create(&client_pod("client", "node0"))
        .expect("the client pod is created");
    kubectl
        .wait_for("2 echo pods and the client Ready", PATIENCE, |k| {
            let items = k.json(&["get", "pods", "-n", "demo"])?["items"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok((items.len() == 3
                && items
                    .iter()
                    .all(|p| condition(p, "Ready").as_deref() == Some("True")))
            .then_some(()))
        })
        .expect("the workload runs");

    // Enrolment by label: the running pods are captured, not restarted.
    kubectl
        .run(&[
            "label",
            "namespace",
            "demo",
            "istio.io/dataplane-mode=ambient",
        ])
        .expect("label the namespace");
    let enrolled = kubectl
        .wait_for(
            "every demo pod marked ambient.istio.io/redirection=enabled",
            PATIENCE,
            |k| {
                let items = k.json(&["get", "pods", "-n", "demo"])?["items"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                Ok(items
                    .iter()
                    .all(|p| {
                        p["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
                    })
                    .then_some(items))
            },
        )
        .expect("the node agents capture the running pods");
    for p in &enrolled {
        let restarts = p["status"]["containerStatuses"][0]["restartCount"].as_i64();
        assert_eq!(
            restarts,
            Some(0),
            "enrolment restarted {}",
            p["metadata"]["name"]
        );
    }

    // The client's request to the echo Service, carried in HBONE by the
    // ztunnel-rs of its node.
    let node0 = mesh.node("node0").expect("node0");
    let echo_ip = kubectl
        .get("service", Some("demo"), "echo")
        .expect("get the echo Service")
        .expect("the echo Service")["spec"]["clusterIP"]
        .as_str()
        .expect("a ClusterIP")
        .to_string();
    let url = format!("http://{echo_ip}:80/");
    let report = kubectl
        .wait_for("the client's request through the mesh", PATIENCE, |_| {
            let report = node0
                .client_http("demo", "client", &url, EXEC_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e}"));
            Ok(report.ok.then_some(report))
        })
        .expect("the client reaches the echo Service");
    assert!(report.echo.is_some(), "{report:?}");

    let metrics = mesh
        .ztunnel_metrics("node0")
        .unwrap_or_else(|e| panic!("{e}"));
    let mtls = metrics.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_workload_namespace=\"demo\"")
    });
    eprintln!("e2e: node0's ztunnel-rs: {mtls:?}");
    assert!(
        mtls.is_some(),
        "node0's ztunnel-rs counted no mutual_tls connection from the client:\n{}",
        metrics
    );
}
