//! `istio-cni-rs` run as a real process, as a container runtime runs it: CNI
//! env, netconf on stdin, result or error JSON on stdout. The node agent it
//! talks to runs in this test process with an in-memory pod source.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use ztunnel_rs::inpod::testing::{ListenerProxy, ProxyEvent, TestNetns, root_or_skip, serve_zds};
use ztunnel_rs::node_agent::cni_event;
use ztunnel_rs::node_agent::{
    AgentConfig, MemoryPodSource, NamespaceMeta, NodeAgent, PodEvent, PodKey, PodMeta, ZdsServer,
};

struct Outcome {
    code: i32,
    stdout: Value,
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 0}],
        "dns": {}
    })
}

fn netconf(socket: &Path, prev: Option<Value>, version: &str) -> Value {
    let mut conf = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "istio-cni-rs",
        "agent_socket": socket,
        "exclude_namespaces": ["kube-system"],
        "agent_timeout_secs": 20,
    });
    if let Some(prev) = prev {
        conf["prevResult"] = prev;
    }
    conf
}

/// Runs the plugin binary with a clean environment, like a runtime does.
async fn plugin(command: &str, pod: (&str, &str), stdin: &Value) -> Outcome {
    plugin_in(
        command,
        pod,
        "/var/run/netns/cni-test-does-not-exist",
        stdin,
    )
    .await
}

async fn plugin_in(command: &str, pod: (&str, &str), netns: &str, stdin: &Value) -> Outcome {
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=abc",
        pod.0, pod.1
    );
    let input = serde_json::to_vec(stdin).unwrap();
    let command = command.to_string();
    let netns = netns.to_string();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_istio-cni-rs"))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "abc")
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let output = child.wait_with_output().unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        Outcome {
            code: output.status.code().unwrap(),
            stdout: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("stdout {text:?}: {e}"))
            },
        }
    })
    .await
    .unwrap()
}

/// A node agent on a socket in `dir`, knowing namespace `plain` (not
/// enrolled) with pod `web-0` and namespace `shop` (enrolled) with pod
/// `cart-0`; its ZDS socket is `dir/ztunnel.sock`. Its node is a namespace
/// of its own (the agent keeps it while it runs).
async fn agent(dir: &Path) -> PathBuf {
    let socket = dir.join("pluginevent.sock");
    let (zds, acked) = ZdsServer::new(Duration::from_secs(20));
    serve_zds(&zds, &dir.join("ztunnel.sock"));
    let node = TestNetns::new();
    let agent = NodeAgent::new(
        AgentConfig {
            pod_wait: Duration::from_millis(300),
            node_netns: Some(node.netns.clone()),
            ..AgentConfig::default()
        },
        zds,
        None,
    );
    let handle = agent.handle();
    let (source, events) = MemoryPodSource::new();
    tokio::spawn(agent.run(source, acked));
    events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "plain".into(),
            labels: BTreeMap::new(),
        }))
        .await
        .unwrap();
    events
        .send(PodEvent::Pod(PodMeta {
            namespace: "plain".into(),
            name: "web-0".into(),
            uid: "uid-web".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "shop".into(),
            labels: BTreeMap::from([(
                api::labels::DATAPLANE_MODE.to_string(),
                "ambient".to_string(),
            )]),
        }))
        .await
        .unwrap();
    events
        .send(PodEvent::Pod(PodMeta {
            namespace: "shop".into(),
            name: "cart-0".into(),
            uid: "uid-cart".into(),
            ..Default::default()
        }))
        .await
        .unwrap();
    for listed in [
        PodEvent::NamespacesListed(vec!["plain".into(), "shop".into()]),
        PodEvent::PodsListed(vec![
            PodKey::new("plain", "web-0"),
            PodKey::new("shop", "cart-0"),
        ]),
    ] {
        events.send(listed).await.unwrap();
    }
    let listener = cni_event::bind(&socket).unwrap();
    tokio::spawn(cni_event::serve(listener, handle));
    socket
}

#[tokio::test]
async fn version_lists_supported_versions() {
    let out = plugin("VERSION", ("a", "b"), &json!({"cniVersion": "1.0.0"})).await;
    assert_eq!(out.code, 0);
    let versions = out.stdout["supportedVersions"].as_array().unwrap();
    for v in ["0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            versions.contains(&json!(v)),
            "{v} missing: {:?}",
            out.stdout
        );
    }
}

#[tokio::test]
async fn add_of_an_unenrolled_pod_returns_prev_result_unchanged() {
    if !root_or_skip("add_of_an_unenrolled_pod_returns_prev_result_unchanged") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = agent(dir.path()).await;
    let out = plugin(
        "ADD",
        ("plain", "web-0"),
        &netconf(&socket, Some(prev_result()), "1.0.0"),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.stdout, prev_result());
    let check = plugin(
        "CHECK",
        ("plain", "web-0"),
        &netconf(&socket, Some(prev_result()), "1.0.0"),
    )
    .await;
    assert_eq!(check.code, 0, "{}", check.stdout);
    let del = plugin("DEL", ("plain", "web-0"), &netconf(&socket, None, "1.0.0")).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
    assert_eq!(del.stdout, Value::Null);
}

#[tokio::test]
async fn add_of_a_pod_the_agent_cannot_place_fails() {
    if !root_or_skip("add_of_a_pod_the_agent_cannot_place_fails") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = agent(dir.path()).await;
    let out = plugin(
        "ADD",
        ("plain", "ghost-0"),
        &netconf(&socket, Some(prev_result()), "1.0.0"),
    )
    .await;
    assert_ne!(out.code, 0);
    assert_eq!(out.stdout["code"], 100, "{}", out.stdout);
    assert_eq!(out.stdout["cniVersion"], "1.0.0");
    let details = out.stdout["details"].as_str().unwrap();
    assert!(
        details.contains("plain/ghost-0") && details.contains("not known"),
        "{details}"
    );
}

#[tokio::test]
async fn agent_down_fails_add_and_check_but_not_del() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody-listens.sock");
    let conf = netconf(&socket, Some(prev_result()), "0.4.0");
    let add = plugin("ADD", ("shop", "cart-0"), &conf).await;
    assert_ne!(add.code, 0);
    assert_eq!(add.stdout["code"], 11, "{}", add.stdout);
    assert!(
        add.stdout["msg"].as_str().unwrap().contains("uncaptured"),
        "{}",
        add.stdout
    );
    let check = plugin("CHECK", ("shop", "cart-0"), &conf).await;
    assert_ne!(check.code, 0);
    let del = plugin("DEL", ("shop", "cart-0"), &conf).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
    let status = plugin(
        "STATUS",
        ("shop", "cart-0"),
        &netconf(&socket, None, "1.1.0"),
    )
    .await;
    assert_eq!(status.stdout["code"], 50, "{}", status.stdout);
    // Excluded namespaces need no agent.
    let excluded = plugin("ADD", ("kube-system", "coredns-0"), &conf).await;
    assert_eq!(excluded.code, 0, "{}", excluded.stdout);
    assert_eq!(excluded.stdout, prev_result());
}

#[tokio::test]
async fn bad_netconf_is_rejected_with_the_spec_codes() {
    let socket = PathBuf::from("/nonexistent/agent.sock");
    let no_prev = plugin("ADD", ("shop", "cart-0"), &netconf(&socket, None, "1.0.0")).await;
    assert_eq!(no_prev.stdout["code"], 7, "{}", no_prev.stdout);
    assert!(
        no_prev.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("prevResult")
    );
    let old = plugin(
        "ADD",
        ("shop", "cart-0"),
        &netconf(&socket, Some(prev_result()), "0.2.0"),
    )
    .await;
    assert_eq!(old.stdout["code"], 1, "{}", old.stdout);
    let garbage = plugin("ADD", ("shop", "cart-0"), &json!("not a netconf")).await;
    assert_eq!(garbage.stdout["code"], 6, "{}", garbage.stdout);
    assert_ne!(garbage.code, 0);
    let unknown = plugin("FROB", ("shop", "cart-0"), &netconf(&socket, None, "1.0.0")).await;
    assert_eq!(unknown.stdout["code"], 4, "{}", unknown.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_of_an_enrolled_pod_returns_once_it_is_captured() {
    if !root_or_skip("add_of_an_enrolled_pod_returns_once_it_is_captured") {
        return;
    }
    let pod = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = agent(dir.path()).await;
    let mut added = ListenerProxy::connect(dir.path().join("ztunnel.sock")).await;

    let conf = netconf(&socket, Some(prev_result()), "1.0.0");
    let out = plugin_in("ADD", ("shop", "cart-0"), &pod.path(), &conf).await;
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(out.stdout, prev_result());
    // By the time ADD returned, ztunnel had the pod and the rules were in.
    let Ok(ProxyEvent::Added(uid, _, _listeners)) = added.try_recv() else {
        panic!("ztunnel got the pod before ADD returned")
    };
    assert_eq!(uid, "uid-cart");
    let nat = pod.exec(&["iptables", "-t", "nat", "-S", "ISTIO_OUTPUT"]);
    assert!(nat.contains("--to-ports 15001"), "{nat}");
    let check = plugin_in("CHECK", ("shop", "cart-0"), &pod.path(), &conf).await;
    assert_eq!(check.code, 0, "{}", check.stdout);
    let del = plugin_in("DEL", ("shop", "cart-0"), &pod.path(), &conf).await;
    assert_eq!(del.code, 0, "{}", del.stdout);
}
