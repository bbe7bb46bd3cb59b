//! The node agent in real network namespaces (root; skipped loudly without,
//! required under CI): a CNI ADD for an enrolled pod installs the in-pod rules
//! and hands the pod over ZDS to a ztunnel whose listeners are created in the
//! pod's netns by the in-pod socket factory; then the pod's traffic is checked
//! against the rules, the pod is annotated through the Kubernetes API (a
//! tower-test mock), unenrolled and re-enrolled by labels, and cleaned up when
//! its netns goes away.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use ztunnel_rs::inpod::testing::{ListenerProxy, ProxyEvent, TestNetns, root_or_skip, serve_zds};
use ztunnel_rs::inpod::{InPodSocketFactory, Netns};
use ztunnel_rs::node_agent::cni_event::{CniHandler, CniPod, CniRequest};
use ztunnel_rs::node_agent::iptables::{self, RedirectionConfig};
use ztunnel_rs::node_agent::{
    AgentConfig, MemoryPodSource, NamespaceMeta, NodeAgent, PodEvent, PodMeta, ZdsServer,
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
    assert_eq!(call.uri, "/api/v1/namespaces/shop/pods/cart-0?");
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
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
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

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_captures_a_pod_in_its_netns_and_releases_it() {
    if !root_or_skip("agent_captures_a_pod_in_its_netns_and_releases_it") {
        return;
    }
    let pod = TestNetns::new();
    let peer = TestNetns::new();
    pod.link(&format!("{POD_IP}/24"), &peer, &format!("{PEER_IP}/24"));
    // Kubelet's probes arrive from the node, SNATed to 169.254.7.127.
    let probe_ip = api::ports::KUBELET_PROBE_IPV4.to_string();
    peer.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{probe_ip}/32"),
        "dev",
        &peer.veth(),
    ]);
    pod.exec(&[
        "ip",
        "route",
        "add",
        &format!("{probe_ip}/32"),
        "dev",
        &pod.veth(),
    ]);

    // Node agent, with ZDS, a mocked API server and an in-memory pod source.
    let dir = tempfile::tempdir().unwrap();
    let zds_socket = dir.path().join("ztunnel.sock");
    let (zds, acked) = ZdsServer::new(WAIT);
    serve_zds(&zds, &zds_socket);
    let (kube, mut api_calls) = mock_api();
    let config = AgentConfig {
        pod_wait: WAIT,
        sweep_interval: Duration::from_secs(3600),
        ..AgentConfig::default()
    };
    let agent = NodeAgent::new(config, zds, Some(kube));
    let agent_handle = agent.handle();
    let (source, pod_events) = MemoryPodSource::new();
    tokio::spawn(agent.run(source, acked));
    let ambient = labels(&[(api::labels::DATAPLANE_MODE, "ambient")]);
    pod_events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "shop".into(),
            labels: ambient.clone(),
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
    pod_events.send(PodEvent::Pod(cart.clone())).await.unwrap();

    // ztunnel, connected before the pod starts.
    let mut proxy = ListenerProxy::connect(zds_socket).await;

    // The runtime's CNI ADD for the pod's sandbox.
    let sandbox = CniPod {
        namespace: "shop".into(),
        name: "cart-0".into(),
        uid: Some("uid-cart".into()),
        container_id: "sandbox-1".into(),
        netns: pod.path().into(),
        ips: vec![POD_IP.parse().unwrap()],
    };
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

    // Kubelet probes reach the app, not ztunnel.
    let app_server = listen_in(&pod.netns, addr("0.0.0.0", 8081)).await;
    let _probe = connect_from(&peer.netns, addr(POD_IP, 8081), Some(addr(&probe_ip, 0))).await;
    let (_, prober) = accept(&app_server).await;
    assert_eq!(prober.ip().to_string(), probe_ip);

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
    pod_events
        .send(PodEvent::Namespace(NamespaceMeta {
            name: "shop".into(),
            labels: BTreeMap::new(),
        }))
        .await
        .unwrap();
    assert!(matches!(next(&mut proxy).await, ProxyEvent::Deleted(uid) if uid == "uid-cart"));
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
    let (zds, acked) = ZdsServer::new(WAIT);
    let agent = NodeAgent::new(AgentConfig::default(), zds.clone(), None);
    let handle = agent.handle();
    let (source, events) = MemoryPodSource::new();
    tokio::spawn(agent.run(source, acked));
    let mut meta = PodMeta {
        namespace: "shop".into(),
        name: "api-0".into(),
        uid: "uid-api".into(),
        ..Default::default()
    };
    meta.labels = labels(&[(api::labels::DATAPLANE_MODE, "ambient")]);
    events.send(PodEvent::Pod(meta)).await.unwrap();
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
