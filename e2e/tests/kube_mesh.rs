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
//! Then the echo app runs as a Deployment in namespace `demo` with a client
//! pod beside it, `kubectl label namespace demo
//! istio.io/dataplane-mode=ambient` enrols the running pods (the node
//! agents mark them `ambient.istio.io/redirection: enabled`), and the
//! client's request to the echo Service's ClusterIP is carried in HBONE:
//! the ztunnel-rs of the client's node counts it in
//! `istio_tcp_connections_opened_total` with
//! `connection_security_policy="mutual_tls"`.
//!
//! The test cluster has no DNS: ztunnel-rs is given istiod's Service
//! ClusterIP with `--set ztunnel.xdsAddress=<ip>:15012` (the Service exists
//! only once the first install applied it, so the test installs, reads the
//! ClusterIP, and installs again: an upgrade in place, as a user without
//! cluster DNS would).
//!
//! Needs root (or unprivileged user namespaces); skips loudly otherwise and
//! fails when `CI` is set.

use std::time::{Duration, Instant};

use e2e::binaries::Binaries;
use e2e::kube::node::{NodeRuntime, NodeTimings, start_nodes};
use e2e::kube::samples::{ECHO_APP, client_pod, condition};
use e2e::kube::{KubeRun, Kubectl};
use e2e::privilege;
use serde_json::Value;

/// How long one istioctl-rs command may take (its own waits are shorter).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(360);
const PATIENCE: Duration = Duration::from_secs(120);
const EXEC_TIMEOUT: Duration = Duration::from_secs(30);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The pods of istio-system matching `selector`, by node.
fn pods(kubectl: &Kubectl, selector: &str) -> Vec<Value> {
    kubectl
        .json(&["get", "pods", "-n", "istio-system", "-l", selector])
        .unwrap_or_else(|e| panic!("kubectl get pods -l {selector}: {e}"))["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Where each node's pods of `selector` stand, for a failure message.
fn describe(kubectl: &Kubectl, selector: &str) -> String {
    pods(kubectl, selector)
        .iter()
        .map(|p| {
            format!(
                "{} on {}: phase {}, Ready {:?}, containers {}",
                p["metadata"]["name"],
                p["spec"]["nodeName"],
                p["status"]["phase"],
                condition(p, "Ready"),
                p["status"]["containerStatuses"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

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
    let binaries = Binaries::default();
    let program = binaries
        .get("istioctl-rs", "istioctl-rs")
        .expect("istioctl-rs builds");
    // Built before the clock starts: an "image pull" is not a cargo build.
    for (package, bin) in [
        ("istiod-rs", "istiod-rs"),
        ("ztunnel-rs", "ztunnel-rs"),
        ("e2e", "echo"),
    ] {
        binaries.get(package, bin).expect("the mesh binaries build");
    }
    let kube = KubeRun::start(2).expect("the control plane starts");
    let kubectl = kube.control_plane.kubectl();
    let nodes = start_nodes(&kube, &binaries, &NodeTimings::default(), &|s| {
        eprintln!("e2e: node: {s}")
    })
    .expect("the node runtimes start");
    for node in &nodes {
        let (name, conflist) = primary_conflist(node);
        assert!(
            !conflist.to_string().contains("istio-cni-rs"),
            "{}: {name} chains istio-cni-rs before any install",
            node.name()
        );
    }

    // From nothing: the first install applies everything; ztunnel-rs cannot
    // find istiod by name (no cluster DNS here), so its wait ends short.
    let started = Instant::now();
    let first = kubectl
        .run_client(
            &program,
            &["install", "-y", "--timeout", "1s"],
            COMMAND_TIMEOUT,
        )
        .expect("istioctl-rs install runs");
    if !first.status.success() {
        let stderr = text(&first.stderr);
        assert!(
            stderr.contains("not ready after"),
            "the first install failed before its wait:\n{}{stderr}",
            text(&first.stdout)
        );
    }
    let service = kubectl
        .get("service", Some("istio-system"), "istiod")
        .expect("get the istiod Service")
        .expect("install applied the istiod Service");
    let cluster_ip = service["spec"]["clusterIP"]
        .as_str()
        .expect("the istiod Service has a ClusterIP");
    let xds_address = format!("ztunnel.xdsAddress={cluster_ip}:15012");
    let install = kubectl
        .run_client(
            &program,
            &["install", "-y", "--set", &xds_address, "--timeout", "300s"],
            COMMAND_TIMEOUT,
        )
        .expect("istioctl-rs install runs");
    let install_took = started.elapsed();
    assert!(
        install.status.success(),
        "install did not get every component Ready:\n{}{}\nistiod:\n{}\nztunnel:\n{}\nnode agent:\n{}\nlogs: {}",
        text(&install.stdout),
        text(&install.stderr),
        describe(&kubectl, "app=istiod"),
        describe(&kubectl, "app=ztunnel"),
        describe(&kubectl, "k8s-app=istio-cni-node"),
        kube.run.dir().join("logs").display()
    );
    eprintln!("e2e: timing: istioctl-rs install from nothing to all Ready in {install_took:?}");

    // What install's wait judged, checked pod by pod: one Ready istiod-rs,
    // a Ready ztunnel-rs and node agent on every node.
    let istiod = pods(&kubectl, "app=istiod");
    assert!(
        istiod
            .iter()
            .any(|p| condition(p, "Ready").as_deref() == Some("True")),
        "no Ready istiod-rs pod:\n{}",
        describe(&kubectl, "app=istiod")
    );
    for selector in ["app=ztunnel", "k8s-app=istio-cni-node"] {
        let ready_on: Vec<String> = pods(&kubectl, selector)
            .iter()
            .filter(|p| condition(p, "Ready").as_deref() == Some("True"))
            .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_string))
            .collect();
        for node in &nodes {
            assert!(
                ready_on.iter().any(|n| n == node.name()),
                "no Ready {selector} pod on {}:\n{}",
                node.name(),
                describe(&kubectl, selector)
            );
        }
    }

    // The node agents' installers chained istio-cni-rs last into each
    // node's own primary conflist, and put the plugin where the runtime
    // runs plugins from.
    for node in &nodes {
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
    let node0 = nodes.iter().find(|n| n.name() == "node0").expect("node0");
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

    let ztunnel = pods(&kubectl, "app=ztunnel")
        .into_iter()
        .find(|p| p["spec"]["nodeName"] == "node0")
        .expect("node0's ztunnel-rs pod");
    let ztunnel_ip: std::net::IpAddr = ztunnel["status"]["podIP"]
        .as_str()
        .expect("ztunnel-rs has an IP")
        .parse()
        .expect("an IP");
    let node0_netns = &kube
        .topology
        .nodes
        .iter()
        .find(|n| n.name == "node0")
        .expect("node0")
        .netns;
    let metrics = e2e::http::get_at(
        node0_netns,
        (ztunnel_ip, 15020).into(),
        "/metrics",
        EXEC_TIMEOUT,
    )
    .expect("ztunnel-rs's metrics");
    let mtls = metrics.body.lines().find(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            && l.contains("connection_security_policy=\"mutual_tls\"")
            && l.contains("source_workload_namespace=\"demo\"")
    });
    eprintln!("e2e: node0's ztunnel-rs: {mtls:?}");
    assert!(
        mtls.is_some(),
        "node0's ztunnel-rs counted no mutual_tls connection from the client:\n{}",
        metrics.body
    );
}
