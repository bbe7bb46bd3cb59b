//! The node agent in local mode (root; skipped loudly without, required
//! under CI): its pods come from the config directory istiod-rs reads.
//! Label edits in the files enrol and unenrol a pod in a real network
//! namespace (rules installed and removed, the pod handed to and taken from
//! ztunnel over ZDS); pods of other nodes are not this agent's.

use std::path::Path;
use std::time::Duration;

use tokio::sync::mpsc;
use ztunnel_rs::inpod::testing::{ListenerProxy, ProxyEvent, TestNetns, root_or_skip, serve_zds};
use ztunnel_rs::node_agent::cni_event::{CniHandler, CniPod, CniRequest};
use ztunnel_rs::node_agent::pods::directory::DirectoryPodSource;
use ztunnel_rs::node_agent::{AgentConfig, NodeAgent, ZdsServer};

const WAIT: Duration = Duration::from_secs(30);
const NODE: &str = "node-a";

fn namespace(labels: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{{labels}}}}}\n")
}

fn pod(name: &str, node: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: uid-{name}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: app, image: app}}]}}\n"
    )
}

/// Writes whole files by rename, as the local cluster does.
fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

fn sandbox(name: &str, netns: &TestNetns) -> CniPod {
    CniPod {
        namespace: "shop".into(),
        name: name.into(),
        uid: Some(format!("uid-{name}")),
        container_id: format!("sandbox-{name}"),
        netns: netns.path().into(),
        ips: vec![],
    }
}

fn has_rules(netns: &TestNetns) -> bool {
    netns
        .exec(&["iptables", "-t", "nat", "-S"])
        .contains("ISTIO")
}

async fn next(rx: &mut mpsc::UnboundedReceiver<ProxyEvent>) -> ProxyEvent {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting for ztunnel to be told")
        .expect("ztunnel's channel closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_edits_in_the_config_directory_enrol_and_unenrol() {
    if !root_or_skip("label_edits_in_the_config_directory_enrol_and_unenrol") {
        return;
    }
    let pod_netns = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    write(
        &config,
        "namespace.yaml",
        &namespace("istio.io/dataplane-mode: ambient"),
    );
    write(&config, "cart-0.yaml", &pod("cart-0", NODE, ""));
    write(&config, "far-0.yaml", &pod("far-0", "node-b", ""));

    let zds_socket = dir.path().join("ztunnel.sock");
    let (zds, acked) = ZdsServer::new(WAIT);
    serve_zds(&zds, &zds_socket);
    let node = TestNetns::new();
    let agent = NodeAgent::new(
        AgentConfig {
            pod_wait: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(3600),
            node_netns: Some(node.netns.clone()),
            ..AgentConfig::default()
        },
        zds,
        None,
    );
    let handle = agent.handle();
    let source =
        DirectoryPodSource::new(&config, NODE).with_poll_interval(Duration::from_millis(50));
    tokio::spawn(agent.run(source, acked));
    let mut ztunnel = ListenerProxy::connect(zds_socket).await;

    // The runtime starts cart-0: enrolled by its namespace's label.
    let reply = handle
        .handle(CniRequest::Add(sandbox("cart-0", &pod_netns)))
        .await;
    assert!(reply.ok && reply.captured, "{reply:?}");
    let ProxyEvent::Added(uid, _, listeners) = next(&mut ztunnel).await else {
        panic!("expected cart-0 to be handed to ztunnel")
    };
    assert_eq!(uid, "uid-cart-0");
    assert!(has_rules(&pod_netns));
    drop(listeners);

    // The namespace's label is removed from its file: unenrolled.
    write(&config, "namespace.yaml", &namespace("team: shop"));
    assert!(matches!(next(&mut ztunnel).await, ProxyEvent::Deleted(uid) if uid == "uid-cart-0"));
    assert!(!has_rules(&pod_netns), "rules removed with the label");

    // The pod's own label enrols it again.
    write(
        &config,
        "cart-0.yaml",
        &pod("cart-0", NODE, "istio.io/dataplane-mode: ambient"),
    );
    let ProxyEvent::Added(uid, _, listeners) = next(&mut ztunnel).await else {
        panic!("expected cart-0 to be handed to ztunnel again")
    };
    assert_eq!(uid, "uid-cart-0");
    assert!(has_rules(&pod_netns));
    drop(listeners);

    // Opting out on the pod wins.
    write(
        &config,
        "cart-0.yaml",
        &pod("cart-0", NODE, "istio.io/dataplane-mode: none"),
    );
    assert!(matches!(next(&mut ztunnel).await, ProxyEvent::Deleted(uid) if uid == "uid-cart-0"));

    // A pod scheduled on another node is not this agent's to capture: its
    // ADD waits for a pod the source never reports, then fails.
    let far_netns = TestNetns::new();
    let reply = handle
        .handle(CniRequest::Add(sandbox("far-0", &far_netns)))
        .await;
    assert!(!reply.ok, "{reply:?}");
    let error = reply.error.unwrap_or_default();
    assert!(
        error.contains("not known to the node agent's pod source"),
        "{error}"
    );
    assert!(!has_rules(&far_netns));
}
