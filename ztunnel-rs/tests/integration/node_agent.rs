//! The node agent in real network namespaces (root; skipped loudly without,
//! required under CI): a CNI ADD for an enrolled pod installs the in-pod rules
//! and hands the pod over ZDS to a ztunnel whose listeners are created in the
//! pod's netns by the in-pod socket factory; then the pod's traffic is checked
//! against the rules, the pod is annotated through the Kubernetes API (a
//! tower-test mock), unenrolled and re-enrolled by labels, and cleaned up when
//! its netns goes away. Kubelet's probes from the node pass the pod's capture
//! through the node's rules; a restarted agent takes back the running pods
//! before ztunnel may have its snapshot. Every agent's node is a namespace of
//! the test's own.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use ztunnel_rs::inpod::testing::{ListenerProxy, ProxyEvent, TestNetns, root_or_skip, serve_zds};
use ztunnel_rs::inpod::{
    InPodSocketFactory, ManagerError, Netns, WorkloadProxyManager, WorkloadUid, ZdsClient,
    ZdsClientConfig,
};
use ztunnel_rs::node_agent::cni_event::{CniHandler, CniPod, CniRequest};
use ztunnel_rs::node_agent::discovery::DiscoveryConfig;
use ztunnel_rs::node_agent::iptables::{self, RedirectionConfig};
use ztunnel_rs::node_agent::{
    AgentConfig, AgentHandle, AgentMetrics, MemoryPodSource, NamespaceMeta, NodeAgent, PodEvent,
    PodMeta, ZdsServer,
};

const WAIT: Duration = Duration::from_secs(30);
const POD_IP: &str = "10.244.250.1";
const PEER_IP: &str = "10.244.250.2";

#[derive(Debug)]
struct ApiCall {
    method: String,
    uri: String,
    content_type: String,
    body: serde_json::Value,
}

/// Answers every request of the mocked API server with an empty pod and
/// reports what it was asked.
fn mock_api() -> (kube::Client, mpsc::UnboundedReceiver<ApiCall>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let _ = tx.send(ApiCall {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                content_type: parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or_default(),
            });
            let pod = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cart-0", "namespace": "shop"}});
            respond.send_response(Response::new(Body::from(serde_json::to_vec(&pod).unwrap())));
        }
    });
    (kube::Client::new(service, "default"), rx)
}

/// The redirection annotation set (`Some("enabled")`) or removed (`None`)
/// with one merge patch on shop/cart-0.
fn assert_redirection_patch(call: &ApiCall, value: Option<&str>) {
    assert_eq!(call.method, "PATCH");
    assert_eq!(call.uri, "/api/v1/namespaces/shop/pods/cart-0/status?");
    assert_eq!(call.content_type, "application/merge-patch+json");
    assert_eq!(
        call.body,
        serde_json::json!({"metadata": {"annotations": {"ambient.istio.io/redirection": value}}})
    );
}

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("timed out waiting")
        .expect("channel closed")
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// A listener created inside `netns` (an app in a pod, or a peer host).
async fn listen_in(netns: &Netns, at: SocketAddr) -> tokio::net::TcpListener {
    let listener = netns
        .run_async(move || std::net::TcpListener::bind(at))
        .await
        .unwrap()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(listener).unwrap()
}

/// A blocking client connection made from inside `netns`, optionally bound
/// to a source address.
async fn connect_from(
    netns: &Netns,
    to: SocketAddr,
    from: Option<SocketAddr>,
) -> std::net::TcpStream {
    netns
        .run_async(move || -> std::io::Result<std::net::TcpStream> {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )?;
            if let Some(from) = from {
                socket.bind(&from.into())?;
            }
            socket.connect_timeout(&to.into(), WAIT)?;
            Ok(socket.into())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {to} from {from:?}: {e}"))
}

async fn accept(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, SocketAddr) {
    tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("a connection arrives")
        .unwrap()
}

/// Our chains and jumps as `iptables -S` prints them, v4 and v6, then our
/// policy routing (the original-source rule and table 100) as `ip` prints it.
fn istio_rules(netns: &Netns) -> String {
    netns
        .run(|| {
            let mut out = String::new();
            for family in ["-4", "-6"] {
                for args in [
                    &[family, "rule", "show", "pref", "32764"][..],
                    &[family, "route", "show", "table", "100"][..],
                ] {
                    let listing = std::process::Command::new("ip")
                        .args(args)
                        .output()
                        .unwrap();
                    for line in String::from_utf8_lossy(&listing.stdout).lines() {
                        out.push_str(&format!("ip {} {line}\n", args.join(" ")));
                    }
                }
            }
            for binary in ["iptables", "ip6tables"] {
                for table in ["mangle", "nat", "raw"] {
                    let listing = std::process::Command::new(binary)
                        .args(["-t", table, "-S"])
                        .output()
                        .unwrap();
                    for line in String::from_utf8_lossy(&listing.stdout).lines() {
                        if line.contains("ISTIO") {
                            out.push_str(&format!("{binary} {table} {line}\n"));
                        }
                    }
                }
            }
            out
        })
        .unwrap()
}

/// The pod source's first complete listing: the namespaces of `pods`, and
/// `pods`.
async fn listed(events: &mpsc::Sender<PodEvent>, pods: &[&PodMeta]) {
    let mut namespaces: Vec<String> = pods.iter().map(|p| p.namespace.clone()).collect();
    namespaces.dedup();
    for event in [
        PodEvent::NamespacesListed(namespaces),
        PodEvent::PodsListed(pods.iter().map(|p| p.key()).collect()),
    ] {
        events.send(event).await.unwrap();
    }
}

/// Namespace `shop`, enrolled by its label, and its pod `cart-0` (service
/// account `cart`), sent as the source's first listing.
async fn list_enrolled_cart(events: &mpsc::Sender<PodEvent>) -> PodMeta {
    events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "shop".into(),
            labels: labels(&[(api::labels::DATAPLANE_MODE, "ambient")]),
        }))
        .await
        .unwrap();
    let cart = PodMeta {
        namespace: "shop".into(),
        name: "cart-0".into(),
        uid: "uid-cart".into(),
        service_account: "cart".into(),
        ..Default::default()
    };
    events.send(PodEvent::Pod(cart.clone())).await.unwrap();
    listed(events, &[&cart]).await;
    cart
}

/// Namespace `shop` loses its label: ztunnel is told to drop `cart-0`.
async fn unlabel_shop(
    events: &mpsc::Sender<PodEvent>,
    proxy: &mut mpsc::UnboundedReceiver<ProxyEvent>,
) {
    events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "shop".into(),
            labels: BTreeMap::new(),
        }))
        .await
        .unwrap();
    assert!(matches!(next(proxy).await, ProxyEvent::Deleted(uid) if uid == "uid-cart"));
}

/// An agent's settings with `node` as its node, sweeping only when asked.
fn on_node(node: &TestNetns) -> AgentConfig {
    AgentConfig {
        pod_wait: WAIT,
        sweep_interval: Duration::from_secs(3600),
        node_netns: Some(node.netns.clone()),
        ..AgentConfig::default()
    }
}

/// A running node agent, as a test drives it.
struct Started {
    handle: AgentHandle,
    events: mpsc::Sender<PodEvent>,
    zds: ZdsServer,
}

/// Starts a node agent serving ZDS at `socket`, fed by an in-memory pod
/// source, on the current runtime.
fn start_agent(
    config: AgentConfig,
    socket: &Path,
    kube: Option<kube::Client>,
    metrics: AgentMetrics,
) -> Started {
    let (zds, acked) = ZdsServer::new(WAIT);
    serve_zds(&zds, socket);
    let agent = NodeAgent::new(config, zds.clone(), kube).with_metrics(metrics);
    let handle = agent.handle();
    let (source, events) = MemoryPodSource::new();
    tokio::spawn(agent.run(source, acked));
    Started {
        handle,
        events,
        zds,
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Pod `shop/cart-0` in a netns linked to a peer's, a node netns of its
/// own, a node agent there (ZDS, a mocked API server, an in-memory pod
/// source that listed the pod enrolled) and a ztunnel stand-in connected
/// before the pod starts.
struct CartWorld {
    pod: TestNetns,
    peer: TestNetns,
    node: TestNetns,
    _dir: tempfile::TempDir,
    agent: AgentHandle,
    events: mpsc::Sender<PodEvent>,
    cart: PodMeta,
    api_calls: mpsc::UnboundedReceiver<ApiCall>,
    proxy: mpsc::UnboundedReceiver<ProxyEvent>,
}

async fn cart_world() -> CartWorld {
    let pod = TestNetns::new();
    let peer = TestNetns::new();
    pod.link(&format!("{POD_IP}/24"), &peer, &format!("{PEER_IP}/24"));
    let node = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let zds_socket = dir.path().join("ztunnel.sock");
    let (kube, api_calls) = mock_api();
    let Started { handle, events, .. } = start_agent(
        on_node(&node),
        &zds_socket,
        Some(kube),
        AgentMetrics::default(),
    );
    let cart = list_enrolled_cart(&events).await;
    let proxy = ListenerProxy::connect(zds_socket).await;
    CartWorld {
        pod,
        peer,
        node,
        _dir: dir,
        agent: handle,
        events,
        cart,
        api_calls,
        proxy,
    }
}

/// The runtime's CNI ADD (or DEL) for cart-0's sandbox in `pod`.
fn cart_sandbox(pod: &TestNetns) -> CniPod {
    CniPod {
        namespace: "shop".into(),
        name: "cart-0".into(),
        uid: Some("uid-cart".into()),
        container_id: "sandbox-1".into(),
        netns: pod.path().into(),
        ips: vec![POD_IP.parse().unwrap()],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_captures_a_pod_in_its_netns_and_releases_it() {
    if !root_or_skip("agent_captures_a_pod_in_its_netns_and_releases_it") {
        return;
    }
    let CartWorld {
        pod,
        peer,
        node: _node,
        _dir,
        agent: agent_handle,
        events: pod_events,
        cart,
        mut api_calls,
        mut proxy,
    } = cart_world().await;
    let ambient = labels(&[(api::labels::DATAPLANE_MODE, "ambient")]);

    // The runtime's CNI ADD for the pod's sandbox.
    let sandbox = cart_sandbox(&pod);
    let reply = agent_handle.handle(CniRequest::Add(sandbox.clone())).await;
    assert!(reply.ok && reply.captured, "{reply:?}");
    let ProxyEvent::Added(uid, factory, listeners) = next(&mut proxy).await else {
        panic!("expected the pod to be added")
    };
    assert_eq!(uid, "uid-cart");
    assert_eq!(
        factory.netns(),
        &pod.netns,
        "listeners live in the pod's netns"
    );

    // Annotated once ztunnel acked: one merge patch, exactly.
    assert_redirection_patch(&next(&mut api_calls).await, Some("enabled"));

    // Outbound: the app's connection to the peer lands on 15001 with the
    // peer as original destination; the proxy's own (marked) connection to
    // that destination passes the rules and leaves with the pod's address.
    let peer_server = listen_in(&peer.netns, addr("0.0.0.0", 9090)).await;
    let mut app = connect_from(&pod.netns, addr(PEER_IP, 9090), None).await;
    let (mut captured, from) = accept(&listeners.outbound).await;
    assert_eq!(unmapped(from.ip()), POD_IP.parse::<IpAddr>().unwrap());
    let original = InPodSocketFactory::original_dst(&captured).unwrap();
    assert_eq!(original, addr(PEER_IP, 9090));
    let mut upstream = factory.connect(original).await.unwrap();
    let (mut at_peer, peer_saw) = accept(&peer_server).await;
    assert_eq!(peer_saw.ip(), POD_IP.parse::<IpAddr>().unwrap());
    app.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    captured.read_exact(&mut buf).await.unwrap();
    upstream.write_all(&buf).await.unwrap();
    at_peer.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    at_peer.write_all(b"pong").await.unwrap();
    upstream.read_exact(&mut buf).await.unwrap();
    captured.write_all(&buf).await.unwrap();
    app.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // Inbound plaintext: redirected to 15006, original destination kept.
    let _inbound_client = connect_from(&peer.netns, addr(POD_IP, 8080), None).await;
    let (inbound, from) = accept(&listeners.inbound_plaintext).await;
    assert_eq!(unmapped(from.ip()), PEER_IP.parse::<IpAddr>().unwrap());
    assert_eq!(
        InPodSocketFactory::original_dst(&inbound).unwrap(),
        addr(POD_IP, 8080)
    );

    // HBONE: reaches 15008 directly.
    let _hbone_client = connect_from(&peer.netns, addr(POD_IP, api::ports::HBONE), None).await;
    let (hbone, _) = accept(&listeners.hbone).await;
    assert_eq!(hbone.local_addr().unwrap().port(), api::ports::HBONE);

    // Installing the rules again changes nothing.
    let rules_before = istio_rules(&pod.netns);
    assert!(rules_before.contains("-A ISTIO_OUTPUT"), "{rules_before}");
    assert!(
        rules_before.contains("ip6tables nat -A ISTIO_PRERT"),
        "{rules_before}"
    );
    for family in ["-4", "-6"] {
        assert!(
            rules_before.contains(&format!(
                "ip {family} rule show pref 32764 32764:\tfrom all fwmark 0x111/0xfff lookup 100"
            )),
            "{rules_before}"
        );
    }
    assert!(
        rules_before.contains("ip -4 route show table 100 local default dev lo"),
        "{rules_before}"
    );
    let config = RedirectionConfig::default();
    pod.netns
        .run(|| iptables::install(&config))
        .unwrap()
        .unwrap();
    assert_eq!(istio_rules(&pod.netns), rules_before);
    // And CHECK agrees the pod is as ADD left it.
    let check = agent_handle
        .handle(CniRequest::Check(sandbox.clone()))
        .await;
    assert!(check.ok, "{check:?}");

    // Unenrol: the namespace loses its label. Rules go, ztunnel drops the
    // pod, the annotation is removed.
    drop(listeners);
    unlabel_shop(&pod_events, &mut proxy).await;
    assert_redirection_patch(&next(&mut api_calls).await, None);
    assert_eq!(istio_rules(&pod.netns), "", "rules removed cleanly");

    // Re-enrol through the pod's own label: the agent still knows the sandbox.
    let mut labelled = cart.clone();
    labelled.labels = ambient;
    pod_events.send(PodEvent::Pod(labelled)).await.unwrap();
    let ProxyEvent::Added(uid, factory, listeners) = next(&mut proxy).await else {
        panic!("expected the pod to be added again")
    };
    assert_eq!(uid, "uid-cart");
    assert!(!istio_rules(&pod.netns).is_empty());
    drop((factory, listeners));

    // The sandbox's netns disappears without a CNI DEL: the sweep notices.
    let pod_path = pod.path();
    drop(pod);
    assert!(!std::path::Path::new(&pod_path).exists());
    agent_handle.sweep().await.unwrap();
    assert!(matches!(next(&mut proxy).await, ProxyEvent::Deleted(uid) if uid == "uid-cart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_add_fails_while_no_ztunnel_is_connected_and_rules_stay() {
    if !root_or_skip("cni_add_fails_while_no_ztunnel_is_connected_and_rules_stay") {
        return;
    }
    let pod = TestNetns::new();
    let node = TestNetns::new();
    let dir = tempfile::tempdir().unwrap();
    let config = on_node(&node);
    let Started {
        handle,
        events,
        zds,
        ..
    } = start_agent(
        config,
        &dir.path().join("ztunnel.sock"),
        None,
        AgentMetrics::default(),
    );
    let mut meta = PodMeta {
        namespace: "shop".into(),
        name: "api-0".into(),
        uid: "uid-api".into(),
        ..Default::default()
    };
    meta.labels = labels(&[(api::labels::DATAPLANE_MODE, "ambient")]);
    events.send(PodEvent::Pod(meta.clone())).await.unwrap();
    listed(&events, &[&meta]).await;
    let reply = handle
        .handle(CniRequest::Add(CniPod {
            namespace: "shop".into(),
            name: "api-0".into(),
            uid: None,
            container_id: "sandbox-9".into(),
            netns: pod.path().into(),
            ips: vec![],
        }))
        .await;
    assert!(!reply.ok, "{reply:?}");
    let error = reply.error.unwrap();
    assert!(error.contains("no ztunnel is connected"), "{error}");
    // Fail closed: the rules are in, so the pod's traffic cannot leave
    // uncaptured, and the pod is kept for ztunnel's snapshot.
    assert!(istio_rules(&pod.netns).contains("REDIRECT"));
    assert!(zds.has_pod("uid-api"));
}

#[tokio::test]
async fn annotation_is_one_exact_merge_patch() {
    let (kube, mut calls) = mock_api();
    let pod = ztunnel_rs::node_agent::PodKey::new("shop", "cart-0");
    ztunnel_rs::node_agent::annotate::set_redirection(&kube, &pod, true)
        .await
        .unwrap();
    assert_redirection_patch(&next(&mut calls).await, Some("enabled"));
}

#[tokio::test]
async fn kube_source_watches_only_this_nodes_pods() {
    use ztunnel_rs::node_agent::PodSource;
    use ztunnel_rs::node_agent::pods::kube::KubePodSource;

    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (events_tx, mut events) = mpsc::channel(16);
    tokio::spawn(KubePodSource::new(client, "node-a").run(events_tx));
    // The first two requests are the initial lists of pods and namespaces,
    // in either order; the watches that follow are left hanging.
    for _ in 0..2 {
        let (request, respond) = tokio::time::timeout(WAIT, api.next_request())
            .await
            .unwrap()
            .unwrap();
        let uri = request.uri().to_string();
        let list = if uri.starts_with("/api/v1/pods?") {
            assert!(
                uri.contains("fieldSelector=spec.nodeName%3Dnode-a"),
                "{uri}"
            );
            serde_json::json!({
                "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"},
                "items": [{
                    "metadata": {"name": "cart-0", "namespace": "shop", "uid": "uid-cart",
                                 "labels": {"istio.io/dataplane-mode": "ambient"}},
                    "spec": {"serviceAccountName": "cart", "nodeName": "node-a", "containers": []}
                }]
            })
        } else {
            assert!(uri.starts_with("/api/v1/namespaces?"), "{uri}");
            serde_json::json!({
                "apiVersion": "v1", "kind": "NamespaceList", "metadata": {"resourceVersion": "1"},
                "items": [{"metadata": {"name": "shop", "labels": {"team": "a"}}}]
            })
        };
        respond.send_response(Response::new(Body::from(
            serde_json::to_vec(&list).unwrap(),
        )));
    }
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap();
        seen.push(event);
    }
    let cart = seen
        .iter()
        .find_map(|e| match e {
            PodEvent::Pod(meta) => Some(meta.clone()),
            _ => None,
        })
        .expect("the pod");
    assert_eq!(cart.uid, "uid-cart");
    assert_eq!(cart.service_account, "cart");
    assert_eq!(
        cart.labels
            .get("istio.io/dataplane-mode")
            .map(String::as_str),
        Some("ambient")
    );
    assert!(seen.contains(&PodEvent::PodsListed(vec![cart.key()])));
    assert!(seen.contains(&PodEvent::NamespacesListed(vec!["shop".into()])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_install_in_a_pod_with_ipv6_disabled() {
    if !root_or_skip("rules_install_in_a_pod_with_ipv6_disabled") {
        return;
    }
    let pod = TestNetns::new();
    pod.exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    // The kernel refuses the IPv6 route there; IPv4 capture and routing
    // must still be installed.
    pod.netns
        .run(|| iptables::install(&RedirectionConfig::default()))
        .unwrap()
        .unwrap();
    let rules = istio_rules(&pod.netns);
    assert!(rules.contains("iptables nat -A ISTIO_OUTPUT"), "{rules}");
    assert!(
        rules.contains("ip -4 route show table 100 local default dev lo"),
        "{rules}"
    );
}

/// The node's kubelet-probe rules and set, as `iptables -S` and `ipset save`
/// print them (our chain and sets only).
fn node_probe_rules(node: &TestNetns) -> String {
    let mut out = String::new();
    for binary in ["iptables", "ip6tables"] {
        for line in node.exec(&[binary, "-t", "nat", "-S"]).lines() {
            if line.contains("ISTIO_POSTRT") {
                out.push_str(&format!("{binary} {line}\n"));
            }
        }
    }
    for line in node.exec(&["ipset", "save"]).lines() {
        if line.starts_with("add istio-inpod-probes") {
            out.push_str(&format!("{line}\n"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_from_the_node_reach_a_captured_pod_uncaptured() {
    if !root_or_skip("kubelet_probes_from_the_node_reach_a_captured_pod_uncaptured") {
        return;
    }
    const POD_V6: &str = "fd00:250::1";
    const NODE_V6: &str = "fd00:250::2";
    // The pod's uplink to its node, with the default routes a pod has.
    let pod = TestNetns::new();
    let node = TestNetns::new();
    pod.link(&format!("{POD_IP}/24"), &node, &format!("{PEER_IP}/24"));
    pod.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{POD_V6}/64"),
        "dev",
        &pod.veth(),
        "nodad",
    ]);
    node.exec(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{NODE_V6}/64"),
        "dev",
        &node.veth(),
        "nodad",
    ]);
    pod.exec(&["ip", "route", "add", "default", "via", PEER_IP]);
    pod.exec(&["ip", "-6", "route", "add", "default", "via", NODE_V6]);

    let dir = tempfile::tempdir().unwrap();
    let zds_socket = dir.path().join("ztunnel.sock");
    let config = on_node(&node);
    let Started {
        handle,
        events: pod_events,
        ..
    } = start_agent(config, &zds_socket, None, AgentMetrics::default());
    list_enrolled_cart(&pod_events).await;
    let mut proxy = ListenerProxy::connect(zds_socket).await;

    // The agent installed upstream's rules in the node as it started.
    let rules = node_probe_rules(&node);
    for want in [
        "iptables -A POSTROUTING -j ISTIO_POSTRT",
        "iptables -A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127",
        "ip6tables -A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set istio-inpod-probes-v6 dst -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff",
    ] {
        assert!(rules.contains(want), "{want}\nnot in\n{rules}");
    }

    let reply = handle
        .handle(CniRequest::Add(CniPod {
            namespace: "shop".into(),
            name: "cart-0".into(),
            uid: Some("uid-cart".into()),
            container_id: "sandbox-1".into(),
            netns: pod.path().into(),
            ips: vec![POD_IP.parse().unwrap(), POD_V6.parse().unwrap()],
        }))
        .await;
    assert!(reply.ok && reply.captured, "{reply:?}");
    let ProxyEvent::Added(_, _, listeners) = next(&mut proxy).await else {
        panic!("expected the pod to be added")
    };
    // Once ztunnel has it, its addresses are in the node's probe set.
    let rules = node_probe_rules(&node);
    assert!(
        rules.contains(&format!(
            "add istio-inpod-probes-v4 {POD_IP} comment \"uid-cart\""
        )) && rules.contains(&format!(
            "add istio-inpod-probes-v6 {POD_V6} comment \"uid-cart\""
        )),
        "{rules}"
    );

    // Kubelet connects from the node, as any node process does: both
    // families reach the app (not ztunnel), from the probe address.
    let app = listen_in(&pod.netns, addr("::", 8081)).await;
    let _probe = connect_from(&node.netns, addr(POD_IP, 8081), None).await;
    let (_, prober) = accept(&app).await;
    assert_eq!(
        unmapped(prober.ip()),
        IpAddr::from(api::ports::KUBELET_PROBE_IPV4)
    );
    let _probe6 = connect_from(&node.netns, addr(POD_V6, 8081), None).await;
    let (_, prober6) = accept(&app).await;
    assert_eq!(prober6.ip().to_string(), iptables::KUBELET_PROBE_IPV6);

    // Without its entry in the set, the same connection is captured: it is
    // the node's rule that lets probes through.
    node.exec(&["ipset", "del", "istio-inpod-probes-v4", POD_IP]);
    let _captured = connect_from(&node.netns, addr(POD_IP, 8081), None).await;
    let (inbound, from) = accept(&listeners.inbound_plaintext).await;
    assert_eq!(unmapped(from.ip()), PEER_IP.parse::<IpAddr>().unwrap());
    assert_eq!(
        InPodSocketFactory::original_dst(&inbound).unwrap(),
        addr(POD_IP, 8081)
    );

    // Unenrolled: the pod's entries leave the set (here, the IPv6 one left).
    drop(listeners);
    unlabel_shop(&pod_events, &mut proxy).await;
    let rules = node_probe_rules(&node);
    assert!(!rules.contains("uid-cart"), "{rules}");
    assert!(
        rules.contains("ISTIO_POSTRT"),
        "the node's rules stay: {rules}"
    );
}

/// `ztunnel-rs cni` on SIGTERM when its DaemonSet is gone (the mesh is
/// being uninstalled): the running pod is let go, not left redirected to a
/// ztunnel that is leaving too. Its rules, its annotation, ztunnel's proxy
/// for it and the node's probe chain and sets all go, and the agent stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_releases_every_pod_and_clears_the_node() {
    if !root_or_skip("uninstall_releases_every_pod_and_clears_the_node") {
        return;
    }
    let CartWorld {
        pod,
        node,
        agent: handle,
        mut api_calls,
        mut proxy,
        ..
    } = cart_world().await;
    let reply = handle.handle(CniRequest::Add(cart_sandbox(&pod))).await;
    assert!(reply.ok && reply.captured, "{reply:?}");
    let ProxyEvent::Added(_, _, listeners) = next(&mut proxy).await else {
        panic!("expected the pod to be added")
    };
    assert_redirection_patch(&next(&mut api_calls).await, Some("enabled"));
    assert!(!istio_rules(&pod.netns).is_empty());
    let node_state = node_probe_rules(&node);
    assert!(
        node_state.contains("ISTIO_POSTRT") && node_state.contains("uid-cart"),
        "{node_state}"
    );
    drop(listeners);

    handle.uninstall().await.unwrap();
    assert_eq!(istio_rules(&pod.netns), "", "the pod's rules are removed");
    assert_eq!(node_probe_rules(&node), "", "the node's chain is removed");
    let sets = node.exec(&["ipset", "list", "-n"]);
    assert!(!sets.contains("istio-inpod-probes"), "sets left: {sets}");
    assert_redirection_patch(&next(&mut api_calls).await, None);
    assert!(matches!(next(&mut proxy).await, ProxyEvent::Deleted(uid) if uid == "uid-cart"));
    // The agent has stopped: a later label change captures nothing.
    assert!(handle.sweep().await.is_err(), "the agent still runs");
}

/// What a ztunnel stand-in was told, in order.
#[derive(Debug, PartialEq, Eq)]
enum Told {
    /// uid, netns inode
    Added(String, u64),
    /// uid, whether it had something to keep
    Kept(String, bool),
    Deleted(String),
    /// The pods it still proxies once the snapshot was complete.
    Snapshot(Vec<String>),
}

/// A ztunnel stand-in that proxies nothing but keeps what it was handed as
/// ztunnel does: Add replaces, Keep keeps what runs, SnapshotSent drops the
/// pods not named.
struct Recorder {
    running: std::sync::Mutex<BTreeMap<String, u64>>,
    told: mpsc::UnboundedSender<Told>,
}

impl WorkloadProxyManager for Recorder {
    async fn add(
        &self,
        uid: &WorkloadUid,
        _info: Option<&api::zds::WorkloadInfo>,
        netns: Netns,
    ) -> Result<(), ManagerError> {
        self.running
            .lock()
            .unwrap()
            .insert(uid.0.clone(), netns.inode());
        let _ = self.told.send(Told::Added(uid.0.clone(), netns.inode()));
        Ok(())
    }
    async fn del(&self, uid: &WorkloadUid) {
        self.running.lock().unwrap().remove(&uid.0);
        let _ = self.told.send(Told::Deleted(uid.0.clone()));
    }
    fn keep(&self, uid: &WorkloadUid) -> Result<(), ManagerError> {
        let had = self.running.lock().unwrap().contains_key(&uid.0);
        let _ = self.told.send(Told::Kept(uid.0.clone(), had));
        if had {
            Ok(())
        } else {
            Err("nothing runs for it".into())
        }
    }
    async fn snapshot_done(&self, known: &HashSet<WorkloadUid>) {
        let mut running = self.running.lock().unwrap();
        running.retain(|uid, _| known.contains(&WorkloadUid(uid.clone())));
        let _ = self
            .told
            .send(Told::Snapshot(running.keys().cloned().collect()));
    }
}

fn enrolled_pod(name: &str, uid: &str, ips: &[&str]) -> PodMeta {
    PodMeta {
        namespace: "shop".into(),
        name: name.into(),
        uid: uid.into(),
        service_account: "default".into(),
        ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        ..Default::default()
    }
}

/// A namespace holding `ip` on its loopback.
fn netns_with(ip: &str) -> TestNetns {
    let ns = TestNetns::new();
    ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    ns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agent_takes_back_running_pods_before_the_snapshot() {
    if !root_or_skip("restarted_agent_takes_back_running_pods_before_the_snapshot") {
        return;
    }
    const UID_B: &str = "6f1b2c3d-0000-4000-8000-00000000000b";
    let (ip_a, ip_b, ip_c) = ("10.250.1.1", "10.250.1.2", "10.250.1.3");
    let node = TestNetns::new();
    // a is wired to the node by its veth; b has no link to it.
    let pod_a = TestNetns::new();
    pod_a.link(&format!("{ip_a}/24"), &node, "10.250.1.254/24");
    let pod_b = netns_with(ip_b);
    // Namespaces that are not this node's pods but hold the same addresses
    // (other nodes' pods on a shared machine): a's is told apart by the
    // wiring, b's by b's process's cgroup; c's two leave c ambiguous.
    let decoy_a = netns_with(ip_a);
    let decoy_b = netns_with(ip_b);
    let decoy_c1 = netns_with(ip_c);
    let decoy_c2 = netns_with(ip_c);

    // Where the restarted agent looks: a directory of namespace mounts
    // (a's, and the decoys), and a procfs whose one process lives in b's
    // namespace with b's uid in its cgroup.
    let dir = tempfile::tempdir().unwrap();
    let mounts = dir.path().join("netns");
    std::fs::create_dir(&mounts).unwrap();
    for ns in [&pod_a, &decoy_a, &decoy_b, &decoy_c1, &decoy_c2] {
        std::os::unix::fs::symlink(ns.path(), mounts.join(&ns.name)).unwrap();
    }
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &pod_b.name, "sleep", "600"])
        .spawn()
        .unwrap();
    let pid = sleeper.id();
    let proc_dir = dir.path().join("proc");
    let fake = proc_dir.join("4242");
    std::fs::create_dir_all(fake.join("ns")).unwrap();
    std::os::unix::fs::symlink(format!("/proc/{pid}/ns/net"), fake.join("ns/net")).unwrap();
    std::os::unix::fs::symlink(format!("/proc/{pid}/stat"), fake.join("stat")).unwrap();
    std::fs::write(
        fake.join("cgroup"),
        format!("0::/kubepods/besteffort/pod{UID_B}/0123456789abcdef\n"),
    )
    .unwrap();
    // `ip netns exec` enters the namespace before it runs sleep.
    for _ in 0..300 {
        if Netns::open(fake.join("ns/net")).is_ok_and(|n| n == pod_b.netns) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let socket = dir.path().join("ztunnel.sock");
    let agent_config = |discovery| AgentConfig {
        discovery,
        ..on_node(&node)
    };
    let namespace = PodEvent::Namespace(NamespaceMeta {
        name: "shop".into(),
        labels: labels(&[(api::labels::DATAPLANE_MODE, "ambient")]),
    });

    // The first agent, on a runtime of its own so that it can die whole:
    // it captures a and b through CNI ADDs.
    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let first_agent = {
        let _in = first.enter();
        start_agent(
            agent_config(nowhere(dir.path())),
            &socket,
            None,
            AgentMetrics::default(),
        )
    };
    let (handle, first_events) = (first_agent.handle, first_agent.events);
    let (a, b) = (
        enrolled_pod("a-0", "uid-a", &[]),
        enrolled_pod("b-0", UID_B, &[]),
    );
    first_events.send(namespace.clone()).await.unwrap();
    for pod in [&a, &b] {
        first_events
            .send(PodEvent::Pod((*pod).clone()))
            .await
            .unwrap();
    }
    listed(&first_events, &[&a, &b]).await;

    // ztunnel: connected for good, across the agent's restart.
    let (told_tx, mut told) = mpsc::unbounded_channel();
    let recorder = Recorder {
        running: Default::default(),
        told: told_tx,
    };
    let client = Arc::new(ZdsClient::new(
        ZdsClientConfig {
            socket: socket.clone(),
            max_backoff: Duration::from_millis(200),
        },
        recorder,
    ));
    tokio::spawn({
        let client = client.clone();
        async move { client.run(std::future::pending()).await }
    });
    assert_eq!(next(&mut told).await, Told::Snapshot(vec![]));
    for (pod, ns, ip) in [(&a, &pod_a, ip_a), (&b, &pod_b, ip_b)] {
        let reply = handle
            .handle(CniRequest::Add(CniPod {
                namespace: "shop".into(),
                name: pod.name.clone(),
                uid: Some(pod.uid.clone()),
                container_id: format!("sandbox-{}", pod.name),
                netns: ns.path().into(),
                ips: vec![ip.parse().unwrap()],
            }))
            .await;
        assert!(reply.ok && reply.captured, "{reply:?}");
        assert_eq!(
            next(&mut told).await,
            Told::Added(pod.uid.clone(), ns.netns.inode())
        );
    }
    node.exec(&[
        "ipset",
        "add",
        "istio-inpod-probes-v4",
        "10.250.9.9",
        "comment",
        "uid-gone",
    ]);

    // The agent dies (SIGKILL: nothing of it runs any more, its connection
    // closes); ztunnel keeps its pods and reconnects.
    first.shutdown_background();

    // The agent starts again. ztunnel connects and waits: the pod source
    // has not listed anything yet.
    let discovery = DiscoveryConfig {
        proc_dir,
        netns_dirs: vec![mounts],
    };
    let mut registry = proxy_core::metrics::new_registry();
    let metrics = AgentMetrics::register(&mut registry);
    let Started {
        handle,
        events,
        zds,
    } = start_agent(agent_config(discovery), &socket, None, metrics);
    tokio::time::timeout(WAIT, async {
        while zds.held() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ztunnel reconnects and waits for its snapshot");
    assert!(told.try_recv().is_err(), "nothing sent before rediscovery");

    // The source lists the pods, now with their addresses (c's sandbox was
    // never seen by any agent).
    let (a, b, c) = (
        enrolled_pod("a-0", "uid-a", &[ip_a]),
        enrolled_pod("b-0", UID_B, &[ip_b]),
        enrolled_pod("c-0", "uid-c", &[ip_c]),
    );
    events.send(namespace).await.unwrap();
    for pod in [&a, &b, &c] {
        events.send(PodEvent::Pod((*pod).clone())).await.unwrap();
    }
    listed(&events, &[&a, &b, &c]).await;

    // The first snapshot names every pod: a (found among the mounts, wired
    // to the node) and b (found through its process, its cgroup) with the
    // namespaces ztunnel already has, c kept; nothing is dropped.
    let mut snapshot = Vec::new();
    loop {
        match next(&mut told).await {
            Told::Snapshot(running) => {
                assert_eq!(running, vec![UID_B.to_string(), "uid-a".to_string()]);
                break;
            }
            other => snapshot.push(other),
        }
    }
    snapshot.sort_by_key(|t| format!("{t:?}"));
    assert_eq!(
        snapshot,
        vec![
            Told::Added(UID_B.into(), pod_b.netns.inode()),
            Told::Added("uid-a".into(), pod_a.netns.inode()),
            Told::Kept("uid-c".into(), false),
        ]
    );
    // Their rules were refreshed in place; the node's set is theirs (and
    // c's, kept), the stale entry gone.
    assert!(istio_rules(&pod_a.netns).contains("REDIRECT"));
    assert!(istio_rules(&pod_b.netns).contains("REDIRECT"));
    let set = node_probe_rules(&node);
    for (ip, uid) in [(ip_a, "uid-a"), (ip_b, UID_B), (ip_c, "uid-c")] {
        assert!(
            set.contains(&format!("add istio-inpod-probes-v4 {ip} comment \"{uid}\"")),
            "{set}"
        );
    }
    assert!(!set.contains("uid-gone"), "{set}");
    let text = proxy_core::metrics::encode(&registry).unwrap();
    assert!(
        text.contains("istio_node_agent_pods_without_netns 1"),
        "{text}"
    );
    assert!(
        text.contains("istio_node_agent_rediscovered_pods 2"),
        "{text}"
    );

    // c's namespace becomes the only one with its address: the next sweep
    // finds it and hands it to ztunnel.
    drop(decoy_c2);
    handle.sweep().await.unwrap();
    assert_eq!(
        next(&mut told).await,
        Told::Added("uid-c".into(), decoy_c1.netns.inode())
    );
    let text = proxy_core::metrics::encode(&registry).unwrap();
    assert!(
        text.contains("istio_node_agent_pods_without_netns 0"),
        "{text}"
    );

    // The runtime deletes a's sandbox: the DEL names a container the agent
    // never saw, but the namespace is a's.
    let reply = handle
        .handle(CniRequest::Del(CniPod {
            namespace: "shop".into(),
            name: "a-0".into(),
            uid: Some("uid-a".into()),
            container_id: "sandbox-a-0".into(),
            netns: pod_a.path().into(),
            ips: vec![],
        }))
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(next(&mut told).await, Told::Deleted("uid-a".into()));
    assert!(!node_probe_rules(&node).contains("uid-a"));

    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

/// Discovery that finds nothing (an empty procfs, no mounts).
fn nowhere(dir: &std::path::Path) -> DiscoveryConfig {
    DiscoveryConfig {
        proc_dir: dir.join("no-proc"),
        netns_dirs: vec![],
    }
}
