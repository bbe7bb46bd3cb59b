//! The proxy in real network namespaces (root; skipped loudly without,
//! required under CI): two pods joined by a veth, each with the node agent's
//! redirection rules installed, handed to the proxy over ZDS by the node
//! agent's own ZDS server. The client pod's connection is captured by its
//! rules into the proxy's 15001 inside that pod, carried over HBONE from the
//! pod's address, and delivered by the proxy's 15008 inside the server pod,
//! with both identities verified.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use api::zds::WorkloadInfo;
use ztunnel_rs::inpod::testing::{TestNetns, root_or_skip, serve_zds};
use ztunnel_rs::inpod::{Netns, ZdsClient, ZdsClientConfig};
use ztunnel_rs::node_agent::iptables::{self, RedirectionConfig};
use ztunnel_rs::node_agent::zds_server::{ZdsPod, ZdsServer};
use ztunnel_rs::proxy::Ports;
use ztunnel_rs::proxy::testing::{EchoApp, PATIENCE, TestMesh, exchange, xds};

const CLIENT_IP: &str = "10.244.9.1";
const SERVER_IP: &str = "10.244.9.2";

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// A connection the application in `netns` opens.
async fn connect_from(netns: &Netns, to: SocketAddr) -> tokio::net::TcpStream {
    let stream = netns
        .run_async(move || std::net::TcpStream::connect_timeout(&to, PATIENCE))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    stream.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(stream).unwrap()
}

fn pod(uid: &str, name: &str, namespace: &str, netns: &Netns) -> ZdsPod {
    ZdsPod {
        uid: uid.into(),
        info: WorkloadInfo {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
        },
        netns: netns.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_connection_crosses_pods_in_hbone() {
    if !root_or_skip("a_captured_connection_crosses_pods_in_hbone") {
        return;
    }
    let client_pod = TestNetns::new();
    let server_pod = TestNetns::new();
    client_pod.link(
        &format!("{CLIENT_IP}/24"),
        &server_pod,
        &format!("{SERVER_IP}/24"),
    );
    for pod in [&client_pod, &server_pod] {
        pod.netns
            .run(|| iptables::install(&RedirectionConfig::default()))
            .unwrap()
            .unwrap();
    }

    // The proxy on the real ports, its store as istiod would fill it.
    let mesh = TestMesh::with_config(|c| c.ports = Ports::default()).await;
    xds::apply(
        &mesh.store,
        vec![
            xds::workload("client", "a", CLIENT_IP).hbone().into(),
            xds::workload("server", "b", SERVER_IP).hbone().into(),
        ],
    );

    // The node agent's ZDS server hands both pods (with their netns) over.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("ztunnel.sock");
    let (zds, _acked) = ZdsServer::new(PATIENCE);
    serve_zds(&zds, &socket);
    let client = Arc::new(ZdsClient::new(
        ZdsClientConfig {
            socket,
            max_backoff: Duration::from_millis(200),
        },
        mesh.manager.clone(),
    ));
    let mut snapshot = client.snapshot_received();
    tokio::spawn({
        let client = client.clone();
        async move { client.run(std::future::pending()).await }
    });
    tokio::time::timeout(PATIENCE, snapshot.wait_for(|r| *r))
        .await
        .expect("the first ZDS snapshot")
        .unwrap();
    zds.add(pod("uid-client", "client", "a", &client_pod.netns))
        .await
        .expect("the proxy takes the client pod");
    zds.add(pod("uid-server", "server", "b", &server_pod.netns))
        .await
        .expect("the proxy takes the server pod");
    assert_eq!(mesh.manager.pods(), ["uid-client", "uid-server"]);

    // The server pod's application, and the client pod's connection to it.
    let app_listener = server_pod
        .netns
        .run_async(|| std::net::TcpListener::bind("0.0.0.0:8080"))
        .await
        .unwrap()
        .unwrap();
    app_listener.set_nonblocking(true).unwrap();
    let app = EchoApp::serve(
        tokio::net::TcpListener::from_std(app_listener).unwrap(),
        "server",
    );
    let mut conn = connect_from(&client_pod.netns, addr(SERVER_IP, 8080)).await;
    assert_eq!(
        exchange(&mut conn, b"hello").await.unwrap(),
        b"server: hello"
    );
    // Delivered inside the server pod from the client's own address
    // (original source): the app sees who called, its replies found their
    // way back through the pod's connmark routing.
    assert_eq!(
        app.peers()[0].ip(),
        CLIENT_IP.parse::<std::net::IpAddr>().unwrap()
    );

    let client_id = mesh.identity("a", "client").to_string();
    let server_id = mesh.identity("b", "server").to_string();
    for reporter in ["source", "destination"] {
        mesh.wait_for_counter(
            "istio_tcp_connections_closed_total",
            &[
                ("reporter", reporter),
                ("connection_security_policy", "mutual_tls"),
                ("source_principal", &client_id),
                ("destination_principal", &server_id),
                // The server's proxy found the client by the address the
                // tunnel came from: it left the client pod with its IP.
                ("source_workload", "client"),
            ],
            1,
        )
        .await;
    }

    // Unenrolled and enrolled again at once: the ports are free again as
    // soon as the proxy acks the Del, and the pod is proxied anew.
    zds.del("uid-client").await.unwrap();
    assert_eq!(mesh.manager.pods(), ["uid-server"]);
    zds.add(pod("uid-client", "client", "a", &client_pod.netns))
        .await
        .expect("the proxy takes the client pod again");
    let mut conn = connect_from(&client_pod.netns, addr(SERVER_IP, 8080)).await;
    assert_eq!(
        exchange(&mut conn, b"again").await.unwrap(),
        b"server: again"
    );

    // The node agent drops the pods: their listeners go.
    zds.del("uid-client").await.unwrap();
    zds.del("uid-server").await.unwrap();
    assert!(mesh.manager.pods().is_empty());
}
