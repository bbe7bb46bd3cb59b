//! Provisioned waypoints on the local cluster with the whole mesh running:
//! a Gateway of class `istio-waypoint` applied in a mesh namespace is
//! provisioned by istiod-rs into `generated/waypoints/`; the local
//! cluster's waypoint controller runs its pod as Kubernetes would (env,
//! the mesh root, a bearer token of its own in istiod-rs's token file);
//! waypoint-rs passes its readiness probe (`/healthz/ready` on 15021: its
//! certificate from istiod-rs's CA over that token, its xDS); istiod-rs
//! reports the Gateway `Programmed`; every node (where ztunnel runs)
//! reaches the pod on 15008; a deleted pod is started again. A change to the Gateway that changes
//! the rendered Deployment (another service account) replaces the pod and
//! its token; deleting the Gateway removes the pod and revokes its token.
//!
//! Needs root (or unprivileged user namespaces) and iptables; skips loudly
//! otherwise, and fails when `CI` is set.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::mesh::{MeshConfig, MeshMode};
use e2e::privilege;
use e2e::{Cluster, LocalCluster, LocalClusterConfig};

const NAMESPACE: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
";

const GATEWAY: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: reviews-waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
";

/// [`GATEWAY`] run as another service account (istiod-rs renders it into
/// the Deployment's `serviceAccountName`).
fn gateway_as(service_account: &str) -> String {
    GATEWAY.replace(
        "namespace: shop}",
        &format!("namespace: shop, annotations: {{gateway.istio.io/service-account: {service_account}}}}}"),
    )
}

/// How long the waypoint may take to be provisioned, started and Ready
/// (a bound on waiting, not a measurement).
const PATIENCE: Duration = Duration::from_secs(120);

/// Waits until `done` says what it saw is enough; panics with `what` and
/// the last thing seen after [`PATIENCE`].
fn wait_until(what: &str, mut done: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    loop {
        let last = match done() {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}; last: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether Gateway shop/reviews-waypoint's status (written by istiod-rs
/// in local mode) has `Programmed: True`.
fn programmed(config_dir: &Path) -> Result<(), String> {
    let file = config_dir.join("generated/status/Gateway/shop/reviews-waypoint.yaml");
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let status: serde_json::Value =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let conditions = status["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let programmed = conditions
        .iter()
        .find(|c| c["type"] == "Programmed")
        .ok_or_else(|| format!("no Programmed condition yet: {text}"))?;
    if programmed["status"] == "True" {
        Ok(())
    } else {
        Err(format!("Programmed is not True: {text}"))
    }
}

#[test]
fn a_waypoint_gateway_runs_as_a_ready_pod_and_is_programmed() {
    if !privilege::enter_for_test() {
        return;
    }
    let cluster = LocalCluster::start(LocalClusterConfig {
        mesh: MeshMode::On(MeshConfig::default()),
        ..LocalClusterConfig::default()
    })
    .expect("the local cluster starts with the mesh");
    cluster
        .apply_yaml(NAMESPACE)
        .expect("the namespace applies");
    cluster.apply_yaml(GATEWAY).expect("the Gateway applies");
    let config_dir = cluster.config_dir();
    let tokens = cluster.mesh().expect("the mesh runs").layout.tokens_file();

    wait_until("the waypoint pod is Ready", || {
        cluster
            .pod("shop", "reviews-waypoint-0")
            .map(|_| ())
            .ok_or_else(|| "no pod reviews-waypoint-0 yet".into())
    });
    let outcome = cluster
        .probe_readiness("shop", "reviews-waypoint-0")
        .expect("the waypoint pod is probed");
    assert!(outcome.passed, "{outcome:?}");
    let token_file = std::fs::read_to_string(&tokens).unwrap();
    assert!(
        token_file.contains("serviceAccount: shop/reviews-waypoint\n"),
        "{token_file}"
    );
    wait_until("istiod-rs reports the Gateway Programmed", || {
        programmed(&config_dir)
    });
    // Not captured, and reachable on HBONE's port from every node's
    // namespace, where that node's ztunnel runs.
    let waypoint = cluster.pod("shop", "reviews-waypoint-0").expect("it runs");
    for node in cluster.nodes() {
        let netns = cluster.node_netns(&node).expect("the node exists");
        let connected = netns
            .tcp_connects((waypoint.ip, 15008).into(), Duration::from_secs(5))
            .expect("a connection is tried from the node");
        assert_eq!(connected, Ok(()), "{node} -> {}:15008", waypoint.ip);
    }

    // Deleted, it comes back, as its ReplicaSet would start it again.
    let first = cluster.pod("shop", "reviews-waypoint-0").expect("it runs");
    cluster
        .delete_pod("shop", "reviews-waypoint-0")
        .expect("the waypoint pod is deleted");
    wait_until(
        "the deleted waypoint pod is started again",
        || match cluster.pod("shop", "reviews-waypoint-0") {
            Some(p) if p.uid != first.uid => Ok(()),
            p => Err(format!("pod {p:?}")),
        },
    );

    cluster
        .apply_yaml(&gateway_as("reviews-other"))
        .expect("the changed Gateway applies");
    wait_until(
        "the waypoint pod is replaced by one with the new service account",
        || {
            let token_file = std::fs::read_to_string(&tokens).map_err(|e| e.to_string())?;
            let (old, new) = (
                token_file.contains("serviceAccount: shop/reviews-waypoint\n"),
                token_file.contains("serviceAccount: shop/reviews-other\n"),
            );
            match cluster.pod("shop", "reviews-waypoint-0") {
                Some(_) if new && !old => Ok(()),
                pod => Err(format!("pod {pod:?}, tokens: {token_file}")),
            }
        },
    );
    let outcome = cluster
        .probe_readiness("shop", "reviews-waypoint-0")
        .expect("the new waypoint pod is probed");
    assert!(outcome.passed, "{outcome:?}");

    cluster
        .delete_yaml(GATEWAY)
        .expect("the Gateway is deleted");
    wait_until("the waypoint pod is gone and its token revoked", || {
        if let Some(p) = cluster.pod("shop", "reviews-waypoint-0") {
            return Err(format!("still running: {p:?}"));
        }
        let token_file = std::fs::read_to_string(&tokens).map_err(|e| e.to_string())?;
        if token_file.contains("serviceAccount: shop/") {
            return Err(format!("the token is still in {}", tokens.display()));
        }
        Ok(())
    });
}
